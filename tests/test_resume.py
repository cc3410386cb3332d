"""Commit protocol and resume: kill a real conversion anywhere, run it again, get the same bytes.

Kill tests run the real command line (``python -m streamconv convert IN OUT``) in a subprocess
and kill it with SIGKILL at many points: (a) after measured delays spread over a ~190 MB run,
(b) at exact system calls with ``strace -e inject=SYSCALL:signal=SIGKILL:when=N`` (skipped when
strace is missing). Between the kill and the rerun, every file under a final name must be
byte-identical to the same file of a clean run (and an index means the whole output is there);
after the rerun the output must be byte-identical to a clean run's. The clean run itself is
checked against the independent reference (``tests/reference.py``).

Then: a complete output reruns as a no-op, changed inputs are refused until ``--restart``, a
modified published shard is rewritten, stale temporary files are removed, a second conversion
into the same directory is refused, SIGINT/SIGTERM stop cleanly and resumably, and a foreign
output directory is refused untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from streamconv.cli import main
from streamconv.synth import SynthSpec, synthesize

INDEX = "model.safetensors.index.json"
RUN_STATE = ".streamconv"
TEMP = re.compile(r"^\..+\.streamconv-partial$")
TIMEOUT = 120
#: ~192 MB in 10 shards of ~20 MB; three expert groups, all split across shards.
BIG = SynthSpec(
    layers=4, experts=16, hidden=1024, inter=512, vocab=1024, shard_size=20 * 1024 * 1024
)
#: ~300 KB in 7 shards: quick enough to be run dozens of times under strace.
SMALL = SynthSpec(
    layers=3, experts=6, hidden=64, inter=32, vocab=128, dense_layers=1, shard_size=48 * 1024
)
KILL_POINTS = 8
STRACE = shutil.which("strace")

Tree = dict[str, str]
Check = Callable[[Path, Path], Any]


# --- helpers -----------------------------------------------------------------------------------


def is_temp(rel: str) -> bool:
    return any(TEMP.match(part) for part in rel.split("/"))


def tree(root: Path) -> Tree:
    """Every entry below ``root`` (run state aside) as {relative path: sha256 or "<dir>"}."""
    out: Tree = {}
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] == RUN_STATE:
            continue
        assert not path.is_symlink(), rel
        out[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def finals(root: Path) -> Tree:
    """The entries under final names: what a reader of the directory would trust."""
    return {rel: digest for rel, digest in tree(root).items() if not is_temp(rel)}


def temps(root: Path) -> list[str]:
    return sorted(rel for rel in tree(root) if is_temp(rel))


def listing(root: Path) -> tuple[list[str], list[str]]:
    """Top-level (final names, temporary names), cheaply: for polling a running conversion."""
    try:
        names = [n for n in os.listdir(root) if n != RUN_STATE]
    except FileNotFoundError:
        return [], []
    return sorted(n for n in names if not TEMP.match(n)), sorted(n for n in names if TEMP.match(n))


def running_temps(root: Path) -> int:
    return len(listing(root)[1])


def running_finals(root: Path) -> int:
    return len(listing(root)[0])


def identities(root: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime, size) of every file below ``root``, run state included."""
    return {
        p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_nothing_partial(out: Path, clean: Tree, when: str) -> Tree:
    """Whatever stands under a final name is exactly the clean run's; an index means complete."""
    found = finals(out)
    for rel, digest in found.items():
        assert clean.get(rel) == digest, f"{when}: {rel} is under its final name but not right"
    if INDEX in found:
        assert found == clean, f"{when}: the index is published but the output is incomplete"
    return found


def command(source: Path, out: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "streamconv", "convert", str(source), str(out), *options]


def run(argv: list[str], cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd, check=False, **kwargs
    )


def rerun_completes(source: Path, out: Path, clean: Tree, cwd: Path, *options: str) -> str:
    """Run the same command again: it must finish and leave exactly the clean output."""
    proc = run(command(source, out, "--workers", "2", *options), cwd)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree(out) == clean
    return proc.stdout


@contextlib.contextmanager
def popen(argv: list[str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)


def freeze_when(proc: subprocess.Popen[str], ready: Callable[[], bool], limit: float = 60) -> bool:
    """Poll until ``ready()`` holds while the process is stopped (SIGSTOP); False if it exited.

    The condition is checked again once the process is stopped: it may have moved on between
    the first look and the signal.
    """
    deadline = time.monotonic() + limit
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            os.kill(proc.pid, signal.SIGSTOP)
            time.sleep(0.01)  # let the stop take effect
            if ready():
                return True
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.0005)
    return False


def shard_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("*.safetensors"))


