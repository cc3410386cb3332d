"""Inspect a checkpoint directory or one .safetensors file from its headers alone.

O(headers): no tensor data is read, so it is instant for any size. Reports tensors, dtypes,
bytes, shards, metadata, the expert groups the rule set's fusions find (experts, projections,
member shapes, which shards each spans) and every problem the conversion would hit: the errors
of loading and planning are caught and listed, never raised.

``Inspection.to_dict()`` fields (stable): ``path``, ``kind`` (``"directory"`` or ``"file"``),
``layout`` (``"index"``, ``"single"``, ``"shards"``, ``"file"``, or null when unreadable),
``rules`` (rule set name), ``tensors``, ``total_bytes`` (tensor bytes), ``file_bytes`` (shard
sizes, headers included), ``dtypes``: ``[{"dtype", "tensors", "bytes"}]``, ``shards``:
``[{"name", "size", "header_size", "tensors", "bytes", "metadata"}]``, ``index_metadata``,
``others`` (other entries of the directory), ``groups``: ``[{"prefix", "experts", "present",
"missing", "parts", "members": [{"part", "dtype", "shape", "count"}], "shards", "split",
"bytes"}]`` (in natural prefix order; ``experts`` is the largest index + 1, ``present`` the
indices found, ``missing`` the absent (expert, projection) pairs), ``split_groups`` (count),
``ok`` (no problems), ``problems`` (list of str, every problem of loading and planning).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import INDEX_NAME, SINGLE_NAME, SUFFIX, Checkpoint, SourceFile, load_checkpoint
from .convert import plan_checkpoint
from .errors import InvalidInputError
from .header import FileHeader, read_header
from .progress import human_bytes
from .rules import HYV3, RuleSet

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DtypeStat:
    dtype: str
    tensors: int
    bytes: int


@dataclass(frozen=True, slots=True)
class ShardInfo:
    name: str
    size: int
    header_size: int
    tensors: int
    bytes: int
    metadata: tuple[tuple[str, str], ...] | None


@dataclass(frozen=True, slots=True)
class MemberStat:
    """``count`` members of projection ``part`` share this dtype and shape."""

    part: str
    dtype: str
    shape: tuple[int, ...]
    count: int


@dataclass(frozen=True, slots=True)
class GroupInfo:
    prefix: str
    experts: int  # largest expert index + 1
    present: int  # distinct expert indices found
    missing: int  # (expert, projection) pairs absent among 0..experts-1
    parts: tuple[str, ...]  # projections found, in the rule's order
    members: tuple[MemberStat, ...]
    shards: tuple[str, ...]  # sorted
    bytes: int

    @property
    def split(self) -> bool:
        return len(self.shards) > 1


@dataclass(frozen=True, slots=True)
class Inspection:
    path: str
    kind: str
    layout: str | None
    rules: str
    tensors: int
    total_bytes: int
    file_bytes: int
    dtypes: tuple[DtypeStat, ...]
    shards: tuple[ShardInfo, ...]
    index_metadata: tuple[tuple[str, Any], ...] | None
    others: tuple[str, ...]
    groups: tuple[GroupInfo, ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def split_groups(self) -> int:
        return sum(g.split for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "layout": self.layout,
            "rules": self.rules,
            "tensors": self.tensors,
            "total_bytes": self.total_bytes,
            "file_bytes": self.file_bytes,
            "dtypes": [
                {"dtype": d.dtype, "tensors": d.tensors, "bytes": d.bytes} for d in self.dtypes
            ],
            "shards": [
                {
                    "name": s.name,
                    "size": s.size,
                    "header_size": s.header_size,
                    "tensors": s.tensors,
                    "bytes": s.bytes,
                    "metadata": None if s.metadata is None else dict(s.metadata),
                }
                for s in self.shards
            ],
            "index_metadata": None if self.index_metadata is None else dict(self.index_metadata),
            "others": list(self.others),
            "groups": [
                {
                    "prefix": g.prefix,
                    "experts": g.experts,
                    "present": g.present,
                    "missing": g.missing,
                    "parts": list(g.parts),
                    "members": [
                        {"part": m.part, "dtype": m.dtype, "shape": list(m.shape), "count": m.count}
                        for m in g.members
                    ],
                    "shards": list(g.shards),
                    "split": g.split,
                    "bytes": g.bytes,
                }
                for g in self.groups
            ],
            "split_groups": self.split_groups,
            "ok": self.ok,
            "problems": list(self.problems),
        }


def _problems(error: InvalidInputError) -> list[str]:
    return list(error.problems) if error.problems else [str(error)]


def _natural(text: str) -> list[tuple[int, int | str]]:
    """Sort key putting ``layers.2.`` before ``layers.10.``."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", text)]


