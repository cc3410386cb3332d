"""Synthetic HYV3 checkpoints in the inner (training) layout, for the demo, tests and benchmarks.

Deterministic (same spec, same bytes) and streamed: tensor data is generated in bounded chunks,
never a whole shard in memory. Every 8-byte word of every tensor differs from its neighbours and
from other tensors', so any misplaced byte range shows in a comparison.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from . import dtypes
from .checkpoint import INDEX_NAME, SINGLE_NAME, encode_index
from .header import TensorSpec, encode_header

CHUNK_WORDS = 512 * 1024  # 4 MiB of data per generated chunk
_GOLDEN = 0x9E3779B97F4A7C15


@dataclass(frozen=True, slots=True)
class SynthSpec:
    layers: int = 8
    experts: int = 32
    hidden: int = 512
    inter: int = 256
    vocab: int = 1024
    dense_layers: int = 1  # the first layers use a dense MLP instead of experts
    dtype: str = "BF16"
    shard_size: int = 64 * 1024 * 1024
    scatter: bool = False  # spread each layer's experts round-robin over all shards
    single_file: bool = False
    index: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("layers", "experts", "hidden", "inter", "vocab", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 <= self.dense_layers <= self.layers:
            raise ValueError("dense_layers must be between 0 and layers")
        if not dtypes.is_dtype(self.dtype) or dtypes.bits(self.dtype) % 8:
            raise ValueError(f"dtype must be a whole-byte safetensors dtype, not {self.dtype!r}")


def tensor_specs(spec: SynthSpec) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in a training-layout order (layer by layer)."""
    h, i, dt = spec.hidden, spec.inter, spec.dtype
    kv = max(1, h // 4)
    out = [TensorSpec("model.embed_tokens.weight", dt, (spec.vocab, h))]
    for layer in range(spec.layers):
        p = f"model.layers.{layer}."
        out += [
            TensorSpec(p + "input_layernorm.weight", dt, (h,)),
            TensorSpec(p + "self_attn.q_proj.weight", dt, (h, h)),
            TensorSpec(p + "self_attn.k_proj.weight", dt, (kv, h)),
            TensorSpec(p + "self_attn.v_proj.weight", dt, (kv, h)),
            TensorSpec(p + "self_attn.o_proj.weight", dt, (h, h)),
            TensorSpec(p + "post_attention_layernorm.weight", dt, (h,)),
        ]
        if layer < spec.dense_layers:
            out += [
                TensorSpec(p + "mlp.gate_proj.weight", dt, (2 * i, h)),
                TensorSpec(p + "mlp.up_proj.weight", dt, (2 * i, h)),
                TensorSpec(p + "mlp.down_proj.weight", dt, (h, 2 * i)),
            ]
            continue
        out += [
            TensorSpec(p + "mlp.router.gate.weight", dt, (spec.experts, h)),
            TensorSpec(p + "mlp.expert_bias", "F32", (spec.experts,)),
            TensorSpec(p + "mlp.shared_mlp.gate_proj.weight", dt, (i, h)),
            TensorSpec(p + "mlp.shared_mlp.up_proj.weight", dt, (i, h)),
            TensorSpec(p + "mlp.shared_mlp.down_proj.weight", dt, (h, i)),
        ]
        for e in range(spec.experts):
            q = f"{p}mlp.experts.{e}."
            out += [
                TensorSpec(q + "gate_proj.weight", dt, (i, h)),
                TensorSpec(q + "up_proj.weight", dt, (i, h)),
                TensorSpec(q + "down_proj.weight", dt, (h, i)),
            ]
    out += [
        TensorSpec("model.norm.weight", dt, (h,)),
        TensorSpec("lm_head.weight", dt, (spec.vocab, h)),
    ]
    return out


def _size(t: TensorSpec) -> int:
    return dtypes.nbytes(t.dtype, t.shape)


def _expert_number(name: str) -> int | None:
    marker = ".mlp.experts."
    if marker not in name:
        return None
    return int(name.split(marker, 1)[1].split(".", 1)[0])


def assign_shards(spec: SynthSpec) -> list[list[TensorSpec]]:
    """Pack tensors into shards of about ``shard_size`` bytes, in order (or scattered)."""
    tensors = tensor_specs(spec)
    if spec.single_file:
        return [tensors]
    shards: list[list[TensorSpec]] = [[]]
    filled = 0
    for t in tensors:
        if filled and filled + _size(t) > spec.shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(t)
        filled += _size(t)
    if spec.scatter and len(shards) > 1:
        # Keep the non-expert tensors where they are; deal each expert to shard e mod n.
        count = len(shards)
        base = [[t for t in shard if _expert_number(t.name) is None] for shard in shards]
        for t in tensors:
            e = _expert_number(t.name)
            if e is not None:
                base[(e * 7) % count].append(t)
        shards = [s for s in base if s]
    return shards


def shard_names(count: int, single: bool) -> list[str]:
    if single:
        return [SINGLE_NAME]
    return [f"model-{n:05d}-of-{count:05d}.safetensors" for n in range(1, count + 1)]


def _chunks(name: str, size: int, seed: int) -> Iterator[bytes]:
    """Deterministic pseudo-random bytes of tensor ``name``, in chunks of at most 4 MiB."""
    import numpy as np  # noqa: PLC0415  (only the generator needs numpy; conversion does not)

    salt = np.uint64(((zlib.crc32(name.encode()) << 32) ^ (seed * 0x632BE5AB)) & (2**64 - 1))
    words = -(-size // 8)
    done = 0
    position = 0
    while position < words:
        count = min(CHUNK_WORDS, words - position)
        x = np.arange(position, position + count, dtype=np.uint64)
        x = (x + salt) * np.uint64(_GOLDEN)
        x ^= x >> np.uint64(29)
        data = x.tobytes()[: size - done]
        done += len(data)
        position += count
        yield data


def write_shard(path: Path, tensors: list[TensorSpec], seed: int) -> int:
    """Write one safetensors file with generated data; returns its size."""
    header, layout = encode_header(tensors, {"format": "pt"})
    with open(path, "wb") as handle:
        handle.write(header)
        for t, begin, end in layout:
            for chunk in _chunks(t.name, end - begin, seed):
                handle.write(chunk)
        return handle.tell()


def _extra_files(out: Path, spec: SynthSpec) -> None:
    config = {
        "architectures": ["HYV3ForCausalLM"],
        "model_type": "hyv3",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.inter,
        "num_hidden_layers": spec.layers,
        "num_experts": spec.experts,
        "first_k_dense_replace": spec.dense_layers,
        "vocab_size": spec.vocab,
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2) + b"\n")
    (out / "generation_config.json").write_text('{\n  "do_sample": false\n}\n')
    vocab = {f"tok{n}": n for n in range(min(spec.vocab, 64))}
    (out / "tokenizer.json").write_bytes(orjson.dumps({"model": {"vocab": vocab}}) + b"\n")
    (out / "tokenizer_config.json").write_text('{\n  "model_max_length": 4096\n}\n')
    sub = out / "original"
    sub.mkdir(exist_ok=True)
    (sub / "README.txt").write_text("Synthetic checkpoint made by streamconv synth.\n")


def synthesize(out_dir: str | Path, spec: SynthSpec | None = None) -> list[Path]:
    """Write a synthetic inner-layout checkpoint into ``out_dir``; returns the shard paths."""
    spec = spec or SynthSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = assign_shards(spec)
    names = shard_names(len(shards), spec.single_file)
    paths = []
    weight_map: dict[str, str] = {}
    total = 0
    for name, tensors in zip(names, shards, strict=True):
        paths.append(out / name)
        write_shard(out / name, tensors, spec.seed)
        for t in tensors:
            weight_map[t.name] = name
            total += _size(t)
    if spec.index and not spec.single_file:
        (out / INDEX_NAME).write_bytes(encode_index(weight_map, total))
    _extra_files(out, spec)
    return paths


def parse_size(text: str) -> int:
    """``"64M"`` -> 67108864; accepts K, M, G, T (powers of 1024) and plain byte counts."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    factor = 1
    if text and text[-1] in units:
        factor = units[text[-1]]
        text = text[:-1]
    value = float(text)
    if value <= 0:
        raise ValueError("size must be positive")
    return int(value * factor)


def checkpoint_bytes(spec: SynthSpec) -> int:
    return sum(_size(t) for t in tensor_specs(spec))
