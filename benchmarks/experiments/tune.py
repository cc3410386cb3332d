"""Copy-engine tuning experiments (issue 3 item 5), measured side by side.

Each experiment is a list of variants of ``engine.py`` (and, for reference, the streamconv CLI
and ``cp -a``) run on the same generated checkpoint, in alternating order after a warm-up
round, with the harness of ``benchmarks/run.py`` (wall time, peak RSS). Results go to
``benchmarks/experiments/results/`` (``tune.json`` and ``tune.md``).

Usage: python benchmarks/experiments/tune.py [--only chunk buffer ...] [--rounds 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import harness  # noqa: E402
from harness import fmt_range, measure, settle, stats  # noqa: E402
from report import table  # noqa: E402

from streamconv.synth import SynthSpec, checkpoint_bytes, synthesize  # noqa: E402

GB = 1e9
MB = 1e6
ENGINE = str(HERE / "engine.py")
STREAMCONV = str(Path(sys.executable).parent / "streamconv")

Variant = tuple[str, list[str]]  # (name, argv template with {src} {dst} {report})


def eng(*flags: str) -> list[str]:
    return [sys.executable, ENGINE, "{src}", "{dst}", "--report", "{report}", *flags]


def cli(*flags: str) -> list[str]:
    return [STREAMCONV, "convert", "{src}", "{dst}", "-q", *flags]


CP = ["cp", "-a", "{src}", "{dst}"]
CP_SYNC = ["sh", "-c", 'cp -a "$1" "$2" && sync', "sh", "{src}", "{dst}"]

EXPERIMENTS: dict[str, tuple[str, list[Variant]]] = {
    "chunk": (
        "copy_file_range call size: each input shard copied whole (no plan), 1 thread, no sync",
        [
            (f"cfr chunk {c}", eng("--split", "whole", "--workers", "1", "--chunk", c))
            for c in ("1M", "4M", "16M", "64M", "256M", "1G")
        ]
        + [
            (
                "pread buffer 1M (whole)",
                eng("--split", "whole", "--workers", "1", "--backend", "pread", "--buffer", "1M"),
            ),
            ("cp -a", CP),
        ],
    ),
    "buffer": (
        "backend and pread buffer size: the plan, 2 workers (files), no sync",
        [("cfr 64M", eng("--chunk", "64M"))]
        + [
            (f"pread buffer {b}", eng("--backend", "pread", "--buffer", b))
            for b in ("256K", "1M", "4M", "8M", "16M")
        ]
        + [("streamconv --no-sync (auto)", cli("--no-sync")), ("cp -a", CP)],
    ),
    "prealloc": (
        "posix_fallocate vs ftruncate of the output, 2 workers, no sync",
        [
            ("cfr fallocate", eng("--prealloc", "fallocate")),
            ("cfr ftruncate", eng("--prealloc", "truncate")),
            ("pread 1M fallocate", eng("--backend", "pread", "--buffer", "1M")),
            (
                "pread 1M ftruncate",
                eng("--backend", "pread", "--buffer", "1M", "--prealloc", "truncate"),
            ),
        ],
    ),
    "split": (
        "work split: whole files per worker vs 16 MiB ranges from one shared list, no sync",
        [
            ("cfr files 1w", eng("--workers", "1")),
            ("cfr files 2w", eng("--workers", "2")),
            ("cfr ranges 2w", eng("--workers", "2", "--split", "ranges", "--chunk", "16M")),
            ("cfr interleave 2w", eng("--split", "interleave", "--chunk", "16M")),
            ("pread 1M files 1w", eng("--backend", "pread", "--buffer", "1M", "--workers", "1")),
            ("pread 1M files 2w", eng("--backend", "pread", "--buffer", "1M")),
            (
                "pread 1M ranges 2w",
                eng("--backend", "pread", "--buffer", "1M", "--split", "ranges", "--chunk", "16M"),
            ),
            ("cp -a", CP),
        ],
    ),
    "durable": (
        "durable variants, 2 workers: fsync at the end of each file, early write-back with "
        "sync_file_range every 64 MiB, fsync overlapped with the next file, ranges, "
        "fadvise(DONTNEED) after fsync, xxh3 read-back checksum",
        [
            ("cfr fsync", eng("--sync", "fsync")),
            ("cfr sfr 64M + fsync", eng("--sync", "sfr", "--window", "64M")),
            ("cfr overlap fsync", eng("--sync", "fsync", "--overlap")),
            ("cfr ranges fsync", eng("--sync", "fsync", "--split", "ranges", "--chunk", "16M")),
            ("cfr fsync + fadvise", eng("--sync", "fsync", "--fadvise")),
            ("cfr xxh3 8M + fsync", eng("--sync", "fsync", "--checksum")),
            ("cfr xxh3 1M + fsync", eng("--sync", "fsync", "--checksum", "--hash-chunk", "1M")),
            (
                "pread 1M ranges fsync",
                eng(
                    "--backend",
                    "pread",
                    "--buffer",
                    "1M",
                    "--sync",
                    "fsync",
                    "--split",
                    "ranges",
                    "--chunk",
                    "16M",
                ),
            ),
            ("streamconv durable (auto)", cli()),
            ("cp -a && sync", CP_SYNC),
        ],
    ),
    "writeback": (
        "early write-back window, 2 workers (files): sync_file_range(WRITE) on each full window, "
        "wait on the one before, fsync at the end; combined with overlap and the checksum",
        [
            ("cfr fsync", eng("--sync", "fsync")),
            ("cfr sfr 16M", eng("--sync", "sfr", "--window", "16M")),
            ("cfr sfr 64M", eng("--sync", "sfr", "--window", "64M")),
            ("cfr sfr 256M", eng("--sync", "sfr", "--window", "256M")),
            ("cfr sfr 64M + overlap", eng("--sync", "sfr", "--window", "64M", "--overlap")),
            (
                "cfr interleave sfr 64M",
                eng("--split", "interleave", "--chunk", "16M", "--sync", "sfr", "--window", "64M"),
            ),
            (
                "cfr sfr 64M + xxh3 1M",
                eng("--sync", "sfr", "--window", "64M", "--checksum", "--hash-chunk", "1M"),
            ),
            (
                "pread 256K sfr 64M",
                eng("--backend", "pread", "--buffer", "256K", "--sync", "sfr", "--window", "64M"),
            ),
            ("streamconv durable (auto)", cli()),
            ("cp -a && sync", CP_SYNC),
        ],
    ),
    "cli": (
        "the streamconv CLI as it is now, durable, per backend, against the prototype doing the "
        "same copies with early write-back but no checksum, 2 workers",
        [
            ("streamconv durable (auto)", cli()),
            ("streamconv durable --backend copy_file_range", cli("--backend", "copy_file_range")),
            ("streamconv durable --backend pread", cli("--backend", "pread")),
            (
                "engine pread 1M sfr 64M",
                eng("--backend", "pread", "--buffer", "1M", "--sync", "sfr", "--window", "64M"),
            ),
            ("engine cfr sfr 64M", eng("--sync", "sfr", "--window", "64M")),
            ("streamconv --no-sync (auto)", cli("--no-sync")),
            ("cp -a && sync", CP_SYNC),
        ],
    ),
}


def spec_for(smoke: bool) -> SynthSpec:
    if smoke:
        return SynthSpec(
            layers=6, experts=8, hidden=256, inter=128, vocab=1024, shard_size=16 * 10**6
        )
    # The headline checkpoint of benchmarks/run.py: 3.44 GB in 3 shards of <= 1.2 GB.
    return SynthSpec(
        layers=20, experts=16, hidden=2048, inter=768, vocab=16384, shard_size=int(1.2 * GB)
    )


def run_experiment(
    key: str, variants: Sequence[Variant], src: Path, data: Path, *, rounds: int, log: Path
) -> dict[str, Any]:
    nbytes = checkpoint_bytes_of(src)
    dst = data / "out"
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
    for r in range(rounds + 1):
        for name, template in variants:
            if dst.exists():
                shutil.rmtree(dst)
            settle(cold=False)
            report = data / "report.json"
            report.unlink(missing_ok=True)
            argv = [a.format(src=src, dst=dst, report=report) for a in template]
            result = measure(name, argv, log=log)
            if result.returncode != 0:
                raise RuntimeError(f"{name} failed; see {log}")
            breakdown = json.loads(report.read_text()) if report.exists() else {}
            tag = "warm-up" if r == 0 else f"round {r}/{rounds}"
            print(
                f"{key} {tag}: {name}: {result.wall:.2f} s, {nbytes / result.wall / GB:.2f} GB/s,"
                f" RSS {result.tree_rss / MB:.1f} MB {breakdown}",
                flush=True,
            )
            if r > 0:
                runs[name].append({**result.to_json(), "breakdown": breakdown})
    shutil.rmtree(dst, ignore_errors=True)
    return {"bytes": nbytes, "runs": runs}


def checkpoint_bytes_of(src: Path) -> int:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return int(index["metadata"]["total_size"])


def markdown(results: dict[str, Any]) -> str:
    out = [
        "# Copy-engine experiments\n",
        f"Checkpoint: {results['checkpoint']}. Variants of one experiment run in alternating "
        "order after a warm-up round; warm cache, sync before each run. Median (min–max) "
        "wall time; GB/s of tensor bytes; breakdown: medians of the engine's own timers "
        "(summed over threads, so copy can exceed wall). Machine: see BENCHMARKS.md. "
        "Command: `.venv/bin/python benchmarks/experiments/tune.py "
        "[--only EXPERIMENT ...] --rounds N`.\n",
    ]
    for key in [k for k in EXPERIMENTS if k in results["experiments"]]:
        exp = results["experiments"][key]
        out.append(f"## {key}: {EXPERIMENTS[key][0]}\n")
        out.append(
            f"{exp.get('rounds', results['rounds'])} rounds after a warm-up, run "
            f"{exp.get('date', '?')}, load average after {exp.get('loadavg_end', '?')}.\n"
        )
        rows = []
        nbytes = exp["bytes"]
        for name, runs in exp["runs"].items():
            walls = [r["wall"] for r in runs]
            s = stats(walls)
            parts = [r["breakdown"] for r in runs if r["breakdown"]]
            split = ""
            if parts:
                keys = ("plan", "copy", "checksum", "sync")
                split = ", ".join(
                    f"{k} {stats([p[k] for p in parts]).median:.2f}"
                    for k in keys
                    if any(p.get(k) for p in parts)
                )
            rows.append(
                [
                    name,
                    fmt_range(s),
                    f"{nbytes / s.median / GB:.2f}",
                    f"{stats([r['tree_rss'] / MB for r in runs]).median:.1f}",
                    split,
                ]
            )
        out.append(
            table(["variant", "wall s", "GB/s", "tree RSS MB", "breakdown s (median)"], rows)
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(EXPERIMENTS), default=list(EXPERIMENTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.mkdtemp(prefix=".data-", dir=HERE))
    log = args.out / "tune-runs.log"
    log.write_text("")
    spec = spec_for(args.smoke)
    results: dict[str, Any] = {
        "checkpoint": f"{checkpoint_bytes(spec) / GB:.2f} GB, shard size {spec.shard_size / GB:.2f}"
        f" GB, {spec.layers} layers x {spec.experts} experts, hidden {spec.hidden}, inter "
        f"{spec.inter}",
        "rounds": args.rounds,
        "loadavg_start": os.getloadavg(),
        "rss_launcher": harness.LAUNCHER,
        "experiments": {},
    }
    previous = args.out / "tune.json"
    if previous.exists():  # keep the other experiments of an earlier run on the same input
        earlier = json.loads(previous.read_text())
        if earlier.get("checkpoint") == results["checkpoint"]:
            results["experiments"] = {
                k: v for k, v in earlier.get("experiments", {}).items() if k not in args.only
            }
    began = time.monotonic()
    try:
        src = data / "input"
        synthesize(src, spec)
        os.sync()
        for key in args.only:
            results["experiments"][key] = {
                **run_experiment(key, EXPERIMENTS[key][1], src, data, rounds=args.rounds, log=log),
                "rounds": args.rounds,
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "loadavg_end": os.getloadavg(),
            }
            results["loadavg_end"] = os.getloadavg()
            (args.out / "tune.json").write_text(json.dumps(results, indent=1) + "\n")
            (args.out / "tune.md").write_text(markdown(results))
    finally:
        shutil.rmtree(data, ignore_errors=True)
    print(f"done in {time.monotonic() - began:.0f} s: {args.out / 'tune.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