def flip_byte(path: Path, *, keep_mtime: bool = False) -> None:
    """Change one byte in the middle of ``path`` (same size)."""
    info = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(info.st_size // 2)
        byte = handle.read(1)
        handle.seek(info.st_size // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


def published(out: Path) -> list[str]:
    """The shards the run state records as published (state.json is replaced atomically)."""
    try:
        state = json.loads((out / RUN_STATE / "state.json").read_bytes())
    except (FileNotFoundError, ValueError):
        return []
    return sorted(record[0] for record in state["published"])


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def one_line(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --- fixtures ----------------------------------------------------------------------------------


class Clean:
    """An input checkpoint and the output of a clean, uninterrupted run of it."""

    def __init__(self, source: Path, output: Path, seconds: float) -> None:
        self.source = source
        self.output = output
        self.seconds = seconds
        self.tree = tree(output)


def _clean_run(source: Path, base: Path, *options: str) -> Clean:
    times = []
    for attempt in range(2):
        out = base / f"clean{attempt}"
        started = time.monotonic()
        proc = run(command(source, out, "--workers", "2", *options), base)
        times.append(time.monotonic() - started)
        assert proc.returncode == 0, proc.stderr
    first, second = Clean(source, base / "clean0", min(times)), tree(base / "clean1")
    assert first.tree == second, "two clean runs differ"
    return first


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Clean:
    base = tmp_path_factory.mktemp("resume-big")
    synthesize(base / "in", BIG)
    return _clean_run(base / "in", base)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Clean:
    base = tmp_path_factory.mktemp("resume-small")
    synthesize(base / "in", SMALL)
    return _clean_run(base / "in", base)


@pytest.fixture
def fresh_small(tmp_path: Path) -> Path:
    """A private copy of the small input (for tests that change it)."""
    root = tmp_path / "in"
    synthesize(root, SMALL)
    return root


def test_clean_runs_match_the_reference(big: Clean, small: Clean, check: Check) -> None:
    """The clean outputs every kill test compares against are right (independent reference)."""
    check(big.source, big.output)
    check(small.source, small.output)
    assert len(shard_names(big.output)) == 10


# --- (a) SIGKILL after measured delays ---------------------------------------------------------

OBSERVED: dict[int, str] = {}
_RNG = random.Random(4)
#: Kill delays as fractions of a clean run's wall time: one random point in each eighth of 20-90 %
#: (the first fifth is mostly interpreter start-up; seeded, so a failure can be reproduced).
FRACTIONS = [0.2 + 0.7 * (i + _RNG.random()) / KILL_POINTS for i in range(KILL_POINTS)]


def _category(out: Path) -> str:
    found = finals(out)
    shards = [n for n in found if n.endswith(".safetensors")]
    if INDEX in found:
        return "complete"
    if temps(out) or shards:
        return "mid-run"
    return "before-writing"


@pytest.mark.parametrize("point", range(KILL_POINTS))
def test_sigkill_at_a_random_time_then_rerun(big: Clean, tmp_path: Path, point: int) -> None:
    out = tmp_path / "out"
    delay = FRACTIONS[point] * big.seconds
    with popen(command(big.source, out, "--workers", "2"), tmp_path) as proc:
        started = time.monotonic()
        time.sleep(max(0.0, delay - (time.monotonic() - started)))
        proc.kill()
        proc.wait(timeout=TIMEOUT)
    killed = proc.returncode == -signal.SIGKILL
    when = f"kill after {delay:.3f} s of {big.seconds:.3f} s"
    assert_nothing_partial(out, big.tree, when)
    OBSERVED[point] = _category(out) if killed else "finished"
    rerun_completes(big.source, out, big.tree, tmp_path)


def test_random_kills_landed_mid_run() -> None:
    """The delays above are worth something: several kills caught a conversion mid-way."""
    if len(OBSERVED) < KILL_POINTS:
        pytest.skip("run together with every test_sigkill_at_a_random_time_then_rerun point")
    mid = [p for p, c in OBSERVED.items() if c == "mid-run"]
    assert len(mid) >= KILL_POINTS // 3, OBSERVED


def test_sigkill_mid_shard_then_rerun_with_other_options(big: Clean, tmp_path: Path) -> None:
    """Killed while several shards are half-written; the rerun uses other workers/backend."""
    out = tmp_path / "out"
    with popen(command(big.source, out, "--workers", "2", "--backend", "pread"), tmp_path) as p:
        caught = freeze_when(p, lambda: running_temps(out) >= 2 and running_finals(out) >= 1)
        p.kill()
        p.wait(timeout=TIMEOUT)
    assert caught, "the run finished before two shards were in progress"
    assert len(temps(out)) >= 2  # SIGKILL leaves the temporary files ...
    assert_nothing_partial(out, big.tree, "killed mid-shard")  # ... but nothing under a final name
    stdout = rerun_completes(big.source, out, big.tree, tmp_path, "--workers", "1")
    assert "kept" in stdout


# --- (b) SIGKILL at exact system calls, with strace ----------------------------------------------


@pytest.fixture(scope="module")
def strace() -> str:
    if STRACE is None:
        pytest.skip("strace is not installed")
    proc = run([STRACE, "-f", "-qq", "-o", os.devnull, "true"], Path(os.devnull).parent)
    if proc.returncode != 0:
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()}")
    return STRACE


def _env() -> dict[str, str]:
    # No .pyc writing: importlib's own renames must not shift the syscall count.
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def _traced(strace: str, syscall: str, when: int | None, argv: list[str], out: Path) -> list[str]:
    spec = ["-e", f"inject={syscall}:signal=SIGKILL:when={when}"] if when else []
    log = out.parent / f"strace-{syscall}.log"
    return [strace, "-f", "-qq", "-o", str(log), "-e", f"trace={syscall}", *spec, *argv]


def count_calls(strace: str, syscall: str, argv: list[str], out: Path) -> int:
    """How many times a clean run makes ``syscall`` (all threads)."""
    proc = run(_traced(strace, syscall, None, argv, out), out.parent, env=_env())
    assert proc.returncode == 0, proc.stderr
    log = (out.parent / f"strace-{syscall}.log").read_text()
    shutil.rmtree(out)
    return len(re.findall(rf"^\d+\s+{syscall}\(", log, flags=re.MULTILINE))


#: syscall -> (extra options, how many of its calls to kill at, spread over the run). One
#: worker: strace counts ``when=N`` per thread, so one thread makes N deterministic.
STRACE_POINTS = {
    "rename": ((), 10),  # each publishes a shard, a copied entry, the index or the run state
    "fsync": ((), 6),
    "copy_file_range": (("--backend", "copy_file_range"), 5),
    "pwrite64": (("--backend", "pread"), 5),
    "posix_fallocate": ((), 4),
}


@pytest.mark.parametrize("syscall", sorted(STRACE_POINTS))
def test_sigkill_at_syscall_then_rerun(
    strace: str, small: Clean, tmp_path: Path, syscall: str
) -> None:
    options, wanted = STRACE_POINTS[syscall]
    name = "fallocate" if syscall == "posix_fallocate" else syscall
    out = tmp_path / "out"
    argv = command(small.source, out, "--workers", "1", "-q", *options)
    total = count_calls(strace, name, argv, out)
    assert total >= 3, f"a clean run makes only {total} {name} calls"
    points = list(range(1, total + 1))
    if wanted and total > wanted:
        points = sorted({1 + round(k * (total - 1) / (wanted - 1)) for k in range(wanted)})
    survived = []
    for when in points:
        proc = run(_traced(strace, name, when, argv, out), tmp_path, env=_env())
        assert proc.returncode == -signal.SIGKILL, (name, when, proc.returncode, proc.stderr)
        assert_nothing_partial(out, small.tree, f"SIGKILL at {name} #{when}")
        rerun_completes(small.source, out, small.tree, tmp_path)
        shutil.rmtree(out)
        survived.append(when)
    assert survived == points


def test_repeated_preemption_makes_progress(big: Clean, tmp_path: Path) -> None:
    """Killed again and again after a short time (shorter than a whole run), it still gets there."""
    out = tmp_path / "out"
    killed = 0
    for attempt in range(20):
        delay = (0.6 + 0.05 * attempt) * big.seconds  # a little longer each time: no livelock
        with popen(command(big.source, out, "--workers", "2"), tmp_path) as proc:
            started = time.monotonic()
            time.sleep(max(0.0, delay - (time.monotonic() - started)))
            proc.kill()
            proc.wait(timeout=TIMEOUT)
        assert_nothing_partial(out, big.tree, f"preemption {attempt}")
        if proc.returncode == 0:
            break
        killed += 1
    else:
        pytest.fail(f"20 runs killed after {delay:.3f} s or less did not finish the conversion")
    assert killed >= 1
    assert tree(out) == big.tree


# --- (c) a complete output: a fast no-op -------------------------------------------------------


def test_complete_output_rerun_is_a_no_op(
    small: Clean,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    assert cli(capsys, "convert", small.source, out, "-q")[0] == 0
    before = identities(out)
    touched: list[str] = []
    for name in ("copy_file_range", "preadv", "pwrite", "posix_fallocate", "replace"):
        real = getattr(os, name)

        def spy(*args: Any, _real: Any = real, _name: str = name) -> Any:
            touched.append(_name)
            return _real(*args)

        monkeypatch.setattr(os, name, spy)
    started = time.monotonic()
    code, stdout, stderr = cli(capsys, "convert", small.source, out, "-q")
    elapsed = time.monotonic() - started
    monkeypatch.undo()
    assert code == 0, stderr
    assert "nothing to do" in stdout
    assert stderr == ""
    assert touched == []  # no data copied, hashed or preallocated, nothing renamed
    assert identities(out) == before  # not one file rewritten, run state included
    assert tree(out) == small.tree
    assert elapsed < 5


def test_complete_output_subprocess_says_nothing_to_do(big: Clean, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(big.output, out)  # new inodes and mtimes: the recorded checksums decide
    before = identities(out)
    proc = run(command(big.source, out, "--workers", "2"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout
    assert identities(out) == before
    assert tree(out) == big.tree


# --- (d) inputs changed since the run -----------------------------------------------------------


def _touch_shard(root: Path) -> None:
    path = root / shard_names(root)[1]
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))


def _change_config(root: Path) -> None:
    text = (root / "config.json").read_text()
    assert '"hyv3"' in text
    (root / "config.json").write_text(text.replace('"hyv3"', '"hyv4"'))  # same size


def _replace_shard_same_bytes(root: Path) -> None:
    path = root / shard_names(root)[0]
    shutil.copy2(path, root / "copy")
    os.replace(root / "copy", path)  # same bytes and mtime, another inode


CHANGES = {
    "touched-shard": _touch_shard,
    "config-byte": _change_config,
    "shard-replaced": _replace_shard_same_bytes,
}


@pytest.mark.parametrize("interrupted", [False, True], ids=["after-complete", "after-kill"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_changed_inputs_are_refused_until_restart(
    fresh_small: Path,
    capsys: pytest.CaptureFixture[str],
    check: Check,
    change: str,
    interrupted: bool,
) -> None:
    tmp_path = fresh_small.parent
    out = tmp_path / "out"
    if interrupted:
        with popen(command(fresh_small, out, "--workers", "1", "--no-sync"), tmp_path) as proc:
            freeze_when(proc, lambda: running_finals(out) > 0, limit=10)
            proc.kill()
    else:
        assert cli(capsys, "convert", fresh_small, out, "-q")[0] == 0
    CHANGES[change](fresh_small)
    before = identities(out)
    code, stdout, stderr = cli(capsys, "convert", fresh_small, out, "-q")
    assert code == 2
    one_line(stderr, str(out), "--restart")
    assert stdout == ""
    assert identities(out) == before  # refused before touching anything
    code, stdout, stderr = cli(capsys, "convert", fresh_small, out, "-q", "--restart")
    assert code == 0, stderr
    check(fresh_small, out)


def test_changed_file_in_a_copied_folder_is_noticed(
    fresh_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], check: Check
) -> None:
    out = tmp_path / "out"
    assert cli(capsys, "convert", fresh_small, out, "-q")[0] == 0
    with open(fresh_small / "original" / "README.txt", "a") as handle:
        handle.write("changed after the conversion\n")
    code, _, _ = cli(capsys, "convert", fresh_small, out, "-q")
    # Either refused (inputs changed: exit 2) or redone; never a stale copy.
    assert code == 2 or (code == 0 and check(fresh_small, out) is not None)


# --- (e) a published shard modified afterwards ---------------------------------------------------


def test_modified_shard_of_a_complete_output_is_rewritten(
    small: Clean, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """resume.py keeps a shard only if (inode, mtime) or its recorded xxh3 checksum match: a
    flipped byte changes the mtime and the checksum, so that one shard (only) is written again
    and the index is withdrawn and published again."""
    out = tmp_path / "out"
    assert cli(capsys, "convert", small.source, out, "-q")[0] == 0
    names = shard_names(out)
    victim = names[len(names) // 2]
    flip_byte(out / victim)
    assert tree(out) != small.tree
    before = identities(out)
    code, stdout, stderr = cli(capsys, "convert", small.source, out, "-q")
    assert code == 0, stderr
    assert "nothing to do" not in stdout
    assert f"{len(names) - 1} shards kept" in stdout
    assert tree(out) == small.tree
    after = identities(out)
    for name in names:
        assert (after[name] == before[name]) == (name != victim), name


@pytest.mark.parametrize("complete", [True, False], ids=["complete", "interrupted"])
def test_modified_shard_with_restored_mtime_is_rewritten(
    big: Clean, tmp_path: Path, capsys: pytest.CaptureFixture[str], complete: bool
) -> None:
    out = tmp_path / "out"
    if complete:
        assert cli(capsys, "convert", big.source, out, "-q")[0] == 0
    else:
        with popen(command(big.source, out, "--workers", "1"), tmp_path) as proc:
            assert freeze_when(proc, lambda: bool(published(out)))
            proc.kill()
        assert INDEX not in finals(out)
    victim = published(out)[0]
    flip_byte(out / victim, keep_mtime=True)
    code, _, stderr = cli(capsys, "convert", big.source, out, "-q")
    assert code == 0, stderr
    assert tree(out) == big.tree


# --- (f) stale temporary files -----------------------------------------------------------------


def test_stale_temp_files_are_removed(
    small: Clean, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert cli(capsys, "convert", small.source, out, "-q")[0] == 0
    shard = shard_names(out)[0]
    (out / ".x.streamconv-partial").write_bytes(b"junk")
    (out / f".{shard}.streamconv-partial").write_bytes(b"\0" * 4096)
    (out / ".original.streamconv-partial").mkdir()
    (out / ".original.streamconv-partial" / "README.txt").write_text("half a copy")
    code, stdout, stderr = cli(capsys, "convert", small.source, out, "-q")
    assert code == 0, stderr
    assert "nothing to do" in stdout
    assert temps(out) == []
    assert tree(out) == small.tree


def test_stale_temp_files_of_an_interrupted_run_are_removed(small: Clean, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with popen(command(small.source, out, "--workers", "1"), tmp_path) as proc:
        freeze_when(proc, lambda: running_finals(out) > 0, limit=10)
        proc.kill()
    (out / f".{shard_names(small.source)[-1]}.streamconv-partial").write_bytes(b"\1" * 100)
    rerun_completes(small.source, out, small.tree, tmp_path)
    assert temps(out) == []


# --- (g) one conversion at a time --------------------------------------------------------------


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "complete"])
def test_second_conversion_into_a_locked_directory_is_refused(
    small: Clean, tmp_path: Path, capsys: pytest.CaptureFixture[str], previous: bool
) -> None:
    out = tmp_path / "out"
    if previous:
        assert cli(capsys, "convert", small.source, out, "-q")[0] == 0
    (out / RUN_STATE).mkdir(parents=True, exist_ok=True)
    fd = os.open(out / RUN_STATE / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = identities(out)
        proc = run(command(small.source, out, "-q"), tmp_path)
        assert proc.returncode == 4, proc.stderr
        line = one_line(proc.stderr, str(out))
        assert "another conversion" in line
        assert identities(out) == before
    finally:
        os.close(fd)
    rerun_completes(small.source, out, small.tree, tmp_path)


def test_second_conversion_while_one_runs_is_refused(big: Clean, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with popen(command(big.source, out, "--workers", "2"), tmp_path) as first:
        assert freeze_when(first, lambda: running_temps(out) > 0)
        try:
            second = run(command(big.source, out, "-q"), tmp_path)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        first.communicate(timeout=TIMEOUT)
        assert first.returncode == 0
    assert second.returncode == 4, second.stderr
    one_line(second.stderr, "another conversion")
    assert tree(out) == big.tree


# --- (h) SIGINT and SIGTERM ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "code", "options"),
    [
        (signal.SIGINT, 130, ("--workers", "2")),
        (signal.SIGTERM, 143, ("--workers", "2")),
        (signal.SIGINT, 130, ("--workers", "1", "--backend", "pread")),
        (signal.SIGTERM, 143, ("--workers", "2", "--backend", "mmap")),
    ],
    ids=["sigint-auto", "sigterm-auto", "sigint-pread-1", "sigterm-mmap"],
)
def test_signal_stops_cleanly_and_resumes(
    big: Clean, tmp_path: Path, signum: int, code: int, options: tuple[str, ...]
) -> None:
    out = tmp_path / "out"
    with popen(command(big.source, out, *options), tmp_path) as proc:
        assert freeze_when(proc, lambda: running_temps(out) > 0), (
            "the run finished before the signal"
        )
        os.kill(proc.pid, signum)
        os.kill(proc.pid, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    last = stderr.splitlines()[-1]
    assert "resume" in last and "again" in last, last
    assert "converted" not in stdout
    assert temps(out) == []
    assert INDEX not in finals(out)
    assert_nothing_partial(out, big.tree, f"after signal {signum}")
    rerun_completes(big.source, out, big.tree, tmp_path)


# --- (i) a foreign output directory ------------------------------------------------------------


def _plain_file(out: Path, clean: Clean) -> None:
    (out / "notes.txt").write_text("mine\n")


def _hidden_file(out: Path, clean: Clean) -> None:
    (out / ".keep").write_text("")


def _temp_looking_file(out: Path, clean: Clean) -> None:
    (out / f".{shard_names(clean.source)[0]}.streamconv-partial").write_text("not ours")


def _copied_output(out: Path, clean: Clean) -> None:
    # A finished conversion copied without its run state: nothing proves it is ours.
    for name in os.listdir(clean.output):
        if name != RUN_STATE:
            source = clean.output / name
            if source.is_dir():
                shutil.copytree(source, out / name)
            else:
                shutil.copy2(source, out / name)


FOREIGN = {
    "plain-file": _plain_file,
    "hidden-file": _hidden_file,
    "temp-looking-file": _temp_looking_file,
    "copied-output": _copied_output,
}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_foreign_output_directory_is_refused_untouched(
    small: Clean, tmp_path: Path, kind: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    FOREIGN[kind](out, small)
    before = identities(out)
    listing = sorted(os.listdir(out))
    for options in ((), ("--restart",)):
        proc = run(command(small.source, out, "-q", *options), tmp_path)
        assert proc.returncode == 2, proc.stderr
        one_line(proc.stderr, str(out), "not empty")
        assert sorted(os.listdir(out)) == listing  # no run state created either
        assert identities(out) == before


def test_unreadable_run_state_can_be_restarted(small: Clean, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(command(small.source, out, "-q"), tmp_path).returncode == 0
    (out / RUN_STATE / "state.json").write_text("{not json")
    proc = run(command(small.source, out, "-q"), tmp_path)
    assert proc.returncode == 2
    one_line(proc.stderr, "--restart")
    proc = run(command(small.source, out, "-q", "--restart"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert tree(out) == small.tree


def test_index_json_is_the_commit_point(small: Clean, tmp_path: Path) -> None:
    """Deleting the index of a complete output makes it incomplete: the rerun publishes it."""
    out = tmp_path / "out"
    assert run(command(small.source, out, "-q"), tmp_path).returncode == 0
    (out / INDEX).unlink()
    stdout = rerun_completes(small.source, out, small.tree, tmp_path)
    assert "nothing to do" not in stdout
    assert json.loads((out / INDEX).read_text())["weight_map"]
