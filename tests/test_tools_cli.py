"""End to end through the command line: ``inspect``, ``plan``, ``verify`` and ``convert``'s
``--verify``, ``--manifest`` and ``--report``.

Every expectation is computed here, independently of the code under test: tensor names, dtypes,
shapes and byte spans from the raw headers (``struct`` + ``json``) or from safetensors' own
``deserialize``, file names and sizes from ``os.stat``, expert groups and the shards they span from
the index, digests with ``hashlib``. Broken inputs are written with safetensors' serializer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reference import EXPERT, load_raw, serialize_raw

import streamconv.verify
from streamconv.cli import main
from streamconv.convert import ConvertOptions, convert
from streamconv.synth import SynthSpec, synthesize
from streamconv.writer import WriteOptions

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MANIFEST = "streamconv-manifest.json"
RUN_STATE = ".streamconv"
PARTS = ("gate_proj", "up_proj", "down_proj")
#: Like conftest's SMALL: ~300 KB in 7 shards, both expert groups split over two shards.
SMALL: dict[str, Any] = {
    "layers": 3,
    "experts": 6,
    "hidden": 64,
    "inter": 32,
    "vocab": 128,
    "dense_layers": 1,
    "shard_size": 48 * 1024,
}
LAYOUTS: dict[str, dict[str, Any]] = {
    "index": {},
    "scatter": {"experts": 8, "shard_size": 80_000, "scatter": True},
    "single": {"single_file": True},
    "no-index": {"index": False},
}
LAYOUT_NAMES = {"index": "index", "scatter": "index", "single": "single", "no-index": "shards"}
LAYER1 = "model.layers.1.mlp.experts."
LAYER2 = "model.layers.2.mlp.experts."
PLAIN = "model.layers.0.self_attn.q_proj.weight"
VERIFY_FIELDS = {
    "ok",
    "mode",
    "input",
    "output",
    "files_checked",
    "tensors_checked",
    "bytes_compared",
    "seconds",
    "throughput",
    "problems",
}
PROBLEM_FIELDS = {"kind", "file", "tensor", "offset", "reason"}
SUMMARY_FIELDS = {
    "files",
    "tensors",
    "groups",
    "split_groups",
    "bytes_to_copy",
    "output_bytes",
    "other_bytes",
    "space_needed",
    "space_available",
    "space_checked_at",
    "fits",
}

Make = Callable[..., Path]
Snapshot = Callable[[Path], dict[str, bytes]]
Span = tuple[str, list[int], int, int]  # dtype, shape, absolute offset, length


# --- independent facts about files ------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, Any, str]:
    code, out, err = cli(capsys, *argv, "--json")
    return code, json.loads(out), err


def one_error_line(err: str, *needles: str) -> str:
    lines = err.splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def header_of(path: Path) -> tuple[int, dict[str, Span], dict[str, str] | None]:
    """(header length, {tensor: span}, __metadata__) of a safetensors file, parsed here."""
    with open(path, "rb") as handle:
        (n,) = struct.unpack("<Q", handle.read(8))
        document = json.loads(handle.read(n))
    metadata = document.pop("__metadata__", None)
    spans = {}
    for name, info in document.items():
        begin, end = info["data_offsets"]
        spans[name] = (info["dtype"], info["shape"], 8 + n + begin, end - begin)
    return n, spans, metadata


def shards_of(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.endswith(".safetensors"))


def tensor_map(root: Path) -> dict[str, str]:
    """{tensor: shard}: from the index when there is one, else from every shard's header."""
    if (root / INDEX).exists():
        weight_map: dict[str, str] = json.loads((root / INDEX).read_text())["weight_map"]
        return weight_map
    return {name: shard for shard in shards_of(root) for name in header_of(root / shard)[1]}


def expert_groups(mapping: dict[str, str]) -> dict[str, dict[tuple[int, str], str]]:
    """{group prefix: {(expert, projection): shard}} of the HYV3 expert tensors."""
    groups: dict[str, dict[tuple[int, str], str]] = defaultdict(dict)
    for name, shard in mapping.items():
        match = EXPERT.fullmatch(name)
        if match:
            groups[match.group(1)][(int(match.group(2)), match.group(3))] = shard
    return dict(groups)


