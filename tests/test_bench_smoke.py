"""The benchmark suite still runs: its tiny smoke mode, end to end (not a timing test)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("psutil")
pytest.importorskip("matplotlib")


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is missing")
def test_benchmark_smoke_run_completes_and_checks_outputs(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--smoke",
            "--out",
            str(out),
            "--data",
            str(tmp_path / "data"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results  # the suite wrote its measurements
    assert (out / "summary.md").read_text().count("|") > 10
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
