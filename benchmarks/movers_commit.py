"""``commit`` of a 3-deep chain: ours (the API, in a fresh interpreter) against
``qemu-img commit -b base.qcow2 top.qcow2``.

The chain (1 GiB virtual): base with 512 MiB of data, mid with 256 MiB over its upper
half, top with 256 MiB of data straddling both and a 64 MiB zero range; ``-b`` commits
top and mid into base (384 MiB of data and the zero range). Each repetition starts
from a fresh copy of the chain, written back to disk first (``sync``), and times the
whole job including its final flush: ours is ``commit_sync`` in a child interpreter
(started before the clock), QEMU's the ``qemu-img commit`` process. Rate: bytes of
the chain's guest size committed per second (the ratio is that of the times).

Register in ``benchmarks/runner.py`` as ``"commit_3deep": w_commit``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import qemu
from .report import Row

if TYPE_CHECKING:
    from .runner import Context

MiB = 1 << 20
SIZE = 1 << 30


def _make(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    base, mid, top = (os.path.join(folder, n) for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    qemu.create(base, SIZE)
    qemu.run([qemu.QEMU_IO, "-f", "qcow2", "-t", "unsafe", "-c", "write -P 1 0 512M", base])
    qemu.run([qemu.QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
              mid])  # fmt: skip
    qemu.run([qemu.QEMU_IO, "-f", "qcow2", "-t", "unsafe", "-c", "write -P 2 256M 256M", mid])
    qemu.run([qemu.QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
              top])  # fmt: skip
    qemu.run([qemu.QEMU_IO, "-f", "qcow2", "-t", "unsafe", "-c", "write -P 3 128M 256M",
              "-c", "write -z 768M 64M", top])  # fmt: skip


def _fresh(src: str, dst: str) -> None:
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    os.sync()


def _qemu_commit(folder: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [qemu.QEMU_IMG, "commit", "-q", "-b", "base.qcow2", "top.qcow2"],
        cwd=folder,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def _ours(folder: str) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.movers_commit", folder],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def _child(folder: str) -> dict[str, float]:
    from qcow2aio.tools.commit import commit_sync

    t0 = time.perf_counter()
    commit_sync(os.path.join(folder, "top.qcow2"), base="base.qcow2")
    return {"seconds": time.perf_counter() - t0}


def w_commit(ctx: Context) -> list[Row]:
    src = ctx.fixture("commit_3deep", _make)
    row = Row(
        "commit_3deep",
        "async",
        "GiB/s",
        target=1.0,
        note="qemu-img commit -b base of a 3-deep 1 GiB chain (384 MiB data, 64 MiB zeros), "
        "flush included; ours: commit_sync in a started interpreter",
    )
    work = ctx.path("commit_work")
    for rep in range(ctx.cfg.reps):
        _fresh(src, work)
        q_secs = _qemu_commit(work)
        _fresh(src, work)
        o_secs = _ours(work)
        row.qemu.setdefault("process", []).append(SIZE / q_secs / (1 << 30))
        row.ours.append(SIZE / o_secs / (1 << 30))
        ctx.log(f"  rep {rep + 1} qemu-img commit {q_secs:6.3f} s, ours {o_secs:6.3f} s")
    shutil.rmtree(work, ignore_errors=True)
    return [row]


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1])))
