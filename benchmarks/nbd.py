"""The NBD export against qemu-nbd: same image, same client, same run.

Rows (issue 14's targets): ``nbdcopy`` export -> file of an allocated image (>= 1.0),
file -> export into a fresh image (>= 0.8), and ``qemu-img bench -f raw`` over NBD:
random 4 KiB reads at depth 1 (>= 0.8) and 16 (>= 0.5), allocating 4 KiB writes at
depth 16 (>= 0.5). Both servers listen on a Unix socket in the work folder; each
measurement starts a fresh server (ours: ``python -m qcow2aio serve``, the shipped
command) and stops it with SIGTERM, which also flushes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from . import qemu
from .report import Row
from .stream import RANDOM_STEP_4K, KiB, MiB

if TYPE_CHECKING:
    from .runner import Context

QEMU_NBD = shutil.which("qemu-nbd") or "qemu-nbd"
NBDCOPY = shutil.which("nbdcopy") or "nbdcopy"
ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def _server(kind: str, image: str, sock: str, *args: str) -> Iterator[str]:
    if os.path.exists(sock):
        os.unlink(sock)
    env = dict(os.environ)
    if kind.startswith("ours"):
        argv = [sys.executable, "-m", "qcow2aio", "serve"]
        env["QCOW2AIO_NBD_LOOP"] = "asyncio" if kind == "ours-asyncio" else ""
    else:
        argv = [QEMU_NBD, "-f", "qcow2", "--cache=writeback", "--aio=threads"]
    argv += ["-t", "-k", sock, *args, image]
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if os.path.exists(sock):
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(sock)
                    break
                except OSError:
                    pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"{kind} NBD server did not start: {err}")
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    qemu.run(argv)
    return time.perf_counter() - t0


def _bench(uri: str, *, count: int, depth: int, write: bool) -> float:
    argv = [qemu.QEMU_IMG, "bench", "-f", "raw", "-t", "none", "-d", str(depth)]
    argv += ["-s", str(4 * KiB), "-c", str(count), "-S", str(RANDOM_STEP_4K)]
    if write:
        argv += ["-w", "--pattern=165"]
    return qemu._seconds(qemu.run([*argv, uri]))


def w_nbd(ctx: Context) -> list[Row]:
    size = ctx.cfg.image_size
    image = ctx.allocated_image()
    sock = ctx.path("nbd.sock")
    raw = ctx.fixture("allocated.raw", lambda p: qemu.run(
        [qemu.QEMU_IMG, "convert", "-O", "raw", image, p]))  # fmt: skip
    out = ctx.path("nbd_out.raw")
    fresh = ctx.path("nbd_fresh.qcow2")
    specs = {
        "export_to_file": ("nbd_nbdcopy_export_to_file", "nbdcopy", "MiB/s", 1.0,
                           "nbdcopy of an allocated qcow2 export to a raw file"),
        "file_to_export": ("nbd_nbdcopy_file_to_export", "nbdcopy", "MiB/s", 0.8,
                           "nbdcopy of a raw file into a fresh qcow2 export"),
        "read_d1": ("nbd_randread_4K", "d1", "IOPS", 0.8,
                    "qemu-img bench -f raw over NBD, stride 40009 x 4 KiB"),
        "read_d16": ("nbd_randread_4K", "d16", "IOPS", 0.5,
                     "qemu-img bench -f raw over NBD, stride 40009 x 4 KiB"),
        "write_d16": ("nbd_randwrite_fresh_4K", "d16", "IOPS", 0.5,
                      "allocating writes into a fresh image over NBD"),
    }  # fmt: skip
    # Ours twice: on uvloop (what `qcow2aio serve` uses when installed) and on the
    # standard asyncio loop; both against the same qemu-nbd figures.
    variants = {"ours": "", "ours-asyncio": " (asyncio loop)"}
    rows = {
        (key, v): Row(name, mode + suffix, unit, target=target, note=note)
        for key, (name, mode, unit, target, note) in specs.items()
        for v, suffix in variants.items()
    }
    reads = ctx.cfg.rand_reads
    writes = ctx.cfg.rand_writes_fresh
    for rep in range(ctx.cfg.reps):
        for kind in ("qemu", "ours", "ours-asyncio"):
            figures: dict[str, float] = {}
            with _server(kind, image, sock, "-r", "-e", "4") as uri:
                secs = _timed([NBDCOPY, uri, out])
                figures["export_to_file"] = size / MiB / secs
                figures["read_d1"] = reads / _bench(uri, count=reads // 4, depth=1, write=False) / 4
                figures["read_d16"] = reads / _bench(uri, count=reads, depth=16, write=False)
            os.unlink(out)
            qemu.create(fresh, size)
            with _server(kind, fresh, sock, "-e", "4") as uri:
                secs = _timed([NBDCOPY, raw, uri])
                figures["file_to_export"] = size / MiB / secs
            qemu.create(fresh, size)
            with _server(kind, fresh, sock, "-e", "4") as uri:
                figures["write_d16"] = writes / _bench(uri, count=writes, depth=16, write=True)
            os.unlink(fresh)
            for key, value in figures.items():
                if kind == "qemu":
                    for v in variants:
                        rows[key, v].qemu.setdefault("qemu-nbd", []).append(value)
                else:
                    rows[key, kind].ours.append(value)
            ctx.log(
                f"  rep {rep + 1} {kind:5s} "
                + ", ".join(f"{k} {v:,.0f}" for k, v in figures.items())
            )
    return list(rows.values())
