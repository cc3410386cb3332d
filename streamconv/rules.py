"""Conversion rules as immutable data; presets are instances, the planner knows none of them.

A :class:`RuleSet` has ordered renames and expert fusions:

* Renames: the FIRST rename whose ``source`` text occurs in a key is applied (every occurrence
  replaced) and no later rename is tried.
* Fusions: keys matching ``pattern`` (named groups ``prefix``, ``index``, ``part``; matched on
  the whole original key, with ASCII classes) form one group per prefix. Each
  :class:`FusedOutput` becomes the tensor ``prefix + suffix`` of shape
  ``[E, sum of the parts' dim 0, *rest]``: for every expert in order, the parts concatenated
  along dim 0 (in the order given), stacked over experts. That is a plain concatenation of the
  members' bytes. Fused names are not renamed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Rename:
    source: str
    target: str


@dataclass(frozen=True, slots=True)
class FusedOutput:
    suffix: str
    parts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Fusion:
    pattern: str
    outputs: tuple[FusedOutput, ...]
    compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # ASCII: \d means 0-9 only; keys are matched whole (fullmatch), so "$" cannot match
        # before a trailing newline.
        compiled = re.compile(self.pattern, re.ASCII)
        missing = {"prefix", "index", "part"} - set(compiled.groupindex)
        if missing:
            raise ValueError(f"fusion pattern lacks the named groups {sorted(missing)}")
        object.__setattr__(self, "compiled", compiled)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(part for output in self.outputs for part in output.parts)


@dataclass(frozen=True, slots=True)
class RuleSet:
    name: str
    renames: tuple[Rename, ...] = ()
    fusions: tuple[Fusion, ...] = ()

    def rename(self, key: str) -> str:
        for rule in self.renames:
            if rule.source in key:
                return key.replace(rule.source, rule.target)
        return key

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (part of the plan, and of its fingerprint)."""
        return {
            "name": self.name,
            "renames": [[r.source, r.target] for r in self.renames],
            "fusions": [
                {
                    "pattern": f.pattern,
                    "outputs": [{"suffix": o.suffix, "parts": list(o.parts)} for o in f.outputs],
                }
                for f in self.fusions
            ],
        }


HYV3 = RuleSet(
    name="hyv3",
    renames=(
        Rename("mlp.router.gate.", "mlp.gate."),
        Rename("mlp.expert_bias", "mlp.e_score_correction_bias"),
        Rename("mlp.shared_mlp.", "mlp.shared_experts."),
    ),
    fusions=(
        Fusion(
            pattern=r"^(?P<prefix>.*\.mlp\.experts\.)(?P<index>\d+)\."
            r"(?P<part>gate_proj|up_proj|down_proj)\.weight$",
            outputs=(
                FusedOutput("gate_up_proj", ("gate_proj", "up_proj")),
                FusedOutput("down_proj", ("down_proj",)),
            ),
        ),
    ),
)

PRESETS: dict[str, RuleSet] = {HYV3.name: HYV3}
