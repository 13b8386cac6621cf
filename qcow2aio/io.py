"""Positional file I/O: the one small interface every layer above uses.

All access is ``os.pread``/``os.pwrite`` style (never seek+read on a shared
file object), so concurrent requests cannot disturb each other's position.
Each method takes an ``event`` name in the style of QEMU's blkdebug events
(``l2_load``, ``data_write`` ...): the plain backend ignores it, and the test
backends (fault injection, recording for power-cut simulation) key on it.

The async methods first try a read inline with ``RWF_NOWAIT`` (Linux answers
``EAGAIN`` instead of blocking when the data is not in the page cache) and hop
to a worker thread only on a miss; writes and flushes always go to a thread
(``aiofiles.os.wrap``) because they may block.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Callable, Sequence
from typing import Any

import aiofiles.os

from .errors import Qcow2IOError

Buffer = bytes | bytearray | memoryview
# Opens a file for an image: (path, writable) -> backend. Tests pass recording or
# fault-injecting subclasses of FileBackend through qcow2aio.open(io_backend=...).
BackendFactory = Callable[[str, bool], "FileBackend"]

_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
_apreadv: Any = aiofiles.os.wrap(os.preadv)
_apwritev: Any = aiofiles.os.wrap(os.pwritev)
_afdatasync: Any = aiofiles.os.wrap(os.fdatasync)
_aftruncate: Any = aiofiles.os.wrap(os.ftruncate)


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

    def allocated_bytes(self) -> int:
        try:
            return os.fstat(self.fd).st_blocks * 512
        except OSError as exc:
            raise _ioerror("fstat", self.path, exc) from exc

    def pread(self, offset: int, length: int, event: str = "read") -> bytes:
        """Read ``length`` bytes; bytes past end of file read as zeros."""
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
        pos = offset
        while views:
            try:
                n = os.pwritev(self.fd, views, pos)
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
                n = await _apreadv(self.fd, [buf[done:]], offset + done)
            except OSError as exc:
                raise _ioerror(f"read ({event})", self.path, exc) from exc
            if n == 0:
                _zero_fill(buf[done:])
                return
            done += n

    async def apwritev(self, buffers: Sequence[Buffer], offset: int, event: str = "write") -> None:
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        pos = offset
        while views:
            try:
                n = await _apwritev(self.fd, views, pos)
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

    async def aflush(self, event: str = "flush") -> None:
        try:
            await _afdatasync(self.fd)
        except OSError as exc:
            raise _ioerror(f"flush ({event})", self.path, exc) from exc

    async def atruncate(self, size: int, event: str = "truncate") -> None:
        try:
            await _aftruncate(self.fd, size)
        except OSError as exc:
            raise _ioerror(f"truncate ({event})", self.path, exc) from exc
