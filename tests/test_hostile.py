"""Hostile checkpoints: each is refused with one clear line, nothing is written, nothing hangs.

A corpus of broken checkpoints, each made from one small valid synthetic checkpoint by one
mutation (GUIDE.md section 5): truncations, header defects, index defects, conversion defects.
Every case runs through the real command line in a subprocess (``python -m streamconv
convert IN OUT``) with a timeout, and is checked for: the exit code, one stderr line naming the
file (and tensor) and the problem, no traceback, nothing in the output directory, and every
input byte (and link, and FIFO) exactly as it was.

Broken shards are written with ``struct`` + ``json`` (header defects) or re-saved with
``safetensors.serialize`` (conversion defects); nothing here uses the code under test except
the synthetic generator that makes the valid starting point.

Exit code: every case is invalid input, 3. A missing, dangling, FIFO or directory shard is also
a defect of the checkpoint the user handed us (the index promises a shard that is not there),
not an I/O failure of the machine, so it is 3 too; 4 is kept for the output side and for
reading failures such as EIO.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reference import load_raw, serialize_raw

from streamconv.synth import SynthSpec, synthesize

INDEX = "model.safetensors.index.json"
#: ~43 KB in 4 shards; layer 0 dense, layer 1 has 4 experts straddling shards 3 and 4.
SPEC = SynthSpec(layers=2, experts=4, hidden=32, inter=16, vocab=64, shard_size=12 * 1024)
TIMEOUT = 60
EXPERTS = "model.layers.1.mlp.experts."
GATE0 = EXPERTS + "0.gate_proj.weight"
ROUTER = "model.layers.1.mlp.router.gate.weight"
NORM = "model.norm.weight"

Tensors = dict[str, tuple[str, np.ndarray]]


@dataclass(frozen=True)
class Expect:
    """What the one error line must contain (``words`` compared case-insensitively)."""

    file: str | None  # a file (or directory) name that must appear; None: checked elsewhere
    words: tuple[str, ...]
    tensor: str | None = None
    code: int = 3


# --- building broken checkpoints ---------------------------------------------------------------


def weight_map(root: Path) -> dict[str, str]:
    return dict(json.loads((root / INDEX).read_text())["weight_map"])


def shard_of(root: Path, key: str) -> str:
    return weight_map(root)[key]


def split(path: Path) -> tuple[bytes, bytes]:
    """A shard's header JSON (with its padding) and its data buffer."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + n], raw[8 + n :]


def put(path: Path, body: bytes, data: bytes, *, length: int | None = None) -> None:
    """Write ``prefix + body + data``; the prefix holds ``length`` (default: the padded body)."""
    body += b" " * (-len(body) % 8)
    n = len(body) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + body + data)


