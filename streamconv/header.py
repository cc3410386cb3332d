"""safetensors headers: strict parsing into frozen records, and byte-exact encoding.

A safetensors file is ``u64 LE header length N``, ``N`` bytes of UTF-8 JSON, then a data
buffer in which every tensor is a contiguous byte range. Reading a header costs O(header):
8 bytes, then N bytes, plus one ``fstat`` for the file size.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from . import dtypes
from .errors import HeaderError
from .strictjson import load_object

#: The safetensors library refuses headers above this size.
MAX_HEADER_SIZE = 100_000_000
METADATA_KEY = "__metadata__"
_FIELDS = frozenset(("dtype", "shape", "data_offsets"))


@dataclass(frozen=True, slots=True)
class TensorRecord:
    """One tensor of one file, with its absolute byte span in that file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str  # the shard's file name (no directory)
    offset: int  # absolute: 8 + N + data_offsets[0]
    length: int  # data_offsets[1] - data_offsets[0]


@dataclass(frozen=True, slots=True)
class FileHeader:
    """The parsed header of one safetensors file."""

    file: str
    file_size: int
    header_size: int  # N, the JSON length
    metadata: tuple[tuple[str, str], ...] | None
    tensors: tuple[TensorRecord, ...]  # in data-offset order

    @property
    def data_start(self) -> int:
        return 8 + self.header_size

    def metadata_dict(self) -> dict[str, str] | None:
        return None if self.metadata is None else dict(self.metadata)


def read_header(path: str | Path, name: str | None = None) -> FileHeader:
    """Read and validate the header of the safetensors file at ``path``.

    ``name`` is the file name recorded in the records (defaults to the path's name); symbolic
    links are followed.
    """
    path = Path(path)
    label = name if name is not None else path.name
    try:
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            header_size = _check_prefix(prefix, file_size, path)
            raw = handle.read(header_size)
    except OSError as error:
        raise HeaderError(f"cannot read: {error.strerror or error}", path=path) from error
    if len(raw) != header_size:
        raise HeaderError("file shrank while its header was read", path=path)
    return parse_header(raw, file_size=file_size, file=label, path=path)


def parse_file_bytes(data: bytes, file: str = "<memory>") -> FileHeader:
    """Parse a whole safetensors file held in memory (used by tests and tools)."""
    header_size = _check_prefix(data[:8], len(data), file)
    return parse_header(data[8 : 8 + header_size], file_size=len(data), file=file, path=file)


def _check_prefix(prefix: bytes, file_size: int, path: str | Path) -> int:
    if file_size < 8 or len(prefix) < 8:
        raise HeaderError(
            f"file is {file_size} bytes, too short for a safetensors header (at least 8)",
            path=path,
        )
    (header_size,) = struct.unpack("<Q", prefix[:8])
    if header_size == 0:
        raise HeaderError("header length is 0", path=path)
    if header_size > MAX_HEADER_SIZE:
        raise HeaderError(
            f"header length {header_size} exceeds the {MAX_HEADER_SIZE}-byte limit", path=path
        )
    if 8 + header_size > file_size:
        raise HeaderError(
            f"header length {header_size} runs past the end of the file ({file_size} bytes)",
            path=path,
        )
    return int(header_size)


def parse_header(
    raw: bytes, *, file_size: int, file: str, path: str | Path | None = None
) -> FileHeader:
    """Validate the JSON header ``raw`` of a file of ``file_size`` bytes."""
    where = path if path is not None else file
    document = load_object(raw, where, HeaderError, what="header")
    metadata: tuple[tuple[str, str], ...] | None = None
    data_start = 8 + len(raw)
    entries: list[tuple[int, int, TensorRecord]] = []
    for name, entry in document.items():
        if name == METADATA_KEY:
            metadata = _check_metadata(entry, where)
            continue
        begin, end, record = _check_entry(name, entry, file, data_start, where)
        entries.append((begin, end, record))
    entries.sort(key=lambda item: (item[0], item[1]))
    position = 0
    for begin, end, record in entries:
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise HeaderError(
                f"data_offsets [{begin}, {end}] {problem} (expected start {position})",
                path=where,
                tensor=record.name,
            )
        position = end
    if data_start + position != file_size:
        state = "is truncated" if data_start + position > file_size else "has trailing bytes"
        raise HeaderError(
            f"file {state}: tensors end at byte {data_start + position}, file is {file_size} bytes",
            path=where,
        )
    return FileHeader(
        file=file,
        file_size=file_size,
        header_size=len(raw),
        metadata=metadata,
        tensors=tuple(record for _, _, record in entries),
    )


