"""A writer killed with SIGKILL at a random moment leaves only leaks, never corruption.

The child process writes a deterministic (seeded) sequence, flushing every few
writes and reporting on stdout how many writes the completed flush covers. The
parent kills it after a random delay, then checks with QEMU: `qemu-img check`
exits 0 or 3, and every byte written before the last completed flush (and not
touched by any later write, which may or may not have landed) reads back,
through qcow2aio and through `qemu-img convert`.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Qemu

import qcow2aio

SIZE = 16 << 20
ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import asyncio, random, sys
import qcow2aio

path, seed, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def ops(seed):
    rng = random.Random(seed)
    while True:
        n = rng.choice([512, 4096, 70000, 300000])
        off = rng.randrange(0, SIZE - n)
        yield off, rng.randbytes(n)

SIZE = int(sys.argv[4])
img = qcow2aio.open(path, "r+")
if mode == "sync":
    for i, (off, data) in enumerate(ops(seed)):
        print("W", i + 1, flush=True)
        img.write_sync(off, data)
        if i % 5 == 4:
            img.flush_sync()
            print("FLUSHED", i + 1, flush=True)
else:
    async def main():
        gen = ops(seed)
        i = 0
        while True:
            batch = [next(gen) for _ in range(5)]
            print("W", i + 5, flush=True)
            # Disjointness is not needed: writes of one batch are applied in order
            # by the oracle only when they do not overlap; overlapping ones are masked.
            await asyncio.gather(*(img.write(o, d) for o, d in batch))
            i += 5
            await img.flush()
            print("FLUSHED", i, flush=True)
    asyncio.run(main())
"""


def _expected(seed: int, flushed: int, horizon: int) -> tuple[bytearray, bytearray]:
    """Oracle after ``flushed`` writes, and a mask of bytes later writes may have changed."""
    rng = random.Random(seed)
    oracle = bytearray(SIZE)
    mask = bytearray(SIZE)
    pending: list[tuple[int, bytes]] = []
    for i in range(horizon):
        n = rng.choice([512, 4096, 70000, 300000])
        off = rng.randrange(0, SIZE - n)
        data = rng.randbytes(n)
        if i < flushed:
            pending.append((off, data))
            if len(pending) == 5 or i == flushed - 1:
                # Within an async batch the order is not defined: mask overlaps.
                for o, d in pending:
                    oracle[o : o + len(d)] = d
                for j, (o, d) in enumerate(pending):
                    for k, (o2, d2) in enumerate(pending):
                        if j < k and o < o2 + len(d2) and o2 < o + len(d):
                            lo, hi = max(o, o2), min(o + len(d), o2 + len(d2))
                            mask[lo:hi] = b"\x01" * (hi - lo)
                pending = []
        else:
            mask[off : off + n] = b"\x01" * n
    return oracle, mask


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("opts", ["compat=1.1", "cluster_size=4096,refcount_bits=4", "compat=0.10"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_leaves_leaks_only(
    qemu: Qemu, tmp_path: Path, mode: str, opts: str, seed: int
) -> None:
    path = tmp_path / "c.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", opts, str(path), str(SIZE))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(seed), mode, str(SIZE)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    delay = random.Random(seed * 31 + len(opts)).uniform(0.3, 1.2)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    flushed = started = 0
    for line in out.splitlines():
        # The kill may cut the last line short: count complete lines only (a cut "W" line
        # means that write had not started; a cut "FLUSHED" line just checks less).
        m = re.fullmatch(r"(FLUSHED|W) (\d+)", line)
        if m and m[1] == "FLUSHED":
            flushed = int(m[2])
        elif m:
            started = int(m[2])
    code, report = qemu.check(path)
    assert code in (0, 3), report  # clean or leaks, never corruption
    assert report.get("corruptions", 0) == 0
    oracle, mask = _expected(seed, flushed, started)
    raw = qemu.convert_raw(path)
    with qcow2aio.open(path) as img:
        ours = img.read_sync(0, SIZE)
    assert ours == raw
    bad = [
        i
        for i in range(0, SIZE, 512)
        if not any(mask[i : i + 512]) and raw[i : i + 512] != oracle[i : i + 512]
    ]
    assert not bad, f"acknowledged data lost in {len(bad)} sectors (flushed={flushed})"
    # The image reopens read-write and accepts writes; QEMU still calls it sound.
    with qcow2aio.open(path, "r+") as img:
        img.write_sync(0, b"after-crash")
    code, report = qemu.check(path)
    assert code in (0, 3), report


@pytest.mark.parametrize("seed", [4, 5])
def test_sigkill_lazy_refcounts_repaired_on_rw_open(qemu: Qemu, tmp_path: Path, seed: int) -> None:
    """iotest 039 for us: a killed lazy-refcounts writer leaves a dirty image; QEMU may
    count refcount errors, a read-only open still reads, a read-write open repairs."""
    path = tmp_path / "lazy.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path), str(SIZE))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(seed), "sync", str(SIZE)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    out = ""
    assert proc.stdout is not None
    # Kill right after the first completed flush: L2 tables are on disk, refcounts not.
    for line in proc.stdout:
        out += line
        if line.startswith("FLUSHED"):
            break
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=30)
    out += rest
    assert qemu.info(path)["dirty-flag"] is True
    code, report = qemu.check(path)
    assert code in (0, 2, 3)  # refcounts are stale on purpose
    with qcow2aio.open(path) as img:  # read-only still reads
        before = img.read_sync(0, SIZE)
    with qcow2aio.open(path, "r+") as img:  # repairs, then accepts writes
        assert not img.meta.header.dirty
        assert img.read_sync(0, SIZE) == before
        img.write_sync(12345, b"after")
    code, report = qemu.check(path)
    assert code == 0, report
    assert qemu.info(path)["dirty-flag"] is False
