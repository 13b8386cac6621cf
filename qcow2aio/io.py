"""Positional file I/O: the one small interface every layer above uses.

All access is ``os.pread``/``os.pwrite`` style (never seek+read on a shared
file object), so concurrent requests cannot disturb each other's position.
Each method takes an ``event`` name in the style of QEMU's blkdebug events
(``l2_load``, ``data_write`` ...): the plain backend ignores it, and the test
backends (fault injection, recording for power-cut simulation) key on it.

**The engine** (one, :class:`FileBackend`; ``FastFileBackend`` is the same class
under its old name). An async request is done inline on the event loop thread
when it cannot block for long, and in a worker thread otherwise:

* reads first try inline with ``RWF_NOWAIT`` (Linux answers ``EAGAIN`` instead of
  blocking when the data is not all in the page cache); a miss, or the rest of a
  partial read, goes to a thread. A large ``await read`` reads straight into the
  ``bytes`` it returns (:func:`_new_bytes`), not into a bounce buffer copied out.
* writes up to ``INLINE_WRITE_MAX`` (a cluster) are done inline: a copy into the
  page cache, a few microseconds, where a round trip through a thread costs
  50-150 us of latency and about as much CPU. They are timed (``RWF_NOWAIT`` for
  buffered writes is refused by ext4 here: ``EOPNOTSUPP``), and slow ones (two in
  a row over 2 ms: dirty-page throttling, a page under writeback) send that
  file's writes back to threads for a second.
* the rest (``fdatasync``, ``ftruncate``, large writes, cache misses) goes through
  ``aiofiles``, the project's async file library, to a ``ThreadPoolExecutor`` owned
  by this module (:func:`blocking_executor`; a forked child gets a fresh one). Never
  the loop's default executor: users run ``asyncio.to_thread(img.write_sync, ...)``
  there, and such calls may block waiting for the image's metadata lock, which a
  request of ours holds until its own I/O (queued behind them) is done. Only the
  blocking rest pays a thread hop at all, and each of those calls is long (an
  ``fdatasync``, a 1 MiB copy, a disk read), so the hop's cost does not show: timed
  here (2 vCPUs), a hop costs 65-75 us at depth 1 and 24-25 us per request at depth 16
  this way, against 45-50 and 5-8 us through :class:`IOThreads` (which batches the
  completions of one worker into one loop wake-up), and 1 MiB writes were the same
  either way within the noise (``docs/performance.md``). :class:`IOThreads` stays for
  CPU work helpers (:func:`parallel_map`: the inflates of compressed reads).

**Hooks for test backends.** Every mode (sync, async inline, async in a thread)
ends in the same few methods, one system call each: :meth:`FileBackend._sys_pread`,
:meth:`~FileBackend._sys_preadv`, :meth:`~FileBackend._sys_pwritev`,
:meth:`~FileBackend._sys_fdatasync` and :meth:`~FileBackend._sys_ftruncate`. They
raise ``OSError`` (the public methods turn it into ``Qcow2IOError``) and may run on
a worker thread. A subclass that overrides only these (and :meth:`FileBackend.event`)
keeps ``plain_reads``/``plain_writes`` and so every fast path the image takes with
the plain backend: the power-cut recorder and the fault injector see exactly the
system calls production makes. Overriding a public I/O method turns the matching
flag off (the image then goes through the public methods only).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno as _errno
import mmap
import os
import queue
import sys
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


_ZEROS = bytes(1 << 16)

# fallocate(2) modes (linux/falloc.h): free the range's blocks, keep the file size.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# Errors that mean "this file (system) cannot punch holes": nothing to do.
_NO_PUNCH = frozenset({_errno.EOPNOTSUPP, _errno.ENOSYS, _errno.EINVAL, _errno.ENOTTY})
_LIBC_FUNCTIONS: dict[str, Any] = {}


def libc_function(name: str, argtypes: tuple[str, ...]) -> Any:
    """libc's ``name`` through ctypes, with ``argtypes`` (names of ctypes types) and
    an ``int`` result, errno kept; None where libc has none. Looked up once. For the
    calls Python's ``os`` lacks (``fallocate`` modes, ``sync_file_range``)."""
    if name not in _LIBC_FUNCTIONS:
        fn: Any = None
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            fn = getattr(ctypes.CDLL(None, use_errno=True), name)
            fn.argtypes = tuple(getattr(ctypes, t) for t in argtypes)
            fn.restype = ctypes.c_int
        _LIBC_FUNCTIONS[name] = fn
    return _LIBC_FUNCTIONS[name]


