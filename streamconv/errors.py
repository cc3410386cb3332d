"""The one error hierarchy of streamconv.

Every error the library raises on purpose is a :class:`StreamconvError`. Each carries the file
and tensor it is about (when known) and a plain reason, and renders as one line, so the CLI can
print ``str(error)`` and exit with :attr:`StreamconvError.exit_code`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

#: Exit codes, documented in the README.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INVALID_INPUT = 3
EXIT_IO = 4
EXIT_INTERRUPTED = 130


class StreamconvError(Exception):
    """Base class: a problem the user can act on, described in one line."""

    exit_code = EXIT_IO

    def __init__(
        self,
        reason: str,
        *,
        path: str | Path | None = None,
        tensor: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        self.tensor = tensor
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(self.path)
        if self.tensor is not None:
            parts.append(f"tensor {self.tensor!r}")
        text = ": ".join([*parts, self.reason]) if parts else self.reason
        if self.hint:
            text += f" ({self.hint})"
        return text


class UsageError(StreamconvError):
    """The command line or the call itself is wrong (bad option, bad directory choice)."""

    exit_code = EXIT_USAGE


class InvalidInputError(StreamconvError):
    """An input file, header or index is malformed or inconsistent."""

    exit_code = EXIT_INVALID_INPUT
    #: Every problem found, when several were collected before raising.
    problems: tuple[str, ...] = ()


class HeaderError(InvalidInputError):
    """A safetensors header is malformed."""


class CheckpointError(InvalidInputError):
    """The checkpoint directory or its index is inconsistent."""


class PlanError(InvalidInputError):
    """The conversion cannot be planned."""


def summarize(problems: Sequence[str], *, shown: int = 5) -> str:
    """One line for a list of problems: the count, the first few, and how many more."""
    count = len(problems)
    head = "; ".join(problems[:shown])
    more = f"; ... and {count - shown} more" if count > shown else ""
    return f"{count} problem{'s' if count != 1 else ''}: {head}{more}"


def raise_problems(
    error: type[InvalidInputError], problems: Sequence[str], *, path: str | Path | None = None
) -> None:
    """Raise ``error`` carrying every problem in ``problems`` (as ``.problems``), if any."""
    if problems:
        exc = error(summarize(problems), path=path)
        exc.problems = tuple(problems)
        raise exc


class OutputError(StreamconvError):
    """Writing the output failed (disk full, permissions, a source shorter than planned...)."""

    exit_code = EXIT_IO


class SourceChangedError(OutputError):
    """A source file is shorter than its header promised or changed while being read."""


class InterruptedRun(StreamconvError):
    """The run was stopped by a signal; nothing partial was published."""

    exit_code = EXIT_INTERRUPTED
