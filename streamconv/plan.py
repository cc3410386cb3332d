"""The planner: headers + rules -> a complete, immutable plan of every output byte. Pure.

No file is opened here. For every output file the plan holds its header bytes and, for every
tensor, the ordered source pieces ``(file, offset, length)`` whose concatenation is the tensor's
bytes. Placement: output shards keep the input shard names; a renamed tensor stays in its shard;
a fused group goes to the shard holding its experts, or when they span several shards, to the
first of them in sorted file-name order. Every problem is collected and raised together.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from .checkpoint import INDEX_NAME, encode_index
from .errors import PlanError, raise_problems
from .header import FileHeader, TensorRecord, TensorSpec, encode_header
from .rules import Fusion, RuleSet

PLAN_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Piece:
    """``length`` bytes of source tensor ``tensor`` at absolute ``offset`` of file ``source``."""

    source: str
    offset: int
    length: int
    tensor: str


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute offset in the output file
    length: int
    pieces: tuple[Piece, ...]
    fused: bool


@dataclass(frozen=True, slots=True)
class PlannedFile:
    name: str
    header: bytes  # 8-byte length + padded JSON, exactly as the serializer writes it
    size: int
    tensors: tuple[PlannedTensor, ...]  # in data order


@dataclass(frozen=True, slots=True)
class FusedGroup:
    """One expert group: where its experts come from and where its fused tensors go."""

    prefix: str
    experts: int
    sources: tuple[str, ...]  # the shards holding its members, sorted
    target: str
    outputs: tuple[str, ...]

    @property
    def split(self) -> bool:
        return len(self.sources) > 1


@dataclass(frozen=True, slots=True)
class Plan:
    rules: RuleSet
    files: tuple[PlannedFile, ...]  # sorted by name
    groups: tuple[FusedGroup, ...]  # sorted by prefix
    index: bytes | None  # the index file's bytes, when one is written
    total_size: int  # sum of tensor bytes

    @property
    def total_bytes(self) -> int:
        """Bytes of all output shards (headers included)."""
        return sum(f.size for f in self.files)

    @property
    def tensor_count(self) -> int:
        return sum(len(f.tensors) for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (documented in the README; stable field names)."""
        return {
            "format": PLAN_FORMAT,
            "rules": self.rules.to_dict(),
            "total_size": self.total_size,
            "index": None if self.index is None else INDEX_NAME,
            "groups": [
                {
                    "prefix": g.prefix,
                    "experts": g.experts,
                    "sources": list(g.sources),
                    "target": g.target,
                    "outputs": list(g.outputs),
                }
                for g in self.groups
            ],
            "files": [
                {
                    "name": f.name,
                    "size": f.size,
                    "header_size": len(f.header) - 8,
                    "tensors": [
                        {
                            "name": t.name,
                            "dtype": t.dtype,
                            "shape": list(t.shape),
                            "offset": t.offset,
                            "length": t.length,
                            "pieces": [[p.source, p.offset, p.length, p.tensor] for p in t.pieces],
                        }
                        for t in f.tensors
                    ],
                }
                for f in self.files
            ],
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


@dataclass(frozen=True, slots=True)
class _Draft:
    """An output tensor before placement in a file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    fused: bool


def _missing(present: set[int], total: int, *, shown: int = 8) -> str:
    """The numbers in ``range(total)`` not in ``present``, as compact ranges: "0-2, 5, 7-8".

    Works from the present numbers only, so a huge ``total`` costs nothing.
    """
    gaps: list[tuple[int, int]] = []
    expected = 0
    for n in sorted(present):
        if n > expected:
            gaps.append((expected, n - 1))
        expected = n + 1
    if expected < total:
        gaps.append((expected, total - 1))
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in gaps[:shown])
    if len(gaps) > shown:
        text += f" and {len(gaps) - shown} more ranges"
    return text


def _where(files: Iterable[str], shown: int = 3) -> str:
    """The files a problem is about, for the start of its message."""
    names = sorted(set(files))
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _plan_group(
    fusion: Fusion,
    prefix: str,
    members: dict[tuple[int, str], list[TensorRecord]],
    problems: list[str],
) -> list[_Draft]:
    """Fused drafts for one expert group, or none (with problems recorded) if it is invalid."""
    group_problems: list[str] = []
    for (index, part), records in sorted(members.items()):
        if len(records) > 1:
            names = ", ".join(repr(r.name) for r in records)
            group_problems.append(f"group {prefix!r}: expert {index} {part} given twice ({names})")
    experts = max(index for index, _ in members) + 1
    for part in fusion.parts:
        present = {index for index, p in members if p == part}
        if len(present) < experts:
            group_problems.append(
                f"group {prefix!r}: {part} missing for experts "
                f"{_missing(present, experts)} (of 0-{experts - 1})"
            )
    if group_problems:
        where = _where(r.file for records in members.values() for r in records)
        problems.extend(f"{where}: {problem}" for problem in group_problems)
        return []
    drafts: list[_Draft] = []
    for output in fusion.outputs:
        name = prefix + output.suffix
        firsts = [members[(0, part)][0] for part in output.parts]
        dtype = firsts[0].dtype
        bad = False
        for part, first in zip(output.parts, firsts, strict=True):
            for e in range(experts):
                record = members[(e, part)][0]
                if record.dtype != dtype or record.shape != first.shape:
                    where = _where([record.file, first.file])
                    problems.append(
                        f"{where}: {name}: member {record.name!r} is {record.dtype} "
                        f"{list(record.shape)}, expected {dtype} {list(first.shape)} like "
                        f"{firsts[0].name!r}"
                        if record.dtype != dtype
                        else f"{where}: {name}: member {record.name!r} has shape "
                        f"{list(record.shape)}, expected {list(first.shape)} like {first.name!r}"
                    )
                    bad = True
                    break
        if len(output.parts) > 1:
            rests = {first.shape[1:] for first in firsts}
            if any(len(first.shape) == 0 for first in firsts) or len(rests) > 1:
                shapes = ", ".join(f"{f.name!r} {list(f.shape)}" for f in firsts)
                problems.append(
                    f"{_where(f.file for f in firsts)}: {name}: parts cannot be concatenated "
                    f"along dim 0 ({shapes})"
                )
                bad = True
        if bad:
            continue
        if len(output.parts) > 1:
            shape = (experts, sum(f.shape[0] for f in firsts), *firsts[0].shape[1:])
        else:
            shape = (experts, *firsts[0].shape)
        pieces = tuple(
            Piece(r.file, r.offset, r.length, r.name)
            for e in range(experts)
            for part in output.parts
            for r in members[(e, part)][:1]
        )
        drafts.append(_Draft(name, dtype, shape, pieces, fused=True))
    return drafts


def build_plan(
    shards: Sequence[FileHeader],
    rules: RuleSet,
    *,
    index_metadata: dict[str, Any] | None = None,
    write_index: bool | None = None,
) -> Plan:
    """Plan the conversion of ``shards`` under ``rules``.

    ``write_index``: None writes an index when there are several output shards; the caller
    passes True when the input had one. ``index_metadata`` is the input index's ``metadata``
    (kept, with ``total_size`` recomputed).
    """
    problems: list[str] = []
    shards = sorted(shards, key=lambda s: s.file)
    by_file: dict[str, list[_Draft]] = {s.file: [] for s in shards}
    # output name -> (the source key or group producing it, the files it comes from)
    origin: dict[str, tuple[str, tuple[str, ...]]] = {}

    def claim(name: str, source: str, files: tuple[str, ...]) -> bool:
        other, other_files = origin.setdefault(name, (source, files))
        if other != source:
            where = _where((*files, *other_files))
            problems.append(f"{where}: {source!r} and {other!r} both become {name!r}")
            return False
        return True

    groups: dict[tuple[int, str], dict[tuple[int, str], list[TensorRecord]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for shard in shards:
        for record in shard.tensors:
            for number, fusion in enumerate(rules.fusions):
                match = fusion.compiled.fullmatch(record.name)
                if match and match["part"] in fusion.parts:
                    key = (int(match["index"]), match["part"])
                    groups[(number, match["prefix"])][key].append(record)
                    break
            else:
                name = rules.rename(record.name)
                if claim(name, record.name, (record.file,)):
                    piece = Piece(record.file, record.offset, record.length, record.name)
                    by_file[shard.file].append(
                        _Draft(name, record.dtype, record.shape, (piece,), fused=False)
                    )

    planned_groups: list[FusedGroup] = []
    for (number, prefix), members in sorted(groups.items(), key=lambda item: item[0][1]):
        fusion = rules.fusions[number]
        sources = sorted({r.file for records in members.values() for r in records})
        target = sources[0]
        drafts = _plan_group(fusion, prefix, members, problems)
        drafts = [d for d in drafts if claim(d.name, f"experts of {prefix!r}", tuple(sources))]
        by_file[target].extend(drafts)
        planned_groups.append(
            FusedGroup(
                prefix=prefix,
                experts=max(index for index, _ in members) + 1,
                sources=tuple(sources),
                target=target,
                outputs=tuple(d.name for d in drafts),
            )
        )
    raise_problems(PlanError, problems)

    files = tuple(_plan_file(shard, by_file[shard.file]) for shard in shards)
    total_size = sum(t.length for f in files for t in f.tensors)
    if write_index is None:
        write_index = len(files) > 1
    index = _index_bytes(files, total_size, index_metadata) if write_index else None
    return Plan(
        rules=rules,
        files=files,
        groups=tuple(planned_groups),
        index=index,
        total_size=total_size,
    )


def _plan_file(shard: FileHeader, drafts: list[_Draft]) -> PlannedFile:
    by_name = {d.name: d for d in drafts}
    specs = [TensorSpec(d.name, d.dtype, d.shape) for d in drafts]
    header, layout = encode_header(specs, shard.metadata_dict())
    tensors = []
    for spec, begin, end in layout:
        draft = by_name[spec.name]
        if sum(p.length for p in draft.pieces) != end - begin:
            raise PlanError(
                f"pieces of {draft.name!r} hold {sum(p.length for p in draft.pieces)} bytes, "
                f"its header says {end - begin}",
                path=shard.file,
            )
        tensors.append(
            PlannedTensor(
                name=draft.name,
                dtype=draft.dtype,
                shape=draft.shape,
                offset=len(header) + begin,
                length=end - begin,
                pieces=draft.pieces,
                fused=draft.fused,
            )
        )
    data_end = layout[-1][2] if layout else 0
    return PlannedFile(
        name=shard.file, header=header, size=len(header) + data_end, tensors=tuple(tensors)
    )


def _index_bytes(
    files: Sequence[PlannedFile], total_size: int, metadata: dict[str, Any] | None
) -> bytes:
    weight_map = {t.name: f.name for f in files for t in f.tensors}
    return encode_index(weight_map, total_size, metadata)
