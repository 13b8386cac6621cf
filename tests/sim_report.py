"""pytest plugin: the table of seeded-interleaving counts, printed at the end of the session.

``tests/test_interleavings.py`` registers it (``pytest_plugins``) and every
``test_scenario`` attaches its counts to its report as the user property
``qcow2aio_sim``. Under xdist (``-n 2``) the controller process never imports
test modules, so pass ``-p tests.sim_report`` there to get the table.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

KEY = "qcow2aio_sim"
_rows: list[dict[str, Any]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":
        return
    for name, value in report.user_properties:
        if name == KEY:
            _rows.append(json.loads(str(value)))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    # The module may be registered twice (as "sim_report" and "tests.sim_report").
    if not _rows or getattr(config, "_qcow2aio_sim_printed", False):
        return
    config._qcow2aio_sim_printed = True  # type: ignore[attr-defined]
    tr = terminalreporter
    tr.section("qcow2aio seeded interleavings")
    rows = sorted(_rows, key=lambda r: (r["scenario"], r["driver"]))
    width = max(len(r["scenario"]) for r in rows)
    tr.write_line(
        f"{'scenario':<{width}}  {'driver':<12} {'seeds':>6} {'failing':>8} {'rate':>7} "
        f"{'qemu':>5}  failure kinds / notes"
    )
    for r in rows:
        rate = r["failures"] / r["seeds"] if r["seeds"] else 0.0
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(r["kinds"].items()))
        stats = ", ".join(f"{k}={v}" for k, v in sorted(r["stats"].items()))
        notes = "; ".join(x for x in (kinds, stats) if x)
        tr.write_line(
            f"{r['scenario']:<{width}}  {r['driver']:<12} {r['seeds']:>6} {r['failures']:>8} "
            f"{rate:>7.1%} {r['qemu']:>5}  {notes}"
        )
