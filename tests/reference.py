"""An independent reference conversion: safetensors' own loader + numpy, everything in memory.

It shares no code with streamconv: it knows the HYV3 rules as written in the issue, loads every
tensor with ``safetensors.numpy`` (BF16 and other dtypes numpy lacks are read as raw unsigned
integers of the same width), and builds the expected outer-layout tensors with numpy.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import safetensors

EXPERT = re.compile(
    r"(.*\.mlp\.experts\.)([0-9]+)\.(gate_proj|up_proj|down_proj)\.weight", re.DOTALL
)
RENAMES = [
    ("mlp.router.gate.", "mlp.gate."),
    ("mlp.expert_bias", "mlp.e_score_correction_bias"),
    ("mlp.shared_mlp.", "mlp.shared_experts."),
]
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
#: Bits per element of every dtype of the format (safetensors' Dtype enum), from its spec.
FORMAT_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
#: The dtype names safetensors.TensorSpec accepts (torch spelling) and their format names.
TORCH_TO_FORMAT: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "complex64": "C64",
    "float64": "F64",
    "int64": "I64",
    "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e8m0fnu": "F8_E8M0",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float4_e2m1fn_x2": "F4",
}
#: Format name -> the name safetensors.TensorSpec takes, for the dtypes stored whole-byte.
TORCH_NAMES = {fmt: torch for torch, fmt in TORCH_TO_FORMAT.items() if fmt != "F4"}
#: Bytes per element of the whole-byte dtypes.
_WIDTH = {name: bits // 8 for name, bits in FORMAT_BITS.items() if bits % 8 == 0}


def rename(key: str) -> str:
    for source, target in RENAMES:
        if source in key:
            return key.replace(source, target)
    return key


def load_raw(path: Path) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, str] | None]:
    """Every tensor of a file as (dtype, raw unsigned array of its shape), via safetensors."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + n]).get("__metadata__")
    out = {}
    for name, info in safetensors.deserialize(data):
        dtype = info["dtype"]
        array = np.frombuffer(bytes(info["data"]), dtype=_RAW[_WIDTH[dtype]])
        out[name] = (dtype, array.reshape(info["shape"]))
    return out, metadata


def shard_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [root / n for n in names]
    if (root / "model.safetensors").exists():
        return [root / "model.safetensors"]
    return sorted(root.glob("*.safetensors"))


def reference_convert(root: Path) -> dict[str, dict[str, tuple[str, np.ndarray]]]:
    """The expected output: {shard name: {tensor name: (dtype, raw array)}}."""
    files = shard_files(root)
    out: dict[str, dict[str, tuple[str, np.ndarray]]] = {f.name: {} for f in files}
    groups: dict[str, dict[tuple[int, str], tuple[str, np.ndarray, str]]] = {}
    for path in files:
        tensors, _ = load_raw(path)
        for name, (dtype, array) in tensors.items():
            match = EXPERT.fullmatch(name)
            if match:
                prefix, index, part = match.group(1), int(match.group(2)), match.group(3)
                groups.setdefault(prefix, {})[(index, part)] = (dtype, array, path.name)
            else:
                out[path.name][rename(name)] = (dtype, array)
    for prefix, members in groups.items():
        experts = max(i for i, _ in members) + 1
        target = sorted({m[2] for m in members.values()})[0]
        dtype = members[(0, "gate_proj")][0]
        gate_up = np.stack(
            [
                np.concatenate([members[(e, "gate_proj")][1], members[(e, "up_proj")][1]], axis=0)
                for e in range(experts)
            ]
        )
        down = np.stack([members[(e, "down_proj")][1] for e in range(experts)])
        out[target][prefix + "gate_up_proj"] = (dtype, gate_up)
        out[target][prefix + "down_proj"] = (dtype, down)
    return out


def serialize_raw(
    tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str] | None
) -> bytes:
    """What ``safetensors.serialize`` writes for ``{name: (dtype, raw array)}`` (any dtype)."""
    arrays = {name: np.ascontiguousarray(array) for name, (_, array) in tensors.items()}
    specs = {
        name: safetensors.TensorSpec(
            dtype=TORCH_NAMES[dtype],
            shape=list(arrays[name].shape),
            data_ptr=arrays[name].ctypes.data,
            data_len=arrays[name].nbytes,
        )
        for name, (dtype, _) in tensors.items()
    }
    return safetensors.serialize(specs, metadata=metadata)
