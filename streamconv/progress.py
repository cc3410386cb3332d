"""Progress reporting (and only that): a live bar on a terminal, periodic lines elsewhere."""

from __future__ import annotations

import threading
import time
from typing import TextIO


class Progress:
    """What a conversion reports while it runs; this base reports nothing."""

    def start(self, total: int) -> None:
        """Called once, with the number of bytes that will be written."""

    def advance(self, nbytes: int) -> None:
        """Called (from worker threads) as bytes land."""

    def finish(self) -> None:
        """Called once at the end, successful or not."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class _Counting(Progress):
    """Thread-safe byte counter with rate and ETA; subclasses decide when and how to show it."""

    def __init__(self, stream: TextIO, interval: float) -> None:
        self.stream = stream
        self.interval = interval
        self.total = 0
        self.done = 0
        self._started = 0.0
        self._shown = 0.0
        self._lock = threading.Lock()

    def start(self, total: int) -> None:
        self.total = total
        self._started = self._shown = time.monotonic()

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            now = time.monotonic()
            if now - self._shown >= self.interval:
                self._shown = now
                self._show(now)

    def finish(self) -> None:
        with self._lock:
            self._show(time.monotonic(), final=True)

    def _numbers(self, now: float) -> tuple[float, float, str]:
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        fraction = self.done / self.total if self.total else 1.0
        eta = human_seconds((self.total - self.done) / rate) if rate > 0 else "?"
        return fraction, rate, eta

    def _show(self, now: float, final: bool = False) -> None:
        raise NotImplementedError


class BarProgress(_Counting):
    """A live one-line bar, redrawn in place (for terminals)."""

    WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream, interval=0.1)

    def _show(self, now: float, final: bool = False) -> None:
        fraction, rate, eta = self._numbers(now)
        filled = int(self.WIDTH * min(fraction, 1.0))
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        line = (
            f"\r[{bar}] {fraction:6.1%} {human_bytes(self.done)} / {human_bytes(self.total)}"
            f"  {human_bytes(rate)}/s  ETA {eta}   "
        )
        self.stream.write(line + ("\n" if final else ""))
        self.stream.flush()


class LineProgress(_Counting):
    """A plain line every ``interval`` seconds (for CI logs and other non-terminals)."""

    def __init__(self, stream: TextIO, interval: float = 5.0) -> None:
        super().__init__(stream, interval=interval)

    def _show(self, now: float, final: bool = False) -> None:
        if final and self.done == 0:
            return
        fraction, rate, eta = self._numbers(now)
        self.stream.write(
            f"progress: {fraction:.1%} ({human_bytes(self.done)} of {human_bytes(self.total)}), "
            f"{human_bytes(rate)}/s, ETA {eta}\n"
        )
        self.stream.flush()
