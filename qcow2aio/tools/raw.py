"""Raw files for the data movers: a writable raw target, and early writeback.

A raw image has no metadata: guest offset == file offset, and the only allocation
information is the file system's own (``FileBackend.data_runs``: ``SEEK_DATA`` /
``SEEK_HOLE``, as QEMU's file-posix block status).

:class:`RawTarget` is what ``qemu-img convert -O raw`` writes into: the file is
created (or emptied) and set to its size, so every byte starts as a hole; data is
written with ``pwrite`` and zeros that must be stored over old data (``-n``) are
punched out (``fallocate(PUNCH_HOLE)``), or written as zeros where the file system
cannot punch. Reading sources stays with :class:`qcow2aio.backing.RawImage`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

from ..errors import Qcow2IOError, Qcow2RangeError
from ..io import Buffer, FileBackend, to_thread

_ZERO_CHUNK = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range_fn: Any = None


def _libc_sync_file_range() -> Any:
    """libc's ``sync_file_range`` through ctypes (not in Python's ``os``), or None."""
    global _sync_file_range_fn
    if _sync_file_range_fn is None:
        fn: Any = False
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.sync_file_range
            fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            fn.restype = ctypes.c_int
        _sync_file_range_fn = fn
    return _sync_file_range_fn or None


class EarlyWriteback:
    """Starts the kernel's writeback of a file being filled, without waiting for it.

    A mover that writes gigabytes and flushes at the end would otherwise leave all of
    it dirty in the page cache and pay the whole disk write in the final ``fdatasync``.
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` over the whole file every ``step``
    bytes lets the disk work while the copy goes on; it promises nothing about
    durability (the final flush still does). A no-op where libc has no such call.
    """

    def __init__(self, path: str, step: int = 32 << 20) -> None:
        self._step = step
        self._pending = 0
        self._fd = -1
        if _libc_sync_file_range() is not None:
            with contextlib.suppress(OSError):
                self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def _kick(self) -> None:
        fn = _libc_sync_file_range()
        if fn is not None and self._fd >= 0:
            fn(self._fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # a failure only loses the hint

    async def wrote(self, n: int) -> None:
        """Count ``n`` bytes written; every ``step`` bytes, start their writeback (in an
        I/O thread: the call may wait for the device's queue)."""
        if self._fd < 0:
            return
        self._pending += n
        if self._pending >= self._step:
            self._pending = 0
            await to_thread(self._kick)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class RawTarget:
    """A raw file opened for writing by a mover (guest offset == file offset).

    ``create=True`` empties the file (creating it) and sets it to ``size`` bytes, as
    ``qemu-img convert`` creates a raw target: all of it a hole that reads as zeros,
    so zero ranges need not be written at all (``preallocation`` "falloc" reserves the
    blocks, "full" writes zeros over the whole file first, as QEMU's raw driver).
    ``create=False`` opens an existing file (``-n``) and keeps its size.
    """

    format = "raw"

    def __init__(
        self,
        path: str,
        *,
        create: bool = False,
        size: int | None = None,
        preallocation: str = "off",
    ) -> None:
        self.path = path
        if create:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as exc:
                raise Qcow2IOError(
                    f"Could not create '{path}': {exc.strerror}", errno=exc.errno
                ) from exc
            try:
                os.ftruncate(fd, 0)  # QEMU clears the file first: old blocks become holes
                os.ftruncate(fd, size or 0)
                if size and preallocation == "falloc":
                    os.posix_fallocate(fd, 0, size)
                elif size and preallocation == "full":
                    zeros = bytes(min(size, _ZERO_CHUNK))
                    for pos in range(0, size, len(zeros)):
                        os.pwrite(fd, zeros[: size - pos], pos)
                elif size:
                    # As QEMU's file-posix create: the first block is written (with
                    # zeros) so that its alignment probe finds an allocated block.
                    os.pwrite(fd, bytes(min(4096, size)), 0)
            finally:
                os.close(fd)
        self._file = FileBackend(path, writable=True)
        self.size = self._file.size()
        self.cluster_size = 4096
        self.writable = True

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise Qcow2RangeError(
                f"write of {length} bytes at {offset} is outside the raw file ({self.size} bytes)"
            )

    async def write(self, offset: int, data: Buffer) -> int:
        """Write all of ``data`` at ``offset`` (within the file's size)."""
        n = len(memoryview(data))
        self._check(offset, n)
        await self._file.apwritev([data], offset, "data_write")
        return n

    async def writev(self, offset: int, buffers: Sequence[Buffer]) -> int:
        n = sum(len(memoryview(b)) for b in buffers)
        self._check(offset, n)
        await self._file.apwritev(buffers, offset, "data_write")
        return n

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        """Make ``[offset, offset+length)`` read as zeros: a hole when the file system
        can punch one (and ``unmap``), else zeros written in 1 MiB pieces."""
        self._check(offset, length)
        if unmap and self._file.punch_hole(offset, length, "write_zeroes"):
            return
        zeros = bytes(min(length, _ZERO_CHUNK))
        pos = offset
        end = offset + length
        while pos < end:
            n = min(len(zeros), end - pos)
            await self._file.apwritev([memoryview(zeros)[:n]], pos, "write_zeroes")
            pos += n

    def data_runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """The file's data and holes over a range (``FileBackend.data_runs``)."""
        return self._file.data_runs(offset, length)

    async def flush(self) -> None:
        await self._file.aflush("flush")

    def flush_sync(self) -> None:
        self._file.flush("flush")

    def close(self) -> None:
        self._file.close()

    async def aclose(self) -> None:
        self.close()
