"""The output manifest: written atomically with hashlib-checkable sha256s; each mismatch caught.

Expected hashes and file lists are computed here with ``hashlib`` and ``os.walk``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import orjson
import pytest

from streamconv.convert import ConvertOptions, convert
from streamconv.errors import InvalidInputError
from streamconv.manifest import check_manifest, write_manifest
from streamconv.synth import SynthSpec, synthesize
from streamconv.verify import render_verify
from streamconv.writer import WriteOptions

NAME = "streamconv-manifest.json"
SPEC = SynthSpec(
    layers=3, experts=8, hidden=64, inter=32, vocab=128, dense_layers=1, shard_size=100 * 1024
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("manifest")
    synthesize(root / "in", SPEC)
    convert(root / "in", root / "out", ConvertOptions(write=WriteOptions(sync=False)))
    return root / "out"


@pytest.fixture
def out(converted: Path, tmp_path: Path) -> Path:
    shutil.copytree(converted, tmp_path / "out")
    return tmp_path / "out"


def expected_files(root: Path) -> dict[str, tuple[int, str]]:
    found = {}
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            rel = path.relative_to(root).as_posix()
            if rel == NAME or rel.startswith(".streamconv/"):
                continue
            data = path.read_bytes()
            found[rel] = (len(data), hashlib.sha256(data).hexdigest())
    return found


def test_round_trip(out: Path) -> None:
    (out / ".streamconv").mkdir(exist_ok=True)
    (out / ".streamconv" / "state.json").write_text("{}")
    expected = expected_files(out)
    assert "original/README.txt" in expected and "config.json" in expected
    path = write_manifest(out, "fp-123", sync=False)
    assert path == out / NAME
    document = json.loads(path.read_text())
    assert set(document) == {"format", "algorithm", "plan_fingerprint", "total_size", "files"}
    assert (document["format"], document["algorithm"]) == (1, "sha256")
    assert document["plan_fingerprint"] == "fp-123"
    assert {f["path"]: (f["size"], f["sha256"]) for f in document["files"]} == expected
    assert [f["path"] for f in document["files"]] == sorted(expected)
    assert document["total_size"] == sum(size for size, _ in expected.values())
    assert not [n for n in os.listdir(out) if "partial" in n]

    report = check_manifest(out)
    assert report.ok, render_verify(report)
    assert report.files_checked == len(expected)
    assert report.bytes_compared == document["total_size"]
    data = report.to_dict()
    assert data["mode"] == "manifest" and data["input"] is None and data["ok"] is True
    assert orjson.loads(orjson.dumps(data)) == data
    # Run state may change after the manifest was written.
    (out / ".streamconv" / "state.json").write_text('{"changed": true}')
    assert check_manifest(out).ok


def test_rewrite_replaces(out: Path) -> None:
    write_manifest(out, "one", sync=False)
    write_manifest(out, "two", sync=False)
    document = json.loads((out / NAME).read_text())
    assert document["plan_fingerprint"] == "two"
    assert NAME not in {f["path"] for f in document["files"]}


def test_each_mismatch_kind(out: Path) -> None:
    write_manifest(out, "fp", sync=False)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    (out / "config.json").unlink()
    (out / "added.txt").write_text("new")
    with open(out / shards[0], "ab") as handle:
        handle.write(b"\0")
    at = (out / shards[1]).stat().st_size // 2
    with open(out / shards[1], "r+b") as handle:
        handle.seek(at)
        byte = handle.read(1)
        handle.seek(at)
        handle.write(bytes([byte[0] ^ 1]))
    (out / "original" / "README.txt").write_text("Synthetic checkpoint made by someone else\n")
    report = check_manifest(out)
    assert not report.ok
    found = {(p.kind, p.file) for p in report.problems}
    readme = "original/README.txt"
    assert found == {
        ("missing", "config.json"),
        ("extra", "added.txt"),
        ("size", shards[0]),
        ("hash", shards[1]),
        ("size", readme),
    }
    text = render_verify(report)
    assert all(name in text for _, name in found)


def test_same_size_edit_is_a_hash_mismatch(out: Path) -> None:
    write_manifest(out, "fp", sync=False)
    data = bytearray((out / "tokenizer.json").read_bytes())
    data[3] ^= 0x20
    (out / "tokenizer.json").write_bytes(bytes(data))
    report = check_manifest(out)
    assert [(p.kind, p.file) for p in report.problems] == [("hash", "tokenizer.json")]
    assert hashlib.sha256(bytes(data)).hexdigest() in report.problems[0].reason


def test_missing_or_malformed_manifest(out: Path) -> None:
    with pytest.raises(InvalidInputError, match="no manifest"):
        check_manifest(out)
    (out / NAME).write_text("{not json")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        check_manifest(out)
    (out / NAME).write_text(json.dumps({"format": 1, "algorithm": "sha256", "files": []}))
    with pytest.raises(InvalidInputError, match="malformed"):
        check_manifest(out)
    escape = [{"path": "../escape", "size": 1, "sha256": "00"}]
    bad = {"format": 1, "algorithm": "sha256", "plan_fingerprint": "x", "files": escape}
    (out / NAME).write_text(json.dumps(bad))
    with pytest.raises(InvalidInputError, match="malformed"):
        check_manifest(out)
