"""The command line: both spellings, the summary, progress, exit codes, error lines, signals.

Outputs are checked against the independent reference (the ``check`` fixture); broken inputs
are made with safetensors and json directly.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from reference import load_raw, reference_convert, serialize_raw

from streamconv.cli import main
from streamconv.synth import SynthSpec, synthesize

INDEX = "model.safetensors.index.json"
UNITS = {
    "B": 1,
    "KB": 10**3,
    "kB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
}

Check = Callable[[Path, Path], Any]
Make = Callable[..., Path]


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def final_names(directory: Path) -> list[str]:
    """Shards and the index under their final names (what a reader would trust)."""
    if not directory.exists():
        return []
    return sorted(n for n in os.listdir(directory) if n.endswith((".safetensors", ".json")))


def partial_names(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.rglob("*") if "partial" in p.name)


def one_error_line(err: str, *needles: str, only: bool = True) -> str:
    """The one error line of ``err``; with ``only`` it must be all of stderr.

    Without ``--quiet`` a run may log its plan (an info line) before failing; the error itself
    is still one line, the last, and no traceback is shown.
    """
    lines = err.splitlines()
    assert "Traceback" not in err, err
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    if only:
        assert len(lines) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def byte_count(text: str) -> float:
    number, unit = text.split()
    return float(number) * UNITS[unit]


# --- successful runs -------------------------------------------------------------------------


def check_summary(out: str, expected: dict[str, dict[str, Any]], output_dir: Path) -> None:
    lines = out.splitlines()
    assert len(lines) == 1, out
    line = lines[0]
    tensors = sum(len(t) for t in expected.values())
    assert re.search(rf"\b{tensors} tensors\b", line), line
    assert re.search(rf"\b{len(expected)} shards?\b", line), line
    sizes = re.findall(r"(\d+(?:\.\d+)? (?:[kKMG]i?B|B))(?!/s)", line)
    assert sizes, line
    total = sum((output_dir / shard).stat().st_size for shard in expected)
    assert abs(byte_count(sizes[0]) - total) <= 0.01 * total, (sizes[0], total)
    assert re.search(r"\d+(?:\.\d+)? s\b", line), line  # seconds
    assert re.search(r"\d+(?:\.\d+)? (?:[kKMG]i?B|B)/s", line), line  # rate


def check_final_progress(err: str) -> None:
    lines = [line for line in err.splitlines() if "%" in line]
    assert lines, err
    assert re.search(r"100(\.0+)?\s*%", lines[-1]), lines[-1]
    assert "/s" in lines[-1], lines[-1]


def test_convert_positional(
    make_checkpoint: Make, check: Check, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = make_checkpoint(), tmp_path / "out"
    code, stdout, stderr = cli(capsys, "convert", source, out)
    assert code == 0, stderr
    expected = check(source, out)
    check_summary(stdout, expected, out)
    check_final_progress(stderr)  # captured stderr is not a terminal: plain progress lines
    assert "\r" not in stderr and "Traceback" not in stderr


def test_convert_old_spelling(
    make_checkpoint: Make, check: Check, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = make_checkpoint(scatter=True, experts=8, shard_size=80_000), tmp_path / "out"
    code, stdout, stderr = cli(
        capsys, "convert", "--input_dir", source, "--output_dir", out, "--workers", "2"
    )
    assert code == 0, stderr
    check_summary(stdout, check(source, out), out)


@pytest.mark.parametrize("backend", ["copy_file_range", "mmap", "pread"])
def test_convert_backend_and_no_sync_options(
    make_checkpoint: Make,
    check: Check,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    backend: str,
) -> None:
    source, out = make_checkpoint(), tmp_path / "out"
    code, _, stderr = cli(
        capsys, "convert", source, out, "--backend", backend, "--no-sync", "--workers", "1"
    )
    assert code == 0, stderr
    check(source, out)


def test_quiet_prints_no_progress(
    make_checkpoint: Make, check: Check, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = make_checkpoint(), tmp_path / "out"
    code, _, stderr = cli(capsys, "convert", source, out, "--quiet")
    assert code == 0
    assert stderr == ""
    check(source, out)


def test_subprocess_python_m_streamconv(
    make_checkpoint: Make, check: Check, tmp_path: Path
) -> None:
    source, out = make_checkpoint(), tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "streamconv", "convert", str(source), str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    expected = check(source, out)
    check_summary(done.stdout, expected, out)
    check_final_progress(done.stderr)  # a pipe, not a terminal
    assert "Traceback" not in done.stderr


# --- usage errors (2) ------------------------------------------------------------------------


def test_missing_output_dir(make_checkpoint: Make, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = cli(capsys, "convert", make_checkpoint())
    assert code == 2
    one_error_line(stderr, "OUTPUT_DIR")


@pytest.mark.parametrize("argv", [["--bogus"], ["--workers", "0"], ["--backend", "nope"]])
def test_bad_option(
    make_checkpoint: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    out = tmp_path / "out"
    code, _, stderr = cli(capsys, "convert", make_checkpoint(), out, *argv)
    assert code == 2
    assert "Traceback" not in stderr
    assert argv[0] in stderr.splitlines()[-1] or argv[-1] in stderr.splitlines()[-1], stderr
    assert not out.exists()


@pytest.mark.parametrize("where", ["same", "inside", "nested"])
def test_output_inside_input(
    make_checkpoint: Make,
    snapshot: Callable[[Path], dict[str, bytes]],
    capsys: pytest.CaptureFixture[str],
    where: str,
) -> None:
    source = make_checkpoint()
    out = {"same": source, "inside": source / "out", "nested": source / "original" / "o"}[where]
    before = snapshot(source)
    entries = sorted(p.name for p in source.rglob("*"))
    code, _, stderr = cli(capsys, "convert", source, out)
    assert code == 2
    one_error_line(stderr, str(out))
    assert snapshot(source) == before
    assert sorted(p.name for p in source.rglob("*")) == entries


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "verbose"])
def test_non_empty_output_dir(
    make_checkpoint: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str], quiet: bool
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    code, _, stderr = cli(capsys, "convert", make_checkpoint(), out, *(["-q"] if quiet else []))
    assert code == 2
    one_error_line(stderr, str(out), only=quiet)
    assert os.listdir(out) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine\n"


# --- invalid input (3) -----------------------------------------------------------------------


def rewrite_without(shard: Path, key: str) -> None:
    """Rewrite ``shard`` with safetensors, leaving tensor ``key`` out."""
    tensors, metadata = load_raw(shard)
    del tensors[key]
    shard.write_bytes(serialize_raw(tensors, metadata))


def break_header(root: Path) -> str:
    shard = sorted(root.glob("*.safetensors"))[1]
    with open(shard, "r+b") as handle:
        handle.write(struct.pack("<Q", 2**63 - 1))
    return shard.name


def drop_expert(root: Path) -> str:
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    document = json.loads((root / INDEX).read_text())
    shard = document["weight_map"].pop(key)
    rewrite_without(root / shard, key)
    (root / INDEX).write_text(json.dumps(document))
    return "up_proj"


def name_missing_shard(root: Path) -> str:
    document = json.loads((root / INDEX).read_text())
    first = next(iter(document["weight_map"]))
    document["weight_map"][first] = "model-00099-of-00099.safetensors"
    (root / INDEX).write_text(json.dumps(document))
    return "model-00099-of-00099.safetensors"


@pytest.mark.parametrize("breaker", [break_header, drop_expert, name_missing_shard])
def test_invalid_input(
    make_checkpoint: Make,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    breaker: Callable[[Path], str],
) -> None:
    source, out = make_checkpoint(), tmp_path / "out"
    needle = breaker(source)
    code, stdout, stderr = cli(capsys, "convert", source, out)
    assert code == 3
    one_error_line(stderr, needle)
    assert stdout == ""
    assert final_names(out) == [] and partial_names(out) == []


def test_missing_expert_error_names_a_file(
    make_checkpoint: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = make_checkpoint()
    drop_expert(source)
    weight_map = json.loads((source / INDEX).read_text())["weight_map"]
    shards = {s for k, s in weight_map.items() if k.startswith("model.layers.1.mlp.experts.")}
    code, _, stderr = cli(capsys, "convert", source, tmp_path / "out")
    assert code == 3
    line = one_error_line(stderr)
    assert str(source) in line or any(s in line for s in shards), line


def test_debug_shows_traceback(
    make_checkpoint: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = make_checkpoint()
    shard = break_header(source)
    code, _, stderr = cli(capsys, "convert", source, tmp_path / "out", "--debug")
    assert code == 3
    assert "Traceback" in stderr
    assert shard in stderr.splitlines()[-1]


# --- I/O errors (4) --------------------------------------------------------------------------


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "verbose"])
def test_output_parent_is_a_file(
    make_checkpoint: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str], quiet: bool
) -> None:
    (tmp_path / "plain").write_text("not a directory\n")
    out = tmp_path / "plain" / "out"
    code, _, stderr = cli(capsys, "convert", make_checkpoint(), out, *(["-q"] if quiet else []))
    assert code == 4
    one_error_line(stderr, str(out), only=quiet)
    assert (tmp_path / "plain").read_text() == "not a directory\n"


def _fd_name(fd: int) -> str:
    return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))


@pytest.mark.parametrize("workers", ["1", "3"])
def test_disk_full_while_copying(
    make_checkpoint: Make,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    workers: str,
) -> None:
    source, out = make_checkpoint(experts=8, shard_size=40_000), tmp_path / "out"
    weight_map = json.loads((source / INDEX).read_text())["weight_map"]
    victim = weight_map["model.layers.1.mlp.experts.0.gate_proj.weight"]
    real_pwrite = os.pwrite
    seen: list[int] = []

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if victim in _fd_name(fd):
            seen.append(offset)
            if len(seen) > 2:  # the header and a first range land, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    code, _, stderr = cli(
        capsys, "convert", source, out, "--backend", "pread", "--workers", workers, "-q"
    )
    monkeypatch.undo()
    assert len(seen) > 2
    assert code == 4
    one_error_line(stderr, victim)
    assert victim not in os.listdir(out)
    assert INDEX not in os.listdir(out)
    assert partial_names(out) == []


def test_disk_full_at_preallocation(
    make_checkpoint: Make,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source, out = make_checkpoint(), tmp_path / "out"

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    code, _, stderr = cli(capsys, "convert", source, out, "-q")
    monkeypatch.undo()
    assert code == 4
    line = one_error_line(stderr)
    assert ".safetensors" in line, line
    assert final_names(out) == [] and partial_names(out) == []


# --- signals -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 190 MB in 4 shards."""
    root = tmp_path_factory.mktemp("big") / "in"
    spec = SynthSpec(
        layers=4, experts=16, hidden=1024, inter=512, vocab=1024, shard_size=48 * 1024 * 1024
    )
    synthesize(root, spec)
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        (signal.SIGINT, 130, "interrupt", ["--workers", "1", "--backend", "pread"]),
        (signal.SIGINT, 130, "interrupt", ["--workers", "2", "--backend", "mmap"]),
        (signal.SIGTERM, 143, "terminat", ["--workers", "2"]),
    ],
    ids=["sigint-pread-1", "sigint-mmap-2", "sigterm-auto-2"],
)
def test_signal_stops_cleanly(
    big_checkpoint: Path, tmp_path: Path, case: tuple[int, int, str, list[str]]
) -> None:
    signum, code, word, options = case
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "streamconv", "convert", str(big_checkpoint), str(out)]
    proc = subprocess.Popen(
        [*argv, "--no-sync", "--quiet", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    caught = False
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            if partial_names(out):
                # Freeze it mid-copy so the signal surely lands while a shard is being written.
                os.kill(proc.pid, signal.SIGSTOP)
                caught = True
                os.kill(proc.pid, signum)
                os.kill(proc.pid, signal.SIGCONT)
                break
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert caught, "the conversion finished before the signal: make the checkpoint bigger"
    assert proc.returncode == code, stderr
    assert len(stderr.splitlines()) == 1 and word in stderr, stderr
    assert "Traceback" not in stderr
    assert stdout == ""
    assert partial_names(out) == []
    assert INDEX not in os.listdir(out)
    shards = [n for n in os.listdir(out) if n.endswith(".safetensors")]
    if shards:  # whatever stands under a final name must be complete and right
        expected = reference_convert(big_checkpoint)
        for name in shards:
            got, _ = load_raw(out / name)
            assert sorted(got) == sorted(expected[name])
            for tensor, (dtype, array) in expected[name].items():
                assert got[tensor][0] == dtype
                assert got[tensor][1].tobytes() == array.tobytes()
