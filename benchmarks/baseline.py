"""The in-memory baseline: what the tool streamconv replaces does, without torch.

Plain on purpose, and sharing no code with streamconv. For every input shard, in sorted name
order: read the whole file, deserialize every tensor into memory, rename keys, fuse the expert
groups that lie entirely in this shard (numpy concatenate of gate/up per expert along dim 0,
then stack over experts), and save the output shard with safetensors under the input shard's
name. Expert groups split across shards are left unfused in pass 1 and merged in a SECOND pass
that re-reads and rewrites every involved output shard (the group goes to the first of its
shards in sorted name order). Then the index is written and the other files are copied.

numpy has no bfloat16 (``safetensors.numpy.load_file`` and ``safe_open(..., "numpy")`` refuse
BF16), so tensors are read with ``safetensors.deserialize`` (raw bytes per tensor), viewed as
unsigned integers of the same width, and written back with ``safetensors.serialize_file`` (what
``safetensors.numpy.save_file`` calls) with TensorSpecs carrying the real dtype name.

Unlike the tool it imitates, it keeps each shard's ``__metadata__`` and writes files with the
umask's permissions, so its output can be compared byte for byte with streamconv's.

Usage: python benchmarks/baseline.py INPUT_DIR OUTPUT_DIR
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import safetensors

INDEX = "model.safetensors.index.json"
EXPERT = re.compile(r"^(.*\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
RENAMES = (
    ("mlp.router.gate.", "mlp.gate."),
    ("mlp.expert_bias", "mlp.e_score_correction_bias"),
    ("mlp.shared_mlp.", "mlp.shared_experts."),
)
# safetensors dtype -> (name TensorSpec wants, raw numpy type of the same width)
DTYPES: dict[str, tuple[str, Any]] = {
    "BOOL": ("bool", np.uint8),
    "U8": ("uint8", np.uint8),
    "I8": ("int8", np.uint8),
    "F8_E5M2": ("float8_e5m2", np.uint8),
    "F8_E4M3": ("float8_e4m3fn", np.uint8),
    "F8_E8M0": ("float8_e8m0fnu", np.uint8),
    "I16": ("int16", np.uint16),
    "U16": ("uint16", np.uint16),
    "F16": ("float16", np.uint16),
    "BF16": ("bfloat16", np.uint16),
    "I32": ("int32", np.uint32),
    "U32": ("uint32", np.uint32),
    "F32": ("float32", np.uint32),
    "I64": ("int64", np.uint64),
    "U64": ("uint64", np.uint64),
    "F64": ("float64", np.uint64),
    "C64": ("complex64", np.uint64),
}

Tensor = tuple[str, np.ndarray]  # (safetensors dtype, raw array of the tensor's shape)


def rename(key: str) -> str:
    """The first rule whose text occurs in the key is applied; no later rule is tried."""
    for source, target in RENAMES:
        if source in key:
            return key.replace(source, target)
    return key


def load(path: Path) -> tuple[dict[str, Tensor], dict[str, str] | None]:
    """Every tensor of one file, in memory, and the file's ``__metadata__``."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + n]).get("__metadata__")
    tensors: dict[str, Tensor] = {}
    for name, info in safetensors.deserialize(data):
        dtype = info["dtype"]
        array = np.frombuffer(info["data"], dtype=DTYPES[dtype][1]).reshape(info["shape"])
        tensors[name] = (dtype, array)
    del data
    return tensors, metadata


def save(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None) -> None:
    specs = {
        name: safetensors.TensorSpec(
            dtype=DTYPES[dtype][0],
            shape=list(array.shape),
            data_ptr=array.ctypes.data,
            data_len=array.nbytes,
        )
        for name, (dtype, array) in tensors.items()
    }
    safetensors.serialize_file(specs, str(path), metadata=metadata)


