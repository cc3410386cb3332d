"""Tests of streamconv.header: golden encoding, round trips, and hostile headers.

Expected values come from the safetensors library (the oracle) or from the format itself
(``u64 LE N`` + JSON + data), never from the code under test.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from reference import FORMAT_BITS, TORCH_TO_FORMAT

from streamconv.errors import EXIT_INVALID_INPUT, HeaderError, InvalidInputError
from streamconv.header import FileHeader, TensorSpec, encode_header, parse_file_bytes, read_header

# --------------------------------------------------------------------------------------------
# The format, from first principles (safetensors' Dtype enum and its bit sizes).


#: numpy dtype name -> format dtype, for files written by safetensors.numpy.
NUMPY_TO_FORMAT: dict[str, str] = {
    "bool": "BOOL",
    "int8": "I8",
    "uint8": "U8",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "int64": "I64",
    "uint64": "U64",
    "float64": "F64",
    "complex64": "C64",
}

#: The oracle, typed: [(name, {"dtype": str, "shape": list[int], "data": bytes}), ...].
library_deserialize: Callable[[bytes], list[tuple[str, dict[str, Any]]]] = safetensors.deserialize

#: One storage element of float4_e2m1fn_x2 holds two F4 values.
PACKED_X2 = "float4_e2m1fn_x2"

TensorDef = tuple[str, str, list[int]]  # (name, torch dtype, storage shape)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _storage_nbytes(torch_dtype: str, shape: Sequence[int]) -> int:
    if torch_dtype == PACKED_X2:
        return _numel(shape)  # one byte per storage element
    return _numel(shape) * FORMAT_BITS[TORCH_TO_FORMAT[torch_dtype]] // 8


def _logical_shape(torch_dtype: str, shape: Sequence[int]) -> tuple[int, ...]:
    if torch_dtype == PACKED_X2:
        return (*shape[:-1], shape[-1] * 2)
    return tuple(shape)


def serialize_with_library(
    tensors: Sequence[TensorDef], metadata: Mapping[str, str] | None
) -> tuple[bytes, dict[str, bytes], list[TensorSpec]]:
    """Serialize with safetensors; return the file, each tensor's source bytes, our specs."""
    sizes = [_storage_nbytes(dtype, shape) for _, dtype, shape in tensors]
    total = sum(sizes)
    buffer = (np.arange(max(total, 1), dtype=np.uint64) % 251).astype(np.uint8)
    base = buffer.ctypes.data
    library_specs: dict[str, safetensors.TensorSpec] = {}
    sources: dict[str, bytes] = {}
    ours: list[TensorSpec] = []
    position = 0
    for (name, dtype, shape), size in zip(tensors, sizes, strict=True):
        spec = safetensors.TensorSpec(
            dtype=dtype, shape=list(shape), data_ptr=base + position, data_len=size
        )
        assert spec.dtype == TORCH_TO_FORMAT[dtype]
        assert tuple(spec.shape) == _logical_shape(dtype, shape)
        library_specs[name] = spec
        sources[name] = buffer[position : position + size].tobytes()
        ours.append(TensorSpec(name, TORCH_TO_FORMAT[dtype], _logical_shape(dtype, shape)))
        position += size
    out = safetensors.serialize(
        library_specs, metadata=None if metadata is None else dict(metadata)
    )
    del buffer  # kept alive until here on purpose: the specs point into it
    return bytes(out), sources, ours


def _library_header(out: bytes) -> tuple[int, list[tuple[str, Any]]]:
    (n,) = struct.unpack("<Q", out[:8])
    document: dict[str, Any] = json.loads(out[8 : 8 + n])
    return n, list(document.items())


ALL_DTYPES: list[TensorDef] = [
    (f"t.{dtype}", dtype, [2, 3] if index % 2 else [5])
    for index, dtype in enumerate(TORCH_TO_FORMAT)
]

GOLDEN_SETS: dict[str, tuple[list[TensorDef], dict[str, str] | None]] = {
    "every-dtype": (ALL_DTYPES, None),
    "every-dtype-format-pt": (ALL_DTYPES, {"format": "pt"}),
    "every-dtype-reversed": (list(reversed(ALL_DTYPES)), {"format": "pt"}),
    "names-unicode-control-quotes": (
        [
            ("é.poids", "float32", [2]),
            ("😀", "float32", [1]),
            ("日本語.weight", "bfloat16", [3]),
            ("ctrl\x00\x01\x08\t\n\x0b\x0c\r\x1f\x7f", "float32", [1]),
            ('quote"inside', "float32", [1]),
            ("back\\slash/and/slash", "int8", [4]),
            ("\u2028\u2029\ufeff", "uint8", [1]),
            ("", "float32", [2]),
            ("Z", "float32", [1]),
            ("a", "float32", [1]),
            ("a.10", "float32", [1]),
            ("a.9", "float32", [1]),
        ],
        None,
    ),
    "scalar-and-zero-size": (
        [
            ("scalar", "float64", []),
            ("zero", "float32", [0, 3]),
            ("zero.last", "float32", [3, 0]),
            ("zero.1d", "uint8", [0]),
            ("zero.f4", PACKED_X2, [0, 3]),
            ("bool.scalar", "bool", []),
        ],
        {"format": "pt"},
    ),
    "f4-and-f8": (
        [
            ("fp4", PACKED_X2, [2, 3]),
            ("fp4.scale", "float8_e8m0fnu", [2, 1]),
            ("fp8", "float8_e4m3fn", [4, 4]),
            ("fp8.scale", "float32", []),
        ],
        None,
    ),
    "unicode-metadata": ([("w", "float16", [2, 2])], {'clé "x"\n': "valeur\\\u00e9😀"}),
    "empty": ([], None),
    "empty-format-pt": ([], {"format": "pt"}),
    # (no empty-tensor-set case with metadata {}: safetensors 0.8.0 writes invalid JSON for it)
    "empty-metadata-map": ([("w", "int32", [1])], {}),
    "many-tensors": (
        [(f"model.layers.{i}.mlp.weight", "bfloat16", [i % 3 + 1, 2]) for i in range(60)],
        {"format": "pt"},
    ),
}
# every padding residue: names of length 0..7 change the JSON length one byte at a time
for _length in range(8):
    GOLDEN_SETS[f"padding-{_length}"] = ([("x" * _length, "float32", [1])], None)


