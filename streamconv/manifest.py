"""The output manifest: sha256 and size of every output file, and the plan fingerprint.

``streamconv-manifest.json`` (in the output directory, written atomically) lets anyone check an
output directory without its input, and check an upload: a file's sha256 is the object id the
Hugging Face Hub stores for LFS files. Listed: every regular file under the output directory,
recursively (symbolic links followed), except the manifest itself and the ``.streamconv/`` run
state folder. Paths are relative, with ``/`` separators, sorted.

Fields (stable): ``format`` (1), ``algorithm`` (``"sha256"``), ``plan_fingerprint`` (str),
``total_size`` (sum of the file sizes), ``files``: a list of ``{"path", "size", "sha256"}``.
:func:`check_manifest` returns a :class:`~streamconv.verify.VerifyReport` (mode ``"manifest"``)
with problems of kinds ``missing``, ``extra``, ``size``, ``hash``, ``io``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .errors import InvalidInputError, OutputError, UsageError
from .progress import Progress
from .state import STATE_DIR
from .verify import MANIFEST_NAME, Problem, VerifyReport
from .writer import publish_bytes

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
CHUNK = 8 * 1024 * 1024

__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "ManifestEntry",
    "check_manifest",
    "hash_file",
    "list_files",
    "read_manifest",
    "write_manifest",
]


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Manifest:
    plan_fingerprint: str
    files: tuple[ManifestEntry, ...]

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "algorithm": "sha256",
            "plan_fingerprint": self.plan_fingerprint,
            "total_size": self.total_size,
            "files": [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in self.files],
        }


def list_files(output_dir: str | Path) -> list[str]:
    """Every file a manifest covers, relative to ``output_dir``, sorted."""
    root = Path(output_dir)
    found: list[str] = []
    for directory, dirs, files in os.walk(root, followlinks=True):
        rel = Path(directory).relative_to(root)
        top = rel == Path(".")
        if top:
            dirs[:] = [d for d in dirs if d != STATE_DIR]
        dirs.sort()
        found += [(rel / f).as_posix() for f in files if not (top and f == MANIFEST_NAME)]
    return sorted(found)


def hash_file(
    path: str | Path, *, advance: Callable[[int], None] | None = None, chunk: int = CHUNK
) -> tuple[int, str]:
    """``(size, sha256 hex)`` of the file at ``path``, read in ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    size = 0
    with open(path, "rb", buffering=0) as handle:
        while True:
            n = handle.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
            size += n
            if advance is not None:
                advance(n)
    return size, digest.hexdigest()


def _hash_all(
    root: Path, names: list[str], workers: int, progress: Progress
) -> dict[str, tuple[int, str] | OSError]:
    def one(name: str) -> tuple[int, str] | OSError:
        try:
            return hash_file(root / name, advance=progress.advance)
        except OSError as error:
            return error

    order = sorted(names, key=lambda n: -_size(root / n))
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="manifest") as pool:
        return dict(zip(order, pool.map(one, order), strict=True))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def write_manifest(
    output_dir: str | Path,
    plan_fingerprint: str,
    *,
    workers: int = 2,
    sync: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Hash every output file and write the manifest atomically; returns its path."""
    root = Path(output_dir)
    if not root.is_dir():
        raise UsageError("output is not a directory", path=root)
    progress = progress or Progress()
    names = list_files(root)
    progress.start(sum(_size(root / n) for n in names))
    try:
        hashed = _hash_all(root, names, workers, progress)
    finally:
        progress.finish()
    entries = []
    for name in names:
        value = hashed[name]
        if isinstance(value, OSError):
            raise OutputError(f"cannot read: {value.strerror}", path=root / name) from value
        entries.append(ManifestEntry(name, *value))
    manifest = Manifest(plan_fingerprint, tuple(entries))
    data = orjson.dumps(manifest.to_dict(), option=orjson.OPT_INDENT_2) + b"\n"
    final = root / MANIFEST_NAME
    publish_bytes(root, MANIFEST_NAME, data, sync=sync)
    log.info(
        "manifest: %d files, %d bytes, written to %s", len(entries), manifest.total_size, final
    )
    return final


def read_manifest(output_dir: str | Path) -> Manifest:
    """Load and validate the manifest of ``output_dir`` (InvalidInputError if unusable)."""
    path = Path(output_dir) / MANIFEST_NAME
    try:
        document = orjson.loads(path.read_bytes())
    except FileNotFoundError as error:
        raise InvalidInputError("no manifest in this directory", path=path) from error
    except OSError as error:
        raise InvalidInputError(f"cannot read: {error.strerror}", path=path) from error
    except orjson.JSONDecodeError as error:
        raise InvalidInputError(f"manifest is not valid JSON: {error}", path=path) from error
    try:
        if document["format"] != MANIFEST_FORMAT or document["algorithm"] != "sha256":
            raise ValueError("unknown format or algorithm")
        entries = []
        for item in document["files"]:
            entry = ManifestEntry(item["path"], item["size"], item["sha256"])
            if (
                type(entry.path) is not str
                or type(entry.size) is not int
                or type(entry.sha256) is not str
                or Path(entry.path).is_absolute()
                or ".." in Path(entry.path).parts
            ):
                raise ValueError(f"bad entry {item!r}")
            entries.append(entry)
        fingerprint = document["plan_fingerprint"]
        if type(fingerprint) is not str:
            raise ValueError("plan_fingerprint is not a string")
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidInputError(f"manifest is malformed: {error}", path=path) from error
    return Manifest(fingerprint, tuple(entries))


def check_manifest(
    output_dir: str | Path,
    *,
    workers: int = 2,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check ``output_dir`` against its manifest alone: missing, extra, size, hash.

    Raises :class:`InvalidInputError` when the manifest is missing or malformed."""
    started = time.monotonic()
    root = Path(output_dir)
    manifest = read_manifest(root)
    progress = progress or Progress()
    listed = {e.path: e for e in manifest.files}
    present = set(list_files(root))
    problems = [Problem("missing", name, "listed in the manifest, missing") for name in listed]
    problems = [p for p in problems if p.file not in present]
    problems += [
        Problem("extra", name, "not listed in the manifest") for name in present - set(listed)
    ]
    to_hash = []
    for name in sorted(present & set(listed)):
        size = _size(root / name)
        if size != listed[name].size:
            problems.append(
                Problem("size", name, f"{size} bytes, manifest says {listed[name].size}")
            )
        else:
            to_hash.append(name)
    progress.start(sum(listed[n].size for n in to_hash))
    try:
        hashed = _hash_all(root, to_hash, workers, progress)
    finally:
        progress.finish()
    compared = 0
    for name in to_hash:
        value = hashed[name]
        if isinstance(value, OSError):
            problems.append(Problem("io", name, f"cannot read: {value.strerror}"))
            continue
        compared += value[0]
        if value[1] != listed[name].sha256:
            reason = f"sha256 {value[1]}, manifest says {listed[name].sha256}"
            problems.append(Problem("hash", name, reason))
    return VerifyReport(
        mode="manifest",
        input=None,
        output=str(root),
        problems=tuple(sorted(problems, key=lambda p: (p.file, p.kind))),
        files_checked=len(to_hash),
        tensors_checked=0,
        bytes_compared=compared,
        seconds=time.monotonic() - started,
    )