def compact(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def edit_header(root: Path, key: str, change: Callable[[dict[str, Any]], None]) -> str:
    """Apply ``change`` to the parsed header of the shard holding ``key``; returns its name."""
    name = shard_of(root, key)
    body, data = split(root / name)
    document = json.loads(body)
    change(document)
    put(root / name, compact(document), data)
    return name


def edit_body(root: Path, key: str, change: Callable[[bytes], bytes]) -> str:
    """Apply ``change`` to the raw header bytes of the shard holding ``key``."""
    name = shard_of(root, key)
    body, data = split(root / name)
    new = change(body.rstrip(b" "))
    assert new != body.rstrip(b" "), "the mutation changed nothing"
    put(root / name, new, data)
    return name


def set_entry(root: Path, key: str, field: str, value: Any) -> str:
    def change(document: dict[str, Any]) -> None:
        document[key][field] = value

    return edit_header(root, key, change)


def save(path: Path, tensors: Tensors, metadata: dict[str, str] | None) -> None:
    """Write ``tensors`` with safetensors' own serializer (any dtype, via raw pointers)."""
    path.write_bytes(serialize_raw(tensors, metadata))


def edit_tensors(root: Path, name: str, change: Callable[[Tensors], None]) -> None:
    """Re-save shard ``name`` after ``change``; the index follows the shards' new contents."""
    tensors, metadata = load_raw(root / name)
    change(tensors)
    save(root / name, tensors, metadata)
    reindex(root)


def reindex(root: Path) -> None:
    document = json.loads((root / INDEX).read_text())
    mapping: dict[str, str] = {}
    for path in sorted(root.glob("*.safetensors")):
        body, _ = split(path)
        mapping.update({k: path.name for k in json.loads(body) if k != "__metadata__"})
    document["weight_map"] = dict(sorted(mapping.items()))
    (root / INDEX).write_text(json.dumps(document, indent=2))


def set_index(root: Path, change: Callable[[dict[str, Any]], None]) -> None:
    document = json.loads((root / INDEX).read_text())
    change(document)
    (root / INDEX).write_text(json.dumps(document, indent=2))


def truncate(root: Path, key: str, size: Callable[[int, int], int]) -> str:
    """Cut the shard holding ``key`` to ``size(header_length, file_size)`` bytes."""
    name = shard_of(root, key)
    path = root / name
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    os.truncate(path, size(n, path.stat().st_size))
    return name


# --- the corpus --------------------------------------------------------------------------------

CASES: dict[str, Callable[[Path], Expect]] = {}


def case(name: str) -> Callable[[Callable[[Path], Expect]], Callable[[Path], Expect]]:
    def register(build: Callable[[Path], Expect]) -> Callable[[Path], Expect]:
        assert name not in CASES
        CASES[name] = build
        return build

    return register


# Truncations.


@case("truncated-empty-file")
def _(root: Path) -> Expect:
    return Expect(truncate(root, GATE0, lambda n, size: 0), ("too short",))


@case("truncated-inside-prefix")
def _(root: Path) -> Expect:
    return Expect(truncate(root, GATE0, lambda n, size: 5), ("too short",))


@case("truncated-after-prefix")
def _(root: Path) -> Expect:
    return Expect(truncate(root, GATE0, lambda n, size: 8), ("past the end",))


@case("truncated-inside-header")
def _(root: Path) -> Expect:
    return Expect(truncate(root, GATE0, lambda n, size: 8 + n // 2), ("past the end",))


@case("truncated-header-only")
def _(root: Path) -> Expect:
    return Expect(truncate(root, GATE0, lambda n, size: 8 + n), ("truncated",))


@case("truncated-inside-data")
def _(root: Path) -> Expect:
    return Expect(truncate(root, GATE0, lambda n, size: (8 + n + size) // 2), ("truncated",))


@case("truncated-last-byte")
def _(root: Path) -> Expect:
    return Expect(truncate(root, NORM, lambda n, size: size - 1), ("truncated",))


@case("truncated-single-file-no-index")
def _(root: Path) -> Expect:
    # The single-file layout: one model.safetensors and no index.
    for path in root.glob("*.safetensors"):
        path.unlink()
    (root / INDEX).unlink()
    shutil.copyfile(
        root.parent / "pristine-single" / "model.safetensors", root / "model.safetensors"
    )
    os.truncate(root / "model.safetensors", 1000)
    return Expect("model.safetensors", ("past the end",))


# Header prefix.


def _prefix(root: Path, value: int) -> str:
    name = shard_of(root, GATE0)
    with open(root / name, "r+b") as handle:
        handle.write(struct.pack("<Q", value))
    return name


@case("header-length-zero")
def _(root: Path) -> Expect:
    return Expect(_prefix(root, 0), ("header length is 0",))


@case("header-length-over-100mb")
def _(root: Path) -> Expect:
    return Expect(_prefix(root, 100_000_001), ("exceeds", "limit"))


@case("header-length-u64-max")
def _(root: Path) -> Expect:
    return Expect(_prefix(root, 2**64 - 1), ("exceeds", "limit"))


@case("header-length-past-eof")
def _(root: Path) -> Expect:
    size = (root / shard_of(root, GATE0)).stat().st_size
    return Expect(_prefix(root, size - 7), ("past the end",))


@case("header-length-too-short")
def _(root: Path) -> Expect:
    # N cuts the JSON in the middle: not JSON.
    body, _ = split(root / shard_of(root, GATE0))
    return Expect(_prefix(root, len(body) // 2), ("not valid json",))


# Header JSON.


@case("header-not-utf8")
def _(root: Path) -> Expect:
    return Expect(
        edit_body(root, GATE0, lambda b: b.replace(b'"model.', b'"\xffodel.', 1)), ("utf-8",)
    )


@case("header-lone-surrogate")
def _(root: Path) -> Expect:
    change = lambda b: b.replace(b'"model.', b'"\\ud800odel.', 1)  # noqa: E731
    return Expect(edit_body(root, GATE0, change), ("json",))


@case("header-not-json")
def _(root: Path) -> Expect:
    return Expect(edit_body(root, GATE0, lambda b: b[:-1] + b";"), ("not valid json",))


@case("header-json-array")
def _(root: Path) -> Expect:
    return Expect(
        edit_body(root, GATE0, lambda b: compact(list(json.loads(b).values()))),
        ("json object", "list"),
    )


@case("header-json-string")
def _(root: Path) -> Expect:
    return Expect(edit_body(root, GATE0, lambda b: b'"' + b"x" * (len(b) - 2) + b'"'), ("object",))


@case("header-duplicate-tensor")
def _(root: Path) -> Expect:
    def change(body: bytes) -> bytes:
        entry = json.loads(body)[GATE0]
        return body[:-1] + b"," + compact({GATE0: entry})[1:]

    return Expect(edit_body(root, GATE0, change), ("duplicate",), tensor=GATE0)


@case("header-duplicate-field")
def _(root: Path) -> Expect:
    change = lambda b: b.replace(b'"dtype":"BF16"', b'"dtype":"BF16","dtype":"F16"', 1)  # noqa: E731
    name = edit_body(root, GATE0, change)
    body, _ = split(root / name)
    first = next(k for k in json.loads(body) if k != "__metadata__")  # the entry edited
    return Expect(name, ("duplicate", "dtype"), tensor=first)


@case("header-entry-not-object")
def _(root: Path) -> Expect:
    return Expect(edit_header(root, GATE0, lambda d: d.update({GATE0: [1, 2]})), ("object",), GATE0)


@case("header-missing-field")
def _(root: Path) -> Expect:
    name = edit_header(root, GATE0, lambda d: d[GATE0].pop("shape"))
    return Expect(name, ("missing", "shape"), GATE0)


@case("header-extra-field")
def _(root: Path) -> Expect:
    name = edit_header(root, GATE0, lambda d: d[GATE0].update(layout="rowmajor"))
    return Expect(name, ("unexpected", "layout"), GATE0)


@case("header-unknown-dtype")
def _(root: Path) -> Expect:
    return Expect(set_entry(root, GATE0, "dtype", "BF17"), ("dtype", "BF17"), GATE0)


@case("header-dtype-not-string")
def _(root: Path) -> Expect:
    return Expect(set_entry(root, GATE0, "dtype", 16), ("dtype",), GATE0)


@case("header-shape-negative")
def _(root: Path) -> Expect:
    return Expect(set_entry(root, GATE0, "shape", [-16, -32]), ("shape",), GATE0)


@case("header-shape-float")
def _(root: Path) -> Expect:
    return Expect(set_entry(root, GATE0, "shape", [16.0, 32]), ("shape",), GATE0)


@case("header-shape-bool")
def _(root: Path) -> Expect:
    return Expect(set_entry(root, GATE0, "shape", [True, 512]), ("shape",), GATE0)


@case("header-shape-not-list")
def _(root: Path) -> Expect:
    return Expect(set_entry(root, GATE0, "shape", 512), ("shape",), GATE0)


@case("header-shape-overflow")
def _(root: Path) -> Expect:
    return Expect(set_entry(root, GATE0, "shape", [2**40, 2**40, 2**40, 0]), ("overflow",), GATE0)


@case("header-sub-byte-dtype-odd")
def _(root: Path) -> Expect:
    # F4 is half a byte per element: 3 elements are not whole bytes.
    def change(document: dict[str, Any]) -> None:
        begin = document[NORM]["data_offsets"][0]
        document[NORM].update(dtype="F4", shape=[3], data_offsets=[begin, begin + 2])

    return Expect(edit_header(root, NORM, change), ("bytes",), NORM)


@case("header-offsets-one-int")
def _(root: Path) -> Expect:
    return Expect(set_entry(root, GATE0, "data_offsets", [0]), ("data_offsets",), GATE0)


@case("header-offsets-floats")
def _(root: Path) -> Expect:
    return Expect(set_entry(root, GATE0, "data_offsets", [0.0, 1024.0]), ("data_offsets",), GATE0)


@case("header-offsets-above-u64")
def _(root: Path) -> Expect:
    return Expect(set_entry(root, GATE0, "data_offsets", [0, 2**64]), ("data_offsets",), GATE0)


@case("header-offsets-begin-after-end")
def _(root: Path) -> Expect:
    def change(document: dict[str, Any]) -> None:
        begin, end = document[GATE0]["data_offsets"]
        document[GATE0]["data_offsets"] = [end, begin]

    return Expect(edit_header(root, GATE0, change), ("begin after end",), GATE0)


def _second(document: dict[str, Any]) -> str:
    """The tensor whose data follows another tensor's (begin > 0)."""
    entries = sorted((v["data_offsets"][0], k) for k, v in document.items() if k != "__metadata__")
    return entries[1][1]


def _shift(amount: int, *, everything: bool = False) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        victim = _second(document)
        for key, entry in document.items():
            if key != "__metadata__" and (everything or key == victim):
                begin, end = entry["data_offsets"]
                entry["data_offsets"] = [begin + amount, end + amount]

    return change


@case("header-offsets-overlap")
def _(root: Path) -> Expect:
    return Expect(edit_header(root, GATE0, _shift(-2)), ("overlaps",))


@case("header-offsets-gap")
def _(root: Path) -> Expect:
    return Expect(edit_header(root, GATE0, _shift(2)), ("gap",))


@case("header-offsets-not-from-zero")
def _(root: Path) -> Expect:
    return Expect(edit_header(root, GATE0, _shift(8, everything=True)), ("gap", "start 0"))


@case("header-size-mismatch")
def _(root: Path) -> Expect:
    return Expect(set_entry(root, GATE0, "shape", [16, 31]), ("needs",), GATE0)


@case("header-trailing-bytes")
def _(root: Path) -> Expect:
    name = shard_of(root, GATE0)
    with open(root / name, "ab") as handle:
        handle.write(b"\0" * 8)
    return Expect(name, ("trailing bytes",))


@case("header-metadata-not-string")
def _(root: Path) -> Expect:
    name = edit_header(root, GATE0, lambda d: d.update(__metadata__={"format": 1}))
    return Expect(name, ("__metadata__", "string"))


@case("header-metadata-not-object")
def _(root: Path) -> Expect:
    name = edit_header(root, GATE0, lambda d: d.update(__metadata__=["pt"]))
    return Expect(name, ("__metadata__",))


# Index.


def _retarget(root: Path, key: str, shard: str) -> None:
    set_index(root, lambda d: d["weight_map"].update({key: shard}))


@case("index-absolute-name")
def _(root: Path) -> Expect:
    # An absolute path to a real, valid shard: still refused.
    _retarget(root, NORM, str(root / shard_of(root, NORM)))
    return Expect(INDEX, ("plain file name",))


@case("index-name-with-slash")
def _(root: Path) -> Expect:
    shard = shard_of(root, NORM)
    shutil.copyfile(root / shard, root / "original" / shard)
    _retarget(root, NORM, f"original/{shard}")
    return Expect(INDEX, ("plain file name",))


@case("index-name-parent-directory")
def _(root: Path) -> Expect:
    _retarget(root, NORM, "../pristine/" + shard_of(root, NORM))
    return Expect(INDEX, ("plain file name",))


@case("index-name-with-dotdot")
def _(root: Path) -> Expect:
    shard = shard_of(root, NORM)
    shutil.copyfile(root / shard, root / f"..{shard}")
    _retarget(root, NORM, f"..{shard}")
    return Expect(INDEX, ("..",))


@case("index-name-not-safetensors")
def _(root: Path) -> Expect:
    shard = shard_of(root, NORM)
    bin_name = shard.replace(".safetensors", ".bin")
    (root / shard).rename(root / bin_name)
    set_index(
        root,
        lambda d: d["weight_map"].update(
            {k: bin_name for k, v in d["weight_map"].items() if v == shard}
        ),
    )
    return Expect(INDEX, (".safetensors",))


@case("index-shard-missing")
def _(root: Path) -> Expect:
    shard = shard_of(root, NORM)
    (root / shard).unlink()
    return Expect(shard, ("missing",))


@case("index-key-not-in-shard")
def _(root: Path) -> Expect:
    _retarget(root, "model.layers.7.mlp.gate.weight", shard_of(root, NORM))
    return Expect(INDEX, ("no shard has it",), tensor="model.layers.7.mlp.gate.weight")


@case("index-key-in-wrong-shard")
def _(root: Path) -> Expect:
    _retarget(root, NORM, shard_of(root, GATE0))
    return Expect(INDEX, ("listed in",), tensor=NORM)


@case("index-tensor-not-listed")
def _(root: Path) -> Expect:
    shard = shard_of(root, NORM)
    set_index(root, lambda d: d["weight_map"].pop(NORM))
    return Expect(shard, ("missing from",), tensor=NORM)


def _copy_norm_into_first(root: Path) -> tuple[str, str]:
    """Put a second copy of model.norm.weight into the first shard (index unchanged)."""
    first, home = shard_of(root, "model.embed_tokens.weight"), shard_of(root, NORM)
    norm, _ = load_raw(root / home)
    tensors, metadata = load_raw(root / first)
    tensors[NORM] = norm[NORM]
    save(root / first, tensors, metadata)
    return first, home


@case("index-key-in-two-shards")
def _(root: Path) -> Expect:
    first, home = _copy_norm_into_first(root)
    return Expect(first, ("both", home), tensor=NORM)


@case("no-index-key-in-two-shards")
def _(root: Path) -> Expect:
    first, home = _copy_norm_into_first(root)
    (root / INDEX).unlink()
    return Expect(first, ("both", home), tensor=NORM)


@case("index-not-json")
def _(root: Path) -> Expect:
    (root / INDEX).write_text('{"weight_map": {')
    return Expect(INDEX, ("json",))


@case("index-not-utf8")
def _(root: Path) -> Expect:
    (root / INDEX).write_bytes(b'{"weight_map": {"\xff": "a.safetensors"}}')
    return Expect(INDEX, ("utf-8",))


@case("index-json-array")
def _(root: Path) -> Expect:
    (root / INDEX).write_text("[]\n")
    return Expect(INDEX, ("object",))


@case("index-duplicate-key")
def _(root: Path) -> Expect:
    text = (root / INDEX).read_text()
    shard = shard_of(root, NORM)
    duplicate = f'"weight_map": {{\n    "{NORM}": "{shard}",'
    (root / INDEX).write_text(text.replace('"weight_map": {', duplicate, 1))
    return Expect(INDEX, ("duplicate",), tensor=NORM)


@case("index-no-weight-map")
def _(root: Path) -> Expect:
    set_index(root, lambda d: d.pop("weight_map"))
    return Expect(INDEX, ("weight_map",))


@case("index-value-not-string")
def _(root: Path) -> Expect:
    _retarget(root, NORM, 4)  # type: ignore[arg-type]
    return Expect(INDEX, ("file name",), tensor=NORM)


@case("index-is-a-directory")
def _(root: Path) -> Expect:
    (root / INDEX).unlink()
    (root / INDEX).mkdir()
    return Expect(INDEX, ("index",))


@case("shard-symlink-out-of-directory")
def _(root: Path) -> Expect:
    shard = shard_of(root, NORM)
    outside = root.parent / "elsewhere"
    outside.mkdir()
    (root / shard).rename(outside / shard)
    (root / shard).symlink_to(outside / shard)
    return Expect(shard, ("outside",))


@case("shard-symlink-relative-escape")
def _(root: Path) -> Expect:
    shard = shard_of(root, NORM)
    (root / shard).unlink()
    (root / shard).symlink_to(Path("..") / "pristine" / shard)
    return Expect(shard, ("outside",))


@case("shard-dangling-symlink")
def _(root: Path) -> Expect:
    shard = shard_of(root, NORM)
    (root / shard).unlink()
    (root / shard).symlink_to(root / "gone.safetensors")
    return Expect(shard, ("dangling",))


@case("shard-fifo")
def _(root: Path) -> Expect:
    shard = shard_of(root, NORM)
    (root / shard).unlink()
    os.mkfifo(root / shard)
    return Expect(shard, ("regular file",))


@case("no-index-shard-fifo")
def _(root: Path) -> Expect:
    shard = shard_of(root, NORM)
    (root / INDEX).unlink()
    (root / shard).unlink()
    os.mkfifo(root / shard)
    return Expect(shard, ("regular file",))


@case("shard-is-a-directory")
def _(root: Path) -> Expect:
    shard = shard_of(root, NORM)
    (root / shard).unlink()
    (root / shard).mkdir()
    return Expect(shard, ("regular file",))


@case("no-shard-at-all")
def _(root: Path) -> Expect:
    for path in root.glob("*.safetensors"):
        path.unlink()
    (root / INDEX).unlink()
    return Expect(root.name, ("no ",))


# Conversion. The plan reports problems by tensor; whether the line names a file is checked in
# test_conversion_error_names_a_file below.


def _drop(*keys: str) -> Callable[[Tensors], None]:
    def change(tensors: Tensors) -> None:
        for key in keys:
            del tensors[key]

    return change


def _update(**new: tuple[str, np.ndarray]) -> Callable[[Tensors], None]:
    return lambda tensors: tensors.update(new)


@case("expert-missing")
def _(root: Path) -> Expect:
    parts = [f"{EXPERTS}2.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    edit_tensors(root, shard_of(root, parts[0]), _drop(*parts))
    return Expect(None, ("missing", "2"), tensor=EXPERTS)


@case("expert-projection-missing")
def _(root: Path) -> Expect:
    key = f"{EXPERTS}1.up_proj.weight"
    edit_tensors(root, shard_of(root, key), _drop(key))
    return Expect(None, ("up_proj", "missing", "1"), tensor=EXPERTS)


@case("expert-duplicate-index")
def _(root: Path) -> Expect:
    def change(tensors: Tensors) -> None:
        for part in ("gate_proj", "up_proj", "down_proj"):
            tensors[f"{EXPERTS}01.{part}.weight"] = tensors[f"{EXPERTS}1.{part}.weight"]

    edit_tensors(root, shard_of(root, GATE0), change)
    return Expect(None, ("twice", "experts.01."), tensor=EXPERTS)


@case("expert-dtype-mismatch")
def _(root: Path) -> Expect:
    key = f"{EXPERTS}2.gate_proj.weight"

    def change(tensors: Tensors) -> None:
        tensors[key] = ("F16", tensors[key][1])  # same width, other dtype

    edit_tensors(root, shard_of(root, key), change)
    return Expect(None, ("F16", "BF16"), tensor=key)


@case("expert-shape-mismatch")
def _(root: Path) -> Expect:
    key = f"{EXPERTS}2.down_proj.weight"

    def change(tensors: Tensors) -> None:
        tensors[key] = ("BF16", tensors[key][1][:, :8])

    edit_tensors(root, shard_of(root, key), change)
    return Expect(None, ("shape",), tensor=key)


@case("expert-gate-up-not-concatenable")
def _(root: Path) -> Expect:
    def change(tensors: Tensors) -> None:
        for e in range(SPEC.experts):
            key = f"{EXPERTS}{e}.up_proj.weight"
            if key in tensors:
                tensors[key] = ("BF16", np.ascontiguousarray(tensors[key][1][:, :16]))

    for shard in sorted({shard_of(root, f"{EXPERTS}{e}.up_proj.weight") for e in range(4)}):
        edit_tensors(root, shard, change)
    return Expect(None, ("concatenated",), tensor=EXPERTS)


@case("rename-collision-router")
def _(root: Path) -> Expect:
    shard = shard_of(root, ROUTER)
    tensors, _ = load_raw(root / shard)
    edit_tensors(root, shard, _update(**{"model.layers.1.mlp.gate.weight": tensors[ROUTER]}))
    return Expect(None, ("both become",), tensor="model.layers.1.mlp.gate.weight")


@case("rename-collision-shared")
def _(root: Path) -> Expect:
    key = "model.layers.1.mlp.shared_mlp.up_proj.weight"
    shard = shard_of(root, key)
    tensors, _ = load_raw(root / shard)
    target = "model.layers.1.mlp.shared_experts.up_proj.weight"
    edit_tensors(root, shard, _update(**{target: tensors[key]}))
    return Expect(None, ("both become",), tensor=target)


@case("fused-name-collision-gate-up")
def _(root: Path) -> Expect:
    shard = shard_of(root, ROUTER)
    tensors, _ = load_raw(root / shard)
    target = EXPERTS + "gate_up_proj"
    edit_tensors(root, shard, _update(**{target: tensors[ROUTER]}))
    return Expect(None, ("both become",), tensor=target)


@case("fused-name-collision-down")
def _(root: Path) -> Expect:
    shard = shard_of(root, GATE0)
    tensors, _ = load_raw(root / shard)
    target = EXPERTS + "down_proj"
    edit_tensors(root, shard, _update(**{target: tensors[GATE0]}))
    return Expect(None, ("both become",), tensor=target)


@case("several-problems-together")
def _(root: Path) -> Expect:
    gone = [f"{EXPERTS}0.down_proj.weight", f"{EXPERTS}2.up_proj.weight"]
    edit_tensors(root, shard_of(root, gone[0]), _drop(*gone))
    shard = shard_of(root, ROUTER)
    tensors, _ = load_raw(root / shard)
    edit_tensors(root, shard, _update(**{"model.layers.1.mlp.gate.weight": tensors[ROUTER]}))
    return Expect(None, ("3 problems", "down_proj", "up_proj", "both become"))


# --- running a case ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("hostile")
    synthesize(base / "pristine", SPEC)
    synthesize(base / "pristine-single", SynthSpec(**{**_fields(SPEC), "single_file": True}))
    return base


def _fields(spec: SynthSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in spec.__dataclass_fields__}


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry below ``root``: type, mode, mtime, size and content (links not followed)."""
    out: dict[str, tuple[Any, ...]] = {}
    for directory, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(directory) / name
            info = path.lstat()
            key = path.relative_to(root).as_posix()
            if stat.S_ISLNK(info.st_mode):
                out[key] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[key] = ("file", info.st_mode, info.st_mtime_ns, info.st_size, digest)
            else:
                out[key] = ("other", info.st_mode, info.st_mtime_ns)
    return out


def written(out: Path) -> list[str]:
    """Whatever a refused run left in ``out``, beyond an empty run-state lock."""
    if not out.exists():
        return []
    found = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if rel in (".streamconv", ".streamconv/lock") and (
            path.is_dir() or not path.stat().st_size
        ):
            continue
        found.append(rel)
    return found


def run_cli(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamconv", *(str(a) for a in argv)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd,
        check=False,
    )


def prepare(pristine: Path, tmp_path: Path, name: str) -> tuple[Path, Expect]:
    work = tmp_path / "work"
    shutil.copytree(pristine, work, symlinks=True)
    root = work / "in"
    shutil.copytree(pristine / "pristine", root, symlinks=True)
    return root, CASES[name](root)


def check_refusal(proc: subprocess.CompletedProcess[str], expect: Expect, root: Path) -> str:
    assert proc.returncode == expect.code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == "", proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("streamconv: error: "), line
    if expect.file is not None:
        assert expect.file in line, (expect.file, line)
    if expect.tensor is not None:
        assert expect.tensor in line, (expect.tensor, line)
    for word in expect.words:
        assert word.lower() in line.lower(), (word, line)
    return line


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40
    kinds = {name.split("-")[0] for name in CASES}
    assert {"truncated", "header", "index", "expert", "rename", "fused"} <= kinds


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_refused(pristine: Path, tmp_path: Path, name: str) -> None:
    root, expect = prepare(pristine, tmp_path, name)
    before = snapshot(tmp_path / "work")
    out = tmp_path / "out"
    proc = run_cli("convert", root, out, cwd=tmp_path)
    check_refusal(proc, expect, root)
    assert written(out) == []
    assert snapshot(tmp_path / "work") == before


CONVERSION = sorted(n for n in CASES if n.split("-")[0] in ("expert", "rename", "fused", "several"))


#: Every plan problem names the shard(s) it is about (GUIDE.md section 5 asks for the file).
@pytest.mark.parametrize("name", CONVERSION)
def test_conversion_error_names_a_file(pristine: Path, tmp_path: Path, name: str) -> None:
    root, _ = prepare(pristine, tmp_path, name)
    proc = run_cli("convert", root, tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 3
    line = proc.stderr.splitlines()[-1]
    assert str(root) in line or any(p.name in line for p in root.glob("*.safetensors")), line


@pytest.mark.parametrize("name", ["truncated-inside-data", "index-shard-missing", "expert-missing"])
def test_existing_empty_output_stays_empty(pristine: Path, tmp_path: Path, name: str) -> None:
    root, expect = prepare(pristine, tmp_path, name)
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli("convert", root, out, "--workers", "2", cwd=tmp_path)
    check_refusal(proc, expect, root)
    assert os.listdir(out) == []


def test_pristine_checkpoint_converts(pristine: Path, tmp_path: Path) -> None:
    """The starting point is valid: every refusal above is due to its one mutation."""
    out = tmp_path / "out"
    proc = run_cli("convert", pristine / "pristine", out, "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert (out / INDEX).is_file()
