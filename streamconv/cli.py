"""The command line: parse arguments, configure logging, run, map errors to exit codes.

This is the only module that prints, configures logging or decides exit codes.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from . import __version__
from .convert import ConvertOptions, convert, default_workers
from .copyengine import BACKENDS
from .errors import EXIT_INTERRUPTED, EXIT_IO, EXIT_USAGE, StreamconvError, UsageError
from .progress import BarProgress, LineProgress, Progress, human_bytes
from .rules import PRESETS
from .synth import SynthSpec, checkpoint_bytes, parse_size, synthesize
from .writer import WriteOptions

EXIT_TERMINATED = 143
log = logging.getLogger("streamconv")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, delivered to the main thread like Ctrl-C."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamconv",
        description="Convert sharded safetensors checkpoints without loading them.",
    )
    parser.add_argument("--version", action="version", version=f"streamconv {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    common.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    conv = commands.add_parser(
        "convert",
        parents=[common],
        help="convert a checkpoint (inner -> outer layout)",
        description="Convert the checkpoint in INPUT_DIR into OUTPUT_DIR.",
    )
    conv.add_argument("input", nargs="?", metavar="INPUT_DIR")
    conv.add_argument("output", nargs="?", metavar="OUTPUT_DIR")
    conv.add_argument(
        "--input_dir",
        "--input-dir",
        dest="input_opt",
        metavar="DIR",
        help="same as INPUT_DIR (the spelling of the tool this replaces)",
    )
    conv.add_argument(
        "--output_dir", "--output-dir", dest="output_opt", metavar="DIR", help="same as OUTPUT_DIR"
    )
    conv.add_argument(
        "--preset", choices=sorted(PRESETS), default="hyv3", help="rule set (default: hyv3)"
    )
    conv.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help=f"parallel output shards (default: {default_workers()})",
    )
    conv.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="copy backend (default: auto, the fastest that works per file pair)",
    )
    conv.add_argument(
        "--no-sync",
        action="store_true",
        help="skip fsync (faster; output may be lost on power failure)",
    )
    conv.add_argument(
        "--restart",
        action="store_true",
        help="discard the output of a previous, different run in OUTPUT_DIR and start over",
    )
    conv.add_argument(
        "--allow-external-links",
        action="store_true",
        help="follow shard symlinks that point outside the input directory",
    )

    syn = commands.add_parser(
        "synth",
        parents=[common],
        help="write a synthetic HYV3 inner-layout checkpoint",
        description="Write a deterministic synthetic checkpoint (for demos, tests, benchmarks).",
    )
    defaults = SynthSpec()
    syn.add_argument("output", metavar="OUTPUT_DIR")
    syn.add_argument("--layers", type=_positive, default=defaults.layers)
    syn.add_argument("--experts", type=_positive, default=defaults.experts)
    syn.add_argument("--hidden", type=_positive, default=defaults.hidden)
    syn.add_argument("--inter", type=_positive, default=defaults.inter)
    syn.add_argument("--vocab", type=_positive, default=defaults.vocab)
    syn.add_argument("--dense-layers", type=int, default=defaults.dense_layers)
    syn.add_argument("--dtype", default=defaults.dtype)
    syn.add_argument(
        "--shard-size",
        type=_size,
        default=defaults.shard_size,
        help="target shard size, e.g. 64M, 1.5G (default: 64M)",
    )
    syn.add_argument(
        "--scatter",
        action="store_true",
        help="spread each layer's experts over non-adjacent shards",
    )
    syn.add_argument("--single-file", action="store_true", help="one model.safetensors")
    syn.add_argument("--no-index", action="store_true", help="shards without an index file")
    syn.add_argument("--seed", type=int, default=defaults.seed)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("streamconv: %(message)s"))
    root = logging.getLogger("streamconv")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _progress(args: argparse.Namespace) -> Progress:
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


def _run_convert(args: argparse.Namespace) -> int:
    source = _one(args.input, args.input_opt, "INPUT_DIR")
    target = _one(args.output, args.output_opt, "OUTPUT_DIR")
    workers = args.workers or default_workers()
    options = ConvertOptions(
        rules=PRESETS[args.preset],
        write=WriteOptions(backend=args.backend, workers=workers, sync=not args.no_sync),
        allow_external_links=args.allow_external_links,
    )
    result = convert(
        source,
        target,
        options,
        progress=_progress(args),
        cancel=threading.Event(),
        restart=args.restart,
    )
    plan = result.plan
    if result.already_complete:
        print(f"{result.output} already holds this conversion, complete: nothing to do")
        return 0
    kept = f", {result.kept} shards kept from the previous run" if result.kept else ""
    split = sum(g.split for g in plan.groups)
    print(
        f"converted {plan.tensor_count} tensors into {len(plan.files)} shards "
        f"({len(plan.groups)} expert groups fused, {split} split across shards): "
        f"{human_bytes(result.bytes_written)} in {result.seconds:.2f} s "
        f"({human_bytes(result.throughput)}/s), backend {'+'.join(result.backends) or 'none'}, "
        f"{workers} worker{'s' if workers > 1 else ''}"
        f"{', no fsync' if args.no_sync else ''}{kept} -> {result.output}"
    )
    return 0


def _run_synth(args: argparse.Namespace) -> int:
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
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_USAGE
    _configure_logging(args)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.command == "convert":
            return _run_convert(args)
        return _run_synth(args)
    except StreamconvError as error:
        if args.debug:
            traceback.print_exc()
        print(f"streamconv: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:
        if args.debug:
            traceback.print_exc()
        where = f"{error.filename}: " if error.filename else ""
        print(f"streamconv: error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_IO
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, _Terminated)
        print(
            f"streamconv: {'terminated' if terminated else 'interrupted'}; no partial file was "
            "left under a final name; run the same command again to resume",
            file=sys.stderr,
        )
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
