"""One image, many threads and event loops (issue 10): the situations that failed.

Each test is bounded: threads are joined with a timeout and coroutines run under
``asyncio.wait_for``, so a lost wake-up or a deadlock fails the test instead of
hanging the suite. Every image written ends in ``qemu-img check`` and a byte compare
with QEMU's reading of it. The randomized, seeded versions of these scenarios (and
the unserialized control) are in tests/test_thread_interleavings.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Qemu
from threadsim import switch_interval

import qcow2aio
from qcow2aio.lock import BUSY, SHARED, MetaLock

CS = 65536
SIZE = 4 << 20
JOIN = 60.0  # seconds: far above any of these runs, far below the suite's timeout


def fast_switching(interval: float = 1e-6) -> contextlib.AbstractContextManager[None]:
    """Make the interpreter switch threads as often as it can (races show up)."""
    return switch_interval(interval)


def run_threads(targets: list[Callable[[], Any]], timeout: float = JOIN) -> list[Any]:
    """Run each target in its own thread; their results, or raise the first error.
    A thread still running after ``timeout`` fails the test (a hang)."""
    results: list[Any] = [None] * len(targets)
    errors: list[BaseException] = []

    def wrap(i: int, fn: Callable[[], Any]) -> None:
        try:
            results[i] = fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=wrap, args=(i, fn), daemon=True) for i, fn in enumerate(targets)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"threads still running after {timeout} s (a hang): {hung}"
    if errors:
        raise errors[0]
    return results


def pattern(tag: int, n: int) -> bytes:
    return bytes([tag & 0xFF]) * n


def expect_image(qemu: Qemu, path: Path, expected: bytes) -> None:
    code, report = qemu.check(path)
    assert code == 0, report
    assert qemu.convert_raw(path)[: len(expected)] == expected


def new_image(tmp_path: Path, name: str = "t.qcow2", **kw: Any) -> Path:
    path = tmp_path / name
    qcow2aio.create(str(path), SIZE, **kw)
    return path


def test_write_sync_from_worker_threads_waits_instead_of_busy(tmp_path: Path, qemu: Qemu) -> None:
    """4 threads with no event loop, write_sync into fresh clusters (allocating, so each
    holds the lock): every call succeeds; none raises ImageBusyError."""
    path = new_image(tmp_path)
    expected = bytearray(SIZE)
    img = qcow2aio.open(path, "r+")

    def writer(t: int) -> int:
        done = 0
        for k in range(40):
            # Thread t writes sectors in every 4th cluster-half: allocations race on
            # shared L2 tables and refcount blocks, never on the same bytes.
            off = ((k * 4 + t) * CS // 2) % SIZE
            img.write_sync(off, pattern(t * 40 + k + 1, 4096))
            done += 1
        return done

    with fast_switching():
        counts = run_threads([lambda t=t: writer(t) for t in range(4)])
    assert counts == [40] * 4
    for t in range(4):
        for k in range(40):
            off = ((k * 4 + t) * CS // 2) % SIZE
            expected[off : off + 4096] = pattern(t * 40 + k + 1, 4096)
    img.close()
    expect_image(qemu, path, bytes(expected))


def test_write_sync_in_worker_beside_loop_awaiting_write(tmp_path: Path, qemu: Qemu) -> None:
    """A worker thread's write_sync releases the lock to a coroutine of the main
    thread's loop: the loop must be woken (a plain set_result from the worker was lost)."""
    path = new_image(tmp_path)
    img = qcow2aio.open(path, "r+")
    stop = threading.Event()
    expected = bytearray(SIZE)

    def worker() -> int:
        n = 0
        while not stop.is_set() and n < 2000:
            off = (n * CS) % (SIZE // 2)  # first half: allocating, then in place
            img.write_sync(off, pattern(n % 200 + 1, 512))
            n += 1
        return n

    async def main() -> None:
        for k in range(300):
            off = SIZE // 2 + (k * CS) % (SIZE // 2) + 512  # second half
            await img.write(off, pattern(k % 50 + 7, 1024))
            expected[off : off + 1024] = pattern(k % 50 + 7, 1024)
            await img.flush()

    box: list[int] = []
    with fast_switching(1e-5):
        t = threading.Thread(target=lambda: box.append(worker()), daemon=True)
        t.start()
        try:
            asyncio.run(asyncio.wait_for(main(), JOIN))
        finally:
            stop.set()
            t.join(JOIN)
    assert not t.is_alive(), "the worker thread hung"
    n = box[0]
    for i in range(n):
        off = (i * CS) % (SIZE // 2)
        expected[off : off + 512] = pattern(i % 200 + 1, 512)
    img.close()
    expect_image(qemu, path, bytes(expected))


def test_two_threads_each_with_its_own_loop(tmp_path: Path, qemu: Qemu) -> None:
    """Two threads, each running an event loop, awaiting writes on one image: neither
    loop hangs (each waiter is woken in its own loop)."""
    path = new_image(tmp_path)
    img = qcow2aio.open(path, "r+")

    async def writers(t: int) -> None:
        async def one(k: int) -> None:
            # The two loops interleave allocations in the same L2 table, different bytes.
            off = (k * 2 + t) * CS // 4
            await img.write(off, pattern(t * 100 + k + 1, 8192))
            if k % 8 == 0:
                await img.flush()

        await asyncio.gather(*(one(k) for k in range(32)))

    def loop_thread(t: int) -> None:
        asyncio.run(asyncio.wait_for(writers(t), JOIN))

    with fast_switching(1e-5):
        run_threads([lambda t=t: loop_thread(t) for t in range(2)])
    expected = bytearray(SIZE)
    for t in range(2):
        for k in range(32):
            off = (k * 2 + t) * CS // 4
            expected[off : off + 8192] = pattern(t * 100 + k + 1, 8192)
    asyncio.run(img.aclose())
    expect_image(qemu, path, bytes(expected))


class _SlowStateLock(MetaLock):
    """A MetaLock whose state reads give the other threads a turn: the interleaving a
    free-threaded build (or an unlucky switch) can produce between a check and a set."""

    @property  # type: ignore[override]
    def _held(self) -> bool:
        value: bool = self.__dict__["_held_value"]
        time.sleep(1e-4)  # another thread may read the same value meanwhile
        return value

    @_held.setter
    def _held(self, value: bool) -> None:
        self.__dict__["_held_value"] = value


@pytest.mark.parametrize("lock_class", [MetaLock, _SlowStateLock])
def test_try_acquire_is_atomic_between_threads(lock_class: type[MetaLock]) -> None:
    """Two threads must never both believe they hold the lock (the old check-then-set
    on a plain attribute let another thread run between the check and the set)."""
    lock = lock_class()
    holders = 0
    worst = 0
    guard = threading.Lock()

    def contender() -> None:
        nonlocal holders, worst
        for _ in range(20000 if lock_class is MetaLock else 300):
            if lock.try_acquire():
                with guard:
                    holders += 1
                    worst = max(worst, holders)
                time.sleep(0 if lock_class is MetaLock else 5e-4)
                with guard:
                    holders -= 1
                lock.release()

    with fast_switching():
        run_threads([contender for _ in range(4)])
    assert worst == 1
    assert not lock.locked()


def test_readers_map_only_while_free_or_the_holder_is_suspended_readable() -> None:
    lock = MetaLock()
    assert lock.enter_read() == SHARED
    lock.exit_read(SHARED)
    assert lock.try_acquire()
    assert lock.enter_read() == BUSY  # held by someone changing metadata
    lock.open_to_readers()
    assert lock.enter_read() == SHARED  # a flush waiting for its fsync
    finished = threading.Event()

    def holder_resumes() -> None:
        lock.close_to_readers()  # must wait for the reader's mapping
        finished.set()

    t = threading.Thread(target=holder_resumes, daemon=True)
    t.start()
    time.sleep(0.05)
    assert not finished.is_set(), "the holder resumed while a reader was mapping"
    lock.exit_read(SHARED)
    t.join(JOIN)
    assert finished.is_set()
    assert lock.enter_read() == BUSY
    lock.release()
    assert not lock.locked()


def test_sync_wait_bounded_when_holder_loop_is_not_running(tmp_path: Path) -> None:
    """The lock held by a suspended coroutine of a loop that no longer runs: a sync call
    in a thread without a loop gives up after wait_timeout with WaitTimeoutError, having
    changed nothing."""
    path = new_image(tmp_path)
    img = qcow2aio.open(path, "r+", wait_timeout=0.3)
    loop = asyncio.new_event_loop()
    try:

        async def grab() -> None:
            await img.lock.acquire()  # ... and never released: the loop stops below

        loop.run_until_complete(grab())
        t0 = time.monotonic()
        with pytest.raises(qcow2aio.WaitTimeoutError, match="metadata lock"):
            run_threads([lambda: img.write_sync(0, b"x" * 512)])
        assert 0.25 <= time.monotonic() - t0 < 10
        assert isinstance(qcow2aio.WaitTimeoutError("x"), qcow2aio.ImageBusyError)
        img.lock.release()
        assert img.read_sync(0, 512) == bytes(512)  # nothing was written
    finally:
        loop.close()
        img.close()


def test_sync_calls_in_a_loop_thread_still_raise_busy(tmp_path: Path) -> None:
    """In a thread that runs a loop, the holder may be a suspended coroutine of that
    very loop: the sync path never waits there, it raises ImageBusyError."""
    path = new_image(tmp_path)
    img = qcow2aio.open(path, "r+", wait_timeout=30)

    async def main() -> None:
        await img.lock.acquire()
        try:
            t0 = time.monotonic()
            with pytest.raises(qcow2aio.ImageBusyError):
                img.write_sync(0, b"y" * 512)
            with pytest.raises(qcow2aio.ImageBusyError):
                img.read_sync(0, 512)
            with pytest.raises(qcow2aio.ImageBusyError):
                img.flush_sync()
            assert time.monotonic() - t0 < 1.0  # none of them waited
        finally:
            img.lock.release()
        assert img.read_sync(0, 512) == bytes(512)

    asyncio.run(asyncio.wait_for(main(), JOIN))
    img.close()


def test_async_waiter_cancelled_at_hand_off_passes_the_lock_on() -> None:
    """A coroutine cancelled just as another thread hands it the lock must pass it on,
    or every later request would wait forever."""
    lock = MetaLock()

    async def main() -> None:
        assert lock.try_acquire()
        waiter = asyncio.ensure_future(lock.acquire())
        await asyncio.sleep(0)
        # Another thread releases (granting the waiter) while we cancel it.
        t = threading.Thread(target=lock.release, daemon=True)
        t.start()
        t.join(JOIN)
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        assert not lock.locked()
        await asyncio.wait_for(lock.acquire(), 5)
        lock.release()

    asyncio.run(asyncio.wait_for(main(), JOIN))


def test_to_thread_read_sync_during_async_writes(tmp_path: Path, qemu: Qemu) -> None:
    """read_sync offloaded with asyncio.to_thread (the loop's default executor) while
    the loop writes: every read returns one of the values the range ever held."""
    path = new_image(tmp_path)
    img = qcow2aio.open(path, "r+")

    async def main() -> None:
        seen: list[tuple[int, bytes]] = []

        async def writes() -> None:
            for k in range(64):
                await img.write((k % 16) * CS, pattern(k % 16 + 1, CS))

        async def reads() -> None:
            for k in range(64):
                got = await asyncio.to_thread(img.read_sync, (k % 16) * CS, 4096)
                seen.append((k % 16, got))

        await asyncio.gather(writes(), reads(), reads())
        for c, got in seen:
            assert got in (bytes(4096), pattern(c + 1, 4096)), c

    with fast_switching(1e-5):
        asyncio.run(asyncio.wait_for(main(), JOIN))
    expected = b"".join(pattern(k + 1, CS) for k in range(16))
    img.close()
    expect_image(qemu, path, expected)


def test_close_from_another_thread_drains_requests(tmp_path: Path, qemu: Qemu) -> None:
    """close() in a thread without a loop waits for the requests of the loop (and of
    other threads) in flight, then writes back: nothing leaks, nothing is lost."""
    path = new_image(tmp_path)
    img = qcow2aio.open(path, "r+")
    started = threading.Event()
    acked: list[int] = []

    async def main() -> None:
        async def one(k: int) -> None:
            try:
                await img.write(k * CS, pattern(k + 1, CS))
                acked.append(k)
            except qcow2aio.Qcow2Error as exc:
                assert "clos" in str(exc)

        tasks = [asyncio.ensure_future(one(k)) for k in range(48)]
        await asyncio.sleep(0)
        started.set()
        await asyncio.gather(*tasks)

    def closer() -> None:
        started.wait(JOIN)
        img.close()

    t = threading.Thread(target=closer, daemon=True)
    t.start()
    asyncio.run(asyncio.wait_for(main(), JOIN))
    t.join(JOIN)
    assert not t.is_alive(), "close() from the other thread hung"
    assert img._closed
    code, report = qemu.check(path)
    assert code == 0, report  # no leak: every allocation in flight was linked
    data = qemu.convert_raw(path)
    for k in acked:
        assert data[k * CS : (k + 1) * CS] == pattern(k + 1, CS)


def test_check_waits_for_allocations_in_flight(tmp_path: Path) -> None:
    """check() from a thread while another thread allocates: the flush and the check are
    one hold of the lock, and no allocation is in flight, so no leak is ever reported."""
    path = new_image(tmp_path)
    img = qcow2aio.open(path, "r+")
    reports: list[dict[str, Any]] = []

    def writer() -> None:
        for k in range(60):
            img.write_sync((k % 60) * CS // 2 + 512, b"w" * 1024)

    def checker() -> None:
        for _ in range(15):
            reports.append(img.check())

    with fast_switching(1e-5):
        run_threads([writer, checker, writer])
    for r in reports:
        assert r.get("leaks", 0) == 0 and r["check-errors"] == 0, r
    img.close()


def test_loops_that_used_the_io_threads_are_not_kept_alive(tmp_path: Path) -> None:
    """Each asyncio.run in a thread is a new loop; the I/O threads' per-loop inbox must
    not keep it (and its selector) alive once it is gone."""
    import gc

    from qcow2aio.io import to_thread

    path = new_image(tmp_path)
    img = qcow2aio.open(path, "r+")

    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def one(k: int) -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        await img.write(k * CS, b"z" * 4096)
        await img.flush()
        # A job of the I/O threads from this loop: an inbox for it, and a worker that
        # ran the job (and must not keep its future, which refers to the loop).
        await to_thread(len, b"x")

    for k in range(20):
        run_threads([lambda k=k: asyncio.run(one(k))])
    # Only this test's loops are counted (other tests of the process have their own).
    # A worker may still be between answering its last job and dropping it: retried
    # for a bounded time; a worker that keeps its job keeps that loop for good.
    deadline = time.monotonic() + 5
    while True:
        gc.collect()
        alive = [r for r in loops if r() is not None]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not alive
    img.close()