def _libc_fallocate() -> Any:
    """``fallocate`` (``os.posix_fallocate`` cannot punch), or None."""
    return libc_function("fallocate", ("c_int", "c_int", "c_int64", "c_int64"))


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
    worker that completes several jobs before the loop runs costs one wake-up. The
    inbox refers to its loop weakly: it is the value of a ``WeakKeyDictionary`` keyed
    by that loop, and a strong reference would keep every loop that ever used the
    threads alive (one per ``asyncio.run`` in a thread: a leak found by the thread
    scenarios of issue 10).
    """

    __slots__ = ("__weakref__", "items", "lock", "loop", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)
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
        loop = self.loop()
        if loop is None:  # the loop is gone, and with it everyone who waited
            return
        # RuntimeError: the loop was closed meanwhile, and nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self.drain)

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
                del result
            # An idle worker must not hold its last job: the future's loop (and the
            # caller's buffers) would stay alive until the next job comes along.
            del fn, args, done, fut


_THREADS = IOThreads(max(2, min(4, os.cpu_count() or 1)))
# Threads do not survive fork(): a child starts with an empty pool of its own.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_THREADS._reset)


def to_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Run a blocking call in the I/O threads from a coroutine: ``await to_thread(f, x)``."""
    return _THREADS.submit(fn, *args)


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


# aiofiles' wrapper: ``await _aio_call(fn, *args, executor=...)`` runs fn(*args) there.
_aio_call: Any = aiofiles.os.wrap(_call)
_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def blocking_executor() -> concurrent.futures.ThreadPoolExecutor:
    """qcow2aio's executor for the engine's blocking calls (made on first use)."""
    global _EXECUTOR
    ex = _EXECUTOR
    if ex is None:
        with _EXECUTOR_LOCK:
            ex = _EXECUTOR
            if ex is None:
                ex = _EXECUTOR = concurrent.futures.ThreadPoolExecutor(
                    max_workers=_THREADS.max_threads, thread_name_prefix="qcow2aio-io"
                )
    return ex


def _forget_executor() -> None:
    """In a forked child: the parent's workers do not exist here; make a new one."""
    global _EXECUTOR, _EXECUTOR_LOCK
    _EXECUTOR = None
    _EXECUTOR_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_executor)


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


def _make_new_bytes() -> Callable[[int], tuple[bytes, Any]] | None:
    """A maker of uninitialized ``bytes`` to read into, or None where there is none.

    ``PyBytes_FromStringAndSize(NULL, n)`` is the C API's way to build a ``bytes``
    in place: a new object whose contents the caller fills before anyone else sees
    it. Called through ctypes it lets an inline ``RWF_NOWAIT`` read land straight in
    the ``bytes`` an ``await read`` returns (``os.pread`` does the same internally but
    has no flags argument, so it could block the loop on a page-cache miss). Timed
    here for 1 MiB: 32-33 us against 55 us for a pooled buffer copied out. Only on
    CPython, and only if a self-test at import sees the bytes it wrote.
    """
    if sys.implementation.name != "cpython":
        return None
    try:
        import ctypes

        fn = ctypes.pythonapi.PyBytes_FromStringAndSize
        fn.restype = ctypes.py_object
        fn.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
        data_offset = bytes.__basicsize__ - 1  # ob_sval: the flexible array's start
        char = ctypes.c_char

        def new_bytes(n: int) -> tuple[bytes, Any]:
            # n >= 2: CPython shares the objects of length 0 (and 1 with contents).
            obj: bytes = fn(None, n)
            return obj, (char * n).from_address(id(obj) + data_offset)

        probe, target = new_bytes(4096)
        memoryview(target).cast("B")[:] = bytes(range(256)) * 16
        if probe != bytes(range(256)) * 16:
            return None
        return new_bytes
    except Exception:  # no ctypes, no pythonapi, a different layout: the copying path
        return None


# Large async reads go straight into a new bytes when possible (see above).
_new_bytes = _make_new_bytes()
_NEW_BYTES_MIN = 16385  # below: a bytearray and its copy (malloc's small heap, no ctypes)

# The public I/O methods: a subclass overriding any of them is not plain (see FileBackend).
_READ_API = ("pread", "readinto", "apread", "areadinto", "pread_nowait", "readinto_nowait")
_WRITE_API = ("pwrite", "pwritev", "apwritev", "truncate", "atruncate", "size")