def files_below(root: Path, skip: set[str] | None = None) -> dict[str, int]:
    """{relative path: size} of every file below ``root`` (top-level names in ``skip`` left out)."""
    skip = skip or set()
    found = {}
    for directory, dirs, files in os.walk(root):
        rel = Path(directory).relative_to(root)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d not in skip]
        for name in files:
            if rel == Path(".") and name in skip:
                continue
            found[(rel / name).as_posix()] = os.stat(Path(directory) / name).st_size
    return found


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_range(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def rewrite_shard(shard: Path, change: Callable[[dict[str, tuple[str, np.ndarray]]], None]) -> None:
    """Rewrite ``shard`` with safetensors' own serializer after ``change`` edits its tensors."""
    tensors, metadata = load_raw(shard)
    change(tensors)
    shard.write_bytes(serialize_raw(tensors, metadata))


def drop_expert(root: Path, key: str = f"{LAYER1}3.up_proj.weight") -> str:
    """Remove one expert member from its shard and from the index."""
    document = json.loads((root / INDEX).read_text())
    shard = document["weight_map"].pop(key)

    def change(tensors: dict[str, tuple[str, np.ndarray]]) -> None:
        del tensors[key]

    rewrite_shard(root / shard, change)
    (root / INDEX).write_text(json.dumps(document))
    return key


def retype_expert(root: Path, key: str = f"{LAYER2}2.gate_proj.weight") -> str:
    """Declare one expert member F16 (same width, same bytes) where its siblings are BF16."""
    shard = json.loads((root / INDEX).read_text())["weight_map"][key]

    def change(tensors: dict[str, tuple[str, np.ndarray]]) -> None:
        dtype, array = tensors[key]
        assert dtype == "BF16"
        tensors[key] = ("F16", array)

    rewrite_shard(root / shard, change)
    return key


def break_header(root: Path) -> str:
    shard = shards_of(root)[1]
    with open(root / shard, "r+b") as handle:
        handle.write(struct.pack("<Q", 2**63 - 1))
    return shard


def listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# --- shared conversions -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A SMALL checkpoint and its conversion (shared: tests corrupt private copies)."""
    root = tmp_path_factory.mktemp("tools")
    synthesize(root / "in", SynthSpec(**SMALL))
    convert(root / "in", root / "out", ConvertOptions(write=WriteOptions(sync=False)))
    return root / "in", root / "out"


@pytest.fixture
def pair(converted: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    source, output = converted
    shutil.copytree(output, tmp_path / "out", symlinks=True)
    return source, tmp_path / "out"


def fused_target(out: Path, prefix: str) -> tuple[str, dict[str, Span]]:
    """The output shard holding ``prefix``'s fused tensors, found from the output's index."""
    shard = json.loads((out / INDEX).read_text())["weight_map"][prefix + "gate_up_proj"]
    return shard, header_of(out / shard)[1]


# --- inspect ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_inspect_dir_json_matches_the_files(
    make_checkpoint: Make, capsys: pytest.CaptureFixture[str], layout: str
) -> None:
    source = make_checkpoint(**LAYOUTS[layout])
    code, data, err = cli_json(capsys, "inspect", source)
    assert code == 0, err
    assert data["kind"] == "directory" and data["layout"] == LAYOUT_NAMES[layout]
    assert data["ok"] is True and data["problems"] == []

    shards = shards_of(source)
    headers = {s: header_of(source / s) for s in shards}
    spans = [span for _, found, _ in headers.values() for span in found.values()]
    assert data["tensors"] == len(spans) == sum(len(load_raw(source / s)[0]) for s in shards)
    assert data["total_bytes"] == sum(span[3] for span in spans)
    assert data["file_bytes"] == sum(os.stat(source / s).st_size for s in shards)
    assert sorted(
        (s["name"], s["size"], s["header_size"], s["tensors"], s["bytes"], s["metadata"])
        for s in data["shards"]
    ) == [
        (
            s,
            os.stat(source / s).st_size,
            headers[s][0],
            len(headers[s][1]),
            sum(span[3] for span in headers[s][1].values()),
            headers[s][2],
        )
        for s in shards
    ]
    by_dtype: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for dtype, _, _, length in spans:
        by_dtype[dtype][0] += 1
        by_dtype[dtype][1] += length
    assert {d["dtype"]: [d["tensors"], d["bytes"]] for d in data["dtypes"]} == dict(by_dtype)

    index = json.loads((source / INDEX).read_text()) if (source / INDEX).exists() else None
    assert data["index_metadata"] == (None if index is None else index["metadata"])
    expected_others = sorted(n for n in os.listdir(source) if n not in {*shards, INDEX})
    assert data["others"] == expected_others

    mapping = tensor_map(source)
    groups = expert_groups(mapping)
    assert groups, "the fixture has expert groups"
    split = {prefix for prefix, members in groups.items() if len(set(members.values())) > 1}
    if layout in {"index", "scatter"}:
        assert split, "the fixture splits groups across shards"
    if layout == "scatter":
        assert any(len(set(groups[p].values())) > 2 for p in split), "scatter spans 3+ shards"
    assert [g["prefix"] for g in data["groups"]] == sorted(groups)
    assert data["split_groups"] == len(split)
    sizes = {name: span[3] for _, found, _ in headers.values() for name, span in found.items()}
    shapes = {name: span[1] for _, found, _ in headers.values() for name, span in found.items()}
    for group in data["groups"]:
        members = groups[group["prefix"]]
        experts = max(e for e, _ in members) + 1
        assert group["experts"] == experts
        assert group["present"] == experts and group["missing"] == 0
        assert group["parts"] == list(PARTS)
        assert group["shards"] == sorted(set(members.values()))
        assert group["split"] is (group["prefix"] in split)
        names = [f"{group['prefix']}{e}.{p}.weight" for e, p in members]
        assert group["bytes"] == sum(sizes[n] for n in names)
        counts = Counter((p, tuple(shapes[f"{group['prefix']}{e}.{p}.weight"])) for e, p in members)
        assert sorted((m["part"], tuple(m["shape"]), m["count"]) for m in group["members"]) == (
            sorted((p, s, c) for (p, s), c in counts.items())
        )


def test_inspect_dir_text(make_checkpoint: Make, capsys: pytest.CaptureFixture[str]) -> None:
    source = make_checkpoint()
    code, out, err = cli(capsys, "inspect", source)
    assert code == 0, err
    shards = shards_of(source)
    tensors = len(tensor_map(source))
    groups = expert_groups(tensor_map(source))
    split = [p for p, members in groups.items() if len(set(members.values())) > 1]
    assert re.search(rf"\b{tensors} in {len(shards)} shard", out), out
    for shard in shards:
        assert shard in out, shard
    for prefix in groups:
        assert prefix in out, prefix
    assert re.search(rf"\b{len(groups)} expert group\(s\).*\b{len(split)} split", out), out
    assert re.search(r"^problems\s+none$", out, re.MULTILINE), out


def test_inspect_file_json(make_checkpoint: Make, capsys: pytest.CaptureFixture[str]) -> None:
    """A single-file checkpoint, and each shard of a sharded one on its own."""
    single = make_checkpoint(single_file=True) / SINGLE
    sharded = make_checkpoint()
    for path in [single, *(sharded / s for s in shards_of(sharded))]:
        code, data, err = cli_json(capsys, "inspect", path)
        assert code == 0, err
        n, spans, metadata = header_of(path)
        assert data["kind"] == "file", path
        assert data["tensors"] == len(spans)
        assert data["total_bytes"] == sum(span[3] for span in spans.values())
        assert data["file_bytes"] == os.stat(path).st_size
        assert [
            (s["name"], s["size"], s["header_size"], s["metadata"]) for s in data["shards"]
        ] == [(path.name, os.stat(path).st_size, n, metadata)]
        groups = expert_groups(dict.fromkeys(spans, path.name))
        assert [g["prefix"] for g in data["groups"]] == sorted(groups), path
        complete = True
        for group in data["groups"]:
            members = groups[group["prefix"]]
            experts = max(e for e, _ in members) + 1
            missing = sum((e, p) not in members for e in range(experts) for p in PARTS)
            complete &= missing == 0
            assert (group["experts"], group["missing"]) == (experts, missing), path
            assert group["present"] == len({e for e, _ in members})
            assert group["shards"] == [path.name] and group["split"] is False
        assert data["split_groups"] == 0
        # A shard holding only part of a group cannot be converted alone: a problem, not a crash.
        assert data["ok"] is complete, (path, data["problems"])
        assert bool(data["problems"]) is not complete
    assert any(
        expert_groups(dict.fromkeys(header_of(sharded / s)[1], s)) for s in shards_of(sharded)
    )


def test_inspect_missing_expert(make_checkpoint: Make, capsys: pytest.CaptureFixture[str]) -> None:
    source = make_checkpoint()
    drop_expert(source)
    code, data, err = cli_json(capsys, "inspect", source)
    assert code == 0, err
    assert data["ok"] is False
    assert len(data["problems"]) == 1, data["problems"]
    problem = data["problems"][0]
    assert LAYER1 in problem and "up_proj" in problem and "3" in problem, problem
    group = next(g for g in data["groups"] if g["prefix"] == LAYER1)
    assert (group["experts"], group["present"], group["missing"]) == (6, 6, 1)
    assert data["tensors"] == len(tensor_map(source))
    code, out, err = cli(capsys, "inspect", source)
    assert code == 0, err
    assert problem in out and "1 member(s) missing" in out


def test_inspect_broken_header(make_checkpoint: Make, capsys: pytest.CaptureFixture[str]) -> None:
    source = make_checkpoint()
    shard = break_header(source)
    code, data, err = cli_json(capsys, "inspect", source)
    assert code == 0, err
    assert data["ok"] is False
    assert any(shard in p for p in data["problems"]), data["problems"]
    # The readable shards are still shown.
    assert {s["name"] for s in data["shards"]} == set(shards_of(source)) - {shard}


def test_inspect_broken_checkpoint_others(
    make_checkpoint: Make, capsys: pytest.CaptureFixture[str]
) -> None:
    source = make_checkpoint()
    break_header(source)
    code, data, _ = cli_json(capsys, "inspect", source)
    assert code == 0 and data["ok"] is False
    assert data["others"] == sorted(
        n for n in os.listdir(source) if n not in {*shards_of(source), INDEX}
    )


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
@pytest.mark.parametrize("what", ["dir", "file"])
def test_inspect_nonexistent_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], json_flag: list[str], what: str
) -> None:
    path = tmp_path / ("nope" if what == "dir" else "nope.safetensors")
    code, out, err = cli(capsys, "inspect", path, *json_flag)
    assert code in (2, 3)
    one_error_line(err, str(path))
    assert out == ""


