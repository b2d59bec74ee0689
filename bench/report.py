"""Figures and how they are shown: one line per figure (project, baseline, ratio, target, label)
with indented detail lines under it, and the same data as JSON for the README's table.

A MISS is information, not a failure: the benchmark only exits non-zero when a scenario could
not run at all, so CI keeps it working without failing on a slow machine.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

Comparison = Literal["ratio>=", "value>=", "value<=", "value=="]


class Label(StrEnum):
    PASS = "PASS"
    MISS = "MISS"
    INFO = "INFO"  # no target: reported for context
    NOT_MEASURED = "NOT MEASURED"
    ERROR = "ERROR"


@dataclass(frozen=True)
class Target:
    compare: Comparison
    threshold: float

    def text(self, unit: str) -> str:
        if self.compare == "ratio>=":
            return f"ratio >= {self.threshold:g}"
        sign = {"value>=": ">=", "value<=": "<=", "value==": "="}[self.compare]
        return f"{sign} {fmt(self.threshold)} {unit}".strip()

    def met(self, value: float, ratio: float | None) -> bool:
        if self.compare == "ratio>=":
            return ratio is not None and ratio >= self.threshold
        if self.compare == "value>=":
            return value >= self.threshold
        if self.compare == "value<=":
            return value <= self.threshold
        return math.isclose(value, self.threshold, rel_tol=1e-9)


@dataclass
class Figure:
    key: str  # stable id: the test and the README look for it
    title: str
    unit: str
    target: Target | None = None
    project: float | None = None
    baseline: float | None = None
    baseline_is: str = ""  # what the baseline is, in a few words
    details: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # the details, machine-readable
    note: str = ""  # why it was not measured, or the error
    failed: bool = False

    @property
    def ratio(self) -> float | None:
        if self.project is None or not self.baseline:
            return None
        return self.project / self.baseline

    @property
    def label(self) -> Label:
        if self.failed:
            return Label.ERROR
        if self.project is None:
            return Label.NOT_MEASURED
        if self.target is None:
            return Label.INFO
        return Label.PASS if self.target.met(self.project, self.ratio) else Label.MISS

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["target"] = None if self.target is None else self.target.text(self.unit)
        out["ratio"] = self.ratio
        out["label"] = self.label.value
        return out


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


HEADER = (
    f"{'figure':<20} {'unit':<12} {'project':>10} {'baseline':>10} {'ratio':>6}  "
    f"{'target':<16} result"
)


def render(figure: Figure) -> list[str]:
    """The figure line, then its detail lines (indented)."""
    ratio = "-" if figure.ratio is None else f"{figure.ratio:.2f}"
    target = "-" if figure.target is None else figure.target.text(figure.unit)
    if figure.project is None:
        if figure.label is Label.ERROR:
            result = f"ERROR: {figure.note}"
        else:
            result = figure.note or Label.NOT_MEASURED.value
        line = f"{figure.key:<20} {figure.unit:<12} {'-':>10} {'-':>10} {'-':>6}  {target:<16} "
        lines = [line + result]
    else:
        lines = [
            f"{figure.key:<20} {figure.unit:<12} {fmt(figure.project):>10} "
            f"{fmt(figure.baseline):>10} {ratio:>6}  {target:<16} {figure.label.value}"
        ]
    lines.append(
        f"    {figure.title}" + (f"; baseline: {figure.baseline_is}" if figure.baseline_is else "")
    )
    lines += [f"    {detail}" for detail in figure.details]
    return lines


def write_json(path: Path, header: dict[str, Any], figures: list[Figure]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {**header, "figures": [f.as_json() for f in figures]}
    path.write_text(json.dumps(document, indent=2) + "\n")
