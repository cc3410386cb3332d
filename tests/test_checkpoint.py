"""The checkpoint layer on tiny real files written with safetensors into ``tmp_path``.

Expected records come from parsing the files here with ``struct`` and ``json``; expected index
bytes from ``json.dumps``.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from streamconv.checkpoint import Checkpoint, check_shard_name, encode_index, load_checkpoint
from streamconv.errors import CheckpointError, InvalidInputError

INDEX = "model.safetensors.index.json"
A = "model-00001-of-00002.safetensors"
B = "model-00002-of-00002.safetensors"

Arrays = dict[str, "np.ndarray[Any, Any]"]

TENSORS_A: Arrays = {
    "model.embed_tokens.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
    "model.norm.weight": np.ones(4, dtype=np.float16),
}
TENSORS_B: Arrays = {
    "lm_head.weight": np.arange(6, dtype=np.int64).reshape(2, 3),
    "model.layers.0.mlp.expert_bias": np.zeros((), dtype=np.float32),
    "empty": np.zeros((0, 5), dtype=np.uint8),
}


def save(path: Path, tensors: Arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})


def write_index(root: Path, weight_map: dict[str, Any], metadata: Any = None) -> Path:
    document: dict[str, Any] = {"weight_map": weight_map}
    if metadata is not None:
        document["metadata"] = metadata
    path = root / INDEX
    path.write_text(json.dumps(document))
    return path


def two_shards(root: Path, *, index: bool = True) -> dict[str, str]:
    save(root / A, TENSORS_A)
    save(root / B, TENSORS_B)
    weight_map = {k: A for k in TENSORS_A} | {k: B for k in TENSORS_B}
    if index:
        write_index(root, weight_map, {"total_size": 1, "extra": "kept"})
    return weight_map


def expected_records(path: Path, name: str | None = None) -> list[tuple[Any, ...]]:
    """(name, dtype, shape, file, absolute offset, length) of every tensor, in data order."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    rows = [
        (
            key,
            entry["dtype"],
            tuple(entry["shape"]),
            name or path.name,
            8 + n + entry["data_offsets"][0],
            entry["data_offsets"][1] - entry["data_offsets"][0],
        )
        for key, entry in header.items()
    ]
    return sorted(rows, key=lambda row: (row[4], row[5]))


def actual_records(checkpoint: Checkpoint, file: str) -> list[tuple[Any, ...]]:
    (shard,) = [s for s in checkpoint.shards if s.file == file]
    return [(r.name, r.dtype, r.shape, r.file, r.offset, r.length) for r in shard.tensors]


def load_error(root: Path, **kwargs: Any) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        load_with_timeout(root, **kwargs)
    return info.value


