"""Fault injection: full disks, other filesystems, file size limits, I/O errors, shrinking sources.

Real faults where the machine allows them (a small tmpfs for ENOSPC and EXDEV, RLIMIT_FSIZE for
EFBIG, a read-only remount for EROFS), injected ones otherwise (``os.fsync``, ``os.preadv``,
``os.copy_file_range`` raising EIO; a source truncated between planning and copying). Each
fault must end the run with exit 4 and one stderr line naming the file and the cause, leave no
temporary file and nothing partial under a final name, and be resumable: once the fault is gone,
the same command finishes and the output is byte-identical to a clean run (itself checked
against the independent reference).

The tmpfs tests need root and permission to mount; they skip cleanly otherwise.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from streamconv.cli import main
from streamconv.convert import ConvertOptions, convert
from streamconv.synth import SynthSpec, synthesize
from streamconv.writer import WriteOptions

INDEX = "model.safetensors.index.json"
RUN_STATE = ".streamconv"
TEMP = re.compile(r"^\..+\.streamconv-partial$")
TIMEOUT = 60
#: ~300 KB in 7 shards.
SMALL = SynthSpec(
    layers=3, experts=6, hidden=64, inter=32, vocab=128, dense_layers=1, shard_size=48 * 1024
)
#: ~3 MB in 6 shards of ~512 KB: more than a 2 MiB tmpfs holds.
WIDE = SynthSpec(layers=6, experts=8, hidden=128, inter=64, vocab=512, shard_size=512 * 1024)

Tree = dict[str, str]
Check = Callable[[Path, Path], Any]
Mount = Callable[[str], Path]


# --- helpers -----------------------------------------------------------------------------------


def tree(root: Path) -> Tree:
    """Every entry below ``root`` (run state aside) as {relative path: sha256 or "<dir>"}."""
    out: Tree = {}
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] != RUN_STATE:
            out[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def temps(root: Path) -> list[str]:
    return sorted(r for r in tree(root) if any(TEMP.match(p) for p in r.split("/")))


def assert_nothing_partial(out: Path, clean: Tree) -> None:
    """No temporary file left; whatever is under a final name is the clean run's; no index."""
    assert temps(out) == []
    found = tree(out)
    for rel, digest in found.items():
        assert clean.get(rel) == digest, f"{rel} is under its final name but not right"
    assert INDEX not in found, "the index is published after a failed run"


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def one_line(stderr: str, *needles: str) -> str:
    """The whole of stderr is one line containing every needle (case-insensitive)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def command(source: Path, out: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "streamconv", "convert", str(source), str(out), *options]


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def shard_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("*.safetensors"))


class Clean:
    def __init__(self, source: Path, output: Path) -> None:
        self.source = source
        self.output = output
        self.tree = tree(output)


def _clean(base: Path, spec: SynthSpec) -> Clean:
    synthesize(base / "in", spec)
    proc = subprocess.run(
        command(base / "in", base / "clean", "-q"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=base,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return Clean(base / "in", base / "clean")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Clean:
    return _clean(tmp_path_factory.mktemp("faults-small"), SMALL)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Clean:
    return _clean(tmp_path_factory.mktemp("faults-wide"), WIDE)


def test_clean_runs_match_the_reference(small: Clean, wide: Clean, check: Check) -> None:
    check(small.source, small.output)
    check(wide.source, wide.output)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """``tmpfs("2m")`` mounts a fresh tmpfs of that size and returns its path; unmounted after."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        target = tmp_path / f"tmpfs{len(mounted)}"
        target.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(target)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        proc = subprocess.run(["umount", str(target)], capture_output=True, timeout=30, check=False)
        if proc.returncode != 0:
            subprocess.run(
                ["umount", "-l", str(target)], capture_output=True, timeout=30, check=False
            )


def remount(target: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(target)], check=True, timeout=30)


def available(path: Path) -> int:
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


# --- ENOSPC ------------------------------------------------------------------------------------


def test_output_larger_than_the_disk_is_refused_up_front(
    wide: Clean, tmpfs: Mount, capsys: pytest.CaptureFixture[str], check: Check
) -> None:
    disk = tmpfs("2m")
    out = disk / "out"
    free = available(disk)
    needed_at_least = sum((wide.source / n).stat().st_size for n in shard_names(wide.source))
    assert needed_at_least > free
    code, stdout, stderr = cli(capsys, "convert", wide.source, out, "-q")
    assert code == 4
    line = one_line(stderr, str(out), "space")
    numbers = [int(n) for n in re.findall(r"\d{4,}", line.replace(str(out), ""))]
    assert len(numbers) == 2, line  # bytes needed, bytes available
    needed, said_free = numbers
    assert needed >= needed_at_least - 64 * 1024  # output headers may differ a little in size
    assert abs(said_free - free) <= 64 * 1024
    assert stdout == ""
    assert_nothing_partial(out, wide.tree)
    assert [n for n in os.listdir(out) if n != RUN_STATE] == []  # checked before any writing
    remount(disk, "size=16m")  # space made: the same command now works
    code, _, stderr = cli(capsys, "convert", wide.source, out, "-q")
    assert code == 0, stderr
    check(wide.source, out)


