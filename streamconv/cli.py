"""The command line: parse arguments, configure logging, run, map errors to exit codes.

With :mod:`streamconv.commands`, the only code that prints, configures logging or decides exit
codes. Exit codes: 0 success, 1 verification found mismatches, 2 usage, 3 invalid input,
4 I/O or environment, 130 interrupted (SIGINT), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from . import __version__, commands
from .convert import default_workers
from .copyengine import BACKENDS
from .errors import EXIT_INTERRUPTED, EXIT_IO, EXIT_USAGE, StreamconvError
from .rules import PRESETS
from .synth import SynthSpec, parse_size

EXIT_TERMINATED = 143


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


def _add_common(sub: argparse.ArgumentParser, *, preset: bool = True) -> None:
    sub.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    sub.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    if preset:
        sub.add_argument(
            "--preset", choices=sorted(PRESETS), default="hyv3", help="rule set (default: hyv3)"
        )
        sub.add_argument(
            "--allow-external-links",
            action="store_true",
            help="follow shard symlinks that point outside the input directory",
        )


def _workers(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help=f"parallel workers (default: {default_workers()})",
    )


def _add_convert(commands_: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    conv = commands_.add_parser(
        "convert",
        help="convert a checkpoint (inner -> outer layout)",
        description="Convert the checkpoint in INPUT_DIR into OUTPUT_DIR. Run the same "
        "command again after an interruption to resume.",
    )
    _add_common(conv)
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
    _workers(conv)
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
        help="discard the output of a previous run in OUTPUT_DIR and start over",
    )
    conv.add_argument(
        "--verify",
        action="store_true",
        help="verify the output byte for byte against the input afterwards",
    )
    conv.add_argument(
        "--manifest",
        action="store_true",
        help="write streamconv-manifest.json (sha256 of every output file)",
    )
    conv.add_argument(
        "--report",
        type=Path,
        metavar="FILE.json",
        help="write a machine-readable summary of the run",
    )
    conv.set_defaults(run=commands.run_convert, json=False)


def _add_tools(commands_: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ins = commands_.add_parser(
        "inspect",
        help="show a checkpoint: shards, dtypes, expert groups, problems",
        description="Inspect a checkpoint directory or one .safetensors file (headers only).",
    )
    _add_common(ins)
    ins.add_argument("path", metavar="PATH")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.set_defaults(run=commands.run_inspect)

    pln = commands_.add_parser(
        "plan",
        help="dry run: what a conversion would write",
        description="Plan the conversion of INPUT_DIR without writing anything.",
    )
    _add_common(pln)
    pln.add_argument("input", metavar="INPUT_DIR")
    pln.add_argument(
        "--output",
        metavar="OUTPUT_DIR",
        help="where the output would go (for the free-space check)",
    )
    pln.add_argument("--json", action="store_true", help="the serialised plan, as JSON")
    pln.set_defaults(run=commands.run_plan)

    ver = commands_.add_parser(
        "verify",
        help="check a converted output byte for byte",
        description="Verify OUTPUT_DIR against the conversion of INPUT_DIR (or, with "
        "--manifest, against the manifest in OUTPUT_DIR alone). Exit 1 on any mismatch.",
    )
    _add_common(ver)
    ver.add_argument("input", metavar="INPUT_DIR")
    ver.add_argument("output", nargs="?", metavar="OUTPUT_DIR")
    _workers(ver)
    ver.add_argument("--json", action="store_true", help="machine-readable report")
    ver.add_argument(
        "--manifest",
        action="store_true",
        help="check OUTPUT_DIR (the only argument) against its manifest",
    )
    ver.add_argument(
        "--write-manifest",
        action="store_true",
        help="after a successful verification, write the manifest",
    )
    ver.set_defaults(run=commands.run_verify)


def _add_synth(commands_: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    syn = commands_.add_parser(
        "synth",
        help="write a synthetic HYV3 inner-layout checkpoint",
        description="Write a deterministic synthetic checkpoint (for demos, tests, benchmarks).",
    )
    _add_common(syn, preset=False)
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
    syn.set_defaults(run=commands.run_synth)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamconv",
        description="Convert sharded safetensors checkpoints without loading them.",
    )
    parser.add_argument("--version", action="version", version=f"streamconv {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(subcommands)
    _add_tools(subcommands)
    _add_synth(subcommands)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("streamconv: %(message)s"))
    root = logging.getLogger("streamconv")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_USAGE
    _configure_logging(args)
    run: Callable[[argparse.Namespace], int] = args.run
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run(args)
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
