"""inspect_path: headers-only facts about a checkpoint, problems reported without raising.

Expected counts, groups and shard spans are read independently from the index and the raw
headers with ``json`` and ``struct``, or come from files written here with safetensors itself.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from safetensors.numpy import save_file

from streamconv.errors import InvalidInputError
from streamconv.inspection import inspect_path, render_inspection
from streamconv.synth import SynthSpec, synthesize

INDEX = "model.safetensors.index.json"
EXPERT = re.compile(r"^(.*\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
SMALL: dict[str, Any] = {
    "layers": 4,
    "experts": 8,
    "hidden": 64,
    "inter": 32,
    "vocab": 128,
    "dense_layers": 1,
}
FIELDS = {
    "path",
    "kind",
    "layout",
    "rules",
    "tensors",
    "total_bytes",
    "file_bytes",
    "dtypes",
    "shards",
    "index_metadata",
    "others",
    "groups",
    "split_groups",
    "ok",
    "problems",
}
GROUP_FIELDS = {
    "prefix",
    "experts",
    "present",
    "missing",
    "parts",
    "members",
    "shards",
    "split",
    "bytes",
}


def raw_header(path: Path) -> dict[str, dict[str, object]]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header: dict[str, dict[str, object]] = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    return header


def test_split_groups_shown(tmp_path: Path) -> None:
    synthesize(tmp_path / "in", SynthSpec(**SMALL, shard_size=100 * 1024))
    weight_map = json.loads((tmp_path / "in" / INDEX).read_text())["weight_map"]
    spans: dict[str, set[str]] = defaultdict(set)
    for key, shard in weight_map.items():
        match = EXPERT.match(key)
        if match:
            spans[match.group(1)].add(shard)
    assert any(len(s) > 1 for s in spans.values()), "the fixture must straddle shards"

    ins = inspect_path(tmp_path / "in")
    assert ins.ok and ins.problems == ()
    assert (ins.kind, ins.layout, ins.rules) == ("directory", "index", "hyv3")
    assert {g.prefix: set(g.shards) for g in ins.groups} == spans
    assert {g.prefix: g.split for g in ins.groups} == {p: len(s) > 1 for p, s in spans.items()}
    assert ins.split_groups == sum(len(s) > 1 for s in spans.values())
    for group in ins.groups:
        assert (group.experts, group.present, group.missing) == (8, 8, 0)
        assert group.parts == ("gate_proj", "up_proj", "down_proj")
        assert {(m.part, m.dtype, m.shape, m.count) for m in group.members} == {
            ("gate_proj", "BF16", (32, 64), 8),
            ("up_proj", "BF16", (32, 64), 8),
            ("down_proj", "BF16", (64, 32), 8),
        }
        assert group.bytes == 8 * 3 * 32 * 64 * 2

    # Totals, dtypes and shards from the raw headers.
    shards = sorted(set(weight_map.values()))
    headers = {s: raw_header(tmp_path / "in" / s) for s in shards}
    assert ins.tensors == len(weight_map)
    assert [(s.name, s.tensors) for s in ins.shards] == [(s, len(headers[s])) for s in shards]
    assert [s.size for s in ins.shards] == [(tmp_path / "in" / s).stat().st_size for s in shards]
    assert ins.file_bytes == sum(s.size for s in ins.shards)
    counts = Counter(str(e["dtype"]) for h in headers.values() for e in h.values())
    assert {d.dtype: d.tensors for d in ins.dtypes} == dict(counts)
    sizes = {
        key: entry["data_offsets"][1] - entry["data_offsets"][0]  # type: ignore[index]
        for h in headers.values()
        for key, entry in h.items()
    }
    assert ins.total_bytes == sum(sizes.values())
    assert all(s.metadata == (("format", "pt"),) for s in ins.shards)
    assert "config.json" in ins.others and "original" in ins.others

    text = render_inspection(ins)
    assert "split over shards" in text and "problems   none" in text
    assert f"{len(ins.groups)} expert group(s)" in text


def test_single_file(tmp_path: Path) -> None:
    synthesize(tmp_path / "one", SynthSpec(**SMALL, single_file=True))
    path = tmp_path / "one" / "model.safetensors"
    ins = inspect_path(path)
    assert ins.ok, ins.problems
    assert (ins.kind, ins.layout) == ("file", "file")
    assert ins.tensors == len(raw_header(path))
    assert [s.name for s in ins.shards] == ["model.safetensors"]
    assert ins.file_bytes == path.stat().st_size
    assert len(ins.groups) == SMALL["layers"] - SMALL["dense_layers"]
    assert not any(g.split for g in ins.groups)
    # The same directory inspected as a whole has the "single" layout.
    assert inspect_path(tmp_path / "one").layout == "single"


def test_plan_problems_reported_not_raised(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    tensors = {"model.norm.weight": np.ones(4, np.float32)}
    for layer in (0, 1):
        for e in (0, 2, 3) if layer == 0 else (0, 1):  # layer 0 lacks expert 1
            p = f"model.layers.{layer}.mlp.experts.{e}."
            tensors[p + "gate_proj.weight"] = np.zeros((2, 4), np.float32)
            tensors[p + "up_proj.weight"] = np.zeros((2, 4), np.float32)
            tensors[p + "down_proj.weight"] = np.zeros((4, 2), np.float32)
    odd = "model.layers.1.mlp.experts.1.up_proj.weight"
    tensors[odd] = np.zeros((2, 4), np.float16)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})

    ins = inspect_path(root)
    assert not ins.ok
    assert len(ins.problems) == 4  # every problem, not just the first
    missing = [p for p in ins.problems if "model.layers.0.mlp.experts." in p]
    assert len(missing) == 3 and all("missing" in p and "1 (of 0-3)" in p for p in missing)
    assert any(odd in p and "F16" in p for p in ins.problems)
    first, second = ins.groups
    assert (first.prefix, first.experts, first.present, first.missing) == (
        "model.layers.0.mlp.experts.",
        4,
        3,
        3,
    )
    assert (second.experts, second.present, second.missing) == (2, 2, 0)
    members = {(m.part, m.dtype, m.shape, m.count) for m in second.members}
    assert ("up_proj", "F16", (2, 4), 1) in members
    assert ("up_proj", "F32", (2, 4), 1) in members
    text = render_inspection(ins)
    assert "problems   4" in text and "member(s) missing" in text
    data = ins.to_dict()
    assert data["ok"] is False and data["problems"] == list(ins.problems)


def test_broken_checkpoint_reported(tmp_path: Path) -> None:
    synthesize(tmp_path / "in", SynthSpec(**SMALL, shard_size=100 * 1024))
    shards = sorted(p.name for p in (tmp_path / "in").glob("*.safetensors"))
    (tmp_path / "in" / shards[-1]).unlink()
    ins = inspect_path(tmp_path / "in")
    assert not ins.ok
    assert any(shards[-1] in p for p in ins.problems)
    assert [s.name for s in ins.shards] == shards[:-1]  # what could be read is still shown

    with open(tmp_path / "in" / shards[0], "r+b") as handle:
        handle.truncate(100)
    ins = inspect_path(tmp_path / "in")
    assert any(shards[0] in p for p in ins.problems)


def test_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError):
        inspect_path(tmp_path / "nothing")


def test_to_dict_shape(tmp_path: Path) -> None:
    synthesize(tmp_path / "in", SynthSpec(**SMALL, shard_size=100 * 1024))
    data = inspect_path(tmp_path / "in").to_dict()
    assert set(data) == FIELDS
    assert orjson.loads(orjson.dumps(data)) == data
    assert set(data["groups"][0]) == GROUP_FIELDS
    assert set(data["groups"][0]["members"][0]) == {"part", "dtype", "shape", "count"}
    assert set(data["shards"][0]) == {"name", "size", "header_size", "tensors", "bytes", "metadata"}
    assert set(data["dtypes"][0]) == {"dtype", "tensors", "bytes"}
    assert data["index_metadata"] == {"total_size": data["total_bytes"]}
