"""Cluster allocation and refcount updates (the write side of the refcount structures).

Rules this module keeps (docs/concurrency.md, "write ordering"):

* Increases are applied at once in the refcount-block cache; they reach the
  disk before any L2 entry that points at the cluster (the writeback in
  :mod:`qcow2aio.writeback` writes refcount blocks, fsyncs, then L2 tables).
* Decreases of clusters that were ever linked are *deferred* (``free_later``):
  they are applied only after the unlinking L1/L2 write is durable and after
  every request that might still hold the old mapping has finished, so a freed
  cluster can never be handed out while someone still reads or writes it.
* Refcount blocks describe themselves when they can (QEMU does the same), and
  the refcount table grows by writing a new table elsewhere and switching the
  header with one small write.

Allocation is first-fit from ``free_cluster_index`` upwards, like QEMU's
``alloc_clusters_noref``; the index is lowered again when a cluster is freed.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import constants as C
from .errors import Qcow2CorruptError, Qcow2Error
from .refcount import RefcountBlock
from .tables import Table

if TYPE_CHECKING:
    from .metadata import Metadata


@dataclass(slots=True)
class PendingFree:
    """A refcount decrease waiting for its unlink to be durable and its readers to finish."""

    offset: int  # host byte offset (for compressed ranges: the sector-aligned start)
    length: int  # bytes
    epoch: int  # requests registered at or before this epoch may still use the range
    durable: bool = False  # set once a flush has made the unlink durable


class Allocator:
    """Refcount bookkeeping for one writable image."""

    def __init__(self, meta: Metadata) -> None:
        self.meta = meta
        self.cluster_bits = meta.cluster_bits
        self.cluster_size = meta.cluster_size
        self.order = meta.header.refcount_order
        # Refcount entries per block, as a shift.
        self.rb_bits = meta.cluster_bits + 3 - self.order
        self.refcount_max = (1 << (1 << self.order)) - 1
        self.free_cluster_index = 0
        self.pending: list[PendingFree] = []
        self.max_clusters = (C.QCOW_MAX_CLUSTER_OFFSET + 1) >> meta.cluster_bits

    # ------------------------------------------------------------ lookups
    def refcount(self, cluster: int) -> int:
        return self.meta.get_refcount(cluster)

    def _find_free(self, n: int) -> int:
        """First run of ``n`` free clusters at or after ``free_cluster_index``."""
        meta = self.meta
        rb_bits = self.rb_bits
        mask = (1 << rb_bits) - 1
        start = self.free_cluster_index
        if (start + n - 1) >> rb_bits == start >> rb_bits and start + n <= self.max_clusters:
            # The usual case, a growing image: the run at the start is free and inside
            # one existing refcount block. One slice test instead of one per cluster.
            blk = meta.refblock(start >> rb_bits)
            if blk is not None and blk.is_free_run(start & mask, n):
                self.free_cluster_index = start + n
                return start
        i = start
        while i - start < n:
            if i >= self.max_clusters:
                raise Qcow2Error(f"Image file full: no free cluster below 2^56 (cluster index {i})")
            blk = meta.refblock(i >> rb_bits)
            if blk is None:
                # A whole refcount block's range is free: jump over it.
                i = ((i >> rb_bits) + 1) << rb_bits
                continue
            if blk.get(i & mask):
                i += 1
                start = i
            else:
                i += 1
        self.free_cluster_index = start + n
        return start

    # ---------------------------------------------------------- updating
    def update_refcount(self, offset: int, length: int, addend: int) -> None:
        """Add ``addend`` to the refcount of each cluster touched by ``[offset, offset+length)``."""
        if length <= 0:
            return
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        mask = (1 << self.rb_bits) - 1
        for cluster in range(first, last + 1):
            rt_index = cluster >> self.rb_bits
            blk = self.ensure_refblock(rt_index) if addend > 0 else self.meta.refblock(rt_index)
            if blk is None:
                raise Qcow2CorruptError(
                    f"Refcount of cluster {cluster} would drop below 0: no refcount block "
                    f"(reftable index {rt_index})"
                )
            old = blk.get(cluster & mask)
            new = old + addend
            if new < 0:
                raise Qcow2CorruptError(
                    f"Refcount of cluster {cluster} would drop below 0: refcount={old}"
                )
            if new > self.refcount_max:
                raise Qcow2Error(
                    f"Refcount of cluster {cluster} would overflow: refcount={old}, "
                    f"refcount_bits={1 << self.order}"
                )
            blk.set(cluster & mask, new)
            if new == 0 and cluster < self.free_cluster_index:
                self.free_cluster_index = cluster

    def alloc_clusters(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters (refcount 1 each); returns the host offset."""
        self.meta.file.event("cluster_alloc")
        mask = (1 << self.rb_bits) - 1
        while True:
            saved = self.free_cluster_index
            start = self._find_free(n)
            for rt in range(start >> self.rb_bits, ((start + n - 1) >> self.rb_bits) + 1):
                if self.meta.refblock(rt) is None:
                    # The run lies (partly) where no refcount block exists yet. Create
                    # the block first (it takes the lowest free cluster, as QEMU's
                    # does), then search again: the run may have moved.
                    self.free_cluster_index = saved
                    self.ensure_refblock(rt)
                    break
            else:
                # Every refcount of the run is 0: count it one slice per block. Each
                # block is looked up as it is changed (with a one-block cache, looking
                # up the next one evicts the last, so no reference is kept across).
                pos, end = start, start + n
                while pos < end:
                    stop = min(end, ((pos >> self.rb_bits) + 1) << self.rb_bits)
                    blk = self.meta.refblock(pos >> self.rb_bits)
                    assert blk is not None  # every block of the run exists (just checked)
                    blk.set_run(pos & mask, stop - pos, 1)
                    pos = stop
                return start << self.cluster_bits

    def ensure_refblock(self, rt_index: int) -> RefcountBlock:
        """The refcount block for ``rt_index``, creating it (and growing the table) if needed."""
        meta = self.meta
        blk = meta.refblock(rt_index)
        if blk is not None:
            return blk
        if rt_index >= len(meta.reftable.entries):
            self.grow_reftable(rt_index)
        mask = (1 << self.rb_bits) - 1
        while True:
            # Growing the table allocates it, and creating another block allocates that
            # block: either may have created this very block (self-describing) already.
            # Making a second one would orphan the first, whose clusters then look free.
            blk = meta.refblock(rt_index)
            if blk is not None:
                return blk
            saved = self.free_cluster_index
            cluster = self._find_free(1)
            owner = cluster >> self.rb_bits
            if owner == rt_index:
                # Self-describing: the new block counts itself.
                blk = RefcountBlock(
                    cluster << self.cluster_bits, bytearray(self.cluster_size), self.order
                )
                blk.set(cluster & mask, 1)
                blk.fresh = True
                break
            if meta.refblock(owner) is None:
                # The free cluster belongs to another missing block: create that one first.
                self.free_cluster_index = saved
                self.ensure_refblock(owner)
                continue
            self.update_refcount(cluster << self.cluster_bits, self.cluster_size, 1)
            blk = RefcountBlock(
                cluster << self.cluster_bits, bytearray(self.cluster_size), self.order
            )
            blk.dirty = blk.fresh = True
            break
        # Link the block before caching it: the insertion may write back (evict) another
        # block and fail, and the new one must not stay cached yet unreachable (its
        # cluster would look free, be reused, and then be overwritten by it at a flush).
        meta.reftable.entries[rt_index] = blk.offset
        meta.reftable.dirty = True
        meta.add_meta_cluster(blk.offset)
        meta.refblock_cache.insert(blk)
        return blk

    # ------------------------------------------------------ table growth
    def grow_reftable(self, rt_index: int) -> None:
        """Give the refcount table room for ``rt_index``: new table, then a header switch.

        The new table (and any refcount block it needs) is written elsewhere and
        made durable before one 12-byte header write switches to it; the old
        table is freed afterwards. A crash in between leaks, never corrupts.
        """
        meta = self.meta
        old = meta.reftable
        old_clusters = meta.header.refcount_table_clusters
        per_cluster = self.cluster_size // 8
        need = rt_index // per_cluster + 1
        clusters = max(1, old_clusters)
        while need > clusters:
            clusters = (clusters * 3 + 1) // 2
        # Leave room for the table's own refcount block(s).
        clusters = max(clusters, need + 1)
        if clusters * self.cluster_size > C.QCOW_MAX_REFTABLE_SIZE:
            raise Qcow2Error(
                f"Refcount table too large: {clusters} clusters needed for reftable index "
                f"{rt_index}"
            )
        entries = array("Q", old.entries)
        entries.extend([0] * (clusters * per_cluster - len(entries)))
        # Switch the in-memory table first so allocations below land in the new one.
        new = Table(0, entries, dirty=True)
        meta.reftable = new
        try:
            offset = self.alloc_clusters(clusters)
            new.offset = offset
            meta.add_meta_range(offset, clusters * self.cluster_size)
            # Make the refcount blocks and the new table durable, then switch.
            assert meta.writeback is not None
            meta.writeback.write_refblocks()
            meta.file.pwrite(new.to_bytes(), offset, "reftable_grow")
            meta.flush_files("reftable_grow")
            meta.file.pwrite(struct.pack(">QI", offset, clusters), 48, "reftable_switch")
            meta.flush_files("reftable_switch")
        except Qcow2Error as exc:
            # The file still holds the old table (plus leaks), but in memory refcount
            # blocks may already hang off the new one only: writing anything back now
            # would publish them under the old table. Refuse all writeback until reopen.
            if new.offset == 0:
                meta.reftable = old
            meta.poison(exc)
            raise
        new.dirty = False
        meta.header.refcount_table_offset = offset
        meta.header.refcount_table_clusters = clusters
        meta.remove_meta_range(old.offset, old_clusters * self.cluster_size)
        # The old table is referenced by nothing durable any more: free it now.
        self.update_refcount(old.offset, old_clusters * self.cluster_size, -1)

    # -------------------------------------------------------------- frees
    def free_later(self, offset: int, length: int, epoch: int) -> None:
        """Queue a decrease; applied by :meth:`apply_frees` once safe."""
        self.pending.append(PendingFree(offset, length, epoch))

    def mark_frees_durable(self) -> None:
        """Called after a flush made every queued unlink durable."""
        for p in self.pending:
            p.durable = True

    def apply_frees(self, oldest_active_epoch: int | None) -> int:
        """Apply durable decreases no in-flight request can still depend on."""
        keep: list[PendingFree] = []
        done = 0
        items = self.pending
        for i, p in enumerate(items):
            if p.durable and (oldest_active_epoch is None or oldest_active_epoch > p.epoch):
                try:
                    self.meta.file.event("cluster_free")
                    self.update_refcount(p.offset, p.length, -1)
                except BaseException:
                    # Applied ones are gone from the queue, so a later flush cannot apply
                    # them twice (a refcount below its references: corruption). This one
                    # may be half applied (a range over two clusters): dropped, so it
                    # leaks at worst. The rest stay queued.
                    self.pending = keep + items[i + 1 :]
                    raise
                done += 1
            else:
                keep.append(p)
        self.pending = keep
        return done
