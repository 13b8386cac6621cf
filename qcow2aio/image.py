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

import os
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from . import constants as C
from .backing import RAW_FORMATS, RawImage, check_chain, probe_format, resolve_name
from .compression import decompress_cluster
from .errors import (
    ImageBusyError,
    Qcow2CorruptError,
    Qcow2Error,
    Qcow2RangeError,
    Qcow2UnsupportedError,
)
from .io import FileBackend
from .lock import MetaLock
from .mapping import BACKING, COMPRESSED, DATA, ZERO, Extent, map_read
from .metadata import Metadata

Backing = "Image | RawImage"
_ZEROS = bytes(1 << 16)


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
        self._file = FileBackend(self.path, writable=self.writable)
        self._data: FileBackend = self._file
        self.backing: Image | RawImage | None = None
        self.lock = MetaLock()
        self._compressed_cache: tuple[int, bytes] | None = None
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
                self._data = FileBackend(self.data_file_path, writable=self.writable)
            if open_backing and hdr.backing_file is not None:
                self.backing = self._open_backing(hdr.backing_file, hdr.backing_format)
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
            return Image(path, "r", _chain=self._chain)
        if fmt in RAW_FORMATS:
            check_chain(path, self._chain)
            return RawImage(path)
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

    def _run_plan_sync(self, plan: list[Extent], dest: memoryview, base: int) -> None:
        for ext in plan:
            view = dest[ext.guest - base : ext.guest - base + ext.length]
            kind = ext.kind
            if kind == DATA:
                self._data.readinto(view, ext.host, "data_read")
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
        plan = await self._map_for_read(offset, len(buf))
        await self._run_plan(plan, buf, offset)

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

    async def _run_plan(self, plan: list[Extent], dest: memoryview, base: int) -> None:
        for ext in plan:
            view = dest[ext.guest - base : ext.guest - base + ext.length]
            kind = ext.kind
            if kind == DATA:
                await self._data.areadinto(view, ext.host, "data_read")
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
        if self._closed:
            return
        self._closed = True
        self._close_files()

    async def aclose(self) -> None:
        self.close()

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