@pytest.mark.parametrize("key", sorted(GOLDEN_SETS))
def test_encode_header_matches_library_byte_for_byte(key: str) -> None:
    tensors, metadata = GOLDEN_SETS[key]
    out, sources, ours = serialize_with_library(tensors, metadata)
    prefix, layout = encode_header(ours, metadata)

    assert prefix == out[: len(prefix)]
    (n,) = struct.unpack("<Q", prefix[:8])
    assert len(prefix) == 8 + n
    assert n % 8 == 0
    assert len(out) == len(prefix) + sum(len(data) for data in sources.values())

    # the layout is the library's: same order, same offsets, and each tensor's bytes land there
    _, pairs = _library_header(out)
    library_tensors = [(name, entry) for name, entry in pairs if name != "__metadata__"]
    assert [spec.name for spec, _, _ in layout] == [name for name, _ in library_tensors]
    for (spec, begin, end), (_, entry) in zip(layout, library_tensors, strict=True):
        assert [begin, end] == entry["data_offsets"]
        assert spec.dtype == entry["dtype"]
        assert list(spec.shape) == entry["shape"]
        assert out[len(prefix) + begin : len(prefix) + end] == sources[spec.name]


def test_encode_header_literal() -> None:
    body = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    assert len(body) == 54
    expected = (56).to_bytes(8, "little") + body + b"  "
    prefix, layout = encode_header([TensorSpec("a", "F32", (2,))])
    assert prefix == expected
    assert layout == [(TensorSpec("a", "F32", (2,)), 0, 8)]


def test_encode_header_metadata_first_and_empty() -> None:
    prefix, layout = encode_header([], {"format": "pt"})
    body = b'{"__metadata__":{"format":"pt"}}'
    assert prefix == struct.pack("<Q", 32) + body
    assert layout == []
    prefix, _ = encode_header([])
    assert prefix == struct.pack("<Q", 8) + b"{}      "
    # safetensors.serialize({}, metadata={}) emits b'{},"__metadata__":{}}   ' (invalid JSON),
    # so this case is checked against the format rather than against the library
    prefix, _ = encode_header([], {})
    assert prefix == struct.pack("<Q", 24) + b'{"__metadata__":{}}     '
    assert parse_file_bytes(prefix).metadata_dict() == {}


def test_encode_header_rejects_duplicate_names() -> None:
    specs = [TensorSpec("a", "F32", (1,)), TensorSpec("a", "F16", (1,))]
    with pytest.raises(ValueError, match="duplicate"):
        encode_header(specs)


def test_encode_header_sub_byte_dtypes_the_serializer_cannot_write() -> None:
    # safetensors.TensorSpec refuses F6_*; check the layout against the Dtype enum order
    # (BOOL < F4 < F6_E2M3 < F6_E3M2 < U8, laid out descending) and the file against the reader
    specs = [
        TensorSpec("b", "BOOL", (2,)),
        TensorSpec("f6a", "F6_E2M3", (4,)),
        TensorSpec("u", "U8", (1,)),
        TensorSpec("f4", "F4", (2, 2)),
        TensorSpec("f6b", "F6_E3M2", (2, 4)),
    ]
    prefix, layout = encode_header(specs)
    assert [(spec.name, begin, end) for spec, begin, end in layout] == [
        ("u", 0, 1),
        ("f6b", 1, 7),
        ("f6a", 7, 10),
        ("f4", 10, 12),
        ("b", 12, 14),
    ]
    data = prefix + bytes(range(14))
    library = dict(library_deserialize(data))
    assert {name: (info["dtype"], info["shape"]) for name, info in library.items()} == {
        "b": ("BOOL", [2]),
        "f6a": ("F6_E2M3", [4]),
        "u": ("U8", [1]),
        "f4": ("F4", [2, 2]),
        "f6b": ("F6_E3M2", [2, 4]),
    }
    assert bytes(library["f6a"]["data"]) == bytes(range(7, 10))


def test_encode_header_output_parses_back() -> None:
    tensors, metadata = GOLDEN_SETS["every-dtype-format-pt"]
    out, sources, ours = serialize_with_library(tensors, metadata)
    header = parse_file_bytes(out, "golden.safetensors")
    assert header.metadata_dict() == {"format": "pt"}
    assert {r.name: (r.dtype, r.shape) for r in header.tensors} == {
        s.name: (s.dtype, s.shape) for s in ours
    }
    for record in header.tensors:
        assert out[record.offset : record.offset + record.length] == sources[record.name]


# --------------------------------------------------------------------------------------------
# Round trip with files written by safetensors.numpy.


