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

import contextlib
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
    punch: bool = False  # a discard-type free: punch the clusters it frees from the file


_TOO_LARGE = "The image size is too large for file format 'qcow2'"


class _Retry(Exception):
    """New refcount metadata was placed: the free-cluster search starts again."""


class Allocator:
    """Refcount bookkeeping for one writable image."""

    def __init__(self, meta: Metadata) -> None:
        self.meta = meta
        self.cluster_bits = meta.cluster_bits
        self.cluster_size = meta.cluster_size
        self.set_order(meta.header.refcount_order)
        # Where the next compressed cluster goes (QEMU's free byte offset): the end of
        # the last one, inside a host cluster that still has room; 0 = start a new one.
        # In memory only, as in QEMU: a reopened image starts a fresh host cluster.
        self.free_byte_offset = 0
        self.pending: list[PendingFree] = []
        # Punch the clusters freed by discard-type frees from the file (discard="unmap").
        # ``punch_error``: the last failed punch (kept for tests; a failed punch is
        # harmless, the cluster is free either way and just keeps its bytes).
        self.punch_enabled = False
        self.punch_error: Qcow2Error | None = None
        # The end of the highest range a discard-type free gave back while punching
        # was on: closing cuts the file's free tail only if such a range lies in it.
        self.discarded_end = 0
        self.max_clusters = (C.QCOW_MAX_CLUSTER_OFFSET + 1) >> meta.cluster_bits

    def set_order(self, order: int) -> None:
        """The refcount width ``order`` (at open, and after ``qemu-img amend -o
        refcount_bits`` switched the refcount table and blocks to it); queued frees
        stay queued (they are byte ranges, not entries)."""
        self.order = order
        # Refcount entries per block, as a shift.
        self.rb_bits = self.cluster_bits + 3 - order
        self.refcount_max = (1 << (1 << order)) - 1
        self.free_cluster_index = 0

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
            if new == 0:
                if cluster < self.free_cluster_index:
                    self.free_cluster_index = cluster
                if self.free_byte_offset >> self.cluster_bits == cluster:
                    # The host cluster being filled with compressed clusters is free
                    # again and may be handed out whole: start the next one afresh.
                    self.free_byte_offset = 0

    def alloc_clusters(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters (refcount 1 each); returns the host offset.

        First fit from ``free_cluster_index``. When the run lies (partly) where no
        refcount block exists yet, the block is placed first, at the first free
        cluster after the run (the search already moved past it), and the search
        starts again from the run's start, as QEMU does: the retry usually finds the
        same run, now covered.
        """
        self.meta.file.event("cluster_alloc")
        while True:
            start = self._find_free(n)
            try:
                self._incref_new_run(start, n)
            except _Retry:
                continue
            return start << self.cluster_bits

    def _incref_new_run(self, start: int, n: int) -> None:
        """Give the free clusters ``[start, start+n)`` refcount 1, every covering block
        first created if missing (then :class:`_Retry`, nothing counted)."""
        rb_bits = self.rb_bits
        mask = (1 << rb_bits) - 1
        for rt in range(start >> rb_bits, ((start + n - 1) >> rb_bits) + 1):
            if self.meta.refblock(rt) is None:
                first = max(start, rt << rb_bits)
                try:
                    self._alloc_refcount_block(rt, first)
                finally:
                    self.free_cluster_index = min(self.free_cluster_index, start)
        # Every refcount of the run is 0: count it one slice per block. Each block is
        # looked up as it is changed (with a one-block cache, looking up the next one
        # evicts the last, so no reference is kept across).
        pos, end = start, start + n
        while pos < end:
            stop = min(end, ((pos >> rb_bits) + 1) << rb_bits)
            blk = self.meta.refblock(pos >> rb_bits)
            assert blk is not None  # every block of the run exists (just checked)
            blk.set_run(pos & mask, stop - pos, 1)
            pos = stop

    def ensure_refblock(self, rt_index: int) -> RefcountBlock:
        """The refcount block for ``rt_index``, creating it (and growing the table) if needed."""
        while True:
            blk = self.meta.refblock(rt_index)
            if blk is not None:
                return blk
            with contextlib.suppress(_Retry):
                self._alloc_refcount_block(rt_index, rt_index << self.rb_bits)

    def _alloc_refcount_block(self, rt_index: int, cluster: int) -> None:
        """Create the missing refcount block ``rt_index`` (needed to count ``cluster``),
        then raise :class:`_Retry`: the caller's free-cluster search must start again.

        The block takes the first free cluster from ``free_cluster_index``. If that
        cluster is in the block's own range the block counts itself; otherwise the
        block covering it counts it (created first if missing: then this attempt is
        abandoned with :class:`_Retry`, the cluster left free). When the refcount
        table has no entry ``rt_index``, a new, larger table is laid out after the
        covered area (:meth:`refcount_area`).
        """
        meta = self.meta
        rb_bits = self.rb_bits
        mask = (1 << rb_bits) - 1
        new = self._find_free(1)
        if new == 0:
            raise Qcow2CorruptError("Preventing invalid allocation of refcount block at offset 0")
        blk = RefcountBlock(new << self.cluster_bits, bytearray(self.cluster_size), self.order)
        if new >> rb_bits == rt_index:
            blk.set(new & mask, 1)
        else:
            self._incref_new_run(new, 1)  # may raise _Retry: this attempt is dropped
        blk.dirty = blk.fresh = True
        if rt_index < len(meta.reftable.entries):
            # Link the block before caching it: the insertion may write back (evict)
            # another block and fail, and the new one must not stay cached yet
            # unreachable (its cluster would look free, be reused, then overwritten).
            meta.reftable.entries[rt_index] = blk.offset
            meta.reftable.dirty = True
            meta.add_meta_cluster(blk.offset)
            meta.refblock_cache.insert(blk)
            raise _Retry
        # The refcount table must grow: a new one after everything covered so far.
        rbs = 1 << rb_bits
        blocks_used = -(-max(cluster + 1, new + 1) // rbs)
        self.refcount_area(
            blocks_used * rbs * self.cluster_size, 0, exact=False, new_block=(rt_index, blk)
        )
        raise _Retry

    def alloc_bytes(self, size: int) -> int:
        """Room for one compressed cluster of ``size`` bytes; returns its host offset.

        Compressed clusters are packed byte after byte into host clusters, as QEMU
        lays them out (``qemu-img map``/L2 entries of ``qemu-io -c 'write -c ...'``):
        each starts where the previous one ended; when it does not fit in the rest
        of the current host cluster, a new cluster is allocated (first fit) and, if it
        is the very next one, the compressed cluster spans both, else it starts at the
        new cluster. Every host cluster the bytes touch gets one more reference (what
        ``qemu-img check`` counts for compressed clusters).
        """
        cs = self.cluster_size
        if not 0 < size <= cs:
            raise Qcow2Error(f"compressed size {size} outside 1..{cs} (cluster_size)")
        offset = self.free_byte_offset
        if offset and self.refcount(offset >> self.cluster_bits) >= self.refcount_max:
            offset = 0  # that host cluster cannot take one more reference
        room = cs - (offset & (cs - 1)) if offset else 0
        if room >= size:
            self.update_refcount(offset, size, 1)
        else:
            new = self.alloc_clusters(1)  # refcount 1: the reference of this cluster
            if offset and ((offset + cs - 1) & ~(cs - 1)) == new:
                # Contiguous: the bytes run over from the current cluster into the new.
                self.update_refcount(offset, room, 1)
            else:
                offset = new
        end = offset + size
        self.free_byte_offset = 0 if end & (cs - 1) == 0 else end
        return offset

    def free_bytes_now(self, offset: int, size: int) -> None:
        """Undo :meth:`alloc_bytes` for bytes never linked (a failed data write)."""
        self.update_refcount(offset, size, -1)

    # -------------------------------------------------------------- frees
    def free_later(self, offset: int, length: int, epoch: int, *, punch: bool = False) -> None:
        """Queue a decrease; applied by :meth:`apply_frees` once safe. ``punch``: a
        discard-type free (guest discard, write-zeroes with unmap), whose clusters are
        punched from the file once free if the image discards with "unmap"."""
        self.pending.append(PendingFree(offset, length, epoch, punch=punch))

    def mark_frees_durable(self) -> None:
        """Called after a flush made every queued unlink durable."""
        for p in self.pending:
            p.durable = True

    def apply_frees(self, oldest_active_epoch: int | None) -> int:
        """Apply durable decreases no in-flight request can still depend on.

        This is the only place a discard-type free punches its clusters from the file
        (``punch_enabled``): the unlink is durable and no request that might still
        read or write the old host range is running, so the bytes are nobody's. Only
        clusters whose refcount reached 0 are punched (a host cluster shared by
        compressed clusters or snapshots keeps its bytes).
        """
        keep: list[PendingFree] = []
        done = 0
        items = self.pending
        punch: list[tuple[int, int]] = []
        try:
            for i, p in enumerate(items):
                if p.durable and (oldest_active_epoch is None or oldest_active_epoch > p.epoch):
                    try:
                        self.meta.file.event("cluster_free")
                        self.update_refcount(p.offset, p.length, -1)
                    except BaseException:
                        # Applied ones are gone from the queue, so a later flush cannot
                        # apply them twice (a refcount below its references: corruption).
                        # This one may be half applied (a range over two clusters):
                        # dropped, so it leaks at worst. The rest stay queued.
                        self.pending = keep + items[i + 1 :]
                        raise
                    if p.punch and self.punch_enabled:
                        punch.append((p.offset, p.length))
                        self.discarded_end = max(self.discarded_end, p.offset + p.length)
                    done += 1
                else:
                    keep.append(p)
            self.pending = keep
        finally:
            self.punch_free(punch)
        return done

    def punch_free(self, ranges: list[tuple[int, int]]) -> None:
        """Punch from the file the clusters touched by ``ranges`` that are free now.

        Called only once those frees are applied. Adjacent clusters are punched in one
        call. A failure (or a file system without hole punching) changes nothing that
        matters: the clusters are free whatever they hold.
        """
        cb = self.cluster_bits
        free: list[int] = []
        for off, length in ranges:
            if length <= 0:
                continue
            for c in range(off >> cb, ((off + length - 1) >> cb) + 1):
                if self.meta.get_refcount(c) == 0:
                    free.append(c)
        free.sort()
        runs: list[list[int]] = []
        for c in free:
            if runs and c <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], c + 1)
            else:
                runs.append([c, c + 1])
        for a, b in runs:
            try:
                self.meta.file.punch_hole(a << cb, (b - a) << cb)
            except Qcow2Error as exc:
                self.punch_error = exc

    # ------------------------------------------------------------ resize
    def alloc_at(self, offset: int, n: int) -> int:
        """Allocate up to ``n`` clusters at ``offset``: as many as are free there in a
        row (0 if the first is used); returns how many were allocated."""
        meta = self.meta
        first = offset >> self.cluster_bits
        while True:
            count = 0
            while (
                count < n
                and first + count < self.max_clusters
                and meta.get_refcount(first + count) == 0
            ):
                count += 1
            if not count:
                return 0
            last_rt = (first + count - 1) >> self.rb_bits
            missing = [
                rt for rt in range(first >> self.rb_bits, last_rt + 1) if meta.refblock(rt) is None
            ]
            if not missing:
                break
            # A new refcount block takes a free cluster, maybe one of the run: recount.
            self.ensure_refblock(missing[0])
        self.update_refcount(first << self.cluster_bits, count << self.cluster_bits, 1)
        return count

    def drop_refcounts_past(self, file_size: int) -> int:
        """Zero every refcount of a cluster at or past the end of the file (after a
        repair); returns how many were nonzero. The blocks are left dirty for the
        writeback.

        Only for an image whose repair just left no corruption: the check counts a
        reference to a cluster past the end of the file as a corruption, so then no
        such cluster is referenced, and its refcount is a leak the check cannot see (it
        compares refcounts only inside the file, as QEMU's does). A crash inside an
        allocation leaves one: the new cluster's refcount made durable before the write
        that would have grown the file over it. On a lazy-refcounts image the next
        allocation then passes over it and grows the file beyond it, and the leak
        shows (``qemu-img check``: "Leaked cluster"); QEMU's own repair keeps it too.
        Zeroing is always safe: a refcount only ever drops for a cluster nothing uses.
        """
        meta = self.meta
        first = (file_size + self.cluster_size - 1) >> self.cluster_bits
        mask = (1 << self.rb_bits) - 1
        dropped = 0
        for rt_index in range(first >> self.rb_bits, len(meta.reftable.entries)):
            blk = meta.refblock(rt_index)
            if blk is None:
                continue
            start = max(first, rt_index << self.rb_bits) & mask
            n = mask + 1 - start
            if blk.is_free_run(start, n):
                continue
            dropped += sum(1 for i in range(start, start + n) if blk.get(i))
            blk.set_run(start, n, 0)
        if dropped:
            self.free_cluster_index = min(self.free_cluster_index, first)
        return dropped

    def last_used_cluster(self, file_size: int) -> int:
        """The highest cluster below ``file_size`` with a nonzero refcount (-1: none)."""
        meta = self.meta
        i = ((file_size + self.cluster_size - 1) >> self.cluster_bits) - 1
        mask = (1 << self.rb_bits) - 1
        while i >= 0:
            blk = meta.refblock(i >> self.rb_bits)
            if blk is None:
                i = ((i >> self.rb_bits) << self.rb_bits) - 1
                continue
            if blk.get(i & mask):
                return i
            i -= 1
        return -1

    def refcount_area(
        self,
        start_offset: int,
        additional_clusters: int,
        *,
        exact: bool = True,
        new_block: tuple[int, RefcountBlock] | None = None,
    ) -> int:
        """Lay a new refcount table, and the refcount blocks missing to cover everything
        up to ``start_offset`` plus ``additional_clusters``, at ``start_offset``: the new
        blocks first, then the table, all counting themselves. The table is exactly as
        large as needed (``exact``) or half as large again plus room for its own growth;
        ``new_block`` (index, block) is a block created for the growth, entered in the
        new table. Refcount blocks and table durable, then one header write switches
        tables (offset 48); the old table is freed. Returns the end of the area."""
        meta = self.meta
        wb = meta.writeback
        assert wb is not None
        cs = self.cluster_size
        rbs = 1 << self.rb_bits
        _, total_blocks = refcount_metadata_size(
            start_offset // cs + additional_clusters, cs, self.order, not exact
        )
        if total_blocks > C.QCOW_MAX_REFTABLE_SIZE:
            raise Qcow2Error(_TOO_LARGE)
        table_size = total_blocks if exact else total_blocks + -(-total_blocks // 2)
        per_cluster = cs // 8
        table_size = -(-table_size // per_cluster) * per_cluster
        if table_size > C.QCOW_MAX_REFTABLE_SIZE:
            raise Qcow2Error(_TOO_LARGE)
        table_clusters = table_size * 8 // cs
        # The old table gets the entries linked since it was last written (QEMU writes
        # each entry as it links a block): it is freed below with those bytes in it.
        wb.write_refblocks()
        old = meta.reftable
        old_clusters = meta.header.refcount_table_clusters
        entries = array("Q", bytes(8 * table_size))
        keep = min(len(old.entries), table_size)
        entries[:keep] = old.entries[:keep]
        if new_block is not None:
            entries[new_block[0]] = new_block[1].offset
        area_index = (start_offset // cs) // rbs
        missing = sum(1 for i in range(area_index, total_blocks) if not entries[i])
        table_offset = start_offset + missing * cs
        end_offset = table_offset + table_clusters * cs
        new = Table(0, entries, dirty=True)
        # Switch the in-memory table first, so every block created below is reachable.
        meta.reftable = new
        try:
            if new_block is not None:
                meta.add_meta_cluster(new_block[1].offset)
                meta.refblock_cache.insert(new_block[1])
            block_offset = start_offset
            for i in range(area_index, total_blocks):
                if not entries[i]:
                    blk = RefcountBlock(block_offset, bytearray(cs), self.order)
                    blk.dirty = blk.fresh = True
                    entries[i] = block_offset
                    meta.add_meta_cluster(block_offset)
                    meta.refblock_cache.insert(blk)
                    block_offset += cs
                first_covered = i * rbs * cs
                if first_covered >= end_offset:
                    continue
                lo = max(0, (start_offset - first_covered) // cs)
                hi = min((end_offset - first_covered) // cs, rbs)
                got = meta.refblock(i)
                assert got is not None
                if not got.is_free_run(lo, hi - lo):
                    raise Qcow2CorruptError(
                        f"Refcount area at {start_offset:#x} overlaps a used cluster"
                    )
                got.set_run(lo, hi - lo, 1)
            assert block_offset == table_offset
            wb.write_refblocks()
            meta.file.pwrite(new.to_bytes(), table_offset, "reftable_grow")
            meta.flush_files("reftable_grow")
            meta.file.pwrite(
                struct.pack(">QI", table_offset, table_clusters), 48, "reftable_switch"
            )
            meta.flush_files("reftable_switch")
        except Qcow2Error as exc:
            # The file still holds the old table (plus leaks), but in memory refcount
            # blocks may already hang off the new one only: writing anything back now
            # would publish them under the old table. Refuse all writeback until reopen.
            meta.poison(exc)
            raise
        new.offset = table_offset
        new.dirty = False
        meta.header.refcount_table_offset = table_offset
        meta.header.refcount_table_clusters = table_clusters
        meta.add_meta_range(table_offset, table_clusters * cs)
        meta.remove_meta_range(old.offset, old_clusters * cs)
        # The old table is referenced by nothing durable any more: free it now (its
        # bytes stay in the file).
        self.update_refcount(old.offset, old_clusters * cs, -1)
        return end_offset

    def shrink_reftable(self) -> None:
        """Drop the refcount blocks that count nothing but themselves (after a shrink):
        their table entries are zeroed (durable) first, then they are freed."""
        meta = self.meta
        cs = self.cluster_size
        mask = (1 << self.rb_bits) - 1
        rt = meta.reftable
        to_free: list[int] = []
        changed = False
        for i in range(len(rt.entries)):
            off = rt.entries[i] & C.REFT_OFFSET_MASK
            if not off:
                continue
            blk = meta.refblock(i)
            assert blk is not None
            own = off >> self.cluster_bits
            self_desc = own >> self.rb_bits == i
            if self_desc:
                if blk.get(own & mask) != 1:
                    continue
                blk.set(own & mask, 0)
                empty = blk.is_free_run(0, mask + 1)
                blk.set(own & mask, 1)
            else:
                empty = blk.is_free_run(0, mask + 1)
            if not empty:
                continue
            rt.entries[i] = 0
            changed = True
            meta.refblock_cache.discard(off)
            meta.remove_meta_range(off, cs)
            if self_desc:
                self.free_cluster_index = min(self.free_cluster_index, own)
            else:
                to_free.append(off)
        if not changed:
            return
        meta.check_meta_write(rt.offset, len(rt.entries) * 8, "reftable")
        meta.file.pwrite(rt.to_bytes(), rt.offset, "reftable_shrink")
        meta.flush_files("reftable_shrink")
        rt.dirty = False
        for off in to_free:
            self.update_refcount(off, cs, -1)


def refcount_metadata_size(
    clusters: int, cluster_size: int, refcount_order: int, generous_increase: bool
) -> tuple[int, int]:
    """Bytes of refcount metadata (blocks + table) and the number of refcount blocks
    needed to cover ``clusters`` clusters plus that metadata itself (a fixed point;
    ``generous_increase`` adds half the table again, as QEMU does for growth)."""
    blocks_per_table_cluster = cluster_size // 8
    refcounts_per_block = cluster_size * 8 // (1 << refcount_order)
    table = 0
    blocks = 0
    n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // refcounts_per_block)
        table = -(-blocks // blocks_per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous_increase:
            clusters += -(-table // 2)
            n = 0
            generous_increase = False
        if n == last:
            break
    return (blocks + table) * cluster_size, blocks
