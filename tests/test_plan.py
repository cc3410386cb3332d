"""The pure planner on fake header records: no files are read or written here.

Expectations are derived independently: byte sizes from a dtype table written here, pieces from
the fake records, headers from ``safetensors.serialize`` and the index from ``json.dumps``.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Sequence
from math import prod

import numpy as np
import orjson
import pytest
import safetensors

from streamconv.errors import PlanError
from streamconv.header import FileHeader, TensorRecord, TensorSpec, encode_header
from streamconv.plan import Plan, PlannedFile, build_plan
from streamconv.rules import HYV3, FusedOutput, Fusion, Rename, RuleSet

Shape = tuple[int, ...]
Spec = tuple[str, str, Shape]  # (name, dtype, shape)
PieceT = tuple[str, int, int, str]  # (file, offset, length, tensor)

PT: tuple[tuple[str, str], ...] = (("format", "pt"),)

# Bits per element, written out here (not taken from streamconv.dtypes).
BITS = {
    "BOOL": 8,
    "F4": 4,
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
# The dtype names safetensors.TensorSpec takes (torch spellings); F6_* has none in 0.8.0.
TORCH = {
    "BOOL": "bool",
    "F4": "float4_e2m1fn_x2",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
}


def nbytes(dtype: str, shape: Iterable[int]) -> int:
    total = prod(shape) * BITS[dtype]
    assert total % 8 == 0
    return total // 8


def fake_shard(
    file: str,
    specs: Sequence[Spec],
    *,
    metadata: tuple[tuple[str, str], ...] | None = PT,
    header_size: int = 1016,
) -> FileHeader:
    """A FileHeader as the header layer would give it, laid out in the order of ``specs``."""
    offset = 8 + header_size
    records = []
    for name, dtype, shape in specs:
        length = nbytes(dtype, shape)
        records.append(TensorRecord(name, dtype, tuple(shape), file, offset, length))
        offset += length
    return FileHeader(
        file=file,
        file_size=offset,
        header_size=header_size,
        metadata=metadata,
        tensors=tuple(records),
    )


def expert_specs(
    prefix: str,
    experts: Iterable[int],
    *,
    hidden: int = 8,
    gate: int = 4,
    up: int = 4,
    inter: int = 4,
    dtype: str = "BF16",
    parts: Sequence[str] = ("gate_proj", "up_proj", "down_proj"),
) -> list[Spec]:
    shapes = {"gate_proj": (gate, hidden), "up_proj": (up, hidden), "down_proj": (hidden, inter)}
    return [(f"{prefix}{e}.{part}.weight", dtype, shapes[part]) for e in experts for part in parts]


def records(shards: Sequence[FileHeader]) -> dict[str, TensorRecord]:
    return {r.name: r for s in shards for r in s.tensors}


def piece_of(record: TensorRecord) -> PieceT:
    return (record.file, record.offset, record.length, record.name)


def fused_expectation(
    shards: Sequence[FileHeader], prefix: str, experts: int
) -> dict[str, tuple[str, Shape, list[PieceT]]]:
    """The two HYV3 fused tensors of ``prefix``, built from the fake records by hand."""
    rec = records(shards)
    gate0 = rec[f"{prefix}0.gate_proj.weight"]
    up0 = rec[f"{prefix}0.up_proj.weight"]
    down0 = rec[f"{prefix}0.down_proj.weight"]
    gate_up_pieces = []
    for e in range(experts):
        gate_up_pieces.append(piece_of(rec[f"{prefix}{e}.gate_proj.weight"]))
        gate_up_pieces.append(piece_of(rec[f"{prefix}{e}.up_proj.weight"]))
    down_pieces = [piece_of(rec[f"{prefix}{e}.down_proj.weight"]) for e in range(experts)]
    return {
        prefix + "gate_up_proj": (
            gate0.dtype,
            (experts, gate0.shape[0] + up0.shape[0], *gate0.shape[1:]),
            gate_up_pieces,
        ),
        prefix + "down_proj": (down0.dtype, (experts, *down0.shape), down_pieces),
    }


def kept(
    shards: Sequence[FileHeader], name: str, new: str | None = None
) -> dict[str, tuple[str, Shape, list[PieceT]]]:
    record = records(shards)[name]
    return {new or name: (record.dtype, record.shape, [piece_of(record)])}


def serialized(specs: Sequence[Spec], metadata: dict[str, str] | None) -> bytes:
    """What safetensors' own serializer writes for these tensors (zero-filled data)."""
    buffers = []
    tensors = {}
    for name, dtype, shape in specs:
        size = nbytes(dtype, shape)
        buffer = np.zeros(max(size, 1), dtype=np.uint8)
        buffers.append(buffer)
        storage = list(shape)
        if dtype == "F4":  # TensorSpec takes the packed storage shape of F4 (2 per byte)
            storage[-1] //= 2
        tensors[name] = safetensors.TensorSpec(
            dtype=TORCH[dtype], shape=storage, data_ptr=buffer.ctypes.data, data_len=size
        )
    out = bytes(safetensors.serialize(tensors, metadata=metadata))
    del buffers
    return out


