"""streamconv benchmark suite (issue 3): one entry point, ``make bench``.

Generates synthetic HYV3 checkpoints with the package's generator, runs every contender on the
same input in alternating order (A B C ... A B C ...) after a warm-up round, and writes
``results.json`` (every run), ``summary.md`` (the tables) and PNG plots into ``--out``.

Sections (``--only`` picks some): ``headline`` (streamconv in each mode and backend, ``cp -a``,
``cp -a && sync``, the in-memory baseline, output checked byte-identical), ``lowmem`` (the
smallest ``prlimit --as`` at which streamconv works, and the baseline failing under it), ``size``
(time vs checkpoint size) and ``workers`` (time vs workers), ``shards`` (peak RSS vs shard size),
``plan`` (header reading and planning time vs tensor count, up to a DeepSeek-V3-sized index).

Caching: runs are warm-cache (the input is in the page cache) unless ``--cold``, which drops the
page cache before every run (root only). ``sync`` runs between all runs either way.

Usage: python benchmarks/run.py [--smoke] [--out DIR] [--data DIR] [--cold] [--only ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import safetensors
from harness import Run, fmt_range, measure, settle, stats
from report import Series, plot, table

import streamconv
from streamconv import dtypes
from streamconv.checkpoint import load_checkpoint
from streamconv.convert import plan_checkpoint
from streamconv.rules import HYV3
from streamconv.synth import SynthSpec, assign_shards, checkpoint_bytes, synthesize, tensor_specs

HERE = Path(__file__).resolve().parent


def _series(name: str, rows: list[dict[str, Any]], x: Any, key: str) -> Series:
    """A plotted line: ``x(row)`` against the median (and min-max) of ``row[key]``."""
    return Series(
        name,
        [x(r) for r in rows],
        [r[key]["median"] for r in rows],
        [r[key]["low"] for r in rows],
        [r[key]["high"] for r in rows],
    )


def _relative(command: str) -> str:
    """A command line as published: paths inside the repository relative to it."""
    return command.replace(f"{HERE.parent}/", "")


GB = 1e9
MB = 1e6
MiB = 1 << 20
SECTIONS = ("headline", "lowmem", "size", "workers", "shards", "plan")
BASELINE = "baseline (in-memory)"
CP = "cp -a"
CP_SYNC = "cp -a && sync"


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, slots=True)
class Shape:
    """Tensor dimensions of the generated checkpoints (Qwen3-MoE-like expert tensors, 3 MB)."""

    hidden: int
    inter: int
    experts: int
    vocab: int


@dataclass(frozen=True, slots=True)
class Config:
    shape: Shape
    headline_gb: float
    headline_shard_gb: float
    rounds: int  # measured rounds of the headline matrix
    warmup: int
    sizes_gb: tuple[float, ...]
    size_shard_gb: float
    sweep_rounds: int
    workers: tuple[int, ...]
    workers_gb: float  # one of sizes_gb: the workers sweep reuses that checkpoint
    shard_sizes_gb: tuple[float, ...]
    shard_total_gb: float
    shard_rounds: int
    plan_layers: tuple[int, ...]
    plan_experts: int
    plan_reps: int
    lowmem_high: int  # bytes: the address-space limit the search starts from (must work)
    lowmem_step: int  # bytes: resolution of the search
    lowmem_baseline: int  # bytes: a second, larger limit the baseline is also run under


FULL = Config(
    shape=Shape(hidden=2048, inter=768, experts=16, vocab=16384),
    headline_gb=3.5,
    headline_shard_gb=1.2,
    rounds=4,
    warmup=1,
    sizes_gb=(0.5, 1.0, 2.0, 4.0),
    size_shard_gb=0.3,
    sweep_rounds=3,
    workers=(1, 2, 3, 4),
    workers_gb=2.0,
    shard_sizes_gb=(0.25, 0.3, 0.6, 1.2, 2.0),
    shard_total_gb=2.4,
    shard_rounds=2,
    plan_layers=(4, 16, 31, 61, 121),  # 121 layers x 256 experts: 91,952 keys
    plan_experts=256,
    plan_reps=5,
    lowmem_high=1024 * MiB,
    lowmem_step=1 * MiB,
    lowmem_baseline=1024 * MiB,
)
SMOKE = Config(
    shape=Shape(hidden=256, inter=128, experts=8, vocab=1024),
    headline_gb=0.048,
    headline_shard_gb=0.016,
    rounds=1,
    warmup=1,
    sizes_gb=(0.016, 0.032),
    size_shard_gb=0.008,
    sweep_rounds=1,
    workers=(1, 2),
    workers_gb=0.032,
    shard_sizes_gb=(0.004, 0.016),
    shard_total_gb=0.032,
    shard_rounds=1,
    plan_layers=(4, 8),
    plan_experts=32,
    plan_reps=1,
    lowmem_high=512 * MiB,
    lowmem_step=32 * MiB,
    lowmem_baseline=256 * MiB,
)
DEEPSEEK_KEYS = 92_000
DEEPSEEK_SHARDS = 163


def make_spec(shape: Shape, total_gb: float, shard_gb: float) -> SynthSpec:
    """A checkpoint of about ``total_gb`` GB of tensors in shards of about ``shard_gb`` GB."""
    base = SynthSpec(
        layers=2,
        experts=shape.experts,
        hidden=shape.hidden,
        inter=shape.inter,
        vocab=shape.vocab,
        dense_layers=1,
        shard_size=int(shard_gb * GB),
    )
    two = checkpoint_bytes(base)
    per_layer = checkpoint_bytes(dataclasses.replace(base, layers=3)) - two
    layers = max(2, 2 + round((total_gb * GB - two) / per_layer))
    return dataclasses.replace(base, layers=layers)


# ---------------------------------------------------------------------------------------------
# Contenders


def streamconv_argv() -> list[str]:
    script = Path(sys.executable).parent / "streamconv"
    return [str(script)] if script.exists() else [sys.executable, "-m", "streamconv"]


@dataclass(frozen=True, slots=True)
class Contender:
    name: str
    argv: Callable[[Path, Path], list[str]]
    kind: str  # "streamconv" | "cp" | "baseline"
    params: dict[str, Any] = field(default_factory=dict)


def sc(backend: str, workers: int, *, sync: bool, prefix: Sequence[str] = ()) -> Contender:
    mode = "durable" if sync else "--no-sync"
    name = f"streamconv {mode}, {backend}, {workers}w"
    flags = ["--backend", backend, "--workers", str(workers)] + ([] if sync else ["--no-sync"])

    def argv(src: Path, dst: Path) -> list[str]:
        return [*prefix, *streamconv_argv(), "convert", str(src), str(dst), *flags]

    return Contender(
        name, argv, "streamconv", {"backend": backend, "workers": workers, "sync": sync}
    )


def cp(*, sync: bool) -> Contender:
    if sync:
        return Contender(
            CP_SYNC,
            lambda s, d: ["sh", "-c", 'cp -a "$1" "$2" && sync', "sh", str(s), str(d)],
            "cp",
        )
    return Contender(CP, lambda s, d: ["cp", "-a", str(s), str(d)], "cp")


def baseline(prefix: Sequence[str] = ()) -> Contender:
    script = str(HERE / "baseline.py")
    return Contender(
        BASELINE, lambda s, d: [*prefix, sys.executable, script, str(s), str(d)], "baseline"
    )


# ---------------------------------------------------------------------------------------------
# Running


class Failed(RuntimeError):
    pass


def same_output(expected: Path, actual: Path) -> list[str]:
    """Differences between two outputs, comparing every shard file and the index byte for byte."""

    def files(root: Path) -> set[str]:
        return {
            p.name
            for p in root.iterdir()
            if p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json"
        }

    problems = []
    names_a, names_b = files(expected), files(actual)
    if names_a != names_b:
        problems.append(f"file sets differ: {sorted(names_a ^ names_b)}")
    for name in sorted(names_a & names_b):
        a, b = expected / name, actual / name
        if a.stat().st_size != b.stat().st_size:
            problems.append(f"{name}: sizes differ")
            continue
        with a.open("rb") as fa, b.open("rb") as fb:
            while True:
                block_a, block_b = fa.read(16 * MiB), fb.read(16 * MiB)
                if block_a != block_b:
                    problems.append(f"{name}: contents differ")
                    break
                if not block_a:
                    break
    return problems


class Bench:
    def __init__(self, cfg: Config, data: Path, out: Path, *, cold: bool, smoke: bool) -> None:
        self.cfg = cfg
        self.data = data
        self.out = out
        self.cold = cold
        self.smoke = smoke
        self.log = out / "runs.log"
        self.results: dict[str, Any] = {}
        self.sources_seen: dict[str, int] = {}  # digest of streamconv's sources -> runs
        self.section = "?"
        self.section_sources: dict[str, dict[str, int]] = {}
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    def generate(self, label: str, spec: SynthSpec) -> Path:
        path = self.data / label
        if path.exists():
            shutil.rmtree(path)
        began = time.monotonic()
        synthesize(path, spec)
        os.sync()
        shards = len(assign_shards(spec))
        self.say(
            f"generated {label}: {checkpoint_bytes(spec) / GB:.2f} GB in {shards} shards "
            f"({time.monotonic() - began:.1f} s)"
        )
        return path

    def run_one(self, contender: Contender, src: Path, dst: Path, *, check: bool = True) -> Run:
        if dst.exists():
            shutil.rmtree(dst)
        settle(cold=self.cold)
        source = _source_digest()  # the package may be edited while the suite runs
        self.sources_seen[source] = self.sources_seen.get(source, 0) + 1
        per = self.section_sources.setdefault(self.section, {})
        per[source] = per.get(source, 0) + 1
        result = measure(contender.name, contender.argv(src, dst), log=self.log)
        result = dataclasses.replace(result, extra={**result.extra, "source": source})
        if check and result.returncode != 0:
            raise Failed(
                f"{contender.name} failed with exit code {result.returncode}; see {self.log}"
            )
        return result

    def matrix(
        self,
        label: str,
        cases: Sequence[tuple[str, Contender, Path, int]],
        *,
        rounds: int,
        warmup: int,
        after: Callable[[int, str, Contender, Path], bool] | None = None,
    ) -> dict[str, list[Run]]:
        """Run every case once per round, in the same order each round (A B C A B C ...).

        ``after(round, key, contender, output)`` is called after each run; when it returns True
        the output is kept (it was moved away) instead of deleted.
        """
        runs: dict[str, list[Run]] = {key: [] for key, *_ in cases}
        dst = self.data / "out"
        for r in range(warmup + rounds):
            tag = "warm-up" if r < warmup else f"round {r - warmup + 1}/{rounds}"
            for key, contender, src, nbytes in cases:
                result = self.run_one(contender, src, dst)
                self.say(
                    f"{label} {tag}: {key}: {result.wall:.2f} s, {nbytes / result.wall / GB:.2f} "
                    f"GB/s, tree RSS {result.tree_rss / MB:.0f} MB, "
                    f"max RSS {result.max_rss / MB:.0f} MB"
                )
                if r >= warmup:
                    runs[key].append(result)
                kept = after(r, key, contender, dst) if after is not None else False
                if not kept and dst.exists():
                    shutil.rmtree(dst)
        settle(cold=False)
        return runs

    def save(self) -> None:
        versions = self.results.setdefault("streamconv_source_files", {})
        for version, files in SOURCE_FILES.items():
            versions.setdefault(version, files)
        known = self.results.setdefault("streamconv_sources", {})
        known.update(self.section_sources)
        self.results["streamconv_sources_seen"] = {
            digest: sum(per.get(digest, 0) for per in known.values())
            for digest in dict.fromkeys(d for per in known.values() for d in per)
        }
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1) + "\n")
        (self.out / "summary.md").write_text(summarize(self.results))


def run_stats(runs: Sequence[Run], nbytes: int) -> dict[str, Any]:
    walls = [r.wall for r in runs]
    return {
        "bytes": nbytes,
        "wall": dataclasses.asdict(stats(walls)),
        "gbps": dataclasses.asdict(stats([nbytes / w / GB for w in walls])),
        "tree_rss_mb": dataclasses.asdict(stats([r.tree_rss / MB for r in runs])),
        "max_rss_mb": dataclasses.asdict(stats([r.max_rss / MB for r in runs])),
        "runs": [r.to_json() for r in runs],
    }


def spec_json(spec: SynthSpec) -> dict[str, Any]:
    return {
        **dataclasses.asdict(spec),
        "tensor_bytes": checkpoint_bytes(spec),
        "shards": len(assign_shards(spec)),
        "keys": len(tensor_specs(spec)),
    }


# ---------------------------------------------------------------------------------------------
# Sections


def headline_contenders() -> list[Contender]:
    out = [baseline()]
    out += [sc("auto", w, sync=True) for w in (1, 2)]
    for backend in ("auto", "copy_file_range", "mmap", "pread"):
        out += [sc(backend, w, sync=False) for w in (1, 2)]
    out += [cp(sync=False), cp(sync=True)]
    return out


def section_headline(bench: Bench) -> tuple[Path, Path, SynthSpec]:
    bench.section = "headline"
    cfg = bench.cfg
    spec = make_spec(cfg.shape, cfg.headline_gb, cfg.headline_shard_gb)
    src = bench.generate("headline", spec)
    nbytes = checkpoint_bytes(spec)
    reference = bench.data / "reference"
    contenders = headline_contenders()
    # Checked against the baseline's output in the warm-up round: every streamconv variant in a
    # smoke run; in a full run, the default and one of each backend (each check reads ~2x size).
    checked = {c.name for c in contenders if c.kind == "streamconv"}
    if not bench.smoke:
        checked = {
            c.name for c in contenders if c.kind == "streamconv" and c.params["workers"] == 2
        }
    verified: list[str] = []

    def after(r: int, key: str, contender: Contender, dst: Path) -> bool:
        if r != 0:
            return False
        if contender.kind == "baseline":
            if reference.exists():
                shutil.rmtree(reference)
            dst.rename(reference)
            return True
        if key in checked:
            problems = same_output(reference, dst)
            if problems:
                raise Failed(f"{key}: output differs from the baseline's: {problems}")
            verified.append(key)
            bench.say(f"  {key}: output byte-identical to the baseline's")
        return False

    cases = [(c.name, c, src, nbytes) for c in contenders]
    runs = bench.matrix(
        "headline", cases, rounds=cfg.rounds, warmup=max(cfg.warmup, 1), after=after
    )
    bench.results["headline"] = {
        "checkpoint": spec_json(spec),
        "order": [c.name for c in contenders],
        "rounds": cfg.rounds,
        "warmup": max(cfg.warmup, 1),
        "verified_identical_to_baseline": verified,
        "contenders": {key: run_stats(rs, nbytes) for key, rs in runs.items()},
    }
    bench.save()
    return src, reference, spec


def _works(bench: Bench, limit: int, src: Path, backend: str, workers: int, *, sync: bool) -> bool:
    prefix = ["prlimit", f"--as={limit}", "--"]
    contender = sc(backend, workers, sync=sync, prefix=prefix)
    result = bench.run_one(contender, src, bench.data / "out", check=False)
    shutil.rmtree(bench.data / "out", ignore_errors=True)
    return result.returncode == 0


def smallest_limit(
    bench: Bench, src: Path, backend: str, workers: int, *, sync: bool
) -> int | None:
    """The smallest RLIMIT_AS (to ``lowmem_step``) at which the conversion succeeds."""
    step = bench.cfg.lowmem_step
    high = 256 * MiB
    while not _works(bench, high, src, backend, workers, sync=sync):
        if high >= bench.cfg.lowmem_high:
            return None
        high *= 2
    low = 0  # assumed to fail
    while high - low > step:
        middle = (low + high) // 2 // step * step
        if middle <= low:
            middle = low + step
        if _works(bench, middle, src, backend, workers, sync=sync):
            high = middle
        else:
            low = middle
    mode = "durable" if sync else "--no-sync"
    bench.say(
        f"lowmem: {mode}, {backend}, {workers}w works with --as={high} ({high / MiB:.0f} MiB)"
    )
    return high


def section_lowmem(bench: Bench, src: Path, reference: Path | None, spec: SynthSpec) -> None:
    bench.section = "lowmem"
    nbytes = checkpoint_bytes(spec)
    searches = [("auto", 2, True), ("auto", 2, False), ("auto", 1, True), ("pread", 2, True)]
    limits: dict[str, int | None] = {}
    for backend, workers, sync in searches:
        key = f"{'durable' if sync else '--no-sync'}, {backend}, {workers}w"
        limits[key] = smallest_limit(bench, src, backend, workers, sync=sync)
    found = limits["durable, auto, 2w"]
    if found is None:
        raise Failed("streamconv does not even work under the highest limit tried")
    demo: dict[str, Any] = {"searched_limits": limits, "checkpoint": spec_json(spec)}
    # The demonstration, at the limit found for the defaults (auto backend, 2 workers, durable).
    # Address-space use varies a little from run to run (ASLR); step up if it does not pass.
    limit = found
    dst = bench.data / "out"
    for _attempt in range(4):
        prefix = ["prlimit", f"--as={limit}", "--"]
        contender = sc("auto", 2, sync=True, prefix=prefix)
        result = bench.run_one(contender, src, dst, check=False)
        if result.returncode == 0:
            break
        limit += 4 * MiB
    else:
        raise Failed("streamconv failed at the limit it passed moments before")
    identical = same_output(reference, dst) == [] if reference is not None else None
    shutil.rmtree(dst, ignore_errors=True)
    bench.say(
        f"lowmem: streamconv durable under --as={limit} ({limit / MiB:.0f} MiB): "
        f"{result.wall:.2f} s, max RSS {result.max_rss / MB:.0f} MB; identical: {identical}"
    )
    # The baseline under the same limit, and under a larger one at which its imports fit
    # (numpy alone needs ~100-250 MiB of address space) but a shard does not.
    failures = []
    for base_limit in dict.fromkeys([limit, max(limit, bench.cfg.lowmem_baseline)]):
        prefix = ["prlimit", f"--as={base_limit}", "--"]
        log_size = bench.log.stat().st_size if bench.log.exists() else 0
        failed = bench.run_one(baseline(prefix), src, dst, check=False)
        with bench.log.open("rb") as handle:
            handle.seek(log_size)
            lines = handle.read().decode(errors="replace").strip().splitlines()
        shutil.rmtree(dst, ignore_errors=True)
        last = lines[-1] if lines else ""
        bench.say(
            f"lowmem: baseline under --as={base_limit} ({base_limit / MiB:.0f} MiB): exit code "
            f"{failed.returncode}: {last}"
        )
        failures.append({"limit": base_limit, "run": failed.to_json(), "last_line": last})
    demo.update(
        {
            "limit": limit,
            "checkpoint_over_limit": nbytes / limit,
            "streamconv": result.to_json(),
            "streamconv_output_identical_to_baseline": identical,
            "baseline_runs": failures,
            "command": _relative(" ".join(contender.argv(Path("INPUT"), Path("OUTPUT")))),
        }
    )
    bench.results["lowmem"] = demo
    bench.save()


def section_size_workers(bench: Bench, do_size: bool, do_workers: bool) -> None:
    cfg = bench.cfg
    sizes = cfg.sizes_gb if do_size else (cfg.workers_gb,)
    specs = {gb: make_spec(cfg.shape, gb, cfg.size_shard_gb) for gb in sizes}
    paths = {gb: bench.generate(f"size-{gb:g}GB", spec) for gb, spec in specs.items()}
    if do_size:
        bench.section = "size"
        contenders = [sc("auto", 2, sync=True), sc("auto", 2, sync=False), cp(sync=False)]
        cases = [
            (f"{c.name} @ {gb:g} GB", c, paths[gb], checkpoint_bytes(specs[gb]))
            for gb in sizes
            for c in contenders
        ]
        runs = bench.matrix("size", cases, rounds=cfg.sweep_rounds, warmup=0)
        rows = []
        for gb in sizes:
            for c in contenders:
                key = f"{c.name} @ {gb:g} GB"
                rows.append(
                    {
                        "target_gb": gb,
                        "contender": c.name,
                        "checkpoint": spec_json(specs[gb]),
                        **run_stats(runs[key], checkpoint_bytes(specs[gb])),
                    }
                )
        bench.results["size"] = rows
        bench.save()
    if do_workers:
        bench.section = "workers"
        gb = cfg.workers_gb
        contenders = [sc("auto", w, sync=s) for s in (True, False) for w in cfg.workers]
        cases = [(c.name, c, paths[gb], checkpoint_bytes(specs[gb])) for c in contenders]
        runs = bench.matrix("workers", cases, rounds=cfg.sweep_rounds, warmup=0)
        bench.results["workers"] = {
            "checkpoint": spec_json(specs[gb]),
            "rows": [
                {
                    "workers": c.params["workers"],
                    "sync": c.params["sync"],
                    "contender": c.name,
                    **run_stats(runs[c.name], checkpoint_bytes(specs[gb])),
                }
                for c in contenders
            ],
        }
        bench.save()
    for path in paths.values():
        shutil.rmtree(path)


def section_shards(bench: Bench) -> None:
    bench.section = "shards"
    cfg = bench.cfg
    contenders = [
        sc("auto", 2, sync=True),
        sc("auto", 2, sync=False),
        sc("mmap", 2, sync=False),
        sc("pread", 2, sync=False),
    ]
    rows = []
    for shard_gb in cfg.shard_sizes_gb:
        spec = make_spec(cfg.shape, cfg.shard_total_gb, shard_gb)
        src = bench.generate(f"shards-{shard_gb:g}GB", spec)
        nbytes = checkpoint_bytes(spec)
        cases = [(c.name, c, src, nbytes) for c in contenders]
        runs = bench.matrix(f"shards {shard_gb:g} GB", cases, rounds=cfg.shard_rounds, warmup=0)
        largest = max(checkpoint_bytes_of(shard) for shard in assign_shards(spec))
        for c in contenders:
            rows.append(
                {
                    "shard_gb": shard_gb,
                    "largest_shard_bytes": largest,
                    "contender": c.name,
                    "checkpoint": spec_json(spec),
                    **run_stats(runs[c.name], nbytes),
                }
            )
        shutil.rmtree(src)
        bench.results["shards"] = rows
        bench.save()


def checkpoint_bytes_of(tensors: Sequence[Any]) -> int:
    return sum(dtypes.nbytes(t.dtype, t.shape) for t in tensors)


def plan_spec(layers: int, experts: int) -> SynthSpec:
    """Tiny tensors (hidden 8), shards scaled so ~92,000 keys make ~163 shards (DeepSeek-V3)."""
    spec = SynthSpec(
        layers=layers,
        experts=experts,
        hidden=8,
        inter=8,
        vocab=64,
        dense_layers=min(3, layers),
        shard_size=1,
    )
    keys = len(tensor_specs(spec))
    want = max(1, round(DEEPSEEK_SHARDS * keys / DEEPSEEK_KEYS))
    total = checkpoint_bytes(spec)
    size = max(1, total // want)
    for _ in range(50):
        spec = dataclasses.replace(spec, shard_size=size)
        count = len(assign_shards(spec))
        if count == want:
            break
        size = max(1, int(size * count / want) + (1 if count > want else -1))
    return spec


def section_plan(bench: Bench) -> None:
    bench.section = "plan"
    cfg = bench.cfg
    rows = []
    for layers in cfg.plan_layers:
        spec = plan_spec(layers, cfg.plan_experts)
        src = bench.generate(f"plan-{layers}L", spec)
        load_times, plan_times = [], []
        for rep in range(cfg.plan_reps + 1):  # the first is a warm-up
            began = time.perf_counter()
            checkpoint = load_checkpoint(src)
            loaded = time.perf_counter()
            plan = plan_checkpoint(checkpoint, HYV3)
            planned = time.perf_counter()
            if rep > 0:
                load_times.append(loaded - began)
                plan_times.append(planned - loaded)
        keys = len(tensor_specs(spec))
        row: dict[str, Any] = {
            "layers": layers,
            "keys": keys,
            "shards": len(checkpoint.shards),
            "output_tensors": plan.tensor_count,
            "tensor_bytes": checkpoint_bytes(spec),
            "load": dataclasses.asdict(stats(load_times)),
            "plan": dataclasses.asdict(stats(plan_times)),
            "total": dataclasses.asdict(
                stats([a + b for a, b in zip(load_times, plan_times, strict=True)])
            ),
        }
        bench.say(
            f"plan: {keys} keys over {row['shards']} shards: load {fmt_range(stats(load_times), 3)}"
            f" s, plan {fmt_range(stats(plan_times), 3)} s"
        )
        if layers == cfg.plan_layers[-1]:
            end_to_end = {}
            for contender in (sc("auto", 2, sync=False), sc("auto", 2, sync=True)):
                result = bench.run_one(contender, src, bench.data / "out")
                shutil.rmtree(bench.data / "out")
                end_to_end[contender.name] = result.to_json()
                bench.say(
                    f"plan: CLI {contender.name} on {keys} keys: {result.wall:.2f} s, "
                    f"max RSS {result.max_rss / MB:.0f} MB"
                )
            row["cli"] = end_to_end
        rows.append(row)
        shutil.rmtree(src)
    bench.results["plan"] = rows
    bench.save()


# ---------------------------------------------------------------------------------------------
# Machine description and summary


def _fs_of(path: Path) -> dict[str, str]:
    """The mount holding ``path``: the longest mount point that is a prefix of it."""
    best = {"mount": "", "device": "", "fstype": ""}
    target = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            device, point, fstype, *_ = line.split()
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best["mount"]):
                best = {"mount": point, "device": device, "fstype": fstype}
    return best


SOURCE_FILES: dict[str, dict[str, str]] = {}  # version digest -> {file name: file digest}


def _source_digest() -> str:
    """Identifies the streamconv code measured (the package is edited while benchmarks run)."""
    digest = hashlib.sha256()
    files = {}
    for path in sorted(Path(streamconv.__file__).parent.glob("*.py")):
        data = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + data + b"\0")
        files[path.name] = hashlib.sha256(data).hexdigest()[:12]
    version = digest.hexdigest()[:16]
    SOURCE_FILES.setdefault(version, files)
    return version


def _changed_files(versions: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    """For each version after the first: the files that differ from the first version."""
    items = list(versions.items())
    if not items:
        return {}
    first = items[0][1]
    return {
        version: sorted(n for n in set(first) | set(files) if first.get(n) != files.get(n))
        for version, files in items[1:]
    }


def machine(data: Path) -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total_kb = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_total_gib": round(total_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "streamconv": streamconv.__version__,
        "safetensors": safetensors.__version__,
        "cp": subprocess.run(
            ["cp", "--version"], check=False, capture_output=True, text=True
        ).stdout.split("\n")[0],
        "data_fs": _fs_of(data),
        "streamconv_sources_sha256": _source_digest(),
        "rss_launcher": harness.LAUNCHER,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "loadavg_start": os.getloadavg(),
    }


def _c(results: dict[str, Any], name: str) -> dict[str, Any]:
    return results["headline"]["contenders"][name]


def summarize(results: dict[str, Any]) -> str:
    out = ["# streamconv benchmark results\n"]
    m = results.get("machine", {})
    out.append(
        f"Machine: {m.get('nproc')} CPUs ({m.get('cpu')}), {m.get('mem_total_gib')} GiB RAM, "
        f"kernel {m.get('kernel')}, data on {m.get('data_fs', {}).get('fstype')} "
        f"({m.get('data_fs', {}).get('device')}); Python {m.get('python')}, "
        f"safetensors {m.get('safetensors')}, {m.get('cp')}. {m.get('date')}"
        f"{'; sections re-run ' + m['date_merged'] if m.get('date_merged') else ''}. "
        f"Load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}.\n"
    )
    out.append(f"Cache: {results.get('cache')}. Command: `{results.get('command')}`.\n")
    seen = results.get("streamconv_sources_seen", {})
    per_section = results.get("streamconv_sources", {})
    if len(seen) > 1:
        out.append(
            f"**WARNING: streamconv's source files changed during these runs ({len(seen)} "
            f"versions measured); per section, version: runs: {per_section}. Files changed "
            f"from the first version: {_changed_files(results.get('streamconv_source_files', {}))}"
            ". Sections with one version are internally consistent.**\n"
        )
    elif seen:
        out.append(f"streamconv sources (sha256 prefix): {next(iter(seen))}.\n")
    if "headline" in results:
        out.append(_headline_md(results))
    if "lowmem" in results:
        out.append(_lowmem_md(results["lowmem"]))
    if "size" in results:
        out.append(_size_md(results["size"]))
    if "workers" in results:
        out.append(_workers_md(results["workers"]))
    if "shards" in results:
        out.append(_shards_md(results["shards"]))
    if "plan" in results:
        out.append(_plan_md(results["plan"]))
    if "headline" in results:
        out.append(_targets_md(results))
    return "\n".join(out)


def _s(d: dict[str, Any], digits: int = 2) -> str:
    return fmt_range(harness.Stats(**d), digits)


def _headline_md(results: dict[str, Any]) -> str:
    h = results["headline"]
    ck = h["checkpoint"]
    cp_wall = h["contenders"][CP]["wall"]["median"]
    cps_wall = h["contenders"][CP_SYNC]["wall"]["median"]
    rows = []
    for name in h["order"]:
        c = h["contenders"][name]
        rows.append(
            [
                name,
                _s(c["wall"]),
                f"{c['gbps']['median']:.2f}",
                _s(c["tree_rss_mb"], 1),
                _s(c["max_rss_mb"], 1),
                f"{c['wall']['median'] / cp_wall:.2f}",
                f"{c['wall']['median'] / cps_wall:.2f}",
            ]
        )
    text = (
        f"## Headline: {ck['tensor_bytes'] / GB:.2f} GB checkpoint, {ck['shards']} shards of "
        f"<= {ck['shard_size'] / GB:.2f} GB, {ck['keys']} keys\n\n"
        f"Median (min–max) of {h['rounds']} rounds after {h['warmup']} warm-up round, contenders "
        "in the order shown, alternating. GB/s = tensor bytes / wall time. Tree RSS: peak of the "
        "sampled sum over the process tree; max RSS: largest single process (ru_maxrss). "
        "Ratios are of medians.\n\n"
    )
    text += table(
        [
            "contender",
            "wall s",
            "GB/s",
            "tree RSS MB",
            "max RSS MB",
            "× cp -a",
            "× cp -a && sync",
        ],
        rows,
    )
    verified = h.get("verified_identical_to_baseline", [])
    text += (
        f"\nOutput of the baseline and of {len(verified)} streamconv variants compared byte for "
        f"byte (all shards and the index): identical ({', '.join(verified)}).\n"
    )
    return text


def _lowmem_md(low: dict[str, Any]) -> str:
    limits = ", ".join(
        f"{k}: {'n/a' if v is None else f'{v / MiB:.0f} MiB'}"
        for k, v in low["searched_limits"].items()
    )
    s = low["streamconv"]
    ck = low["checkpoint"]
    rows = [
        [
            f"`{low['command']}`",
            f"{low['limit'] / MiB:.0f} MiB",
            str(s["returncode"]),
            f"{s['wall']:.2f}",
            f"{s['max_rss'] / MB:.1f}",
            "completed",
        ]
    ]
    for b in low["baseline_runs"]:
        rows.append(
            [
                "baseline (benchmarks/baseline.py)",
                f"{b['limit'] / MiB:.0f} MiB",
                str(b["run"]["returncode"]),
                f"{b['run']['wall']:.2f}",
                f"{b['run']['max_rss'] / MB:.1f}",
                f"`{b['last_line'][:120]}`",
            ]
        )
    return (
        "## Low memory (prlimit --as)\n\n"
        "Smallest address-space limit (RLIMIT_AS, to the search's resolution) at which "
        f"`streamconv convert` completes, per mode, backend and workers: {limits}.\n\n"
        f"Demonstration on the headline checkpoint ({ck['tensor_bytes'] / GB:.2f} GB, shards of "
        f"<= {ck['shard_size'] / GB:.2f} GB: {low['checkpoint_over_limit']:.0f}× the limit), "
        "durable defaults:\n\n"
        + table(["command", "--as", "exit code", "wall s", "max RSS MB", "result"], rows)
        + "\nstreamconv output identical to the baseline's unconstrained output: "
        f"{low['streamconv_output_identical_to_baseline']}.\n"
    )


def _size_md(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        body.append(
            [
                f"{r['bytes'] / GB:.2f}",
                str(r["checkpoint"]["shards"]),
                r["contender"],
                _s(r["wall"]),
                f"{r['gbps']['median']:.2f}",
                f"{r['wall']['median'] / (r['bytes'] / GB):.2f}",
                _s(r["tree_rss_mb"], 1),
            ]
        )
    fits = []
    for name in dict.fromkeys(r["contender"] for r in rows):
        xs = [r["bytes"] / GB for r in rows if r["contender"] == name]
        ys = [r["wall"]["median"] for r in rows if r["contender"] == name]
        slope, intercept, r2 = linear_fit(xs, ys)
        worst = max(abs(y - (intercept + slope * x)) / y for x, y in zip(xs, ys, strict=True))
        fits.append(
            [name, f"{slope:.3f}", f"{intercept:+.3f}", f"{r2:.4f}", f"{100 * worst:.0f} %"]
        )
    return (
        "## Time vs checkpoint size\n\n"
        + table(["GB", "shards", "contender", "wall s", "GB/s", "s per GB", "tree RSS MB"], body)
        + "\nLeast-squares fit of the medians, wall = intercept + slope × GB:\n\n"
        + table(["contender", "slope s/GB", "intercept s", "R²", "largest residual"], fits)
        + "\n![time vs size](size_scaling.png)\n"
    )


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """(slope, intercept, R²) of the least-squares line through the points."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx if sxx else 0.0
    intercept = my - slope * mx
    total = sum((y - my) ** 2 for y in ys)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return slope, intercept, 1 - residual / total if total else 1.0