# --- plan -------------------------------------------------------------------------------------


def check_plan_against_output(data: dict[str, Any], source: Path, out: Path) -> None:
    """Every planned file and tensor is what the real conversion wrote (headers parsed here)."""
    plan = data["plan"]
    outputs = shards_of(out)
    assert [f["name"] for f in plan["files"]] == outputs
    written: dict[str, dict[str, Span]] = {}
    for planned in plan["files"]:
        path = out / planned["name"]
        n, spans, _ = header_of(path)
        written[planned["name"]] = spans
        assert planned["size"] == os.stat(path).st_size, planned["name"]
        assert planned["header_size"] == n, planned["name"]
        got = {
            t["name"]: (t["dtype"], t["shape"], t["offset"], t["length"])
            for t in planned["tensors"]
        }
        assert len(got) == len(planned["tensors"])
        assert got == spans, planned["name"]
        inputs = {s: header_of(source / s)[1] for s in shards_of(source)}
        for tensor in planned["tensors"]:
            data_bytes = b""
            for piece_source, offset, length, piece_tensor in tensor["pieces"]:
                _, _, begin, size = inputs[piece_source][piece_tensor]
                assert (offset, length) == (begin, size), (tensor["name"], piece_tensor)
                data_bytes += read_range(source / piece_source, offset, length)
            expected = read_range(path, tensor["offset"], tensor["length"])
            assert data_bytes == expected, tensor["name"]
    total = sum(span[3] for spans in written.values() for span in spans.values())
    assert plan["total_size"] == total
    has_index = (out / INDEX).exists()
    assert plan["index"] == (INDEX if has_index else None)
    if has_index:
        assert json.loads((out / INDEX).read_text())["metadata"]["total_size"] == total

    groups = expert_groups(tensor_map(source))
    assert [g["prefix"] for g in plan["groups"]] == sorted(groups)
    for group in plan["groups"]:
        members = groups[group["prefix"]]
        sources = sorted(set(members.values()))
        assert group["experts"] == max(e for e, _ in members) + 1
        assert group["sources"] == sources
        fused = [group["prefix"] + "gate_up_proj", group["prefix"] + "down_proj"]
        assert sorted(group["outputs"]) == sorted(fused)
        holder = [s for s, spans in written.items() if fused[0] in spans]
        assert [group["target"]] == holder
        assert group["target"] in sources and fused[1] in written[group["target"]]

    summary = data["summary"]
    assert set(summary) == SUMMARY_FIELDS
    assert summary["files"] == len(outputs)
    assert summary["tensors"] == sum(len(spans) for spans in written.values())
    assert summary["groups"] == len(groups)
    split = [p for p, members in groups.items() if len(set(members.values())) > 1]
    assert summary["split_groups"] == len(split)
    assert summary["bytes_to_copy"] == total
    assert summary["output_bytes"] == sum(os.stat(out / s).st_size for s in outputs)
    checkpoint_files = {*shards_of(source), INDEX}
    assert summary["other_bytes"] == sum(files_below(source, checkpoint_files).values())
    produced = files_below(out, {RUN_STATE, MANIFEST})
    assert summary["space_needed"] >= sum(produced.values())
    assert type(summary["space_available"]) is int and summary["space_available"] > 0
    assert summary["fits"] is (summary["space_needed"] <= summary["space_available"])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_plan_json_is_what_convert_writes(
    make_checkpoint: Make,
    tmp_path: Path,
    snapshot: Snapshot,
    capsys: pytest.CaptureFixture[str],
    layout: str,
) -> None:
    source = make_checkpoint(**LAYOUTS[layout])
    before, entries = snapshot(source), listing(tmp_path)
    code, data, err = cli_json(capsys, "plan", source)
    assert code == 0, err
    assert snapshot(source) == before and listing(tmp_path) == entries  # nothing written
    assert set(data) == {"ok", "problems", "summary", "plan"}
    assert data["ok"] is True and data["problems"] == []
    assert data["plan"]["format"] == 1 and data["plan"]["rules"]["name"] == "hyv3"
    out = tmp_path / "out"
    code, _, err = cli(capsys, "convert", source, out, "--no-sync", "-q")
    assert code == 0, err
    check_plan_against_output(data, source, out)


