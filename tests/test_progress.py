"""qemu-img's -p records, as ``qemu-img convert -p`` prints them (observed with 7.2)."""

from __future__ import annotations

import io

from qcow2aio.tools.progress import Counter, QemuProgress


def test_records_match_qemu_img_convert() -> None:
    # qemu-img convert -p of a two-chunk job prints exactly this.
    out = io.StringIO()
    bar = QemuProgress(out)
    counter = Counter(200, bar)
    counter.add(100)
    counter.add(100)
    bar.finish()
    want = "    (0.00/100%)\r    (50.00/100%)\r    (100.00/100%)\r    (100.00/100%)\r\n"
    assert out.getvalue() == want


def test_small_steps_are_coalesced_and_never_go_back() -> None:
    out = io.StringIO()
    bar = QemuProgress(out)
    counter = Counter(10_000, bar)
    for _ in range(10_000):
        counter.add(1)
    counter.add(5)  # past the total: clamped
    records = [float(r.strip()[1:].split("/")[0]) for r in out.getvalue().split("\r") if r]
    assert len(records) == 101
    assert records == sorted(records)
    assert records[-1] == 100.0 and counter.done == 10_000


def test_empty_job_reports_done() -> None:
    seen: list[tuple[int, int]] = []
    counter = Counter(0, lambda d, t: seen.append((d, t)))
    counter.complete()
    assert seen[0] == (0, 0) and seen[-1] == (0, 0)
