"""Measuring one command: wall time, peak RSS of its process tree, max single-process RSS.

* Tree RSS: a thread samples the RSS of the process and all its descendants with psutil every
  ``interval`` seconds (10 ms) and keeps the largest sum. New descendants are looked up every
  ``CHILD_EVERY`` samples (a full /proc scan costs ~0.5 ms here).
* Max RSS: ``ru_maxrss`` from ``wait4``: the largest RSS any single process of the tree reached
  (Linux folds waited-for descendants into it), exact, not sampled. Linux also folds in the
  high-water mark of the memory image a process had *before* its ``exec``, which for a child of
  this (numpy- and matplotlib-laden, ~100 MB) process would be ours. So the command is started
  through a small launcher that forks it and reports its ``wait4`` rusage: GNU ``time -f %M``
  (~1.4 MB floor) when installed, else a ``python -S -I`` one (~7 MB floor). The launcher itself
  is left out of the sampled tree.
* Wall time: from just before ``Popen`` to the launcher's exit (it includes interpreter start).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

CHILD_EVERY = 5
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss}\\n")
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def _gnu_time() -> str | None:
    path = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    if path is None:
        return None
    try:
        probe = subprocess.run(
            [path, "--version"], check=False, capture_output=True, text=True, timeout=10
        )
    except OSError:
        return None
    return path if "GNU" in probe.stdout + probe.stderr else None


GNU_TIME = _gnu_time()
LAUNCHER = "GNU time -f %M" if GNU_TIME else "python -S -I fork/exec launcher"


def _wrap(argv: Sequence[str], report: Path) -> list[str]:
    if GNU_TIME:
        return [GNU_TIME, "-f", "%M", "-o", str(report), *argv]
    return [sys.executable, "-S", "-I", "-c", _LAUNCHER, str(report), *argv]


def _read_maxrss(report: Path) -> int:
    """KiB from the launcher's report (GNU time may put a status line before the number)."""
    for line in reversed(report.read_text().splitlines()):
        if line.strip().isdigit():
            return int(line)
    return 0


@dataclass(frozen=True, slots=True)
class Run:
    """One measured run of one command."""

    name: str
    wall: float  # seconds
    tree_rss: int  # bytes: peak of the sampled sum over the tree, at least max_rss (see measure)
    max_rss: int  # bytes: ru_maxrss (largest single process)
    returncode: int
    samples: int
    tree_rss_sampled: int = 0  # bytes: the sampled peak alone
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        tree: list[psutil.Process] = []  # the launcher's descendants: the command's tree
        tick = 0
        while not self.stop.is_set():
            if not tree or tick % CHILD_EVERY == 0:
                with contextlib.suppress(psutil.Error):
                    tree = root.children(recursive=True)
            total = 0
            for process in tree:
                with contextlib.suppress(psutil.Error):  # exited (or a zombie) since the scan
                    total += process.memory_info().rss
            if total:
                self.peak = max(self.peak, total)
                self.samples += 1
            tick += 1
            self.stop.wait(self.interval)


def measure(
    name: str,
    argv: Sequence[str],
    *,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    interval: float = 0.01,
) -> Run:
    """Run ``argv`` to completion and measure it. Output goes to ``log`` (or is discarded)."""
    sink = open(log, "ab") if log is not None else open(os.devnull, "wb")  # noqa: SIM115
    with sink:
        if log is not None:
            sink.write(f"\n$ {' '.join(argv)}\n".encode())
            sink.flush()
        handle, name_ = tempfile.mkstemp(prefix="streamconv-bench-rusage-")
        os.close(handle)
        report = Path(name_)
        try:
            started = time.perf_counter()
            process = subprocess.Popen(
                _wrap(argv, report),
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
            sampler = _Sampler(process.pid, interval)
            sampler.start()
            _, status, _usage = os.wait4(process.pid, 0)
            wall = time.perf_counter() - started
            sampler.stop.set()
            sampler.join()
            process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
            max_rss = _read_maxrss(report) * 1024  # KiB on Linux
        finally:
            report.unlink(missing_ok=True)
    # A tree's peak sum is at least its largest process's peak; sampling every 10 ms can miss
    # a run of a few milliseconds (or a peak between samples) entirely, ru_maxrss cannot.
    return Run(
        name=name,
        wall=wall,
        tree_rss=max(sampler.peak, max_rss),
        max_rss=max_rss,
        returncode=process.returncode,
        samples=sampler.samples,
        tree_rss_sampled=sampler.peak,
    )


def can_drop_caches() -> bool:
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def settle(*, cold: bool) -> None:
    """Between runs: flush dirty pages (so write-back does not bleed into the next run)."""
    os.sync()
    if cold:
        DROP_CACHES.write_text("3\n")
    time.sleep(0.2)


@dataclass(frozen=True, slots=True)
class Stats:
    median: float
    low: float
    high: float
    n: int


def stats(values: Sequence[float]) -> Stats:
    return Stats(statistics.median(values), min(values), max(values), len(values))


def fmt_range(s: Stats, digits: int = 2) -> str:
    """``median (min-max)``."""
    if s.n == 1:
        return f"{s.median:.{digits}f}"
    return f"{s.median:.{digits}f} ({s.low:.{digits}f}–{s.high:.{digits}f})"
