"""A checkpoint directory: its shards' headers, its index, and its other files, validated.

Three layouts are understood: ``model.safetensors.index.json`` with the shards it names; a
single ``model.safetensors``; several ``*.safetensors`` files with no index. The headers are the
truth: with an index, every key must be in the shard it names and every tensor of every shard
must be in the index. Shards may be symbolic links; they are followed for reading.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, HeaderError, raise_problems
from .header import FileHeader, TensorRecord, read_header
from .strictjson import load_object

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SUFFIX = ".safetensors"
MAX_INDEX_SIZE = 512 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SourceFile:
    """Identity of an input shard when it was read (for change detection and resume)."""

    name: str
    size: int
    mtime_ns: int
    inode: int
    device: int


@dataclass(frozen=True, slots=True)
class Checkpoint:
    root: Path
    layout: str  # "index" | "single" | "shards"
    shards: tuple[FileHeader, ...]  # sorted by file name
    sources: tuple[SourceFile, ...]  # same order as shards
    index_metadata: tuple[tuple[str, Any], ...] | None  # the index's "metadata", if any
    others: tuple[str, ...]  # other top-level entries (files and folders), sorted

    def tensors(self) -> list[TensorRecord]:
        return [record for shard in self.shards for record in shard.tensors]

    @property
    def total_bytes(self) -> int:
        return sum(record.length for shard in self.shards for record in shard.tensors)


def encode_index(
    weight_map: dict[str, str], total_size: int, metadata: dict[str, Any] | None = None
) -> bytes:
    """An index file's bytes, exactly as transformers' ``save_pretrained`` writes them."""
    document = {
        "metadata": {**(metadata or {}), "total_size": total_size},
        "weight_map": weight_map,
    }
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


def check_shard_name(name: object) -> str | None:
    """Why ``name`` is not acceptable as a shard file name, or None when it is."""
    if not isinstance(name, str) or not name:
        return f"shard name {name!r} is not a file name"
    if os.path.isabs(name) or "/" in name or "\\" in name or os.sep in name:
        return f"shard name {name!r} must be a plain file name inside the directory"
    if ".." in name or "\x00" in name:
        return f"shard name {name!r} contains '..' or a NUL byte"
    if not name.endswith(SUFFIX):
        return f"shard name {name!r} does not end in {SUFFIX}"
    return None


def _is_inside(path: Path, directory: Path) -> bool:
    try:
        path.relative_to(directory)
    except ValueError:
        return False
    return True


def _check_link(root: Path, name: str, allow_external: bool) -> str | None:
    """A symbolic link must lead to a regular file inside the checkpoint, or be allowed."""
    path = root / name
    if not path.is_symlink():
        return None
    target = path.resolve()
    real_root = root.resolve()
    if _is_inside(target, real_root) or allow_external:
        return None
    # The Hugging Face cache links snapshots/<revision>/<file> to ../../blobs/<hash>.
    if _is_inside(target, real_root.parent.parent / "blobs"):
        return None
    return (
        f"{name}: symbolic link points outside the checkpoint directory to {target} "
        "(pass --allow-external-links to follow it)"
    )


def _stat_source(root: Path, name: str) -> SourceFile | str:
    """The shard's identity, or why it cannot be read as a shard."""
    path = root / name
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return f"{name}: {'dangling symbolic link' if path.is_symlink() else 'missing'}"
    except OSError as error:
        return f"{name}: cannot stat: {error.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return f"{name}: not a regular file"
    return SourceFile(name, info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)


def _read_index(path: Path) -> tuple[dict[str, str], tuple[tuple[str, Any], ...] | None]:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError("index is not a regular file", path=path)
        size = info.st_size
        if size > MAX_INDEX_SIZE:
            raise CheckpointError(f"index is {size} bytes, larger than any real index", path=path)
        raw = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read index: {error.strerror}", path=path) from error
    document = load_object(raw, path, CheckpointError, what="index", tensor_maps=("weight_map",))
    weight_map = document.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError('index has no "weight_map" object', path=path)
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(
                f"weight_map value must be a file name, found {shard!r}", path=path, tensor=key
            )
    if not weight_map:
        raise CheckpointError('index "weight_map" lists no tensors', path=path)
    metadata = document.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise CheckpointError('index "metadata" must be an object', path=path)
    return weight_map, None if metadata is None else tuple(metadata.items())


