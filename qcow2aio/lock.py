"""The per-image metadata lock (QEMU's ``s->lock``), shared by threads and event loops.

One :class:`Image` may be used from any number of threads at once and its
coroutines awaited from any number of event loops at once, so this lock is a
small monitor: every change of its state happens under one ``threading.Lock``
(``_mutex``, held for a few bytecodes, never across I/O or an ``await``), which
makes acquiring atomic on a free-threaded build as well as under the GIL.

* **Ownership** is FIFO with direct hand-off: a releasing holder passes the lock
  to the first waiter, so nobody can barge in between. A waiter is either a
  coroutine (a future of *its own* loop, completed there with
  ``call_soon_threadsafe`` when the release happens in another thread: a plain
  ``set_result`` from a foreign thread would not wake that loop) or a thread with
  no running loop (a ``threading.Event``, waited on with a bound). The grant is
  recorded in the waiter under ``_mutex``, so a waiter that is cancelled or times
  out at the moment it is granted the lock can tell, and passes it on.
* **Readers** map guest ranges with :meth:`enter_read`: when the lock is free, or
  its holder is suspended with the metadata consistent (a flush waiting for
  ``fdatasync``: :meth:`open_to_readers` / :meth:`close_to_readers`), a reader maps
  *holding* ``_mutex`` (``SHARED``): one acquire and one release, where taking and
  giving back ownership would cost two of each. Nobody changes the lock's state
  meanwhile, so no owner can start (or resume) changing metadata under the reader,
  and readers exclude each other (a lookup may load or evict cache entries). A
  mapping takes microseconds (a table read on a cache miss: one ``pread``), so the
  threads that find ``_mutex`` taken simply block that long. Code run while
  ``SHARED`` must not call this lock's methods (``_mutex`` is not reentrant).

Who may wait is the caller's decision (``Image`` makes it): a thread running an
event loop never waits for a holder that may be a suspended coroutine of its own
loop; a thread without a loop waits, with a bound.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

from .errors import WaitTimeoutError

# enter_read() answers: the reader took the lock, holds the monitor's mutex, or neither.
OWNED = 1
SHARED = 2
BUSY = 0
UNLOCKED = 3  # NoLock's answer: nothing was taken, nothing to give back


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, or None (cheap: no exception raised)."""
    return asyncio._get_running_loop()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Wakeup:
    """One waiter, woken from any thread: a future of its loop, or a thread's event."""

    __slots__ = ("event", "fut", "loop")

    def __init__(self) -> None:
        self.loop = running_loop()
        self.fut: asyncio.Future[None] | None = None
        self.event: threading.Event | None = None
        if self.loop is not None:
            self.fut = self.loop.create_future()
        else:
            self.event = threading.Event()

    def wake(self) -> bool:
        """Wake the waiter; False if its loop is closed (nobody will ever run it)."""
        if self.event is not None:
            self.event.set()
            return True
        assert self.loop is not None and self.fut is not None
        if running_loop() is self.loop:
            _resolve(self.fut)
            return True
        try:
            self.loop.call_soon_threadsafe(_resolve, self.fut)
        except RuntimeError:  # the loop is closed
            return False
        return True

    async def wait_async(self) -> None:
        assert self.fut is not None
        await self.fut

    def wait_blocking(self, timeout: float) -> bool:
        assert self.event is not None
        return self.event.wait(timeout)


class _Waiter(Wakeup):
    __slots__ = ("granted",)

    def __init__(self) -> None:
        super().__init__()
        self.granted = False