class FileBackend:
    """An open file addressed by offset only; the I/O engine (see the module docstring).

    Test backends subclass it and override the ``_sys_*`` hooks (and :meth:`event`):
    one system call each, reached from every mode, raising ``OSError``.
    """

    def __init__(self, path: str, writable: bool = False) -> None:
        self.path = path
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            raise _ioerror("open", path, exc) from exc
        self._nowait = bool(_RWF_NOWAIT)
        # Async writes go to a thread until then (monotonic seconds) after inline ones
        # were slow; _slow_writes counts slow ones in a row.
        self._threaded_until = 0.0
        self._slow_writes = 0
        # Whether data reads / writes are this class's public methods (the hooks below
        # them may be overridden): only then may the image take its fast paths (which
        # call some of them in place of others) or leave out zero COW past the end of
        # the file.
        cls = type(self)
        self.plain_reads = all(getattr(cls, m) is getattr(FileBackend, m) for m in _READ_API)
        self.plain_writes = all(getattr(cls, m) is getattr(FileBackend, m) for m in _WRITE_API)

    # ------------------------------------------------------------------ hooks
    # One system call each; OSError out. Called on the loop thread (sync and inline
    # async calls) or on an I/O thread (blocking async calls).
    def _sys_pread(self, length: int, offset: int, event: str) -> bytes:
        return os.pread(self.fd, length, offset)

    def _sys_preadv(self, buffers: list[Any], offset: int, event: str, flags: int = 0) -> int:
        """``os.preadv``; ``flags`` is 0 or ``RWF_NOWAIT`` (then ``BlockingIOError`` or a
        short count when not all of it is in the page cache)."""
        if flags:
            return os.preadv(self.fd, buffers, offset, flags)
        return os.preadv(self.fd, buffers, offset)

    def _sys_pwritev(self, buffers: list[memoryview], offset: int, event: str) -> int:
        return os.pwritev(self.fd, buffers, offset)

    def _sys_fdatasync(self, event: str) -> None:
        os.fdatasync(self.fd)

    def _sys_ftruncate(self, size: int, event: str) -> None:
        os.ftruncate(self.fd, size)

    def _sys_fallocate(self, mode: int, offset: int, length: int, event: str) -> None:
        """``fallocate(2)``; OSError out (ENOSYS where libc has none)."""
        fn = _libc_fallocate()
        if fn is None:
            raise OSError(_errno.ENOSYS, "fallocate is not available")
        import ctypes

        if fn(self.fd, mode, offset, length) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    # ---------------------------------------------------------------- engine
    def offload(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Run a blocking call off the event loop: aiofiles, on :func:`blocking_executor`."""
        result: Awaitable[T] = _aio_call(fn, *args, executor=blocking_executor())
        return result

    def inline_write_ok(self, nbytes: int) -> bool:
        """Whether an async write of ``nbytes`` may be done inline now: small, and no
        back-off in force."""
        return nbytes <= INLINE_WRITE_MAX and time.monotonic() >= self._threaded_until

    def note_inline_write(self, seconds: float) -> None:
        """How long an inline write took: two slow ones in a row start the back-off."""
        if seconds <= INLINE_WRITE_SLOW:
            self._slow_writes = 0
            return
        # Once is usually the loop thread being preempted (~0.2% of writes on a busy
        # machine); twice in a row, or very long, is the kernel making writes wait.
        self._slow_writes += 1
        if self._slow_writes >= 2 or seconds > 25 * INLINE_WRITE_SLOW:
            self._threaded_until = time.monotonic() + INLINE_WRITE_BACKOFF
            self._slow_writes = 0

    # ---------------------------------------------------------------- helpers
    def _fill(self, buf: Any, done: int, offset: int, event: str) -> None:
        """Blocking: fill ``buf`` from ``done`` on (zeros past end of file)."""
        view = memoryview(buf).cast("B")
        total = len(view)
        while done < total:
            n = self._sys_preadv([view[done:]], offset + done, event)
            if n == 0:
                _zero_fill(view[done:])
                return
            done += n

    def _fill_owned(self, owner: object, buf: Any, done: int, offset: int, event: str) -> None:
        """:meth:`_fill` of memory that ``owner`` owns (kept alive by this call's frame)."""
        self._fill(buf, done, offset, event)

    def _try_nowait(self, buf: Any, offset: int, event: str) -> int:
        """Bytes read inline with ``RWF_NOWAIT`` (0 when none are cached or the kernel
        cannot say); other errors are raised as ``Qcow2IOError``."""
        if not self._nowait:
            return 0
        try:
            return self._sys_preadv([buf], offset, event, _RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno in (_errno.EOPNOTSUPP, _errno.EINVAL):
                self._nowait = False
                return 0
            raise _ioerror(f"read ({event})", self.path, exc) from exc

    def _pread_full(self, length: int, offset: int, event: str) -> bytes:
        """Blocking: ``length`` bytes at ``offset`` (zeros past end of file)."""
        parts: list[bytes] = []
        have = 0
        while have < length:
            chunk = self._sys_pread(length - have, offset + have, event)
            if not chunk:
                parts.append(bytes(length - have))
                break
            parts.append(chunk)
            have += len(chunk)
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def _pwritev_all(self, views: list[memoryview], pos: int, event: str) -> None:
        """Write all of ``views`` at ``pos``; a short write is retried, then reported."""
        while views:
            try:
                n = self._sys_pwritev(views, pos, event)
            except OSError as exc:
                raise _ioerror(f"write ({event})", self.path, exc) from exc
            if n <= 0:
                raise Qcow2IOError(f"write ({event}) on {self.path!r} wrote nothing", _errno.EIO)
            pos += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]

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

    def data_runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(start, length, is_data)`` runs of ``[offset, offset+length)`` by the file
        system's own record (``SEEK_DATA``/``SEEK_HOLE``): where a raw file holds data
        and where it has holes, as QEMU's file driver reports block status. Past the
        end of the file is a hole; a file system that cannot say reports all data."""
        end = offset + length
        runs: list[tuple[int, int, bool]] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == _errno.ENXIO:  # no data from pos to the end of the file
                    data = end
                elif exc.errno in (_errno.EINVAL, _errno.EOPNOTSUPP):
                    return [(offset, length, True)]
                else:
                    raise _ioerror("lseek", self.path, exc) from exc
            data = min(data, end)
            if data > pos:
                runs.append((pos, data - pos, False))
                pos = data
                if pos >= end:
                    break
            try:
                hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            except OSError as exc:
                raise _ioerror("lseek", self.path, exc) from exc
            if hole <= pos:  # the file changed under us: call the rest data
                hole = end
            runs.append((pos, hole - pos, True))
            pos = hole
        return runs

    def pread(self, offset: int, length: int, event: str = "read") -> bytes:
        """Read ``length`` bytes; bytes past end of file read as zeros."""
        try:
            # Straight into the bytes returned (a bytearray copied out would cost two
            # large allocations, which glibc turns into page faults on every call).
            data = self._sys_pread(length, offset, event)
            if len(data) == length:
                return data
            return data + self._pread_full(length - len(data), offset + len(data), event)
        except OSError as exc:
            raise _ioerror(f"read ({event})", self.path, exc) from exc

    def readinto(self, buf: memoryview, offset: int, event: str = "read") -> None:
        """Fill ``buf`` from ``offset``; the part past end of file is zero-filled."""
        try:
            done = self._sys_preadv([buf], offset, event)
            if done < len(buf):
                self._fill(buf, done, offset, event)
        except OSError as exc:
            raise _ioerror(f"read ({event})", self.path, exc) from exc

    def pwritev(self, buffers: Sequence[Buffer], offset: int, event: str = "write") -> None:
        """Write all of ``buffers`` at ``offset``; a short write is retried, then reported."""
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        self._pwritev_all(views, offset, event)

    def pwrite(self, data: Buffer, offset: int, event: str = "write") -> None:
        self.pwritev([data], offset, event)

    def flush(self, event: str = "flush") -> None:
        try:
            self._sys_fdatasync(event)
        except OSError as exc:
            raise _ioerror(f"flush ({event})", self.path, exc) from exc

    def truncate(self, size: int, event: str = "truncate") -> None:
        try:
            self._sys_ftruncate(size, event)
        except OSError as exc:
            raise _ioerror(f"truncate ({event})", self.path, exc) from exc

    def punch_hole(self, offset: int, length: int, event: str = "punch_hole") -> bool:
        """Give the blocks of ``[offset, offset+length)`` back to the file system (the
        range then reads as zeros; the file size is kept). False when the file system
        cannot punch holes (nothing done); other failures raise Qcow2IOError."""
        return self._fallocate_zeros(FALLOC_FL_PUNCH_HOLE, offset, length, event)

    def zero_range(self, offset: int, length: int, event: str = "zero_range") -> bool:
        """Make ``[offset, offset+length)`` read as zeros keeping its blocks allocated
        (``FALLOC_FL_ZERO_RANGE``: QEMU's zeroing without unmap), without writing
        them. False when the file system cannot (nothing done)."""
        return self._fallocate_zeros(FALLOC_FL_ZERO_RANGE, offset, length, event)

    def _fallocate_zeros(self, mode: int, offset: int, length: int, event: str) -> bool:
        if length <= 0:
            return True
        try:
            self._sys_fallocate(mode | FALLOC_FL_KEEP_SIZE, offset, length, event)
        except OSError as exc:
            if exc.errno in _NO_PUNCH:
                return False
            raise _ioerror(f"fallocate ({event})", self.path, exc) from exc
        return True

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            finally:
                self.fd = -1

    # ----------------------------------------------------------------- async
    def readinto_nowait(
        self, buf: memoryview | bytearray, offset: int, event: str = "data_read"
    ) -> bool:
        """Fill ``buf`` inline if all of it is in the page cache (``RWF_NOWAIT``).

        False when it is not (or the kernel cannot say, or at end of file): the
        caller then takes the general path, which blocks in a thread. An I/O error
        is raised (``Qcow2IOError``), as the general path would.
        """
        return self._try_nowait(buf, offset, event) == len(buf)

    def pread_nowait(self, offset: int, length: int, event: str = "data_read") -> bytes | None:
        """``length`` bytes at ``offset`` if all are in the page cache, else None (inline)."""
        if not self._nowait:
            return None
        if length < _NEW_BYTES_MIN:
            # Small: a bytearray (malloc's small-object heap) and its copy.
            buf = bytearray(length)
            return bytes(buf) if self._try_nowait(buf, offset, event) == length else None
        if _new_bytes is not None:
            obj, target = _new_bytes(length)
            return obj if self._try_nowait(target, offset, event) == length else None
        return BUFFERS.read_bytes(lambda view: self.readinto_nowait(view, offset, event), length)

    async def apread(self, offset: int, length: int, event: str = "read") -> bytes:
        """Read ``length`` bytes (zeros past end of file): inline on a page-cache hit,
        else in an I/O thread, straight into the returned bytes."""
        try:
            if length >= _NEW_BYTES_MIN and _new_bytes is not None:
                obj, target = _new_bytes(length)
                done = self._try_nowait(target, offset, event)
                if done < length:
                    # ``obj`` rides along in the job: a cancelled caller must not free
                    # it while the thread still fills it.
                    await self.offload(self._fill_owned, obj, target, done, offset, event)
                return obj
            data = self.pread_nowait(offset, length, event)
            if data is not None:
                return data
            return await self.offload(self._pread_full, length, offset, event)
        except OSError as exc:
            raise _ioerror(f"read ({event})", self.path, exc) from exc

    async def areadinto(self, buf: memoryview, offset: int, event: str = "read") -> None:
        # Page-cache hit: finish inline, no thread hop; else the rest in a thread.
        done = self._try_nowait(buf, offset, event)
        if done == len(buf):
            return
        try:
            await self.offload(self._fill, buf, done, offset, event)
        except OSError as exc:
            raise _ioerror(f"read ({event})", self.path, exc) from exc

    async def apwritev(self, buffers: Sequence[Buffer], offset: int, event: str = "write") -> None:
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        if not views:
            return
        if self.inline_write_ok(sum(map(len, views))):
            # Small buffered write: a copy into the page cache, cheaper inline than the
            # hop to a thread and back (see the module docstring).
            t0 = time.monotonic()
            self._pwritev_all(views, offset, event)
            self.note_inline_write(time.monotonic() - t0)
            return
        # One hop for the whole write, short-write retries included.
        await self.offload(self._pwritev_all, views, offset, event)

    async def aflush(self, event: str = "flush") -> None:
        try:
            await self.offload(self._sys_fdatasync, event)
        except OSError as exc:
            raise _ioerror(f"flush ({event})", self.path, exc) from exc

    async def atruncate(self, size: int, event: str = "truncate") -> None:
        try:
            await self.offload(self._sys_ftruncate, size, event)
        except OSError as exc:
            raise _ioerror(f"truncate ({event})", self.path, exc) from exc


# The opt-in engine of earlier versions is now the default: the old name stays importable.
FastFileBackend = FileBackend
