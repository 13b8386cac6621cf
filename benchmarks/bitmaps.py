"""The cost of maintaining persistent dirty bitmaps on writes.

Two fresh-image write streams (random 4 KiB allocating writes, sequential 1 MiB
writes) run on images with no bitmap and on images with two enabled bitmaps
(64 KiB and 1 MiB granularity, added by ``qemu-img bitmap --add``), in one run:

* ``+2 bitmaps`` rows: ours against QEMU, both maintaining the two bitmaps
  (qemu-img bench keeps them as QEMU does);
* ``bitmap cost`` rows: ours with the bitmaps against ours without them (the
  "QEMU" column holds ours without bitmaps): the issue's target is >= 0.9, i.e. the
  two bitmaps cost at most 10 %.

The timed window is the request loop, as in the other write rows; storing the
bitmaps at close is outside it (a few KiB per bitmap, once).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import ours, qemu
from .report import Row
from .stream import RANDOM_STEP_4K, Stream

if TYPE_CHECKING:
    from .runner import Context

KiB = 1 << 10
MiB = 1 << 20
_BITMAPS = (("b0", 64 * KiB), ("b1", MiB))


def _template(ctx: Context, size: int, bitmaps: bool) -> str:
    def make(path: str) -> None:
        qemu.create(path, size)
        if bitmaps:
            for name, gran in _BITMAPS:
                qemu.run([qemu.QEMU_IMG, "bitmap", "--add", "-g", str(gran), path, name])

    return ctx.fixture(f"bitmaps_{int(bitmaps)}_{size}.qcow2", make)


@contextlib.contextmanager
def _fresh(ctx: Context, size: int, bitmaps: bool) -> Iterator[str]:
    path = ctx.path("bitmaps_fresh.qcow2")
    shutil.copyfile(_template(ctx, size, bitmaps), path)
    try:
        yield path
    finally:
        os.unlink(path)


def _rate(stream: Stream, secs: float, unit: str) -> float:
    return stream.count / secs if unit == "IOPS" else stream.total_bytes / MiB / secs


def w_bitmaps(ctx: Context) -> list[Row]:
    size = ctx.cfg.image_size
    streams = [
        (
            "bitmaps_randwrite_fresh_4K",
            Stream(4 * KiB, ctx.cfg.rand_writes_fresh, size, step=RANDOM_STEP_4K, write=True),
            "IOPS",
        ),
        ("bitmaps_seqwrite_fresh_1M", Stream(MiB, size // MiB, size, write=True), "MiB/s"),
    ]
    rows: list[Row] = []
    for name, stream, unit in streams:
        modes = ("sync", "async d16")
        with_q = {
            m: Row(name, f"{m} +2 bitmaps", unit, note="ours / QEMU, both maintaining two bitmaps")
            for m in modes
        }
        cost = {
            m: Row(
                name,
                f"{m} bitmap cost",
                unit,
                target=0.9,
                note="ours with two bitmaps / ours without",
            )
            for m in modes
        }
        for rep in range(ctx.cfg.reps):
            for engine in ctx.engines:
                for m, depth in (("sync", 1), ("async d16", 16)):
                    with _fresh(ctx, size, True) as p:
                        v = _rate(stream, qemu.bench(p, stream, aio=engine, depth=depth), unit)
                    with_q[m].qemu.setdefault(engine, []).append(v)
            for bitmaps in (False, True):
                for m in modes:
                    with _fresh(ctx, size, bitmaps) as p:
                        if m == "sync":
                            secs = ours.run_sync(p, stream)
                        else:
                            secs = ours.run_async(p, stream, 16)
                    v = _rate(stream, secs, unit)
                    if bitmaps:
                        with_q[m].ours.append(v)
                        cost[m].ours.append(v)
                    else:
                        cost[m].qemu.setdefault("ours, none", []).append(v)
                    label = "2 bitmaps" if bitmaps else "none"
                    ctx.log(f"  rep {rep + 1} {name} ours {m:9} {label:9} {v:10.1f} {unit}")
        rows += [*with_q.values(), *cost.values()]
    return rows