def test_plan_text(
    make_checkpoint: Make, tmp_path: Path, snapshot: Snapshot, capsys: pytest.CaptureFixture[str]
) -> None:
    source = make_checkpoint()
    before, entries = snapshot(source), listing(tmp_path)
    code, out, err = cli(capsys, "plan", source)
    assert code == 0, err
    assert snapshot(source) == before and listing(tmp_path) == entries
    lines = out.splitlines()
    for shard in shards_of(source):
        assert sum(shard in line for line in lines) >= 1, shard
    groups = expert_groups(tensor_map(source))
    split = [p for p, members in groups.items() if len(set(members.values())) > 1]
    assert re.search(rf"\b{len(groups)} expert groups fused, {len(split)} split\b", out), out
    for prefix in split:
        assert prefix in out, prefix


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
def test_plan_output_not_yet_existing(
    make_checkpoint: Make,
    tmp_path: Path,
    snapshot: Snapshot,
    capsys: pytest.CaptureFixture[str],
    json_flag: list[str],
) -> None:
    source = make_checkpoint()
    target = tmp_path / "a" / "b" / "out"
    before, entries = snapshot(source), listing(tmp_path)
    code, out, err = cli(capsys, "plan", source, "--output", target, *json_flag)
    assert code == 0, err
    assert not (tmp_path / "a").exists()
    assert snapshot(source) == before and listing(tmp_path) == entries
    if json_flag:
        summary = json.loads(out)["summary"]
        assert summary["space_checked_at"] == str(tmp_path.resolve())
        info = os.statvfs(tmp_path)
        assert summary["space_available"] <= info.f_blocks * info.f_frsize


