"""Shared fixtures: small synthetic checkpoints and an independent check of a converted output.

Every expectation comes from ``reference.py`` (safetensors' loader + numpy), from safetensors'
own serializer and from ``json``; nothing here imports the code under test except the synthetic
checkpoint generator that makes the inputs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
from reference import load_raw, reference_convert, serialize_raw, shard_files

from streamconv.synth import SynthSpec, synthesize

INDEX = "model.safetensors.index.json"
#: The run-state folder a conversion keeps in its output (for resuming); not checkpoint content.
RUN_STATE = ".streamconv"
#: A few hundred KB: 3 layers (1 dense), 6 experts, ~48 KB shards so groups straddle shards.
SMALL: dict[str, Any] = {
    "layers": 3,
    "experts": 6,
    "hidden": 64,
    "inter": 32,
    "vocab": 128,
    "dense_layers": 1,
    "shard_size": 48 * 1024,
}
#: dtypes numpy can load through ``safe_open(framework="numpy")``.
NUMPY_DTYPES = {"BOOL", "U8", "I8", "I16", "U16", "F16", "I32", "U32", "F32", "F64", "I64", "U64"}

Expected = dict[str, dict[str, tuple[str, np.ndarray]]]


def tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (links followed) as {relative path: sha256}, run state aside."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.relative_to(root).parts[0] != RUN_STATE:
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).digest()
    return out


def check_conversion(input_dir: Path, output_dir: Path) -> Expected:
    """Assert ``output_dir`` is exactly the outer layout of ``input_dir``; returns the reference."""
    expected = reference_convert(input_dir)
    inputs = {p.name for p in shard_files(input_dir)}
    assert set(expected) == inputs
    for shard, tensors in expected.items():
        path = output_dir / shard
        got, metadata = load_raw(path)
        assert sorted(got) == sorted(tensors), shard
        for name, (dtype, array) in tensors.items():
            assert got[name][0] == dtype, name
            assert got[name][1].shape == array.shape, name
            assert got[name][1].tobytes() == array.tobytes(), name
        assert metadata == load_raw(input_dir / shard)[1], f"{shard}: __metadata__ not kept"
        # Header, tensor order, padding and data exactly as safetensors' own writer does them.
        assert path.read_bytes() == serialize_raw(got, metadata), f"{shard}: not serializer bytes"
        with safetensors.safe_open(str(path), framework="numpy") as handle:
            assert sorted(handle.keys()) == sorted(tensors)
            for name, (dtype, array) in tensors.items():
                if dtype in NUMPY_DTYPES:
                    assert handle.get_tensor(name).tobytes() == array.tobytes(), name

    had_index = (input_dir / INDEX).exists()
    assert (output_dir / INDEX).exists() == (had_index or len(expected) > 1)
    if (output_dir / INDEX).exists():
        text = (output_dir / INDEX).read_text(encoding="utf-8")
        document = json.loads(text)
        assert text == json.dumps(document, indent=2, sort_keys=True) + "\n"
        assert set(document) == {"metadata", "weight_map"}
        weight_map = document["weight_map"]
        assert list(weight_map) == sorted(weight_map)
        assert weight_map == {n: shard for shard, ts in expected.items() for n in ts}
        total = sum(array.nbytes for ts in expected.values() for _, array in ts.values())
        old = json.loads((input_dir / INDEX).read_text()).get("metadata", {}) if had_index else {}
        assert document["metadata"] == {**old, "total_size": total}
        assert type(document["metadata"]["total_size"]) is int

    # Every other file and folder copied unchanged; nothing else (no temp files) left behind.
    others = {
        rel: digest
        for rel, digest in tree(input_dir).items()
        if rel.split("/")[0] not in inputs | {INDEX}
    }
    produced = tree(output_dir)
    published = {s: produced[s] for s in expected} | (
        {INDEX: produced[INDEX]} if INDEX in produced else {}
    )
    assert produced == {**others, **published}
    for path in output_dir.rglob("*"):
        assert not path.is_symlink(), path
        assert "partial" not in path.name and not path.name.endswith(".tmp"), path
    return expected


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """``make_checkpoint(**SynthSpec fields)`` writes a small checkpoint under ``tmp_path``."""
    counter = itertools.count()

    def make(**fields: Any) -> Path:
        root = tmp_path / f"in{next(counter)}"
        synthesize(root, SynthSpec(**{**SMALL, **fields}))
        return root

    return make


@pytest.fixture
def check() -> Callable[[Path, Path], Expected]:
    """``check(input_dir, output_dir)``: the output is byte for byte the reference conversion."""
    return check_conversion


@pytest.fixture
def snapshot() -> Callable[[Path], dict[str, bytes]]:
    """``snapshot(root)``: {relative path: sha256} of every file (links followed)."""
    return tree


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI configures the ``streamconv`` logger; undo it so tests do not leak streams."""
    logger = logging.getLogger("streamconv")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """``umask(mask)`` sets the process umask for the rest of the test."""
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)