def find_groups(shards: list[FileHeader], rules: RuleSet) -> tuple[GroupInfo, ...]:
    """The expert groups that ``rules``' fusions find in ``shards`` (however incomplete)."""
    found: dict[tuple[int, str], list[tuple[int, str, str, tuple[int, ...], str, int]]]
    found = defaultdict(list)
    matchers = [(f.compiled.match, frozenset(f.parts)) for f in rules.fusions]
    for shard in shards:
        for record in shard.tensors:
            for number, (match_name, wanted) in enumerate(matchers):
                match = match_name(record.name)
                if match and match["part"] in wanted:
                    key = (number, match["prefix"])
                    found[key].append(
                        (
                            int(match["index"]),
                            match["part"],
                            record.dtype,
                            record.shape,
                            shard.file,
                            record.length,
                        )
                    )
                    break
    groups = []
    for (number, prefix), members in sorted(found.items(), key=lambda item: _natural(item[0][1])):
        order = rules.fusions[number].parts
        experts = max(m[0] for m in members) + 1
        pairs = {(m[0], m[1]) for m in members}
        parts = tuple(p for p in order if any(m[1] == p for m in members))
        stats = Counter((m[1], m[2], m[3]) for m in members)
        groups.append(
            GroupInfo(
                prefix=prefix,
                experts=experts,
                present=len({m[0] for m in members}),
                missing=sum((e, p) not in pairs for e in range(experts) for p in order),
                parts=parts,
                members=tuple(
                    MemberStat(part, dtype, shape, count)
                    for (part, dtype, shape), count in sorted(
                        stats.items(), key=lambda kv: (order.index(kv[0][0]), -kv[1], kv[0])
                    )
                ),
                shards=tuple(sorted({m[4] for m in members})),
                bytes=sum(m[5] for m in members),
            )
        )
    return tuple(groups)


def _fallback_headers(root: Path, problems: list[str]) -> list[FileHeader]:
    """Headers of every readable shard-like file, when the checkpoint as a whole is not valid."""
    headers = []
    for name in sorted(os.listdir(root)):
        if name.endswith(SUFFIX) and not name.startswith(".") and (root / name).is_file():
            try:
                headers.append(read_header(root / name, name))
            except InvalidInputError as error:
                message = str(error)
                if message not in problems:
                    problems.append(message)
    return headers


def _single(path: Path) -> Checkpoint:
    header = read_header(path)
    info = os.stat(path)
    source = SourceFile(path.name, info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)
    return Checkpoint(
        root=path.parent,
        layout="single",
        shards=(header,),
        sources=(source,),
        index_metadata=None,
        others=(),
    )