def _numpy_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    return {
        "bool": rng.integers(0, 2, size=(3, 5)).astype(np.bool_),
        "int8": rng.integers(-128, 128, size=(7,)).astype(np.int8),
        "uint8": rng.integers(0, 256, size=(2, 2, 2)).astype(np.uint8),
        "int16": rng.integers(-1000, 1000, size=(3,)).astype(np.int16),
        "float16": rng.standard_normal((4, 3)).astype(np.float16),
        "float32": rng.standard_normal((5, 2)).astype(np.float32),
        "float64": rng.standard_normal((2,)).astype(np.float64),
        "int64": rng.integers(-(2**62), 2**62, size=(3, 1)).astype(np.int64),
        "uint32": rng.integers(0, 2**32, size=(4,)).astype(np.uint32),
        "complex64": (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64),
        "scalar.f32": np.array(3.5, dtype=np.float32),
        "scalar.i64": np.array(-7, dtype=np.int64),
        "zero.f32": np.zeros((0, 3), dtype=np.float32),
        "zero.u8": np.zeros((4, 0), dtype=np.uint8),
    }


@pytest.mark.parametrize("metadata", [None, {"format": "np"}])
def test_round_trip_with_safetensors_numpy(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    path = tmp_path / "model-00001-of-00001.safetensors"
    safetensors.numpy.save_file(_numpy_tensors(), path, metadata=metadata)
    loaded = safetensors.numpy.load_file(path)
    data = path.read_bytes()

    header = read_header(path)
    assert header.file == path.name
    assert header.file_size == len(data)
    assert header.header_size == struct.unpack("<Q", data[:8])[0]
    assert header.data_start == 8 + header.header_size
    assert header.metadata_dict() == metadata

    assert sorted(record.name for record in header.tensors) == sorted(loaded)
    for record in header.tensors:
        array = loaded[record.name]
        assert record.file == path.name
        assert record.dtype == NUMPY_TO_FORMAT[array.dtype.name]
        assert record.shape == array.shape
        assert record.length == array.nbytes
        assert data[record.offset : record.offset + record.length] == array.tobytes()
    # records are in data order and tile the data section exactly
    position = header.data_start
    for record in header.tensors:
        assert record.offset == position
        position += record.length
    assert position == len(data)


def test_read_header_name_overrides_file_label(tmp_path: Path) -> None:
    path = tmp_path / "actual.safetensors"
    safetensors.numpy.save_file({"w": np.zeros(2, dtype=np.float32)}, path)
    header = read_header(path, name="shown.safetensors")
    assert header.file == "shown.safetensors"
    assert [record.file for record in header.tensors] == ["shown.safetensors"]
    assert header == parse_file_bytes(path.read_bytes(), "shown.safetensors")


def test_read_header_follows_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "target.safetensors"
    safetensors.numpy.save_file({"w": np.ones(3, dtype=np.int16)}, target)
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    header = read_header(link)
    assert header.file == "link.safetensors"
    assert header.file_size == target.stat().st_size


# --------------------------------------------------------------------------------------------
# Malformed headers. Each row: file bytes, a distinctive part of our message, and whether the
# safetensors library also rejects the file (False marks where we are deliberately stricter).


def raw(header: bytes | str, data: bytes = b"", n: int | None = None) -> bytes:
    body = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(body) if n is None else n) + body + data


def doc(document: object, data: bytes = b"") -> bytes:
    return raw(json.dumps(document, ensure_ascii=False, separators=(",", ":")), data)


def entry(
    dtype: object = "U8", shape: object = (1,), offsets: object = (0, 1)
) -> dict[str, object]:
    def plain(value: object) -> object:
        return list(value) if isinstance(value, tuple) else value

    return {"dtype": dtype, "shape": plain(shape), "data_offsets": plain(offsets)}


def one(
    dtype: object = "U8", shape: object = (1,), offsets: object = (0, 1), data: bytes = b"x"
) -> bytes:
    return doc({"t": entry(dtype, shape, offsets)}, data)


E = '"dtype":"U8","shape":[1],"data_offsets":[0,1]'  # a valid one-byte entry, for raw JSON
SHAPE_MSG = "tensor 't': shape must be a list of non-negative integers"
OFFSETS_MSG = "tensor 't': data_offsets must be two non-negative integers"
BYTES_MSG = "does not fill whole bytes"

