"""verify_conversion: a good output passes; each kind of corruption is caught and named.

Expected files, tensors and offsets are found independently (``struct`` + ``json`` on the
output's own header and index); the code under test only produces the report.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import orjson
import pytest

from streamconv import verify
from streamconv.convert import ConvertOptions, convert
from streamconv.errors import InvalidInputError
from streamconv.synth import SynthSpec, synthesize
from streamconv.verify import Problem, VerifyReport, render_verify, verify_conversion
from streamconv.writer import WriteOptions

INDEX = "model.safetensors.index.json"
SPEC = SynthSpec(
    layers=4, experts=8, hidden=64, inter=32, vocab=256, dense_layers=1, shard_size=160 * 1024
)
FUSED = "model.layers.1.mlp.experts.gate_up_proj"
PLAIN = "model.layers.0.self_attn.q_proj.weight"
REPORT_FIELDS = {
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


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("verify")
    synthesize(root / "in", SPEC)
    convert(root / "in", root / "out", ConvertOptions(write=WriteOptions(sync=False)))
    return root / "in", root / "out"


@pytest.fixture
def pair(converted: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """The shared input and a private copy of its converted output, free to corrupt."""
    source, output = converted
    shutil.copytree(output, tmp_path / "out")
    return source, tmp_path / "out"


def index_map(out: Path) -> dict[str, str]:
    weight_map: dict[str, str] = json.loads((out / INDEX).read_text())["weight_map"]
    return weight_map


def locate(out: Path, tensor: str) -> tuple[str, int, int]:
    """(shard, absolute start, length) of ``tensor``, from the index and the raw header."""
    shard = index_map(out)[tensor]
    data = (out / shard).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8 : 8 + n])[tensor]["data_offsets"]
    return shard, 8 + n + begin, end - begin


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x5A]))


def shard_names(out: Path) -> list[str]:
    return sorted(set(index_map(out).values()))


def kinds(report: VerifyReport) -> set[tuple[str, str]]:
    return {(p.kind, p.file) for p in report.problems}


def tree_sizes(root: Path, skip: set[str]) -> int:
    return sum(
        p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] not in skip
    )


@pytest.mark.parametrize(
    ("buffer_size", "slice_size"), [(8 * 1024 * 1024, None), (4096, 10_000), (1000, 1)]
)
def test_good_output_verifies(
    converted: tuple[Path, Path],
    buffer_size: int,
    slice_size: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if slice_size is not None:  # many small parallel tasks per file
        monkeypatch.setattr(verify, "SLICE", slice_size)
    source, out = converted
    report = verify_conversion(source, out, workers=2, buffer_size=buffer_size)
    assert report.ok, render_verify(report)
    assert report.problems == ()
    shards = shard_names(out)
    expected_bytes = sum((out / s).stat().st_size for s in shards) + tree_sizes(
        out, {*shards, INDEX, ".streamconv", "streamconv-manifest.json"}
    )
    assert report.bytes_compared == expected_bytes
    assert report.tensors_checked == len(index_map(out))
    data = report.to_dict()
    assert set(data) == REPORT_FIELDS
    assert data["ok"] is True and data["mode"] == "plan" and data["problems"] == []
    assert orjson.loads(orjson.dumps(data)) == data
    assert "OK" in render_verify(report)


def test_flipped_byte_in_fused_tensor(pair: tuple[Path, Path]) -> None:
    source, out = pair
    shard, start, length = locate(out, FUSED)
    at = start + length // 2 + 3
    flip(out / shard, at)
    report = verify_conversion(source, out)
    assert not report.ok
    assert report.problems == (
        Problem("data", shard, report.problems[0].reason, tensor=FUSED, offset=at),
    )
    assert "fused" in report.problems[0].reason
    text = render_verify(report)
    assert FUSED in text and shard in text and str(at) in text
    problem = report.to_dict()["problems"][0]
    assert set(problem) == {"kind", "file", "tensor", "offset", "reason"}
    assert (problem["file"], problem["tensor"], problem["offset"]) == (shard, FUSED, at)


def test_flipped_bytes_in_several_tensors_each_named(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(verify, "SLICE", 5000)
    source, out = pair
    shard, start, length = locate(out, PLAIN)
    flip(out / shard, start)
    flip(out / shard, start + length - 1)  # same tensor: reported once, at the first byte
    fused_shard, fused_start, _ = locate(out, FUSED)
    flip(out / fused_shard, fused_start + 1)
    report = verify_conversion(source, out, buffer_size=4096)
    found = {(p.file, p.tensor, p.offset) for p in report.problems if p.kind == "data"}
    assert found == {(shard, PLAIN, start), (fused_shard, FUSED, fused_start + 1)}
    assert {p.kind for p in report.problems} == {"data"}


def test_flipped_byte_in_plain_tensor(pair: tuple[Path, Path]) -> None:
    source, out = pair
    shard, start, length = locate(out, PLAIN)
    flip(out / shard, start + length - 1)
    report = verify_conversion(source, out)
    assert [(p.kind, p.file, p.tensor, p.offset) for p in report.problems] == [
        ("data", shard, PLAIN, start + length - 1)
    ]


def test_flipped_byte_in_header(pair: tuple[Path, Path]) -> None:
    source, out = pair
    shard = shard_names(out)[0]
    at = 8 + 3  # inside the JSON: the header no longer parses
    flip(out / shard, at)
    report = verify_conversion(source, out)
    headers = [p for p in report.problems if p.kind == "header"]
    assert [(p.file, p.offset) for p in headers] == [(shard, at)]
    assert ("header-invalid", shard) in kinds(report)
    assert ("safe_open", shard) in kinds(report)
    assert all(p.file == shard for p in report.problems)


def test_truncated_shard(pair: tuple[Path, Path]) -> None:
    source, out = pair
    shard = shard_names(out)[-1]
    size = (out / shard).stat().st_size
    os.truncate(out / shard, size - 10)
    report = verify_conversion(source, out)
    sizes = [p for p in report.problems if p.kind == "size"]
    assert [p.file for p in sizes] == [shard]
    assert str(size - 10) in sizes[0].reason and str(size) in sizes[0].reason
    assert ("header-invalid", shard) in kinds(report)
    assert ("safe_open", shard) in kinds(report)
    assert all(p.file == shard for p in report.problems)


def test_missing_shard(pair: tuple[Path, Path]) -> None:
    source, out = pair
    shard = shard_names(out)[1]
    (out / shard).unlink()
    report = verify_conversion(source, out)
    assert kinds(report) == {("missing", shard)}


def test_extra_and_temporary_files(pair: tuple[Path, Path]) -> None:
    source, out = pair
    (out / "notes.txt").write_text("not from the input\n")
    temp = f".{shard_names(out)[0]}.streamconv-partial"
    (out / temp).write_bytes(b"\0" * 16)
    report = verify_conversion(source, out)
    assert kinds(report) == {("extra", "notes.txt"), ("temp", temp)}


def test_run_state_and_manifest_are_allowed(pair: tuple[Path, Path]) -> None:
    source, out = pair
    (out / ".streamconv").mkdir(exist_ok=True)
    (out / ".streamconv" / "state.json").write_text("{}")
    (out / "streamconv-manifest.json").write_text("{}")
    assert verify_conversion(source, out).ok


def test_missing_copied_files(pair: tuple[Path, Path]) -> None:
    source, out = pair
    (out / "original" / "README.txt").unlink()
    (out / "config.json").unlink()
    report = verify_conversion(source, out)
    assert kinds(report) == {("copy", "original/README.txt"), ("missing", "config.json")}


def test_changed_copied_files(pair: tuple[Path, Path]) -> None:
    source, out = pair
    flip(out / "tokenizer.json", 5)
    with open(out / "original" / "README.txt", "ab") as handle:
        handle.write(b"more")
    (out / "original" / "extra.bin").write_bytes(b"x")
    report = verify_conversion(source, out)
    found = {(p.kind, p.file, p.offset) for p in report.problems}
    readme = (source / "original" / "README.txt").stat().st_size
    assert found == {
        ("copy", "tokenizer.json", 5),
        ("copy", "original/README.txt", readme),
        ("copy", "original/extra.bin", None),
    }


def rewrite_index(out: Path, change: Any) -> None:
    document = json.loads((out / INDEX).read_text())
    change(document)
    (out / INDEX).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def test_wrong_index_entry(pair: tuple[Path, Path]) -> None:
    source, out = pair
    shards = shard_names(out)
    right = index_map(out)[PLAIN]
    wrong = next(s for s in shards if s != right)
    rewrite_index(out, lambda d: d["weight_map"].__setitem__(PLAIN, wrong))
    report = verify_conversion(source, out)
    assert [(p.kind, p.file, p.tensor) for p in report.problems] == [("index", INDEX, PLAIN)]
    assert wrong in report.problems[0].reason and right in report.problems[0].reason


def test_index_entry_missing_and_extra(pair: tuple[Path, Path]) -> None:
    source, out = pair

    def change(document: dict[str, Any]) -> None:
        shard = document["weight_map"].pop(FUSED)
        document["weight_map"]["model.ghost.weight"] = shard

    rewrite_index(out, change)
    report = verify_conversion(source, out)
    assert {(p.kind, p.tensor) for p in report.problems} == {
        ("index", FUSED),
        ("index", "model.ghost.weight"),
    }


def test_wrong_total_size(pair: tuple[Path, Path]) -> None:
    source, out = pair
    total = json.loads((out / INDEX).read_text())["metadata"]["total_size"]
    rewrite_index(out, lambda d: d["metadata"].__setitem__("total_size", total + 2))
    report = verify_conversion(source, out)
    assert [(p.kind, p.file, p.tensor) for p in report.problems] == [("index", INDEX, None)]
    assert "total_size" in report.problems[0].reason
    assert str(total) in report.problems[0].reason


def test_index_formatting_change(pair: tuple[Path, Path]) -> None:
    source, out = pair
    document = json.loads((out / INDEX).read_text())
    (out / INDEX).write_text(json.dumps(document))  # same content, other bytes
    report = verify_conversion(source, out)
    assert [(p.kind, p.file, p.offset) for p in report.problems] == [("index", INDEX, 1)]


def test_unreadable_input_raises(tmp_path: Path, converted: tuple[Path, Path]) -> None:
    _, out = converted
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError):
        verify_conversion(tmp_path / "empty", out)


def test_single_file_conversion(tmp_path: Path) -> None:
    spec = SynthSpec(layers=2, experts=4, hidden=32, inter=16, vocab=64, single_file=True)
    synthesize(tmp_path / "in", spec)
    convert(tmp_path / "in", tmp_path / "out", ConvertOptions(write=WriteOptions(sync=False)))
    assert not (tmp_path / "out" / INDEX).exists()
    report = verify_conversion(tmp_path / "in", tmp_path / "out", workers=1)
    assert report.ok, render_verify(report)
    data = (tmp_path / "out" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert report.tensors_checked == len(set(json.loads(data[8 : 8 + n])) - {"__metadata__"})
    (tmp_path / "out" / INDEX).write_text("{}")  # not planned for a single file: an extra
    assert kinds(verify_conversion(tmp_path / "in", tmp_path / "out")) == {("extra", INDEX)}
