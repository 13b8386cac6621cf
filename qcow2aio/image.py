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
import contextvars
import errno as _errno
import os
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

from . import constants as C
from . import testing
from .backing import RAW_FORMATS, RawImage, check_chain, probe_format, resolve_name
from .bitmaps import BitmapSet
from .compressed_write import check_compressed_write, prepare_compressed
from .compression import compress_cluster, decompress_cluster
from .crypto.payload import SECTOR_MASK, PayloadCrypto, open_crypto
from .errors import (
    ImageBusyError,
    Qcow2CorruptError,
    Qcow2Error,
    Qcow2IOError,
    Qcow2PassphraseError,
    Qcow2RangeError,
    Qcow2ReadOnlyError,
    Qcow2UnsupportedError,
    WaitTimeoutError,
)
from .inflight import (
    InflightList,
    L2Meta,
    NoInflightList,
    NoSectorRanges,
    SectorRange,
    SectorRanges,
)
from .io import BUFFERS, BackendFactory, Buffer, FileBackend, parallel_map, to_thread
from .lock import BUSY, MetaLock, NoLock, Wakeup, running_loop
from .mapping import (
    BACKING,
    COMPRESSED,
    DATA,
    UNALLOCATED,
    ZERO,
    Extent,
    map_plain,
    map_read,
    plan_is_zero,
)
from .metadata import Metadata
from .writes import WriteStep, abort_step, commit_step, mark_dirty, prepare_write, zero_clusters

Backing = "Image | RawImage"
# I/O threads that help the caller inflate the clusters of one synchronous read (zlib
# and zstd release the GIL, so two threads inflate about twice as fast). The sync path
# stays synchronous: the helpers only inflate bytes already read (no metadata, nothing
# of other requests), and parallel_map returns or raises only after every helper that
# started has finished, a signal's exception included (tests/test_parallel_map.py).
_INFLATE_HELPERS = 1
_ZEROS = bytes(1 << 16)
# Answers of Image._fast_source / locate: a (file, host offset) pair, or one of these.
_ZERO_RUN: tuple[FileBackend | None, int] = (None, 0)  # reads as zeros
_T = TypeVar("_T")
_NO_FAST: tuple[FileBackend | None, int] = (None, -1)  # take the general path (a plan)
# locate()'s per-cluster cache of a read-only image: entries (a bound on its memory,
# about 4 MiB), and the codes that are not "host | file index".
_LOCATED_MAX = 1 << 15
_LOC_ZERO = -2
_LOC_OTHER = -1
# A read's mapping and, when it is a page-cache hit this small, its data too, in one
# admission (no registration needed: see Image._map_now). Larger reads register and
# move their data after the admission, not to hold the lock for a long copy.
_INLINE_READ_MAX = 64 << 10
# Encrypted runs at least this long are encrypted/decrypted in an I/O thread by the
# async path (smaller ones cost less than the thread hop).
_CRYPT_OFFLOAD = 256 << 10
# _map_now's answer: (epoch or -1, file, host, plan, inline result).
Mapped = tuple[int, "FileBackend | None", int, "list[Extent] | None", Any]
# How long a synchronous call in a thread without an event loop waits (for the metadata
# lock, an overlapping in-flight allocation, a drain) before WaitTimeoutError: long
# enough for any flush, short enough that a holder that can never finish (a coroutine
# of a loop that stopped running) does not hang the thread forever.
DEFAULT_WAIT_TIMEOUT = 60.0

# The image whose admission gate (Image._admit) the running request has already passed:
# a sub-request it makes while holding something a drained request may wait for (a
# sub-sector write's reads, holding its sectors) must not wait at the gate again.
_ADMITTED: contextvars.ContextVar[Image | None] = contextvars.ContextVar(
    "qcow2aio_admitted", default=None
)


def _write_event(step: WriteStep) -> str:
    """blkdebug-style name of a step's data write: COW included, or the guest data alone."""
    return "cow_write" if step.head_len or step.tail_len else "data_write"