def inspect_path(
    path: str | Path, rules: RuleSet = HYV3, *, allow_external_links: bool = False
) -> Inspection:
    """Inspect the checkpoint directory or safetensors file at ``path``.

    Problems of the checkpoint or of planning its conversion under ``rules`` are reported in
    :attr:`Inspection.problems`; only a path that is neither a directory nor a file raises
    :class:`InvalidInputError`.
    """
    path = Path(path)
    problems: list[str] = []
    checkpoint: Checkpoint | None = None
    shards: list[FileHeader] = []
    index_metadata = None
    others: tuple[str, ...] = ()
    layout: str | None = None
    if path.is_dir():
        kind = "directory"
        try:
            checkpoint = load_checkpoint(path, allow_external_links=allow_external_links)
        except InvalidInputError as error:
            problems += _problems(error)
            shards = _fallback_headers(path, problems)
            entries = set(os.listdir(path))
            layout = (
                "index" if INDEX_NAME in entries else "single" if SINGLE_NAME in entries else None
            )
            others = tuple(sorted(e for e in entries if not e.endswith(SUFFIX) and e != INDEX_NAME))
    elif path.is_file():
        kind = "file"
        layout = "file"
        try:
            checkpoint = _single(path)
        except InvalidInputError as error:
            problems += _problems(error)
    else:
        raise InvalidInputError("no such file or directory", path=path)
    if checkpoint is not None:
        if kind == "directory":
            layout = checkpoint.layout
            others = checkpoint.others
        shards = list(checkpoint.shards)
        index_metadata = checkpoint.index_metadata
        try:
            plan_checkpoint(checkpoint, rules)
        except InvalidInputError as error:
            problems += _problems(error)
    dtype_count: Counter[str] = Counter()
    dtype_bytes: Counter[str] = Counter()
    shard_infos = []
    for shard in shards:
        for record in shard.tensors:
            dtype_count[record.dtype] += 1
            dtype_bytes[record.dtype] += record.length
        shard_infos.append(
            ShardInfo(
                name=shard.file,
                size=shard.file_size,
                header_size=shard.header_size,
                tensors=len(shard.tensors),
                bytes=sum(r.length for r in shard.tensors),
                metadata=shard.metadata,
            )
        )
    if problems:
        log.debug("%s: %d problem(s) found", path, len(problems))
    return Inspection(
        path=str(path),
        kind=kind,
        layout=layout,
        rules=rules.name,
        tensors=sum(s.tensors for s in shard_infos),
        total_bytes=sum(s.bytes for s in shard_infos),
        file_bytes=sum(s.size for s in shard_infos),
        dtypes=tuple(
            DtypeStat(d, dtype_count[d], dtype_bytes[d])
            for d in sorted(dtype_count, key=lambda d: (-dtype_bytes[d], d))
        ),
        shards=tuple(shard_infos),
        index_metadata=index_metadata,
        others=others,
        groups=find_groups(shards, rules),
        problems=tuple(problems),
    )


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _span(group: GroupInfo, shards: tuple[ShardInfo, ...]) -> str:
    numbers = {s.name: n for n, s in enumerate(shards, 1)}
    spans = [str(numbers.get(name, name)) for name in group.shards]
    return ("split over shards " if group.split else "in shard ") + ",".join(spans)


def render_inspection(ins: Inspection, *, limit: int = 12) -> str:
    """Human-readable summary; long shard and group lists are cut at ``limit`` lines."""
    label = f"{ins.kind}, layout {ins.layout or 'unknown'}"
    lines = [
        f"{'path':<10} {ins.path} ({label})",
        f"{'tensors':<10} {ins.tensors} in {len(ins.shards)} shard(s), "
        f"{human_bytes(ins.total_bytes)} of tensor data ({human_bytes(ins.file_bytes)} on disk)",
        f"{'dtypes':<10} "
        + ", ".join(f"{d.dtype} x{d.tensors} ({human_bytes(d.bytes)})" for d in ins.dtypes),
    ]
    width = max((len(s.name) for s in ins.shards[:limit]), default=0)
    for n, shard in enumerate(ins.shards[:limit]):
        lines.append(
            f"{'shards' if n == 0 else '':<10} {n + 1:>3}. {shard.name:<{width}} "
            f"{human_bytes(shard.size):>10} {shard.tensors:>7} tensors"
        )
    if len(ins.shards) > limit:
        lines.append(f"{'':<10} ... and {len(ins.shards) - limit} more shards")
    metadata = {k: v for s in ins.shards for k, v in (s.metadata or ())}
    if metadata:
        lines.append(f"{'metadata':<10} " + ", ".join(f"{k}={v}" for k, v in metadata.items()))
    if ins.others:
        lines.append(f"{'others':<10} " + ", ".join(ins.others))
    lines.append(
        f"{'groups':<10} {len(ins.groups)} expert group(s) ({ins.rules} rules), "
        f"{ins.split_groups} split across shards"
    )
    shown = sorted(ins.groups, key=lambda g: not g.split)[:limit]
    pwidth = max((len(g.prefix) for g in shown), default=0)
    for group in shown:
        members = ", ".join(f"{m.part} {m.dtype} {_shape(m.shape)}" for m in group.members)
        missing = f", {group.missing} member(s) missing" if group.missing else ""
        lines.append(
            f"{'':<10} {group.prefix:<{pwidth}} {group.experts:>4} experts{missing}; "
            f"{members}; {_span(group, ins.shards)}"
        )
    if len(ins.groups) > limit:
        lines.append(f"{'':<10} ... and {len(ins.groups) - limit} more groups")
    if ins.problems:
        lines.append(f"{'problems':<10} {len(ins.problems)}:")
        lines += [f"{'':<10} - {p}" for p in ins.problems[: limit * 4]]
        if len(ins.problems) > limit * 4:
            lines.append(f"{'':<10} ... and {len(ins.problems) - limit * 4} more")
    else:
        lines.append(f"{'problems':<10} none")
    return "\n".join(lines)