def _workers_md(w: dict[str, Any]) -> str:
    body = [
        [
            str(r["workers"]),
            "durable" if r["sync"] else "--no-sync",
            _s(r["wall"]),
            f"{r['gbps']['median']:.2f}",
            _s(r["tree_rss_mb"], 1),
        ]
        for r in w["rows"]
    ]
    ck = w["checkpoint"]
    return (
        f"## Time vs workers ({ck['tensor_bytes'] / GB:.2f} GB, {ck['shards']} shards)\n\n"
        + table(["workers", "mode", "wall s", "GB/s", "tree RSS MB"], body)
        + "\n![time vs workers](workers.png)\n"
    )


def _shards_md(rows: list[dict[str, Any]]) -> str:
    body = [
        [
            f"{r['largest_shard_bytes'] / GB:.2f}",
            str(r["checkpoint"]["shards"]),
            r["contender"],
            _s(r["tree_rss_mb"], 1),
            _s(r["max_rss_mb"], 1),
            _s(r["wall"]),
        ]
        for r in rows
    ]
    return (
        "## Peak RSS vs shard size\n\n"
        + table(
            ["largest shard GB", "shards", "contender", "tree RSS MB", "max RSS MB", "wall s"], body
        )
        + "\n![rss vs shard size](rss_vs_shard.png)\n"
    )