def _lying_statvfs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the free-space pre-check pass, so the disk fills up while writing."""
    real = os.statvfs

    def statvfs(path: Any) -> os.statvfs_result:
        info = real(path)
        return os.statvfs_result((*info[:4], 2**40 // info.f_frsize, *info[5:]))

    monkeypatch.setattr(os, "statvfs", statvfs)


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("backend", ["auto", "mmap", "pread"])
def test_disk_full_while_writing(
    wide: Clean, tmpfs: Mount, request: pytest.FixtureRequest, backend: str, workers: str
) -> None:
    capsys: pytest.CaptureFixture[str] = request.getfixturevalue("capsys")
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    disk = tmpfs("2m")
    out = disk / "out"
    _lying_statvfs(monkeypatch)
    argv = ("convert", wide.source, out, "-q", "--backend", backend, "--workers", workers)
    code, stdout, stderr = cli(capsys, *argv)
    monkeypatch.undo()
    assert code == 4
    line = one_line(stderr, "space")
    assert any(name in line for name in shard_names(wide.source)), line
    assert stdout == ""
    assert_nothing_partial(out, wide.tree)
    published = [n for n in os.listdir(out) if n.endswith(".safetensors")]
    assert 0 < len(published) < len(shard_names(wide.source))  # it failed part-way
    remount(disk, "size=16m")
    code, stdout, stderr = cli(capsys, "convert", wide.source, out, "-q", "--backend", backend)
    assert code == 0, stderr
    assert f"{len(published)} shards kept" in stdout
    assert tree(out) == wide.tree


def test_read_only_output(small: Clean, tmpfs: Mount, capsys: pytest.CaptureFixture[str]) -> None:
    disk = tmpfs("8m")
    remount(disk, "ro")
    out = disk / "out"
    code, _, stderr = cli(capsys, "convert", small.source, out, "-q")
    assert code == 4
    one_line(stderr, str(out), "read-only")
    assert not out.exists()


# --- EXDEV: input and output on different filesystems -------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "copy_file_range"])
@pytest.mark.parametrize("where", ["input-on-tmpfs", "output-on-tmpfs"])
def test_across_filesystems_falls_back_to_pread(
    small: Clean, tmpfs: Mount, check: Check, where: str, backend: str
) -> None:
    disk = tmpfs("32m")
    tmp_path = disk.parent  # on the disk
    if where == "input-on-tmpfs":
        source, out = disk / "in", tmp_path / "out"
        shutil.copytree(small.source, source)
    else:
        source, out = small.source, disk / "out"
    assert os.stat(source).st_dev != os.stat(out.parent).st_dev
    options = ConvertOptions(write=WriteOptions(backend=backend, workers=2))
    result = convert(source, out, options)
    assert result.backends == ("pread",)
    check(source, out)
    assert tree(out) == small.tree


def test_across_filesystems_mmap(small: Clean, tmpfs: Mount, check: Check) -> None:
    disk = tmpfs("32m")
    out = disk / "out"
    result = convert(small.source, out, ConvertOptions(write=WriteOptions(backend="mmap")))
    assert result.backends == ("mmap",)
    check(small.source, out)


# --- EFBIG: RLIMIT_FSIZE (ulimit -f) -------------------------------------------------------------


def _limit_file_size(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return preexec


@pytest.mark.parametrize("backend", ["auto", "pread"])
def test_file_size_limit(small: Clean, tmp_path: Path, backend: str) -> None:
    out = tmp_path / "out"
    sizes = sorted((small.output / n).stat().st_size for n in shard_names(small.output))
    limit = (sizes[0] + sizes[-1]) // 2  # some shards fit, the largest does not
    proc = subprocess.run(
        command(small.source, out, "-q", "--workers", "1", "--backend", backend),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
        preexec_fn=_limit_file_size(limit),
        check=False,
    )
    assert proc.returncode == 4, proc.stderr
    line = one_line(proc.stderr, "too large")
    assert any(name in line for name in shard_names(small.source)), line
    assert proc.stdout == ""
    assert_nothing_partial(out, small.tree)
    rerun = subprocess.run(
        command(small.source, out, "-q", "--backend", backend),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
        check=False,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert tree(out) == small.tree


# --- EIO: injected fsync and read errors ---------------------------------------------------------


def _is_shard_temp(path: str) -> bool:
    name = os.path.basename(path)
    return bool(TEMP.match(name)) and name.endswith(".safetensors.streamconv-partial")


#: which fsync fails -> (does this path count, which matching call fails)
FSYNC_TARGETS: dict[str, tuple[Callable[[str, Path], bool], int]] = {
    "run-state": (lambda p, out: p.endswith(".state.json.tmp"), 1),
    "first-shard": (lambda p, out: _is_shard_temp(p), 1),
    "third-shard": (lambda p, out: _is_shard_temp(p), 3),
    "output-directory": (lambda p, out: p == str(out), 2),
    "copied-file": (lambda p, out: p.endswith(".config.json.streamconv-partial"), 1),
    "index": (lambda p, out: p.endswith(f".{INDEX}.streamconv-partial"), 1),
}


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("target", sorted(FSYNC_TARGETS))
def test_fsync_failure(
    small: Clean, tmp_path: Path, request: pytest.FixtureRequest, target: str, workers: str
) -> None:
    capsys: pytest.CaptureFixture[str] = request.getfixturevalue("capsys")
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    out = tmp_path / "out"
    matches, failing = FSYNC_TARGETS[target]
    real = os.fsync
    calls: list[str] = []
    failed: list[str] = []
    failed_at: list[int] = []

    def fsync(fd: int) -> None:
        path = fd_path(fd)
        calls.append(path)
        if matches(path, out) and sum(matches(c, out) for c in calls) == failing:
            failed.append(path)
            failed_at.append(len(calls))
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code, stdout, stderr = cli(capsys, "convert", small.source, out, "-q", "--workers", workers)
    monkeypatch.undo()
    assert len(failed) == 1, calls
    assert code == 4
    line = one_line(stderr, os.strerror(errno.EIO))
    assert str(out) in line
    assert stdout == ""
    after = calls[failed_at[0] :]
    if workers == "1":  # (with two workers the other one may still publish its own shard)
        assert failed[0] not in after, "a failed fsync was retried"
    assert_nothing_partial(out, small.tree)
    code, _, stderr = cli(capsys, "convert", small.source, out, "-q")
    assert code == 0, stderr
    assert tree(out) == small.tree


@pytest.mark.parametrize(
    ("backend", "call"), [("pread", "preadv"), ("copy_file_range", "copy_file_range")]
)
def test_read_error(
    small: Clean, tmp_path: Path, request: pytest.FixtureRequest, backend: str, call: str
) -> None:
    capsys: pytest.CaptureFixture[str] = request.getfixturevalue("capsys")
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    out = tmp_path / "out"
    real = getattr(os, call)
    count = [0]

    def failing(*args: Any) -> Any:
        count[0] += 1
        if count[0] == 5:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(*args)

    monkeypatch.setattr(os, call, failing)
    code, _, stderr = cli(capsys, "convert", small.source, out, "-q", "--backend", backend)
    monkeypatch.undo()
    assert count[0] >= 5
    assert code == 4
    line = one_line(stderr, os.strerror(errno.EIO))
    assert any(name in line for name in shard_names(small.source)), line
    assert_nothing_partial(out, small.tree)
    code, _, stderr = cli(capsys, "convert", small.source, out, "-q", "--backend", backend)
    assert code == 0, stderr
    assert tree(out) == small.tree


# --- a source that changes after planning ---------------------------------------------------------

#: Runs the real CLI in a subprocess (so a hang is caught by the timeout), with the sources
#: opened by the conversion wrapped: once they are open (headers read, plan made), the victim
#: is truncated to SIZE bytes, or (SIZE = -1) its mtime is moved (same bytes).
CHANGE_SCRIPT = """
import contextlib, os, sys
import importlib
from streamconv.cli import main