def _zeros(n: int) -> Buffer:
    """``n`` zero bytes to write, without allocating when they fit in ``_ZEROS``."""
    return memoryview(_ZEROS)[:n] if n <= len(_ZEROS) else bytes(n)


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
        backing_passphrase: str | bytes | Sequence[str | bytes | None] | None = None,
        metadata_only: bool = False,
        l2_cache_size: int | None = None,
        refcount_cache_size: int | None = None,
        open_backing: bool = True,
        io_backend: BackendFactory | None = None,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
        discard: str = "unmap",
        _chain: tuple[str, ...] = (),
    ) -> None:
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        if discard not in ("unmap", "ignore"):
            raise ValueError(f"discard must be 'unmap' or 'ignore', not {discard!r}")
        # QEMU's ``discard=`` block option. "unmap" (what qemu-io and qemu-img open
        # with): discards free clusters, and clusters freed by discard or write-zeroes
        # with unmap are punched from the file once the free is applied. "ignore":
        # discards do nothing at all; write-zeroes still unmaps in the metadata but
        # nothing is punched.
        self.discard_mode = discard
        if metadata_only and mode != "r":
            raise ValueError("metadata_only needs mode 'r'")
        if not wait_timeout > 0:
            raise ValueError(f"wait_timeout must be positive, not {wait_timeout!r}")
        self.path = os.fspath(path)
        self.mode = mode
        self.writable = mode == "r+"
        self.wait_timeout = float(wait_timeout)
        # How long an async reader may block its loop's thread for the lock: only on a
        # read-only image, whose lock is only ever held for a mapping (never across an
        # await), may it wait; a writable image's holder may be a suspended coroutine.
        self._reader_wait: float | None = None if self.writable else self.wait_timeout
        self.format = "qcow2"
        self._closed = True
        self._chain = check_chain(self.path, _chain)
        self._io_backend: BackendFactory = io_backend or FileBackend
        self._file = self._io_backend(self.path, self.writable)
        self._data: FileBackend = self._file
        self.backing: Image | RawImage | None = None
        # qcow2aio.testing.unserialized() turns both off, to prove race tests can fail.
        self.serialized = testing.serialized()
        self.lock: MetaLock = MetaLock(repr(self.path)) if self.serialized else NoLock()
        self._compressed_cache: tuple[int, bytes] | None = None
        # locate(): guest cluster -> host | index into _located_files (read-only images).
        self._located: dict[int, int] = {}
        self._located_files: list[FileBackend] = []
        # Requests that hold host offsets from a mapping, by the epoch they started in;
        # a freed cluster is reused only after every older request has finished. All of
        # it (and the idle waiters) under _reqs_mutex: requests come from any thread.
        self._reqs_mutex = threading.Lock()
        self._epoch = 0
        self._active: dict[int, int] = {}
        self._nreq = 0
        self._background: set[asyncio.Task[None]] = set()
        # aclose() (and close() in a thread without a loop) drains like QEMU before
        # closing: from its start new requests are refused, and it waits until no
        # request is in flight (woken in its own loop or thread).
        self._closing = False
        self._idle_waiters: list[Wakeup] = []
        # Exclusive operations draining or running (Image._exclusive): while there is
        # one, new requests wait at the gate (_admit) so that the drain ends.
        self._ops_gated = 0
        self._gate_waiters: list[Wakeup] = []
        self._poisoned: str | None = None
        self._poisoned_errno = _errno.EIO
        self._backing_passphrase = backing_passphrase
        self._metadata_only = metadata_only
        # Encrypted images: the payload cipher (None for plain images). Every data read
        # and write goes through it; the plain fast paths are off (``_plain_reads``).
        self._crypto: PayloadCrypto | None = None
        # The external data file (header extension), resolved; None when the data lie
        # in the image file itself.
        self.data_file_path: str | None = None
        # Writes in progress on an encrypted image, so that a sub-sector write's
        # read-modify-write excludes every request on its sectors (None: plain image).
        self._ranges: SectorRanges | None = None
        # One LUKS keyslot change at a time (taken before the metadata lock; its PBKDF2
        # runs under this lock only, so I/O goes on meanwhile).
        self._keyslot_lock = MetaLock(f"{self.path!r} (keyslots)")
        # Persistent dirty bitmaps: loaded at a read-write open (and maintained), on
        # first use otherwise (qcow2aio/bitmaps.py).
        self._bitmaps: BitmapSet | None = None
        try:
            self.meta = Metadata(
                self._file,
                writable=self.writable,
                l2_cache_size=l2_cache_size,
                refcount_cache_size=refcount_cache_size,
            )
            hdr = self.meta.header
            if hdr.crypt_method:
                self._crypto = open_crypto(
                    hdr.crypt_method,
                    hdr.crypto_area,
                    lambda off, n: self._file.pread(off, n, "crypto_read"),
                    passphrase,
                    path=self.path,
                    metadata_only=metadata_only,
                )
            if self.writable and hdr.corrupt:
                raise Qcow2CorruptError(
                    "Image is corrupt (incompatible bit 1 set); cannot be opened read/write"
                )
            if hdr.data_file is not None:
                self.data_file_path = resolve_name(hdr.data_file, self.path)
                if not os.path.isabs(hdr.data_file) and not os.path.exists(self.data_file_path):
                    # QEMU 7.2 opens a relative data-file name from the current directory
                    # (and `qemu-img create` puts it there); the image's folder comes first.
                    self.data_file_path = os.path.abspath(hdr.data_file)
                self._data = self._io_backend(self.data_file_path, self.writable)
            if open_backing and hdr.backing_file is not None:
                self.backing = self._open_backing(hdr.backing_file, hdr.backing_format)
            self.inflight: InflightList = (
                InflightList(self.meta.cluster_size)
                if self.serialized
                else NoInflightList(self.meta.cluster_size)
            )
            if self._crypto is not None and self.writable:
                self._ranges = SectorRanges() if self.serialized else NoSectorRanges()
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
            secret = self._backing_passphrase
            below: str | bytes | Sequence[str | bytes | None] | None = secret
            if secret is not None and not isinstance(secret, str | bytes):
                # One passphrase per depth: the first is the backing file's own.
                seq = list(secret)
                secret, below = (seq[0], seq[1:]) if seq else (None, None)
            return Image(
                path,
                "r",
                passphrase=secret,
                backing_passphrase=below,
                metadata_only=self._metadata_only,
                io_backend=self._io_backend,
                wait_timeout=self.wait_timeout,
                _chain=self._chain,
            )
        if fmt in RAW_FORMATS:
            check_chain(path, self._chain)
            return RawImage(path, self._io_backend(path, False))
        raise Qcow2UnsupportedError(f"Unsupported backing file format: backing_format={fmt!r}")

    # The fast paths that move guest bytes without looking at them: asked of the data
    # file each time (a test backend may turn its fast paths off after the open).
    @property
    def _plain_reads(self) -> bool:
        return self._crypto is None and self._data.plain_reads

    @property
    def _plain_writes(self) -> bool:
        return self._crypto is None and self._data.plain_writes

    @property
    def size(self) -> int:
        """Virtual size in bytes: the header's, rounded down to whole 512-byte sectors as
        QEMU does (it counts the disk in sectors)."""
        return self.meta.header.size & ~511

    @property
    def cluster_size(self) -> int:
        return self.meta.cluster_size

    @property
    def header(self) -> Any:
        return self.meta.header

    # -------------------------------------------------------------- mapping
    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise Qcow2Error(f"image {self.path!r} is {'closed' if self._closed else 'closing'}")

    def _check_range(self, offset: int, length: int) -> None:
        self._check_open()
        size = self.meta.header.size & ~511
        if offset < 0 or length < 0 or offset + length > size:
            raise Qcow2RangeError(
                f"request of {length} bytes at offset {offset} is outside the virtual disk "
                f"(size {size})"
            )
        if self._crypto is not None:
            self._crypto.check_usable()  # opened for metadata only: no passphrase

    def _check_size(self, offset: int, length: int, *, whole_clusters: bool = False) -> None:
        """Under the lock: the range is still inside the disk (a shrink may have run
        between the request's first check and its turn for the lock). With
        ``whole_clusters`` the last cluster counts whole (zeroing to the end)."""
        size = self.meta.header.size & ~511
        if whole_clusters:
            cs = self.meta.cluster_size
            size = (size + cs - 1) & ~(cs - 1)
        if offset + length > size:
            raise Qcow2RangeError(
                f"request of {length} bytes at offset {offset} is outside the virtual disk "
                f"(size {size}, shrunk while the request waited)"
            )

    def _check_still_open(self) -> None:
        """After waiting for the lock: the image may have been closed meanwhile."""
        if self._closed:
            raise Qcow2Error(f"image {self.path!r} was closed while the request was in flight")

    def plan(self, offset: int, length: int) -> list[Extent]:
        """This layer's read plan for a guest range (for tools and tests; no data
        moved): DATA / ZERO / COMPRESSED runs, and BACKING where no cluster of this
        image holds the range (the backing file's part, or zeros without one)."""
        self._check_range(offset, length)
        return self._plan_sync(offset, length)

    def _count_refcounted(self, limit: int) -> int:
        """Clusters with a nonzero refcount, up to the end of the file (the count
        stops once it passes ``limit``): block status's metadata-preallocation test."""
        how = self.lock.enter_read(self._sync_wait())
        if how == BUSY:
            raise ImageBusyError("metadata is being changed by a suspended request")
        try:
            meta = self.meta
            clusters = -(-self._file.size() // meta.cluster_size)
            per_block = 1 << (meta.cluster_bits + 3 - meta.header.refcount_order)
            count = 0
            for rt_index in range(-(-clusters // per_block)):
                block = meta.refblock(rt_index)
                if block is None:
                    continue
                entries = block.decode(min(per_block, clusters - rt_index * per_block))
                count += len(entries) - entries.count(0)
                if count > limit:
                    break
            return count
        finally:
            self.lock.exit_read(how)

    def map_sync(self, offset: int = 0, length: int | None = None) -> list[dict[str, Any]]:
        """``qemu-img map --output=json``'s records for ``[offset, offset+length)`` (to
        the end by default): allocation, zeros and host offsets down the backing chain
        (see :mod:`qcow2aio.blockstatus`)."""
        from .blockstatus import block_status

        self._check_open()
        return [st.record() for st in block_status(self, offset, length)]

    async def map(self, offset: int = 0, length: int | None = None) -> list[dict[str, Any]]:
        """:meth:`map_sync` for a coroutine: the walk runs on a worker thread, so it
        may wait for the metadata lock a request of this loop holds."""
        from .blockstatus import block_status_async

        self._check_open()
        return [st.record() for st in await block_status_async(self, offset, length)]

    # ------------------------------------------------------------ admission
    def _sync_wait(self) -> float | None:
        """How long a synchronous call may wait for the lock here: None (never) in a
        thread that runs an event loop, on a writable image, where the holder may be a
        suspended coroutine of this very loop; else the image's ``wait_timeout``."""
        if self.writable and running_loop() is not None:
            return None
        return self.wait_timeout

    def _map_now(
        self,
        offset: int,
        length: int,
        wait: float | None,
        into: memoryview | None = None,
        inline: bool = False,
    ) -> Mapped | None:
        """Map a read, admitted as a reader (``lock.enter_read``), and register it.

        Returns ``(epoch, file, host, plan, done)``: ``file`` and ``host`` as
        :meth:`_fast_source` answers, and when that is not a one-file run or zeros, the
        plan. The caller reads the data after this returns and then ``_leave``s:
        registered, none of the clusters named can be reused meanwhile, whatever other
        threads do. With ``inline``, a small one-file run is first read while still
        admitted if it is all in the page cache (``RWF_NOWAIT``: it cannot block, and
        no free can happen meanwhile, so nothing needs registering): into ``into``, or
        as new bytes; that comes back as ``done`` (True for ``into`` or zeros), with
        epoch -1. None, having registered nothing, when the lock is busy and ``wait``
        is None.
        """
        lock = self.lock
        how = lock.enter_read(wait)
        if how == BUSY:
            return None
        try:
            if self._closed:
                self._check_still_open()
            host = map_plain(self.meta, offset, length)
            if host >= 0 and self._crypto is not None:
                # Encrypted data in one host run: its one-extent plan, without
                # map_read's general walk (a random 4 KiB read's mapping cost).
                return self._enter(), None, -1, [Extent(DATA, offset, length, host)], None
            src, host = self._source_of(offset, length, host)
            plan = None
            if src is not None:
                if inline and length <= _INLINE_READ_MAX:
                    if into is None:
                        data = src.pread_nowait(host, length, "data_read")
                        if data is not None:
                            return -1, src, host, None, data
                    elif src.readinto_nowait(into, host, "data_read"):
                        return -1, src, host, None, True
            elif host == 0:
                if inline:
                    return -1, None, 0, None, True
            else:
                plan = map_read(self.meta, offset, length, self.backing is not None)
            return self._enter(), src, host, plan, None
        finally:
            lock.exit_read(how)

    def _map_sync(self, offset: int, length: int, into: memoryview | None = None) -> Mapped:
        mapped = self._map_now(offset, length, self._sync_wait(), into, True)
        if mapped is None:
            raise ImageBusyError("metadata is being changed by a suspended request")
        return mapped

    def _plan_sync(self, offset: int, length: int, *, unallocated: int = -1) -> list[Extent]:
        """The read plan under the lock; ``unallocated=BACKING`` reports ranges no
        cluster of this image holds as BACKING even without a backing file (block
        status tells "unallocated" from "zero cluster"; a read does not)."""
        how = self.lock.enter_read(self._sync_wait())
        if how == BUSY:
            raise ImageBusyError("metadata is being changed by a suspended request")
        try:
            has_backing = self.backing is not None or unallocated == BACKING
            return map_read(self.meta, offset, length, has_backing)
        finally:
            self.lock.exit_read(how)

    async def _map_later(self, offset: int, length: int) -> Mapped:
        """:meth:`_map_now` for a coroutine that found the lock busy: wait for it (FIFO)."""
        ep = self._enter()
        try:
            await self.lock.acquire()
            try:
                self._check_still_open()
                plan = map_read(self.meta, offset, length, self.backing is not None)
            finally:
                self.lock.release()
        except BaseException:
            self._leave(ep)
            raise
        return ep, None, -1, plan, None

    # ----------------------------------------------------------- sync reads
    def read_sync(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` without ever awaiting."""
        self._admit_sync()
        self._check_range(offset, length)
        ep, src, host, plan, done = self._map_sync(offset, length)
        if ep < 0:
            return done if done is not True else bytes(length)
        try:
            # Fast path: no plan built. Plain bytes contiguous in one file (this image's,
            # or a backing file's for a range unallocated here) are one pread straight
            # into the bytes returned.
            if src is not None:
                return src.pread(host, length, "data_read")
            if plan is None:
                return bytes(length)
            data_file = self._data
            if len(plan) == 1 and plan[0].kind == DATA and self._plain_reads:
                return data_file.pread(plan[0].host, length, "data_read")
            buf = BUFFERS.borrow(length)
            try:
                view = memoryview(buf)[:length]
                self._run_plan_sync(plan, view, offset)
                return bytes(view)
            finally:
                BUFFERS.give_back(buf)
        finally:
            self._leave(ep)

    def readinto_sync(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from guest ``offset`` without awaiting."""
        self._admit_sync()
        self._check_range(offset, len(buf))
        ep, src, host, plan, _ = self._map_sync(offset, len(buf), buf)
        if ep < 0:
            if src is None:
                _zero(buf)
            return
        try:
            if src is not None:
                src.readinto(buf, host, "data_read")
            elif plan is None:
                _zero(buf)
            else:
                self._run_plan_sync(plan, buf, offset)
        finally:
            self._leave(ep)

    def _fast_source(self, offset: int, length: int) -> tuple[FileBackend | None, int]:
        """Where a read of guest ``[offset, offset+length)`` can go without a plan.

        ``(file, host offset)`` when the range is one run of plain bytes in one file:
        this image's data, or, for a range unallocated here, a backing file's (found
        by :meth:`locate` down the chain). ``_ZERO_RUN`` when it reads as zeros,
        ``_NO_FAST`` for anything else (the caller plans it with ``map_read``, which
        also reports corruption). Metadata must be readable (the caller checked).
        """
        return self._source_of(offset, length, map_plain(self.meta, offset, length))

    def _source_of(self, offset: int, length: int, host: int) -> tuple[FileBackend | None, int]:
        """:meth:`_fast_source` given ``map_plain``'s answer ``host`` for the range."""
        if host >= 0:
            return (self._data, host) if self._plain_reads else _NO_FAST
        if host != UNALLOCATED:
            return _NO_FAST
        backing = self.backing
        if backing is None:
            return _ZERO_RUN
        if offset + length > backing.size:
            return _NO_FAST  # partly past a shorter backing file: zeros there
        return backing.locate(offset, length)

    def locate(self, offset: int, length: int) -> tuple[FileBackend | None, int]:
        """:meth:`_fast_source` for an image used as a backing file, cached per cluster.

        A backing file is opened read-only and nobody may change it while an overlay
        uses it (QEMU's rule too), so its mapping is fixed: the answer for a whole
        cluster, once found, serves every later read inside that cluster, and a read
        through a chain costs one walk of the overlay's tables and one dictionary
        lookup per backing file, not a walk of every layer's tables. Writable images
        answer ``_NO_FAST`` (their mapping changes under the lock). Called by an overlay's
        reader admitted to the overlay's lock, it is admitted to this image's own (lock
        order: overlay before backing file, never the other way).
        """
        if self.writable or self._closed:
            return _NO_FAST
        cb = self.meta.cluster_bits
        c = offset >> cb
        code = self._located.get(c) if (offset + length - 1) >> cb == c else None
        if code is None:
            # A miss (or a range over two clusters) walks this image's tables: admitted.
            # A hit needs no lock: entries are only ever added (or all dropped), each
            # a final answer, and a dict lookup is atomic.
            how = self.lock.enter_read(self.wait_timeout)
            try:
                if (offset + length - 1) >> cb != c:
                    return self._fast_source(offset, length)
                code = self._located.get(c)
                if code is None:
                    code = self._locate_cluster(c)
            finally:
                self.lock.exit_read(how)
        if code >= 0:
            host = (code & ~511) + (offset & self.meta.cluster_mask)
            return self._located_files[code & 511], host
        if code == _LOC_ZERO:
            return _ZERO_RUN
        # The cluster as a whole is not one plain run; this part of it may still be.
        how = self.lock.enter_read(self.wait_timeout)
        try:
            return self._fast_source(offset, length)
        finally:
            self.lock.exit_read(how)

    def _locate_cluster(self, c: int) -> int:
        """Find and cache where guest cluster ``c`` (up to the disk's end) lies."""
        start = c << self.meta.cluster_bits
        src, host = self._fast_source(start, min(self.meta.cluster_size, self.size - start))
        code = _LOC_OTHER
        if src is None:
            code = _LOC_ZERO if host == 0 else _LOC_OTHER
        elif not host & 511:  # a cluster start: sector aligned, the low bits are free
            files = self._located_files
            idx = next((i for i, f in enumerate(files) if f is src), len(files))
            if idx == len(files):
                files.append(src)
            if idx < 512:
                code = host | idx
        if len(self._located) >= _LOCATED_MAX:
            self._located.clear()
        self._located[c] = code
        return code

    def _read_locked_sync(self, dest: memoryview, offset: int, event: str = "data_read") -> None:
        """Fill ``dest`` from guest ``offset`` with the metadata lock already held (an
        operation's own read: it must not take the lock, nor give it up meanwhile)."""
        plan = map_read(self.meta, offset, len(dest), self.backing is not None)
        self._run_plan_sync(plan, dest, offset, event)

    def _run_plan_sync(
        self, plan: list[Extent], dest: memoryview, base: int, event: str = "data_read"
    ) -> None:
        clusters = self._inflate_plan_sync(plan) if len(plan) > 1 else None
        for ext in plan:
            view = dest[ext.guest - base : ext.guest - base + ext.length]
            kind = ext.kind
            if kind == DATA:
                if self._crypto is None:
                    self._data.readinto(view, ext.host, event)
                else:
                    self._read_encrypted_sync(view, ext.host, ext.guest, event)
            elif kind == ZERO:
                _zero(view)
            elif kind == BACKING:
                self._backing_read_sync(view, ext.guest)
            elif kind == COMPRESSED:
                cluster = clusters[ext.host] if clusters else self._compressed_sync(ext)
                view[:] = memoryview(cluster)[ext.skip : ext.skip + ext.length]

    def _compressed_todo(self, plan: list[Extent]) -> tuple[dict[int, bytes], list[Extent]]:
        """The clusters a plan's COMPRESSED extents need: (already inflated, to inflate)."""
        todo = {ext.host: ext for ext in plan if ext.kind == COMPRESSED}
        done: dict[int, bytes] = {}
        cached = self._compressed_cache
        if cached is not None and cached[0] in todo:
            done[cached[0]] = cached[1]
            del todo[cached[0]]
        return done, sorted(todo.values(), key=lambda e: e.host)

    def _compressed_span(self, todo: list[Extent]) -> tuple[int, int] | None:
        """One host range covering every cluster of ``todo`` when that is cheaper to read
        than one read each (clusters written in order sit back to back); plain files only."""
        if len(todo) < 2 or not self._file.plain_reads:
            return None
        lo = todo[0].host
        hi = max(e.host + e.csize for e in todo)
        return (lo, hi) if hi - lo <= 2 * sum(e.csize for e in todo) else None

    def _inflate_plan_sync(self, plan: list[Extent]) -> dict[int, bytes] | None:
        """Inflate every compressed cluster of a plan, several at once on several cores
        (zlib and zstd release the GIL). None when the plan has fewer than two."""
        done, todo = self._compressed_todo(plan)
        if len(todo) < 2:
            return None
        span = self._compressed_span(todo)
        raws: list[bytes]
        if span is not None:
            blob = self._file.pread(span[0], span[1] - span[0], "read_compressed")
            raws = [blob[e.host - span[0] : e.host - span[0] + e.csize] for e in todo]
        else:
            raws = [self._file.pread(e.host, e.csize, "read_compressed") for e in todo]
        clusters = parallel_map(
            self._inflater(), list(zip(todo, raws, strict=True)), _INFLATE_HELPERS
        )
        done.update((e.host, c) for e, c in zip(todo, clusters, strict=True))
        self._compressed_cache = (todo[-1].host, clusters[-1])
        return done

    def _inflater(self) -> Callable[[tuple[Extent, bytes]], bytes]:
        """Inflate one (extent, compressed bytes) pair; touches no image state, so it
        may run in any thread."""
        cs = self.meta.cluster_size
        ctype = self.meta.header.compression_type

        def inflate(item: tuple[Extent, bytes]) -> bytes:
            return decompress_cluster(item[1], cs, ctype, f"at host offset {item[0].host:#x}")

        return inflate

    async def _inflate_plan(self, plan: list[Extent]) -> dict[int, bytes]:
        """The async twin: raw reads first, then the inflates in an I/O thread (and its
        helper) when that can overlap with something (several clusters, or other
        requests); a lone cluster with nothing else running is inflated inline."""
        done, todo = self._compressed_todo(plan)
        if not todo:
            return done
        span = self._compressed_span(todo)
        raws: list[bytes] = []
        if span is not None:
            blob = await self._file.apread(span[0], span[1] - span[0], "read_compressed")
            raws = [blob[e.host - span[0] : e.host - span[0] + e.csize] for e in todo]
        else:
            for e in todo:
                raw = bytearray(e.csize)
                await self._file.areadinto(memoryview(raw), e.host, "read_compressed")
                raws.append(bytes(raw))
        inflate = self._inflater()
        items = list(zip(todo, raws, strict=True))
        if len(todo) > 1 or self._nreq > 1:
            # One hop for the whole request: an I/O thread inflates the clusters with
            # the same helpers as the sync path, and returns (or raises) only once
            # every inflate it started has finished.
            clusters = await to_thread(parallel_map, inflate, items, _INFLATE_HELPERS)
        else:
            clusters = [inflate(items[0])]
        done.update((e.host, c) for e, c in zip(todo, clusters, strict=True))
        self._compressed_cache = (todo[-1].host, clusters[-1])
        return done

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
        cluster = self._inflater()((ext, raw))
        self._compressed_cache = (ext.host, cluster)
        return cluster

    # ---------------------------------------------------------- async reads
    async def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at guest ``offset``."""
        if self._ops_gated:  # an exclusive operation is draining or running
            await self._admit()
        self._check_range(offset, length)
        mapped = self._map_now(offset, length, self._reader_wait, None, True)
        if mapped is None:
            mapped = await self._map_later(offset, length)
        ep, src, host, plan, done = mapped
        if ep < 0:
            return done if done is not True else bytes(length)
        try:
            if src is not None:
                # No plan: inline on a page-cache hit (RWF_NOWAIT), else one os.pread in
                # a thread, straight into the bytes returned.
                return await src.apread(host, length, "data_read")
            if plan is None:
                return bytes(length)
            data_file = self._data
            if self._plain_reads and len(plan) == 1 and plan[0].kind == DATA:
                return await data_file.apread(plan[0].host, length, "data_read")
            buf = BUFFERS.borrow(length)
            try:
                view = memoryview(buf)[:length]
                await self._run_plan(plan, view, offset)
                return bytes(view)
            finally:
                BUFFERS.give_back(buf)
        finally:
            self._leave(ep)

    async def readv(self, offset: int, buffers: Sequence[bytearray | memoryview]) -> int:
        """Scatter the guest bytes at ``offset`` into writable ``buffers``; returns the count."""
        views = [memoryview(b).cast("B") for b in buffers]
        total = sum(len(v) for v in views)
        self._check_range(offset, total)
        if len(views) == 1:
            await self.readinto(views[0], offset)
            return total
        if total >= 4096 * len(views):
            # Buffers of a page or more: read into each in turn (no bounce buffer, no copy).
            pos = offset
            for v in views:
                await self.readinto(v, pos)
                pos += len(v)
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
        if self._ops_gated:  # an exclusive operation is draining or running
            await self._admit()
        self._check_range(offset, len(buf))
        mapped = self._map_now(offset, len(buf), self._reader_wait, buf, True)
        if mapped is None:
            mapped = await self._map_later(offset, len(buf))
        ep, src, host, plan, _ = mapped
        if ep < 0:
            if src is None:
                _zero(buf)
            return
        # Registered from mapping to the end of the data phase: clusters this plan
        # names are not reused until we are done (see docs/concurrency.md).
        try:
            if src is not None:
                await src.areadinto(buf, host, "data_read")
            elif plan is None:
                _zero(buf)
            else:
                await self._run_plan(plan, buf, offset)
        finally:
            self._leave(ep)

    async def _run_plan(
        self, plan: list[Extent], dest: memoryview, base: int, event: str = "data_read"
    ) -> None:
        clusters: dict[int, bytes] | None = None
        for ext in plan:
            view = dest[ext.guest - base : ext.guest - base + ext.length]
            kind = ext.kind
            if kind == DATA:
                if self._crypto is None:
                    await self._data.areadinto(view, ext.host, event)
                else:
                    await self._read_encrypted(view, ext.host, ext.guest, event)
            elif kind == ZERO:
                _zero(view)
            elif kind == BACKING:
                if self.backing is None:  # closed (and the backing file with it) meanwhile
                    self._check_still_open()
                    raise Qcow2Error(f"image {self.path!r} has no backing file open")
                have = max(0, min(len(view), self.backing.size - ext.guest))
                if have:
                    await self.backing.readinto(view[:have], ext.guest)
                if have < len(view):
                    _zero(view[have:])
            elif kind == COMPRESSED:
                if clusters is None:
                    clusters = await self._inflate_plan(plan)
                view[:] = memoryview(clusters[ext.host])[ext.skip : ext.skip + ext.length]

    # ------------------------------------------------------- write set-up
    def _open_for_writing(self) -> None:
        meta = self.meta
        hdr = meta.header
        meta.enable_writes(self._data if self._data is not self._file else None)
        assert meta.allocator is not None
        meta.allocator.punch_enabled = self.discard_mode == "unmap"
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
            assert meta.writeback is not None
            if result.check_errors == 0 and meta.allocator.drop_refcounts_past(self._file.size()):
                # Leaks past the end of the file, invisible to the check (see
                # Allocator.drop_refcounts_past): a dirty image's repair leaves none.
                meta.writeback.write_refblocks()
                meta.flush_files("repair_refcounts")
            hdr.incompatible_features &= ~C.INCOMPAT_DIRTY
            self._file.pwrite(struct.pack(">Q", hdr.incompatible_features), 72, "header_update")
            self._file.flush("header_update")
            meta.writeback.dirty_on_disk = False
        # Autoclear bits we do not maintain (unknown ones) must be cleared before the
        # first write, or another reader would trust data we are about to change. The
        # bitmaps bit stays: the bitmaps are maintained (marked IN_USE below, stored
        # at close; see docs/bitmaps.md).
        keep = hdr.autoclear_features & (C.AUTOCLEAR_DATA_FILE_RAW | C.AUTOCLEAR_BITMAPS)
        if hdr.autoclear_features != keep or (
            hdr.version >= 3 and self._on_disk_autoclear() != keep
        ):
            hdr.autoclear_features = keep
            self._file.pwrite(struct.pack(">Q", keep), 88, "header_update")
            self._file.flush("header_update")
        if hdr.version >= 3:
            self._bitmaps = BitmapSet(meta, self.size)
            self._bitmaps.mark_in_use()

    def _on_disk_autoclear(self) -> int:
        value: int = struct.unpack(">Q", self._file.pread(88, 8, "header_read"))[0]
        return value

    def _check_writable(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        if not self.writable:
            raise Qcow2ReadOnlyError(f"image {self.path!r} is opened read-only")
        self._check_changeable("writes")

    def _check_changeable(self, what: str) -> None:
        """Refuse changes to a corrupt image, or one whose earlier flush failed."""
        if self.meta.header.corrupt:
            raise Qcow2CorruptError(f"image {self.path!r} is marked corrupt; {what} refused")
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
        """Register a request (refused once the image is closing); returns its epoch."""
        with self._reqs_mutex:
            if self._closing or self._closed:
                raise Qcow2Error(
                    f"image {self.path!r} is {'closed' if self._closed else 'closing'}"
                )
            ep = self._epoch
            self._active[ep] = self._active.get(ep, 0) + 1
            self._nreq += 1
        return ep

    def _enter_at(self, ep: int) -> None:
        """Register more work of a request already registered at ``ep`` (a write step
        that outlives its caller), even while closing: the close waits for it."""
        with self._reqs_mutex:
            self._active[ep] = self._active.get(ep, 0) + 1
            self._nreq += 1

    def _leave(self, ep: int) -> None:
        with self._reqs_mutex:
            self._nreq -= 1
            n = self._active[ep] - 1
            if n:
                self._active[ep] = n
                return
            del self._active[ep]
            if self._active or not self._idle_waiters:
                return
            waiters, self._idle_waiters = self._idle_waiters, []
        for w in waiters:
            w.wake()

    def _idle_waiter(self) -> Wakeup | None:
        """A waiter woken when no request is in flight, or None if none is now."""
        with self._reqs_mutex:
            if not self._active:
                return None
            w = Wakeup()
            self._idle_waiters.append(w)
            return w

    async def _drain(self) -> None:
        """Wait until no request is in flight (of any thread or loop), write steps included."""
        while (w := self._idle_waiter()) is not None:
            await w.wait_async()

    def _drain_blocking(self, deadline: float) -> None:
        """:meth:`_drain` for a thread without an event loop, bounded."""
        while (w := self._idle_waiter()) is not None:
            if not w.wait_blocking(max(0.0, deadline - time.monotonic())):
                raise WaitTimeoutError(
                    f"waited {self.wait_timeout:.1f} s for the requests in flight on "
                    f"{self.path!r} to finish (one may belong to an event loop that is not "
                    "running)"
                )

    def retire_epoch(self) -> int:
        """Tag for a cluster being unlinked now: requests up to this epoch may still use it."""
        with self._reqs_mutex:
            ep = self._epoch
            self._epoch += 1
        return ep

    def _oldest_active(self) -> int | None:
        with self._reqs_mutex:
            return min(self._active) if self._active else None

    def _idle(self) -> bool:
        with self._reqs_mutex:
            return not self._active

    # The admission gate: closed while an exclusive operation drains or runs, so that
    # its drain cannot be starved by requests that keep arriving on a busy image.
    def _gate_close(self) -> None:
        with self._reqs_mutex:
            self._ops_gated += 1

    def _gate_open(self) -> None:
        with self._reqs_mutex:
            self._ops_gated -= 1
            if self._ops_gated or not self._gate_waiters:
                return
            waiters, self._gate_waiters = self._gate_waiters, []
        for w in waiters:
            w.wake()

    def _gate_waiter(self) -> Wakeup | None:
        """A waiter woken when the gate opens, or None if it is open now (or the caller
        already passed it: a sub-request of an admitted request)."""
        with self._reqs_mutex:
            if not self._ops_gated or _ADMITTED.get() is self:
                return None
            w = Wakeup()
            self._gate_waiters.append(w)
            return w

    async def _admit(self) -> None:
        """Where every async request starts (nothing held yet), when ``_ops_gated`` is
        set (read without the mutex: a request that misses the gate closing is one the
        drain waits for): wait until the exclusive operations have finished. Requests
        already registered are not stopped, so the drain they hold up ends."""
        while (w := self._gate_waiter()) is not None:
            await w.wait_async()

    def _admit_sync(self) -> None:
        """:meth:`_admit` for a synchronous request: in a thread that runs an event
        loop ImageBusyError if it would have to wait; elsewhere it waits up to
        ``wait_timeout`` (then WaitTimeoutError), having done nothing."""
        if not self._ops_gated:
            return
        deadline = self._deadline()
        if deadline is None:
            with self._reqs_mutex:
                if self._ops_gated and _ADMITTED.get() is not self:
                    raise ImageBusyError(
                        "an image operation (snapshot, resize) is waiting for the requests "
                        "in flight"
                    )
            return
        while (w := self._gate_waiter()) is not None:
            if not w.wait_blocking(max(0.0, deadline - time.monotonic())):
                raise WaitTimeoutError(
                    f"waited {self.wait_timeout:.1f} s for an image operation on "
                    f"{self.path!r} to finish"
                )

    # ------------------------------------------------------- async writes
    async def write(self, offset: int, data: Buffer) -> int:
        """Write ``data`` at guest ``offset``; returns the number of bytes written."""
        if self._ops_gated:  # an exclusive operation is draining or running
            await self._admit()
        view = memoryview(data).cast("B")
        n = len(view)
        self._check_writable(offset, n)
        ranges = self._ranges
        if ranges is None or not n:
            return await self._write_body(offset, view, None)
        if (offset | n) & SECTOR_MASK:
            return await self._write_rmw(offset, view)
        entry = await ranges.begin(offset, offset + n, serial=False)
        try:
            return await self._write_body(offset, view, entry)
        finally:
            ranges.end(entry)

    async def _write_body(self, offset: int, view: memoryview, entry: SectorRange | None) -> int:
        """:meth:`write` once admitted (``entry``: its sectors, on an encrypted image)."""
        n = len(view)
        ep = self._enter()
        try:
            data_file = self._data
            if (
                self._plain_writes
                and data_file.inline_write_ok(n)
                and (host := self._in_place_host(offset, n)) >= 0
            ):
                # Fast path, as in write_sync: COPIED clusters contiguous on the host
                # (nothing to link), small enough to write inline (see io.py).
                mark_dirty(self, offset, n)
                t0 = time.monotonic()
                data_file.pwritev([view], host, "data_write")
                data_file.note_inline_write(time.monotonic() - t0)
                return n
            pos = 0
            while pos < n:
                await self.lock.acquire()
                try:
                    self._check_still_open()
                    self._check_size(offset, n)
                    step = prepare_write(self, offset + pos, n - pos)
                finally:
                    self.lock.release()
                if isinstance(step, L2Meta):
                    await step.wait()
                    continue
                chunk = view[pos : pos + step.length]
                if (
                    self._plain_writes
                    and data_file.inline_write_ok(step.head_len + step.length + step.tail_len)
                    and plan_is_zero(step.head)
                    and plan_is_zero(step.tail)
                ):
                    # COW from zeros and a small write: the data is written inline, and
                    # the link too when the lock is free (nothing awaited in between, so
                    # no cancellation can leave the allocation in flight); else the link
                    # waits for the lock in a shielded task.
                    await self._write_step_inline(ep, step, chunk, entry)
                else:
                    # The data phase and the link run to completion even if we are
                    # cancelled: an allocation must be either linked or freed, never left
                    # in flight.
                    await self._shielded(ep, self._finish_step(step, chunk), entry)
                pos += step.length
        finally:
            self._leave(ep)
        return n

    async def _write_rmw(self, offset: int, view: memoryview) -> int:
        """An unaligned write to an encrypted image: sectors are encrypted whole, so
        read the partial first and last sectors, merge, and write whole sectors.
        Registered as a serial request on its sectors from before the read until the
        write-back is linked: no write, write-zeroes or discard of those sectors runs
        in between, or the write-back would undo it."""
        n = len(view)
        start, buf, reads = self._rmw_plan(offset, view)
        ranges = self._ranges
        assert ranges is not None
        entry = await ranges.begin(start, start + len(buf), serial=True)
        # Its reads hold the sectors: they must not wait at the gate for an operation
        # whose drain may wait for a request blocked on those sectors.
        token = _ADMITTED.set(self)
        try:
            for off, piece in reads:
                await self.readinto(piece, off)
            buf[offset - start : offset - start + n] = view
            await self._write_body(start, memoryview(buf), entry)
        finally:
            _ADMITTED.reset(token)
            ranges.end(entry)
        return n

    def _rmw_plan(
        self, offset: int, view: memoryview
    ) -> tuple[int, bytearray, list[tuple[int, memoryview]]]:
        """The whole-sector range around an unaligned write and the partial sectors
        (guest offset, destination) to read into it before merging."""
        n = len(view)
        start = offset & ~SECTOR_MASK
        end = (offset + n + SECTOR_MASK) & ~SECTOR_MASK
        buf = bytearray(end - start)
        mv = memoryview(buf)
        reads: list[tuple[int, memoryview]] = []
        if offset != start:
            reads.append((start, mv[:512]))
        if offset + n != end and not (reads and end - start == 512):
            reads.append((end - 512, mv[end - start - 512 :]))
        return start, buf, reads

    def _read_encrypted_sync(self, view: memoryview, host: int, guest: int, event: str) -> None:
        """Read and decrypt one DATA extent of an encrypted image (whole sectors are
        read and decrypted; an unaligned extent through a bounce buffer)."""
        crypto = self._crypto
        assert crypto is not None
        lo = host & SECTOR_MASK
        if not lo and not len(view) & SECTOR_MASK:
            self._data.readinto(view, host, event)
            crypto.decrypt(view, host, guest)
            return
        tmp = memoryview(bytearray((lo + len(view) + SECTOR_MASK) & ~SECTOR_MASK))
        self._data.readinto(tmp, host - lo, event)
        crypto.decrypt(tmp, host - lo, guest - lo)
        view[:] = tmp[lo : lo + len(view)]

    async def _read_encrypted(self, view: memoryview, host: int, guest: int, event: str) -> None:
        """:meth:`_read_encrypted_sync` for the async path: large runs are decrypted in
        an I/O thread, off the event loop."""
        crypto = self._crypto
        assert crypto is not None
        lo = host & SECTOR_MASK
        if not lo and not len(view) & SECTOR_MASK:
            await self._data.areadinto(view, host, event)
            await self._crypt_run(crypto.decrypt, view, host, guest)
            return
        tmp = memoryview(bytearray((lo + len(view) + SECTOR_MASK) & ~SECTOR_MASK))
        await self._data.areadinto(tmp, host - lo, event)
        await self._crypt_run(crypto.decrypt, tmp, host - lo, guest - lo)
        view[:] = tmp[lo : lo + len(view)]

    async def _crypt_run(
        self,
        fn: Callable[[memoryview | bytearray, int, int], None],
        buf: memoryview | bytearray,
        host: int,
        guest: int,
    ) -> None:
        """Encrypt or decrypt in place: inline when small, else in an I/O thread (the
        cipher releases the GIL for large runs, so other requests go on meanwhile)."""
        if len(buf) >= _CRYPT_OFFLOAD:
            await to_thread(fn, buf, host, guest)
        else:
            fn(buf, host, guest)

    def _to_seal(self, step: WriteStep, bufs: list[Buffer], start: int) -> tuple[bytearray, int]:
        """A step's buffers gathered into one buffer to encrypt (a copy: the caller's
        data is never changed), and the guest offset of its first byte."""
        total = sum(len(memoryview(b)) for b in bufs)
        if (start | total) & SECTOR_MASK:
            raise Qcow2Error(
                f"internal error: encrypted write of {total} bytes at host offset {start:#x} "
                "is not sector aligned"
            )
        out = bytearray(total)
        pos = 0
        for b in bufs:
            m = memoryview(b).cast("B")
            out[pos : pos + len(m)] = m
            pos += len(m)
        return out, step.guest - (step.host - start)

    def _in_place_host(self, offset: int, n: int) -> int:
        """The host offset of ``[offset, offset+n)`` when it is COPIED clusters
        contiguous on the host with no allocation in flight (a write there changes no
        metadata), else -1; also -1 when the lock's holder is changing metadata (then
        plan it properly). A lookup only, so admitted as a reader (``SHARED``)."""
        how = self.lock.enter_read(None)
        if how == BUSY:
            return -1
        try:
            if self.inflight.overlapping(offset, n) is not None:
                return -1
            host = map_plain(self.meta, offset, n, copied=True)
            if host >= 0:
                self._check_data_write(host, n)
            return host
        finally:
            self.lock.exit_read(how)

    async def _write_step_inline(
        self, ep: int, step: WriteStep, chunk: memoryview, entry: SectorRange | None
    ) -> None:
        data_file = self._data
        t0 = time.monotonic()
        try:
            bufs, reads, start = self._step_buffers(step, chunk)
            assert not reads
            data_file.pwritev(bufs, start, _write_event(step))
        except BaseException:
            if not self._settle_now(step, ok=False):
                await self._shielded(ep, self._settle(step, ok=False), entry)
            raise
        data_file.note_inline_write(time.monotonic() - t0)
        if not self._settle_now(step, ok=True):
            await self._shielded(ep, self._settle(step, ok=True), entry)

    async def _shielded(
        self, ep: int, coro: Coroutine[Any, Any, None], entry: SectorRange | None = None
    ) -> None:
        """Run ``coro`` as a task that finishes even if the caller is cancelled,
        registered (at the caller's epoch) until it has: a close waits for it, and
        its sectors (``entry``) stay taken until it has."""
        self._enter_at(ep)
        ranges = self._ranges
        if entry is not None and ranges is not None:
            ranges.hold(entry)
        task = asyncio.ensure_future(coro)
        with self._reqs_mutex:
            self._background.add(task)

        def done(t: asyncio.Task[None]) -> None:
            with self._reqs_mutex:
                self._background.discard(t)
            if not t.cancelled():
                t.exception()  # retrieved: the caller (if still there) re-raises it
            if entry is not None and ranges is not None:
                ranges.end(entry)
            self._leave(ep)

        task.add_done_callback(done)
        await asyncio.shield(task)

    async def writev(self, offset: int, buffers: Sequence[Buffer]) -> int:
        """Gather ``buffers`` and write them at guest ``offset``."""
        if len(buffers) == 1:
            return await self.write(offset, buffers[0])
        return await self.write(offset, b"".join(buffers))

    def _step_buffers(
        self, step: WriteStep, chunk: memoryview
    ) -> tuple[list[Buffer], list[tuple[list[Extent], memoryview, int]], int]:
        """What a step writes: COW head + data + COW tail (one host-contiguous write).

        Returns the buffers, the COW pieces still to be filled from their source plans
        (``(plan, destination, guest base)``: the sync and async drivers fill them their
        own way), and the host offset of the write. Zero COW needs no read at all.
        """
        head_len, tail_len = self._cow_lengths(step)
        bufs: list[Buffer] = []
        reads: list[tuple[list[Extent], memoryview, int]] = []
        for plan, n, base in (
            (step.head, head_len, step.guest - head_len),
            (None, 0, 0),
            (step.tail, tail_len, step.guest + step.length),
        ):
            if plan is None:
                bufs.append(chunk)
            elif n:
                if plan_is_zero(plan):
                    bufs.append(_zeros(n))
                else:
                    piece = bytearray(n)
                    reads.append((plan, memoryview(piece), base))
                    bufs.append(piece)
        self._check_data_write(
            step.host - step.head_len, step.head_len + step.length + step.tail_len
        )
        return bufs, reads, step.host - head_len

    async def _finish_step(self, step: WriteStep, chunk: memoryview) -> None:
        try:
            bufs, reads, start = self._step_buffers(step, chunk)
            for plan, view, base in reads:
                await self._run_plan(plan, view, base, "cow_read")
            if self._crypto is not None:
                sealed, guest = self._to_seal(step, bufs, start)
                await self._crypt_run(self._crypto.encrypt, sealed, start, guest)
                bufs = [sealed]
            await self._data.apwritev(bufs, start, _write_event(step))
        except BaseException:
            await self._settle(step, ok=False)
            raise
        await self._settle(step, ok=True)

    def _settle_locked(self, step: WriteStep, ok: bool) -> None:
        """Link a step whose data is written (``ok``), or free its clusters."""
        if not ok:
            abort_step(self, step)
            return
        if self._closed:
            abort_step(self, step)  # too late to link: fail instead of losing it silently
            self._check_still_open()
        commit_step(self, step)

    def _settle_now(self, step: WriteStep, ok: bool) -> bool:
        """:meth:`_settle_locked` now if the lock is free; False (nothing done) if not."""
        if not self.lock.try_acquire():
            return False
        try:
            self._settle_locked(step, ok)
        finally:
            self.lock.release()
        return True

    async def _settle(self, step: WriteStep, ok: bool) -> None:
        await self.lock.acquire()
        try:
            self._settle_locked(step, ok)
        finally:
            self.lock.release()

    def _cow_lengths(self, step: WriteStep) -> tuple[int, int]:
        """The COW head and tail lengths a step's data write must carry.

        COW from zeros into clusters that start at or past the end of the file (a
        growing image) is left out: the file system reads those bytes as zeros, so
        the guest data is written alone (QEMU zeroes them with fallocate instead).
        Only for plain backends: recording and fault-injecting ones see every byte.
        """
        head_len, tail_len = step.head_len, step.tail_len
        if not (head_len or tail_len) or not self._plain_writes:
            return head_len, tail_len
        head_zero = head_len and plan_is_zero(step.head)
        tail_zero = tail_len and plan_is_zero(step.tail)
        if (head_zero or tail_zero) and step.host - head_len >= self._data.size():
            return (0 if head_zero else head_len), (0 if tail_zero else tail_len)
        return head_len, tail_len

    def _check_data_write(self, host: int, length: int) -> None:
        if self._data is self._file:
            self.meta.check_data_write(host, length)

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros.

        On v3 images whole clusters (subclusters with extended L2) get the zero
        flag and, with ``unmap``, their host clusters are freed; the unaligned
        rest, and everything on v2 images, is written as zeros.
        """
        if self._ops_gated:  # an exclusive operation is draining or running
            await self._admit()
        self._check_writable(offset, length)
        head, mid, tail = self._split_aligned(offset, length, for_discard=False)
        # In address order, as QEMU: a head written as data turns a compressed cluster
        # into a plain one, whose subclusters the middle can then zero.
        await self._zero_end(*head)
        if mid[1] and await self._zero_locked(
            mid[0], mid[1], unmap=unmap, discard=False, dirty=mid
        ):
            # Part of a compressed cluster (extended L2) cannot be zeroed: QEMU then
            # writes the whole middle as data (here in pieces of at most 1 MiB).
            for pos in range(mid[0], mid[0] + mid[1], 1 << 20):
                await self.write(pos, bytes(min(1 << 20, mid[0] + mid[1] - pos)))
        await self._zero_end(*tail)

    async def _zero_end(self, offset: int, length: int) -> None:
        """An unaligned end of a write-zeroes, as QEMU 7.2 treats one: on a v3 image
        each granule (subcluster with extended L2, else cluster) it touches becomes a
        zero granule when that granule is zero in this layer, or unallocated here with
        the rest of it reading as zeros down the chain (nobody can tell; nothing is
        allocated); otherwise, and on v2, zeros are written as data. The image's last
        granule, from its start to the end of the image, counts as whole: it is made
        zero whatever it holds (QEMU's rule too)."""
        if not length:
            return
        if self.meta.version < 3:
            await self.write(offset, bytes(length))
            return
        sc = self.meta.cluster_size >> 5 if self.meta.extended_l2 else self.meta.cluster_size
        pos, end = offset, offset + length
        while pos < end:
            start = pos & ~(sc - 1)
            stop = min(end, start + sc)
            whole = pos == start and stop == self.size
            below_zero = whole or await self._backing_zero_around(start, pos, stop, sc)
            if not await self._zero_locked(
                start,
                sc,
                unmap=False,
                discard=False,
                only_if_zero=not whole,
                backing_zero=below_zero,
                dirty=(pos, stop - pos),
            ):
                pos = stop
                continue
            await self.write(pos, bytes(stop - pos))
            pos = stop

    async def _backing_zero_around(self, start: int, pos: int, stop: int, sc: int) -> bool:
        """Whether the backing chain reads as zeros in granule ``[start, start + sc)``
        outside ``[pos, stop)`` (QEMU's ``is_zero`` of a zeroing's head and tail, for
        the case that this layer leaves the granule unallocated). Asked before the
        lock is taken, as the backing files cannot change; this layer itself is looked
        at under the lock, by :func:`writes.zero_clusters`."""
        below = self.backing
        if below is None:
            return True
        from .blockstatus import block_status_async

        found: list[bool] = []

        async def walk() -> None:
            for a, b in ((start, pos), (stop, min(start + sc, self.size))):
                b = min(b, below.size)  # past the backing file's end: zeros
                if b > a and not all(st.zero for st in await block_status_async(below, a, b - a)):
                    found.append(False)
                    return
            found.append(True)

        # A request like any other: a close waits for the walk (on its worker thread)
        # even if this caller is cancelled, so the backing file stays open under it.
        ep = self._enter()
        try:
            await self._shielded(ep, walk())
        finally:
            self._leave(ep)
        return found == [True]

    async def discard(self, offset: int, length: int) -> None:
        """Discard whole clusters in the range (v3: they read as zeros; host clusters freed).

        Like QEMU, unaligned parts are ignored, and on a v2 image with a backing
        file discard does nothing (there is no way to hide the backing data).
        """
        if self._ops_gated:  # an exclusive operation is draining or running
            await self._admit()
        self._check_writable(offset, length)
        if self.discard_mode == "ignore":
            return  # QEMU's discard=ignore: the request succeeds and changes nothing
        if self.meta.version < 3 and self.backing is not None:
            mid = (offset, 0)  # nothing can be discarded, but the request is marked
        else:
            _, mid, _ = self._split_aligned(offset, length, for_discard=True)
        if mid[1] or (self._bitmaps is not None and self._bitmaps.active and length):
            # QEMU marks the whole request, unaligned parts included.
            await self._zero_locked(
                mid[0], mid[1], unmap=True, discard=True, dirty=(offset, length)
            )

    def _split_aligned(
        self, offset: int, length: int, *, for_discard: bool
    ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """Split into unaligned head, aligned middle, unaligned tail.

        The granule is the cluster, but for write-zeroes on an extended-L2 image the
        subcluster: QEMU then sets the zero bits of the subclusters the request
        covers (:func:`zero_clusters` takes subcluster ranges) and writes only the
        rest as data. Discard stays whole clusters, as in QEMU. The last cluster
        counts as whole when the range runs to the end of the image; the image's last
        partial subcluster is the tail (see :meth:`_zero_end`).
        """
        gran = self.meta.cluster_size
        sub = self.meta.extended_l2 and not for_discard
        if sub:
            gran >>= 5  # 32 subclusters a cluster
        end = offset + length
        if self.meta.version < 3 and not for_discard:
            return (offset, length), (end, 0), (end, 0)
        a = (offset + gran - 1) & ~(gran - 1)
        b = end & ~(gran - 1)
        if end == self.size and not sub:
            b = (end + gran - 1) & ~(gran - 1)
        if b <= a:
            return (offset, length), (end, 0), (end, 0)
        mid_end = min(b, end)
        return (offset, a - offset), (a, b - a), (mid_end, end - mid_end)

    async def _zero_locked(
        self,
        offset: int,
        length: int,
        *,
        unmap: bool,
        discard: bool,
        only_if_zero: bool = False,
        backing_zero: bool = True,
        dirty: tuple[int, int] | None = None,
    ) -> list[tuple[int, int]]:
        """Zero or discard whole clusters under the lock. ``dirty``: the guest range
        the request asked for (unaligned parts included, as QEMU marks them), set in
        the bitmaps in the same hold of the lock as the L2 change."""
        ep = self._enter()
        try:
            while True:
                await self.lock.acquire()
                try:
                    self._check_still_open()
                    if dirty is not None:
                        mark_dirty(self, *dirty)
                        if not length:
                            return []
                    self._check_size(offset, length, whole_clusters=True)
                    blocker: L2Meta | SectorRange | None = self.inflight.overlapping(offset, length)
                    if blocker is None and self._ranges is not None:
                        # All of it under the lock: only a read-modify-write between its
                        # read and its write-back can be in the way.
                        blocker = self._ranges.blocker(offset, offset + length, serial=False)
                    if blocker is None:
                        return zero_clusters(
                            self,
                            offset,
                            offset + length,
                            unmap=unmap,
                            discard=discard,
                            only_if_zero=only_if_zero,
                            backing_zero=backing_zero,
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
        await self.lock.acquire()
        try:
            self._check_still_open()
            await self._drive_async(self._flush_steps(), readable=True)
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

    async def _drive_async(self, steps: Iterator[str], *, readable: bool = False) -> None:
        """Run writeback steps, awaiting each step's fsyncs with the lock held. With
        ``readable`` (a flush: metadata is consistent between steps) readers may map
        while an fsync runs; the next step starts once they are done."""
        try:
            for event in steps:
                if readable:
                    self.lock.open_to_readers()
                try:
                    if self._data is not self._file:
                        await self._data.aflush(event)
                    await self._file.aflush(event)
                finally:
                    if readable:
                        self.lock.close_to_readers()
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
    def _deadline(self) -> float | None:
        """When a synchronous call must give up waiting: None if it may not wait at all
        (see :meth:`_sync_wait`)."""
        wait = self._sync_wait()
        return None if wait is None else time.monotonic() + wait

    def _take_sync(self, deadline: float | None, lock: MetaLock | NoLock | None = None) -> None:
        """Take the metadata lock (or ``lock``) for a synchronous call: at once or
        ImageBusyError (``deadline`` None), or waiting until ``deadline`` (then
        WaitTimeoutError)."""
        what = "metadata lock" if lock is None else "keyslot lock"
        lock = self.lock if lock is None else lock
        if deadline is None:
            if not lock.try_acquire():
                raise ImageBusyError(f"{what} is held by a suspended request")
        else:
            lock.acquire_blocking(max(0.0, deadline - time.monotonic()))

    def write_sync(self, offset: int, data: Buffer) -> int:
        """Write without ever awaiting. In a thread running an event loop, raises
        ImageBusyError (having changed nothing) if the lock is held or an in-flight
        allocation overlaps the range; in a thread without one, waits for them (up to
        ``wait_timeout``, then WaitTimeoutError, having changed nothing)."""
        self._admit_sync()
        view = memoryview(data).cast("B")
        n = len(view)
        self._check_writable(offset, n)
        deadline = self._deadline()
        ranges = self._ranges
        # A sub-sector write to an encrypted image reads and writes its whole sectors,
        # all under one hold of the lock, once nothing else is writing them.
        rmw = ranges is not None and n > 0 and bool((offset | n) & SECTOR_MASK)
        start = offset & ~SECTOR_MASK if rmw else offset
        end = (offset + n + SECTOR_MASK) & ~SECTOR_MASK if rmw else offset + n
        while True:
            self._take_sync(deadline)
            try:
                self._check_size(offset, n)
                blocker: L2Meta | SectorRange | None = self.inflight.overlapping(start, end - start)
                if blocker is None and ranges is not None:
                    blocker = ranges.blocker(start, end, serial=rmw)
                if blocker is None:
                    ep = self._enter()
                    try:
                        if rmw:
                            self._rmw_locked_sync(offset, view)
                        else:
                            self._write_locked_sync(offset, view)
                    finally:
                        self._leave(ep)
                    return n
            finally:
                self.lock.release()
            if deadline is None:
                raise ImageBusyError(f"a request in flight overlaps the write at {offset} (+{n})")
            if not blocker.wait_blocking(max(0.0, deadline - time.monotonic())):
                raise WaitTimeoutError(
                    f"waited {self.wait_timeout:.1f} s for a request in flight "
                    f"overlapping the write at {offset} (+{n}) on {self.path!r}"
                )

    def _rmw_locked_sync(self, offset: int, view: memoryview) -> None:
        """:meth:`_write_rmw` with the lock held throughout (nothing can change the
        partial sectors between their read and their write-back)."""
        start, buf, reads = self._rmw_plan(offset, view)
        for off, piece in reads:
            self._read_locked_sync(piece, off)
        buf[offset - start : offset - start + len(view)] = view
        self._write_locked_sync(start, memoryview(buf))

    def _write_locked_sync(self, offset: int, view: memoryview) -> None:
        n = len(view)
        data_file = self._data
        if self._plain_writes:
            # Fast path: the range is COPIED clusters contiguous on the host, which
            # prepare_write would turn into one in-place step with nothing to link
            # (no metadata change): write it straight away.
            host = map_plain(self.meta, offset, n, copied=True)
            if host >= 0:
                self._check_data_write(host, n)
                mark_dirty(self, offset, n)
                data_file.pwritev([view], host, "data_write")
                return
        pos = 0
        while pos < n:
            step = prepare_write(self, offset + pos, n - pos)
            assert not isinstance(step, L2Meta)
            self._finish_step_sync(step, view[pos : pos + step.length])
            pos += step.length

    # ---------------------------------------------------- compressed writes
    def _compressed_chunks(self, offset: int, view: memoryview) -> Iterator[tuple[int, memoryview]]:
        """Check a compressed write (see :func:`check_compressed_write`) and cut it into
        (guest offset, cluster bytes) pairs; the last may be the image's partial cluster."""
        n = len(view)
        self._check_writable(offset, n)
        check_compressed_write(self, offset, n)
        cs = self.meta.cluster_size
        return ((offset + pos, view[pos : pos + cs]) for pos in range(0, n, cs))

    def _compress(self, chunk: memoryview) -> bytes | None:
        """One cluster compressed as QEMU stores it (a partial last cluster padded
        with zeros), or None when it is to be written as a normal cluster. Touches
        no image state: it runs in an I/O thread on the async path."""
        cs = self.meta.cluster_size
        data: Buffer = chunk if len(chunk) == cs else bytes(chunk) + bytes(cs - len(chunk))
        return compress_cluster(data, cs, self.meta.header.compression_type)

    async def write_compressed(self, offset: int, data: Buffer) -> int:
        """Write whole clusters compressed, as QEMU's ``write -c``.

        ``offset`` must be cluster aligned and the length a multiple of the cluster
        size, or end at the end of the image (its last cluster may be partial):
        else Qcow2RangeError. A cluster is compressed with the image's
        compression type; one that does not compress is written as a normal
        cluster. A compressed cluster may only go where the image has nothing
        allocated (unallocated or zero cluster): else Qcow2IOError (EIO), as
        QEMU. Refused with Qcow2UnsupportedError on encrypted images and with an
        external data file. Clusters before a failing one stay written.
        """
        if self._ops_gated:  # an exclusive operation is draining or running
            await self._admit()
        view = memoryview(data).cast("B")
        for guest, chunk in self._compressed_chunks(offset, view):
            if len(chunk) >= 32768:
                # zlib and zstd release the GIL: compress in an I/O thread (ours, never
                # the loop's default executor) while the loop serves other requests.
                payload = await to_thread(self._compress, chunk)
            else:
                payload = self._compress(chunk)
            if payload is None:
                await self._write_body(guest, chunk, None)
            else:
                await self._write_compressed_cluster(guest, payload)
        return len(view)

    async def _write_compressed_cluster(self, guest: int, payload: bytes) -> None:
        while True:
            ep = self._enter()
            try:
                await self.lock.acquire()
                try:
                    self._check_still_open()
                    self._check_size(guest, 1)
                    step = prepare_compressed(self, guest, payload)
                finally:
                    self.lock.release()
                if not isinstance(step, L2Meta):
                    # Data, then link (or free), even if the caller is cancelled.
                    await self._shielded(ep, self._finish_compressed(step, payload))
                    return
            finally:
                self._leave(ep)
            await step.wait()

    async def _finish_compressed(self, step: WriteStep, payload: bytes) -> None:
        try:
            await self._file.apwritev([payload], step.host, "write_compressed")
        except BaseException:
            await self._settle(step, ok=False)
            raise
        await self._settle(step, ok=True)

    def write_compressed_sync(self, offset: int, data: Buffer) -> int:
        """:meth:`write_compressed` without awaiting; waits (or raises ImageBusyError)
        as :meth:`write_sync` does. Each cluster is compressed before the lock is
        taken, then allocated, written and linked in one hold of the lock."""
        self._admit_sync()
        view = memoryview(data).cast("B")
        for guest, chunk in self._compressed_chunks(offset, view):
            payload = self._compress(chunk)
            if payload is None:
                self.write_sync(guest, chunk)
            else:
                self._write_compressed_cluster_sync(guest, payload)
        return len(view)

    def _write_compressed_cluster_sync(self, guest: int, payload: bytes) -> None:
        deadline = self._deadline()
        while True:
            self._take_sync(deadline)
            try:
                self._check_size(guest, 1)
                ep = self._enter()
                try:
                    step = prepare_compressed(self, guest, payload)
                    if not isinstance(step, L2Meta):
                        try:
                            self._file.pwritev([payload], step.host, "write_compressed")
                        except BaseException:
                            abort_step(self, step)
                            raise
                        commit_step(self, step)
                        return
                finally:
                    self._leave(ep)
            finally:
                self.lock.release()
            if deadline is None:
                raise ImageBusyError(f"a request in flight overlaps the cluster at {guest}")
            if not step.wait_blocking(max(0.0, deadline - time.monotonic())):
                raise WaitTimeoutError(
                    f"waited {self.wait_timeout:.1f} s for a request in flight "
                    f"overlapping the cluster at {guest} on {self.path!r}"
                )

    def writev_sync(self, offset: int, buffers: Sequence[Buffer]) -> int:
        if len(buffers) == 1:
            return self.write_sync(offset, buffers[0])
        return self.write_sync(offset, b"".join(buffers))

    def _finish_step_sync(self, step: WriteStep, chunk: memoryview) -> None:
        try:
            bufs, reads, start = self._step_buffers(step, chunk)
            for plan, view, base in reads:
                self._run_plan_sync(plan, view, base, "cow_read")
            if self._crypto is not None:
                sealed, guest = self._to_seal(step, bufs, start)
                self._crypto.encrypt(sealed, start, guest)
                bufs = [sealed]
            self._data.pwritev(bufs, start, _write_event(step))
        except BaseException:
            abort_step(self, step)
            raise
        commit_step(self, step)

    def flush_sync(self) -> None:
        """Synchronous flush; waits for the lock as :meth:`write_sync` does, or raises
        ImageBusyError."""
        if self._closed:
            raise Qcow2Error(f"image {self.path!r} is closed")
        if not self.writable:
            return
        self._take_sync(self._deadline())
        try:
            self._check_still_open()
            self._drive_sync(self._flush_steps())
        finally:
            self.lock.release()

    # --------------------------------------------------------------- resize
    async def resize(self, size: int, *, shrink: bool = False, preallocation: str = "off") -> None:
        """Change the virtual size as ``qemu-img resize [--shrink] [--preallocation=MODE]``.

        Growing makes the L1 table as large as the new size needs (a new table, one
        header write switching to it, then the old one freed); ``preallocation``
        ("off", "metadata", "falloc", "full") maps the new range as QEMU does.
        Shrinking needs ``shrink=True`` and frees every cluster past the new end.
        Waits until no request is in flight, holds the metadata lock (new requests
        wait) and does the metadata work without awaiting in the middle; see
        :mod:`qcow2aio.resize` for the crash-safe order.
        """
        from .resize import check_resize

        self._check_open()
        check_resize(self, size, shrink, preallocation)
        await self._exclusive(lambda: self._resize_job(size, shrink, preallocation), flush=True)

    def resize_sync(self, size: int, *, shrink: bool = False, preallocation: str = "off") -> None:
        """:meth:`resize` without awaiting: drains and waits for the lock like
        :meth:`close` (or ImageBusyError in a thread running an event loop)."""
        from .resize import check_resize

        self._check_open()
        check_resize(self, size, shrink, preallocation)
        self._exclusive_sync(lambda: self._resize_job(size, shrink, preallocation), flush=True)

    async def amend(self, **options: object) -> None:
        """Change format options as ``qemu-img amend -o ...``: ``compat`` ("0.10"/"v2",
        "1.1"/"v3"), ``lazy_refcounts`` (bool), ``refcount_bits`` (int), ``data_file``
        (str), ``data_file_raw`` (only False, as QEMU), ``size`` (int bytes; may shrink).
        Refusals (QEMU's messages) come before any change; the work runs exclusive like
        :meth:`resize`; see :mod:`qcow2aio.amend` for the crash-safe order."""
        from .amend import parse_amend

        plan = parse_amend(options)
        self._amend_ready()
        await self._exclusive(lambda: self._amend_job(plan), flush=True)

    def amend_sync(self, **options: object) -> None:
        """:meth:`amend` without awaiting (drains and waits like :meth:`resize_sync`)."""
        from .amend import parse_amend

        plan = parse_amend(options)
        self._amend_ready()
        self._exclusive_sync(lambda: self._amend_job(plan), flush=True)

    def _amend_ready(self) -> None:
        self._check_open()
        if not self.writable:
            raise Qcow2ReadOnlyError(f"image {self.path!r} is opened read-only")

    def _amend_job(self, plan: Any) -> None:
        from .amend import amend_locked, check_amend

        self._check_changeable("amend")
        check_amend(self, plan)
        self._run_op(lambda: amend_locked(self, plan))

    def _resize_job(self, size: int, shrink: bool, preallocation: str) -> None:
        """The metadata work of a resize, exclusive and with cached metadata written back."""
        from .resize import check_resize, resize_locked

        self._check_changeable("resize")
        check_resize(self, size, shrink, preallocation)
        self._run_op(lambda: resize_locked(self, size, preallocation))

    def _run_op(self, fn: Callable[[], None]) -> None:
        """Run an exclusive operation's work; a failed write-back poisons the image."""
        try:
            fn()
        except Qcow2Error as exc:
            if self.meta.flush_error is not None:
                self._poison(self.meta.flush_error)
            raise exc from None
        # Plain fast-path caches of mappings (read-only images) never apply here.
        self._located.clear()

    # ---------------------------------------------------------------- check
    def check(self, repair: str | None = None) -> dict[str, Any]:
        """The counts of ``qemu-img check --output=json`` (flushes a writable image first)."""
        from .check import check_image

        if repair is not None and not self.writable:
            raise Qcow2ReadOnlyError("repair needs an image opened with mode 'r+'")
        if self._closed:
            raise Qcow2Error(f"image {self.path!r} is closed")
        deadline = self._deadline()
        # One hold for the flush and the check: another thread's write in between would
        # leave dirty tables. And no allocation may be in flight (its clusters are counted
        # but not yet linked: a leak to the check, and repair would free them).
        while True:
            self._take_sync(deadline)
            blocker = self.inflight.items[0] if self.inflight.items else None
            if blocker is None:
                break
            self.lock.release()
            if deadline is None:
                raise ImageBusyError("an allocation is in flight: check it when it is linked")
            if not blocker.wait_blocking(max(0.0, deadline - time.monotonic())):
                raise WaitTimeoutError(
                    f"waited {self.wait_timeout:.1f} s for the allocations in flight on "
                    f"{self.path!r} to be linked before checking it"
                )
        try:
            self._check_still_open()
            if self.writable:
                self._drive_sync(self._check_steps())
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

    # ------------------------------------------------------------- keyslots
    @property
    def encrypted(self) -> bool:
        """True for an image whose guest data is encrypted (legacy AES or LUKS)."""
        return self._crypto is not None

    def _luks_state(self) -> tuple[PayloadCrypto, bytes]:
        """The LUKS state a keyslot change starts from (writable, unlocked)."""
        crypto = self._crypto
        if crypto is None or crypto.luks is None:
            raise Qcow2UnsupportedError(
                f"image {self.path!r} is not LUKS encrypted: only LUKS has keyslots "
                "(Only LUKS encryption options can be amended)"
            )
        if not self.writable:
            raise Qcow2ReadOnlyError("changing keyslots needs an image opened with mode 'r+'")
        crypto.check_usable()
        assert crypto.master_key is not None
        return crypto, bytes(crypto.master_key)

    def _keyslot_job(
        self, add: bool, secret: str | bytes | None, slot: int | None, iter_time: int, force: bool
    ) -> Callable[[], tuple[Any, list[tuple[int, bytes]]]]:
        """The slow part of a keyslot change (PBKDF2), as a function of nothing that
        may change meanwhile: it runs before the metadata lock is taken."""
        from .crypto.luks import add_keyslot, erase_keyslots
        from .crypto.payload import passphrase_bytes

        crypto, key = self._luks_state()
        luks = crypto.luks
        assert luks is not None
        area = self.meta.header.crypto_area
        assert area is not None
        base = area[0]

        def read(off: int, n: int) -> bytes:
            return self._file.pread(base + off, n, "crypto_read")

        if add:
            if secret is None:
                raise Qcow2PassphraseError("a new passphrase is missing")
            new = passphrase_bytes(secret)
            return lambda: add_keyslot(luks, key, new, slot=slot, iter_time_ms=iter_time)
        old = None if secret is None else passphrase_bytes(secret)
        return lambda: erase_keyslots(luks, read, old_passphrase=old, slot=slot, force=force)

    def _apply_keyslots(self, header: Any, writes: list[tuple[int, bytes]]) -> None:
        """Write a keyslot change into the LUKS area, each write made durable before
        the next (the order given: new key material before the header that makes it
        live; a header that retires a slot before its material is wiped). Runs with
        the metadata lock held, so a close or flush cannot interleave."""
        self._check_still_open()
        crypto = self._crypto
        area = self.meta.header.crypto_area
        assert crypto is not None and area is not None
        for off, data in writes:
            if off < 0 or off + len(data) > area[1]:
                raise Qcow2Error(
                    f"internal error: keyslot write at {off} (+{len(data)}) outside the "
                    f"LUKS area of {area[1]} bytes"
                )
            self._file.pwritev([data], area[0] + off, "crypto_write")
            self._file.flush("crypto_flush")
        crypto.luks = header

    async def _keyslot_change(
        self, add: bool, secret: str | bytes | None, slot: int | None, iter_time: int, force: bool
    ) -> None:
        await self._keyslot_lock.acquire()  # one keyslot change at a time
        try:
            job = self._keyslot_job(add, secret, slot, iter_time, force)
            header, writes = await to_thread(job)
            await self.lock.acquire()
            try:
                self._apply_keyslots(header, writes)
            finally:
                self.lock.release()
        finally:
            self._keyslot_lock.release()

    def _keyslot_change_sync(
        self, add: bool, secret: str | bytes | None, slot: int | None, iter_time: int, force: bool
    ) -> None:
        deadline = self._deadline()
        self._take_sync(deadline, self._keyslot_lock)
        try:
            header, writes = self._keyslot_job(add, secret, slot, iter_time, force)()
            self._take_sync(deadline)
            try:
                self._apply_keyslots(header, writes)
            finally:
                self.lock.release()
        finally:
            self._keyslot_lock.release()

    async def add_passphrase(
        self, new: str | bytes, *, slot: int | None = None, iter_time: int = 2000
    ) -> None:
        """Add a LUKS keyslot opened by ``new`` (QEMU's ``qemu-img amend -o
        encrypt.state=active,encrypt.new-secret=...[,encrypt.keyslot=N]``): the first
        inactive slot, or ``slot``, which must be inactive. ``iter_time`` is the PBKDF2
        time in milliseconds, as at create. The PBKDF2 work runs in a thread."""
        await self._keyslot_change(True, new, slot, iter_time, False)

    def add_passphrase_sync(
        self, new: str | bytes, *, slot: int | None = None, iter_time: int = 2000
    ) -> None:
        """:meth:`add_passphrase` without awaiting."""
        self._keyslot_change_sync(True, new, slot, iter_time, False)

    async def remove_passphrase(
        self, old: str | bytes | None = None, *, slot: int | None = None, force: bool = False
    ) -> None:
        """Erase the LUKS keyslots that ``old`` opens, or keyslot ``slot`` (QEMU's
        ``encrypt.state=inactive`` with ``encrypt.old-secret`` or ``encrypt.keyslot``).
        Erasing every usable slot would make the data unreadable forever: refused
        unless ``force``, as QEMU does."""
        await self._keyslot_change(False, old, slot, 2000, force)

    def remove_passphrase_sync(
        self, old: str | bytes | None = None, *, slot: int | None = None, force: bool = False
    ) -> None:
        """:meth:`remove_passphrase` without awaiting."""
        self._keyslot_change_sync(False, old, slot, 2000, force)

    # ------------------------------------------------- exclusive operations
    async def _exclusive(self, fn: Callable[[], _T], *, flush: bool = False) -> _T:
        """Drain, then run ``fn`` holding the metadata lock with no request in flight.

        For operations that change the active L1 table, the snapshot table or the
        refcount structure (QEMU drains for them): ``fn`` must not await, so no
        request sees it half done. From the call on, the admission gate is closed:
        new requests wait (``_admit``, no lock held) until the operation has finished,
        while requests already registered run to completion, so the drain ends however
        busy the image is. With ``flush``, cached metadata is written back and synced
        first (still exclusive), so ``fn`` starts from what is on disk."""
        self._gate_close()
        try:
            while True:
                await self._drain()
                await self.lock.acquire()
                if self._idle():
                    break
                # A request admitted before the gate closed registered meanwhile (it
                # was between the gate and its registration): let it finish first.
                self.lock.release()
            try:
                self._check_still_open()
                if self._closing:
                    raise Qcow2Error(f"image {self.path!r} is closing")
                if flush:
                    await self._drive_async(self._flush_steps())
                return fn()
            finally:
                self.lock.release()
        finally:
            self._gate_open()

    def _exclusive_sync(self, fn: Callable[[], _T], *, flush: bool = False) -> _T:
        """:meth:`_exclusive` without awaiting: in a thread that runs an event loop,
        ImageBusyError (nothing changed) if it would have to wait; elsewhere it waits
        up to ``wait_timeout``. New requests wait at the gate meanwhile, as there."""
        deadline = self._deadline()
        self._gate_close()
        try:
            while True:
                if deadline is not None:
                    self._drain_blocking(deadline)
                self._take_sync(deadline)
                if self._idle():
                    break
                self.lock.release()
                if deadline is None:
                    raise ImageBusyError("requests are in flight on this image")
            try:
                self._check_still_open()
                if self._closing:
                    raise Qcow2Error(f"image {self.path!r} is closing")
                if flush:
                    self._drive_sync(self._flush_steps())
                return fn()
            finally:
                self.lock.release()
        finally:
            self._gate_open()

    # ------------------------------------------------- persistent bitmaps
    def _bitmap_set(self) -> BitmapSet:
        """The image's bitmaps (read from the directory on first use when read-only)."""
        self._check_open()
        if self._bitmaps is None:
            self._bitmaps = BitmapSet(self.meta, self.size)
        return self._bitmaps

    def bitmaps(self) -> list[dict[str, Any]]:
        """The persistent dirty bitmaps as ``qemu-img info --output=json`` lists them
        (``{"name", "granularity", "flags"}``; flags "in-use" then "auto")."""
        return self._bitmap_set().info()

    def dirty_extents(
        self, name: str, offset: int = 0, length: int | None = None
    ) -> list[tuple[int, int]]:
        """The dirty guest ranges ``(start, length)`` of bitmap ``name`` in
        ``[offset, offset + length)``, merged, clipped to the request and the disk.
        BitmapNotFoundError / BitmapInconsistentError (found IN_USE at open) as QEMU."""
        if offset < 0 or (length is not None and length < 0):
            raise Qcow2RangeError(f"dirty_extents: offset={offset} length={length} is negative")
        return self._bitmap_set().get(name).extents(offset, length)

    def _bitmap_job(self, op: str, *args: Any, **kw: Any) -> Callable[[], None]:
        from . import bitmaps

        if not self.writable:
            raise Qcow2ReadOnlyError(f"image {self.path!r} is opened read-only")
        self._check_changeable("bitmap changes")
        bset = self._bitmap_set()
        return lambda: getattr(bitmaps, op)(self, bset, *args, **kw)

    async def add_bitmap(
        self, name: str, *, granularity: int = 65536, disabled: bool = False
    ) -> None:
        """``qemu-img bitmap --add [-g GRANULARITY] [--disable]``: a new bitmap, clean."""
        await self._exclusive(self._bitmap_job("op_add", name, granularity, disabled))

    def add_bitmap_sync(
        self, name: str, *, granularity: int = 65536, disabled: bool = False
    ) -> None:
        self._exclusive_sync(self._bitmap_job("op_add", name, granularity, disabled))

    async def remove_bitmap(self, name: str) -> None:
        """``qemu-img bitmap --remove`` (an inconsistent bitmap may be removed)."""
        await self._exclusive(self._bitmap_job("op_remove", name))

    def remove_bitmap_sync(self, name: str) -> None:
        self._exclusive_sync(self._bitmap_job("op_remove", name))

    async def clear_bitmap(self, name: str) -> None:
        """``qemu-img bitmap --clear``: every bit clean."""
        await self._exclusive(self._bitmap_job("op_clear", name))

    def clear_bitmap_sync(self, name: str) -> None:
        self._exclusive_sync(self._bitmap_job("op_clear", name))

    async def enable_bitmap(self, name: str) -> None:
        """``qemu-img bitmap --enable``: writes mark it again (AUTO flag)."""
        await self._exclusive(self._bitmap_job("op_enable", name, True))

    def enable_bitmap_sync(self, name: str) -> None:
        self._exclusive_sync(self._bitmap_job("op_enable", name, True))

    async def disable_bitmap(self, name: str) -> None:
        """``qemu-img bitmap --disable``: writes leave it alone."""
        await self._exclusive(self._bitmap_job("op_enable", name, False))

    def disable_bitmap_sync(self, name: str) -> None:
        self._exclusive_sync(self._bitmap_job("op_enable", name, False))

    async def merge_bitmaps(self, src: str, dst: str, *, source: Image | None = None) -> None:
        """``qemu-img bitmap --merge SRC [-b SOURCE_FILE] IMG DST``: every range dirty in
        ``src`` (of ``source``, default this image) becomes dirty in ``dst``."""
        await self._exclusive(self._bitmap_job("op_merge", src, dst, source))

    def merge_bitmaps_sync(self, src: str, dst: str, *, source: Image | None = None) -> None:
        self._exclusive_sync(self._bitmap_job("op_merge", src, dst, source))

    # ------------------------------------------------------------ snapshots
    def snapshots(self) -> list[dict[str, Any]]:
        """The internal snapshots, as ``qemu-img info --output=json`` lists them."""
        from .info import _snapshots

        return _snapshots(self)

    def load_snapshot_tmp(self, snapshot_id: str | None = None, name: str | None = None) -> None:
        """Show internal snapshot (by id, name or both, as ``qemu-img convert/measure
        -l``) instead of the active disk: the image must be open read-only, and stays
        so until closed. ``SnapshotNotFoundError`` ("Can't find snapshot") when none
        matches."""
        from . import snapshot_ops

        if self.writable:
            raise Qcow2ReadOnlyError(
                f"image {self.path!r}: a snapshot is loaded only into a read-only image"
            )
        # Drained and under the lock, as any image operation: no request holds a
        # view of the L1 table that is being replaced.
        self._exclusive_sync(lambda: snapshot_ops.load_tmp(self, snapshot_id, name))

    def _snapshot_job(self, kind: str, name: str) -> Callable[[], None]:
        from . import snapshot_ops

        self._check_writable(0, 0)
        run = getattr(snapshot_ops, kind)
        return lambda: run(self, name)

    async def create_snapshot(self, name: str) -> None:
        """Take an internal (disk-only) snapshot, as ``qemu-img snapshot -c NAME``."""
        await self._exclusive(self._snapshot_job("create", name))

    def create_snapshot_sync(self, name: str) -> None:
        """:meth:`create_snapshot` without awaiting."""
        self._exclusive_sync(self._snapshot_job("create", name))

    async def apply_snapshot(self, name_or_id: str) -> None:
        """Revert the disk to a snapshot (an id first, then a name: ``qemu-img snapshot -a``)."""
        await self._exclusive(self._snapshot_job("apply", name_or_id))

    def apply_snapshot_sync(self, name_or_id: str) -> None:
        """:meth:`apply_snapshot` without awaiting."""
        self._exclusive_sync(self._snapshot_job("apply", name_or_id))

    async def delete_snapshot(self, name_or_id: str) -> None:
        """Delete a snapshot (a name first, as ``qemu-img snapshot -d``, then an id)."""
        await self._exclusive(self._snapshot_job("delete", name_or_id))

    def delete_snapshot_sync(self, name_or_id: str) -> None:
        """:meth:`delete_snapshot` without awaiting."""
        self._exclusive_sync(self._snapshot_job("delete", name_or_id))

    # ------------------------------------------------ chain operations (tools)
    async def make_empty(self) -> None:
        """Make every cluster unallocated, so the image reads as its backing file again
        (what ``qemu-img commit`` leaves in the committed image unless ``-d``).

        Exclusive like :meth:`resize`; the entries are unlinked in the L2 tables and
        written back by the flush that follows, and the clusters they held are freed
        only after that (a crash leaks, never links a freed cluster)."""
        self._check_writable(0, 0)
        await self._exclusive(self._empty_job, flush=True)
        await self.flush()

    def make_empty_sync(self) -> None:
        """:meth:`make_empty` without awaiting (drains and waits like :meth:`resize_sync`)."""
        self._check_writable(0, 0)
        self._exclusive_sync(self._empty_job, flush=True)
        self.flush_sync()

    def _empty_job(self) -> None:
        self._check_changeable("make_empty")
        cs = self.meta.cluster_size
        end = (self.size + cs - 1) & ~(cs - 1)

        def unlink_all() -> None:
            zero_clusters(self, 0, end, unmap=True, discard=True, unallocate=True)

        self._run_op(unlink_all)

    async def set_backing(
        self, name: str | None, fmt: str | None = None, *, open_new: bool = True
    ) -> None:
        """Name another backing file in the header (``qemu-img rebase`` switches with
        this once the data is in place; ``None`` removes the backing file).

        With ``open_new`` the new backing file is opened first (a failure changes
        nothing) and replaces the old one for reads once the header names it; without,
        the image reads unallocated ranges as zeros from then on (as one opened without
        its backing file). One cluster-0 write, flushed, under :meth:`_exclusive`."""
        self._amend_ready()
        await self._exclusive(lambda: self._backing_job(name, fmt, open_new), flush=True)

    def set_backing_sync(
        self, name: str | None, fmt: str | None = None, *, open_new: bool = True
    ) -> None:
        """:meth:`set_backing` without awaiting."""
        self._amend_ready()
        self._exclusive_sync(lambda: self._backing_job(name, fmt, open_new), flush=True)

    def _backing_job(self, name: str | None, fmt: str | None, open_new: bool) -> None:
        from .amend import _rewrite_cluster0 as rewrite_cluster0

        self._check_changeable("rebase")
        new = self._open_backing(name, fmt) if name is not None and open_new else None
        try:
            self._run_op(
                lambda: rewrite_cluster0(
                    self.meta, backing_file=name, backing_format=fmt if name else None
                )
            )
        except BaseException:
            if new is not None:
                new.close()
            raise
        old, self.backing = self.backing, new
        if old is not None:
            old.close()

    async def reopen_backing(self) -> None:
        """Reopen the backing chain from the header (after a job wrote into an image of
        the chain through another handle: the read-only handles here may cache its old
        tables). Exclusive, so no read is using the old chain meanwhile."""
        self._check_open()
        await self._exclusive(self._reopen_job)

    def reopen_backing_sync(self) -> None:
        """:meth:`reopen_backing` without awaiting."""
        self._check_open()
        self._exclusive_sync(self._reopen_job)

    def _reopen_job(self) -> None:
        hdr = self.meta.header
        new = (
            self._open_backing(hdr.backing_file, hdr.backing_format)
            if hdr.backing_file is not None
            else None
        )
        old, self.backing = self.backing, new
        self._located.clear()
        self._located_files.clear()
        if old is not None:
            old.close()

    # ---------------------------------------------------------------- close
    def _close_files(self) -> None:
        if self._crypto is not None:
            self._crypto.forget()
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self._data is not self._file:
            self._data.close()
        self._file.close()

    def close(self) -> None:
        """Flush (a writable image), mark it clean, and close the files.

        In a thread without a running event loop this drains first, as :meth:`aclose`
        does (new requests refused, requests of every thread and loop in flight
        finished), waiting at most ``wait_timeout``. In a thread that runs a loop it
        cannot wait: if a suspended request holds the lock it closes the files without
        writing back (a crash-equivalent: leaks at most) and raises ImageBusyError.
        """
        if self._closed:
            return
        deadline = self._deadline()
        if deadline is not None:
            self._close_draining(deadline)
            return
        try:
            if self.writable and not self._is_poisoned() and not self.meta.header.corrupt:
                self._take_sync(None)
                try:
                    assert self.meta.writeback is not None
                    self._drive_sync(self._close_steps())
                finally:
                    self.lock.release()
        finally:
            self._closed = True
            self._close_files()

    def _close_draining(self, deadline: float) -> None:
        self._closing = True
        try:
            while True:
                self._drain_blocking(deadline)
                self._take_sync(deadline)
                if self._idle():
                    break
                self.lock.release()
        except WaitTimeoutError:
            # Give up as the loop-thread close does: no writeback, files closed.
            self._closed = True
            self._close_files()
            raise
        self._write_back_and_close()

    def _write_back_and_close(self) -> None:
        """The end of a draining close, lock held and nothing in flight."""
        if self._closed:  # another close finished while we waited for the lock
            self.lock.release()
            return
        try:
            if self.writable and not self._is_poisoned() and not self.meta.header.corrupt:
                self._drive_sync(self._close_steps())
        finally:
            self._closed = True
            self.lock.release()
            self._close_files()

    def _check_steps(self) -> Iterator[str]:
        """A flush, then the refcount blocks it left dirty (frees it applied; lazy
        refcounts): the check reads the tables as they are on disk."""
        assert self.meta.writeback is not None
        yield from self._flush_steps()
        if self.meta.refblock_cache.dirty() or self.meta.reftable.dirty:
            yield from self.meta.writeback.refblock_steps()
            yield "refblocks"

    def _close_steps(self) -> Iterator[str]:
        assert self.meta.writeback is not None and self.meta.allocator is not None
        yield from self._flush_steps()
        if self._bitmaps is not None and self._bitmaps.dirty:
            yield from self._bitmaps.store_steps()
        yield from self.meta.writeback.close_steps()
        if self.discard_mode == "unmap" and self._truncate_free_tail():
            yield "close_truncate"

    def _truncate_free_tail(self) -> bool:
        """With discard "unmap": cut the free clusters at the end of the image file
        when a discard (or write-zeroes with unmap) of this session freed some of them.

        QEMU never truncates at close; we do so only for space a discard gave back
        (the hole punching of the tail, so to say), so that other operations leave
        the file exactly as QEMU's tools would. Run at close, after the last flush
        applied every free it could and the refcount blocks are written back:
        everything past the last cluster with a nonzero refcount is referenced by
        nothing on disk. Frees still queued keep their clusters counted, so they are
        not cut. True if the file was cut."""
        alloc = self.meta.allocator
        assert alloc is not None
        if alloc.pending or self.meta.refblock_cache.dirty() or self.meta.reftable.dirty:
            return False
        size = self._file.size()
        end = (alloc.last_used_cluster(size) + 1) << self.meta.cluster_bits
        if end <= 0 or end >= size or alloc.discarded_end <= end:
            return False
        self._file.truncate(end, "close_truncate")
        return True

    async def aclose(self) -> None:
        """Drain, then close like :meth:`close`.

        As QEMU drains a block device before closing it: from the call on, new
        requests are refused (``Qcow2Error``: closing); requests already in flight (of
        every thread and loop) run to completion, their clusters linked and their
        deferred frees applied, so closing under load neither fails them nor leaks. If
        ``aclose`` is cancelled while draining, the image stays closing: call it again
        to finish.
        """
        if self._closed:
            return
        self._closing = True
        # Then hold the lock with nothing in flight: nothing can start meanwhile, and
        # whoever gets the lock after us finds the image closed instead of changing
        # cached metadata nobody will write back.
        while True:
            await self._drain()
            if self.writable:
                await self.lock.acquire()
            else:
                # Only ever held for a mapping: wait in place, queue behind no coroutine.
                self.lock.acquire_blocking(self.wait_timeout)
            if self._idle():
                break
            self.lock.release()
        if self._closed:  # another close finished while we waited for the lock
            self.lock.release()
            return
        try:
            if self.writable and not self._is_poisoned() and not self.meta.header.corrupt:
                await self._drive_async(self._close_steps())
        finally:
            self._closed = True
            self.lock.release()
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