def _check_metadata(entry: object, where: str | Path) -> tuple[tuple[str, str], ...] | None:
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise HeaderError(f"{METADATA_KEY} must be an object of strings", path=where)
    for key, value in entry.items():
        if not isinstance(value, str):
            raise HeaderError(
                f"{METADATA_KEY} value for {key!r} must be a string, found {type(value).__name__}",
                path=where,
            )
    return tuple(entry.items())


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value <= dtypes.MAX_U64


def _check_entry(
    name: str, entry: object, file: str, data_start: int, where: str | Path
) -> tuple[int, int, TensorRecord]:
    def fail(reason: str) -> HeaderError:
        return HeaderError(reason, path=where, tensor=name)

    if not isinstance(entry, dict):
        raise fail(f"entry must be an object, found {type(entry).__name__}")
    keys = set(entry)
    if keys != _FIELDS:
        missing = sorted(_FIELDS - keys)
        extra = sorted(keys - _FIELDS)
        detail = ", ".join(
            [f"missing {', '.join(missing)}"] * bool(missing)
            + [f"unexpected {', '.join(extra)}"] * bool(extra)
        )
        raise fail(f"entry fields wrong: {detail}")
    dtype = entry["dtype"]
    if not dtypes.is_dtype(dtype):
        raise fail(f"unknown dtype {dtype!r}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_u64(dim) for dim in shape):
        raise fail(f"shape must be a list of non-negative integers, found {shape!r}")
    offsets = entry["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_u64, offsets)):
        raise fail(f"data_offsets must be two non-negative integers, found {offsets!r}")
    begin, end = offsets
    if begin > end:
        raise fail(f"data_offsets [{begin}, {end}] begin after end")
    try:
        expected = dtypes.nbytes(dtype, shape)
    except ValueError as error:
        raise fail(str(error)) from error
    if end - begin != expected:
        raise fail(
            f"data_offsets [{begin}, {end}] hold {end - begin} bytes, "
            f"but {dtype} {shape} needs {expected}"
        )
    record = TensorRecord(
        name=name,
        dtype=dtype,
        shape=tuple(shape),
        file=file,
        offset=data_start + begin,
        length=expected,
    )
    return begin, end, record


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What an encoder needs to know of a tensor: its name, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


def serializer_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """The order safetensors' serializer lays tensors out: dtype rank descending, then name."""
    return sorted(specs, key=lambda spec: (-dtypes.RANK[spec.dtype], spec.name))


def encode_header(
    specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[tuple[TensorSpec, int, int]]]:
    """Encode a header exactly as safetensors' serializer would.

    Returns the full prefix (8-byte length + padded JSON) and the tensors in data order, each
    with its ``(begin, end)`` data offsets. Tensors are laid out in :func:`serializer_order`.
    """
    document: dict[str, Any] = {}
    if metadata is not None:
        document[METADATA_KEY] = dict(metadata)
    layout: list[tuple[TensorSpec, int, int]] = []
    position = 0
    for spec in serializer_order(specs):
        size = dtypes.nbytes(spec.dtype, spec.shape)
        document[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [position, position + size],
        }
        layout.append((spec, position, position + size))
        position += size
    if len(document) != len(layout) + (metadata is not None):
        raise ValueError("duplicate tensor names")
    body = orjson.dumps(document)
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body, layout
