"""A configurable copy engine prototype, to measure copy-engine ideas outside the package.

It uses streamconv only to read the checkpoint and compute the plan (``load_checkpoint`` and
``plan_checkpoint``), then executes the plan's byte ranges itself, with knobs streamconv does not
have: copy chunk size, pread buffer size, preallocation, splitting work by files or by ranges,
early write-back with ``sync_file_range``, fsync overlapped in a separate thread,
``posix_fadvise(DONTNEED)`` of written output, and an xxh3 read-back checksum of each file.

Output files are written straight under their final names (no temp + rename): this is a
measuring tool, not a converter. ``--report PATH`` writes a JSON breakdown of where time went.

Usage: python benchmarks/experiments/engine.py SRC DST [--backend cfr|pread] [--chunk 64M] ...
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import itertools
import json
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from streamconv.checkpoint import load_checkpoint
from streamconv.convert import plan_checkpoint
from streamconv.plan import PlannedFile
from streamconv.rules import HYV3
from streamconv.synth import parse_size

SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_libc.sync_file_range.restype = ctypes.c_int


def sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
    if _libc.sync_file_range(fd, offset, length, flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


@dataclass(frozen=True, slots=True)
class Item:
    """``length`` bytes from source ``src`` at ``src_off`` to output ``out`` at ``dst_off``."""

    out: str
    src: str
    src_off: int
    dst_off: int
    length: int


def copies_of(planned: PlannedFile) -> list[Item]:
    """The plan's pieces of one file in output order, contiguous runs merged."""
    items: list[Item] = []
    for tensor in planned.tensors:
        position = tensor.offset
        for piece in tensor.pieces:
            last = items[-1] if items else None
            if (
                last is not None
                and last.src == piece.source
                and last.src_off + last.length == piece.offset
                and last.dst_off + last.length == position
            ):
                items[-1] = Item(
                    planned.name, last.src, last.src_off, last.dst_off, last.length + piece.length
                )
            elif piece.length:
                items.append(Item(planned.name, piece.source, piece.offset, position, piece.length))
            position += piece.length
    return items


def split_items(items: Sequence[Item], chunk: int) -> list[Item]:
    out = []
    for item in items:
        done = 0
        while done < item.length:
            n = min(chunk, item.length - done)
            out.append(Item(item.out, item.src, item.src_off + done, item.dst_off + done, n))
            done += n
    return out


class Engine:
    def __init__(self, args: argparse.Namespace, sources: dict[str, int]) -> None:
        self.args = args
        self.sources = sources
        self.local = threading.local()
        self.lock = threading.Lock()
        self.times: dict[str, float] = {"copy": 0.0, "checksum": 0.0, "sync": 0.0, "open": 0.0}

    def add(self, key: str, seconds: float) -> None:
        with self.lock:
            self.times[key] += seconds

    def buffer(self) -> memoryview:
        view = getattr(self.local, "view", None)
        if view is None:
            view = memoryview(bytearray(self.args.buffer))
            self.local.view = view
        return view

    def copy(self, out_fd: int, item: Item) -> None:
        src_fd = self.sources[item.src]
        done = 0
        if self.args.backend == "cfr":
            while done < item.length:
                want = min(self.args.chunk, item.length - done)
                n = os.copy_file_range(
                    src_fd, out_fd, want, item.src_off + done, item.dst_off + done
                )
                if n <= 0:
                    raise OSError("short copy")
                done += n
            return
        view = self.buffer()
        size = len(view)
        while done < item.length:
            want = min(size, item.length - done)
            n = os.preadv(src_fd, [view[:want]], item.src_off + done)
            if n <= 0:
                raise OSError("short read")
            written = 0
            while written < n:
                written += os.pwrite(out_fd, view[written:n], item.dst_off + done + written)
            done += n

    def open_output(self, path: Path, planned: PlannedFile) -> int:
        began = time.perf_counter()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        if self.args.prealloc == "fallocate":
            os.posix_fallocate(fd, 0, planned.size)
        else:
            os.ftruncate(fd, planned.size)
        os.pwrite(fd, planned.header, 0)
        self.add("open", time.perf_counter() - began)
        return fd

    def finish(self, fd: int, size: int) -> None:
        """Checksum, fsync, drop pages, close: what happens after a file's last byte."""
        if self.args.checksum:
            began = time.perf_counter()
            digest = xxhash.xxh3_128()
            view = memoryview(bytearray(self.args.hash_chunk))
            position = 0
            while position < size:
                n = os.preadv(fd, [view[: min(len(view), size - position)]], position)
                digest.update(view[:n])
                position += n
            self.add("checksum", time.perf_counter() - began)
        if self.args.sync != "none":  # fsync, or sfr (the final fsync after early write-back)
            began = time.perf_counter()
            os.fsync(fd)
            self.add("sync", time.perf_counter() - began)
        if self.args.fadvise:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

    def early_writeback(self, fd: int, written: int, flushed: int) -> int:
        """sync_file_range mode: start write-back of each full window, wait on the one before."""
        window = self.args.window
        while written - flushed >= window:
            began = time.perf_counter()
            sync_file_range(fd, flushed, window, SYNC_FILE_RANGE_WRITE)
            if flushed >= window:
                sync_file_range(
                    fd,
                    flushed - window,
                    window,
                    SYNC_FILE_RANGE_WAIT_BEFORE
                    | SYNC_FILE_RANGE_WRITE
                    | SYNC_FILE_RANGE_WAIT_AFTER,
                )
            self.add("sync", time.perf_counter() - began)
            flushed += window
        return flushed

    def copy_file(self, out_dir: Path, planned: PlannedFile) -> int:
        """Create, preallocate and fill one output file; returns its open descriptor."""
        fd = self.open_output(out_dir / planned.name, planned)
        began = time.perf_counter()
        flushed = 0
        waited = 0.0
        for item in copies_of(planned):
            self.copy(fd, item)
            if self.args.sync == "sfr":
                mark = time.perf_counter()
                flushed = self.early_writeback(fd, item.dst_off + item.length, flushed)
                waited += time.perf_counter() - mark  # counted as "sync", not "copy"
        self.add("copy", time.perf_counter() - began - waited)
        return fd