def two_problems(root: Path) -> tuple[str, str]:
    """A missing expert member in layer 1 and a dtype mismatch in layer 2."""
    return drop_expert(root), retype_expert(root)


def test_plan_errors_all_listed(
    make_checkpoint: Make, tmp_path: Path, snapshot: Snapshot, capsys: pytest.CaptureFixture[str]
) -> None:
    source = make_checkpoint()
    dropped, retyped = two_problems(source)
    before, entries = snapshot(source), listing(tmp_path)
    code, data, err = cli_json(capsys, "plan", source)
    assert code == 3, err
    assert data["ok"] is False
    problems = data["problems"]
    assert len(problems) == 2, problems
    assert sum(LAYER1 in p and "up_proj" in p for p in problems) == 1, problems
    assert sum(retyped in p and "F16" in p for p in problems) == 1, problems
    assert dropped not in source.joinpath(INDEX).read_text()
    assert snapshot(source) == before and listing(tmp_path) == entries
    # inspect reports the same two problems, without failing.
    code, found, err = cli_json(capsys, "inspect", source)
    assert code == 0, err
    assert found["ok"] is False and sorted(found["problems"]) == sorted(problems)


@pytest.mark.parametrize("breaker", ["two-problems", "missing-expert", "broken-header"])
def test_plan_error_text_is_one_line(
    make_checkpoint: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str], breaker: str
) -> None:
    source = make_checkpoint()
    if breaker == "broken-header":
        needles = [break_header(source)]
    elif breaker == "missing-expert":
        drop_expert(source)
        needles = [LAYER1, "up_proj"]
    else:
        two_problems(source)
        needles = [LAYER1]
    entries = listing(tmp_path)
    code, out, err = cli(capsys, "plan", source, "--output", tmp_path / "out")
    assert code == 3
    one_error_line(err, *needles)
    assert out == ""
    assert listing(tmp_path) == entries
    code, data, _ = cli_json(capsys, "plan", source)
    assert code == 3 and data["ok"] is False and data["problems"]
    assert all(any(n in p for p in data["problems"]) for n in needles), data["problems"]


def test_plan_json_lists_every_broken_header(
    make_checkpoint: Make, capsys: pytest.CaptureFixture[str]
) -> None:
    source = make_checkpoint()
    broken = shards_of(source)[1:5:3]
    for shard in broken:
        with open(source / shard, "r+b") as handle:
            handle.write(struct.pack("<Q", 2**63 - 1))
    code, found, _ = cli_json(capsys, "inspect", source)
    assert code == 0 and len(found["problems"]) == 2  # inspect does list both
    code, data, _ = cli_json(capsys, "plan", source)
    assert code == 3 and data["ok"] is False
    assert len(data["problems"]) == 2, data["problems"]
    for shard in broken:
        assert sum(shard in p for p in data["problems"]) == 1, (shard, data["problems"])


def without_free_space(text: str) -> str:
    """The free space can change between two runs (other writers); everything else may not."""
    return re.sub(r'"space_available": \d+', '"space_available": 0', text)


