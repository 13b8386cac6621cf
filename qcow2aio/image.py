"""The public image object: open, read (sync and async), info, close.

A request goes through two phases (docs/architecture.md):

1. *mapping*: under the metadata lock, or in the synchronous fast path, the
   guest range is turned into a plan of extents (:mod:`qcow2aio.mapping`);
2. *data I/O*: the plan's bytes are moved (pread into the caller's buffer,
   zero-fill, backing read, decompression) without the lock.

The synchronous path runs both phases without ever awaiting; the async path
awaits only in phase 2. Both use the same mapping code.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import os
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

from . import constants as C
from . import testing
from .backing import RAW_FORMATS, RawImage, check_chain, probe_format, resolve_name
from .compression import decompress_cluster
from .errors import (
    ImageBusyError,
    Qcow2CorruptError,
    Qcow2Error,
    Qcow2IOError,
    Qcow2RangeError,
    Qcow2ReadOnlyError,
    Qcow2UnsupportedError,
)
from .inflight import InflightList, L2Meta, NoInflightList
from .io import BackendFactory, Buffer, FileBackend
from .lock import MetaLock, NoLock
from .mapping import BACKING, COMPRESSED, DATA, ZERO, Extent, map_read
from .metadata import Metadata
from .writes import WriteStep, abort_step, commit_step, prepare_write, zero_clusters

Backing = "Image | RawImage"
_ZEROS = bytes(1 << 16)


def _write_event(step: WriteStep) -> str:
    """blkdebug-style name of a step's data write: COW included, or the guest data alone."""
    return "cow_write" if step.head_len or step.tail_len else "data_write"


def _zero(view: memoryview) -> None:
    n = len(view)
    if n <= len(_ZEROS):
        view[:] = _ZEROS[:n]
    else:
        view[:] = bytes(n)


