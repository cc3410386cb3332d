"""One function per subcommand: call the library, print the result, return an exit code.

Printing happens here and in :mod:`streamconv.cli` only. Errors are raised as
:class:`~streamconv.errors.StreamconvError` and turned into one line by the CLI.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import threading
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from .convert import (
    ConvertOptions,
    ConvertResult,
    convert,
    default_workers,
    entry_size,
    plan_checkpoint,
)
from .errors import EXIT_OK, InvalidInputError, StreamconvError, UsageError
from .progress import BarProgress, LineProgress, Progress, human_bytes
from .rules import PRESETS
from .writer import WriteOptions

EXIT_MISMATCH = 1


def progress_for(args: argparse.Namespace) -> Progress:
    if args.quiet:
        return Progress()
    if sys.stderr.isatty():
        return BarProgress(sys.stderr)
    return LineProgress(sys.stderr)


def _one(positional: str | None, option: str | None, what: str) -> Path:
    if positional and option and positional != option:
        raise UsageError(f"{what} given twice ({positional!r} and {option!r})")
    value = positional or option
    if not value:
        raise UsageError(f"{what} is required")
    return Path(value)


def _dump(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def _peak_rss() -> int:
    """Peak resident memory of this process, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Warnings(logging.Handler):
    """Collects warning lines of a run, for --report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _write_report(path: Path, report: dict[str, Any]) -> None:
    try:
        path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    except OSError as error:
        raise UsageError(f"cannot write the report: {error.strerror}", path=path) from error


def _report(
    args: argparse.Namespace,
    *,
    source: Path,
    target: Path,
    workers: int,
    result: ConvertResult | None,
    error: StreamconvError | None,
    warnings: list[str],
    verified: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The --report document; ``ok`` is false when the run failed or verification did."""
    verify = None
    if verified is not None:
        verify = {k: verified[k] for k in ("ok", "bytes_compared", "seconds", "throughput")}
        verify["problems"] = len(verified["problems"])
    report: dict[str, Any] = {
        "ok": error is None and (verify is None or bool(verify["ok"])),
        "verify": verify,
        "input": str(source),
        "output": str(target),
        "preset": args.preset,
        "workers": workers,
        "backend": args.backend,
        "sync": not args.no_sync,
        "peak_rss": _peak_rss(),
        "warnings": warnings,
        "error": None if error is None else {"message": str(error), "exit_code": error.exit_code},
    }
    if result is not None:
        plan = result.plan
        report.update(
            {
                "backends_used": list(result.backends),
                "shards": len(plan.files),
                "tensors": plan.tensor_count,
                "groups": len(plan.groups),
                "split_groups": sum(g.split for g in plan.groups),
                "total_size": plan.total_size,
                "bytes_written": result.bytes_written,
                "seconds": result.seconds,
                "throughput": result.throughput,
                "kept": result.kept,
                "already_complete": result.already_complete,
                "fingerprint": result.fingerprint,
            }
        )
    return report


def run_convert(args: argparse.Namespace) -> int:
    source = _one(args.input, args.input_opt, "INPUT_DIR")
    target = _one(args.output, args.output_opt, "OUTPUT_DIR")
    workers = args.workers or default_workers()
    options = ConvertOptions(
        rules=PRESETS[args.preset],
        write=WriteOptions(backend=args.backend, workers=workers, sync=not args.no_sync),
        allow_external_links=args.allow_external_links,
    )
    collected = _Warnings()
    describe = partial(
        _report, args, source=source, target=target, workers=workers, warnings=collected.lines
    )
    logging.getLogger("streamconv").addHandler(collected)
    result = None
    try:
        result = convert(
            source,
            target,
            options,
            progress=progress_for(args),
            cancel=threading.Event(),
            restart=args.restart,
        )
    except StreamconvError as error:
        if args.report:
            _write_report(args.report, describe(result=None, error=error))
        raise
    finally:
        logging.getLogger("streamconv").removeHandler(collected)
    _print_summary(result, workers, args.no_sync)
    code, verified = EXIT_OK, None
    if args.manifest:
        from .manifest import write_manifest  # noqa: PLC0415  (only when asked for)

        path = write_manifest(target, result.fingerprint, workers=workers, sync=not args.no_sync)
        print(f"wrote {path}")
    if args.verify:
        code, verified = _verify(args, source, target, workers)
    if args.report:
        _write_report(args.report, describe(result=result, error=None, verified=verified))
    return code


def _print_summary(result: ConvertResult, workers: int, no_sync: bool) -> None:
    plan = result.plan
    if result.already_complete:
        print(f"{result.output} already holds this conversion, complete: nothing to do")
        return
    split = sum(g.split for g in plan.groups)
    kept = f", {result.kept} shards kept from the previous run" if result.kept else ""
    print(
        f"converted {plan.tensor_count} tensors into {len(plan.files)} shards "
        f"({len(plan.groups)} expert groups fused, {split} split across shards): "
        f"{human_bytes(result.bytes_written)} in {result.seconds:.2f} s "
        f"({human_bytes(result.throughput)}/s), backend {'+'.join(result.backends) or 'none'}, "
        f"{workers} worker{'s' if workers > 1 else ''}"
        f"{', no fsync' if no_sync else ''}{kept} -> {result.output}"
    )


