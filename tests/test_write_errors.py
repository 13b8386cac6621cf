"""Overlap checks, the corrupt bit, and I/O errors on the write path."""

from __future__ import annotations

import asyncio
import errno
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import Qemu

import qcow2aio
from qcow2aio.io import Buffer


def test_l2_entry_into_refblock_sets_corrupt_bit(qemu: Qemu, tmp_path: Path) -> None:
    """iotest 060 style: an L2 entry pointing at the refcount block must not be written through."""
    path = tmp_path / "c.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(path), "1M")
    qemu.io(path, "write -P 0x11 0 64k")
    raw = bytearray(path.read_bytes())
    # L2 at 0x40000: point entry 0 at the refcount block (0x20000), COPIED.
    struct.pack_into(">Q", raw, 0x40000, 0x8000000000020000)
    path.write_bytes(raw)
    with qcow2aio.open(path, "r+") as img:
        with pytest.raises(qcow2aio.Qcow2CorruptError, match="refblock"):
            img.write_sync(0, b"x" * 512)
        assert img.meta.header.corrupt
        with pytest.raises(qcow2aio.Qcow2CorruptError):
            img.write_sync(65536, b"y")
    # The refcount block is intact and QEMU sees the corrupt bit.
    assert path.read_bytes()[0x20000:0x20008] == raw[0x20000:0x20008]
    assert qemu.info(path)["format-specific"]["data"]["corrupt"] is True
    with pytest.raises(qcow2aio.Qcow2Error):
        qcow2aio.open(path, "r+")
    with qcow2aio.open(path) as img:
        img.read_sync(65536, 10)


class FailingWrites:
    """Makes data writes (or flushes) of an image fail with an errno."""

    def __init__(
        self, img: qcow2aio.Image, err: int, *, what: tuple[str, ...] = ("data_write", "cow_write")
    ) -> None:
        self.on = True
        backend = img._data
        orig_w = backend.pwritev
        orig_aw = backend.apwritev
        orig_f = backend.flush
        orig_af = backend.aflush

        def fail(event: str) -> None:
            if self.on and event in what:
                raise qcow2aio.Qcow2IOError(f"injected {errno.errorcode[err]} at {event}", err)

        def pwritev(buffers: Sequence[Buffer], offset: int, event: str = "write") -> None:
            fail(event)
            orig_w(buffers, offset, event)

        async def apwritev(buffers: Sequence[Buffer], offset: int, event: str = "write") -> None:
            fail(event)
            await orig_aw(buffers, offset, event)

        def flush(event: str = "flush") -> None:
            fail("flush")
            orig_f(event)

        async def aflush(event: str = "flush") -> None:
            fail("flush")
            await orig_af(event)

        backend.pwritev = pwritev  # type: ignore[method-assign]
        backend.apwritev = apwritev  # type: ignore[method-assign]
        backend.flush = flush  # type: ignore[method-assign]
        backend.aflush = aflush  # type: ignore[method-assign]


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
async def test_failed_data_write_frees_its_clusters(qemu: Qemu, tmp_path: Path, err: int) -> None:
    path = tmp_path / "e.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(path), "4M")
    async with qcow2aio.open(path, "r+") as img:
        inj = FailingWrites(img, err)
        with pytest.raises(qcow2aio.Qcow2IOError) as info:
            await img.write(0, b"a" * 100000)
        assert info.value.errno == err
        with pytest.raises(qcow2aio.Qcow2IOError):
            img.write_sync(1 << 20, b"b" * 10)
        assert len(img.inflight) == 0
        inj.on = False
        await img.write(2 << 20, b"c" * 10)
        assert await img.read(0, 4) == bytes(4)  # the failed write is not visible
        report = img.check()
        assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0
    code, rep = qemu.check(path)
    assert code == 0, rep


async def test_failed_flush_refuses_writes_until_reopen(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "f.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(path), "4M")
    img = qcow2aio.open(path, "r+")
    await img.write(0, b"a" * 1000)
    FailingWrites(img, errno.EIO, what=("flush",))
    with pytest.raises(qcow2aio.Qcow2IOError):
        await img.flush()
    with pytest.raises(qcow2aio.Qcow2IOError, match="flush"):
        await img.write(0, b"b")
    with pytest.raises(qcow2aio.Qcow2IOError):
        img.write_sync(0, b"b")
    with pytest.raises(qcow2aio.Qcow2IOError):
        img.flush_sync()
    img.close()
    code, rep = qemu.check(path)
    assert code in (0, 3), rep
    with qcow2aio.open(path, "r+") as img2:
        img2.write_sync(0, b"c")
    assert qemu.check(path)[0] in (0, 3)


def test_frees_failing_half_way_are_never_applied_twice(qemu: Qemu, tmp_path: Path) -> None:
    """A refcount decrease that fails in the middle of a batch: those applied before it
    leave the queue (applying them again at the next flush would drop refcounts below
    their references), the failed one is dropped (a leak at worst), the rest stay."""
    path = tmp_path / "f.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "1M")
    with qcow2aio.open(path, "r+") as img:
        for i in range(4):
            img.write_sync(i * 4096, bytes([i + 1]) * 4096)
        img.flush_sync()
        hosts = [m.host for m in (img.plan(i * 4096, 4096)[0] for i in range(4))]
        for i in range(4):
            asyncio.run(img.discard(i * 4096, 4096))
        alloc = img.meta.allocator
        assert alloc is not None and len(alloc.pending) == 4
        alloc.mark_frees_durable()
        real = alloc.update_refcount
        calls: list[int] = []

        def flaky(offset: int, length: int, addend: int) -> None:
            calls.append(offset)
            if len(calls) == 2:
                raise qcow2aio.Qcow2IOError("injected EIO at cluster_free", errno.EIO)
            real(offset, length, addend)

        alloc.update_refcount = flaky  # type: ignore[method-assign]
        with pytest.raises(qcow2aio.Qcow2IOError, match="injected"):
            alloc.apply_frees(None)
        assert [p.offset for p in alloc.pending] == hosts[2:]
        alloc.update_refcount = real  # type: ignore[method-assign]
        assert alloc.apply_frees(None) == 2
        assert alloc.pending == []
        assert [alloc.refcount(h >> 12) for h in hosts] == [0, 1, 0, 0]
    rc, report = qemu.check(path)
    assert rc == 3 and report.get("leaks") == 1 and not report.get("corruptions"), report
