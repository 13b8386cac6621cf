"""Writing cached metadata back in an order that a crash can only turn into leaks.

The ordering rules (docs/concurrency.md):

1. refcount blocks and refcount-table entries are written, then a flush makes
   them durable together with all data and COW written so far;
2. only then are L2 tables written (so no durable L2 entry ever points at a
   cluster whose refcount increase or data is not durable);
3. a dirty L1 table is written after another flush (its new L2 tables are
   durable first);
4. a final flush; then decreases queued by frees become applicable, because
   the unlinking L1/L2 writes are durable.

With lazy refcounts, steps 1-2 are not ordered; instead the dirty bit is made
durable before the first L2 table is written, and a dirty image is repaired
on its next read-write open.

The sequence is a generator: each ``yield`` asks the driver to make the file
durable. The synchronous driver calls ``fdatasync`` inline; the async driver
awaits it in a worker thread while holding the metadata lock in "readers
allowed" mode. One implementation, two drivers.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import constants as C
from .refcount import RefcountBlock
from .tables import Table

if TYPE_CHECKING:
    from .metadata import Metadata


class Writeback:
    def __init__(self, meta: Metadata) -> None:
        self.meta = meta
        # Whether the on-disk header has the dirty bit (lazy refcounts).
        self.dirty_on_disk = meta.header.dirty

    @property
    def lazy(self) -> bool:
        return self.meta.header.lazy_refcounts

    # ---------------------------------------------------------- pieces
    def write_refblocks(self) -> None:
        """Write every dirty refcount block and the refcount table if it changed
        (synchronously: for eviction and table growth, which already run inline)."""
        for _ in self.refblock_steps():
            self.meta.flush_files("reftable_update")

    def refblock_steps(self) -> Iterator[str]:
        """Refcount blocks, then (after a sync point) the refcount-table entries.

        New refcount blocks are made durable before the table entries that point at
        them (QEMU flushes there too): else a crash can leave an entry pointing past
        the end of the file or at stale bytes, i.e. refcounts below the references.
        A generator, so the async flush awaits that sync instead of blocking the loop.
        """
        meta = self.meta
        for blk in meta.refblock_cache.dirty():
            self._write_refblock(blk)
        rt = meta.reftable
        if rt.dirty and rt.offset:
            yield "reftable_update"
            meta.check_meta_write(rt.offset, len(rt.entries) * 8, "reftable")
            meta.file.pwrite(rt.to_bytes(), rt.offset, "reftable_update")
            rt.dirty = False

    def _write_refblock(self, blk: RefcountBlock) -> None:
        self.meta.check_meta_write(blk.offset, len(blk.data), "refblock")
        event = "refblock_alloc" if blk.fresh else "refblock_update"
        self.meta.file.pwrite(blk.to_bytes(), blk.offset, event)
        blk.dirty = blk.fresh = False

    def _write_l2(self, table: Table) -> None:
        self.meta.check_meta_write(table.offset, len(table.entries) * 8, "l2")
        event = "l2_alloc" if table.fresh else "l2_update"
        self.meta.file.pwrite(table.to_bytes(), table.offset, event)
        table.dirty = table.fresh = False

    def _mark_dirty_bit(self) -> bool:
        """Set the dirty bit in the header; True when the caller must flush before L2 writes."""
        if self.dirty_on_disk:
            return False
        hdr = self.meta.header
        hdr.incompatible_features |= C.INCOMPAT_DIRTY
        self.meta.file.pwrite(struct.pack(">Q", hdr.incompatible_features), 72, "header_update")
        self.dirty_on_disk = True
        return True

    # ------------------------------------------------------- eviction
    def evict_l2(self, table: Table) -> None:
        """Called by the L2 cache before dropping a dirty table (synchronous)."""
        meta = self.meta
        meta.refuse_if_poisoned()
        if self.lazy:
            self._mark_dirty_bit()
        else:
            self.write_refblocks()
        meta.flush_files("l2_evict")
        self._write_l2(table)

    def evict_refblock(self, blk: RefcountBlock) -> None:
        # Decreases are applied only once safe, so a refcount block may always go out
        # (unless a failure poisoned the image: then nothing may).
        self.meta.refuse_if_poisoned()
        self._write_refblock(blk)

    # ---------------------------------------------------------- flush
    def flush_steps(self) -> Iterator[str]:
        """The flush sequence; each yielded name is a point where the files must be synced."""
        meta = self.meta
        dirty_l2 = meta.l2_cache.dirty()
        if self.lazy:
            if dirty_l2:
                # Rule 2 holds in lazy mode too: data and COW must be durable before an
                # L2 entry points at them. The same fsync makes a new dirty bit durable.
                self._mark_dirty_bit()
                yield "dirty_bit"
        else:
            yield from self.refblock_steps()
            if dirty_l2 or meta.l1.dirty:
                yield "refblocks"
        for table in dirty_l2:
            self._write_l2(table)
        if meta.l1.dirty:
            yield "l2_tables"
            self.write_l1()
        yield "flush"
        meta.allocator_frees_durable()

    def write_l1(self) -> None:
        meta = self.meta
        l1 = meta.l1
        meta.check_meta_write(l1.offset, len(l1.entries) * 8, "l1")
        meta.file.pwrite(l1.to_bytes(), l1.offset, "l1_update")
        l1.dirty = False

    def close_steps(self) -> Iterator[str]:
        """Flush everything, then the refcounts too (lazy mode), then mark the image clean."""
        yield from self.flush_steps()
        meta = self.meta
        if meta.refblock_cache.dirty() or meta.reftable.dirty:
            yield from self.refblock_steps()
            yield "refblocks"
        if self.dirty_on_disk:
            hdr = meta.header
            hdr.incompatible_features &= ~C.INCOMPAT_DIRTY
            meta.file.pwrite(struct.pack(">Q", hdr.incompatible_features), 72, "header_update")
            self.dirty_on_disk = False
            yield "mark_clean"
