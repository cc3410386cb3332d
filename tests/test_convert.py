"""End-to-end conversions of small synthetic checkpoints, checked byte for byte.

Expectations come from ``reference.py`` (safetensors' loader + numpy) through the ``check``
fixture, from safetensors' own serializer and from ``json``; never from streamconv itself.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streamconv.convert import ConvertOptions, ConvertResult, convert
from streamconv.writer import WriteOptions

INDEX = "model.safetensors.index.json"
EXPERT = re.compile(r"^(.*\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

Check = Callable[[Path, Path], Any]
Make = Callable[..., Path]
Snapshot = Callable[[Path], dict[str, bytes]]


def run(
    input_dir: Path, output_dir: Path, backend: str = "auto", workers: int = 2, sync: bool = False
) -> ConvertResult:
    options = ConvertOptions(write=WriteOptions(backend=backend, workers=workers, sync=sync))
    return convert(input_dir, output_dir, options)


def expert_shards(root: Path) -> dict[str, dict[int, str]]:
    """{group prefix: {expert number: shard}} read straight from the input index."""
    weight_map = json.loads((root / INDEX).read_text())["weight_map"]
    groups: dict[str, dict[int, str]] = {}
    for key, shard in weight_map.items():
        match = EXPERT.match(key)
        if match:
            groups.setdefault(match.group(1), {})[int(match.group(2))] = shard
    return groups


def shard_number(name: str) -> int:
    return int(name.split("-")[1])


# --- layouts -------------------------------------------------------------------------------


def test_groups_straddling_shards(make_checkpoint: Make, check: Check, tmp_path: Path) -> None:
    source = make_checkpoint(experts=8, shard_size=40_000)
    groups = expert_shards(source)
    assert groups and all(len(set(g.values())) > 1 for g in groups.values()), "no straddle"
    run(source, tmp_path / "out")
    check(source, tmp_path / "out")


def test_experts_scattered_over_non_adjacent_shards(
    make_checkpoint: Make, check: Check, tmp_path: Path
) -> None:
    source = make_checkpoint(experts=8, scatter=True, shard_size=80_000)
    groups = expert_shards(source)
    # Precondition: consecutive experts live in shards that are not next to each other.
    assert any(
        abs(shard_number(g[e]) - shard_number(g[e + 1])) > 1
        for g in groups.values()
        for e in range(len(g) - 1)
    )
    run(source, tmp_path / "out", workers=3)
    check(source, tmp_path / "out")


def test_dense_first_layers(make_checkpoint: Make, check: Check, tmp_path: Path) -> None:
    source = make_checkpoint(layers=4, dense_layers=2)
    weight_map = json.loads((source / INDEX).read_text())["weight_map"]
    assert "model.layers.1.mlp.gate_proj.weight" in weight_map
    assert not any(k.startswith("model.layers.1.mlp.experts.") for k in weight_map)
    run(source, tmp_path / "out")
    expected = check(source, tmp_path / "out")
    names = {n for tensors in expected.values() for n in tensors}
    assert "model.layers.0.mlp.down_proj.weight" in names
    assert "model.layers.2.mlp.experts.gate_up_proj" in names


def test_f32_biases_among_bf16_weights(make_checkpoint: Make, check: Check, tmp_path: Path) -> None:
    source = make_checkpoint(single_file=True)
    run(source, tmp_path / "out")
    expected = check(source, tmp_path / "out")
    tensors = expected["model.safetensors"]
    assert tensors["model.layers.1.mlp.e_score_correction_bias"][0] == "F32"
    assert tensors["model.layers.1.mlp.experts.gate_up_proj"][0] == "BF16"


@pytest.mark.parametrize("dtype", ["F16", "F32"])
def test_numpy_dtypes_load_through_safe_open(
    make_checkpoint: Make, check: Check, tmp_path: Path, dtype: str
) -> None:
    source = make_checkpoint(dtype=dtype, experts=4)
    run(source, tmp_path / "out")
    check(source, tmp_path / "out")  # also compares every get_tensor() with the reference


def test_single_file_writes_no_index(make_checkpoint: Make, check: Check, tmp_path: Path) -> None:
    source = make_checkpoint(single_file=True)
    assert not (source / INDEX).exists()
    run(source, tmp_path / "out")
    check(source, tmp_path / "out")
    assert not (tmp_path / "out" / INDEX).exists()
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]


def test_one_shard_with_index_keeps_an_index(
    make_checkpoint: Make, check: Check, tmp_path: Path
) -> None:
    source = make_checkpoint(shard_size=1 << 30)
    assert set(json.loads((source / INDEX).read_text())["weight_map"].values()) == {
        "model-00001-of-00001.safetensors"
    }
    run(source, tmp_path / "out")
    check(source, tmp_path / "out")
    assert (tmp_path / "out" / INDEX).exists()


def test_several_shards_without_index_get_one(
    make_checkpoint: Make, check: Check, tmp_path: Path
) -> None:
    source = make_checkpoint(index=False)
    assert not (source / INDEX).exists()
    assert len(list(source.glob("*.safetensors"))) > 1
    run(source, tmp_path / "out")
    check(source, tmp_path / "out")
    assert (tmp_path / "out" / INDEX).exists()


def test_stale_total_size_in_input_index_is_recomputed(
    make_checkpoint: Make, check: Check, tmp_path: Path
) -> None:
    source = make_checkpoint()
    document = json.loads((source / INDEX).read_text())
    document["metadata"]["total_size"] = 1
    (source / INDEX).write_text(json.dumps(document))
    run(source, tmp_path / "out")
    check(source, tmp_path / "out")  # expects total_size = the sum of the reference's tensors
    total = json.loads((tmp_path / "out" / INDEX).read_text())["metadata"]["total_size"]
    assert total > 1


def _as_hf_cache(source: Path, cache: Path) -> Path:
    """Move ``source`` into an HF-cache-like tree: every file a relative link into blobs/."""
    blobs = cache / "blobs"
    snapshot = cache / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_dir():
            (snapshot / rel).mkdir(parents=True)
            continue
        blob = blobs / f"blob{len(list(blobs.iterdir()))}"
        shutil.copyfile(path, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_symlinked_shards_hf_cache(
    make_checkpoint: Make, check: Check, snapshot: Snapshot, tmp_path: Path
) -> None:
    snap = _as_hf_cache(make_checkpoint(), tmp_path / "cache")
    shards = sorted(snap.glob("*.safetensors"))
    assert len(shards) > 1 and all(p.is_symlink() for p in shards)
    before = snapshot(tmp_path / "cache" / "blobs")
    run(snap, tmp_path / "out")
    check(snap, tmp_path / "out")  # also asserts no output file is a link
    assert snapshot(tmp_path / "cache" / "blobs") == before
    assert all(p.is_symlink() for p in shards)


# --- backends, workers, sync -----------------------------------------------------------------


WRITE_CASES = [
    (backend, workers, sync)
    for backend in ("auto", "copy_file_range", "mmap", "pread")
    for workers in (1, 3)
    for sync in (True, False)
]


@pytest.mark.parametrize(
    "case", WRITE_CASES, ids=[f"{b}-w{w}-{'sync' if s else 'nosync'}" for b, w, s in WRITE_CASES]
)
def test_every_backend(
    make_checkpoint: Make,
    check: Check,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: tuple[str, int, bool],
) -> None:
    backend, workers, sync = case
    source = make_checkpoint(experts=8, scatter=True, shard_size=80_000)
    out = tmp_path / "out"
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    result = run(source, out, backend=backend, workers=workers, sync=sync)
    monkeypatch.undo()
    expected = check(source, out)
    known = {"copy_file_range", "mmap", "pread"}
    if backend == "auto":
        assert result.backends and set(result.backends) <= known
    else:  # input and output share one filesystem (tmp_path), so nothing is refused
        assert result.backends == (backend,)
    if sync:
        assert str(out.resolve()) in synced, "output directory never fsynced"
        for shard in expected:
            assert any(shard in Path(p).name for p in synced), f"{shard} never fsynced"
    else:
        assert synced == []


@pytest.mark.parametrize("backend", ["copy_file_range", "auto"])
def test_copy_file_range_refused_falls_back_to_pread(
    make_checkpoint: Make,
    check: Check,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
) -> None:
    source = make_checkpoint(experts=8, shard_size=40_000)
    calls: list[int] = []

    def refuse(*args: object, **kwargs: object) -> int:
        calls.append(1)
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    result = run(source, tmp_path / "out", backend=backend, workers=2)
    monkeypatch.undo()
    assert calls, "copy_file_range was never tried"
    assert result.backends == ("pread",)
    check(source, tmp_path / "out")


# --- properties of the output --------------------------------------------------------------


def test_extra_files_and_folders_copied_unchanged(
    make_checkpoint: Make, check: Check, tmp_path: Path
) -> None:
    source = make_checkpoint()
    nested = source / "original" / "deeper"
    nested.mkdir()
    (nested / "params.bin").write_bytes(bytes(range(256)) * 3)
    (source / "notes.md").write_text("unchanged\n")
    (source / "empty.txt").write_bytes(b"")
    run(source, tmp_path / "out")
    check(source, tmp_path / "out")  # compares every other file's bytes
    out = tmp_path / "out"
    assert (out / "original" / "deeper" / "params.bin").read_bytes() == bytes(range(256)) * 3
    assert (out / "original" / "README.txt").read_bytes() == (
        source / "original" / "README.txt"
    ).read_bytes()
    assert (out / "config.json").read_bytes() == (source / "config.json").read_bytes()
    assert (out / "empty.txt").read_bytes() == b""


@pytest.mark.parametrize("mask", [0o022, 0o027])
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "nosync"])
def test_output_permissions_follow_umask(
    make_checkpoint: Make,
    tmp_path: Path,
    umask: Callable[[int], None],
    mask: int,
    sync: bool,
) -> None:
    source = make_checkpoint()
    umask(mask)
    run(source, tmp_path / "out", sync=sync)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and (tmp_path / "out" / INDEX).exists()
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


def test_deterministic_across_runs_backends_and_workers(
    make_checkpoint: Make, snapshot: Snapshot, tmp_path: Path
) -> None:
    source = make_checkpoint(experts=8, scatter=True, shard_size=80_000)
    run(source, tmp_path / "a", backend="pread", workers=1)
    run(source, tmp_path / "b", backend="copy_file_range", workers=3)
    run(source, tmp_path / "c", backend="mmap", workers=2, sync=True)
    first = snapshot(tmp_path / "a")
    assert first and snapshot(tmp_path / "b") == first
    assert snapshot(tmp_path / "c") == first


@pytest.mark.parametrize("backend", ["copy_file_range", "mmap", "pread"])
def test_inputs_unchanged(
    make_checkpoint: Make, snapshot: Snapshot, tmp_path: Path, backend: str
) -> None:
    source = make_checkpoint(experts=8, scatter=True, shard_size=80_000)
    before = snapshot(source)
    stats = {p: (p.stat().st_mtime_ns, p.stat().st_mode) for p in source.rglob("*")}
    run(source, tmp_path / "out", backend=backend)
    assert snapshot(source) == before
    assert {p: (p.stat().st_mtime_ns, p.stat().st_mode) for p in source.rglob("*")} == stats


def test_no_temp_files_left(make_checkpoint: Make, tmp_path: Path) -> None:
    source = make_checkpoint()
    run(source, tmp_path / "out", workers=3)
    names = [p.name for p in (tmp_path / "out").rglob("*")]
    assert "config.json" in names
    assert not [n for n in names if "partial" in n or n.endswith(".tmp")]
    visible = [p for p in (tmp_path / "out").iterdir() if p.name != ".streamconv"]
    assert not [p.name for p in visible if p.name.startswith(".")]
    assert sorted(os.listdir(tmp_path)) == ["in0", "out"]
