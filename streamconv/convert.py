"""Orchestration of one conversion: check paths, read the checkpoint, plan, write, publish.

Order of publication: the shards, then the other files of the input directory, then the index,
last, so a directory with an index is a finished conversion.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import INDEX_NAME, Checkpoint, SourceFile, load_checkpoint
from .errors import OutputError, SourceChangedError, UsageError
from .plan import Plan, build_plan
from .progress import Progress
from .rules import HYV3, RuleSet
from .writer import (
    FileWriter,
    WriteOptions,
    copy_entry,
    open_sources,
    publish_bytes,
    write_all,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConvertOptions:
    rules: RuleSet = HYV3
    write: WriteOptions = field(default_factory=WriteOptions)
    allow_external_links: bool = False


@dataclass(frozen=True, slots=True)
class ConvertResult:
    output: Path
    plan: Plan
    seconds: float
    bytes_written: int
    backends: tuple[str, ...]

    @property
    def throughput(self) -> float:
        """Bytes per second."""
        return self.bytes_written / self.seconds if self.seconds > 0 else 0.0


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def check_directories(input_dir: Path, output_dir: Path) -> None:
    """Refuse an output equal to or inside the input, and a non-empty output directory."""
    source = input_dir.resolve()
    target = output_dir.resolve()
    if target == source or source in target.parents:
        raise UsageError(
            "output directory is the input directory or inside it",
            path=output_dir,
            hint="choose an output directory outside the input",
        )
    if target in source.parents:
        raise UsageError("output directory contains the input directory", path=output_dir)
    if output_dir.exists():
        if not output_dir.is_dir():
            raise UsageError("output exists and is not a directory", path=output_dir)
        if any(output_dir.iterdir()):
            raise UsageError(
                "output directory is not empty",
                path=output_dir,
                hint="choose a new or empty directory",
            )


def _check_space(output_dir: Path, needed: int) -> None:
    info = os.statvfs(output_dir)
    available = info.f_bavail * info.f_frsize
    if needed > available:
        raise OutputError(
            f"not enough free space: the output needs {needed} bytes, {available} are available",
            path=output_dir,
        )


def _entry_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _check_unchanged(checkpoint: Checkpoint) -> None:
    for source in checkpoint.sources:
        path = checkpoint.root / source.name
        info = os.stat(path)
        now = SourceFile(source.name, info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)
        if now != source:
            raise SourceChangedError("input file changed during the conversion", path=path)


def plan_checkpoint(checkpoint: Checkpoint, rules: RuleSet) -> Plan:
    metadata = dict(checkpoint.index_metadata) if checkpoint.index_metadata is not None else None
    return build_plan(
        checkpoint.shards,
        rules,
        index_metadata=metadata,
        write_index=True if checkpoint.layout == "index" else None,
    )


def convert(
    input_dir: str | Path,
    output_dir: str | Path,
    options: ConvertOptions | None = None,
    *,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    on_plan: Callable[[Plan], None] | None = None,
) -> ConvertResult:
    """Convert the checkpoint in ``input_dir`` into ``output_dir``."""
    options = options or ConvertOptions()
    progress = progress or Progress()
    cancel = cancel or threading.Event()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_directories(input_dir, output_dir)
    started = time.monotonic()
    checkpoint = load_checkpoint(input_dir, allow_external_links=options.allow_external_links)
    plan = plan_checkpoint(checkpoint, options.rules)
    if on_plan is not None:
        on_plan(plan)
    log.info(
        "plan: %d tensors in %d files, %d bytes; %d expert groups (%d split across shards)",
        plan.tensor_count,
        len(plan.files),
        plan.total_bytes,
        len(plan.groups),
        sum(g.split for g in plan.groups),
    )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create: {error.strerror}", path=output_dir) from error
    others = [input_dir / name for name in checkpoint.others]
    needed = plan.total_bytes + sum(_entry_size(p) for p in others) + len(plan.index or b"")
    _check_space(output_dir, needed)

    sync = options.write.sync
    paths = {s.name: input_dir / s.name for s in checkpoint.sources}
    progress.start(plan.total_bytes)
    try:
        with open_sources(paths) as fds:
            writer = FileWriter(output_dir, fds, options.write, progress.advance, cancel)
            write_all(plan.files, writer, options.write.workers)
        for path in others:
            copy_entry(path, output_dir, path.name, sync=sync)
        _check_unchanged(checkpoint)
        if plan.index is not None:
            publish_bytes(output_dir, INDEX_NAME, plan.index, sync=sync)
    finally:
        progress.finish()
    seconds = time.monotonic() - started
    return ConvertResult(
        output=output_dir,
        plan=plan,
        seconds=seconds,
        bytes_written=plan.total_bytes,
        backends=tuple(sorted(writer.backends_used)),
    )