def fuse(prefix: str, members: dict[tuple[int, str], Tensor]) -> dict[str, Tensor]:
    """gate_up_proj = stack_e(concat(gate_e, up_e)); down_proj = stack_e(down_e)."""
    experts = max(e for e, _ in members) + 1
    dtype = members[(0, "gate_proj")][0]
    gate_up = np.stack(
        [
            np.concatenate([members[(e, "gate_proj")][1], members[(e, "up_proj")][1]], axis=0)
            for e in range(experts)
        ]
    )
    down = np.stack([members[(e, "down_proj")][1] for e in range(experts)])
    return {prefix + "gate_up_proj": (dtype, gate_up), prefix + "down_proj": (dtype, down)}


def shard_map(root: Path) -> tuple[dict[str, str], dict[str, Any] | None]:
    """{key: shard} from the index, or from the headers of all shards when there is none."""
    index = root / INDEX
    if index.exists():
        document = json.loads(index.read_text())
        return document["weight_map"], document.get("metadata")
    weight_map: dict[str, str] = {}
    for path in sorted(root.glob("*.safetensors")):
        with path.open("rb") as handle:
            (n,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(n))
        weight_map.update({key: path.name for key in header if key != "__metadata__"})
    return weight_map, None


def convert(source: Path, target: Path) -> None:
    weight_map, index_metadata = shard_map(source)
    shards = sorted(set(weight_map.values()))
    group_shards: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        match = EXPERT.match(key)
        if match:
            group_shards.setdefault(match.group(1), set()).add(shard)
    split = {prefix: sorted(s) for prefix, s in group_shards.items() if len(s) > 1}
    target.mkdir(parents=True, exist_ok=True)

    # Pass 1: one shard at a time, all of it in memory.
    metadata_of: dict[str, dict[str, str] | None] = {}
    for shard in shards:
        tensors, metadata = load(source / shard)
        metadata_of[shard] = metadata
        out: dict[str, Tensor] = {}
        groups: dict[str, dict[tuple[int, str], Tensor]] = {}
        for name, tensor in tensors.items():
            match = EXPERT.match(name)
            if match is None:
                out[rename(name)] = tensor
            elif match.group(1) in split:
                out[name] = tensor  # pending: merged in pass 2
            else:
                groups.setdefault(match.group(1), {})[(int(match.group(2)), match.group(3))] = (
                    tensor
                )
        for prefix, members in groups.items():
            out.update(fuse(prefix, members))
        save(target / shard, out, metadata)
        del tensors, out, groups

    # Pass 2: re-read and rewrite every output shard involved in a split group. Walking them in
    # reverse name order means a group's target (its first shard) comes after all its members.
    involved = sorted({s for shards_of in split.values() for s in shards_of}, reverse=True)
    pending: dict[str, dict[tuple[int, str], Tensor]] = {}
    for shard in involved:
        tensors, metadata = load(target / shard)
        kept: dict[str, Tensor] = {}
        for name, tensor in tensors.items():
            match = EXPERT.match(name)
            if match is not None and match.group(1) in split:
                key = (int(match.group(2)), match.group(3))
                pending.setdefault(match.group(1), {})[key] = tensor
            else:
                kept[name] = tensor
        for prefix in [p for p, s in split.items() if s[0] == shard]:
            kept.update(fuse(prefix, pending.pop(prefix)))
        save(target / shard, kept, metadata)
        del tensors, kept

    # The index, from the output headers, as transformers writes it.
    out_map: dict[str, str] = {}
    total = 0
    for shard in shards:
        with (target / shard).open("rb") as handle:
            (n,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(n))
        for key, info in header.items():
            if key != "__metadata__":
                out_map[key] = shard
                total += info["data_offsets"][1] - info["data_offsets"][0]
    if (source / INDEX).exists() or len(shards) > 1:
        document = {
            "metadata": {**(index_metadata or {}), "total_size": total},
            "weight_map": out_map,
        }
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"
        (target / INDEX).write_text(text, encoding="utf-8")

    # Everything else (config, tokenizer, subfolders) unchanged.
    for entry in sorted(source.iterdir()):
        if entry.name in shards or entry.name == INDEX:
            continue
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name)
        else:
            shutil.copyfile(entry, target / entry.name)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: baseline.py INPUT_DIR OUTPUT_DIR", file=sys.stderr)
        return 2
    convert(Path(argv[0]), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