def header_of(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    return data[: 8 + n]


def check_file(
    planned: PlannedFile,
    expected: dict[str, tuple[str, Shape, list[PieceT]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Names, dtypes, shapes, pieces, header bytes (twice) and layout of one output file."""
    if metadata is None:
        metadata = dict(PT)
    assert sorted(t.name for t in planned.tensors) == sorted(expected)
    for tensor in planned.tensors:
        dtype, shape, pieces = expected[tensor.name]
        assert tensor.dtype == dtype, tensor.name
        assert tuple(tensor.shape) == tuple(shape), tensor.name
        assert [(p.source, p.offset, p.length, p.tensor) for p in tensor.pieces] == pieces
        assert tensor.length == nbytes(dtype, shape) == sum(p[2] for p in pieces)
    specs = [(name, dtype, shape) for name, (dtype, shape, _) in expected.items()]
    ours = encode_header([TensorSpec(n, d, s) for n, d, s in specs], metadata)[0]
    assert planned.header == ours
    data = serialized(specs, metadata)
    theirs = header_of(data)
    if len(metadata) <= 1:
        assert planned.header == theirs
    else:
        # safetensors writes the keys of __metadata__ in hash-map order (it varies from run to
        # run), so with several keys only the rest can be compared byte for byte.
        assert len(planned.header) == len(theirs)
        ours_items = json.loads(planned.header[8:], object_pairs_hook=list)
        theirs_items = json.loads(theirs[8:], object_pairs_hook=list)
        assert ours_items[0][0] == theirs_items[0][0] == "__metadata__"
        assert sorted(ours_items[0][1]) == sorted(theirs_items[0][1])
        assert ours_items[1:] == theirs_items[1:]
    assert planned.size == len(data)
    # Contiguous data, in the order (and at the offsets) the library's header gives.
    document = json.loads(theirs[8:])
    assert document.get("__metadata__") == metadata
    position = len(planned.header)
    for tensor in planned.tensors:
        assert tensor.offset == position, tensor.name
        assert document[tensor.name]["data_offsets"][0] + len(theirs) == tensor.offset
        position += tensor.length
    assert planned.size == position


def file_of(plan: Plan, name: str) -> PlannedFile:
    (found,) = [f for f in plan.files if f.name == name]
    return found


def plan_problems(shards: Sequence[FileHeader], rules: RuleSet = HYV3) -> tuple[str, ...]:
    with pytest.raises(PlanError) as info:
        build_plan(shards, rules)
    assert info.value.problems
    return info.value.problems


L0 = "model.layers.0.mlp.experts."
L1 = "model.layers.1.mlp.experts."
L2 = "model.layers.2.mlp.experts."


# --- renames -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("model.layers.0.mlp.router.gate.weight", "model.layers.0.mlp.gate.weight"),
        ("model.layers.0.mlp.expert_bias", "model.layers.0.mlp.e_score_correction_bias"),
        (
            "model.layers.0.mlp.shared_mlp.down_proj.weight",
            "model.layers.0.mlp.shared_experts.down_proj.weight",
        ),
        # Two rules' sources in one key: only the first rule (in rule order) is applied.
        ("m.mlp.shared_mlp.mlp.router.gate.weight", "m.mlp.shared_mlp.mlp.gate.weight"),
        ("m.mlp.shared_mlp.mlp.expert_bias", "m.mlp.shared_mlp.mlp.e_score_correction_bias"),
        ("m.mlp.expert_bias.mlp.router.gate.x", "m.mlp.expert_bias.mlp.gate.x"),
        # Every occurrence of the applied rule's text is replaced.
        ("a.mlp.router.gate.b.mlp.router.gate.weight", "a.mlp.gate.b.mlp.gate.weight"),
        ("a.mlp.shared_mlp.b.mlp.shared_mlp.w", "a.mlp.shared_experts.b.mlp.shared_experts.w"),
        # Plain text, not words: the source may be followed by anything.
        ("x.mlp.expert_bias_extra", "x.mlp.e_score_correction_bias_extra"),
        # No match: untouched.
        ("model.layers.0.mlp.router.gate_weight", "model.layers.0.mlp.router.gate_weight"),
        ("model.embed_tokens.weight", "model.embed_tokens.weight"),
        (
            "model.layers.0.mlp.experts.0.gate_proj.bias",
            "model.layers.0.mlp.experts.0.gate_proj.bias",
        ),
    ],
)
def test_hyv3_rename(key: str, expected: str) -> None:
    shards = [fake_shard("model.safetensors", [(key, "BF16", (2, 3)), ("other", "F32", (5,))])]
    plan = build_plan(shards, HYV3)
    (planned,) = plan.files
    check_file(planned, {**kept(shards, key, expected), **kept(shards, "other")})
    assert all(not t.fused for t in planned.tensors)


def test_rename_rule_order_matters() -> None:
    first_b = RuleSet("t", renames=(Rename("b.", "X."), Rename("a.", "Y.")))
    first_a = RuleSet("t", renames=(Rename("a.", "Y."), Rename("b.", "X.")))
    shards = [fake_shard("m.safetensors", [("a.b.c", "U8", (1,))])]
    assert [t.name for t in build_plan(shards, first_b).files[0].tensors] == ["a.X.c"]
    assert [t.name for t in build_plan(shards, first_a).files[0].tensors] == ["Y.b.c"]


# --- fusion ------------------------------------------------------------------------------------


def test_fused_shapes_and_piece_order() -> None:
    specs: list[Spec] = [
        ("model.embed_tokens.weight", "BF16", (16, 8)),
        ("model.layers.0.mlp.router.gate.weight", "BF16", (3, 8)),
        ("model.layers.0.mlp.expert_bias", "F32", (3,)),
        *expert_specs(L0, range(3), hidden=8, gate=4, up=4, inter=6),
    ]
    shards = [fake_shard("model.safetensors", specs)]
    plan = build_plan(shards, HYV3)
    (planned,) = plan.files
    expected = {
        **kept(shards, "model.embed_tokens.weight"),
        **kept(shards, "model.layers.0.mlp.router.gate.weight", "model.layers.0.mlp.gate.weight"),
        **kept(
            shards,
            "model.layers.0.mlp.expert_bias",
            "model.layers.0.mlp.e_score_correction_bias",
        ),
        **fused_expectation(shards, L0, 3),
    }
    check_file(planned, expected)
    by_name = {t.name: t for t in planned.tensors}
    assert by_name[L0 + "gate_up_proj"].shape == (3, 8, 8)  # [E, Ig+Iu, H]
    assert by_name[L0 + "down_proj"].shape == (3, 8, 6)  # [E, H, I]
    assert by_name[L0 + "gate_up_proj"].fused and by_name[L0 + "down_proj"].fused
    # gate_0, up_0, gate_1, up_1, ... spelled out.
    assert [p.tensor for p in by_name[L0 + "gate_up_proj"].pieces] == [
        f"{L0}{e}.{part}.weight" for e in range(3) for part in ("gate_proj", "up_proj")
    ]
    assert [p.tensor for p in by_name[L0 + "down_proj"].pieces] == [
        f"{L0}{e}.down_proj.weight" for e in range(3)
    ]
    (group,) = plan.groups
    assert (group.prefix, group.experts, group.target) == (L0, 3, "model.safetensors")
    assert set(group.outputs) == {L0 + "gate_up_proj", L0 + "down_proj"}


def test_experts_listed_out_of_order_are_stacked_by_index() -> None:
    specs = expert_specs(L0, [2, 0, 11, 1, *range(3, 11)])
    shards = [fake_shard("model.safetensors", list(reversed(specs)))]
    plan = build_plan(shards, HYV3)
    check_file(plan.files[0], fused_expectation(shards, L0, 12))


def test_gate_and_up_sizes_may_differ() -> None:
    shards = [fake_shard("model.safetensors", expert_specs(L0, range(2), gate=2, up=6, hidden=4))]
    plan = build_plan(shards, HYV3)
    check_file(plan.files[0], fused_expectation(shards, L0, 2))
    shapes = {t.name: t.shape for t in plan.files[0].tensors}
    assert shapes[L0 + "gate_up_proj"] == (2, 8, 4)


def test_every_dtype_in_one_file_matches_the_serializer() -> None:
    # Names run against the dtype order, so a wrong sort shows; shapes include 0-d and empty.
    shapes: list[Shape] = [(3,), (2, 2), (), (0,), (1, 1, 2), (5,), (0, 3)]
    specs: list[Spec] = [
        (f"t{len(BITS) - i:02d}_{dtype.lower()}", dtype, shapes[i % len(shapes)])
        for i, dtype in enumerate(sorted(BITS))
        if dtype != "F4"
    ]
    specs.append(("t99_f4", "F4", (3, 2)))
    specs += expert_specs(L0, range(2), dtype="F16")
    shards = [fake_shard("model.safetensors", specs)]
    plan = build_plan(shards, HYV3)
    expected: dict[str, tuple[str, Shape, list[PieceT]]] = {}
    for name, _, _ in specs[: len(BITS)]:
        expected.update(kept(shards, name))
    expected.update(fused_expectation(shards, L0, 2))
    check_file(plan.files[0], expected)


def test_empty_metadata_object_is_kept() -> None:
    shards = [fake_shard("m.safetensors", [("x", "F32", (2,))], metadata=())]
    plan = build_plan(shards, HYV3)
    check_file(plan.files[0], kept(shards, "x"), {})
    assert plan.files[0].header == header_of(serialized([("x", "F32", (2,))], {}))


def test_metadata_of_each_shard_is_kept() -> None:
    shards = [
        fake_shard("a.safetensors", [("x", "F32", (2,))], metadata=(("format", "pt"), ("k", "v"))),
        fake_shard("b.safetensors", [("y", "F32", (2,))], metadata=None),
        fake_shard("c.safetensors", [("z", "F32", (2,))], metadata=(("format", "np"),)),
    ]
    plan = build_plan(shards, HYV3)
    check_file(file_of(plan, "a.safetensors"), kept(shards, "x"), {"format": "pt", "k": "v"})
    planned_b = file_of(plan, "b.safetensors")
    assert planned_b.header == header_of(serialized([("y", "F32", (2,))], None))
    assert "__metadata__" not in json.loads(planned_b.header[8:])
    check_file(file_of(plan, "c.safetensors"), kept(shards, "z"), {"format": "np"})


# --- placement ---------------------------------------------------------------------------------


def test_non_expert_tensors_stay_in_their_shard_and_group_goes_to_its_shard() -> None:
    a = fake_shard(
        "model-00001-of-00002.safetensors",
        [("model.embed_tokens.weight", "BF16", (4, 8)), *expert_specs(L0, range(2))],
    )
    b = fake_shard(
        "model-00002-of-00002.safetensors",
        [("model.layers.1.mlp.router.gate.weight", "BF16", (3, 8)), *expert_specs(L1, range(3))],
    )
    plan = build_plan([b, a], HYV3)
    assert [f.name for f in plan.files] == [a.file, b.file]
    check_file(
        file_of(plan, a.file),
        {**kept([a], "model.embed_tokens.weight"), **fused_expectation([a], L0, 2)},
    )
    check_file(
        file_of(plan, b.file),
        {
            **kept([b], "model.layers.1.mlp.router.gate.weight", "model.layers.1.mlp.gate.weight"),
            **fused_expectation([b], L1, 3),
        },
    )
    assert [(g.prefix, g.sources, g.target, g.split) for g in plan.groups] == [
        (L0, (a.file,), a.file, False),
        (L1, (b.file,), b.file, False),
    ]


def test_group_spanning_shards_goes_to_the_first_in_sorted_order() -> None:
    # Expert 0 lives in the later file; the group still goes to the earlier-named file.
    late = fake_shard(
        "model-00002-of-00002.safetensors", [*expert_specs(L0, [0, 1]), ("n", "F32", (1,))]
    )
    early = fake_shard(
        "model-00001-of-00002.safetensors", [("e", "F32", (1,)), *expert_specs(L0, [2])]
    )
    plan = build_plan([late, early], HYV3)
    both = [late, early]
    check_file(file_of(plan, early.file), {**kept(both, "e"), **fused_expectation(both, L0, 3)})
    check_file(file_of(plan, late.file), kept(both, "n"))
    (group,) = plan.groups
    assert group.sources == (early.file, late.file)
    assert group.target == early.file
    assert group.split
    sources = {p.source for t in file_of(plan, early.file).tensors for p in t.pieces if t.fused}
    assert sources == {early.file, late.file}


def test_experts_scattered_over_non_adjacent_shards() -> None:
    names = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    s1 = fake_shard(names[0], [("model.embed_tokens.weight", "BF16", (4, 8))])
    s2 = fake_shard(names[1], [*expert_specs(L0, [3, 1]), ("model.norm.weight", "BF16", (8,))])
    s3 = fake_shard(names[2], [("lm_head.weight", "BF16", (4, 8))])
    s4 = fake_shard(names[3], [*expert_specs(L0, [0, 2, 4]), ("z", "F32", (1,))])
    shards = [s4, s2, s3, s1]
    plan = build_plan(shards, HYV3)
    assert [f.name for f in plan.files] == names
    check_file(file_of(plan, names[0]), kept(shards, "model.embed_tokens.weight"))
    check_file(
        file_of(plan, names[1]),
        {**kept(shards, "model.norm.weight"), **fused_expectation(shards, L0, 5)},
    )
    check_file(file_of(plan, names[2]), kept(shards, "lm_head.weight"))
    check_file(file_of(plan, names[3]), kept(shards, "z"))
    (group,) = plan.groups
    assert group.sources == (names[1], names[3])
    assert group.target == names[1]


def test_a_shard_emptied_of_all_its_tensors_is_still_written() -> None:
    a = fake_shard("a.safetensors", expert_specs(L0, [0]))
    b = fake_shard("b.safetensors", expert_specs(L0, [1]))
    plan = build_plan([b, a], HYV3)
    assert [f.name for f in plan.files] == ["a.safetensors", "b.safetensors"]
    check_file(file_of(plan, "a.safetensors"), fused_expectation([a, b], L0, 2))
    empty = file_of(plan, "b.safetensors")
    assert empty.tensors == ()
    expected = serialized([], {"format": "pt"})
    assert empty.header == expected
    assert empty.size == len(expected)
    check_file(empty, {})


def test_output_file_set_equals_input_shard_names() -> None:
    names = ["b.safetensors", "a.safetensors", "zz.safetensors", "m-1.safetensors"]
    shards = [fake_shard(n, [(f"t.{n}", "U8", (3,))]) for n in names]
    plan = build_plan(shards, HYV3)
    assert [f.name for f in plan.files] == sorted(names)
    assert plan.tensor_count == len(names)
    assert plan.total_size == 3 * len(names)
    assert plan.total_bytes == sum(f.size for f in plan.files)


# --- problems ----------------------------------------------------------------------------------


def test_missing_experts_are_named_with_compressed_ranges() -> None:
    shards = [fake_shard("model.safetensors", expert_specs(L0, [0, 1, 2, 4, 8]))]
    problems = plan_problems(shards)
    assert any(L0 in p and "3, 5-7" in p for p in problems), problems


def test_missing_projection_is_a_problem() -> None:
    specs = [s for s in expert_specs(L0, range(3)) if s[0] != f"{L0}1.up_proj.weight"]
    problems = plan_problems([fake_shard("model.safetensors", specs)])
    assert len(problems) == 1
    assert L0 in problems[0] and "up_proj" in problems[0] and "1" in problems[0]


def test_duplicate_expert_is_a_problem() -> None:
    specs = [*expert_specs(L0, range(8)), (f"{L0}07.gate_proj.weight", "BF16", (4, 8))]
    problems = plan_problems([fake_shard("model.safetensors", specs)])
    assert len(problems) == 1
    assert f"{L0}7.gate_proj.weight" in problems[0]
    assert f"{L0}07.gate_proj.weight" in problems[0]


def test_duplicate_expert_across_shards_is_a_problem() -> None:
    a = fake_shard("a.safetensors", expert_specs(L0, range(2)))
    b = fake_shard("b.safetensors", expert_specs(L0, [1], parts=("down_proj",)))
    problems = plan_problems([a, b])
    assert len(problems) == 1
    assert f"{L0}1.down_proj.weight" in problems[0]


@pytest.mark.parametrize("part", ["gate_proj", "up_proj", "down_proj"])
def test_dtype_mismatch_across_experts_is_a_problem(part: str) -> None:
    specs = [
        (n, "F32", s) if n == f"{L0}2.{part}.weight" else (n, d, s)
        for n, d, s in expert_specs(L0, range(4))
    ]
    problems = plan_problems([fake_shard("model.safetensors", specs)])
    assert len(problems) == 1
    assert f"{L0}2.{part}.weight" in problems[0] and "F32" in problems[0]


def test_dtype_mismatch_between_gate_and_up_is_a_problem() -> None:
    specs = [
        (n, "F16", s) if ".up_proj." in n else (n, d, s) for n, d, s in expert_specs(L0, range(2))
    ]
    problems = plan_problems([fake_shard("model.safetensors", specs)])
    assert any(L0 + "gate_up_proj" in p for p in problems)


@pytest.mark.parametrize("part", ["gate_proj", "up_proj", "down_proj"])
def test_shape_mismatch_across_experts_is_a_problem(part: str) -> None:
    specs = [
        (n, d, (s[0], s[1] + 2)) if n == f"{L0}1.{part}.weight" else (n, d, s)
        for n, d, s in expert_specs(L0, range(3))
    ]
    problems = plan_problems([fake_shard("model.safetensors", specs)])
    assert len(problems) == 1
    assert f"{L0}1.{part}.weight" in problems[0]


def test_same_numel_different_shape_is_not_reshaped() -> None:
    specs = [
        (n, d, (8, 4)) if n == f"{L0}1.down_proj.weight" else (n, d, s)
        for n, d, s in expert_specs(L0, range(2), hidden=4, inter=8)
    ]
    problems = plan_problems([fake_shard("model.safetensors", specs)])
    assert len(problems) == 1 and L0 + "down_proj" in problems[0]


def test_gate_and_up_with_different_trailing_dims_cannot_be_concatenated() -> None:
    specs = [
        (n, d, (4, 6)) if ".up_proj." in n else (n, d, s)
        for n, d, s in expert_specs(L0, range(2), hidden=8)
    ]
    problems = plan_problems([fake_shard("model.safetensors", specs)])
    assert len(problems) == 1
    assert L0 + "gate_up_proj" in problems[0]


def test_scalar_members_of_a_two_part_fusion_are_a_problem() -> None:
    specs: list[Spec] = [
        (n, d, () if part != "down_proj" else s)
        for n, d, s in expert_specs(L0, range(2))
        for part in [n.split(".")[-2]]
    ]
    problems = plan_problems([fake_shard("model.safetensors", specs)])
    assert len(problems) == 1
    assert L0 + "gate_up_proj" in problems[0]


@pytest.mark.parametrize("odd", [f"{L0}1.down_proj.weight\n", f"{L0}\u0661.gate_proj.weight"])
def test_only_ascii_indices_and_whole_keys_are_experts(odd: str) -> None:
    shards = [fake_shard("model.safetensors", [*expert_specs(L0, range(2)), (odd, "BF16", (4, 8))])]
    plan = build_plan(shards, HYV3)
    check_file(plan.files[0], {**kept(shards, odd), **fused_expectation(shards, L0, 2)})


def test_two_keys_renamed_onto_one_name() -> None:
    shards = [
        fake_shard("a.safetensors", [("m.mlp.router.gate.weight", "BF16", (2,))]),
        fake_shard("b.safetensors", [("m.mlp.gate.weight", "BF16", (2,))]),
    ]
    problems = plan_problems(shards)
    assert len(problems) == 1
    assert "m.mlp.router.gate.weight" in problems[0] and "m.mlp.gate.weight" in problems[0]


@pytest.mark.parametrize("suffix", ["gate_up_proj", "down_proj"])
@pytest.mark.parametrize("where", ["same", "earlier", "later"])
def test_fused_name_colliding_with_an_existing_key(suffix: str, where: str) -> None:
    clash: Spec = (L0 + suffix, "BF16", (2, 4, 8))
    experts = fake_shard("m-2.safetensors", expert_specs(L0, range(2)))
    if where == "same":
        shards = [fake_shard("m-2.safetensors", [clash, *expert_specs(L0, range(2))])]
    else:
        other = fake_shard("m-1.safetensors" if where == "earlier" else "m-3.safetensors", [clash])
        shards = [experts, other]
    problems = plan_problems(shards)
    assert len(problems) == 1
    assert L0 + suffix in problems[0]


def test_a_renamed_key_colliding_with_a_fused_name() -> None:
    rules = RuleSet(
        "t",
        renames=(Rename("old_fused", "gate_up_proj"),),
        fusions=HYV3.fusions,
    )
    shards = [
        fake_shard("m.safetensors", [(L0 + "old_fused", "BF16", (1,)), *expert_specs(L0, [0])])
    ]
    problems = plan_problems(shards, rules)
    assert len(problems) == 1
    assert L0 + "gate_up_proj" in problems[0]


def test_several_problems_are_reported_together() -> None:
    layer1 = [
        (n, "F32", s) if n == f"{L1}1.gate_proj.weight" else (n, d, s)
        for n, d, s in expert_specs(L1, range(2))
    ]
    shards = [
        fake_shard(
            "a.safetensors",
            [("q.mlp.router.gate.weight", "BF16", (2,)), ("q.mlp.gate.weight", "BF16", (2,))],
        ),
        fake_shard("b.safetensors", layer1),
        fake_shard("c.safetensors", [(L2 + "gate_up_proj", "U8", (1,)), *expert_specs(L2, [0])]),
    ]
    with pytest.raises(PlanError) as info:
        build_plan(shards, HYV3)
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert any("q.mlp.gate.weight" in p for p in problems)
    assert any(f"{L1}1.gate_proj.weight" in p for p in problems)
    assert any(L2 + "gate_up_proj" in p for p in problems)
    assert "3 problems" in str(info.value)


def test_huge_expert_index_gives_a_compact_message_fast() -> None:
    # In a child process with a memory cap, so a planner that enumerates every expert fails
    # quickly with MemoryError instead of eating the machine.
    script = textwrap.dedent(
        """
        import json, resource, time
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from streamconv.errors import PlanError
        from streamconv.header import FileHeader, TensorRecord
        from streamconv.plan import build_plan
        from streamconv.rules import HYV3

        P = "model.layers.0.mlp.experts."
        recs, off = [], 1024
        for e in (0, 1000000000):
            for part, shape in (("gate_proj", (4, 8)), ("up_proj", (4, 8)), ("down_proj", (8, 4))):
                recs.append(TensorRecord(f"{P}{e}.{part}.weight", "BF16", shape, "m.safetensors",
                                         off, 64))
                off += 64
        shard = FileHeader("m.safetensors", off, 1016, None, tuple(recs))
        start = time.perf_counter()
        try:
            build_plan([shard], HYV3)
            result = {"problems": None}
        except PlanError as error:
            result = {"problems": list(error.problems), "message": str(error)}
        except MemoryError:
            result = {"memory": True}
        result["seconds"] = time.perf_counter() - start
        print(json.dumps(result))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert "memory" not in result, "the planner enumerated every missing expert"
    assert result["seconds"] < 2.0
    problems = result["problems"]
    assert problems, "a group with experts 1-999999999 missing must be refused"
    assert 1 <= len(problems) <= 3
    assert all(len(p) < 300 for p in problems)
    assert any("1-999999999" in p for p in problems)
    assert len(result["message"]) < 2000


# --- determinism and index ---------------------------------------------------------------------


def _three_shards() -> list[FileHeader]:
    return [
        fake_shard(
            "model-00001-of-00003.safetensors",
            [
                ("model.embed_tokens.weight", "BF16", (8, 8)),
                ("model.layers.0.mlp.expert_bias", "F32", (4,)),
                *expert_specs(L0, [0, 1, 2]),
            ],
        ),
        fake_shard(
            "model-00002-of-00003.safetensors",
            [*expert_specs(L0, [3]), *expert_specs(L1, [0, 1]), ("model.norm.weight", "F32", (8,))],
        ),
        fake_shard(
            "model-00003-of-00003.safetensors",
            [("lm_head.weight", "BF16", (8, 8)), *expert_specs(L1, [2, 3])],
        ),
    ]


def test_plan_is_deterministic_whatever_the_record_order() -> None:
    shards = _three_shards()
    shuffled = []
    rng = random.Random(1234)
    for shard in reversed(shards):
        tensors = list(shard.tensors)
        rng.shuffle(tensors)
        shuffled.append(
            FileHeader(
                shard.file, shard.file_size, shard.header_size, shard.metadata, tuple(tensors)
            )
        )
    first = build_plan(shards, HYV3).to_json()
    second = build_plan(shuffled, HYV3).to_json()
    assert isinstance(first, bytes)
    assert first == second
    document = orjson.loads(first)
    assert [f["name"] for f in document["files"]] == sorted(s.file for s in shards)


def _expected_index(
    weight_map: dict[str, str], total: int, extra: dict[str, object] | None = None
) -> bytes:
    document = {"metadata": {**(extra or {}), "total_size": total}, "weight_map": weight_map}
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def test_index_bytes_for_several_files() -> None:
    shards = _three_shards()
    total = sum(nbytes(r.dtype, r.shape) for s in shards for r in s.tensors)
    a, b, c = (s.file for s in shards)
    weight_map = {
        "model.embed_tokens.weight": a,
        "model.layers.0.mlp.e_score_correction_bias": a,
        L0 + "gate_up_proj": a,
        L0 + "down_proj": a,
        "model.norm.weight": b,
        L1 + "gate_up_proj": b,
        L1 + "down_proj": b,
        "lm_head.weight": c,
    }
    plan = build_plan(shards, HYV3)
    assert plan.total_size == total
    assert plan.index == _expected_index(weight_map, total)
    extra = {"format": "hyv3", "nested": {"k": [1, 2]}, "total_size": 1}
    plan = build_plan(shards, HYV3, index_metadata=extra)
    assert plan.index == _expected_index(weight_map, total, extra)
    assert build_plan(shards, HYV3, write_index=False).index is None


def test_index_for_one_file_only_when_asked() -> None:
    shards = [fake_shard("model.safetensors", [("w", "F32", (3, 2)), *expert_specs(L0, [0])])]
    assert build_plan(shards, HYV3).index is None
    assert build_plan(shards, HYV3, write_index=None).index is None
    plan = build_plan(shards, HYV3, write_index=True, index_metadata={"who": "me"})
    total = 24 + 3 * 64
    weight_map = {n: "model.safetensors" for n in ("w", L0 + "gate_up_proj", L0 + "down_proj")}
    assert plan.index == _expected_index(weight_map, total, {"who": "me"})


# --- rules are data ----------------------------------------------------------------------------


def test_a_custom_rule_set_works_and_hyv3_is_not_built_in() -> None:
    rules = RuleSet(
        name="toy",
        renames=(Rename("attn", "attention"),),
        fusions=(
            Fusion(
                pattern=r"^(?P<prefix>.+\.moe\.)(?P<index>\d+)\.(?P<part>w1|q|k|v)$",
                outputs=(FusedOutput("w1_stacked", ("w1",)), FusedOutput("vkq", ("v", "k", "q"))),
            ),
        ),
    )
    hyv3_keys: list[Spec] = [
        ("model.layers.0.mlp.router.gate.weight", "BF16", (2, 4)),
        *expert_specs(L0, [0]),
    ]
    toy: list[Spec] = []
    for e in range(3):
        toy += [
            (f"blk.0.moe.{e}.w1", "F32", (3, 2)),
            (f"blk.0.moe.{e}.q", "F32", (3, 2)),
            (f"blk.0.moe.{e}.k", "F32", (2, 2)),
            (f"blk.0.moe.{e}.v", "F32", (1, 2)),
        ]
    shards = [fake_shard("model.safetensors", [("blk.0.attn.o", "F16", (2,)), *toy, *hyv3_keys])]
    plan = build_plan(shards, rules)
    rec = records(shards)
    expected: dict[str, tuple[str, Shape, list[PieceT]]] = {
        "blk.0.attention.o": ("F16", (2,), [piece_of(rec["blk.0.attn.o"])]),
        "blk.0.moe.w1_stacked": (
            "F32",
            (3, 3, 2),
            [piece_of(rec[f"blk.0.moe.{e}.w1"]) for e in range(3)],
        ),
        "blk.0.moe.vkq": (
            "F32",
            (3, 6, 2),
            [piece_of(rec[f"blk.0.moe.{e}.{p}"]) for e in range(3) for p in "vkq"],
        ),
    }
    for name, dtype, shape in hyv3_keys:  # untouched under a rule set that does not know them
        expected[name] = (dtype, shape, [piece_of(rec[name])])
    check_file(plan.files[0], expected)
    assert [g.prefix for g in plan.groups] == ["blk.0.moe."]


def test_single_part_fusion_of_scalars() -> None:
    rules = RuleSet(
        "s",
        fusions=(
            Fusion(r"^(?P<prefix>s\.)(?P<index>\d+)(?P<part>\.b)$", (FusedOutput("all", (".b",)),)),
        ),
    )
    shards = [fake_shard("m.safetensors", [(f"s.{e}.b", "F32", ()) for e in (1, 0)])]
    plan = build_plan(shards, rules)
    rec = records(shards)
    check_file(
        plan.files[0], {"s.all": ("F32", (2,), [piece_of(rec["s.0.b"]), piece_of(rec["s.1.b"])])}
    )


@pytest.mark.parametrize(
    "pattern",
    [
        r"^(.*\.experts\.)(\d+)\.(gate_proj)$",
        r"^(?P<prefix>.*\.experts\.)(\d+)\.(?P<part>gate_proj)$",
        r"^(?P<prefix>.*)(?P<index>\d+)\.gate_proj$",
        r"^(?P<index>\d+)(?P<part>x)$",
    ],
)
def test_fusion_pattern_without_named_groups_is_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="named groups"):
        Fusion(pattern=pattern, outputs=(FusedOutput("x", ("gate_proj",)),))


def test_sub_byte_f4_fusion_of_whole_byte_members() -> None:
    shards = [
        fake_shard(
            "model.safetensors",
            expert_specs(L0, range(3), dtype="F4", hidden=4, gate=2, up=1, inter=2),
        )
    ]
    plan = build_plan(shards, HYV3)
    expected = fused_expectation(shards, L0, 3)
    assert expected[L0 + "gate_up_proj"][:2] == ("F4", (3, 3, 4))
    check_file(plan.files[0], expected)
    assert plan.total_size == 3 * (2 * 4 + 1 * 4 + 4 * 2) // 2
