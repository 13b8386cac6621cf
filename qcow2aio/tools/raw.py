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

from .. import constants as C
from ..backing import RawImage
from ..errors import Qcow2IOError, Qcow2RangeError, Qcow2ReadOnlyError
from ..io import Buffer, FileBackend, libc_function, to_thread

_ZERO_CHUNK = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _libc_sync_file_range() -> Any:
    """libc's ``sync_file_range`` (not in Python's ``os``), or None."""
    return libc_function("sync_file_range", ("c_int", "c_int64", "c_int64", "c_uint"))


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


class RawTarget(RawImage):
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
        discard: str = "unmap",
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
        super().__init__(path, FileBackend(path, writable=True))
        self.cluster_size = 4096
        self.writable = True
        # QEMU's discard= option: "ignore" (qemu-nbd's default) makes discards do
        # nothing; may-unmap zeroing punches either way (as QEMU's raw files do).
        self.discard_mode = discard
        # A file whose format was probed, not named: no write may give it a head
        # that probes as qcow2 (QEMU's "writes on block 0 will be restricted").
        self.probed = False

    def _guard_head(self, offset: int, buffers: Sequence[Buffer]) -> None:
        """Refuse a write that would make the first bytes probe as qcow2 (the magic
        and a version of 2 or more, QEMU's qcow2 probe); the only format probed."""
        if not self.probed or offset >= 8:
            return
        head = bytearray(self._file.pread(0, min(8, self.size), "probe"))
        new = b"".join(bytes(memoryview(b)) for b in buffers)[: 8 - offset]
        head[offset : offset + len(new)] = new
        if (
            len(head) == 8
            and int.from_bytes(head[:4], "big") == C.QCOW_MAGIC
            and int.from_bytes(head[4:], "big") >= 2
        ):
            raise Qcow2ReadOnlyError(
                f"write at offset {offset} would give the probed raw file "
                f"{self.path!r} a qcow2 header: refused (name the format to allow it)"
            )

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise Qcow2RangeError(
                f"write of {length} bytes at {offset} is outside the raw file ({self.size} bytes)"
            )

    async def write(self, offset: int, data: Buffer) -> int:
        """Write all of ``data`` at ``offset`` (within the file's size)."""
        n = len(memoryview(data))
        self._check(offset, n)
        self._guard_head(offset, [data])
        await self._file.apwritev([data], offset, "data_write")
        return n

    async def writev(self, offset: int, buffers: Sequence[Buffer]) -> int:
        n = sum(len(memoryview(b)) for b in buffers)
        self._check(offset, n)
        self._guard_head(offset, buffers)
        await self._file.apwritev(buffers, offset, "data_write")
        return n

    async def write_zeroes(
        self, offset: int, length: int, *, unmap: bool = True, fast: bool = False
    ) -> bool:
        """Make ``[offset, offset+length)`` read as zeros: a hole when the file system
        can punch one (and ``unmap``), else a zeroed range (``FALLOC_FL_ZERO_RANGE``),
        else zeros written in 1 MiB pieces — unless ``fast`` (NBD's ``FAST_ZERO``),
        which does nothing and returns False where only writing would do."""
        self._check(offset, length)
        if unmap and self._file.punch_hole(offset, length, "write_zeroes"):
            return True
        if self._file.zero_range(offset, length, "write_zeroes"):
            return True
        if fast:
            return False
        zeros = bytes(min(length, _ZERO_CHUNK))
        pos = offset
        end = offset + length
        while pos < end:
            n = min(len(zeros), end - pos)
            await self._file.apwritev([memoryview(zeros)[:n]], pos, "write_zeroes")
            pos += n
        return True

    async def discard(self, offset: int, length: int) -> None:
        """With ``discard="unmap"``, give ``[offset, offset+length)`` back to the file
        system where it can punch holes (the range then reads as zeros); otherwise,
        or where it cannot, a discard is only advice and nothing is done."""
        self._check(offset, length)
        if self.discard_mode == "unmap":
            self._file.punch_hole(offset, length, "discard")
