"""The writer's durable bookkeeping: the checksum recorded for each shard is the file's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import xxhash

from streamconv.convert import ConvertOptions, convert
from streamconv.synth import SynthSpec, synthesize
from streamconv.writer import WriteOptions

SPEC = SynthSpec(layers=3, experts=4, hidden=64, inter=32, vocab=128, shard_size=48 * 1024)


@pytest.mark.parametrize("backend", ["auto", "copy_file_range", "mmap", "pread"])
@pytest.mark.parametrize("workers", [1, 2])
def test_recorded_checksums_are_those_of_the_published_files(
    tmp_path: Path, backend: str, workers: int
) -> None:
    source = tmp_path / "in"
    synthesize(source, SPEC)
    out = tmp_path / "out"
    options = ConvertOptions(write=WriteOptions(backend=backend, workers=workers, sync=True))
    convert(source, out, options)
    state = json.loads((out / ".streamconv" / "state.json").read_text())
    recorded = {entry[0]: entry[2] for entry in state["published"]}
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(recorded) == shards
    for name in shards:
        assert recorded[name] == xxhash.xxh3_128((out / name).read_bytes()).hexdigest(), name


def test_no_sync_records_no_checksum(tmp_path: Path) -> None:
    source = tmp_path / "in"
    synthesize(source, SPEC)
    out = tmp_path / "out"
    convert(source, out, ConvertOptions(write=WriteOptions(sync=False)))
    state = json.loads((out / ".streamconv" / "state.json").read_text())
    assert state["published"] and all(entry[2] is None for entry in state["published"])
