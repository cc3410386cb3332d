"""Markdown tables and small PNG plots for the benchmark results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]  # medians
    low: Sequence[float] | None = None  # minima, for error bars
    high: Sequence[float] | None = None  # maxima
    style: str = "o-"


def plot(
    path: Path,
    series: Sequence[Series],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    hline: tuple[float, str] | None = None,
    ymin: float | None = None,
) -> None:
    """One small line plot (medians, with min-max error bars when given)."""
    fig, ax = plt.subplots(figsize=(5.6, 3.4), dpi=90)
    for s in series:
        if s.low is not None and s.high is not None:
            below = [m - lo for m, lo in zip(s.y, s.low, strict=True)]
            above = [hi - m for m, hi in zip(s.y, s.high, strict=True)]
            ax.errorbar(s.x, s.y, yerr=[below, above], fmt=s.style, capsize=3, label=s.label)
        else:
            ax.plot(s.x, s.y, s.style, label=s.label)
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle=":", linewidth=1, label=hline[1])
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(FixedLocator([5, 10, 20, 32, 50, 100, 200, 500, 1000]))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    if ymin is not None:
        ax.set_ylim(bottom=ymin)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
