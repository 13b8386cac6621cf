"""Races on the metadata lock and the in-flight allocation list (issue: serialized metadata).

A *gate* replaces the image's data backend so that an async write can be held
in its data phase (after allocating, before linking), which is exactly where
QEMU's 2009 driver let other requests run over stale metadata. While it is
held we run other requests, the synchronous fast path, and reads.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import Qemu

import qcow2aio
from qcow2aio.io import Buffer

CS = 65536


class Gate:
    """Holds data writes (and optionally flushes) of one image until released."""

    def __init__(self, img: qcow2aio.Image, *, flush: bool = False) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.held = 0
        backend = img._data
        orig_write = backend.apwritev
        orig_flush = backend.aflush

        async def apwritev(buffers: Sequence[Buffer], offset: int, event: str = "write") -> None:
            self.held += 1
            self.entered.set()
            await self.release.wait()
            await orig_write(buffers, offset, event)

        async def aflush(event: str = "flush") -> None:
            if flush:
                self.held += 1
                self.entered.set()
                await self.release.wait()
            await orig_flush(event)

        backend.apwritev = apwritev  # type: ignore[method-assign]
        backend.aflush = aflush  # type: ignore[method-assign]
        # A gated device is a slow one: no inline (synchronous) fast path for writes.
        backend.plain_writes = False


def _overlay(qemu: Qemu, tmp: Path, size: int = 4 << 20) -> tuple[Path, bytes]:
    base = random.Random(3).randbytes(size)
    (tmp / "base.raw").write_bytes(base)
    path = tmp / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(path), str(size))
    return path, base


async def test_many_writers_same_unallocated_clusters_allocate_once(
    qemu: Qemu, tmp_path: Path
) -> None:
    path, base = _overlay(qemu, tmp_path)
    oracle = bytearray(base)
    rng = random.Random(11)
    # 48 tasks write disjoint 1000-byte slices spread over the first 4 clusters.
    slots = list(range(0, 4 * CS - 1000, 5000))
    rng.shuffle(slots)
    async with qcow2aio.open(path, "r+") as img:

        async def writer(off: int) -> None:
            data = rng.randbytes(1000)
            oracle[off : off + 1000] = data
            await asyncio.sleep(0)
            await img.write(off, data)

        await asyncio.gather(*(writer(o) for o in slots[:48]))
        assert await img.read(0, len(base)) == bytes(oracle)
        await img.flush()
        # Each guest cluster is mapped once: 4 data clusters + 1 L2 table beyond the
        # 4 metadata clusters of a fresh image.
        report = img.check()
        assert report.get("allocated-clusters") == 4
        assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0
    code, rep = qemu.check(path)
    assert code == 0 and rep["allocated-clusters"] == 4
    assert qemu.convert_raw(path) == bytes(oracle)


async def test_writers_under_one_unallocated_l2_share_one_table(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(path), "64M")
    async with qcow2aio.open(path, "r+") as img:
        gate = Gate(img)
        tasks = [asyncio.ensure_future(img.write(i * CS * 3, b"\x01" * 512)) for i in range(20)]
        await gate.entered.wait()
        for _ in range(5):
            await asyncio.sleep(0)
        gate.release.set()
        await asyncio.gather(*tasks)
        l1 = img.meta.l1.entries
        assert sum(1 for e in l1 if e) == 1
    code, rep = qemu.check(path)
    assert code == 0
    assert rep["allocated-clusters"] == 20


async def test_readers_during_allocation_see_backing_data(qemu: Qemu, tmp_path: Path) -> None:
    path, base = _overlay(qemu, tmp_path)
    async with qcow2aio.open(path, "r+") as img:
        gate = Gate(img)
        w = asyncio.ensure_future(img.write(CS + 4096, b"\xee" * 4096))
        await gate.entered.wait()
        # The cluster is allocated and in flight, not linked: untouched bytes (and the
        # written ones, until the link) still read from the backing file.
        assert await img.read(CS, CS) == base[CS : 2 * CS]
        assert img.read_sync(CS, 100) == base[CS : CS + 100]
        assert len(img.inflight) == 1
        gate.release.set()
        await w
        expect = bytearray(base[CS : 2 * CS])
        expect[4096:8192] = b"\xee" * 4096
        assert await img.read(CS, CS) == bytes(expect)
    assert qemu.check(path)[0] == 0


async def test_sync_path_between_steps_is_right_or_busy(qemu: Qemu, tmp_path: Path) -> None:
    path, base = _overlay(qemu, tmp_path)
    oracle = bytearray(base)
    async with qcow2aio.open(path, "r+") as img:
        gate = Gate(img)
        w = asyncio.ensure_future(img.write(10, b"\xaa" * 100))
        oracle[10:110] = b"\xaa" * 100
        await gate.entered.wait()
        snapshot = Path(path).read_bytes()
        # Overlapping the in-flight allocation: busy, and nothing changed.
        with pytest.raises(qcow2aio.ImageBusyError):
            img.write_sync(CS - 1, b"\xbb" * 2)
        assert Path(path).read_bytes() == snapshot
        assert len(img.inflight) == 1
        # Elsewhere: goes through at once, no awaiting.
        img.write_sync(5 * CS, b"\xcc" * 10)
        oracle[5 * CS : 5 * CS + 10] = b"\xcc" * 10
        # Reads of the in-flight cluster see the old data.
        assert img.read_sync(0, 200) == base[:200]
        gate.release.set()
        await w
        assert img.read_sync(0, len(base)) == bytes(oracle)
    assert qemu.check(path)[0] == 0
    assert qemu.convert_raw(path) == bytes(oracle)


async def test_sync_writes_busy_while_flush_holds_lock_reads_proceed(
    qemu: Qemu, tmp_path: Path
) -> None:
    path, _ = _overlay(qemu, tmp_path)
    async with qcow2aio.open(path, "r+") as img:
        await img.write(0, b"\x01" * 100)
        gate = Gate(img, flush=True)
        f = asyncio.ensure_future(img.flush())
        await gate.entered.wait()
        assert img.lock.locked()
        with pytest.raises(qcow2aio.ImageBusyError):
            img.write_sync(3 * CS, b"x")
        with pytest.raises(qcow2aio.ImageBusyError):
            img.flush_sync()
        assert img.read_sync(0, 100) == b"\x01" * 100  # metadata is consistent during a flush
        gate.release.set()
        await f
        img.write_sync(3 * CS, b"x")
    assert qemu.check(path)[0] == 0


def test_sync_path_without_event_loop(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "s.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(path), "1M")
    img = qcow2aio.open(path, "r+")
    img.write_sync(5, b"hello")
    img.writev_sync(100, [b"wor", bytearray(b"ld")])
    img.flush_sync()
    assert img.read_sync(0, 105) == bytes(5) + b"hello" + bytes(90) + b"world"
    img.close()
    assert qemu.check(path)[0] == 0


async def test_sync_path_inside_running_loop(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "s.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(path), "1M")
    async with qcow2aio.open(path, "r+") as img:
        await img.write(0, b"a" * 10)
        img.write_sync(10, b"b" * 10)  # called from a coroutine: still never awaits
        assert img.read_sync(0, 20) == b"a" * 10 + b"b" * 10
        assert await img.read(0, 20) == b"a" * 10 + b"b" * 10


async def test_discard_and_zeroes_wait_for_inflight_allocation(qemu: Qemu, tmp_path: Path) -> None:
    """QEMU 7.2 forgot this; a discard must not free a cluster a write is about to link."""
    path, _ = _overlay(qemu, tmp_path)
    async with qcow2aio.open(path, "r+") as img:
        gate = Gate(img)
        w = asyncio.ensure_future(img.write(0, b"\x11" * CS))
        await gate.entered.wait()
        d = asyncio.ensure_future(img.discard(0, CS))
        z = asyncio.ensure_future(img.write_zeroes(CS, CS))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not d.done()  # waiting on the in-flight allocation
        gate.release.set()
        await asyncio.gather(w, d, z)
        assert await img.read(0, 2 * CS) == bytes(2 * CS)
    code, rep = qemu.check(path)
    assert code == 0, rep


async def test_freed_cluster_not_reused_while_reader_in_flight(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "f.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(path), "4M")
    async with qcow2aio.open(path, "r+") as img:
        await img.write(0, b"\x33" * CS)
        await img.flush()
        host = img.plan(0, 1)[0].host
        # Register a request that read the old mapping, then discard + flush.
        ep = img._enter()
        await img.discard(0, CS)
        await img.flush()
        await img.write(2 * CS, b"\x44" * CS)  # must not land on the old cluster
        assert img.plan(2 * CS, 1)[0].host != host
        img._leave(ep)
        await img.flush()  # now the cluster may be reused
        await img.write(4 * CS, b"\x55" * CS)
        assert img.plan(4 * CS, 1)[0].host == host
    assert qemu.check(path)[0] == 0


def test_zero_alloc_cluster_overwritten_in_place(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "z.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(path), "1M")
    qemu.io(path, "write -P 0x66 0 128k", "write -z 0 128k")
    with qcow2aio.open(path, "r+") as img:
        host = img.meta.l2_table(img.meta.l2_offset_for(0)).entries[0] & ((1 << 56) - 512)
        img.write_sync(1000, b"\x01" * 10)
        entry: Any = img.meta.l2_table(img.meta.l2_offset_for(0)).entries[0]
        assert entry & ((1 << 56) - 512) == host and not entry & 1
        expect = bytearray(128 << 10)
        expect[1000:1010] = b"\x01" * 10
        assert img.read_sync(0, 128 << 10) == bytes(expect)
    assert qemu.check(path)[0] == 0
