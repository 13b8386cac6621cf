"""Format metadata of one open image: header, L1, cached L2 tables, refcounts, snapshots.

Everything here is synchronous and is only called with the image's metadata
lock held (or from the synchronous fast path, which owns the image for the
whole call). No method awaits, so a metadata read-modify-write here can never
be interleaved with another request: that is the rule that keeps QEMU's 2009
bug out (see docs/concurrency.md). Metadata I/O is small and usually hits the
page cache, so doing it inline costs less than a thread hop would.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

from . import constants as C
from .cache import LRUCache
from .errors import Qcow2CorruptError, Qcow2Error, Qcow2IOError
from .header import Header, parse_header
from .io import FileBackend
from .overlap import MetaMap
from .refcount import RefcountBlock
from .snapshot import Snapshot, read_snapshot_table, validate_snapshot_l1
from .tables import Table, decode_be64, read_table

if TYPE_CHECKING:
    from .allocator import Allocator
    from .writeback import Writeback

DEFAULT_L2_CACHE_BYTES = 32 << 20
DEFAULT_REFCOUNT_CACHE_BYTES = 4 << 20


class Metadata:
    """The metadata state of one image file, read and validated at open."""

    def __init__(
        self,
        file: FileBackend,
        *,
        writable: bool,
        l2_cache_size: int | None = None,
        refcount_cache_size: int | None = None,
        check: bool = False,
    ) -> None:
        # ``check``: opened for ``qemu-img check`` (BDRV_O_CHECK), which leaves the
        # snapshot table unread; the check reads, reports and repairs it (check.py).
        self.file = file
        self.writable = writable
        file_size = file.size()
        cluster0 = file.pread(0, min(file_size, 1 << C.MAX_CLUSTER_BITS), "header_read")
        if check:
            cluster0 = cluster0[:60] + bytes(12) + cluster0[72:]  # nb_snapshots, snapshots_offset
        hdr = parse_header(cluster0, writable=writable)
        self.header: Header = hdr
        self.cluster_bits = hdr.cluster_bits
        self.cluster_size = hdr.cluster_size
        self.l2_bits = hdr.l2_bits
        self.l2_entries = 1 << hdr.l2_bits
        self.extended_l2 = hdr.extended_l2
        self.version = hdr.version
        self.has_data_file = hdr.has_data_file
        self.subcluster_bits = hdr.cluster_bits - 5 if hdr.extended_l2 else hdr.cluster_bits
        # Derived once for mapping.map_plain, the per-request fast path.
        self.plain_layout = not (hdr.extended_l2 or hdr.has_data_file)
        self.l1_shift = hdr.cluster_bits + hdr.l2_bits  # guest offset >> l1_shift = L1 index
        self.cluster_mask = hdr.cluster_size - 1
        self.l2_mask = self.l2_entries - 1

        # Active L1 table, sized by the validated l1_size (<= 32 MiB).
        self.l1 = Table(hdr.l1_table_offset, read_table(file, hdr.l1_table_offset, hdr.l1_size))

        l2_bytes = DEFAULT_L2_CACHE_BYTES if l2_cache_size is None else l2_cache_size
        # A default-sized L2 cache covers the disk (up to 32 MiB): a resize may grow it.
        self.l2_cache_default = l2_cache_size is None
        # Tables needed to cover the whole disk: never cache more than that.
        cover = max(1, hdr.l1_size)
        self.l2_cache: LRUCache[Table] = LRUCache(
            max(1, min(cover, l2_bytes // self.cluster_size))
            if l2_cache_size is None
            else max(1, l2_bytes // self.cluster_size),
            self._writeback_l2,
        )
        rc_bytes = (
            DEFAULT_REFCOUNT_CACHE_BYTES if refcount_cache_size is None else refcount_cache_size
        )
        self.refblock_cache: LRUCache[RefcountBlock] = LRUCache(
            max(1, rc_bytes // self.cluster_size), self._writeback_refblock
        )
        raw_rt = file.pread(
            hdr.refcount_table_offset,
            hdr.refcount_table_clusters * self.cluster_size,
            "reftable_load",
        )
        self.reftable = Table(hdr.refcount_table_offset, decode_be64(raw_rt))
        self.snapshot_table_end = hdr.snapshots_offset
        self.snapshots: list[Snapshot] = self._read_snapshots()
        # Write support (see enable_writes); None/empty on read-only images.
        self.allocator: Allocator | None = None
        self.writeback: Writeback | None = None
        self.data_file: FileBackend | None = None
        self.meta_map = MetaMap(self.cluster_bits)
        # The bitmap directory in use (offset, length), kept by qcow2aio.bitmaps: one of
        # QEMU's overlap checks, so every rebuild of the map includes it.
        self.bitmap_directory: tuple[int, int] | None = None
        # The first failure after which cached metadata must never be written back
        # (sticky until reopen): a failed fdatasync (the kernel may have dropped dirty
        # pages) or a refcount-table growth that could not switch. The owning Image
        # then refuses writes and flushes, and evictions refuse to write.
        self.flush_error: Qcow2Error | None = None

    # ------------------------------------------------------------- snapshots
    def _read_snapshots(self) -> list[Snapshot]:
        # Bounded like QEMU (<= 1024 bytes of extra data an entry, <= 64 MiB in all);
        # the snapshots' own L1 tables are checked when used (validate_snapshot_l1).
        hdr = self.header
        snaps, self.snapshot_table_end = read_snapshot_table(
            self.file, hdr.snapshots_offset, hdr.nb_snapshots
        )
        if self.writable:
            # The overlap map covers every snapshot's L1 table: a bogus size would make
            # it huge. QEMU opens such an image read-write but then refuses every write
            # (the inactive-L1 overlap check), so refusing the open loses nothing.
            for i, snap in enumerate(snaps):
                validate_snapshot_l1(snap, i, self.cluster_size)
        return snaps

    # -------------------------------------------------------------------- L2
    def l2_offset_for(self, l1_index: int) -> int:
        """Host offset of the L2 table for ``l1_index`` (0 = not allocated)."""
        if l1_index >= len(self.l1.entries):
            return 0
        entry = self.l1.entries[l1_index]
        if entry & C.L1E_RESERVED_MASK:
            raise Qcow2CorruptError(f"Reserved bits set in L1 entry {l1_index}: {entry:#018x}")
        off: int = entry & C.L1E_OFFSET_MASK
        if off & (self.cluster_size - 1):
            raise Qcow2CorruptError(f"L2 table offset {off:#x} unaligned (L1 index: {l1_index:#x})")
        return off

    def l2_table(self, l2_offset: int) -> Table:
        """The L2 table at ``l2_offset``, from the cache or loaded into it."""
        table = self.l2_cache.get(l2_offset)
        if table is None:
            nwords = self.cluster_size // 8
            raw = self.file.pread(l2_offset, nwords * 8, "l2_load")
            table = Table(l2_offset, decode_be64(raw))
            self.l2_cache.insert(table)
        return table

    # ------------------------------------------------------------- refcounts
    def refblock(self, rt_index: int) -> RefcountBlock | None:
        """Refcount block ``rt_index`` of the reftable, or None when not allocated."""
        if rt_index >= len(self.reftable.entries):
            return None
        entry = self.reftable.entries[rt_index]
        if entry & C.REFT_RESERVED_MASK:
            raise Qcow2CorruptError(
                f"Reserved bits set in refcount table entry {rt_index}: {entry:#x}"
            )
        off = entry & C.REFT_OFFSET_MASK
        if off == 0:
            return None
        if off & (self.cluster_size - 1):
            raise Qcow2CorruptError(
                f"Refblock offset {off:#x} unaligned (reftable index: {rt_index:#x})"
            )
        blk = self.refblock_cache.get(off)
        if blk is None:
            raw = self.file.pread(off, self.cluster_size, "refblock_load")
            blk = RefcountBlock(off, bytearray(raw), self.header.refcount_order)
            self.refblock_cache.insert(blk)
        return blk

    def get_refcount(self, cluster_index: int) -> int:
        bits = self.cluster_bits + 3 - self.header.refcount_order
        blk = self.refblock(cluster_index >> bits)
        if blk is None:
            return 0
        return blk.get(cluster_index & ((1 << bits) - 1))

    def reload_refcounts(self) -> None:
        """Re-read the refcount table after a repair rewrote refcount structures on disk."""
        hdr = self.header
        raw = self.file.pread(
            hdr.refcount_table_offset,
            hdr.refcount_table_clusters * self.cluster_size,
            "reftable_load",
        )
        self.reftable = Table(hdr.refcount_table_offset, decode_be64(raw))
        self.refblock_cache.clear()
        if self.allocator is not None:
            self.allocator.free_cluster_index = 0
        if self.meta_map:
            self._build_meta_map()

    # ------------------------------------------------------------- writeback
    def _writeback_l2(self, table: Table) -> None:
        if self.writeback is None:
            raise AssertionError(f"dirty L2 table {table.offset:#x} on a read-only image")
        self.writeback.evict_l2(table)

    def _writeback_refblock(self, blk: RefcountBlock) -> None:
        if self.writeback is None:
            raise AssertionError(f"dirty refcount block {blk.offset:#x} on a read-only image")
        self.writeback.evict_refblock(blk)

    def flush_files(self, event: str = "flush") -> None:
        """Make the image file (and an external data file) durable, synchronously.

        A failure is remembered in :attr:`flush_error` (the image is then poisoned).
        """
        try:
            if self.data_file is not None:
                self.data_file.flush(event)
            self.file.flush(event)
        except Qcow2Error as exc:
            self.poison(exc)
            raise

    def poison(self, exc: Qcow2Error) -> None:
        """Remember the first failure that forbids any further metadata writeback."""
        if self.flush_error is None:
            self.flush_error = exc

    def refuse_if_poisoned(self) -> None:
        if self.flush_error is not None:
            raise Qcow2IOError(
                f"metadata writeback refused after an earlier failure ({self.flush_error}); "
                "reopen the image",
                getattr(self.flush_error, "errno", None) or errno.EIO,
            )

    def allocator_frees_durable(self) -> None:
        if self.allocator is not None:
            self.allocator.mark_frees_durable()

    # ------------------------------------------------------ write support
    def enable_writes(self, data_file: FileBackend | None) -> None:
        """Set up allocation, writeback and the overlap map for a read-write image."""
        from .allocator import Allocator
        from .writeback import Writeback

        self.data_file = data_file
        self.allocator = Allocator(self)
        self.writeback = Writeback(self)
        self._build_meta_map()

    def _build_meta_map(self) -> None:
        """Which host clusters hold metadata, for QEMU-style overlap checks ("cached" level)."""
        hdr = self.header
        self.meta_map.clear()
        self.add_meta_range(0, self.cluster_size, "header")
        self.add_meta_range(hdr.l1_table_offset, hdr.l1_size * 8, "l1")
        self.add_meta_range(
            hdr.refcount_table_offset, hdr.refcount_table_clusters * self.cluster_size, "reftable"
        )
        for entry in self.reftable.entries:
            off = entry & C.REFT_OFFSET_MASK
            if off:
                self.add_meta_range(off, self.cluster_size, "refblock")
        for entry in self.l1.entries:
            off = entry & C.L1E_OFFSET_MASK
            if off:
                self.add_meta_range(off, self.cluster_size, "l2")
        if self.bitmap_directory is not None:
            self.add_meta_range(*self.bitmap_directory, "bitmap_directory")
        if hdr.crypto_area is not None:
            # Not one of QEMU's overlap checks, but a guest write landing on the LUKS
            # header or keyslots would lose every passphrase: refused the same way.
            self.add_meta_range(hdr.crypto_area[0], hdr.crypto_area[1], "crypto_header")
        if hdr.nb_snapshots:
            end = self.snapshot_table_end
            self.add_meta_range(hdr.snapshots_offset, end - hdr.snapshots_offset, "snapshot_table")
            self.meta_map.add_many(
                [(snap.l1_table_offset, snap.l1_size * 8, "inactive_l1") for snap in self.snapshots]
            )

    def add_meta_cluster(self, offset: int, kind: str = "refblock") -> None:
        self.meta_map.add(offset, self.cluster_size, kind)

    def add_meta_range(self, offset: int, length: int, kind: str = "reftable") -> None:
        self.meta_map.add(offset, length, kind)

    def remove_meta_range(self, offset: int, length: int) -> None:
        self.meta_map.remove(offset, length)

    def check_data_write(self, host: int, length: int) -> None:
        """QEMU's pre-write overlap check for guest data going into the image file."""
        if not self.meta_map:
            return
        for kind in self.meta_map.kinds_in(host, length):
            self.mark_corrupt(
                f"Preventing invalid write on metadata (overlaps with {kind}): "
                f"data write at {host:#x}+{length:#x}"
            )

    def check_meta_write(self, offset: int, length: int, kind: str) -> None:
        """A metadata write must stay inside clusters known to hold that kind of table."""
        culprit = self.meta_map.only(offset, length, kind)
        if culprit is not None:
            self.mark_corrupt(
                f"Preventing invalid write on metadata (overlaps with {culprit}): "
                f"{kind} write at {offset:#x}+{length:#x}"
            )

    def mark_corrupt(self, reason: str) -> None:
        """Set the corrupt bit (one small header write) and refuse the operation."""
        hdr = self.header
        if self.writable and not hdr.corrupt:
            hdr.incompatible_features |= C.INCOMPAT_CORRUPT
            try:
                self.file.pwrite(struct.pack(">Q", hdr.incompatible_features), 72, "header_update")
                self.file.flush("header_update")
            except Qcow2Error:
                pass
        raise Qcow2CorruptError(f"Marking image as corrupt: {reason}")
