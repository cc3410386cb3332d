"""Copy backends: move byte ranges from source descriptors into a preallocated output.

* ``copy_file_range``: kernel-side copy, no data through user space. Works within one
  filesystem; refused (EXDEV, EOPNOTSUPP, ...) elsewhere, where the pread backend takes over.
* ``mmap``: the preallocated output is mapped and ``preadv`` reads each range straight into the
  mapping (a truncated source yields a short read, never SIGBUS).
* ``pread``: ``preadv`` into one bounded reusable buffer, ``pwrite`` out.

Every backend treats a short read (0 before the range is done) as a source shorter than its
header promised: :class:`SourceChangedError`, never an endless loop.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import xxhash

from .errors import InterruptedRun, SourceChangedError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "copy_file_range", "mmap", "pread")
#: Bytes per system call: large enough that call overhead vanishes, small enough for live
#: progress and a prompt stop on a signal.
CHUNK = 64 * 1024 * 1024
#: pread/pwrite buffer: 1 MiB measured fastest here (it stays in the CPU caches; 8 MiB was
#: slower); see BENCHMARKS.md.
BUFFER = 1024 * 1024
#: Durable runs start write-back every WINDOW bytes and wait for the window before, so dirty
#: pages never pile up (a low-RAM node) and the final fsync has little left to do.
WINDOW = 64 * 1024 * 1024
#: The mmap backend maps this much of the output at a time (a multiple of the page size).
MMAP_WINDOW = 32 * 1024 * 1024
#: copy_file_range errors meaning "not here", after which the pread backend is used.
REFUSED = frozenset(
    {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF, errno.ETXTBSY}
)

Progress = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class Copy:
    """``length`` bytes from ``source`` at ``src_offset`` to the output at ``dst_offset``."""

    source: str
    src_offset: int
    dst_offset: int
    length: int


def coalesce(copies: Sequence[Copy]) -> list[Copy]:
    """Merge copies that continue each other in both the source and the output."""
    merged: list[Copy] = []
    for copy in copies:
        if copy.length == 0:
            continue
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.source == copy.source
            and last.src_offset + last.length == copy.src_offset
            and last.dst_offset + last.length == copy.dst_offset
        ):
            merged[-1] = Copy(
                last.source, last.src_offset, last.dst_offset, last.length + copy.length
            )
        else:
            merged.append(copy)
    return merged


class CopyRefused(OSError):
    """copy_file_range is not possible between these two files."""


def _short(source: str, offset: int) -> SourceChangedError:
    return SourceChangedError(
        f"source ended at byte {offset}, before the end its header promised "
        "(was it truncated or replaced during the run?)",
        path=source,
    )


class Copier:
    """Copies ranges into one open output file with a chosen backend (one per worker/file)."""

    def __init__(
        self,
        backend: str,
        sources: dict[str, int],
        progress: Progress,
        cancel: threading.Event,
        same_device: Callable[[str], bool],
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")
        self.backend = backend
        self.sources = sources
        self.progress = progress
        self.cancel = cancel
        self.same_device = same_device
        self._buffer: bytearray | None = None
        self.used: set[str] = set()
        self.digest: Any = None  # an xxh3 hash fed in file order, while data passes through
        self.hashed = True  # False once any range went kernel-side (copy_file_range)
        self._writeback: _Writeback | None = None

    def start(self, out_fd: int, header: bytes, *, durable: bool) -> None:
        """Begin a file whose first ``len(header)`` bytes are ``header`` (already written)."""
        self.digest = xxhash.xxh3_128(header) if durable else None
        self.hashed = durable
        self._writeback = _Writeback(out_fd, len(header)) if durable else None

    def checksum(self) -> str | None:
        """The file's xxh3-128, if every byte passed through user space; else None."""
        return self.digest.hexdigest() if self.hashed and self.digest is not None else None

    def _landed(self, view: memoryview | None, end: int, n: int) -> None:
        """``n`` bytes ending at output offset ``end`` are written (``view`` holds them)."""
        if self.digest is not None:
            if view is None:
                self.hashed = False
            elif self.hashed:
                self.digest.update(view)
        if self._writeback is not None:
            self._writeback.advance(end)
        self.progress(n)

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise InterruptedRun("interrupted")

    def run(self, out_fd: int, out_size: int, copies: Sequence[Copy]) -> None:
        """Copy ``copies`` (in output order, contiguous after the header) into ``out_fd``.

        ``auto``: durable runs use pread (as fast as copy_file_range once the disk is the
        limit, and the bytes can be hashed on the way); --no-sync runs use copy_file_range
        where input and output share a filesystem.
        """
        if self.backend == "mmap":
            self._run_mmap(out_fd, out_size, copies)
            return
        kernel_side = self.backend == "copy_file_range" or (
            self.backend == "auto" and self._writeback is None
        )
        for copy in copies:
            use_cfr = kernel_side and (
                self.backend == "copy_file_range" or self.same_device(copy.source)
            )
            if use_cfr:
                try:
                    self._copy_file_range(out_fd, copy)
                    continue
                except CopyRefused as error:
                    log.info("copy_file_range refused for %s (%s); using pread", copy.source, error)
                    self.same_device = _never
                    if self.backend == "copy_file_range":
                        log.warning("copy_file_range is refused here (%s); using pread", error)
                        self.backend = "auto"
            self._pread(out_fd, copy)

    def _copy_file_range(self, out_fd: int, copy: Copy) -> None:
        src_fd = self.sources[copy.source]
        done = 0
        while done < copy.length:
            self._check_cancel()
            want = min(CHUNK, copy.length - done)
            try:
                n = os.copy_file_range(
                    src_fd, out_fd, want, copy.src_offset + done, copy.dst_offset + done
                )
            except OSError as error:
                if done == 0 and error.errno in REFUSED:
                    raise CopyRefused(error.errno, error.strerror) from error
                raise
            if n == 0:
                raise _short(copy.source, copy.src_offset + done)
            done += n
            self._landed(None, copy.dst_offset + done, n)
        self.used.add("copy_file_range")

    def _buf(self) -> memoryview:
        if self._buffer is None:
            self._buffer = bytearray(BUFFER)
        return memoryview(self._buffer)

    def _pread(self, out_fd: int, copy: Copy) -> None:
        src_fd = self.sources[copy.source]
        view = self._buf()
        done = 0
        while done < copy.length:
            self._check_cancel()
            want = min(BUFFER, copy.length - done)
            n = os.preadv(src_fd, [view[:want]], copy.src_offset + done)
            if n == 0:
                raise _short(copy.source, copy.src_offset + done)
            written = 0
            while written < n:
                written += os.pwrite(out_fd, view[written:n], copy.dst_offset + done + written)
            done += n
            self._landed(view[:n], copy.dst_offset + done, n)
        self.used.add("pread")

    def _run_mmap(self, out_fd: int, out_size: int, copies: Sequence[Copy]) -> None:
        """Map the output one aligned window of MMAP_WINDOW bytes at a time (resident memory
        stays bounded; consecutive small ranges share a mapping) and read each source range
        straight into it. Pages dirtied through the mapping are ordinary page-cache pages of
        the file: the writer's fsync makes them durable."""
        mapped: mmap.mmap | None = None
        view: memoryview | None = None
        base = -1
        try:
            for copy in copies:
                src_fd = self.sources[copy.source]
                done = 0
                while done < copy.length:
                    self._check_cancel()
                    start = copy.dst_offset + done
                    if view is None or mapped is None or not base <= start < base + len(view):
                        if view is not None and mapped is not None:
                            view.release()
                            mapped.close()
                        base = start - start % MMAP_WINDOW
                        mapped = mmap.mmap(
                            out_fd,
                            min(MMAP_WINDOW, out_size - base),
                            flags=mmap.MAP_SHARED,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE,
                            offset=base,
                        )
                        view = memoryview(mapped)
                    want = min(copy.length - done, base + len(view) - start)
                    target = view[start - base : start - base + want]
                    try:
                        n = os.preadv(src_fd, [target], copy.src_offset + done)
                        if n == 0:
                            raise _short(copy.source, copy.src_offset + done)
                        self._landed(target[:n], start + n, n)
                    finally:
                        target.release()
                    done += n
        finally:
            if view is not None:
                view.release()
            if mapped is not None:
                mapped.close()
        self.used.add("mmap")


def _never(_: str) -> bool:
    return False


_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_sync_file_range = _load_sync_file_range()


class _Writeback:
    """Early write-back of a file being written in order: once a WINDOW of new bytes has
    landed, start its write-back and wait for the window before (Linux sync_file_range).
    Only a hint for the page cache; the fsync at the end is what makes the file durable."""

    def __init__(self, fd: int, start: int) -> None:
        self.fd = fd
        self.start = start  # first byte not yet handed to write-back
        self.previous: tuple[int, int] | None = None

    def advance(self, end: int) -> None:
        if _sync_file_range is None or end - self.start < WINDOW:
            return
        _sync_file_range(self.fd, self.start, end - self.start, _SYNC_FILE_RANGE_WRITE)
        if self.previous is not None:
            flags = (
                _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
            )
            _sync_file_range(self.fd, *self.previous, flags)
        self.previous = (self.start, end - self.start)
        self.start = end
