"""What the converter's imports cost in resident memory (issue 3: "no needless imports").

Each line: a fresh interpreter imports one module (after the ones before it in its group are
not imported: every measurement starts from a bare interpreter) and reports its peak RSS.

Usage: python benchmarks/experiments/imports.py
"""

from __future__ import annotations

import subprocess
import sys

MODULES = (
    "",  # the bare interpreter
    "orjson",
    "xxhash",
    "hashlib",
    "json",
    "logging",
    "argparse",
    "dataclasses",
    "concurrent.futures",
    "pathlib",
    "shutil",
    "mmap",
    "uuid",
    "numpy",
    "streamconv.header",
    "streamconv.plan",
    "streamconv.copyengine",
    "streamconv.writer",
    "streamconv.convert",
    "streamconv.cli",
)
PROBE = (
    "import resource, sys\n"
    "if sys.argv[1]: __import__(sys.argv[1])\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
)


def rss_kib(module: str, repeat: int = 3) -> int:
    values = []
    for _ in range(repeat):
        done = subprocess.run(
            [sys.executable, "-c", PROBE, module], check=True, capture_output=True, text=True
        )
        values.append(int(done.stdout.strip()))
    return min(values)


def main() -> int:
    bare = rss_kib("")
    print("| import | peak RSS MB | over the bare interpreter MB |")
    print("|---|---:|---:|")
    for module in MODULES:
        value = rss_kib(module)
        name = f"`{module}`" if module else "(bare interpreter)"
        print(f"| {name} | {value * 1024 / 1e6:.1f} | {(value - bare) * 1024 / 1e6:+.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