def _verify(
    args: argparse.Namespace, source: Path, target: Path, workers: int
) -> tuple[int, dict[str, Any]]:
    """Verify, print the report, and return the exit code and the report's data."""
    from .verify import render_verify, verify_conversion  # noqa: PLC0415

    report = verify_conversion(
        source,
        target,
        PRESETS[args.preset],
        workers=workers,
        allow_external_links=args.allow_external_links,
        progress=progress_for(args),
    )
    data = report.to_dict()
    if getattr(args, "json", False):
        _dump(data)
    else:
        print(render_verify(report))
    return (EXIT_OK if report.ok else EXIT_MISMATCH), data


def run_verify(args: argparse.Namespace) -> int:
    workers = args.workers or default_workers()
    if args.manifest:
        from .manifest import check_manifest  # noqa: PLC0415
        from .verify import render_verify  # noqa: PLC0415

        if args.output is not None:
            raise UsageError("verify --manifest takes only OUTPUT_DIR")
        report = check_manifest(Path(args.input), workers=workers, progress=progress_for(args))
        _dump(report.to_dict()) if args.json else print(render_verify(report))
        return EXIT_OK if report.ok else EXIT_MISMATCH
    if args.output is None:
        raise UsageError("verify needs INPUT_DIR and OUTPUT_DIR (or --manifest OUTPUT_DIR)")
    source, target = Path(args.input), Path(args.output)
    code, _ = _verify(args, source, target, workers)
    if args.write_manifest and code == EXIT_OK:
        from .checkpoint import load_checkpoint  # noqa: PLC0415
        from .manifest import write_manifest  # noqa: PLC0415
        from .state import fingerprint  # noqa: PLC0415

        checkpoint = load_checkpoint(source, allow_external_links=args.allow_external_links)
        plan = plan_checkpoint(checkpoint, PRESETS[args.preset])
        path = write_manifest(target, fingerprint(checkpoint, plan), workers=workers)
        if not args.json:
            print(f"wrote {path}")
    return code


def run_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_path, render_inspection  # noqa: PLC0415

    found = inspect_path(
        Path(args.path), PRESETS[args.preset], allow_external_links=args.allow_external_links
    )
    _dump(found.to_dict()) if args.json else print(render_inspection(found))
    return EXIT_OK


def _available(directory: Path) -> tuple[str, int]:
    """The nearest existing ancestor of ``directory`` and the bytes free on its filesystem."""
    probe = directory.resolve()
    while not probe.exists():
        probe = probe.parent
    info = os.statvfs(probe)
    return str(probe), info.f_bavail * info.f_frsize


def run_plan(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint  # noqa: PLC0415

    source = Path(args.input)
    try:
        checkpoint = load_checkpoint(source, allow_external_links=args.allow_external_links)
        plan = plan_checkpoint(checkpoint, PRESETS[args.preset])
    except InvalidInputError as error:
        if not args.json:
            raise
        problems = list(error.problems) or [str(error)]
        _dump({"ok": False, "problems": problems, "exit_code": error.exit_code})
        return error.exit_code
    others = sum(entry_size(checkpoint.root / name) for name in checkpoint.others)
    needed = plan.total_bytes + others + len(plan.index or b"")
    where, available = _available(Path(args.output) if args.output else source)
    summary = {
        "files": len(plan.files),
        "tensors": plan.tensor_count,
        "groups": len(plan.groups),
        "split_groups": sum(g.split for g in plan.groups),
        "bytes_to_copy": plan.total_size,
        "output_bytes": plan.total_bytes,
        "other_bytes": others,
        "space_needed": needed,
        "space_available": available,
        "space_checked_at": where,
        "fits": needed <= available,
    }
    if args.json:
        _dump({"ok": True, "problems": [], "summary": summary, "plan": plan.to_dict()})
        return EXIT_OK
    print(f"plan for {source} (preset {args.preset}):")
    for planned in plan.files:
        fused = sum(t.fused for t in planned.tensors)
        print(
            f"  {planned.name}  {human_bytes(planned.size):>10}  {len(planned.tensors):5d} "
            f"tensors ({fused} fused)"
        )
    split = [g for g in plan.groups if g.split]
    print(f"  {len(plan.groups)} expert groups fused, {len(split)} split across shards")
    for group in split[:20]:
        print(
            f"    {group.prefix}  {group.experts} experts from {', '.join(group.sources)} "
            f"-> {group.target}"
        )
    if len(split) > 20:
        print(f"    ... and {len(split) - 20} more split groups")
    print(
        f"  bytes to copy: {human_bytes(plan.total_size)}; space needed: {human_bytes(needed)}"
        f"; available at {where}: {human_bytes(available)}"
        f"{'' if needed <= available else '  (NOT ENOUGH)'}"
    )
    return EXIT_OK


def run_synth(args: argparse.Namespace) -> int:
    from .synth import SynthSpec, checkpoint_bytes, synthesize  # noqa: PLC0415

    try:
        spec = SynthSpec(
            layers=args.layers,
            experts=args.experts,
            hidden=args.hidden,
            inter=args.inter,
            vocab=args.vocab,
            dense_layers=args.dense_layers,
            dtype=args.dtype,
            shard_size=args.shard_size,
            scatter=args.scatter,
            single_file=args.single_file,
            index=not args.no_index,
            seed=args.seed,
        )
    except ValueError as error:
        raise UsageError(str(error)) from error
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise UsageError("output directory is not empty", path=out)
    paths = synthesize(out, spec)
    print(f"wrote {human_bytes(checkpoint_bytes(spec))} of tensors in {len(paths)} files -> {out}")
    return EXIT_OK
