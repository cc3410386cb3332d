"""The writer: runs the file part of a plan. Knows files and bytes, nothing of experts or names.

Per output file: a sibling temporary file, ``posix_fallocate`` of its full size (a full disk
fails here with ENOSPC, not later with SIGBUS), the header, every range copied into place,
``fsync``, rename to the final name, ``fsync`` of the directory. A failure removes the temporary
file, so nothing partial ever stands under a final name. Inputs are opened read-only, once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from .copyengine import Copier, Copy, coalesce
from .errors import InterruptedRun, OutputError, StreamconvError
from .plan import PlannedFile
from .state import Published, file_checksum

log = logging.getLogger(__name__)

TEMP_PREFIX = "."
TEMP_SUFFIX = ".streamconv-partial"


def temp_path(directory: Path, name: str) -> Path:
    return directory / f"{TEMP_PREFIX}{name}{TEMP_SUFFIX}"


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


@dataclass(frozen=True, slots=True)
class WriteOptions:
    backend: str = "auto"
    workers: int = 2
    sync: bool = True


def _io_error(error: OSError, path: Path, action: str) -> OutputError:
    reason = error.strerror or str(error)
    hint = None
    if error.errno == errno.ENOSPC:
        hint = "free some space on the output filesystem and run the same command again"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "check that the output directory is writable"
    return OutputError(f"{action} failed: {reason}", path=path, hint=hint)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_sources(paths: Mapping[str, Path]) -> Iterator[dict[str, int]]:
    """Open every source read-only once; the descriptors are shared by all workers."""
    _allow_descriptors(len(paths) + 64)
    fds: dict[str, int] = {}
    try:
        for name, path in paths.items():
            try:
                fds[name] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as error:
                raise OutputError(f"cannot open source: {error.strerror}", path=path) from error
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def _allow_descriptors(count: int) -> None:
    """Raise the soft open-file limit (up to the hard limit) for checkpoints of many shards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        target = count if hard == resource.RLIM_INFINITY else min(count, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def publish_bytes(directory: Path, name: str, data: bytes, *, sync: bool) -> None:
    """Write a small file atomically: temp file, fsync, rename, directory fsync."""
    final = directory / name
    temp = temp_path(directory, name)
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.replace(temp, final)
        if sync:
            fsync_dir(directory)
    except OSError as error:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise _io_error(error, final, "writing") from error


def copy_entry(source: Path, directory: Path, name: str, *, sync: bool) -> None:
    """Copy a file or folder (following links) into ``directory`` atomically, contents only."""
    final = directory / name
    temp = temp_path(directory, name)
    try:
        if source.is_dir():
            shutil.copytree(source, temp, copy_function=shutil.copyfile)
        else:
            shutil.copyfile(source, temp)
        if sync:
            _fsync_tree(temp)
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)  # a folder copied by an earlier, interrupted run
        os.replace(temp, final)
        if sync:
            fsync_dir(directory)
    except OSError as error:
        with contextlib.suppress(OSError):
            if temp.is_dir():
                shutil.rmtree(temp)
            else:
                temp.unlink()
        raise _io_error(error, final, "copying") from error


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            _fsync_tree(child)
        fsync_dir(path)
    else:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_copies(planned: PlannedFile) -> list[Copy]:
    """The byte ranges that make up ``planned``'s data, in output order, coalesced."""
    copies = []
    for tensor in planned.tensors:
        position = tensor.offset
        for piece in tensor.pieces:
            copies.append(Copy(piece.source, piece.offset, position, piece.length))
            position += piece.length
    return coalesce(copies)


class FileWriter:
    """Writes planned files into ``directory`` from open sources, one file per call."""

    def __init__(
        self,
        *,
        directory: Path,
        sources: dict[str, int],
        options: WriteOptions,
        progress: Callable[[int], None],
        cancel: threading.Event,
        on_published: Callable[[Published], None] | None = None,
    ) -> None:
        self.directory = directory
        self.on_published = on_published
        self.sources = sources
        self.options = options
        self.progress = progress
        self.cancel = cancel
        out_device = os.stat(directory).st_dev
        devices = {name: os.fstat(fd).st_dev for name, fd in sources.items()}
        self._same_device = {name: dev == out_device for name, dev in devices.items()}
        self.backends_used: set[str] = set()
        self._lock = threading.Lock()

    def write(self, planned: PlannedFile) -> None:
        final = self.directory / planned.name
        temp = temp_path(self.directory, planned.name)
        copier = Copier(
            self.options.backend,
            self.sources,
            self.progress,
            self.cancel,
            self._same_device.__getitem__,
        )
        fd = -1
        try:
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
            self._preallocate(fd, planned.size, copier)
            _pwrite_all(fd, planned.header, 0)
            self.progress(len(planned.header))
            copier.start(fd, planned.header, durable=self.options.sync)
            copier.run(fd, planned.size, file_copies(planned))
            if os.fstat(fd).st_size != planned.size:
                raise OutputError(
                    f"output is {os.fstat(fd).st_size} bytes, planned {planned.size}", path=final
                )
            # Durable runs record a checksum (hashed from the page cache, before the fsync) so
            # that a resumed run can trust this file; --no-sync runs record none.
            checksum = None
            if self.options.sync:
                checksum = copier.checksum() or file_checksum(fd, planned.size)
            if self.options.sync:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(temp, final)
            if self.options.sync:
                fsync_dir(self.directory)
            published = Published.of(final, planned.size, checksum)
        except BaseException as error:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                temp.unlink()
            if isinstance(error, OSError) and not isinstance(error, StreamconvError):
                raise _io_error(error, final, "writing") from error
            raise
        with self._lock:
            self.backends_used |= copier.used
            if self.on_published is not None:
                self.on_published(published)
        log.debug("wrote %s (%d bytes)", final, planned.size)

    def _preallocate(self, fd: int, size: int, copier: Copier) -> None:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            # No preallocation here: grow the file instead, and never write through a mapping
            # into a sparse file (a full disk would be a SIGBUS).
            os.ftruncate(fd, size)
            if copier.backend == "mmap":
                log.warning("posix_fallocate unsupported here; using pread instead of mmap")
                copier.backend = "pread"


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def write_all(
    files: Sequence[PlannedFile],
    writer: FileWriter,
    workers: int,
) -> None:
    """Write ``files`` with ``workers`` threads, largest first; stop all on the first failure."""
    order = sorted(files, key=lambda f: (-f.size, f.name))
    if workers <= 1 or len(order) <= 1:
        for planned in order:
            writer.write(planned)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="streamconv")
    try:
        futures: list[Future[None]] = [pool.submit(writer.write, planned) for planned in order]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() is not None for f in done):
            writer.cancel.set()
            wait(futures)
            errors = [e for e in (f.exception() for f in futures) if e is not None]
            real = [e for e in errors if not isinstance(e, InterruptedRun)]
            raise (real or errors)[0]
    except KeyboardInterrupt:
        writer.cancel.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