class Image:
    """An open qcow2 image. Use :func:`qcow2aio.open` to make one."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        mode: str = "r",
        *,
        passphrase: str | bytes | None = None,
        l2_cache_size: int | None = None,
        refcount_cache_size: int | None = None,
        open_backing: bool = True,
        io_backend: BackendFactory | None = None,
        _chain: tuple[str, ...] = (),
    ) -> None:
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        self.path = os.fspath(path)
        self.mode = mode
        self.writable = mode == "r+"
        self.format = "qcow2"
        self._closed = True
        self._chain = check_chain(self.path, _chain)
        self._io_backend: BackendFactory = io_backend or FileBackend
        self._file = self._io_backend(self.path, self.writable)
        self._data: FileBackend = self._file
        self.backing: Image | RawImage | None = None
        # qcow2aio.testing.unserialized() turns both off, to prove race tests can fail.
        self.serialized = testing.serialized()
        self.lock: MetaLock = MetaLock() if self.serialized else NoLock()
        self._compressed_cache: tuple[int, bytes] | None = None
        # Requests that hold host offsets from a mapping, by the epoch they started in;
        # a freed cluster is reused only after every older request has finished.
        self._epoch = 0
        self._active: Counter[int] = Counter()
        self._background: set[asyncio.Task[None]] = set()
        self._poisoned: str | None = None
        self._poisoned_errno = _errno.EIO
        try:
            self.meta = Metadata(
                self._file,
                writable=self.writable,
                l2_cache_size=l2_cache_size,
                refcount_cache_size=refcount_cache_size,
            )
            hdr = self.meta.header
            if hdr.crypt_method:
                kind = "AES" if hdr.crypt_method == C.CRYPT_AES else "LUKS"
                raise Qcow2UnsupportedError(
                    f"Encrypted images are not supported yet: crypt_method={hdr.crypt_method} "
                    f"({kind})"
                )
            if self.writable and hdr.corrupt:
                raise Qcow2CorruptError(
                    "Image is corrupt (incompatible bit 1 set); cannot be opened read/write"
                )
            if hdr.data_file is not None:
                self.data_file_path = resolve_name(hdr.data_file, self.path)
                self._data = self._io_backend(self.data_file_path, self.writable)
            if open_backing and hdr.backing_file is not None:
                self.backing = self._open_backing(hdr.backing_file, hdr.backing_format)
            self.inflight: InflightList = (
                InflightList(self.meta.cluster_size)
                if self.serialized
                else NoInflightList(self.meta.cluster_size)
            )
            if self.writable:
                self._open_for_writing()
        except BaseException:
            self._close_files()
            raise
        self._closed = False

    # ------------------------------------------------------------------ open
    def _open_backing(self, name: str, fmt: str | None) -> Image | RawImage:
        path = resolve_name(name, self.path)
        if fmt is None:
            fmt = probe_format(path)
        if fmt == "qcow2":
            return Image(path, "r", io_backend=self._io_backend, _chain=self._chain)
        if fmt in RAW_FORMATS:
            check_chain(path, self._chain)
            return RawImage(path, self._io_backend(path, False))
        raise Qcow2UnsupportedError(f"Unsupported backing file format: backing_format={fmt!r}")

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        return self.meta.header.size

    @property
    def cluster_size(self) -> int:
        return self.meta.cluster_size

    @property
    def header(self) -> Any:
        return self.meta.header

    # -------------------------------------------------------------- mapping
    def _check_range(self, offset: int, length: int) -> None:
        if self._closed:
            raise Qcow2Error(f"image {self.path!r} is closed")
        if offset < 0 or length < 0 or offset + length > self.meta.header.size:
            raise Qcow2RangeError(
                f"request of {length} bytes at offset {offset} is outside the virtual disk "
                f"(size {self.meta.header.size})"
            )

    def map(self, offset: int, length: int) -> list[Extent]:
        """The read plan for a guest range (for tools and tests; no data moved)."""
        self._check_range(offset, length)
        return map_read(self.meta, offset, length, self.backing is not None)

    # ----------------------------------------------------------- sync reads
    def read_sync(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` without ever awaiting."""
        self._check_range(offset, length)
        if self.lock.blocks_readers():
            raise ImageBusyError("metadata is being rewritten by a suspended request")
        plan = map_read(self.meta, offset, length, self.backing is not None)
        if len(plan) == 1 and plan[0].kind == DATA:
            # Fast path: one contiguous host range, one pread, no extra copy.
            try:
                data = os.pread(self._data.fd, length, plan[0].host)
            except OSError:
                data = b""  # let the general path report the error properly
            if len(data) == length:
                return data
        buf = bytearray(length)
        self._run_plan_sync(plan, memoryview(buf), offset)
        return bytes(buf)

    def readinto_sync(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from guest ``offset`` without awaiting."""
        self._check_range(offset, len(buf))
        if self.lock.blocks_readers():
            raise ImageBusyError("metadata is being rewritten by a suspended request")
        plan = map_read(self.meta, offset, len(buf), self.backing is not None)
        self._run_plan_sync(plan, buf, offset)

    def _run_plan_sync(
        self, plan: list[Extent], dest: memoryview, base: int, event: str = "data_read"
    ) -> None:
        for ext in plan:
            view = dest[ext.guest - base : ext.guest - base + ext.length]
            kind = ext.kind
            if kind == DATA:
                self._data.readinto(view, ext.host, event)
            elif kind == ZERO:
                _zero(view)
            elif kind == BACKING:
                self._backing_read_sync(view, ext.guest)
            elif kind == COMPRESSED:
                cluster = self._compressed_sync(ext)
                view[:] = cluster[ext.skip : ext.skip + ext.length]

    def _backing_read_sync(self, view: memoryview, guest: int) -> None:
        assert self.backing is not None
        have = max(0, min(len(view), self.backing.size - guest))
        if have:
            self.backing.readinto_sync(view[:have], guest)
        if have < len(view):
            _zero(view[have:])

    def _compressed_sync(self, ext: Extent) -> bytes:
        cached = self._compressed_cache
        if cached is not None and cached[0] == ext.host:
            return cached[1]
        raw = self._file.pread(ext.host, ext.csize, "read_compressed")
        return self._inflate(ext, raw)

    def _inflate(self, ext: Extent, raw: bytes) -> bytes:
        hdr = self.meta.header
        cluster = decompress_cluster(
            raw, self.meta.cluster_size, hdr.compression_type, f"at host offset {ext.host:#x}"
        )
        self._compressed_cache = (ext.host, cluster)
        return cluster

    # ---------------------------------------------------------- async reads
    async def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at guest ``offset``."""
        buf = bytearray(length)
        await self.readinto(memoryview(buf), offset)
        return bytes(buf)

    async def readv(self, offset: int, buffers: Sequence[bytearray | memoryview]) -> int:
        """Scatter the guest bytes at ``offset`` into writable ``buffers``; returns the count."""
        views = [memoryview(b).cast("B") for b in buffers]
        total = sum(len(v) for v in views)
        self._check_range(offset, total)
        if len(views) == 1:
            await self.readinto(views[0], offset)
            return total
        tmp = bytearray(total)
        await self.readinto(memoryview(tmp), offset)
        pos = 0
        for v in views:
            v[:] = tmp[pos : pos + len(v)]
            pos += len(v)
        return total

    async def readinto(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from guest ``offset``."""
        self._check_range(offset, len(buf))
        # Registered from mapping to the end of the data phase: clusters this plan
        # names are not reused until we are done (see docs/concurrency.md).
        ep = self._enter()
        try:
            plan = await self._map_for_read(offset, len(buf))
            await self._run_plan(plan, buf, offset)
        finally:
            self._leave(ep)

    async def _map_for_read(self, offset: int, length: int) -> list[Extent]:
        # Mapping is synchronous: it runs atomically on the event loop. Only when
        # a lock holder may have left metadata half-updated do we wait for it.
        if self.lock.blocks_readers():
            await self.lock.acquire()
            try:
                return map_read(self.meta, offset, length, self.backing is not None)
            finally:
                self.lock.release()
        return map_read(self.meta, offset, length, self.backing is not None)

    async def _run_plan(
        self, plan: list[Extent], dest: memoryview, base: int, event: str = "data_read"
    ) -> None:
        for ext in plan:
            view = dest[ext.guest - base : ext.guest - base + ext.length]
            kind = ext.kind
            if kind == DATA:
                await self._data.areadinto(view, ext.host, event)
            elif kind == ZERO:
                _zero(view)
            elif kind == BACKING:
                assert self.backing is not None
                have = max(0, min(len(view), self.backing.size - ext.guest))
                if have:
                    await self.backing.readinto(view[:have], ext.guest)
                if have < len(view):
                    _zero(view[have:])
            elif kind == COMPRESSED:
                cached = self._compressed_cache
                if cached is not None and cached[0] == ext.host:
                    cluster = cached[1]
                else:
                    raw = bytearray(ext.csize)
                    await self._file.areadinto(memoryview(raw), ext.host, "read_compressed")
                    cluster = self._inflate(ext, bytes(raw))
                view[:] = cluster[ext.skip : ext.skip + ext.length]

    # ------------------------------------------------------- write set-up
    def _open_for_writing(self) -> None:
        meta = self.meta
        hdr = meta.header
        meta.enable_writes(self._data if self._data is not self._file else None)
        if hdr.dirty:
            # Lazy refcounts left the refcounts stale: rebuild them before any write.
            from .check import check_image

            result = check_image(meta, repair="all")
            if result.error is not None or result.corruptions:
                raise Qcow2CorruptError(
                    f"Could not repair dirty image: {result.error or ''} "
                    f"({result.corruptions} corruptions remain)"
                )
            meta.reload_refcounts()
            hdr.incompatible_features &= ~C.INCOMPAT_DIRTY
            self._file.pwrite(struct.pack(">Q", hdr.incompatible_features), 72, "header_update")
            self._file.flush("header_update")
            assert meta.writeback is not None
            meta.writeback.dirty_on_disk = False
        # Autoclear bits we do not maintain (bitmaps, unknown) must be cleared before the
        # first write, or another reader would trust data we are about to change.
        keep = hdr.autoclear_features & C.AUTOCLEAR_DATA_FILE_RAW
        if hdr.autoclear_features != keep or (
            hdr.version >= 3 and self._on_disk_autoclear() != keep
        ):
            hdr.autoclear_features = keep
            self._file.pwrite(struct.pack(">Q", keep), 88, "header_update")
            self._file.flush("header_update")

    def _on_disk_autoclear(self) -> int:
        value: int = struct.unpack(">Q", self._file.pread(88, 8, "header_read"))[0]
        return value

    def _check_writable(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        if not self.writable:
            raise Qcow2ReadOnlyError(f"image {self.path!r} is opened read-only")
        if self.meta.header.corrupt:
            raise Qcow2CorruptError(f"image {self.path!r} is marked corrupt; writes refused")
        if self._is_poisoned():
            raise Qcow2IOError(
                f"image {self.path!r} refuses writes after a failed flush ({self._poisoned}); "
                "reopen it",
                self._poisoned_errno,
            )

    def _is_poisoned(self) -> bool:
        """True after a failed flush: of a flush request, or inside an eviction or a
        refcount-table growth (``meta.flush_error``). Sticky until the image is reopened."""
        if self._poisoned is None and self.meta.flush_error is not None:
            self._poison(self.meta.flush_error)
        return self._poisoned is not None

    def _poison(self, exc: Qcow2Error) -> None:
        self._poisoned = str(exc)
        self._poisoned_errno = getattr(exc, "errno", None) or _errno.EIO

    # ------------------------------------------------- request bookkeeping
    def _enter(self) -> int:
        ep = self._epoch
        self._active[ep] += 1
        return ep

    def _leave(self, ep: int) -> None:
        self._active[ep] -= 1
        if not self._active[ep]:
            del self._active[ep]

    def retire_epoch(self) -> int:
        """Tag for a cluster being unlinked now: requests up to this epoch may still use it."""
        ep = self._epoch
        self._epoch += 1
        return ep

    def _oldest_active(self) -> int | None:
        return min(self._active) if self._active else None

    # ------------------------------------------------------- async writes
    async def write(self, offset: int, data: Buffer) -> int:
        """Write ``data`` at guest ``offset``; returns the number of bytes written."""
        view = memoryview(data).cast("B")
        n = len(view)
        self._check_writable(offset, n)
        ep = self._enter()
        try:
            pos = 0
            while pos < n:
                await self.lock.acquire()
                try:
                    step = prepare_write(self, offset + pos, n - pos)
                finally:
                    self.lock.release()
                if isinstance(step, L2Meta):
                    await step.wait()
                    continue
                # The data phase and the link run to completion even if we are cancelled:
                # an allocation must be either linked or freed, never left in flight.
                task = asyncio.ensure_future(self._finish_step(step, view[pos : pos + step.length]))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                await asyncio.shield(task)
                pos += step.length
        finally:
            self._leave(ep)
        return n

    async def writev(self, offset: int, buffers: Sequence[Buffer]) -> int:
        """Gather ``buffers`` and write them at guest ``offset``."""
        if len(buffers) == 1:
            return await self.write(offset, buffers[0])
        return await self.write(offset, b"".join(buffers))

    async def _finish_step(self, step: WriteStep, chunk: memoryview) -> None:
        try:
            bufs: list[Buffer] = []
            if step.head_len:
                head = bytearray(step.head_len)
                await self._run_plan(
                    step.head, memoryview(head), step.guest - step.head_len, "cow_read"
                )
                bufs.append(head)
            bufs.append(chunk)
            if step.tail_len:
                tail = bytearray(step.tail_len)
                await self._run_plan(
                    step.tail, memoryview(tail), step.guest + step.length, "cow_read"
                )
                bufs.append(tail)
            start = step.host - step.head_len
            self._check_data_write(start, step.head_len + step.length + step.tail_len)
            await self._data.apwritev(bufs, start, _write_event(step))
        except BaseException:
            await self.lock.acquire()
            try:
                abort_step(self, step)
            finally:
                self.lock.release()
            raise
        await self.lock.acquire()
        try:
            commit_step(self, step)
        finally:
            self.lock.release()

    def _check_data_write(self, host: int, length: int) -> None:
        if self._data is self._file:
            self.meta.check_data_write(host, length)

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros.

        On v3 images whole clusters (subclusters with extended L2) get the zero
        flag and, with ``unmap``, their host clusters are freed; the unaligned
        rest, and everything on v2 images, is written as zeros.
        """
        self._check_writable(offset, length)
        head, mid, tail = self._split_aligned(offset, length, for_discard=False)
        if mid[1]:
            extra = await self._zero_locked(mid[0], mid[1], unmap=unmap, discard=False)
        else:
            extra = []
        for off, n in (head, tail, *extra):
            if n:
                await self.write(off, bytes(n))

    async def discard(self, offset: int, length: int) -> None:
        """Discard whole clusters in the range (v3: they read as zeros; host clusters freed).

        Like QEMU, unaligned parts are ignored, and on a v2 image with a backing
        file discard does nothing (there is no way to hide the backing data).
        """
        self._check_writable(offset, length)
        if self.meta.version < 3 and self.backing is not None:
            return
        _, mid, _ = self._split_aligned(offset, length, for_discard=True)
        if mid[1]:
            await self._zero_locked(mid[0], mid[1], unmap=True, discard=True)

    def _split_aligned(
        self, offset: int, length: int, *, for_discard: bool
    ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """Split into unaligned head, aligned middle, unaligned tail (granule = cluster).

        The last cluster counts as whole when the range runs to the end of the image.
        """
        gran = self.meta.cluster_size
        end = offset + length
        if self.meta.version < 3 and not for_discard:
            return (offset, length), (end, 0), (end, 0)
        a = (offset + gran - 1) & ~(gran - 1)
        b = end & ~(gran - 1)
        if end == self.size:
            b = (end + gran - 1) & ~(gran - 1)
        if b <= a:
            return (offset, length), (end, 0), (end, 0)
        mid_end = min(b, end)
        return (offset, a - offset), (a, b - a), (mid_end, end - mid_end)

    async def _zero_locked(
        self, offset: int, length: int, *, unmap: bool, discard: bool
    ) -> list[tuple[int, int]]:
        ep = self._enter()
        try:
            while True:
                await self.lock.acquire()
                try:
                    blocker = self.inflight.overlapping(offset, length)
                    if blocker is None:
                        return zero_clusters(
                            self, offset, offset + length, unmap=unmap, discard=discard
                        )
                finally:
                    self.lock.release()
                await blocker.wait()
        finally:
            self._leave(ep)

    async def flush(self) -> None:
        """Make every write acknowledged so far durable (data, then metadata, in order)."""
        if self._closed:
            raise Qcow2Error(f"image {self.path!r} is closed")
        if not self.writable:
            return
        await self.lock.acquire(readers_ok=True)
        try:
            await self._drive_async(self._flush_steps())
        finally:
            self.lock.release()

    def _flush_steps(self) -> Iterator[str]:
        assert self.meta.writeback is not None and self.meta.allocator is not None
        if self._is_poisoned():
            raise Qcow2IOError(
                f"image {self.path!r} failed an earlier flush; reopen it", self._poisoned_errno
            )
        yield from self.meta.writeback.flush_steps()
        self.meta.allocator.apply_frees(self._oldest_active())

    async def _drive_async(self, steps: Iterator[str]) -> None:
        try:
            for event in steps:
                if self._data is not self._file:
                    await self._data.aflush(event)
                await self._file.aflush(event)
        except Qcow2Error as exc:
            self._poison(exc)
            raise

    def _drive_sync(self, steps: Iterator[str]) -> None:
        try:
            for event in steps:
                self.meta.flush_files(event)
        except Qcow2Error as exc:
            self._poison(exc)
            raise

    # -------------------------------------------------------- sync writes
    def _take_sync(self) -> None:
        if not self.lock.try_acquire():
            raise ImageBusyError("metadata lock is held by a suspended request")

    def write_sync(self, offset: int, data: Buffer) -> int:
        """Write without ever awaiting; raises ImageBusyError (having changed nothing)
        if the lock is held or an in-flight allocation overlaps the range."""
        view = memoryview(data).cast("B")
        n = len(view)
        self._check_writable(offset, n)
        self._take_sync()
        ep = self._enter()
        try:
            if self.inflight.overlapping(offset, n) is not None:
                raise ImageBusyError(
                    f"an in-flight allocation overlaps the write at {offset} (+{n})"
                )
            pos = 0
            while pos < n:
                step = prepare_write(self, offset + pos, n - pos)
                assert not isinstance(step, L2Meta)
                self._finish_step_sync(step, view[pos : pos + step.length])
                pos += step.length
        finally:
            self._leave(ep)
            self.lock.release()
        return n

    def writev_sync(self, offset: int, buffers: Sequence[Buffer]) -> int:
        if len(buffers) == 1:
            return self.write_sync(offset, buffers[0])
        return self.write_sync(offset, b"".join(buffers))

    def _finish_step_sync(self, step: WriteStep, chunk: memoryview) -> None:
        try:
            bufs: list[Buffer] = []
            if step.head_len:
                head = bytearray(step.head_len)
                self._run_plan_sync(
                    step.head, memoryview(head), step.guest - step.head_len, "cow_read"
                )
                bufs.append(head)
            bufs.append(chunk)
            if step.tail_len:
                tail = bytearray(step.tail_len)
                self._run_plan_sync(
                    step.tail, memoryview(tail), step.guest + step.length, "cow_read"
                )
                bufs.append(tail)
            start = step.host - step.head_len
            self._check_data_write(start, step.head_len + step.length + step.tail_len)
            self._data.pwritev(bufs, start, _write_event(step))
        except BaseException:
            abort_step(self, step)
            raise
        commit_step(self, step)

    def flush_sync(self) -> None:
        """Synchronous flush; raises ImageBusyError if the metadata lock is held."""
        if self._closed:
            raise Qcow2Error(f"image {self.path!r} is closed")
        if not self.writable:
            return
        self._take_sync()
        try:
            self._drive_sync(self._flush_steps())
        finally:
            self.lock.release()

    # ---------------------------------------------------------------- check
    def check(self, repair: str | None = None) -> dict[str, Any]:
        """The counts of ``qemu-img check --output=json`` (flushes a writable image first)."""
        from .check import check_image

        if repair is not None and not self.writable:
            raise Qcow2ReadOnlyError("repair needs an image opened with mode 'r+'")
        if self.writable:
            self.flush_sync()
        self._take_sync()
        try:
            result = check_image(self.meta, repair=repair)
            if repair is not None:
                self.meta.reload_refcounts()
        finally:
            self.lock.release()
        return result.to_json(self.path)

    # ----------------------------------------------------------------- info
    def info(self) -> dict[str, Any]:
        """The keys and values of ``qemu-img info --output=json`` for this image."""
        from .info import image_info

        return image_info(self)

    # ---------------------------------------------------------------- close
    def _close_files(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self._data is not self._file:
            self._data.close()
        self._file.close()

    def close(self) -> None:
        """Flush (a writable image), mark it clean, and close the files."""
        if self._closed:
            return
        try:
            if self.writable and not self._is_poisoned() and not self.meta.header.corrupt:
                self._take_sync()
                try:
                    assert self.meta.writeback is not None
                    self._drive_sync(self._close_steps())
                finally:
                    self.lock.release()
        finally:
            self._closed = True
            self._close_files()

    def _close_steps(self) -> Iterator[str]:
        assert self.meta.writeback is not None and self.meta.allocator is not None
        yield from self._flush_steps()
        yield from self.meta.writeback.close_steps()

    async def aclose(self) -> None:
        """Wait for requests still finishing, then close like :meth:`close`."""
        if self._closed:
            return
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        try:
            if self.writable and not self._is_poisoned() and not self.meta.header.corrupt:
                await self.lock.acquire()
                try:
                    await self._drive_async(self._close_steps())
                finally:
                    self.lock.release()
        finally:
            self._closed = True
            self._close_files()

    def __enter__(self) -> Image:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Image:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.mode
        return f"<qcow2aio.Image {self.path!r} {state} size={self.meta.header.size}>"
