"""Streamed byte comparison of an output range against the source ranges it was copied from.

Bounded memory: two reusable buffers per thread; sources read with ``preadv``. Used by
``verify`` for shards (against their planned copies) and for copied files.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .copyengine import Copy
from .errors import InterruptedRun

BUFFER = 8 * 1024 * 1024


class SourceShort(Exception):
    """A source ended before a range that should be in it."""

    def __init__(self, source: str, offset: int) -> None:
        super().__init__(source, offset)
        self.source = source
        self.offset = offset


def _read_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd`` at ``offset``; returns the bytes read (short only at EOF)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


class _Buffers(threading.local):
    size = BUFFER

    def get(self) -> tuple[bytearray, bytearray]:
        pair: tuple[bytearray, bytearray] | None = getattr(self, "pair", None)
        if pair is None or len(pair[0]) != self.size:
            pair = (bytearray(self.size), bytearray(self.size))
            self.pair = pair
        return pair


_BUFFERS = _Buffers()


def compare_ranges(
    out_fd: int,
    start: int,
    end: int,
    segments: Sequence[Copy],
    *,
    sources: Mapping[str, int],
    on_diff: Callable[[np.ndarray], bool],
    advance: Callable[[int], None] = lambda n: None,
    cancel: threading.Event | None = None,
    buffer_size: int = BUFFER,
) -> int:
    """Compare output bytes ``[start, end)`` with ``segments`` (which tile that range).

    ``on_diff`` gets the absolute offsets of differing bytes of one window (sorted) and returns
    False to stop. Returns the bytes compared; stops early at the output's end of file. Raises
    :class:`SourceShort` when a source ends before a segment does.
    """
    _BUFFERS.size = buffer_size
    out_buf, src_buf = _BUFFERS.get()
    out_view, src_view = memoryview(out_buf), memoryview(src_buf)
    compared = 0
    index = max(0, bisect.bisect_right(segments, start, key=lambda seg: seg.dst_offset) - 1)
    position = start
    while position < end:
        if cancel is not None and cancel.is_set():
            raise InterruptedRun("verification interrupted")
        count = min(buffer_size, end - position)
        got = _read_into(out_fd, out_view[:count], position)
        stop = position + count
        while index < len(segments) and segments[index].dst_offset < stop:
            seg = segments[index]
            lo, hi = max(seg.dst_offset, position), min(seg.dst_offset + seg.length, stop)
            src_at = seg.src_offset + lo - seg.dst_offset
            if _read_into(sources[seg.source], src_view[lo - position : hi - position], src_at) < (
                hi - lo
            ):
                raise SourceShort(seg.source, src_at)
            if seg.dst_offset + seg.length > stop:
                break
            index += 1
        if got == buffer_size:
            same = out_buf == src_buf
        else:
            a = np.frombuffer(out_buf, np.uint8, got)
            same = bool(np.array_equal(a, np.frombuffer(src_buf, np.uint8, got)))
        if not same:
            a = np.frombuffer(out_buf, np.uint8, got)
            diffs = np.flatnonzero(a != np.frombuffer(src_buf, np.uint8, got)) + position
            if not on_diff(diffs):
                return compared + got
        compared += got
        advance(got)
        if got < count:
            break
        position = stop
    return compared


def first_difference(a: bytes, b: bytes) -> int:
    """Index of the first byte where ``a`` and ``b`` differ (``min(len)`` if one is a prefix)."""
    n = min(len(a), len(b))
    x = np.frombuffer(a, np.uint8, n)
    diffs = np.flatnonzero(x != np.frombuffer(b, np.uint8, n))
    return int(diffs[0]) if len(diffs) else n
