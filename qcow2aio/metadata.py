"""Format metadata of one open image: header, L1, cached L2 tables, refcounts, snapshots.

Everything here is synchronous and is only called with the image's metadata
lock held (or from the synchronous fast path, which owns the image for the
whole call). No method awaits, so a metadata read-modify-write here can never
be interleaved with another request: that is the rule that keeps QEMU's 2009
bug out (see docs/concurrency.md). Metadata I/O is small and usually hits the
page cache, so doing it inline costs less than a thread hop would.
"""

from __future__ import annotations

import struct
from array import array

from . import constants as C
from .cache import LRUCache
from .errors import Qcow2CorruptError, Qcow2FormatError
from .header import Header, parse_header
from .io import FileBackend
from .refcount import RefcountBlock
from .snapshot import Snapshot, parse_snapshots
from .tables import Table, decode_be64

DEFAULT_L2_CACHE_BYTES = 32 << 20
DEFAULT_REFCOUNT_CACHE_BYTES = 4 << 20
_SNAP_HDR = struct.Struct(">QIHHIIQII")


class Metadata:
    """The metadata state of one image file, read and validated at open."""

    def __init__(
        self,
        file: FileBackend,
        *,
        writable: bool,
        l2_cache_size: int | None = None,
        refcount_cache_size: int | None = None,
    ) -> None:
        self.file = file
        self.writable = writable
        file_size = file.size()
        cluster0 = file.pread(0, min(file_size, 1 << C.MAX_CLUSTER_BITS), "header_read")
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

        # Active L1 table, sized by the validated l1_size (<= 32 MiB).
        raw_l1 = file.pread(hdr.l1_table_offset, hdr.l1_size * 8, "l1_load") if hdr.l1_size else b""
        self.l1 = Table(hdr.l1_table_offset, decode_be64(raw_l1))

        l2_bytes = DEFAULT_L2_CACHE_BYTES if l2_cache_size is None else l2_cache_size
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
        self.snapshots: list[Snapshot] = self._read_snapshots()

    # ------------------------------------------------------------- snapshots
    def _read_snapshots(self) -> list[Snapshot]:
        hdr = self.header
        if hdr.nb_snapshots == 0:
            return []
        # Read entry by entry: each is bounded (40 + 1024 + 2 * 65535 bytes) and the
        # table as a whole by QCOW_MAX_SNAPSHOTS_SIZE, so memory stays bounded.
        parts: list[bytes] = []
        pos = hdr.snapshots_offset
        total = 0
        for i in range(hdr.nb_snapshots):
            head = self.file.pread(pos, _SNAP_HDR.size, "snapshot_load")
            _, _, id_len, name_len, _, _, _, _, extra = _SNAP_HDR.unpack(head)
            if extra > C.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
                raise Qcow2FormatError(
                    f"Too much extra metadata in snapshot table entry {i}: extra_data_size={extra}"
                )
            entry_len = (_SNAP_HDR.size + extra + id_len + name_len + 7) & ~7
            total += entry_len
            if total > C.QCOW_MAX_SNAPSHOTS_SIZE:
                raise Qcow2FormatError(f"Snapshot table too large: {total} bytes")
            parts.append(
                head
                + self.file.pread(pos + _SNAP_HDR.size, entry_len - _SNAP_HDR.size, "snapshot_load")
            )
            pos += entry_len
        return parse_snapshots(b"".join(parts), hdr.nb_snapshots, self.cluster_size)

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

    def l2_entries_array(self, l2_offset: int) -> array[int]:
        return self.l2_table(l2_offset).entries

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

    # ------------------------------------------------------------- writeback
    # Placeholders until the write path installs ordering-aware hooks; a read-only
    # image never dirties a table, so reaching these is a bug.
    def _writeback_l2(self, table: Table) -> None:
        raise AssertionError(f"dirty L2 table {table.offset:#x} on a read-only image")

    def _writeback_refblock(self, blk: RefcountBlock) -> None:
        raise AssertionError(f"dirty refcount block {blk.offset:#x} on a read-only image")
