"""Orchestration of one conversion: check paths, read the checkpoint, plan, write, publish.

Order of publication: the shards, then the other files of the input directory, then the index,
last, so a directory with an index is a finished conversion.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .checkpoint import INDEX_NAME, Checkpoint, SourceFile, load_checkpoint
from .errors import OutputError, SourceChangedError, UsageError
from .plan import Plan, build_plan
from .progress import Progress
from .resume import check_output, decide
from .rules import HYV3, RuleSet
from .state import Published, RunState, fingerprint, output_lock, save_state
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
    kept: int = 0  # shards kept from a previous run
    already_complete: bool = False
    fingerprint: str = ""  # of the plan and its inputs (see streamconv.state)

    @property
    def throughput(self) -> float:
        """Bytes per second."""
        return self.bytes_written / self.seconds if self.seconds > 0 else 0.0


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def check_directories(input_dir: Path, output_dir: Path) -> None:
    """Refuse an output directory equal to, inside, or containing the input directory."""
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


def _check_space(output_dir: Path, needed: int) -> None:
    info = os.statvfs(output_dir)
    available = info.f_bavail * info.f_frsize
    if needed > available:
        raise OutputError(
            f"not enough free space: the output needs {needed} bytes, {available} are available",
            path=output_dir,
        )


def entry_size(path: Path) -> int:
    """Bytes of a file, or of every file below a folder."""
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


def _make_durable(output_dir: Path, state: RunState) -> None:
    """Kept shards that a --no-sync run wrote are fsynced before a durable run relies on them."""
    for record in state.published:
        if record.checksum is None:
            fd = os.open(output_dir / record.name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


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
    restart: bool = False,
) -> ConvertResult:
    """Convert the checkpoint in ``input_dir`` into ``output_dir``.

    Running it again after an interruption continues where the previous run stopped; a
    finished output is left alone. ``restart`` discards a previous run's output first.
    """
    options = options or ConvertOptions()
    progress = progress or Progress()
    cancel = cancel or threading.Event()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_directories(input_dir, output_dir)
    started = time.monotonic()
    previous = check_output(output_dir, restart=restart)
    checkpoint = load_checkpoint(input_dir, allow_external_links=options.allow_external_links)
    plan = plan_checkpoint(checkpoint, options.rules)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create: {error.strerror}", path=output_dir) from error
    with output_lock(output_dir):
        return _run(
            checkpoint=checkpoint,
            plan=plan,
            output_dir=output_dir,
            previous=previous,
            options=options,
            progress=progress,
            cancel=cancel,
            restart=restart,
            started=started,
        )


def _run(
    *,
    checkpoint: Checkpoint,
    plan: Plan,
    output_dir: Path,
    previous: RunState | None,
    options: ConvertOptions,
    progress: Progress,
    cancel: threading.Event,
    restart: bool,
    started: float,
) -> ConvertResult:
    sync = options.write.sync
    fp = fingerprint(checkpoint, plan)
    decision = decide(output_dir, previous, plan, fp, checkpoint.others, restart=restart)
    if decision.complete:
        log.debug("%s already holds this conversion, complete", output_dir)
        return ConvertResult(
            output_dir,
            plan,
            time.monotonic() - started,
            0,
            (),
            kept=len(decision.keep),
            already_complete=True,
            fingerprint=fp,
        )
    todo = [f for f in plan.files if f.name not in decision.keep]
    if decision.keep:
        log.info("resuming: %d of %d shards already done", len(decision.keep), len(plan.files))
    if sync:
        _make_durable(output_dir, decision.state)
    others = [checkpoint.root / name for name in checkpoint.others]
    needed = sum(f.size for f in todo) + sum(entry_size(p) for p in others) + len(plan.index or b"")
    _check_space(output_dir, needed)
    log.info(
        "plan: %d tensors in %d files, %d bytes; %d expert groups (%d split across shards)",
        plan.tensor_count,
        len(plan.files),
        plan.total_bytes,
        len(plan.groups),
        sum(g.split for g in plan.groups),
    )

    state = decision.state
    save_state(output_dir, state, sync=sync)

    def published(item: Published) -> None:
        nonlocal state
        state = state.with_published(item)
        save_state(output_dir, state, sync=sync)

    paths = {s.name: checkpoint.root / s.name for s in checkpoint.sources}
    written = sum(f.size for f in todo)
    progress.start(written)
    try:
        with open_sources(paths) as fds:
            writer = FileWriter(
                directory=output_dir,
                sources=fds,
                options=options.write,
                progress=progress.advance,
                cancel=cancel,
                on_published=published,
            )
            write_all(todo, writer, options.write.workers)
        for path in others:
            copy_entry(path, output_dir, path.name, sync=sync)
        _check_unchanged(checkpoint)
        if plan.index is not None:
            publish_bytes(output_dir, INDEX_NAME, plan.index, sync=sync)
        save_state(output_dir, replace(state, complete=True), sync=sync)
    finally:
        progress.finish()
    return ConvertResult(
        output=output_dir,
        plan=plan,
        seconds=time.monotonic() - started,
        bytes_written=written,
        backends=tuple(sorted(writer.backends_used)),
        kept=len(decision.keep),
        already_complete=False,
        fingerprint=fp,
    )
