"""``compare`` of two identical, fully allocated qcow2 images (1 GiB; the convert size
with ``--quick``): ours (:func:`qcow2aio.tools.compare.compare`, awaited in this
process) against the ``qemu-img compare`` process, both reading from the page cache.

Identical images are the worst case for a compare (every byte of both is read and
compared); the second image is a copy, so both have the same layout. QEMU's figure
includes its process start-up (a few ms against about half a second). The ratio is
printed against the issue's target (>= 1.0), never asserted.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import qemu
from .report import Row

if TYPE_CHECKING:
    from .runner import Context

MiB = 1 << 20
GiB = 1 << 30


def _size(ctx: Context) -> int:
    return GiB if ctx.cfg.convert_size >= GiB else ctx.cfg.convert_size


def _make(size: int) -> Callable[[str], None]:
    def make(path: str) -> None:
        qemu.create(path, size)
        cmds: list[str] = []
        for i in range(size // (64 * MiB)):
            cmds += ["-c", f"write -P {i % 251 + 1} {i * 64 * MiB} {64 * MiB}"]
        qemu.run([qemu.QEMU_IO, "-f", "qcow2", "-t", "unsafe", *cmds, path])

    return make


def _qemu_compare(a: str, b: str) -> float:
    t0 = time.perf_counter()
    proc = qemu.run([qemu.QEMU_IMG, "compare", a, b])
    secs = time.perf_counter() - t0
    if "identical" not in proc:
        raise RuntimeError(f"qemu-img compare says the images differ: {proc!r}")
    return secs


def _ours(a: str, b: str) -> float:
    from qcow2aio.tools.compare import compare

    t0 = time.perf_counter()
    result = asyncio.run(compare(a, b))
    secs = time.perf_counter() - t0
    if not result.identical:
        raise RuntimeError(f"compare says the images differ: {result}")
    return secs


def w_compare(ctx: Context) -> list[Row]:
    from .runner import warm

    size = _size(ctx)
    a = ctx.fixture(f"compare_{size // MiB}M.qcow2", _make(size))
    b = ctx.path("compare_copy.qcow2")
    shutil.copyfile(a, b)
    warm(a)
    warm(b)
    row = Row(
        "compare_1G",
        "async",
        "MiB/s",
        target=1.0,
        note=f"two identical {size // MiB} MiB qcow2 images, page cache; qemu: the process",
    )
    for rep in range(ctx.cfg.reps):
        q = _qemu_compare(a, b)
        row.qemu.setdefault("process", []).append(size / MiB / q)
        o = _ours(a, b)
        row.ours.append(size / MiB / o)
        ctx.log(f"  rep {rep + 1} qemu-img compare {q * 1000:7.1f} ms, ours {o * 1000:7.1f} ms")
    return [row]