def test_plan_json_deterministic(
    make_checkpoint: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = make_checkpoint(scatter=True, experts=8, shard_size=80_000)
    first = cli(capsys, "plan", source, "--json")
    second = cli(capsys, "plan", source, "--json")
    assert first[0] == second[0] == 0
    assert without_free_space(first[1]) == without_free_space(second[1])
    runs = []
    for seed in ("1", "2"):  # other hash seeds: no dependence on set or dict iteration order
        done = subprocess.run(
            [sys.executable, "-m", "streamconv", "plan", str(source), "--json"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**os.environ, "PYTHONHASHSEED": seed},
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        runs.append(without_free_space(done.stdout))
    assert runs == [without_free_space(first[1])] * 2
    # The plan itself names no paths: a copy elsewhere plans to the same bytes.
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(source, copy)
    moved = json.loads(cli(capsys, "plan", copy, "--json")[1])
    assert json.dumps(moved["plan"]) == json.dumps(json.loads(first[1])["plan"])


# --- verify -----------------------------------------------------------------------------------


def test_verify_good_output(
    converted: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = converted
    code, text, err = cli(capsys, "verify", source, out)
    assert code == 0, err
    assert "OK" in text.splitlines()[0], text
    code, data, err = cli_json(capsys, "verify", source, out)
    assert code == 0, err
    assert set(data) == VERIFY_FIELDS
    assert data["ok"] is True and data["mode"] == "plan" and data["problems"] == []
    outputs = shards_of(out)
    spans = [span for s in outputs for span in header_of(out / s)[1].values()]
    assert data["tensors_checked"] == len(spans)
    assert data["bytes_compared"] >= sum(span[3] for span in spans)
    assert data["bytes_compared"] >= sum(os.stat(out / s).st_size for s in outputs)
    assert data["files_checked"] >= len(outputs)


def corrupt_fused(out: Path, suffix: str, where: str) -> tuple[str, str | None, int | None]:
    """Flip a byte of a fused tensor of the split group of layer 1."""
    shard, spans = fused_target(out, LAYER1)
    name = LAYER1 + suffix
    _, shape, start, length = spans[name]
    per_expert = length // shape[0]
    at = {
        "first": start,
        "last": start + length - 1,  # the last expert: it came from another input shard
        "middle": start + 3 * per_expert + per_expert // 2 + 1,
    }[where]
    flip(out / shard, at)
    return shard, name, at


def corrupt_truncated(out: Path) -> tuple[str, str | None, int | None]:
    shard, _ = fused_target(out, LAYER1)
    size = os.stat(out / shard).st_size
    os.truncate(out / shard, size - 100)
    return shard, None, None


def corrupt_missing(out: Path) -> tuple[str, str | None, int | None]:
    shard = shards_of(out)[1]
    (out / shard).unlink()
    return shard, None, None


def corrupt_longer(out: Path) -> tuple[str, str | None, int | None]:
    shard = shards_of(out)[0]
    with open(out / shard, "ab") as handle:
        handle.write(b"\0" * 8)
    return shard, None, None


def corrupt_missing_index(out: Path) -> tuple[str, str | None, int | None]:
    (out / INDEX).unlink()
    return INDEX, None, None


def corrupt_extra(out: Path) -> tuple[str, str | None, int | None]:
    (out / "notes.txt").write_text("not from the input\n")
    return "notes.txt", None, None


def corrupt_index_entry(out: Path) -> tuple[str, str | None, int | None]:
    document = json.loads((out / INDEX).read_text())
    right = document["weight_map"][PLAIN]
    document["weight_map"][PLAIN] = next(s for s in shards_of(out) if s != right)
    (out / INDEX).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return INDEX, PLAIN, None


def corrupt_total_size(out: Path) -> tuple[str, str | None, int | None]:
    document = json.loads((out / INDEX).read_text())
    document["metadata"]["total_size"] += 2
    (out / INDEX).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return INDEX, None, None


def corrupt_config(out: Path) -> tuple[str, str | None, int | None]:
    flip(out / "config.json", 7)
    return "config.json", None, 7


def corrupt_config_longer(out: Path) -> tuple[str, str | None, int | None]:
    with open(out / "config.json", "ab") as handle:
        handle.write(b" ")
    return "config.json", None, None


def corrupt_nested_copy(out: Path) -> tuple[str, str | None, int | None]:
    flip(out / "original" / "README.txt", 0)
    return "original/README.txt", None, 0


CORRUPTIONS: dict[str, Callable[[Path], tuple[str, str | None, int | None]]] = {
    "fused-gate-up-first": lambda out: corrupt_fused(out, "gate_up_proj", "first"),
    "fused-gate-up-middle": lambda out: corrupt_fused(out, "gate_up_proj", "middle"),
    "fused-gate-up-last": lambda out: corrupt_fused(out, "gate_up_proj", "last"),
    "fused-down-middle": lambda out: corrupt_fused(out, "down_proj", "middle"),
    "fused-down-last": lambda out: corrupt_fused(out, "down_proj", "last"),
    "truncated-shard": corrupt_truncated,
    "longer-shard": corrupt_longer,
    "missing-shard": corrupt_missing,
    "missing-index": corrupt_missing_index,
    "extra-file": corrupt_extra,
    "wrong-index-entry": corrupt_index_entry,
    "wrong-total-size": corrupt_total_size,
    "changed-config": corrupt_config,
    "longer-config": corrupt_config_longer,
    "changed-nested-copy": corrupt_nested_copy,
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_verify_catches_and_names(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str], corruption: str
) -> None:
    source, out = pair
    file, tensor, offset = CORRUPTIONS[corruption](out)
    code, data, err = cli_json(capsys, "verify", source, out)
    assert code == 1, err
    assert data["ok"] is False and data["problems"], data
    for problem in data["problems"]:
        assert set(problem) == PROBLEM_FIELDS
    named = [p for p in data["problems"] if p["file"] == file]
    assert named, data["problems"]
    if tensor is not None:
        assert any(p["tensor"] == tensor for p in named), named
    if offset is not None:
        assert any(p["offset"] == offset for p in named), named
    if corruption.startswith("fused"):
        # Exactly the flipped byte of the fused tensor, nothing else.
        assert [(p["kind"], p["file"], p["tensor"], p["offset"]) for p in data["problems"]] == [
            ("data", file, tensor, offset)
        ]
        assert tensor is not None and tensor.endswith(("gate_up_proj", "down_proj"))
    if corruption == "wrong-total-size":
        assert any("total_size" in p["reason"] for p in named), named
    code, text, err = cli(capsys, "verify", source, out)
    assert code == 1, err
    assert "OK" not in text.splitlines()[0]
    lines = [line for line in text.splitlines() if file in line]
    assert lines, text
    if tensor is not None:
        assert any(tensor in line for line in lines), text
    if offset is not None:
        assert any(re.search(rf"\b{offset}\b", line) for line in lines), text


def test_verify_missing_output_dir(
    converted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, _ = converted
    code, out, err = cli(capsys, "verify", source, tmp_path / "nothing")
    assert code in (2, 3)
    one_error_line(err, str(tmp_path / "nothing"))
    assert out == ""


# --- manifest ---------------------------------------------------------------------------------


def check_manifest_file(out: Path) -> dict[str, Any]:
    """The manifest lists every output file (run state aside) with its true size and sha256."""
    document: dict[str, Any] = json.loads((out / MANIFEST).read_text())
    expected = files_below(out, {RUN_STATE, MANIFEST})
    assert document["algorithm"] == "sha256"
    assert [e["path"] for e in document["files"]] == sorted(expected)
    for entry in document["files"]:
        assert entry["size"] == expected[entry["path"]], entry
        assert entry["sha256"] == sha256(out / entry["path"]), entry
    assert document["total_size"] == sum(expected.values())
    assert isinstance(document["plan_fingerprint"], str) and document["plan_fingerprint"]
    return document


@pytest.fixture
def manifested(
    make_checkpoint: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[Path, Path]:
    source, out = make_checkpoint(), tmp_path / "manifested"
    code, text, err = cli(capsys, "convert", source, out, "--manifest", "--no-sync", "-q")
    assert code == 0, err
    assert str(out / MANIFEST) in text
    return source, out


def test_convert_manifest_and_verify_it(
    manifested: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = manifested
    document = check_manifest_file(out)
    assert {INDEX, "config.json", "original/README.txt", *shards_of(out)} <= {
        e["path"] for e in document["files"]
    }
    code, text, err = cli(capsys, "verify", "--manifest", out)
    assert code == 0, err
    assert "OK" in text.splitlines()[0]
    code, data, err = cli_json(capsys, "verify", "--manifest", out)
    assert code == 0, err
    assert set(data) == VERIFY_FIELDS
    assert data["ok"] is True and data["mode"] == "manifest" and data["problems"] == []
    assert data["bytes_compared"] == document["total_size"]


@pytest.mark.parametrize(
    "victim",
    ["shard-first", "fused-target", INDEX, "config.json", "original/README.txt", "extra", "gone"],
)
def test_verify_manifest_names_changed_file(
    manifested: tuple[Path, Path], capsys: pytest.CaptureFixture[str], victim: str
) -> None:
    _, out = manifested
    if victim == "extra":
        name = "notes.txt"
        (out / name).write_text("added later\n")
    elif victim == "gone":
        name = "tokenizer.json"
        (out / name).unlink()
    else:
        aliases = {"shard-first": shards_of(out)[0], "fused-target": fused_target(out, LAYER2)[0]}
        name = aliases.get(victim, victim)
        size = os.stat(out / name).st_size
        flip(out / name, size // 2)
        assert os.stat(out / name).st_size == size  # same size: only the hash can tell
    code, data, err = cli_json(capsys, "verify", "--manifest", out)
    assert code == 1, err
    assert data["ok"] is False
    assert [p["file"] for p in data["problems"]] == [name], data["problems"]
    code, text, _ = cli(capsys, "verify", "--manifest", out)
    assert code == 1
    assert any(name in line for line in text.splitlines()[1:]), text


def test_verify_write_manifest(
    pair: tuple[Path, Path],
    manifested: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    source, out = pair
    assert not (out / MANIFEST).exists()
    code, text, err = cli(capsys, "verify", source, out, "--write-manifest")
    assert code == 0, err
    assert str(out / MANIFEST) in text
    written = check_manifest_file(out)
    # Same input bytes, same output bytes: the same digests as convert --manifest wrote.
    _, other = manifested
    theirs = json.loads((other / MANIFEST).read_text())
    assert [(e["path"], e["sha256"]) for e in written["files"]] == [
        (e["path"], e["sha256"]) for e in theirs["files"]
    ]
    code, _, err = cli(capsys, "verify", "--manifest", out)
    assert code == 0, err
    # With --json, stdout is the JSON report alone.
    (out / MANIFEST).unlink()
    code, data, err = cli_json(capsys, "verify", source, out, "--write-manifest")
    assert code == 0 and data["ok"] is True, err
    check_manifest_file(out)


def test_verify_write_manifest_fingerprint_matches_convert(
    manifested: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = manifested
    fingerprint = json.loads((out / MANIFEST).read_text())["plan_fingerprint"]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / MANIFEST).unlink()
    code, _, err = cli(capsys, "verify", source, copy, "--write-manifest", "-q")
    assert code == 0, err
    assert json.loads((copy / MANIFEST).read_text())["plan_fingerprint"] == fingerprint


def test_verify_write_manifest_not_after_a_mismatch(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = pair
    file, _, _ = corrupt_fused(out, "down_proj", "middle")
    code, text, _ = cli(capsys, "verify", source, out, "--write-manifest")
    assert code == 1
    assert file in text
    assert not (out / MANIFEST).exists()


# --- convert --verify / --report --------------------------------------------------------------


def test_convert_verify(
    make_checkpoint: Make,
    check: Callable[[Path, Path], Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source, out = make_checkpoint(scatter=True, experts=8, shard_size=80_000), tmp_path / "out"
    code, text, err = cli(capsys, "convert", source, out, "--verify", "--no-sync")
    assert code == 0, err
    check(source, out)
    lines = text.splitlines()
    verdicts = [line for line in lines if line.startswith("verify")]
    assert len(verdicts) == 1 and "OK" in verdicts[0] and str(out) in verdicts[0], text
    tensors = sum(len(header_of(out / s)[1]) for s in shards_of(out))
    assert any(re.search(rf"\b{tensors} tensors\b", line) for line in lines[1:]), text


@pytest.fixture
def corrupt_before_verify(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Fault injection: flip the last byte of the output shard holding layer 1's fused tensors
    right after the conversion, before ``--verify`` reads it (the real verify then runs)."""
    real = streamconv.verify.verify_conversion
    flipped: list[tuple[str, int]] = []

    def corrupting(source: Path, target: Path, *args: Any, **kwargs: Any) -> Any:
        shard, _ = fused_target(Path(target), LAYER1)
        at = os.stat(Path(target) / shard).st_size - 1
        flip(Path(target) / shard, at)
        flipped.append((shard, at))
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(streamconv.verify, "verify_conversion", corrupting)
    return flipped


def test_convert_verify_mismatch_exits_1(
    make_checkpoint: Make,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    corrupt_before_verify: list[tuple[str, int]],
) -> None:
    source, out = make_checkpoint(), tmp_path / "out"
    code, text, err = cli(capsys, "convert", source, out, "--verify", "--no-sync", "-q")
    assert code == 1, err
    [(shard, at)] = corrupt_before_verify
    verdicts = [line for line in text.splitlines() if line.startswith("verify")]
    assert len(verdicts) == 1 and "OK" not in verdicts[0], text
    assert any(shard in line and re.search(rf"\b{at}\b", line) for line in text.splitlines())


def test_convert_report_records_failed_verify(
    make_checkpoint: Make,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    corrupt_before_verify: list[tuple[str, int]],
) -> None:
    source, out, path = make_checkpoint(), tmp_path / "out", tmp_path / "R.json"
    code, _, err = cli(
        capsys, "convert", source, out, "--verify", "--report", path, "--no-sync", "-q"
    )
    assert code == 1, err
    assert corrupt_before_verify
    assert json.loads(path.read_text())["ok"] is False


def check_report(report: dict[str, Any], source: Path, out: Path) -> None:
    outputs = shards_of(out)
    spans = [span for s in outputs for span in header_of(out / s)[1].values()]
    groups = expert_groups(tensor_map(source))
    assert report["ok"] is True and report["error"] is None
    assert report["input"] == str(source) and report["output"] == str(out)
    assert report["bytes_written"] == sum(os.stat(out / s).st_size for s in outputs)
    assert report["shards"] == len(outputs)
    assert report["tensors"] == len(spans)
    assert report["total_size"] == sum(span[3] for span in spans)
    assert report["groups"] == len(groups)
    split = [p for p, members in groups.items() if len(set(members.values())) > 1]
    assert report["split_groups"] == len(split)
    assert type(report["peak_rss"]) is int and report["peak_rss"] > 0
    assert isinstance(report["seconds"], float) and report["seconds"] > 0
    assert report["throughput"] == pytest.approx(report["bytes_written"] / report["seconds"])
    assert isinstance(report["warnings"], list)
    assert isinstance(report["workers"], int) and report["workers"] >= 1


def test_convert_report(
    make_checkpoint: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out, path = make_checkpoint(), tmp_path / "out", tmp_path / "R.json"
    code, _, err = cli(
        capsys, "convert", source, out, "--report", path, "--no-sync", "--workers", "3"
    )
    assert code == 0, err
    report = json.loads(path.read_text())
    check_report(report, source, out)
    assert report["workers"] == 3 and report["sync"] is False


@pytest.mark.parametrize("breaker", ["broken-header", "missing-expert", "output-under-a-file"])
def test_failing_convert_still_reports(
    make_checkpoint: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str], breaker: str
) -> None:
    source, out, path = make_checkpoint(), tmp_path / "out", tmp_path / "R.json"
    expected_code = 3
    if breaker == "broken-header":
        needle = break_header(source)
    elif breaker == "missing-expert":
        drop_expert(source)
        needle = LAYER1
    else:
        (tmp_path / "plain").write_text("a file\n")
        out, needle, expected_code = tmp_path / "plain" / "out", "plain", 4
    code, text, err = cli(capsys, "convert", source, out, "--report", path, "-q")
    assert code == expected_code
    line = one_error_line(err, needle)
    assert text == ""
    report = json.loads(path.read_text())
    assert report["ok"] is False
    assert report["error"]["exit_code"] == expected_code
    assert needle in report["error"]["message"]
    assert line.endswith(report["error"]["message"]), (line, report["error"])
    assert type(report["peak_rss"]) is int and report["peak_rss"] > 0
    assert not out.exists() or shards_of(out) == []


def test_subprocess_convert_verify_manifest_report(make_checkpoint: Make, tmp_path: Path) -> None:
    source, out, path = make_checkpoint(), tmp_path / "out", tmp_path / "R.json"
    argv = ["convert", str(source), str(out), "--verify", "--manifest", "--report", str(path)]
    done = subprocess.run(
        [sys.executable, "-m", "streamconv", *argv, "--no-sync"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert any(line.startswith("verify") and "OK" in line for line in done.stdout.splitlines())
    check_report(json.loads(path.read_text()), source, out)
    check_manifest_file(out)
    done = subprocess.run(
        [sys.executable, "-m", "streamconv", "verify", "--manifest", str(out), "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] is True
