"""The test backends run the engine users run (issue 10, part 4).

The power-cut recorder (:class:`crashsim.RecordingBackend`) and the fault injector
(:class:`faults.FaultBackend`) hook the engine below its public methods (the
``_sys_*`` system-call hooks of :class:`qcow2aio.io.FileBackend`). These tests fail
if they drift apart again: a harness backend that loses ``plain_reads`` /
``plain_writes`` or inline-write eligibility, or a fast path of the default engine
(in-place writes, inline async writes, zero COW past the end of the file left out,
inline reads) that does not reach the hooks.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest
from crashsim import Journal, RecordingBackend
from faults import Fault, FaultBackend, FaultState

import qcow2aio
from qcow2aio.io import INLINE_WRITE_MAX, FastFileBackend, FileBackend

CLUSTER = 65536


def _image(tmp_path: Path, name: str = "t.qcow2") -> str:
    path = str(tmp_path / name)
    qcow2aio.create(path, 16 << 20)
    return path


def _no_threads(backend: FileBackend) -> None:
    """Fail any hop to an I/O thread: what follows must run inline."""

    def offload(fn: Any, *args: Any) -> Any:
        raise AssertionError(f"unexpected hop to a thread: {fn!r}")

    backend.offload = offload  # type: ignore[method-assign]


def _backends(path: str) -> list[FileBackend]:
    return [
        FileBackend(path, True),
        RecordingBackend(path, True, Journal()),
        FaultBackend(path, True, FaultState()),
    ]


def test_harness_backends_keep_the_default_engines_fast_paths(tmp_path: Path) -> None:
    path = _image(tmp_path)
    for b in _backends(path):
        try:
            name = type(b).__name__
            assert b.plain_reads and b.plain_writes, name
            assert b.inline_write_ok(4096) and b.inline_write_ok(INLINE_WRITE_MAX), name
            assert not b.inline_write_ok(INLINE_WRITE_MAX + 1), name
            # Same engine: no public method of the default backend is overridden.
            for m in ("offload", "inline_write_ok", "note_inline_write", "apwritev", "apread"):
                assert getattr(type(b), m) is getattr(FileBackend, m), (name, m)
        finally:
            b.close()


def test_public_override_turns_the_fast_paths_off(tmp_path: Path) -> None:
    class Reads(FileBackend):
        async def areadinto(self, buf: memoryview, offset: int, event: str = "read") -> None:
            await super().areadinto(buf, offset, event)

    class Writes(FileBackend):
        def pwritev(self, buffers: Any, offset: int, event: str = "write") -> None:
            super().pwritev(buffers, offset, event)

    path = _image(tmp_path)
    r, w = Reads(path), Writes(path, True)
    try:
        assert not r.plain_reads and r.plain_writes
        assert w.plain_reads and not w.plain_writes
    finally:
        r.close()
        w.close()


def test_old_engine_name_is_the_default() -> None:
    assert FastFileBackend is FileBackend
    assert qcow2aio.io.FastFileBackend is FileBackend


async def test_recorder_sees_in_place_inline_and_allocating_writes(tmp_path: Path) -> None:
    path = _image(tmp_path)
    journal = Journal()
    img = qcow2aio.open(path, "r+", io_backend=journal.factory(path))
    try:
        data = img._data
        assert isinstance(data, RecordingBackend)
        end = data.size()
        # An allocating async 4 KiB write at the end of the file: inline, and the zero
        # COW past the end of the file is left out (4 KiB recorded, not a cluster).
        _no_threads(data)
        n0 = len(journal.ops)
        await img.write(8192, b"a" * 4096)
        writes = [op for op in journal.ops[n0:] if op.data is not None]
        data_writes = [op for op in writes if op.event in ("data_write", "cow_write")]
        assert len(data_writes) == 1, writes
        (alloc,) = data_writes
        assert alloc.data == b"a" * 4096 and alloc.offset >= end
        host = alloc.offset - 8192
        # In-place overwrite, sync fast path (write_sync straight to the data file).
        n1 = len(journal.ops)
        img.write_sync(12288, b"b" * 4096)
        assert [(op.offset, op.data, op.event) for op in journal.ops[n1:]] == [
            (host + 12288, b"b" * 4096, "data_write")
        ]
        # In-place overwrite, async inline fast path.
        n2 = len(journal.ops)
        await img.write(16384, b"c" * 512)
        assert [(op.offset, op.data, op.event) for op in journal.ops[n2:]] == [
            (host + 16384, b"c" * 512, "data_write")
        ]
        assert img.read_sync(8192, 8704) == b"a" * 4096 + b"b" * 4096 + b"c" * 512
    finally:
        del data.offload  # threaded flush on close
        await img.aclose()
    # The close flushed through the hook too.
    assert journal.flushes and all(f.end is not None for f in journal.flushes)


async def test_recorder_sees_threaded_writes_and_flushes(tmp_path: Path) -> None:
    path = _image(tmp_path)
    journal = Journal()
    img = qcow2aio.open(path, "r+", io_backend=journal.factory(path))
    try:
        big = bytes(range(256)) * (2 * CLUSTER // 256)  # over INLINE_WRITE_MAX: a thread
        n0 = len(journal.ops)
        await img.write(0, big)
        recorded = b"".join(
            op.data for op in journal.ops[n0:] if op.data is not None and op.event == "data_write"
        )
        assert recorded == big
        f0 = len(journal.flushes)
        await img.flush()
        assert len(journal.flushes) > f0 and journal.flushes[-1].end is not None
    finally:
        await img.aclose()


async def test_faults_hit_inline_writes_and_reads(tmp_path: Path) -> None:
    path = _image(tmp_path)
    with qcow2aio.open(path, "r+") as img:
        img.write_sync(0, b"x" * CLUSTER)
    # In-place async write, inline: the fault reaches the caller with its errno.
    state = FaultState(Fault("data_write", "enospc"))
    img = qcow2aio.open(path, "r+", io_backend=state.factory())
    try:
        _no_threads(img._data)
        with pytest.raises(qcow2aio.Qcow2IOError) as err:
            await img.write(4096, b"y" * 4096)
        assert err.value.errno == errno.ENOSPC and state.fired == 1
        assert state.injections[0].op == "write"
        # A short write: part of it lands, then ENOSPC.
        state.fault = Fault("data_write", "short")
        state.injections.clear()
        state.matched = 0
        with pytest.raises(qcow2aio.Qcow2IOError):
            img.write_sync(8192, b"z" * 4096)
        assert state.fired == 1
        # Reads of cached data are inline (RWF_NOWAIT) and still fail when told to.
        for read in ("sync", "read", "readinto"):
            state.fault = Fault("data_read", "eio")
            state.injections.clear()
            state.matched = 0
            with pytest.raises(qcow2aio.Qcow2IOError) as err:
                if read == "sync":
                    img.read_sync(0, 4096)
                elif read == "read":
                    await img.read(0, 4096)
                else:
                    await img.readinto(memoryview(bytearray(4096)), 0)
            assert err.value.errno == errno.EIO and state.fired == 1, read
        state.fault = None
        assert await img.read(0, 4096) == b"x" * 4096
    finally:
        state.fault = None
        del img._data.offload
        await img.aclose()


async def test_faults_hit_threaded_flush_and_large_reads(tmp_path: Path) -> None:
    path = _image(tmp_path)
    with qcow2aio.open(path, "r+") as img:
        img.write_sync(0, b"q" * (4 * CLUSTER))
    state = FaultState(Fault("flush"))
    img = qcow2aio.open(path, "r+", io_backend=state.factory())
    try:
        with pytest.raises(qcow2aio.Qcow2IOError):
            await img.flush()
        assert state.fired == 1 and state.injections[0].op == "flush"
        # A large read that misses nothing still counts once and fails once.
        state.fault = Fault("data_read")
        state.injections.clear()
        state.matched = 0
        seen = state.events.get("data_read", 0)
        with pytest.raises(qcow2aio.Qcow2IOError):
            await img.read(0, 4 * CLUSTER)
        assert state.fired == 1 and state.events["data_read"] == seen + 1
    finally:
        state.fault = None
        img.close()


async def test_large_async_reads_into_new_bytes(tmp_path: Path) -> None:
    """``apread``'s in-place bytes: inline, threaded, partly past the end of the file."""
    path = str(tmp_path / "raw.bin")
    payload = bytes(range(256)) * 1024  # 256 KiB
    Path(path).write_bytes(payload)
    b = FileBackend(path)
    try:
        assert await b.apread(0, len(payload)) == payload
        assert await b.apread(4096, 65536) == payload[4096 : 4096 + 65536]
        past = await b.apread(len(payload) - 4096, 65536)
        assert past == payload[-4096:] + bytes(65536 - 4096)
        b._nowait = False  # every read through a thread
        assert await b.apread(100, 200000) == payload[100:200100]
        results = await asyncio.gather(*(b.apread(k * 8192, 100000) for k in range(8)))
        assert results == [payload[k * 8192 : k * 8192 + 100000] for k in range(8)]
    finally:
        b.close()


async def test_blocking_io_never_waits_for_the_default_executor(tmp_path: Path) -> None:
    """Users run ``asyncio.to_thread(img.write_sync, ...)`` in the loop's default
    executor, and those calls may wait for the metadata lock: our own blocking I/O
    (large writes, flushes, reads that miss) must not queue behind them."""
    import concurrent.futures
    import threading

    path = _image(tmp_path)
    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    loop.set_default_executor(pool)
    gate = threading.Event()
    blocker = loop.run_in_executor(None, gate.wait)  # the only default worker, busy
    try:
        img = qcow2aio.open(path, "r+")
        try:
            img._data._nowait = False  # reads hop too
            big = b"w" * (4 * CLUSTER)
            await asyncio.wait_for(img.write(0, big), 10)
            await asyncio.wait_for(img.flush(), 10)
            assert await asyncio.wait_for(img.read(0, len(big)), 10) == big
        finally:
            await img.aclose()
        assert not blocker.done()
    finally:
        gate.set()
        await blocker
