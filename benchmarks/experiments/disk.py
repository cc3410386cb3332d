"""Where the time goes on this machine: page-cache writes, write-back, fsync, cp.

Measures, on the filesystem of ``--dir`` (default: benchmarks/, the repository's):

1. ``fresh write``: pwrite N GiB (1 MiB buffer) into a new file: page-cache allocation + copy.
2. ``fsync``: fsync of that file right after: the write-back of N GiB of dirty pages.
3. ``overwrite``: pwrite the same N GiB again into the same, now cached, file (no allocation).
4. ``rewrite after rm``: delete, sync, write a new file of N GiB at once (freed pages reused).
5. ``dd conv=fdatasync``: ``dd if=/dev/zero bs=16M count=... conv=fdatasync`` (the GUIDE's probe).
6. ``cp -a`` of the file, and ``sync`` after it.

Usage: python benchmarks/experiments/disk.py [--gib 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 1 << 20


def timed(action: Callable[[], object]) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def write(path: Path, size: int, *, truncate: bool = True) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0)
    fd = os.open(path, flags, 0o644)
    buffer = os.urandom(MiB)
    try:
        for offset in range(0, size, MiB):
            os.pwrite(fd, buffer, offset)
    finally:
        os.close(fd)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--dir", type=Path, default=HERE.parent)
    args = parser.parse_args()
    size = int(args.gib * 1024) * MiB
    gb = size / 1e9
    work = Path(tempfile.mkdtemp(prefix=".disk-", dir=args.dir))
    rows: list[tuple[str, float]] = []
    try:
        a, b = work / "a", work / "b"
        os.sync()
        rows.append(("fresh write (page cache)", timed(lambda: write(a, size))))
        rows.append(("fsync of it (write-back)", timed(lambda: fsync(a))))
        rows.append(("overwrite in place (cached)", timed(lambda: write(a, size, truncate=False))))
        rows.append(("fsync of the overwrite", timed(lambda: fsync(a))))
        copy = ["cp", "-a", str(a), str(b)]
        rows.append(("cp -a of the file", timed(lambda: subprocess.run(copy, check=True))))
        rows.append(("sync after cp -a", timed(os.sync)))
        b.unlink()
        a.unlink()
        os.sync()
        rows.append(("rewrite after rm + sync", timed(lambda: write(a, size))))
        rows.append(("fsync of it", timed(lambda: fsync(a))))
        a.unlink()
        os.sync()
        count = size // (16 * MiB)
        dd = ["dd", "if=/dev/zero", f"of={a}", "bs=16M", f"count={count}", "conv=fdatasync"]
        rows.append(
            (
                "dd conv=fdatasync",
                timed(lambda: subprocess.run(dd, check=True, capture_output=True)),
            )
        )
    finally:
        for path in work.iterdir():
            path.unlink()
        work.rmdir()
        os.sync()
    print(f"{gb:.2f} GB per step, directory {args.dir}\n")
    print("| step | seconds | GB/s |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {gb / seconds:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