MALFORMED = [
    pytest.param(b"", "file is 0 bytes, too short", True, id="empty-file"),
    pytest.param(b"\x02\0\0\0\0\0\0", "file is 7 bytes, too short", True, id="7-bytes"),
    pytest.param(raw(b"{}", n=0), "header length is 0", True, id="n-zero"),
    pytest.param(raw(b"", n=0), "header length is 0", True, id="n-zero-no-json"),
    pytest.param(
        raw(b"{}", n=100_000_001),
        "header length 100000001 exceeds the 100000000-byte limit",
        True,
        id="n-over-limit",
    ),
    pytest.param(raw(b"{}", n=2**64 - 1), "exceeds the 100000000-byte limit", True, id="n-u64max"),
    pytest.param(
        raw(b"{}", n=100_000_000),
        "header length 100000000 runs past the end of the file (10 bytes)",
        True,
        id="n-at-limit-past-eof",
    ),
    pytest.param(
        raw(b"{}", n=3),
        "header length 3 runs past the end of the file (10 bytes)",
        True,
        id="n-past-eof",
    ),
    pytest.param(raw(b'{"\xff":1}'), "header is not valid UTF-8 (byte 2)", True, id="not-utf8"),
    pytest.param(raw(b'{"\xed\xa0\x80":1}'), "not valid UTF-8", True, id="utf8-surrogate"),
    pytest.param(raw(b'{"\xc0\xaf":1}'), "not valid UTF-8", True, id="utf8-overlong"),
    pytest.param(raw(b"{"), "header is not valid JSON", True, id="json-unclosed"),
    pytest.param(raw(b"{}x"), "header is not valid JSON", True, id="json-trailing-garbage"),
    pytest.param(raw(b"{}\0\0\0\0\0\0"), "header is not valid JSON", True, id="json-nul-padding"),
    pytest.param(raw(b"\xef\xbb\xbf{}"), "header is not valid JSON", True, id="json-bom"),
    pytest.param(raw(b"{,}"), "header is not valid JSON", True, id="json-comma"),
    pytest.param(
        raw('{"__metadata__":{"a":NaN}}'), "header is not valid JSON", True, id="json-nan"
    ),
    pytest.param(
        raw('{"\\ud800":{' + E + "}}", b"x"),
        "header is not valid JSON",
        True,
        id="json-lone-surrogate",
    ),
    pytest.param(
        raw('{"a\x01":{' + E + "}}", b"x"),
        "header is not valid JSON",
        True,
        id="json-raw-control-char",
    ),
    pytest.param(
        raw('{"t":{' + E + ',"x":' + "[" * 2000 + "]" * 2000 + "}}", b"x"),
        "header is not valid JSON",
        True,
        id="json-too-deep",
    ),
    pytest.param(raw(b"[]"), "header must be a JSON object, found list", True, id="json-array"),
    pytest.param(raw(b"12"), "header must be a JSON object, found int", True, id="json-number"),
    pytest.param(raw(b'"{}"'), "header must be a JSON object, found str", True, id="json-string"),
    pytest.param(raw(b"null"), "header must be a JSON object", True, id="json-null"),
    pytest.param(
        raw('{"t":{' + E + '},"t":{' + E + "}}", b"x"),
        "tensor 't': duplicate key in header",
        False,  # serde keeps one of them silently
        id="duplicate-tensor",
    ),
    pytest.param(
        raw('{"t":{' + E + '},"\\u0074":{' + E + "}}", b"x"),
        "tensor 't': duplicate key in header",
        False,
        id="duplicate-tensor-escaped",
    ),
    pytest.param(
        raw('{"t":{"dtype":"U8",' + E + "}}", b"x"),
        "tensor 't': duplicate key in header: 'dtype'",
        True,
        id="duplicate-field",
    ),
    pytest.param(
        raw('{"__metadata__":{},"__metadata__":{}}'),
        "bad.safetensors: duplicate key in header __metadata__",
        True,
        id="duplicate-metadata",
    ),
    pytest.param(
        raw('{"__metadata__":{"k":"a","k":"b"}}'),
        "bad.safetensors: duplicate key in header __metadata__: 'k'",
        False,
        id="duplicate-metadata-key",
    ),
    pytest.param(
        doc({"t": {"shape": [1], "data_offsets": [0, 1]}}, b"x"),
        "tensor 't': entry fields wrong: missing dtype",
        True,
        id="missing-dtype",
    ),
    pytest.param(
        doc({"t": {"dtype": "U8", "data_offsets": [0, 1]}}, b"x"),
        "tensor 't': entry fields wrong: missing shape",
        True,
        id="missing-shape",
    ),
    pytest.param(
        doc({"t": {"dtype": "U8", "shape": [1]}}, b"x"),
        "tensor 't': entry fields wrong: missing data_offsets",
        True,
        id="missing-data-offsets",
    ),
    pytest.param(
        doc({"t": {}}),
        "entry fields wrong: missing data_offsets, dtype, shape",
        True,
        id="empty-entry",
    ),
    pytest.param(
        doc({"t": {**entry(), "extra": 1}}, b"x"),
        "tensor 't': entry fields wrong: unexpected extra",
        False,  # serde ignores unknown fields
        id="extra-field",
    ),
    pytest.param(
        doc({"t": {"type": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"x"),
        "entry fields wrong: missing dtype, unexpected type",
        True,
        id="misspelt-field",
    ),
    pytest.param(one("F33"), "tensor 't': unknown dtype 'F33'", True, id="unknown-dtype"),
    pytest.param(one("u8"), "unknown dtype 'u8'", True, id="dtype-lowercase"),
    pytest.param(one("uint8"), "unknown dtype 'uint8'", True, id="dtype-torch-name"),
    pytest.param(one("U8 "), "unknown dtype 'U8 '", True, id="dtype-trailing-space"),
    pytest.param(one(8), "unknown dtype 8", True, id="dtype-int"),
    pytest.param(one(None), "unknown dtype None", True, id="dtype-null"),
    pytest.param(one(["U8"]), "unknown dtype ['U8']", True, id="dtype-list"),
    pytest.param(
        one({"U8": None}),
        "unknown dtype {'U8': None}",
        False,  # serde: enum in map form
        id="dtype-enum-map-form",
    ),
    pytest.param(one(shape=[-1]), SHAPE_MSG, True, id="shape-negative"),
    pytest.param(one(shape=[1.0]), SHAPE_MSG, True, id="shape-float"),
    pytest.param(one(shape=[True]), SHAPE_MSG, True, id="shape-bool"),
    pytest.param(one(shape=["1"]), SHAPE_MSG, True, id="shape-string-entry"),
    pytest.param(one(shape=[[1]]), SHAPE_MSG, True, id="shape-nested"),
    pytest.param(one(shape=[None]), SHAPE_MSG, True, id="shape-null-entry"),
    pytest.param(one(shape=1), SHAPE_MSG, True, id="shape-int"),
    pytest.param(one(shape="[1]"), SHAPE_MSG, True, id="shape-string"),
    pytest.param(one(shape=None), SHAPE_MSG, True, id="shape-null"),
    pytest.param(one(shape={"0": 1}), SHAPE_MSG, True, id="shape-object"),
    pytest.param(one(shape=[2**64], offsets=[0, 0], data=b""), SHAPE_MSG, True, id="shape-2**64"),
    pytest.param(
        one(shape=[2**40, 2**40, 2**40]), "tensor 't': size of shape", True, id="shape-overflow"
    ),
    pytest.param(
        one("F64", shape=[2**61], data=b""), "overflows 64 bits", True, id="shape-bytes-overflow"
    ),
    pytest.param(  # safetensors multiplies left to right: 2**80 overflows before the 0
        one(shape=[2**40, 2**40, 2**40, 0], offsets=[0, 0], data=b""),
        "tensor 't': size of shape [1099511627776, 1099511627776, 1099511627776, 0] overflows",
        True,
        id="shape-overflow-before-zero-dim",
    ),
    pytest.param(  # orjson reads -0 as the int 0; serde reads the float -0.0
        raw('{"t":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}'),
        "holds the number -0",
        True,
        id="shape-negative-zero",
    ),
    pytest.param(
        raw('{"t":{"dtype":"U8","shape":[1],"data_offsets":[-0,1]}}', b"x"),
        "holds the number -0",
        True,
        id="offsets-negative-zero",
    ),
    pytest.param(one(offsets="0,1"), OFFSETS_MSG, True, id="offsets-string"),
    pytest.param(one(offsets=None), OFFSETS_MSG, True, id="offsets-null"),
    pytest.param(one(offsets={"0": 0, "1": 1}), OFFSETS_MSG, True, id="offsets-object"),
    pytest.param(one(offsets=1), OFFSETS_MSG, True, id="offsets-int"),
    pytest.param(one(offsets=[1]), OFFSETS_MSG, True, id="offsets-one-int"),
    pytest.param(one(offsets=[]), OFFSETS_MSG, True, id="offsets-empty"),
    pytest.param(one(offsets=[0, 1, 1]), OFFSETS_MSG, True, id="offsets-three-ints"),
    pytest.param(one(offsets=[-1, 0]), OFFSETS_MSG, True, id="offsets-negative"),
    pytest.param(one(offsets=[0, 1.0]), OFFSETS_MSG, True, id="offsets-float"),
    pytest.param(one(offsets=[False, True]), OFFSETS_MSG, True, id="offsets-bool"),
    pytest.param(one(offsets=[0, 2**64 + 1]), OFFSETS_MSG, True, id="offsets-over-u64"),
    pytest.param(
        raw('{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1e0]}}', b"x"),
        OFFSETS_MSG,
        True,
        id="offsets-exponent",
    ),
    pytest.param(
        one(shape=[4], offsets=[4, 0], data=b"xxxx"),
        "tensor 't': data_offsets [4, 0] begin after end",
        True,
        id="offsets-begin-after-end",
    ),
    pytest.param(
        doc({"a": entry("U8", [4], [0, 4]), "b": entry("U8", [4], [2, 6])}, b"x" * 6),
        "tensor 'b': data_offsets [2, 6] overlaps the previous tensor (expected start 4)",
        True,
        id="overlap",
    ),
    pytest.param(
        doc({"a": entry("U8", [4], [0, 4]), "b": entry("U8", [4], [0, 4])}, b"x" * 4),
        "overlaps the previous tensor",
        True,
        id="same-range-twice",
    ),
    pytest.param(
        doc({"a": entry("U8", [4], [0, 4]), "z": entry("U8", [0], [2, 2])}, b"x" * 4),
        "tensor 'z': data_offsets [2, 2] overlaps the previous tensor",
        True,
        id="zero-size-inside-another",
    ),
    pytest.param(
        doc({"a": entry("U8", [4], [0, 4]), "b": entry("U8", [4], [5, 9])}, b"x" * 9),
        "tensor 'b': data_offsets [5, 9] leaves a gap (expected start 4)",
        True,
        id="gap",
    ),
    pytest.param(
        one(shape=[1], offsets=[1, 2], data=b"xx"),
        "tensor 't': data_offsets [1, 2] leaves a gap (expected start 0)",
        True,
        id="first-offset-not-0",
    ),
    pytest.param(
        one("F32", shape=[2], offsets=[0, 4], data=b"xxxx"),
        "tensor 't': data_offsets [0, 4] hold 4 bytes, but F32 [2] needs 8",
        True,
        id="size-too-small",
    ),
    pytest.param(
        one("F32", shape=[2], offsets=[0, 12], data=b"x" * 12),
        "hold 12 bytes, but F32 [2] needs 8",
        True,
        id="size-too-large",
    ),
    pytest.param(
        one("U8", shape=[0], offsets=[0, 1], data=b"x"),
        "hold 1 bytes, but U8 [0] needs 0",
        True,
        id="zero-size-with-bytes",
    ),
    pytest.param(
        one("F32", shape=[], offsets=[0, 8], data=b"x" * 8),
        "but F32 [] needs 4",
        True,
        id="scalar-wrong-size",
    ),
    pytest.param(one(data=b"xy"), "file has trailing bytes", True, id="trailing-bytes"),
    pytest.param(one(data=b""), "file is truncated", True, id="truncated-data"),
    pytest.param(
        one("F32", shape=[2], offsets=[0, 8], data=b"x" * 7),
        "file is truncated: tensors end at byte",
        True,
        id="truncated-by-one",
    ),
    pytest.param(doc({}, b"\0"), "file has trailing bytes", True, id="no-tensors-but-data"),
    pytest.param(
        doc({"__metadata__": {"format": "pt"}}, b"\0\0"),
        "file has trailing bytes",
        True,
        id="metadata-only-but-data",
    ),
    pytest.param(
        doc({"__metadata__": []}),
        "__metadata__ must be an object of strings",
        True,
        id="metadata-list",
    ),
    pytest.param(
        doc({"__metadata__": "pt"}),
        "__metadata__ must be an object of strings",
        True,
        id="metadata-string",
    ),
    pytest.param(
        doc({"__metadata__": 1}),
        "__metadata__ must be an object of strings",
        True,
        id="metadata-int",
    ),
    pytest.param(
        doc({"__metadata__": {"a": 1}}),
        "__metadata__ value for 'a' must be a string, found int",
        True,
        id="metadata-value-int",
    ),
    pytest.param(
        doc({"__metadata__": {"format": "pt", "b": None}}),
        "__metadata__ value for 'b' must be a string",
        True,
        id="metadata-value-null",
    ),
    pytest.param(
        doc({"__metadata__": {"c": ["pt"]}}),
        "__metadata__ value for 'c' must be a string, found list",
        True,
        id="metadata-value-list",
    ),
    pytest.param(
        doc({"__metadata__": {"d": {"e": "f"}}}),
        "__metadata__ value for 'd' must be a string, found dict",
        True,
        id="metadata-value-object",
    ),
    pytest.param(
        doc({"__metadata__": entry()}, b"x"),
        "__metadata__ value for 'shape' must be a string",
        True,
        id="tensor-named-metadata",
    ),
    pytest.param(
        one("F4", shape=[3], offsets=[0, 2], data=b"xx"),
        "tensor 't': F4 tensor of shape [3] does not fill whole bytes",
        True,
        id="f4-odd",
    ),
    pytest.param(one("F4", shape=[1], offsets=[0, 1], data=b"x"), BYTES_MSG, True, id="f4-one"),
    pytest.param(
        one("F4", shape=[3, 3], offsets=[0, 5], data=b"x" * 5), BYTES_MSG, True, id="f4-odd-2d"
    ),
    pytest.param(
        one("F6_E2M3", shape=[2], offsets=[0, 2], data=b"xx"),
        "tensor 't': F6_E2M3 tensor of shape [2] does not fill whole bytes",
        True,
        id="f6-e2m3-not-multiple-of-4",
    ),
    pytest.param(
        one("F6_E3M2", shape=[6], offsets=[0, 5], data=b"x" * 5),
        BYTES_MSG,
        True,
        id="f6-e3m2-six",
    ),
    pytest.param(
        doc({"t": 1}), "tensor 't': entry must be an object, found int", True, id="entry-int"
    ),
    pytest.param(
        doc({"t": "U8"}), "tensor 't': entry must be an object, found str", True, id="entry-string"
    ),
    pytest.param(doc({"t": None}), "tensor 't': entry must be an object", True, id="entry-null"),
    pytest.param(
        doc({"t": ["U8", [1], [0, 1]]}, b"x"),
        "tensor 't': entry must be an object, found list",
        False,  # serde deserializes a struct from a sequence of its fields
        id="entry-as-array",
    ),
    pytest.param(
        raw('{"t":{"dtype":"U8","shape":[1' + "0" * 25 + '],"data_offsets":[0,0]}}'),
        SHAPE_MSG,
        True,
        id="integer-over-2**64-in-shape",
    ),
    pytest.param(
        raw('{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,' + "9" * 40 + "]}}", b"x"),
        OFFSETS_MSG,
        True,
        id="integer-huge-in-offsets",
    ),
    pytest.param(
        raw('{"t":{"dtype":"U8","shape":[' + "9" * 400 + '],"data_offsets":[0,1]}}', b"x"),
        "header is not valid JSON",
        True,
        id="integer-beyond-double",
    ),
]


@pytest.mark.parametrize(("data", "message", "library_rejects"), MALFORMED)
def test_malformed_header_is_rejected(data: bytes, message: str, library_rejects: bool) -> None:
    with pytest.raises(HeaderError) as caught:
        parse_file_bytes(data, "bad.safetensors")
    text = str(caught.value)
    assert message in text
    assert text.startswith("bad.safetensors: ")
    assert "\n" not in text
    assert caught.value.exit_code == EXIT_INVALID_INPUT
    # the table itself is checked against the library: where it accepts, we are stricter
    if library_rejects:
        with pytest.raises(safetensors.SafetensorError):
            library_deserialize(data)
    else:
        library_deserialize(data)


def test_malformed_table_is_large_and_distinct() -> None:
    assert len(MALFORMED) >= 30
    ids = [param.id for param in MALFORMED]
    assert len(set(ids)) == len(ids)
    assert len({param.values[0] for param in MALFORMED}) == len(MALFORMED)


def test_header_error_is_invalid_input() -> None:
    assert issubclass(HeaderError, InvalidInputError)
    with pytest.raises(InvalidInputError):
        parse_file_bytes(raw(b"{}", n=0))


def test_zero_first_shape_with_huge_dims_is_accepted_like_the_library() -> None:
    # left to right, 0 * 2**40 * ... never overflows: the library accepts, so must we
    data = one(shape=[0, 2**40, 2**40, 2**40], offsets=[0, 0], data=b"")
    library_deserialize(data)
    (record,) = parse_file_bytes(data).tensors
    assert record.length == 0


# --------------------------------------------------------------------------------------------
# Valid edge cases that must be accepted (and that the library accepts too).


def _accept(data: bytes) -> FileHeader:
    library = {name: info for name, info in library_deserialize(data)}
    header = parse_file_bytes(data, "ok.safetensors")
    assert {r.name: (r.dtype, list(r.shape)) for r in header.tensors} == {
        name: (info["dtype"], list(info["shape"])) for name, info in library.items()
    }
    for record in header.tensors:
        assert data[record.offset : record.offset + record.length] == bytes(
            library[record.name]["data"]
        )
    return header


def test_accepts_zero_size_tensors() -> None:
    data = doc(
        {
            "empty.first": entry("F32", [0, 3], [0, 0]),
            "w": entry("F32", [2], [0, 8]),
            "empty.mid": entry("I64", [0], [8, 8]),
            "v": entry("U8", [3], [8, 11]),
            "empty.last": entry("BF16", [5, 0, 2], [11, 11]),
        },
        b"A" * 8 + b"xyz",
    )
    header = _accept(data)
    start = len(data) - 11
    spans = {r.name: (r.offset - start, r.length) for r in header.tensors}
    assert spans == {
        "empty.first": (0, 0),
        "w": (0, 8),
        "empty.mid": (8, 0),
        "v": (8, 3),
        "empty.last": (11, 0),
    }


def test_accepts_only_zero_size_tensors_and_no_data() -> None:
    data = doc({"a": entry("F32", [0], [0, 0]), "b": entry("U8", [3, 0], [0, 0])})
    header = _accept(data)
    assert [r.length for r in header.tensors] == [0, 0]
    assert header.file_size == len(data)


def test_accepts_scalar_tensor() -> None:
    data = doc({"s": entry("F64", [], [0, 8])}, struct.pack("<d", 2.5))
    (record,) = _accept(data).tensors
    assert record.shape == ()
    assert record.length == 8
    assert data[record.offset :] == struct.pack("<d", 2.5)


@pytest.mark.parametrize("body", [b"{}", b"{}      ", b"  \t\r\n{ }\n"])
def test_accepts_empty_header(body: bytes) -> None:
    header = _accept(raw(body))
    assert header.tensors == ()
    assert header.metadata is None
    assert header.header_size == len(body)
    assert header.file_size == 8 + len(body)


def test_accepts_metadata_null_and_empty() -> None:
    assert _accept(doc({"__metadata__": None})).metadata is None
    header = _accept(doc({"__metadata__": {}}))
    assert header.metadata_dict() == {}


def test_metadata_is_kept_in_document_order() -> None:
    data = raw('{"t":{' + E + '},"__metadata__":{"z":"1","a":"2","é":"3"}}', b"x")
    header = _accept(data)
    assert header.metadata == (("z", "1"), ("a", "2"), ("é", "3"))


def test_accepts_whitespace_around_and_inside_json() -> None:
    body = (
        ' \t\n {\r\n "t" : { "dtype" : "U8" , "shape" : [ 2 ] , "data_offsets" : [ 0 , 2 ] } \n}  '
    )
    header = _accept(raw(body, b"ab"))
    (record,) = header.tensors
    assert record.offset == 8 + len(body)
    assert record.length == 2


def test_accepts_tensors_out_of_offset_order() -> None:
    data = doc(
        {
            "c": entry("U8", [1], [6, 7]),
            "a": entry("F32", [1], [0, 4]),
            "b": entry("I16", [1], [4, 6]),
        },
        b"aaaabbc",
    )
    header = _accept(data)
    assert [r.name for r in header.tensors] == ["a", "b", "c"]
    assert [data[r.offset : r.offset + r.length] for r in header.tensors] == [b"aaaa", b"bb", b"c"]


def test_accepts_unicode_and_empty_names() -> None:
    names = ["", "é", "😀.weight", "tab\there", 'q"uote', "back\\slash", "\x00"]
    document = {name: entry("U8", [1], [i, i + 1]) for i, name in enumerate(names)}
    header = _accept(doc(document, bytes(range(len(names)))))
    assert [r.name for r in header.tensors] == names


def test_accepts_huge_dim_times_zero() -> None:
    (record,) = _accept(one(shape=[2**64 - 1, 0], offsets=[0, 0], data=b"")).tensors
    assert record.shape == (2**64 - 1, 0)


@pytest.mark.parametrize(
    ("dtype", "shape", "size"),
    [("F4", [2], 1), ("F4", [3, 2], 3), ("F6_E2M3", [4], 3), ("F6_E3M2", [2, 4], 6)],
)
def test_accepts_sub_byte_dtypes_filling_whole_bytes(
    dtype: str, shape: list[int], size: int
) -> None:
    assert _numel(shape) * FORMAT_BITS[dtype] == 8 * size
    (record,) = _accept(one(dtype, shape, [0, size], b"z" * size)).tensors
    assert record.length == size


def test_accepts_every_format_dtype() -> None:
    document: dict[str, Any] = {}
    position = 0
    for dtype, bits in FORMAT_BITS.items():
        size = 8 * bits // 8  # eight elements
        document[dtype.lower()] = entry(dtype, [2, 4], [position, position + size])
        position += size
    header = _accept(doc(document, bytes(position)))
    assert {r.dtype for r in header.tensors} == set(FORMAT_BITS)


# --------------------------------------------------------------------------------------------
# Truncation at every byte.


def _small_file() -> bytes:
    tensors = {
        "alpha": np.arange(12, dtype=np.float32).reshape(3, 4),
        "beta": np.array([True, False, True]),
        "gamma": np.arange(5, dtype=np.int16),
    }
    return bytes(safetensors.numpy.save(tensors, metadata={"format": "np"}))


def test_every_strict_prefix_is_rejected_in_memory() -> None:
    data = _small_file()
    assert 200 < len(data) < 1000
    assert len(parse_file_bytes(data).tensors) == 3
    for k in range(len(data)):
        with pytest.raises(HeaderError) as caught:
            parse_file_bytes(data[:k], "cut.safetensors")
        assert str(caught.value).startswith("cut.safetensors: "), k


def test_every_strict_prefix_is_rejected_on_disk(tmp_path: Path) -> None:
    data = _small_file()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data)
    assert len(read_header(path).tensors) == 3
    for k in range(len(data)):
        path.write_bytes(data[:k])
        with pytest.raises(HeaderError) as caught:
            read_header(path)
        assert str(path) in str(caught.value), k


def test_one_extra_byte_is_rejected(tmp_path: Path) -> None:
    data = _small_file()
    path = tmp_path / "long.safetensors"
    path.write_bytes(data + b"\0")
    with pytest.raises(HeaderError, match="trailing bytes"):
        read_header(path)


# --------------------------------------------------------------------------------------------
# read_header costs O(header), and its errors name the file.


def _bytes_read_by_this_process() -> int | None:
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return None


def test_read_header_reads_only_the_header(tmp_path: Path) -> None:
    size = 2**40  # a 1 TiB sparse data section
    body = json.dumps(
        {"big": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}},
        separators=(",", ":"),
    ).encode()
    path = tmp_path / "huge.safetensors"
    path.write_bytes(raw(body))
    try:
        os.truncate(path, 8 + len(body) + size)
    except OSError as error:  # a filesystem without sparse files that large
        pytest.skip(f"cannot create a sparse file: {error}")

    before = _bytes_read_by_this_process()
    started = time.perf_counter()
    header = read_header(path)
    elapsed = time.perf_counter() - started
    after = _bytes_read_by_this_process()

    assert elapsed < 1.0
    if before is not None and after is not None:
        assert after - before < 1_000_000
    (record,) = header.tensors
    assert record.offset == 8 + len(body)
    assert record.length == size
    assert header.file_size == 8 + len(body) + size

    os.truncate(path, 8 + len(body) + size + 1)
    with pytest.raises(HeaderError) as caught:
        read_header(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert "trailing bytes" in str(caught.value)


def test_read_header_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(HeaderError) as caught:
        read_header(path)
    assert str(path) in str(caught.value)


def test_read_header_short_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\0\0")
    with pytest.raises(HeaderError) as caught:
        read_header(path)
    assert str(caught.value).startswith(f"{path}: file is 3 bytes")


# --------------------------------------------------------------------------------------------
# Messages about a bad tensor name the tensor and the file.


@pytest.mark.parametrize("name", ["model.layers.0.mlp.experts.7.down_proj.weight", "é 😀"])
def test_bad_tensor_message_names_tensor_and_file(tmp_path: Path, name: str) -> None:
    data = doc({"ok": entry("U8", [2], [0, 2]), name: entry("F32", [3], [2, 10])}, b"x" * 10)
    with pytest.raises(HeaderError) as caught:
        parse_file_bytes(data, "model-00002-of-00004.safetensors")
    text = str(caught.value)
    assert "model-00002-of-00004.safetensors" in text
    assert repr(name) in text
    assert caught.value.tensor == name

    path = tmp_path / "model-00002-of-00004.safetensors"
    path.write_bytes(data)
    with pytest.raises(HeaderError) as caught:
        read_header(path)
    assert str(path) in str(caught.value)
    assert repr(name) in str(caught.value)
    assert caught.value.path == str(path)
    assert caught.value.tensor == name


def test_gap_message_names_the_tensor_after_the_gap() -> None:
    data = doc({"first": entry("U8", [1], [0, 1]), "second": entry("U8", [1], [2, 3])}, b"xyz")
    with pytest.raises(HeaderError) as caught:
        parse_file_bytes(data, "g.safetensors")
    assert caught.value.tensor == "second"
    assert str(caught.value).startswith("g.safetensors: tensor 'second': ")


def test_duplicate_field_message_names_the_tensor_and_the_field() -> None:
    # regression: the duplicate field 'dtype' of tensor 't' was reported as tensor 'dtype'
    data = raw('{"w":{' + E + '},"t":{"shape":[1],' + E + "}}", b"x")
    with pytest.raises(HeaderError) as caught:
        parse_file_bytes(data, "d.safetensors")
    assert caught.value.tensor == "t"
    assert "'shape'" in str(caught.value)
    assert str(caught.value).startswith("d.safetensors: tensor 't': ")
