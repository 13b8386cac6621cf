"""``map`` of a 1 TiB sparse image: ours (the API, in a fresh interpreter) against
``qemu-img map --output=json``, and our peak memory above the bare interpreter.

The image has one 4 KiB write in every GiB: 1,024 allocated L2 tables out of 2,048,
each almost empty, so the walk must skip empty tables *and* empty runs inside
tables quickly. Ours is timed around ``open`` + ``Image.map_sync`` + the JSON text
(what a service calling the API pays); QEMU's figure is the whole ``qemu-img map``
process, which includes its start-up (a few ms), so the ratio slightly favours us
on tiny maps and is reported as measured. Memory: peak RSS of the child after the
map minus its RSS after ``import qcow2aio`` (the limit is 64 MiB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import qemu
from .memory import peak_rss_kib
from .report import Row

if TYPE_CHECKING:
    from .runner import Context

KiB = 1024
GiB = 1 << 30
SIZE = 1 << 40
MAP_LIMIT_MIB = 64.0


def _make(path: str) -> None:
    qemu.create(path, SIZE)
    cmds: list[str] = []
    for g in range(SIZE // GiB):
        cmds += ["-c", f"write -P 1 {g * GiB + (g % 7) * 65536} 4k"]
    qemu.run([qemu.QEMU_IO, "-f", "qcow2", "-t", "unsafe", *cmds, path])


def _child(path: str) -> dict[str, float]:
    import qcow2aio
    from qcow2aio.tools.map import map_image_sync, map_text

    base = peak_rss_kib()
    t0 = time.perf_counter()
    with qcow2aio.open(path) as img:
        runs = map_image_sync(img)
        text = "".join(map_text(runs, output="json", names={}))
    secs = time.perf_counter() - t0
    return {"seconds": secs, "baseline_kib": base, "peak_kib": peak_rss_kib(), "chars": len(text)}


def _qemu_map(path: str) -> tuple[float, int, int]:
    """``qemu-img map --output=json``: seconds, output length, peak RSS in KiB."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [qemu.QEMU_IMG, "map", "--output=json", path],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    secs = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise qemu.QemuError(f"qemu-img map {path} failed ({proc.returncode})")
    return secs, len(out), usage.ru_maxrss


def _ours(path: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.movers_map", path],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def w_map(ctx: Context) -> list[Row]:
    path = ctx.fixture("sparse_1T_map.qcow2", _make)
    speed = Row(
        "map_1T_sparse",
        "sync",
        "maps/s",
        target=1.0,
        note="1 TiB, 4 KiB in every GiB; ours: open+map_sync+JSON; qemu: qemu-img map process",
    )
    memory = Row(
        "map_1T_sparse_memory",
        "sync",
        "MiB",
        limit=MAP_LIMIT_MIB,
        note="peak RSS of the map above the interpreter with qcow2aio imported",
    )
    tiny = ctx.path("tiny_map.qcow2")
    qemu.create(tiny, 1 << 20)
    q_base = _qemu_map(tiny)[2]
    os.unlink(tiny)
    for rep in range(ctx.cfg.reps):
        q_secs, q_len, q_peak = _qemu_map(path)
        speed.qemu.setdefault("process", []).append(1 / q_secs)
        memory.qemu.setdefault("process", []).append((q_peak - q_base) / KiB)
        r = _ours(path)
        if r["chars"] != q_len:
            raise RuntimeError(f"map output differs from qemu-img's: {r['chars']} vs {q_len}")
        speed.ours.append(1 / r["seconds"])
        delta = (r["peak_kib"] - r["baseline_kib"]) / KiB
        memory.ours.append(delta)
        ctx.log(
            f"  rep {rep + 1} qemu-img map {q_secs * 1000:7.1f} ms, ours {r['seconds'] * 1000:7.1f}"
            f" ms, ours +{delta:.1f} MiB"
        )
    return [speed, memory]


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1])))
