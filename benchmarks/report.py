"""Rows of the result table: samples, medians, ratios, targets; text and JSON output."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float
    n: int

    @staticmethod
    def of(values: list[float]) -> Summary:
        return Summary(statistics.median(values), min(values), max(values), len(values))

    def text(self, digits: int) -> str:
        def f(x: float) -> str:
            return f"{x:.{digits}f}"

        return f"{f(self.median)} [{f(self.low)}-{f(self.high)}]"

    def to_json(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}


@dataclass
class Row:
    """One line of the table: QEMU's figure (per AIO engine) against ours.

    For throughput rows ``target`` is the minimum ratio ours/QEMU. For the memory
    row ``limit`` is the most ours may use and lower is better.
    """

    workload: str
    mode: str
    unit: str
    qemu: dict[str, list[float]] = field(default_factory=dict)
    ours: list[float] = field(default_factory=list)
    target: float | None = None
    limit: float | None = None
    note: str = ""

    @property
    def lower_is_better(self) -> bool:
        return self.limit is not None

    def qemu_best(self) -> tuple[str, Summary] | None:
        """The better engine's summary (by median); QEMU's figure for this row."""
        best: tuple[str, Summary] | None = None
        for engine, values in self.qemu.items():
            if not values:
                continue
            s = Summary.of(values)
            if (
                best is None
                or (not self.lower_is_better and s.median > best[1].median)
                or (self.lower_is_better and s.median < best[1].median)
            ):
                best = (engine, s)
        return best

    def ours_summary(self) -> Summary | None:
        return Summary.of(self.ours) if self.ours else None

    def ratio(self) -> float | None:
        q = self.qemu_best()
        o = self.ours_summary()
        if q is None or o is None or self.lower_is_better or q[1].median <= 0:
            return None
        return o.median / q[1].median

    def met(self) -> bool | None:
        o = self.ours_summary()
        if o is None:
            return None
        if self.limit is not None:
            return o.median <= self.limit
        r = self.ratio()
        if self.target is None or r is None:
            return None
        return r >= self.target

    def target_text(self) -> str:
        if self.limit is not None:
            return f"<= {self.limit:g}"
        return f">= {self.target:g}" if self.target is not None else "-"

    def to_json(self) -> dict[str, Any]:
        q = self.qemu_best()
        o = self.ours_summary()
        return {
            "workload": self.workload,
            "mode": self.mode,
            "unit": self.unit,
            "qemu": None if q is None else {"engine": q[0], **q[1].to_json()},
            "qemu_samples": self.qemu,
            "ours": None if o is None else o.to_json(),
            "ours_samples": self.ours,
            "ratio": self.ratio(),
            "target": self.target_text(),
            "met": self.met(),
            "note": self.note,
        }


def _digits(unit: str) -> int:
    return 1 if unit.startswith("MiB") and "/" not in unit else 0


_HEADER = ("workload", "mode", "unit", "QEMU (best engine)", "ours", "ratio", "target", "")


def _cells(r: Row, short: str) -> tuple[str, ...]:
    """One row's cells, for both renderings; ``short`` marks a missed target."""
    d = _digits(r.unit)
    q = r.qemu_best()
    o = r.ours_summary()
    ratio = r.ratio()
    met = r.met()
    return (
        r.workload,
        r.mode,
        r.unit,
        "-" if q is None else f"{q[1].text(d)} {q[0]}",
        "-" if o is None else o.text(d),
        "-" if ratio is None else f"{ratio:.2f}",
        r.target_text(),
        "" if met is None else ("met" if met else short),
    )


def render(rows: list[Row]) -> str:
    lines: list[tuple[str, ...]] = [_HEADER, *(_cells(r, "SHORT") for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(_HEADER))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_markdown(rows: list[Row]) -> str:
    out = [
        "| workload | mode | unit | QEMU median [min-max] (engine) | ours median [min-max] "
        "| ratio | target | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out += ["| " + " | ".join(_cells(r, "**short**")) + " |" for r in rows]
    return "\n".join(out)


def write_json(path: Path, machine: dict[str, str], meta: dict[str, Any], rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine, **meta, "rows": [r.to_json() for r in rows]}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def read_json(path: Path) -> tuple[dict[str, Any], list[Row]]:
    """A JSON table written by :func:`write_json`: (the document, its rows)."""
    doc: dict[str, Any] = json.loads(path.read_text())
    rows = []
    for r in doc["rows"]:
        row = Row(
            r["workload"], r["mode"], r["unit"], qemu=r["qemu_samples"], ours=r["ours_samples"]
        )
        target = r["target"]
        if target.startswith("<="):
            row.limit = float(target[2:])
        elif target.startswith(">="):
            row.target = float(target[2:])
        row.note = r.get("note", "")
        rows.append(row)
    return doc, rows
