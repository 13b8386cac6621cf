"""Positional file I/O: the one small interface every layer above uses.

All access is ``os.pread``/``os.pwrite`` style (never seek+read on a shared
file object), so concurrent requests cannot disturb each other's position.
Each method takes an ``event`` name in the style of QEMU's blkdebug events
(``l2_load``, ``data_write`` ...): the plain backend ignores it, and the test
backends (fault injection, recording for power-cut simulation) key on it.

The async methods first try a read inline with ``RWF_NOWAIT`` (Linux answers
``EAGAIN`` instead of blocking when the data is not in the page cache) and hop
to a worker thread only on a miss; writes and flushes go to a thread because
they may block (``RWF_NOWAIT`` is refused for buffered writes on ext4 here:
``EOPNOTSUPP``). Two engines do the hop (:meth:`FileBackend.offload`):

* :class:`FileBackend`, the portable default: ``aiofiles`` (the loop's default
  executor), every write in a thread.
* :class:`FastFileBackend` (``qcow2aio.open(..., io_backend=FastFileBackend)``):
  this module's own small pool (:class:`IOThreads`), where a hop costs about half
  as much and a worker that finishes while the loop has not yet run completes the
  futures of everything it did in one loop wake-up; and small writes
  (``INLINE_WRITE_MAX``, a cluster) done inline: a copy into the page cache, a few
  microseconds, where a round trip through a thread costs 70-150 us of latency and
  about as much CPU. Like the metadata writes (inline from the start, see
  architecture.md) they are timed, and slow ones (two in a row over 2 ms: dirty-page
  throttling, a page under writeback) send that file's writes back to threads for
  a while. ``docs/performance.md`` has both in the benchmark table.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno as _errno
import mmap
import os
import queue
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiofiles.os

from .errors import Qcow2IOError

Buffer = bytes | bytearray | memoryview
# Opens a file for an image: (path, writable) -> backend. Tests pass recording or
# fault-injecting subclasses of FileBackend through qcow2aio.open(io_backend=...).
BackendFactory = Callable[[str, bool], "FileBackend"]

_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
T = TypeVar("T")
# Async writes up to this size are done inline (a copy into the page cache); larger ones,
# flushes and truncates go to a thread. Two inline writes in a row that took longer than
# INLINE_WRITE_SLOW (dirty-page throttling, a page under writeback, a page to read
# first) send this file's writes to threads for INLINE_WRITE_BACKOFF seconds.
INLINE_WRITE_MAX = 64 << 10
INLINE_WRITE_SLOW = 0.002
INLINE_WRITE_BACKOFF = 1.0


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


# The portable engine: any blocking call, in the loop's default executor via aiofiles.
_aio_call: Any = aiofiles.os.wrap(_call)


_ZEROS = bytes(1 << 16)


def _zero_fill(view: memoryview) -> None:
    """Zero ``view`` in bounded chunks (a huge table past EOF must not double its memory)."""
    n = len(view)
    step = len(_ZEROS)
    for pos in range(0, n, step):
        chunk = min(step, n - pos)
        view[pos : pos + chunk] = _ZEROS[:chunk]


def _ioerror(what: str, path: str, exc: OSError) -> Qcow2IOError:
    return Qcow2IOError(f"{what} on {path!r} failed: {exc.strerror or exc}", exc.errno)


# ------------------------------------------------------------- worker threads
class _Inbox:
    """Results for one event loop: workers append, one ``call_soon_threadsafe`` drains.

    While a drain is already scheduled, further results only join the queue, so a
    worker that completes several jobs before the loop runs costs one wake-up.
    """

    __slots__ = ("__weakref__", "items", "lock", "loop", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: collections.deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = (
            collections.deque()
        )
        self.scheduled = False
        self.lock = threading.Lock()

    def post(self, fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        with self.lock:
            self.items.append((fut, result, exc))
            if self.scheduled:
                return
            self.scheduled = True
        # RuntimeError: the loop was closed meanwhile, and nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.drain)

    def drain(self) -> None:
        with self.lock:
            items = list(self.items)
            self.items.clear()
            self.scheduled = False
        for fut, result, exc in items:
            if fut.cancelled():
                continue
            if exc is None:
                fut.set_result(result)
            else:
                fut.set_exception(exc)


class IOThreads:
    """A few daemon threads for the blocking calls of async requests (and helpers).

    A job is a tuple on a ``SimpleQueue``; threads start on demand (when none is
    idle) up to ``max_threads``. Async callers get an ``asyncio.Future`` completed
    through the loop's :class:`_Inbox`; synchronous callers (``parallel_map``)
    pass a plain callback. Cancelling a future does not stop a call already
    running: its result is dropped.
    """

    def __init__(self, max_threads: int) -> None:
        self.max_threads = max(1, max_threads)
        self._reset()

    def _reset(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Any, Any]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = (
            weakref.WeakKeyDictionary()
        )

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` in a worker; await the returned future for its result."""
        loop = asyncio.get_running_loop()
        inbox = self._inboxes.get(loop)
        if inbox is None:
            inbox = self._inboxes[loop] = _Inbox(loop)
        fut: asyncio.Future[T] = loop.create_future()
        self._put(fn, args, inbox.post, fut)
        return fut

    def submit_callback(
        self, fn: Callable[..., T], args: tuple[Any, ...], done: Callable[[Any, Any, Any], None]
    ) -> None:
        """Run ``fn(*args)`` in a worker, then ``done(None, result, exc)`` in that worker."""
        self._put(fn, args, done, None)

    def _put(self, fn: Callable[..., Any], args: tuple[Any, ...], done: Any, fut: Any) -> None:
        self._queue.put((fn, args, done, fut))
        if self._idle <= 0 and self._threads < self.max_threads:
            self._spawn()

    def _spawn(self) -> None:
        with self._lock:
            if self._threads >= self.max_threads:
                return
            self._threads += 1
        t = threading.Thread(target=self._run, name="qcow2aio-io", daemon=True)
        t.start()

    def _run(self) -> None:
        q = self._queue
        lock = self._lock
        while True:
            with lock:
                self._idle += 1
            fn, args, done, fut = q.get()
            with lock:
                self._idle -= 1
            try:
                result = fn(*args)
            except BaseException as exc:
                done(fut, None, exc)
            else:
                done(fut, result, None)