convert = importlib.import_module("streamconv.convert")  # the package exports a function too

victim, size = sys.argv[1], int(sys.argv[2])
real = convert.open_sources

@contextlib.contextmanager
def changing(paths):
    with real(paths) as fds:
        if size >= 0:
            os.truncate(victim, size)
        else:
            info = os.stat(victim)
            os.utime(victim, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
        yield fds

convert.open_sources = changing
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("backend", ["auto", "copy_file_range", "mmap", "pread"])
def test_source_truncated_after_planning(
    tmp_path: Path, backend: str, workers: str, small: Clean
) -> None:
    source, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(small.source, source)
    names = shard_names(source)
    victim = source / names[len(names) // 2]
    size = victim.stat().st_size
    cut = size - (size - 8 - int.from_bytes(victim.read_bytes()[:8], "little")) // 2
    argv = ["convert", str(source), str(out), "-q", "--backend", backend, "--workers", workers]
    proc = subprocess.run(
        [sys.executable, "-c", CHANGE_SCRIPT, str(victim), str(cut), *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
        check=False,
    )
    assert victim.stat().st_size == cut  # the wrapper did run
    assert proc.returncode == 4, proc.stderr
    one_line(proc.stderr, victim.name, "truncated")
    assert_nothing_partial(out, small.tree)
    # The input is now broken: the next run refuses it (exit 3) instead of copying short data.
    rerun = subprocess.run(
        command(source, out, "-q"), capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert rerun.returncode == 3, rerun.stderr
    one_line(rerun.stderr, victim.name, "truncated")


def test_source_touched_during_the_run(tmp_path: Path, small: Clean) -> None:
    source, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(small.source, source)
    victim = source / shard_names(source)[0]
    argv = ["convert", str(source), str(out), "-q"]
    proc = subprocess.run(
        [sys.executable, "-c", CHANGE_SCRIPT, str(victim), "-1", *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 4, proc.stderr
    one_line(proc.stderr, victim.name, "changed")
    assert_nothing_partial(out, small.tree)  # above all: no index
