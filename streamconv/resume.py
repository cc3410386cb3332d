"""Deciding what a run may keep from a previous run into the same output directory.

A shard is kept only when the recorded state says this very plan published it, and it is still
the file that was published: same size and identity (inode, mtime), or same recorded checksum.
"Exists and is not empty" is never enough. Anything else is written again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import INDEX_NAME
from .errors import OutputError, UsageError
from .plan import Plan
from .state import STATE_DIR, Published, RunState, load_state, path_checksum, state_dir
from .writer import fsync_dir, is_temp_name

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decision:
    state: RunState  # the state to continue from (kept shards already in it)
    keep: frozenset[str]  # planned shards that need no writing
    complete: bool  # the whole output is already there and committed
    resumed: bool  # a previous run of this plan was found


def foreign_entries(output_dir: Path) -> list[str]:
    """Entries of an existing output directory that are not streamconv's run state."""
    if not output_dir.exists():
        return []
    return sorted(e for e in os.listdir(output_dir) if e != STATE_DIR)


def check_output(output_dir: Path, *, restart: bool = False) -> RunState | None:
    """The previous run's state, or None for a fresh directory; refuses a foreign one.

    With ``restart``, an unreadable state still marks the directory as a previous run's (to be
    discarded), instead of being an error.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError("output exists and is not a directory", path=output_dir)
    try:
        state = load_state(output_dir) if (state_dir(output_dir)).is_dir() else None
    except UsageError:
        if not restart:
            raise
        log.warning("discarding an unreadable run state in %s", output_dir)
        state = RunState(fingerprint="", outputs=())
    if state is None and foreign_entries(output_dir):
        raise UsageError(
            "output directory is not empty and holds no streamconv run",
            path=output_dir,
            hint="choose a new or empty directory",
        )
    return state


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _remove_temps(output_dir: Path) -> None:
    for name in os.listdir(output_dir):
        if is_temp_name(name):
            log.info("removing %s left by an interrupted run", name)
            _remove(output_dir / name)


def _still_published(output_dir: Path, record: Published, planned_size: int) -> bool:
    path = output_dir / record.name
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return False
    if record.size != planned_size or info.st_size != planned_size:
        return False
    if record.same_file(info):
        return True
    return record.checksum is not None and path_checksum(path, planned_size) == record.checksum


def decide(
    output_dir: Path,
    previous: RunState | None,
    plan: Plan,
    fingerprint: str,
    others: tuple[str, ...],
    *,
    restart: bool,
) -> Decision:
    """Compare the previous run's state with this plan; clean what cannot be kept.

    ``others`` are the input's other entries, copied unchanged.
    """
    index_names = (INDEX_NAME,) if plan.index is not None else ()
    outputs = (*(f.name for f in plan.files), *others, *index_names)
    try:
        if previous is not None and (restart or previous.fingerprint != fingerprint):
            if not restart:
                raise UsageError(
                    "output directory holds a conversion of different inputs or options",
                    path=output_dir,
                    hint="pass --restart to discard it and convert again",
                )
            log.info("--restart: removing the previous run's output")
            for name in previous.outputs:
                _remove(output_dir / name)
            previous = None
        _remove_temps(output_dir)
        if previous is None:
            return Decision(RunState(fingerprint, outputs), frozenset(), False, False)

        keep: set[str] = set()
        kept: list[Published] = []
        for planned in plan.files:
            record = previous.find(planned.name)
            if record is not None and _still_published(output_dir, record, planned.size):
                keep.add(planned.name)
                kept.append(Published.of(output_dir / planned.name, record.size, record.checksum))
        index = output_dir / INDEX_NAME
        index_ok = plan.index is None or (index.is_file() and index.read_bytes() == plan.index)
        others_ok = all((output_dir / name).exists() for name in others)
        complete = previous.complete and len(keep) == len(plan.files) and index_ok and others_ok
        if not complete and index.exists():
            # The index is the commit point: withdraw it while the directory is repaired.
            index.unlink()
            fsync_dir(output_dir)
        state = RunState(fingerprint, outputs, tuple(kept), complete)
        return Decision(state, frozenset(keep), complete, True)
    except OSError as error:
        raise OutputError(
            f"cannot prepare the output: {error.strerror}", path=output_dir
        ) from error