_THREADS = IOThreads(max(2, min(4, os.cpu_count() or 1)))
# Threads do not survive fork(): a child starts with an empty pool of its own.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_THREADS._reset)


def to_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Run a blocking call in the I/O threads from a coroutine: ``await to_thread(f, x)``."""
    return _THREADS.submit(fn, *args)


def parallel_map(fn: Callable[[Any], T], items: Sequence[Any], helpers: int = 1) -> list[T]:
    """``[fn(x) for x in items]`` by the calling thread and up to ``helpers`` I/O threads.

    For calls that release the GIL (zlib, zstd). Helpers take items from the same
    iterator as the caller, so a helper that starts late simply finds less to do;
    the caller waits only for helpers that started work, never for a busy pool.
    No work outlives the call: on an error (or a signal's exception in the caller)
    the others stop taking items, and the caller still waits for any helper that is
    running before it raises.
    """
    n = len(items)
    helpers = min(helpers, n - 1, _THREADS.max_threads)
    if helpers <= 0:
        return [fn(x) for x in items]
    results: list[Any] = [None] * n
    errors: list[BaseException] = []
    work = iter(enumerate(items))
    cond = threading.Condition()
    state = {"closed": False, "active": 0}

    def drain() -> None:
        try:
            for i, x in work:
                if errors:
                    return
                results[i] = fn(x)
        except BaseException as exc:
            errors.append(exc)

    def helper() -> None:
        with cond:
            if state["closed"]:
                return
            state["active"] += 1
        try:
            drain()
        finally:
            with cond:
                state["active"] -= 1
                cond.notify_all()

    def ignore(_fut: Any, _result: Any, _exc: Any) -> None:
        return None

    for _ in range(helpers):
        _THREADS.submit_callback(helper, (), ignore)
    try:
        drain()
    finally:
        interrupted: BaseException | None = None
        while True:
            try:
                with cond:
                    state["closed"] = True
                    while state["active"]:
                        cond.wait()
                break
            except BaseException as exc:  # a signal while waiting: wait on, raise after
                interrupted = interrupted or exc
                errors.append(exc)
        if interrupted is not None:
            raise interrupted
    if errors:
        raise errors[0]
    return results


class BufferPool:
    """Reusable bounce buffers for reads that must end as one ``bytes`` object.

    Filling a fresh bytearray and copying it out costs two large allocations per
    request; when both are freed glibc trims the heap (``madvise``/``brk``), and the
    next request faults every page back in, with a TLB shootdown on each trim. That
    measured ~1.4 ms per MiB here, ten times the copy itself. Borrowing a long-lived
    buffer leaves one allocation per request: the ``bytes`` returned. The pool keeps
    at most ``max_bytes`` in all (buffers are never shared: borrow, use, give back).

    The buffers are anonymous mmaps, so they start on a page boundary: the kernel's
    copy from the page cache into a buffer 16 bytes past a page boundary (where
    malloc puts a large bytearray) measured 3-4x slower here (~530 against ~165 us
    per MiB).
    """

    def __init__(self, max_buffer: int = 4 << 20, max_bytes: int = 8 << 20) -> None:
        self.max_buffer = max_buffer
        self.max_bytes = max_bytes
        self._reset()

    def _reset(self) -> None:
        self._free: list[mmap.mmap] = []
        self._held = 0  # bytes in ``_free``
        self._lock = threading.Lock()

    def borrow(self, length: int) -> mmap.mmap:
        """A page-aligned buffer of at least ``length`` bytes (contents undefined)."""
        with self._lock:
            free = self._free
            for i in range(len(free) - 1, -1, -1):
                if len(free[i]) >= length:
                    buf = free.pop(i)
                    self._held -= len(buf)
                    return buf
        return mmap.mmap(-1, max(length, 64 << 10))

    def give_back(self, buf: mmap.mmap) -> None:
        n = len(buf)
        if n > self.max_buffer:
            return
        with self._lock:
            free = self._free
            while free and self._held + n > self.max_bytes:
                self._held -= len(free.pop(0))
            if self._held + n <= self.max_bytes:
                free.append(buf)
                self._held += n

    def read_bytes(self, fill: Callable[[memoryview], bool], length: int) -> bytes | None:
        """``fill`` a borrowed buffer's first ``length`` bytes; their copy, or None if
        ``fill`` returned False."""
        buf = self.borrow(length)
        try:
            view = memoryview(buf)[:length]
            return bytes(view) if fill(view) else None
        finally:
            self.give_back(buf)


# One pool for every thread and image (a forked child starts with a fresh one: the
# lock may have been held by a thread that does not exist there).
BUFFERS = BufferPool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=BUFFERS._reset)


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    """``os.pread`` until ``length`` bytes or end of file; zeros past the end."""
    parts: list[bytes] = []
    have = 0
    while have < length:
        chunk = os.pread(fd, length - have, offset + have)
        if not chunk:
            parts.append(bytes(length - have))
            break
        parts.append(chunk)
        have += len(chunk)
    if len(parts) == 1:
        return parts[0]
    return b"".join(parts)


def _pwritev_all(fd: int, views: list[memoryview], pos: int, event: str, path: str) -> None:
    """Write all of ``views`` at ``pos``; a short write is retried, then reported."""
    while views:
        try:
            n = os.pwritev(fd, views, pos)
        except OSError as exc:
            raise _ioerror(f"write ({event})", path, exc) from exc
        if n <= 0:
            raise Qcow2IOError(f"write ({event}) on {path!r} wrote nothing", _errno.EIO)
        pos += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


class FileBackend:
    """An open file addressed by offset only. Subclass hooks: override the methods."""

    def __init__(self, path: str, writable: bool = False) -> None:
        self.path = path
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            raise _ioerror("open", path, exc) from exc
        self._nowait = bool(_RWF_NOWAIT)
        # Whether data reads / writes are exactly the os calls on ``fd`` (no subclass hook):
        # only then may the image's fast paths call os.pread/os.preadv/os.pwritev directly.
        cls = type(self)
        self.plain_reads = (
            cls.readinto is FileBackend.readinto and cls.areadinto is FileBackend.areadinto
        )
        self.plain_writes = (
            cls.pwritev is FileBackend.pwritev and cls.apwritev is FileBackend.apwritev
        )

    # ---------------------------------------------------------------- engine
    def offload(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Run a blocking call off the event loop (aiofiles: the default executor)."""
        result: Awaitable[T] = _aio_call(fn, *args)
        return result

    def inline_write_ok(self, nbytes: int) -> bool:
        """Whether an async write of ``nbytes`` may be done inline now: never, here."""
        return False

    def note_inline_write(self, seconds: float) -> None:
        """How long an inline write took (engines that write inline keep score)."""

    # ------------------------------------------------------------------ sync
    def event(self, name: str) -> None:
        """A named point with no I/O of its own (``cluster_alloc``, ``cluster_free``).

        The plain backend does nothing; fault-injection backends may raise here.
        """

    def size(self) -> int:
        try:
            return os.fstat(self.fd).st_size
        except OSError as exc:
            raise _ioerror("fstat", self.path, exc) from exc

    def pread(self, offset: int, length: int, event: str = "read") -> bytes:
        """Read ``length`` bytes; bytes past end of file read as zeros."""
        if self.plain_reads:
            # Straight into the bytes returned (a bytearray copied out would cost two
            # large allocations, which glibc turns into page faults on every call).
            try:
                return _pread_full(self.fd, length, offset)
            except OSError as exc:
                raise _ioerror(f"read ({event})", self.path, exc) from exc
        buf = bytearray(length)
        self.readinto(memoryview(buf), offset, event)
        return bytes(buf)

    def readinto(self, buf: memoryview, offset: int, event: str = "read") -> None:
        """Fill ``buf`` from ``offset``; the part past end of file is zero-filled."""
        done = 0
        total = len(buf)
        while done < total:
            try:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
            except OSError as exc:
                raise _ioerror(f"read ({event})", self.path, exc) from exc
            if n == 0:
                _zero_fill(buf[done:])
                return
            done += n

    def pwritev(self, buffers: Sequence[Buffer], offset: int, event: str = "write") -> None:
        """Write all of ``buffers`` at ``offset``; a short write is retried, then reported."""
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        _pwritev_all(self.fd, views, offset, event, self.path)

    def pwrite(self, data: Buffer, offset: int, event: str = "write") -> None:
        self.pwritev([data], offset, event)

    def flush(self, event: str = "flush") -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise _ioerror(f"flush ({event})", self.path, exc) from exc

    def truncate(self, size: int, event: str = "truncate") -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise _ioerror(f"truncate ({event})", self.path, exc) from exc

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            finally:
                self.fd = -1

    # ----------------------------------------------------------------- async
    def readinto_nowait(self, buf: memoryview | bytearray, offset: int) -> bool:
        """Fill ``buf`` inline if all of it is in the page cache (``RWF_NOWAIT``).

        False when it is not (or the kernel cannot say, or on any error): the
        caller then takes the general path, which blocks in a thread and reports
        errors. For plain backends only (``plain_reads``).
        """
        if not self._nowait:
            return False
        try:
            n = os.preadv(self.fd, [buf], offset, _RWF_NOWAIT)
        except OSError as exc:
            if exc.errno in (_errno.EOPNOTSUPP, _errno.EINVAL):
                self._nowait = False
            return False
        return n == len(buf)

    def pread_nowait(self, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` if all are in the page cache, else None (inline)."""
        if not self._nowait:
            return None
        if length <= 16384:
            # Small: a bytearray (malloc's small-object heap), no pool round trip.
            buf = bytearray(length)
            return bytes(buf) if self.readinto_nowait(buf, offset) else None
        return BUFFERS.read_bytes(lambda view: self.readinto_nowait(view, offset), length)

    async def apread(self, offset: int, length: int, event: str = "read") -> bytes:
        """Read ``length`` bytes (zeros past end of file): inline on a page-cache hit,
        else ``os.pread`` in an I/O thread, straight into the returned bytes."""
        data = self.pread_nowait(offset, length)
        if data is not None:
            return data
        try:
            return await self.offload(_pread_full, self.fd, length, offset)
        except OSError as exc:
            raise _ioerror(f"read ({event})", self.path, exc) from exc

    async def areadinto(self, buf: memoryview, offset: int, event: str = "read") -> None:
        total = len(buf)
        done = 0
        if self._nowait:
            # Page-cache hit: finish inline, no thread hop.
            try:
                done = os.preadv(self.fd, [buf], offset, _RWF_NOWAIT)
            except BlockingIOError:
                done = 0
            except OSError as exc:
                if exc.errno in (_errno.EOPNOTSUPP, _errno.EINVAL):
                    self._nowait = False
                    done = 0
                else:
                    raise _ioerror(f"read ({event})", self.path, exc) from exc
            if done == total:
                return
        while done < total:
            try:
                n = await self.offload(os.preadv, self.fd, [buf[done:]], offset + done)
            except OSError as exc:
                raise _ioerror(f"read ({event})", self.path, exc) from exc
            if n == 0:
                _zero_fill(buf[done:])
                return
            done += n

    async def apwritev(self, buffers: Sequence[Buffer], offset: int, event: str = "write") -> None:
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        if not views:
            return
        if self.inline_write_ok(sum(map(len, views))):
            # Small buffered write: a copy into the page cache, cheaper inline than the
            # hop to a thread and back (see the module docstring).
            t0 = time.monotonic()
            _pwritev_all(self.fd, views, offset, event, self.path)
            self.note_inline_write(time.monotonic() - t0)
            return
        # One hop for the whole write, short-write retries included.
        await self.offload(_pwritev_all, self.fd, views, offset, event, self.path)

    async def aflush(self, event: str = "flush") -> None:
        try:
            await self.offload(os.fdatasync, self.fd)
        except OSError as exc:
            raise _ioerror(f"flush ({event})", self.path, exc) from exc

    async def atruncate(self, size: int, event: str = "truncate") -> None:
        try:
            await self.offload(os.ftruncate, self.fd, size)
        except OSError as exc:
            raise _ioerror(f"truncate ({event})", self.path, exc) from exc


class FastFileBackend(FileBackend):
    """:class:`FileBackend` with the faster async engine (see the module docstring).

    Blocking calls go to :class:`IOThreads` instead of aiofiles, and async writes up
    to ``INLINE_WRITE_MAX`` are done inline on the event loop thread, timed, with a
    back-off to threads when the kernel starts making writes wait. The data path is
    otherwise the same (the same system calls), so the image's fast paths apply.
    Use it with ``qcow2aio.open(path, io_backend=FastFileBackend)``.
    """

    def __init__(self, path: str, writable: bool = False) -> None:
        super().__init__(path, writable)
        # Async writes go to a thread until then (monotonic seconds) after inline ones
        # were slow; _slow_writes counts slow ones in a row.
        self._threaded_until = 0.0
        self._slow_writes = 0

    def offload(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        return to_thread(fn, *args)

    def inline_write_ok(self, nbytes: int) -> bool:
        """Small, and no back-off in force."""
        return nbytes <= INLINE_WRITE_MAX and time.monotonic() >= self._threaded_until

    def note_inline_write(self, seconds: float) -> None:
        if seconds <= INLINE_WRITE_SLOW:
            self._slow_writes = 0
            return
        # Once is usually the loop thread being preempted (~0.2% of writes on a busy
        # machine); twice in a row, or very long, is the kernel making writes wait.
        self._slow_writes += 1
        if self._slow_writes >= 2 or seconds > 25 * INLINE_WRITE_SLOW:
            self._threaded_until = time.monotonic() + INLINE_WRITE_BACKOFF
            self._slow_writes = 0
