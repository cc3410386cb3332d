"""The run state kept in ``OUTPUT_DIR/.streamconv/``: what makes a conversion resumable.

``state.json`` holds the fingerprint of the plan (input files by size, mtime and inode; the
plan's own bytes, which cover rules, headers and output layout; the other copied entries) and,
for every shard already published, its size, file identity and xxh3-128 checksum. It is
rewritten atomically after each published shard. ``lock`` is held (``flock``) for the whole
run, so a second concurrent conversion into the same directory is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import orjson
import xxhash

from .checkpoint import Checkpoint
from .errors import OutputError, UsageError
from .plan import Plan

log = logging.getLogger(__name__)

STATE_DIR = ".streamconv"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
STATE_FORMAT = 2
_HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Published:
    """A shard published under its final name by a run."""

    name: str
    size: int
    checksum: str | None  # xxh3-128 hex; None when written with --no-sync
    mtime_ns: int
    ctime_ns: int  # unlike mtime, no program can set it back
    inode: int

    @classmethod
    def of(cls, path: Path, size: int, checksum: str | None) -> Published:
        info = os.stat(path)
        return cls(path.name, size, checksum, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)

    def same_file(self, info: os.stat_result) -> bool:
        """Whether ``info`` is still the very file that was published (not rewritten since)."""
        return (info.st_ino, info.st_mtime_ns, info.st_ctime_ns) == (
            self.inode,
            self.mtime_ns,
            self.ctime_ns,
        )

    def to_list(self) -> list[object]:
        return [self.name, self.size, self.checksum, self.mtime_ns, self.ctime_ns, self.inode]


@dataclass(frozen=True, slots=True)
class RunState:
    fingerprint: str
    outputs: tuple[str, ...]  # every name the run may create (shards, copied entries, index)
    published: tuple[Published, ...] = ()
    complete: bool = False

    def find(self, name: str) -> Published | None:
        for item in self.published:
            if item.name == name:
                return item
        return None

    def with_published(self, item: Published) -> RunState:
        others = tuple(p for p in self.published if p.name != item.name)
        return replace(self, published=(*others, item))

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "format": STATE_FORMAT,
                "fingerprint": self.fingerprint,
                "outputs": list(self.outputs),
                "published": [p.to_list() for p in sorted(self.published, key=lambda p: p.name)],
                "complete": self.complete,
            },
            option=orjson.OPT_INDENT_2,
        )


def fingerprint(checkpoint: Checkpoint, plan: Plan) -> str:
    """A digest of everything the output bytes depend on."""
    others = []
    for name in checkpoint.others:
        for path in _walk(checkpoint.root / name):
            info = os.stat(path)
            relative = path.relative_to(checkpoint.root).as_posix()
            others.append([relative, info.st_size, info.st_mtime_ns, info.st_ctime_ns])
    document = {
        "inputs": [[s.name, s.size, s.mtime_ns, s.inode] for s in checkpoint.sources],
        "others": others,
        "plan": xxhash.xxh3_128_hexdigest(plan.to_json()),
    }
    # xxh3-128 (not sha256): a change detector, not a security boundary; and hashlib's OpenSSL
    # would add 2.6 MB to every conversion's resident memory.
    return xxhash.xxh3_128_hexdigest(orjson.dumps(document))


def _walk(path: Path) -> Iterator[Path]:
    """``path`` and, for a folder, everything below it (links followed), in sorted order."""
    yield path
    if path.is_dir():
        for child in sorted(path.iterdir()):
            yield from _walk(child)


def state_dir(output_dir: Path) -> Path:
    return output_dir / STATE_DIR


def load_state(output_dir: Path) -> RunState | None:
    path = state_dir(output_dir) / STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise OutputError(f"cannot read run state: {error.strerror}", path=path) from error
    try:
        data = orjson.loads(raw)
        if data.get("format") != STATE_FORMAT:
            raise ValueError("unknown state format")
        return RunState(
            fingerprint=str(data["fingerprint"]),
            outputs=tuple(str(n) for n in data["outputs"]),
            published=tuple(
                Published(str(n), int(s), None if c is None else str(c), int(m), int(t), int(i))
                for n, s, c, m, t, i in data["published"]
            ),
            complete=bool(data["complete"]),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(
            "run state is unreadable",
            path=path,
            hint="pass --restart to discard the previous run's output",
        ) from error


def save_state(output_dir: Path, state: RunState, *, sync: bool) -> None:
    directory = state_dir(output_dir)
    path = directory / STATE_FILE
    temp = directory / f".{STATE_FILE}.tmp"
    try:
        with open(temp, "wb") as handle:
            handle.write(state.to_bytes())
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as error:
        raise OutputError(f"cannot write run state: {error.strerror}", path=path) from error


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output directory, or refuse at once."""
    directory = state_dir(output_dir)
    try:
        directory.mkdir(exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as error:
        raise OutputError(
            f"cannot create the run lock: {error.strerror}", path=directory
        ) from error
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise OutputError(
                "another conversion is running into this directory", path=output_dir
            ) from error
        yield
    finally:
        os.close(fd)


def file_checksum(fd: int, size: int) -> str:
    """xxh3-128 of the first ``size`` bytes of ``fd`` (read with pread, bounded memory)."""
    digest = xxhash.xxh3_128()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    position = 0
    while position < size:
        n = os.preadv(fd, [view[: min(_HASH_CHUNK, size - position)]], position)
        if n == 0:
            break
        digest.update(view[:n])
        position += n
    return digest.hexdigest()


def path_checksum(path: Path, size: int) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return file_checksum(fd, size)
    finally:
        os.close(fd)
