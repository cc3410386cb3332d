"""Verify a conversion byte for byte against the plan re-derived from its input.

:func:`verify_conversion` reads the input's headers, plans the conversion again and checks the
output directory against that plan: the same set of files; every output header valid, equal to
the planned bytes and accepted by ``safetensors.safe_open`` with the planned keys; every output
tensor equal to the concatenation of its source pieces (streamed: two reusable 8 MiB buffers per
worker, ``os.preadv`` and a ``memcmp``-speed compare, output files in parallel); the index equal
to the planned one and consistent with the output headers; every other input file and folder
copied identically. Problems are collected, never raised; the input being unreadable or not
plannable is an :class:`~streamconv.errors.InvalidInputError` (nothing to verify against).

``VerifyReport.to_dict()`` fields (stable): ``ok`` (bool), ``mode`` (``"plan"`` or
``"manifest"``), ``input`` (str or null), ``output`` (str), ``files_checked``,
``tensors_checked``, ``bytes_compared`` (output-side bytes compared; both sides are read),
``seconds``, ``throughput`` (bytes_compared per second), ``problems``: a list of
``{"kind", "file", "tensor", "offset", "reason"}``. ``file`` is relative to the output directory
(``input:NAME`` for an input shard); ``tensor`` and ``offset`` (absolute byte offset of the
first difference in the output file) may be null. Kinds: ``missing``, ``extra``, ``temp``,
``size``, ``header``, ``header-invalid``, ``safe_open``, ``data``, ``index``, ``copy``,
``input``, ``io``, ``manifest``, ``hash``.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from safetensors import safe_open

from .checkpoint import INDEX_NAME, load_checkpoint
from .compare import BUFFER, SourceShort, compare_ranges, first_difference
from .convert import plan_checkpoint
from .copyengine import Copy
from .errors import InvalidInputError, UsageError
from .header import FileHeader, read_header
from .plan import Plan, PlannedFile, PlannedTensor
from .progress import Progress, human_bytes
from .rules import HYV3, RuleSet
from .state import STATE_DIR
from .writer import file_copies, is_temp_name

__all__ = [
    "ALLOWED_EXTRA",
    "MANIFEST_NAME",
    "Problem",
    "VerifyReport",
    "render_verify",
    "verify_conversion",
]

#: Output bytes per parallel task: files are cut at tensor ends so workers stay balanced.
SLICE = 128 * 1024 * 1024
#: Data mismatches reported per output file before the rest are summarised.
MAX_PER_FILE = 50
MANIFEST_NAME = "streamconv-manifest.json"
ALLOWED_EXTRA = frozenset({MANIFEST_NAME, STATE_DIR})


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str
    file: str
    reason: str
    tensor: str | None = None
    offset: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "file": self.file,
            "tensor": self.tensor,
            "offset": self.offset,
            "reason": self.reason,
        }

    def __str__(self) -> str:
        where = self.file
        if self.tensor is not None:
            where += f": tensor {self.tensor!r}"
        if self.offset is not None:
            where += f" at byte {self.offset}"
        return f"{where}: {self.reason}"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    mode: str
    input: str | None
    output: str
    problems: tuple[Problem, ...]
    files_checked: int
    tensors_checked: int
    bytes_compared: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def throughput(self) -> float:
        """Bytes compared per second."""
        return self.bytes_compared / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "mode": self.mode,
            "input": self.input,
            "output": self.output,
            "files_checked": self.files_checked,
            "tensors_checked": self.tensors_checked,
            "bytes_compared": self.bytes_compared,
            "seconds": round(self.seconds, 6),
            "throughput": round(self.throughput, 1),
            "problems": [p.to_dict() for p in self.problems],
        }


def render_verify(report: VerifyReport, *, shown: int = 50) -> str:
    """A few human lines: the verdict, the numbers, then each problem."""
    verdict = "OK" if report.ok else f"FAILED: {len(report.problems)} problem(s)"
    lines = [
        f"verify ({report.mode}) {report.output}: {verdict}",
        f"  {report.files_checked} files, {report.tensors_checked} tensors, "
        f"{human_bytes(report.bytes_compared)} compared in {report.seconds:.2f}s "
        f"({human_bytes(report.throughput)}/s)",
    ]
    lines += [f"  {p.kind:<14} {p}" for p in report.problems[:shown]]
    if len(report.problems) > shown:
        lines.append(f"  ... and {len(report.problems) - shown} more")
    return "\n".join(lines)


def _slices(planned: PlannedFile, size: int) -> list[tuple[int, int]]:
    """The data region of ``planned`` in ranges of about ``size`` bytes, cut at tensor ends."""
    out: list[tuple[int, int]] = []
    lo = len(planned.header)
    for tensor in planned.tensors:
        end = tensor.offset + tensor.length
        if end - lo >= size:
            out.append((lo, end))
            lo = end
    if lo < planned.size or not out:
        out.append((lo, planned.size))
    return out


@dataclass
class _Result:
    problems: list[Problem] = field(default_factory=list)
    compared: int = 0
    tensors: int = 0
    files: int = 0


class _Verifier:
    def __init__(
        self,
        out_dir: Path,
        in_dir: Path,
        *,
        sources: Mapping[str, int],
        advance: Callable[[int], None],
        cancel: threading.Event,
        buffer_size: int,
    ) -> None:
        self.out_dir = out_dir
        self.in_dir = in_dir
        self.sources = sources
        self.advance = advance
        self.cancel = cancel
        self.buffer_size = buffer_size
        self.headers: dict[str, FileHeader] = {}  # output headers that parsed
        self._reported: dict[str, set[str]] = {}  # per file: tensors with a data problem
        self._segment_cache: dict[str, list[Copy]] = {}
        self._lock = threading.Lock()

    def shard(self, planned: PlannedFile) -> _Result:
        """Size, header bytes, header validity and safe_open keys of one output shard."""
        result = _Result(files=1, tensors=len(planned.tensors))
        path = self.out_dir / planned.name
        problems = result.problems

        def add(kind: str, reason: str, tensor: str | None = None, at: int | None = None) -> None:
            problems.append(Problem(kind, planned.name, reason, tensor, at))

        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                head = handle.read(len(planned.header))
        except OSError as error:
            add("io", f"cannot read: {error.strerror}")
            return result
        if size != planned.size:
            state = "truncated" if size < planned.size else "too long"
            add("size", f"{state}: {size} bytes, planned {planned.size}")
        result.compared += len(head)
        self.advance(len(head))
        if head != planned.header:
            at = first_difference(head, planned.header)
            add("header", "header bytes differ from the planned header", at=at)
        self._parse(path, planned, add)
        return result

    def _parse(self, path: Path, planned: PlannedFile, add: Callable[..., None]) -> None:
        try:
            header = read_header(path)
            with self._lock:
                self.headers[planned.name] = header
        except InvalidInputError as error:
            add("header-invalid", f"not a valid safetensors file: {error.reason}", error.tensor)
        try:
            with safe_open(str(path), framework="numpy") as handle:
                keys = set(handle.keys())
        except Exception as error:
            add("safe_open", f"safetensors.safe_open refused it: {error}")
            return
        names = {t.name for t in planned.tensors}
        for name in sorted(names - keys):
            add("safe_open", "planned tensor missing from the file", name)
        for name in sorted(keys - names):
            add("safe_open", "tensor not in the plan", name)

    def data(self, planned: PlannedFile, lo: int, hi: int) -> _Result:
        """Compare output bytes ``[lo, hi)`` of ``planned`` (cut at tensor ends) with sources."""
        result = _Result()
        tensors = [t for t in planned.tensors if t.length]
        starts = [t.offset for t in tensors]
        with self._lock:
            reported = self._reported.setdefault(planned.name, set())

        def add(reason: str, tensor: str | None = None, at: int | None = None) -> None:
            result.problems.append(Problem("data", planned.name, reason, tensor, at))

        def on_diff(diffs: np.ndarray) -> bool:
            i = 0
            while i < len(diffs):
                at = int(diffs[i])
                tensor = tensors[bisect.bisect_right(starts, at) - 1]
                with self._lock:
                    if len(reported) >= MAX_PER_FILE:
                        add(f"more than {MAX_PER_FILE} tensors differ; the rest are not listed")
                        return False
                    new = tensor.name not in reported
                    reported.add(tensor.name)
                if new:
                    add(_describe(tensor, at), tensor.name, at)
                i = int(np.searchsorted(diffs, tensor.offset + tensor.length))
            return True

        try:
            with open(self.out_dir / planned.name, "rb", buffering=0) as handle:
                result.compared += compare_ranges(
                    handle.fileno(),
                    lo,
                    hi,
                    self._segments(planned),
                    sources=self.sources,
                    on_diff=on_diff,
                    advance=self.advance,
                    cancel=self.cancel,
                    buffer_size=self.buffer_size,
                )
        except OSError as error:
            add(f"cannot read: {error.strerror}")
        except SourceShort as short:
            result.problems.append(
                Problem(
                    "input",
                    f"input:{short.source}",
                    "input file is shorter than its header says (changed since it was read?)",
                    offset=short.offset,
                )
            )
        return result

    def _segments(self, planned: PlannedFile) -> list[Copy]:
        with self._lock:
            found = self._segment_cache.get(planned.name)
            if found is None:
                found = self._segment_cache[planned.name] = file_copies(planned)
            return found

    def copied(self, name: str) -> _Result:
        """Every file and folder below input entry ``name`` against its copy."""
        result = _Result()
        try:
            self._copied(name, result)
        except OSError as error:
            result.problems.append(Problem("io", name, f"cannot compare: {error}"))
        return result

    def _copied(self, name: str, result: _Result) -> None:
        for rel, src, kind in _walk(self.in_dir / name, name):
            dst = self.out_dir / rel
            if kind == "dir":
                if not dst.is_dir():
                    reason = "is not a folder" if dst.exists() else "copied folder missing"
                    result.problems.append(Problem("copy", rel, reason))
                    continue
                expected = {e.name for e in os.scandir(src)}
                for extra in sorted({e.name for e in os.scandir(dst)} - expected):
                    result.problems.append(Problem("copy", f"{rel}/{extra}", "not in the input"))
                continue
            result.files += 1
            self._copied_file(src, dst, rel, result)

    def _copied_file(self, src: Path, dst: Path, rel: str, result: _Result) -> None:
        if not dst.is_file():
            reason = "is not a file" if dst.exists() else "copied file missing"
            result.problems.append(Problem("copy", rel, reason))
            return
        try:
            with open(src, "rb") as a, open(dst, "rb") as b:
                sizes = os.fstat(a.fileno()).st_size, os.fstat(b.fileno()).st_size
                found: list[int] = []

                def on_diff(diffs: np.ndarray) -> bool:
                    found.append(int(diffs[0]))
                    return False

                seg = [Copy("src", 0, 0, min(sizes))]
                result.compared += compare_ranges(
                    b.fileno(),
                    0,
                    min(sizes),
                    seg,
                    sources={"src": a.fileno()},
                    on_diff=on_diff,
                    advance=self.advance,
                    cancel=self.cancel,
                    buffer_size=self.buffer_size,
                )
        except (OSError, SourceShort) as error:
            result.problems.append(Problem("io", rel, f"cannot compare: {error}"))
            return
        if found:
            result.problems.append(Problem("copy", rel, "differs from the input", offset=found[0]))
        elif sizes[0] != sizes[1]:
            reason = f"{sizes[1]} bytes, the input has {sizes[0]}"
            result.problems.append(Problem("copy", rel, reason, offset=min(sizes)))


def _describe(tensor: PlannedTensor, at: int) -> str:
    inside = at - tensor.offset
    position = 0
    for piece in tensor.pieces:
        if position + piece.length > inside:
            where = piece.offset + inside - position
            kind = "fused tensor" if tensor.fused else "tensor"
            return (
                f"{kind} bytes differ from the source: byte {inside} of the tensor, from "
                f"{piece.tensor!r} in input {piece.source} at byte {where}"
            )
        position += piece.length
    return f"tensor bytes differ from the source at byte {inside} of the tensor"


def _walk(path: Path, rel: str, depth: int = 0) -> Iterator[tuple[str, Path, str]]:
    """``(relative name, path, "file"|"dir")`` for ``path`` and, if a folder, its contents."""
    if path.is_dir() and depth < 64:
        yield rel, path, "dir"
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            yield from _walk(Path(entry.path), f"{rel}/{entry.name}", depth + 1)
    else:
        yield rel, path, "file"


def _check_index(plan: Plan, out_dir: Path, headers: Mapping[str, FileHeader]) -> list[Problem]:
    """The output index against the planned one and against the output headers that parsed."""
    assert plan.index is not None
    problems: list[Problem] = []

    def add(reason: str, tensor: str | None = None, at: int | None = None) -> None:
        problems.append(Problem("index", INDEX_NAME, reason, tensor, at))

    try:
        raw = (out_dir / INDEX_NAME).read_bytes()
    except OSError as error:
        problems.append(Problem("io", INDEX_NAME, f"cannot read: {error.strerror}"))
        return problems
    planned = orjson.loads(plan.index)
    try:
        actual = orjson.loads(raw)
        if not isinstance(actual, dict):
            raise ValueError("not an object")
    except ValueError as error:
        add(f"not a valid JSON object: {error}")
        return problems
    weight_map = actual.get("weight_map")
    if not isinstance(weight_map, dict):
        weight_map = {}
        add('no "weight_map" object')
    expected_map: dict[str, str] = planned["weight_map"]
    names = {name: {t.name for t in header.tensors} for name, header in headers.items()}
    for key, name in expected_map.items():
        found = weight_map.get(key)
        if found is None:
            add("tensor missing from the weight_map", key)
        elif found != name:
            add(f"weight_map names {found!r}, planned {name!r}", key)
        elif name in names and key not in names[name]:
            add(f"weight_map names {name!r}, whose header lacks it", key)
    for key in sorted(set(weight_map) - set(expected_map)):
        add(f"weight_map entry not in the plan (names {weight_map[key]!r})", key)
    metadata = actual.get("metadata")
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    if total != plan.total_size:
        add(f"total_size is {total!r}, expected {plan.total_size} (sum of tensor bytes)")
    elif metadata != planned["metadata"]:
        add(f"metadata is {metadata!r}, planned {planned['metadata']!r}")
    if not problems and raw != plan.index:
        add("bytes differ from the planned index", at=first_difference(raw, plan.index))
    return problems


def _file_set(plan: Plan, others: Sequence[str], out_dir: Path) -> list[Problem]:
    expected = {f.name for f in plan.files} | set(others)
    if plan.index is not None:
        expected.add(INDEX_NAME)
    actual = set(os.listdir(out_dir))
    problems = [Problem("missing", n, "planned output file missing") for n in expected - actual]
    for name in actual - expected:
        if name in ALLOWED_EXTRA:
            continue
        if is_temp_name(name):
            problems.append(Problem("temp", name, "temporary file left by an interrupted run"))
        else:
            problems.append(Problem("extra", name, "not part of the conversion"))
    return problems


def _order(problems: list[Problem]) -> tuple[Problem, ...]:
    return tuple(sorted(problems, key=lambda p: (p.file, p.offset or -1, p.kind, p.tensor or "")))


def _total(path: Path) -> int:
    if path.is_dir():
        return sum(_total(Path(e.path)) for e in os.scandir(path))
    return path.stat().st_size if path.is_file() else 0


def verify_conversion(
    input_dir: str | Path,
    output_dir: str | Path,
    rules: RuleSet = HYV3,
    *,
    workers: int = 2,
    allow_external_links: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    buffer_size: int = BUFFER,
) -> VerifyReport:
    """Check ``output_dir`` against the plan re-derived from ``input_dir``; never raises for a
    mismatch (see :class:`VerifyReport`). Raises :class:`InvalidInputError` when the input
    cannot be read or planned, :class:`UsageError` when ``output_dir`` is not a directory."""
    started = time.monotonic()
    in_dir, out_dir = Path(input_dir), Path(output_dir)
    if not out_dir.is_dir():
        raise UsageError("output is not a directory", path=out_dir)
    checkpoint = load_checkpoint(in_dir, allow_external_links=allow_external_links)
    plan = plan_checkpoint(checkpoint, rules)
    progress = progress or Progress()
    cancel = cancel or threading.Event()
    problems = _file_set(plan, checkpoint.others, out_dir)
    present = set(os.listdir(out_dir))
    shards = [f for f in plan.files if f.name in present]
    others = [n for n in checkpoint.others if n in present]
    progress.start(sum(f.size for f in shards) + sum(_total(in_dir / n) for n in others))
    fds: dict[str, int] = {}
    try:
        for source in checkpoint.sources:
            try:
                fds[source.name] = os.open(in_dir / source.name, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as error:
                path = in_dir / source.name
                raise InvalidInputError(f"cannot open: {error.strerror}", path=path) from error
        verifier = _Verifier(
            out_dir,
            in_dir,
            sources=fds,
            advance=progress.advance,
            cancel=cancel,
            buffer_size=buffer_size,
        )
        jobs: list[Callable[[], _Result]] = [partial(verifier.shard, f) for f in shards]
        for planned in sorted(shards, key=lambda f: (-f.size, f.name)):
            for lo, hi in _slices(planned, SLICE):
                jobs.append(partial(verifier.data, planned, lo, hi))
        jobs += [partial(verifier.copied, n) for n in others]
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="verify") as pool:
            futures = [pool.submit(job) for job in jobs]
            try:
                results = [future.result() for future in futures]
            except BaseException:
                cancel.set()
                raise
        if plan.index is not None and INDEX_NAME in present:
            results.append(_Result(_check_index(plan, out_dir, verifier.headers), files=1))
    finally:
        for fd in fds.values():
            os.close(fd)
        progress.finish()
    for result in results:
        problems += result.problems
    return VerifyReport(
        mode="plan",
        input=str(in_dir),
        output=str(out_dir),
        problems=_order(problems),
        files_checked=sum(r.files for r in results),
        tensors_checked=sum(r.tensors for r in results),
        bytes_compared=sum(r.compared for r in results),
        seconds=time.monotonic() - started,
    )
