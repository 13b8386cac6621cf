"""The convert workloads: ``qemu-img convert`` against the shipped ``qcow2aio.convert``.

Both sides run the same job on the same page-cache-warm source in one process run,
alternating within each repetition: raw -> qcow2 and qcow2 -> qcow2 of the 1 GiB
half-zero image (runs of random data and written zeros, 64 KiB to 2 MiB each), and
``-c`` of the text-like image of the compressed workload. Ours is the coroutine the
``qcow2aio convert`` command runs (:func:`qcow2aio.tools.convert.convert`, defaults:
8 chunks of 2 MiB in flight, in order); its closing flush makes the target durable,
so QEMU runs with ``-t writeback`` (its default ``unsafe`` never flushes). The ratio
ours / QEMU is printed, never asserted.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import qcow2aio

from . import qemu
from .report import Row
from .stream import MiB

if TYPE_CHECKING:
    from .runner import Context


def ours_convert(src: str, dst: str, *, src_fmt: str, compress: bool = False) -> float:
    """``qcow2aio.convert_sync(src, dst, target_format="qcow2")``; wall seconds."""
    t0 = time.perf_counter()
    qcow2aio.convert_sync(src, dst, source_format=src_fmt, target_format="qcow2", compress=compress)
    return time.perf_counter() - t0


def qemu_convert(src: str, dst: str, *, src_fmt: str, compress: bool = False) -> float:
    """``qemu-img convert -f FMT -O qcow2 -t writeback [-c] SRC DST``; wall seconds."""
    argv = [qemu.QEMU_IMG, "convert", "-f", src_fmt, "-O", "qcow2", "-t", "writeback"]
    if compress:
        argv.append("-c")
    t0 = time.perf_counter()
    qemu.run([*argv, src, dst])
    return time.perf_counter() - t0


def _row(ctx: Context, name: str, src: str, src_fmt: str, size: int, note: str, **kw: bool) -> Row:
    from .runner import warm

    warm(src)
    row = Row(name, "async", "MiB/s", target=1.0, note=note)
    dst = ctx.path(name + ".qcow2")
    for rep in range(ctx.cfg.reps):
        secs = qemu_convert(src, dst, src_fmt=src_fmt, **kw)
        os.unlink(dst)
        row.qemu.setdefault("writeback", []).append(size / MiB / secs)
        ctx.log(f"  rep {rep + 1} qemu {name:22} {size / MiB / secs:10.1f} MiB/s")
        secs = ours_convert(src, dst, src_fmt=src_fmt, **kw)
        os.unlink(dst)
        row.ours.append(size / MiB / secs)
        q, o = row.qemu["writeback"][-1], row.ours[-1]
        ctx.log(f"  rep {rep + 1} ours {name:22} {o:10.1f} MiB/s  (ours/qemu {o / q:.2f})")
    return row


def w_convert(ctx: Context) -> list[Row]:
    """The three convert rows (see the module docstring)."""
    from .runner import _half_zero_raw, write_compressible

    size = ctx.cfg.convert_size
    raw = _half_zero_raw(ctx)

    def make_qcow2(path: str) -> None:
        qemu.run([qemu.QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", raw, path])

    src_qcow2 = ctx.fixture("half_zero.qcow2", make_qcow2)
    csize = ctx.cfg.compressed_size
    compressible = ctx.fixture("compressible.raw", lambda p: write_compressible(p, csize))
    return [
        _row(ctx, "convert_raw2qcow2", raw, "raw", size, "half written zeros; -t writeback"),
        _row(ctx, "convert_qcow22qcow2", src_qcow2, "qcow2", size, "half zeros (unallocated)"),
        _row(
            ctx,
            "convert_c_raw2qcow2",
            compressible,
            "raw",
            csize,
            "-c zlib; text-like, 1/8 random clusters",
            compress=True,
        ),
    ]