def run_files(engine: Engine, out_dir: Path, files: Sequence[PlannedFile]) -> None:
    """Workers take whole files, largest first. ``--overlap``: a file's fsync runs in one
    background thread while its worker goes on copying the next file."""
    pending = sorted(files, key=lambda f: -f.size)
    syncer: queue.Queue[tuple[int, int]] = queue.Queue()
    overlap = engine.args.overlap

    def background() -> None:
        while (job := syncer.get())[0] >= 0:
            engine.finish(*job)

    thread = threading.Thread(target=background)
    if overlap:
        thread.start()
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                planned = pending.pop(0)
            fd = engine.copy_file(out_dir, planned)
            if overlap:
                syncer.put((fd, planned.size))
            else:
                engine.finish(fd, planned.size)

    threads = [threading.Thread(target=worker) for _ in range(engine.args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if overlap:
        syncer.put((-1, 0))
        thread.join()


def _name(planned: PlannedFile) -> str:
    return planned.name


def run_ranges(engine: Engine, out_dir: Path, files: Sequence[PlannedFile]) -> None:
    """All outputs open at once; workers take ``--chunk``-sized items from one shared list;
    whoever copies a file's last item finishes (checksums, fsyncs) that file."""
    fds = {f.name: engine.open_output(out_dir / f.name, f) for f in files}
    sizes = {f.name: f.size for f in files}
    per_file = [split_items(copies_of(f), engine.args.chunk) for f in sorted(files, key=_name)]
    items: list[Item] = []
    if engine.args.split == "interleave":  # A0 B0 C0 A1 B1 ...: workers mostly on different files
        for row in itertools.zip_longest(*per_file):
            items += [item for item in row if item is not None]
    else:
        for file_items in per_file:
            items += file_items
    remaining = {f.name: sum(1 for i in items if i.out == f.name) for f in files}
    lock = threading.Lock()
    position = [0]

    def worker() -> None:
        while True:
            with lock:
                if position[0] >= len(items):
                    return
                item = items[position[0]]
                position[0] += 1
            began = time.perf_counter()
            engine.copy(fds[item.out], item)
            engine.add("copy", time.perf_counter() - began)
            if engine.args.sync == "sfr":  # start write-back of this item's range, no waiting
                began = time.perf_counter()
                sync_file_range(fds[item.out], item.dst_off, item.length, SYNC_FILE_RANGE_WRITE)
                engine.add("sync", time.perf_counter() - began)
            with lock:
                remaining[item.out] -= 1
                last = remaining[item.out] == 0
            if last:
                engine.finish(fds[item.out], sizes[item.out])

    for name, count in remaining.items():
        if count == 0:
            engine.finish(fds[name], sizes[name])
    threads = [threading.Thread(target=worker) for _ in range(engine.args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_whole(engine: Engine, src: Path, out_dir: Path, names: Sequence[str]) -> None:
    """No plan: copy every input shard whole (one range per file), to isolate chunk-size effects."""
    pending = list(names)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                name = pending.pop(0)
            size = os.fstat(engine.sources[name]).st_size
            fd = os.open(out_dir / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            if engine.args.prealloc == "fallocate":
                os.posix_fallocate(fd, 0, size)
            began = time.perf_counter()
            engine.copy(fd, Item(name, name, 0, 0, size))
            engine.add("copy", time.perf_counter() - began)
            engine.finish(fd, size)

    threads = [threading.Thread(target=worker) for _ in range(engine.args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--backend", choices=("cfr", "pread"), default="cfr")
    parser.add_argument("--chunk", type=parse_size, default=64 * 2**20)
    parser.add_argument("--buffer", type=parse_size, default=8 * 2**20)
    parser.add_argument("--prealloc", choices=("fallocate", "truncate"), default="fallocate")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--split", choices=("files", "ranges", "interleave", "whole"), default="files"
    )
    parser.add_argument("--sync", choices=("none", "fsync", "sfr"), default="none")
    parser.add_argument(
        "--overlap", action="store_true", help="checksum/fsync/close in a background thread"
    )
    parser.add_argument("--window", type=parse_size, default=64 * 2**20)
    parser.add_argument("--checksum", action="store_true")
    parser.add_argument("--hash-chunk", type=parse_size, default=8 * 2**20)
    parser.add_argument("--fadvise", action="store_true", help="DONTNEED the output after sync")
    parser.add_argument("--report", type=Path)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    checkpoint = load_checkpoint(args.src)
    plan = plan_checkpoint(checkpoint, HYV3)
    planned = time.perf_counter()
    args.dst.mkdir(parents=True, exist_ok=True)
    sources = {s.name: os.open(args.src / s.name, os.O_RDONLY) for s in checkpoint.sources}
    engine = Engine(args, sources)
    if args.split == "whole":
        run_whole(engine, args.src, args.dst, sorted(sources))
    elif args.split in ("ranges", "interleave"):
        run_ranges(engine, args.dst, plan.files)
    else:
        run_files(engine, args.dst, plan.files)
    if args.sync != "none":
        fd = os.open(args.dst, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
    if plan.index is not None:
        (args.dst / "model.safetensors.index.json").write_bytes(plan.index)
    for fd in sources.values():
        os.close(fd)
    ended = time.perf_counter()
    if args.report:
        report = {"plan": planned - began, "total": ended - began, **engine.times}
        args.report.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