def load_with_timeout(
    root: Path, *, fifos: Sequence[Path] = (), timeout: float = 10.0, **kwargs: Any
) -> Checkpoint:
    """load_checkpoint in a thread, so that blocking on a FIFO fails the test, not the run."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = load_checkpoint(root, **kwargs)
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in fifos:  # release a reader stuck in open(): it then sees end of file
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"load_checkpoint did not return within {timeout} s (blocked on a FIFO?)")
    if "error" in outcome:
        raise outcome["error"]
    checkpoint: Checkpoint = outcome["value"]
    return checkpoint


# --- layouts -----------------------------------------------------------------------------------


def test_index_layout(tmp_path: Path) -> None:
    two_shards(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.txt").write_text("x")
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.layout == "index"
    assert checkpoint.root == tmp_path
    assert [s.file for s in checkpoint.shards] == [A, B]
    for name in (A, B):
        assert actual_records(checkpoint, name) == expected_records(tmp_path / name)
    assert [s.file_size for s in checkpoint.shards] == [
        (tmp_path / A).stat().st_size,
        (tmp_path / B).stat().st_size,
    ]
    assert [s.metadata_dict() for s in checkpoint.shards] == [{"format": "pt"}] * 2
    assert [(s.name, s.size) for s in checkpoint.sources] == [
        (A, (tmp_path / A).stat().st_size),
        (B, (tmp_path / B).stat().st_size),
    ]
    assert checkpoint.index_metadata is not None
    assert dict(checkpoint.index_metadata) == {"total_size": 1, "extra": "kept"}
    assert checkpoint.others == ("config.json", "sub", "tokenizer.json")
    assert checkpoint.total_bytes == sum(a.nbytes for a in (TENSORS_A | TENSORS_B).values())
    assert sorted(r.name for r in checkpoint.tensors()) == sorted(TENSORS_A | TENSORS_B)


def test_index_layout_with_an_unlisted_shard_leaves_it_in_others(tmp_path: Path) -> None:
    two_shards(tmp_path)
    save(tmp_path / "extra.safetensors", {"z": np.zeros(1, np.uint8)})
    checkpoint = load_checkpoint(tmp_path)
    assert [s.file for s in checkpoint.shards] == [A, B]
    assert checkpoint.others == ("extra.safetensors",)


def test_single_file_layout(tmp_path: Path) -> None:
    save(tmp_path / "model.safetensors", TENSORS_A)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "assets").mkdir()
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.layout == "single"
    assert [s.file for s in checkpoint.shards] == ["model.safetensors"]
    assert actual_records(checkpoint, "model.safetensors") == expected_records(
        tmp_path / "model.safetensors"
    )
    assert checkpoint.index_metadata is None
    assert checkpoint.others == ("assets", "config.json")


def test_several_shards_without_index(tmp_path: Path) -> None:
    two_shards(tmp_path, index=False)
    (tmp_path / "README.md").write_text("hi")
    (tmp_path / "nested").mkdir()
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.layout == "shards"
    assert [s.file for s in checkpoint.shards] == [A, B]
    for name in (A, B):
        assert actual_records(checkpoint, name) == expected_records(tmp_path / name)
    assert checkpoint.index_metadata is None
    assert checkpoint.others == ("README.md", "nested")


def test_directory_without_any_shard(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    error = load_error(tmp_path)
    assert str(tmp_path) in str(error)
    assert ".safetensors" in str(error)


def test_root_that_is_not_a_directory(tmp_path: Path) -> None:
    save(tmp_path / "model.safetensors", TENSORS_A)
    error = load_error(tmp_path / "model.safetensors")
    assert "not a directory" in str(error)


def test_corrupt_shard_is_refused_naming_it(tmp_path: Path) -> None:
    two_shards(tmp_path)
    data = (tmp_path / B).read_bytes()
    (tmp_path / B).write_bytes(data[:-1])
    with pytest.raises(InvalidInputError) as info:
        load_checkpoint(tmp_path)
    assert B in str(info.value)


# --- index problems ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("ABSOLUTE", "plain file name"),
        ("sub/x.safetensors", "plain file name"),
        ("../outside.safetensors", "plain file name"),
        ("a..b.safetensors", ".."),
        ("sub\\x.safetensors", "plain file name"),
        ("model.bin", "does not end in .safetensors"),
        ("model.safetensors.bak", "does not end in .safetensors"),
    ],
)
def test_index_with_a_bad_shard_name(tmp_path: Path, name: str, words: str) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    if name == "ABSOLUTE":
        target = tmp_path / "abs.safetensors"
        save(target, TENSORS_A)
        name = str(target)
    else:
        save(root / name, TENSORS_A)  # the file exists: refused by its name, not as missing
    write_index(root, dict.fromkeys(TENSORS_A, name))
    error = load_error(root)
    assert len(error.problems) == 1
    assert repr(name) in error.problems[0]
    assert words in error.problems[0]
    assert INDEX in str(error)


def test_index_with_a_non_string_shard_name(tmp_path: Path) -> None:
    save(tmp_path / A, TENSORS_A)
    write_index(tmp_path, {"model.norm.weight": 3, "model.embed_tokens.weight": A})
    error = load_error(tmp_path)
    assert "model.norm.weight" in str(error)
    assert "3" in str(error)


def test_listed_shard_missing(tmp_path: Path) -> None:
    save(tmp_path / A, TENSORS_A)
    write_index(tmp_path, {k: A for k in TENSORS_A} | {k: B for k in TENSORS_B})
    error = load_error(tmp_path)
    assert len(error.problems) == 1
    assert B in error.problems[0] and "missing" in error.problems[0]


def test_key_in_index_but_in_no_shard(tmp_path: Path) -> None:
    weight_map = two_shards(tmp_path)
    write_index(tmp_path, weight_map | {"ghost.weight": A})
    error = load_error(tmp_path)
    assert len(error.problems) == 1
    assert "ghost.weight" in error.problems[0] and A in error.problems[0]


def test_tensor_in_shard_but_not_in_index(tmp_path: Path) -> None:
    weight_map = two_shards(tmp_path)
    del weight_map["lm_head.weight"]
    write_index(tmp_path, weight_map)
    error = load_error(tmp_path)
    assert len(error.problems) == 1
    assert "lm_head.weight" in error.problems[0] and B in error.problems[0]


def test_key_in_the_wrong_shard(tmp_path: Path) -> None:
    weight_map = two_shards(tmp_path)
    weight_map["model.norm.weight"] = B
    write_index(tmp_path, weight_map)
    error = load_error(tmp_path)
    assert len(error.problems) == 1
    problem = error.problems[0]
    assert "model.norm.weight" in problem and A in problem and B in problem


def test_tensor_in_two_shards_with_index(tmp_path: Path) -> None:
    save(tmp_path / A, TENSORS_A)
    save(tmp_path / B, {**TENSORS_B, "model.norm.weight": np.ones(4, np.float16)})
    write_index(tmp_path, {k: A for k in TENSORS_A} | {k: B for k in TENSORS_B})
    error = load_error(tmp_path)
    assert any("model.norm.weight" in p and A in p and B in p for p in error.problems)


def test_tensor_in_two_shards_without_index(tmp_path: Path) -> None:
    save(tmp_path / A, TENSORS_A)
    save(tmp_path / B, {**TENSORS_B, "model.norm.weight": np.ones(4, np.float16)})
    error = load_error(tmp_path)
    assert len(error.problems) == 1
    assert "model.norm.weight" in error.problems[0]
    assert A in error.problems[0] and B in error.problems[0]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"weight_map": {}, "weight_map": {}}', "duplicate"),
        ('{"weight_map": {"x": "a.safetensors", "x": "a.safetensors"}}', "duplicate"),
        ('{"metadata": {"total_size": 1}}', "weight_map"),
        ('{"weight_map": ["a.safetensors"]}', "weight_map"),
        ('{"weight_map": null}', "weight_map"),
        ('{"weight_map": {"x": null}}', "None"),
        ('{"weight_map": {"x": 7}}', "7"),
        ('{"weight_map": {"x": ["a.safetensors"]}}', "a.safetensors"),
        ('{"weight_map": {"x": "a.safetensors"}, "metadata": 5}', "metadata"),
        (b'{"weight_map": {"\xff": "a.safetensors"}}', "UTF-8"),
    ],
)
def test_malformed_index(tmp_path: Path, text: str | bytes, words: str) -> None:
    save(tmp_path / "a.safetensors", {"x": np.zeros(1, np.uint8)})
    (tmp_path / INDEX).write_bytes(text if isinstance(text, bytes) else text.encode())
    error = load_error(tmp_path)
    assert INDEX in str(error)
    assert words in str(error)


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    weight_map = two_shards(tmp_path)
    weight_map["ghost"] = A  # in the index, in no shard
    del weight_map["lm_head.weight"]  # in a shard, not in the index
    weight_map["model.norm.weight"] = B  # in the wrong shard
    write_index(tmp_path, weight_map)
    error = load_error(tmp_path)
    assert len(error.problems) == 3, error.problems
    assert any("ghost" in p for p in error.problems)
    assert any("lm_head.weight" in p for p in error.problems)
    assert any("model.norm.weight" in p for p in error.problems)
    assert "3 problems" in str(error)


def test_several_bad_shard_names_are_reported_together(tmp_path: Path) -> None:
    save(tmp_path / A, TENSORS_A)
    write_index(tmp_path, {"x": "/etc/passwd", "y": "w.bin", "z": "d/e.safetensors", "q": A})
    error = load_error(tmp_path)
    assert len(error.problems) == 3, error.problems
    for name in ("/etc/passwd", "w.bin", "d/e.safetensors"):
        assert any(name in p for p in error.problems)


def test_several_unreadable_shards_are_reported_together(tmp_path: Path) -> None:
    save(tmp_path / "a.safetensors", TENSORS_A)
    (tmp_path / "b.safetensors").symlink_to("nowhere.bin")
    (tmp_path / "c.safetensors").mkdir()
    error = load_error(tmp_path)
    assert len(error.problems) == 2, error.problems
    assert any("b.safetensors" in p for p in error.problems)
    assert any("c.safetensors" in p for p in error.problems)


# --- symbolic links and special files ----------------------------------------------------------


def test_link_to_a_file_inside_the_directory(tmp_path: Path) -> None:
    save(tmp_path / "store" / "real-a.bin", TENSORS_A)
    (tmp_path / A).symlink_to(Path("store") / "real-a.bin")
    save(tmp_path / B, TENSORS_B)
    # A chain of links that stays inside is fine too.
    (tmp_path / "store" / "hop").symlink_to("real-a.bin")
    checkpoint = load_checkpoint(tmp_path)
    assert actual_records(checkpoint, A) == expected_records(tmp_path / "store" / "real-a.bin", A)
    assert checkpoint.others == ("store",)


def test_hugging_face_cache_layout(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--name"
    root = repo / "snapshots" / "0123abcd"
    root.mkdir(parents=True)
    blobs = repo / "blobs"
    save(blobs / "aaaa1111", TENSORS_A)
    save(blobs / "bbbb2222", TENSORS_B)
    weight_map = {k: A for k in TENSORS_A} | {k: B for k in TENSORS_B}
    (blobs / "cccc3333").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (blobs / "dddd4444").write_text("{}")
    (root / A).symlink_to("../../blobs/aaaa1111")
    (root / B).symlink_to("../../blobs/bbbb2222")
    (root / INDEX).symlink_to("../../blobs/cccc3333")
    (root / "config.json").symlink_to("../../blobs/dddd4444")
    checkpoint = load_checkpoint(root)
    assert checkpoint.layout == "index"
    assert [s.file for s in checkpoint.shards] == [A, B]
    assert actual_records(checkpoint, A) == expected_records(blobs / "aaaa1111", A)
    assert actual_records(checkpoint, B) == expected_records(blobs / "bbbb2222", B)
    assert checkpoint.others == ("config.json",)


def test_hugging_face_cache_link_into_another_repo_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "models--org--name" / "snapshots" / "rev"
    root.mkdir(parents=True)
    other = tmp_path / "models--evil--repo" / "blobs" / "ffff"
    save(other, TENSORS_A)
    (root / "model.safetensors").symlink_to("../../../models--evil--repo/blobs/ffff")
    error = load_error(root)
    assert "model.safetensors" in str(error) and "outside" in str(error)


def test_link_to_a_file_elsewhere(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere" / "weights.bin"
    save(elsewhere, TENSORS_A)
    (root / "model.safetensors").symlink_to(elsewhere)
    error = load_error(root)
    assert len(error.problems) == 1
    assert "model.safetensors" in error.problems[0] and "outside" in error.problems[0]
    checkpoint = load_checkpoint(root, allow_external_links=True)
    assert actual_records(checkpoint, "model.safetensors") == expected_records(
        elsewhere, "model.safetensors"
    )


def test_link_chain_that_leaves_the_directory_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere.bin"
    save(elsewhere, TENSORS_A)
    (root / "hop").symlink_to(elsewhere)
    (root / "model.safetensors").symlink_to("hop")
    error = load_error(root)
    assert "model.safetensors" in str(error) and "outside" in str(error)


def test_dangling_link_is_reported(tmp_path: Path) -> None:
    save(tmp_path / A, TENSORS_A)
    (tmp_path / B).symlink_to("blob-that-is-gone")
    error = load_error(tmp_path)
    assert B in str(error)
    assert "dangling" in str(error)


@pytest.mark.parametrize("layout", ["index", "shards", "single"])
def test_fifo_is_refused_without_hanging(tmp_path: Path, layout: str) -> None:
    name = "model.safetensors" if layout == "single" else "x.safetensors"
    fifo = tmp_path / name
    os.mkfifo(fifo)
    if layout != "single":
        save(tmp_path / "a.safetensors", TENSORS_A)
    if layout == "index":
        write_index(tmp_path, dict.fromkeys(TENSORS_A, "a.safetensors") | {"w": name})
    with pytest.raises(CheckpointError) as info:
        load_with_timeout(tmp_path, fifos=[fifo])
    assert name in str(info.value)
    assert "not a regular file" in str(info.value)


def test_fifo_index_is_refused_without_hanging(tmp_path: Path) -> None:
    save(tmp_path / "a.safetensors", TENSORS_A)
    fifo = tmp_path / INDEX
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError) as info:
        load_with_timeout(tmp_path, fifos=[fifo], timeout=2.0)
    assert INDEX in str(info.value)


def test_directory_named_like_the_index_is_refused(tmp_path: Path) -> None:
    save(tmp_path / "a.safetensors", TENSORS_A)
    (tmp_path / INDEX).mkdir()
    error = load_error(tmp_path)
    assert INDEX in str(error)


@pytest.mark.parametrize("layout", ["index", "shards"])
def test_directory_named_like_a_shard_is_refused(tmp_path: Path, layout: str) -> None:
    save(tmp_path / "a.safetensors", TENSORS_A)
    (tmp_path / "x.safetensors").mkdir()
    if layout == "index":
        write_index(tmp_path, dict.fromkeys(TENSORS_A, "a.safetensors") | {"w": "x.safetensors"})
    error = load_error(tmp_path)
    assert "x.safetensors" in str(error)
    assert "not a regular file" in str(error)


# --- index encoding and shard names ------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight_map", "total", "metadata"),
    [
        ({}, 0, None),
        ({"b.weight": "m-2.safetensors", "a.weight": "m-1.safetensors"}, 123, None),
        ({"z": "m.safetensors", "é.ü": "m.safetensors"}, 2**40, {"format": "pt", "total_size": 9}),
        ({"k": "m.safetensors"}, 5, {"nested": {"b": [1, 2], "a": None}}),
    ],
)
def test_encode_index_matches_json_dumps(
    weight_map: dict[str, str], total: int, metadata: dict[str, Any] | None
) -> None:
    document = {"metadata": {**(metadata or {}), "total_size": total}, "weight_map": weight_map}
    expected = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")
    assert encode_index(weight_map, total, metadata) == expected


@pytest.mark.parametrize(
    "name",
    [
        "model.safetensors",
        "model-00001-of-00004.safetensors",
        "with space.safetensors",
        "ünïcode.safetensors",
    ],
)
def test_check_shard_name_accepts(name: str) -> None:
    assert check_shard_name(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "",
        None,
        3,
        b"model.safetensors",
        "/model.safetensors",
        "/abs/dir/model.safetensors",
        "sub/model.safetensors",
        "sub\\model.safetensors",
        "../model.safetensors",
        "..",
        "a..b.safetensors",
        "nul\x00.safetensors",
        "model.bin",
        "model.SAFETENSORS",
        "model.safetensors.index.json",
        "model.safetensors ",
    ],
)
def test_check_shard_name_refuses(name: object) -> None:
    reason = check_shard_name(name)
    assert isinstance(reason, str)
    assert repr(name) in reason