def _plan_md(rows: list[dict[str, Any]]) -> str:
    body = [
        [
            str(r["keys"]),
            str(r["shards"]),
            str(r["output_tensors"]),
            _s(r["load"], 3),
            _s(r["plan"], 3),
            _s(r["total"], 3),
        ]
        for r in rows
    ]
    text = "## Planning time vs tensor count (tiny tensors)\n\n" + table(
        [
            "input keys",
            "shards",
            "output tensors",
            "load_checkpoint s",
            "plan_checkpoint s",
            "total s",
        ],
        body,
    )
    cli = rows[-1].get("cli")
    if cli:
        text += (
            "\nEnd to end on the largest (CLI): "
            + "; ".join(
                f"{k}: {v['wall']:.2f} s, max RSS {v['max_rss'] / MB:.1f} MB"
                for k, v in cli.items()
            )
            + ".\n"
        )
    return text + "\n![planning time](planning.png)\n"


def targets(results: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, verdict) from the headline (defaults: auto backend, 2 workers)."""
    h = results["headline"]["contenders"]
    durable, nosync = h["streamconv durable, auto, 2w"], h["streamconv --no-sync, auto, 2w"]
    med = {k: v["wall"]["median"] for k, v in h.items()}
    out: list[tuple[str, str, str, bool | None]] = []
    r1 = nosync["wall"]["median"] / med[CP]
    out.append(
        (
            "--no-sync ≤ 0.60 × cp -a",
            f"{nosync['wall']['median']:.2f} s / {med[CP]:.2f} s = {r1:.2f}",
            "0.60",
            r1 <= 0.60,
        )
    )
    r2 = durable["wall"]["median"] / med[CP_SYNC]
    out.append(
        (
            "durable ≤ 1.00 × cp -a && sync",
            f"{durable['wall']['median']:.2f} s / {med[CP_SYNC]:.2f} s = {r2:.2f}",
            "1.00",
            r2 <= 1.00,
        )
    )
    base = h[BASELINE]
    r3 = base["wall"]["median"] / durable["wall"]["median"]
    r3n = base["wall"]["median"] / nosync["wall"]["median"]
    out.append(
        (
            "≥ 6 × faster than the baseline",
            f"baseline {base['wall']['median']:.2f} s: {r3:.1f}× durable, {r3n:.1f}× --no-sync",
            "6",
            r3 >= 6,
        )
    )
    r4 = base["tree_rss_mb"]["median"] / durable["tree_rss_mb"]["median"]
    out.append(
        (
            "peak RSS ≥ 100 × lower than the baseline",
            f"{base['tree_rss_mb']['median']:.0f} MB / {durable['tree_rss_mb']['median']:.1f} "
            f"MB = {r4:.0f}×",
            "100",
            r4 >= 100,
        )
    )
    big = max(durable["tree_rss_mb"]["high"], nosync["tree_rss_mb"]["high"])
    ck = results["headline"]["checkpoint"]
    out.append(
        (
            f"tree RSS ≤ 32 MB, {ck['shard_size'] / GB:.1f} GB shards (headline, max of all "
            "runs, auto 2w)",
            f"{big:.1f} MB",
            "32",
            big <= 32,
        )
    )
    shards = results.get("shards", [])
    for r in shards:
        if r["contender"] in ("streamconv durable, auto, 2w", "streamconv --no-sync, auto, 2w"):
            top = r["tree_rss_mb"]["high"]
            out.append(
                (
                    f"tree RSS ≤ 32 MB, {r['shard_gb']:g} GB shards ({r['contender']})",
                    f"{top:.1f} MB",
                    "32",
                    top <= 32,
                )
            )
    plan = results.get("plan", [])
    if plan:
        last = plan[-1]
        t = last["total"]["median"]
        out.append(
            (
                f"plan of {last['keys']} keys / {last['shards']} shards < 2 s",
                f"{t:.3f} s (load {last['load']['median']:.3f} + plan "
                f"{last['plan']['median']:.3f})",
                "2",
                t < 2,
            )
        )
    return out


def _targets_md(results: dict[str, Any]) -> str:
    rows = [
        [t, m, {True: "met", False: "MISSED", None: "?"}[ok]] for t, m, _, ok in targets(results)
    ]
    return "## Targets (issue 3)\n\n" + table(["target", "measured (medians)", "verdict"], rows)


def plots(results: dict[str, Any], out: Path) -> None:
    if "size" in results:
        series = []
        for name in dict.fromkeys(r["contender"] for r in results["size"]):
            rs = [r for r in results["size"] if r["contender"] == name]
            series.append(_series(name, rs, lambda r: r["bytes"] / GB, "wall"))
        plot(
            out / "size_scaling.png",
            series,
            title="Time vs checkpoint size",
            xlabel="checkpoint (GB of tensors)",
            ylabel="wall time (s)",
            ymin=0,
        )
    if "workers" in results:
        rows = results["workers"]["rows"]
        series = []
        for sync in (True, False):
            rs = [r for r in rows if r["sync"] == sync]
            series.append(
                _series("durable" if sync else "--no-sync", rs, lambda r: r["workers"], "wall")
            )
        plot(
            out / "workers.png",
            series,
            title="Time vs workers (auto backend)",
            xlabel="workers",
            ylabel="wall time (s)",
            ymin=0,
        )
    if "shards" in results:
        rows = results["shards"]
        series = []
        for name in dict.fromkeys(r["contender"] for r in rows):
            rs = [r for r in rows if r["contender"] == name]
            series.append(_series(name, rs, lambda r: r["largest_shard_bytes"] / GB, "tree_rss_mb"))
        plot(
            out / "rss_vs_shard.png",
            series,
            title="Peak RSS of the process tree vs shard size",
            xlabel="largest shard (GB)",
            ylabel="peak tree RSS (MB)",
            logy=True,
            hline=(32, "target 32 MB"),
        )
    if "plan" in results:
        rows = results["plan"]
        keys = [r["keys"] for r in rows]
        plot(
            out / "planning.png",
            [
                Series("load_checkpoint", keys, [r["load"]["median"] for r in rows]),
                Series("plan_checkpoint", keys, [r["plan"]["median"] for r in rows]),
                Series("total", keys, [r["total"]["median"] for r in rows]),
            ],
            title="Header reading and planning time vs keys",
            xlabel="input keys",
            ylabel="seconds",
            hline=(2.0, "target 2 s"),
            ymin=0,
        )


# ---------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI (< 1 minute)")
    parser.add_argument("--out", type=Path, help="result files (default benchmarks/results)")
    parser.add_argument(
        "--data",
        type=Path,
        help="where generated checkpoints go (default: a temporary directory in benchmarks/, "
        "on the repository's filesystem); removed at the end",
    )
    parser.add_argument(
        "--cold", action="store_true", help="drop the page cache before every run (needs root)"
    )
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run"
    )
    parser.add_argument("--rounds", type=int, help="measured rounds of the headline matrix")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other sections of an earlier results.json in --out (re-run a section)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    if args.rounds:
        cfg = dataclasses.replace(cfg, rounds=args.rounds)
    out = args.out or (HERE / (".smoke-results" if args.smoke else "results"))
    out.mkdir(parents=True, exist_ok=True)
    parent = args.data or HERE
    parent.mkdir(parents=True, exist_ok=True)
    if args.cold and not harness.can_drop_caches():
        print("--cold needs /proc/sys/vm/drop_caches to be writable (root)", file=sys.stderr)
        return 2
    fs = _fs_of(parent)
    if fs["fstype"] in ("tmpfs", "ramfs"):
        print(f"warning: {parent} is on {fs['fstype']}: not a disk benchmark", file=sys.stderr)
    need = _space_needed(cfg)
    free = shutil.disk_usage(parent).free
    if free < need:
        print(f"need ~{need / GB:.0f} GB free in {parent}, have {free / GB:.0f}", file=sys.stderr)
        return 2
    data = Path(tempfile.mkdtemp(prefix=".data-", dir=parent))
    bench = Bench(cfg, data, out, cold=args.cold, smoke=args.smoke)
    command = " ".join(
        [".venv/bin/python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]
    )
    if args.merge and (out / "results.json").exists():
        bench.results = json.loads((out / "results.json").read_text())
        for section in args.only:
            bench.results.pop(section, None)
            bench.results.get("streamconv_sources", {}).pop(section, None)
        bench.results["command"] = f"{bench.results.get('command')}; then {command}"
        with bench.log.open("a") as handle:
            handle.write(f"\n### {command}\n")
    else:
        bench.log.write_text("")
        bench.results["command"] = command
    now = machine(data)
    if args.merge and "date" in bench.results.get("machine", {}):
        now["date_merged"] = now.pop("date")
        now.pop("loadavg_start")
    bench.results["machine"] = {**bench.results.get("machine", {}), **now}
    bench.results["cache"] = (
        "COLD: page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every run"
        if args.cold
        else "WARM: input in the page cache (generated just before, or read by the warm-up); "
        "sync before every run"
        + ("" if harness.can_drop_caches() else "; dropping the page cache is not possible here")
    )
    bench.say(f"data in {data} ({fs['fstype']}), results in {out}; {bench.results['cache']}")
    try:
        only = set(args.only)
        if only & {"headline", "lowmem"}:
            if "headline" in only:
                src, reference, spec = section_headline(bench)
            else:
                spec = make_spec(cfg.shape, cfg.headline_gb, cfg.headline_shard_gb)
                src, reference = bench.generate("headline", spec), None
            if reference is not None and "lowmem" not in only:
                shutil.rmtree(reference)
            if "lowmem" in only:
                section_lowmem(bench, src, reference, spec)
            shutil.rmtree(src)
            if reference is not None and reference.exists():
                shutil.rmtree(reference)
        if only & {"size", "workers"}:
            section_size_workers(bench, "size" in only, "workers" in only)
        if "shards" in only:
            section_shards(bench)
        if "plan" in only:
            section_plan(bench)
    finally:
        shutil.rmtree(data, ignore_errors=True)
        os.sync()
    bench.results["machine"]["loadavg_end"] = os.getloadavg()
    bench.results["elapsed_s"] = round(time.monotonic() - bench.started, 1)
    bench.save()
    plots(bench.results, out)
    report_path = out / "summary.md"
    bench.say(f"done in {bench.results['elapsed_s']} s; summary in {report_path}")
    if len(bench.sources_seen) > 1:
        bench.say(f"WARNING: streamconv's sources changed during the run: {bench.sources_seen}")
    if "headline" in bench.results:
        for target, measured, _, ok in targets(bench.results):
            print(f"  {'met   ' if ok else 'MISSED'} {target}: {measured}")
    return 0


def _space_needed(cfg: Config) -> int:
    headline = 3 * cfg.headline_gb  # input, the baseline's reference output, one output
    sizes = sum(cfg.sizes_gb) + max(cfg.sizes_gb)
    shards = 2 * cfg.shard_total_gb
    return int(max(headline, sizes, shards) * GB * 1.1) + 1 * 2**30


if __name__ == "__main__":
    sys.exit(main())