def _list_entries(root: Path) -> list[str]:
    try:
        return sorted(os.listdir(root))
    except OSError as error:
        raise CheckpointError(f"cannot list directory: {error.strerror}", path=root) from error


def load_checkpoint(root: str | Path, *, allow_external_links: bool = False) -> Checkpoint:
    """Read and cross-check every header and the index of the checkpoint in ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError("not a directory", path=root)
    entries = _list_entries(root)
    index_path = root / INDEX_NAME
    weight_map: dict[str, str] | None = None
    index_metadata = None
    problems: list[str] = []
    if INDEX_NAME in entries:
        layout = "index"
        weight_map, index_metadata = _read_index(index_path)
        names = sorted(set(weight_map.values()))
        for name in names:
            reason = check_shard_name(name)
            if reason:
                problems.append(f"{INDEX_NAME}: {reason}")
        raise_problems(CheckpointError, problems, path=index_path)
        for name in names:
            if name not in entries:
                problems.append(f"{name}: listed in {INDEX_NAME} but missing")
        raise_problems(CheckpointError, problems, path=root)
        unlisted = [e for e in entries if e.endswith(SUFFIX) and e not in names]
        for name in unlisted:
            log.warning("%s is not listed in %s; it is copied unchanged", name, INDEX_NAME)
    elif SINGLE_NAME in entries:
        layout = "single"
        names = [SINGLE_NAME]
        for name in entries:
            if name.endswith(SUFFIX) and name != SINGLE_NAME:
                log.warning(
                    "%s is beside %s with no index; it is copied unchanged", name, SINGLE_NAME
                )
    else:
        layout = "shards"
        names = [e for e in entries if e.endswith(SUFFIX) and not e.startswith(".")]
        if not names:
            raise CheckpointError(
                f"no {INDEX_NAME}, {SINGLE_NAME} or other *{SUFFIX} file found", path=root
            )
        for name in names:
            reason = check_shard_name(name)
            if reason:
                problems.append(reason)
        raise_problems(CheckpointError, problems, path=root)

    for name in names:
        reason = _check_link(root, name, allow_external_links)
        if reason:
            problems.append(reason)
    raise_problems(CheckpointError, problems, path=root)

    stats = [_stat_source(root, name) for name in names]
    raise_problems(CheckpointError, [s for s in stats if isinstance(s, str)], path=root)
    sources = tuple(s for s in stats if isinstance(s, SourceFile))
    headers: list[FileHeader] = []
    bad: list[HeaderError] = []
    for name in names:
        try:
            headers.append(read_header(root / name, name))
        except HeaderError as error:
            bad.append(error)
    if len(bad) == 1:
        raise bad[0]
    raise_problems(CheckpointError, [str(error) for error in bad], path=root)
    shards = tuple(headers)
    for source, shard in zip(sources, shards, strict=True):
        if source.size != shard.file_size:
            raise CheckpointError("file changed while its header was read", path=root / source.name)

    where: dict[str, str] = {}
    for shard in shards:
        for record in shard.tensors:
            first = where.setdefault(record.name, shard.file)
            if first != shard.file:
                problems.append(f"tensor {record.name!r} is in both {first} and {shard.file}")
    if weight_map is not None:
        for key, name in weight_map.items():
            actual = where.get(key)
            if actual is None:
                problems.append(f"{INDEX_NAME}: {key!r} is listed in {name} but no shard has it")
            elif actual != name:
                problems.append(f"{INDEX_NAME}: {key!r} is listed in {name} but is in {actual}")
        for key, name in where.items():
            if key not in weight_map:
                problems.append(f"{name}: tensor {key!r} is missing from {INDEX_NAME}")
    raise_problems(CheckpointError, problems, path=root)

    taken = set(names) | ({INDEX_NAME} if layout == "index" else set())
    others = tuple(e for e in entries if e not in taken)
    for name in others:
        try:
            mode = os.stat(root / name).st_mode
        except OSError as error:
            problems.append(f"{name}: cannot stat: {error.strerror}")
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            problems.append(f"{name}: not a regular file or folder, cannot be copied")
    raise_problems(CheckpointError, problems, path=root)
    return Checkpoint(
        root=root,
        layout=layout,
        shards=shards,
        sources=sources,
        index_metadata=index_metadata,
        others=others,
    )