class MetaLock:
    def __init__(self, name: str = "image") -> None:
        self.name = name
        self._mutex = threading.Lock()
        self._held = False
        self._readable = False  # the holder is suspended and metadata is consistent
        self._waiters: deque[_Waiter] = deque()

    def locked(self) -> bool:
        return self._held

    # ------------------------------------------------------------ ownership
    def try_acquire(self) -> bool:
        """Take the lock if free, never waiting (the synchronous fast path)."""
        with self._mutex:
            if self._held:
                return False
            self._held = True
            return True

    def _take_or_queue(self) -> _Waiter | None:
        """Take the lock if free (None), else queue a waiter of the calling thread's kind."""
        with self._mutex:
            if not self._held:
                self._held = True
                return None
            waiter = _Waiter()
            self._waiters.append(waiter)
            return waiter

    async def acquire(self) -> None:
        """Wait (FIFO) for the lock in a coroutine of any loop; safely cancellable."""
        waiter = self._take_or_queue()
        if waiter is None:
            return
        try:
            await waiter.wait_async()
        except BaseException:
            with self._mutex:
                granted = waiter.granted
                if not granted:
                    self._waiters.remove(waiter)
            if granted:
                # Ownership was handed to us as we were cancelled: pass it on.
                self.release()
            raise

    def acquire_blocking(self, timeout: float) -> None:
        """Wait (FIFO) for the lock in a thread with no running event loop.

        Raises :class:`WaitTimeoutError` after ``timeout`` seconds: the holder may be
        a suspended coroutine of a loop that is not running, which would never end.
        """
        waiter = self._take_or_queue()
        if waiter is None:
            return
        t0 = time.monotonic()
        if waiter.wait_blocking(timeout):
            return
        with self._mutex:
            if waiter.granted:
                return  # granted just as the wait ran out: we hold it
            self._waiters.remove(waiter)
        raise WaitTimeoutError(
            f"waited {time.monotonic() - t0:.1f} s for the metadata lock of {self.name}: its "
            "holder made no progress (a suspended coroutine of an event loop that is not "
            "running?)"
        )

    def release(self) -> None:
        while True:
            with self._mutex:
                assert self._held, "release of an unlocked MetaLock"
                self._readable = False
                if not self._waiters:
                    self._held = False
                    return
                waiter = self._waiters.popleft()
                waiter.granted = True  # hand-off: the lock stays held, by the waiter
            if waiter.wake():
                return
            # Its loop is closed: the waiter will never run. Hand the lock on instead.

    # -------------------------------------------------------------- readers
    def enter_read(self, wait: float | None = None) -> int:
        """Admit a reader that maps without awaiting: ``SHARED`` (it holds ``_mutex``:
        the lock was free or its holder is suspended with metadata consistent),
        ``OWNED`` (it waited for the lock and holds it), or ``BUSY``. It waits only
        with ``wait`` (seconds), where the holder cannot be a suspended coroutine of
        the caller's loop. End with :meth:`exit_read`."""
        mutex = self._mutex
        mutex.acquire()
        if not self._held or self._readable:
            return SHARED
        mutex.release()
        if wait is None:
            return BUSY
        self.acquire_blocking(wait)
        return OWNED

    def exit_read(self, how: int) -> None:
        if how == SHARED:
            self._mutex.release()
        elif how == OWNED:
            self.release()

    def open_to_readers(self) -> None:
        """The holder is about to await with metadata consistent: readers may map."""
        with self._mutex:
            self._readable = True

    def close_to_readers(self) -> None:
        """The holder resumes: once the reader mapping now (holding ``_mutex``) is done,
        no other may start."""
        with self._mutex:
            self._readable = False


class NoLock(MetaLock):
    """A lock that never excludes anyone: for ``qcow2aio.testing.unserialized()`` only."""

    def locked(self) -> bool:
        return False

    def try_acquire(self) -> bool:
        return True

    async def acquire(self) -> None:
        return None

    def acquire_blocking(self, timeout: float) -> None:
        return None

    def release(self) -> None:
        return None

    def enter_read(self, wait: float | None = None) -> int:
        return UNLOCKED

    def exit_read(self, how: int) -> None:
        return None

    def open_to_readers(self) -> None:
        return None

    def close_to_readers(self) -> None:
        return None
