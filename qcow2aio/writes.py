"""The metadata half of writes, write-zeroes and discard: plans, links, aborts.

Everything here is synchronous and runs with the metadata lock held (or inside
the synchronous fast path); the drivers in :mod:`qcow2aio.image` move the
bytes in between. A write goes through these steps, one contiguous host
range at a time, like QEMU's ``qcow2_alloc_host_offset`` loop:

1. :func:`prepare_write` consults the in-flight list (wait, or shorten), then
   either finds clusters it may overwrite in place (COPIED, allocated), or
   allocates a contiguous run of new clusters and records an :class:`L2Meta`
   with the copy-on-write regions. COW sources are planned here too, as read
   extents, so the old content is fixed while the lock is held.
2. the driver writes COW head + guest data + COW tail as one write;
3. :func:`commit_step` links the new clusters into L2 (COPIED set), queues the
   old clusters' refcount decreases, and finishes the in-flight entry;
   :func:`abort_step` instead frees what was allocated.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import constants as C
from .errors import Qcow2CorruptError, Qcow2Error
from .inflight import L2Meta
from .mapping import BACKING, ZERO, Extent, map_read
from .tables import Table, compressed_descriptor

if TYPE_CHECKING:
    from .image import Image

ALL_ALLOC = 0xFFFFFFFF
ALL_ZERO = 0xFFFFFFFF << 32


@dataclass(slots=True)
class Link:
    """One L2 entry to set at commit: guest cluster, expected old words, new words."""

    guest: int
    old_entry: int
    old_bitmap: int
    new_entry: int
    new_bitmap: int


@dataclass(slots=True)
class WriteStep:
    """One contiguous host range of a write, with what it takes to publish it."""

    guest: int  # guest offset of the first data byte
    length: int  # data bytes
    host: int  # host offset of ``guest``
    head: list[Extent] = field(default_factory=list)  # COW source before ``guest``
    head_len: int = 0
    tail: list[Extent] = field(default_factory=list)  # COW source after the data
    tail_len: int = 0
    meta: L2Meta | None = None
    alloc: tuple[int, int] | None = None  # newly allocated (host offset, bytes)
    links: list[Link] = field(default_factory=list)


# ------------------------------------------------------------------ helpers
def _entry(entries: array[int], idx: int, ext: bool) -> tuple[int, int]:
    if ext:
        return entries[2 * idx], entries[2 * idx + 1]
    return entries[idx], 0


def _set_entry(table: Table, idx: int, ext: bool, entry: int, bitmap: int) -> None:
    if ext:
        table.entries[2 * idx] = entry
        table.entries[2 * idx + 1] = bitmap
    else:
        table.entries[idx] = entry
    table.dirty = True


def _host_of(img: Image, entry: int) -> int | None:
    """Host offset of an allocated, uncompressed entry (None when it has none)."""
    if entry & C.QCOW_OFLAG_COMPRESSED:
        return None
    host: int = entry & C.L2E_OFFSET_MASK
    if host or (img.meta.has_data_file and entry & C.QCOW_OFLAG_COPIED):
        if host & (img.meta.cluster_size - 1):
            raise Qcow2CorruptError(f"Cluster allocation offset {host:#x} unaligned")
        return host
    return None


def l2_for_write(img: Image, l1_index: int) -> Table:
    """The active L2 table for ``l1_index``, allocating it or copying a shared one."""
    meta = img.meta
    if l1_index >= len(meta.l1.entries):
        raise Qcow2Error(
            f"L1 index {l1_index} beyond the L1 table (l1_size={len(meta.l1.entries)})"
        )
    l1_entry = meta.l1.entries[l1_index]
    old = meta.l2_offset_for(l1_index)
    if old and l1_entry & C.QCOW_OFLAG_COPIED:
        return meta.l2_table(old)
    alloc = meta.allocator
    assert alloc is not None
    if old:
        entries = array("Q", meta.l2_table(old).entries)
    else:
        entries = array("Q", bytes(meta.cluster_size))
    new = alloc.alloc_clusters(1)
    meta.add_meta_range(new, meta.cluster_size, "l2")
    table = Table(new, entries, dirty=True, fresh=True)
    meta.l1.entries[l1_index] = new | C.QCOW_OFLAG_COPIED
    meta.l1.dirty = True
    if old:
        # The shared table stays referenced by a snapshot; we drop our reference
        # once the L1 switch is durable.
        meta.remove_meta_range(old, meta.cluster_size)
        alloc.free_later(old, meta.cluster_size, img.retire_epoch())
    # Cache it once linked: the insertion may write back (evict) another table and fail.
    meta.l2_cache.insert(table)
    return meta.l2_table(new)


def _queue_free_old(img: Image, entry: int, *, punch: bool = False) -> None:
    """Drop the reference an L2 entry held (compressed range or cluster), safely later
    (``punch``: a discard-type free, see :meth:`Allocator.free_later`)."""
    meta = img.meta
    alloc = meta.allocator
    assert alloc is not None
    if entry & C.QCOW_OFLAG_COMPRESSED:
        # The sectors the descriptor names, whole: QEMU frees exactly those clusters.
        d = compressed_descriptor(entry, meta.cluster_bits)
        alloc.free_later(
            d.offset & ~511, d.size + (d.offset & 511), img.retire_epoch(), punch=punch
        )
        return
    host = entry & C.L2E_OFFSET_MASK
    if host and not meta.has_data_file:
        alloc.free_later(host, meta.cluster_size, img.retire_epoch(), punch=punch)


def _cow_plan(img: Image, start: int, end: int, entry: int = -1) -> list[Extent]:
    """The old content of guest ``[start, end)``, as read extents (empty when empty).

    ``entry``, when given, is the standard L2 entry of the one cluster the range
    lies in, already read: an unallocated entry with nothing below, or a zero
    cluster, answers without walking the tables again (most COW of a growing image).
    """
    if end <= start:
        return []
    if (entry == 0 and img.backing is None) or (
        entry == C.QCOW_OFLAG_ZERO and img.meta.version >= 3
    ):
        return [Extent(ZERO, start, end - start)]
    return map_read(img.meta, start, end - start, img.backing is not None)


# ------------------------------------------------------------------ writes
def prepare_write(img: Image, offset: int, length: int) -> WriteStep | L2Meta:
    """Plan the next step of a write, or return the in-flight allocation to wait for."""
    meta = img.meta
    n, wait = img.inflight.conflict(offset, length)
    if wait is not None:
        return wait
    length = n
    cb = meta.cluster_bits
    cs = meta.cluster_size
    ext = meta.extended_l2
    l2_mask = meta.l2_entries - 1
    l1_index = offset >> (cb + meta.l2_bits)
    l2_end = (l1_index + 1) << (cb + meta.l2_bits)
    length = min(length, l2_end - offset)
    table = l2_for_write(img, l1_index)
    entries = table.entries
    idx = (offset >> cb) & l2_mask
    entry, bitmap = _entry(entries, idx, ext)
    host = _host_of(img, entry)
    copied = bool(entry & C.QCOW_OFLAG_COPIED)
    cstart = offset & ~(cs - 1)
    if host is not None and meta.has_data_file and host != cstart:
        meta.mark_corrupt(
            f"External data file host cluster offset {host:#x} does not match guest "
            f"cluster offset: {cstart:#x}"
        )
    end = offset + length

    # In place: allocated, COPIED, not compressed, not a zero cluster.
    if host is not None and copied:
        if not ext and not entry & C.QCOW_OFLAG_ZERO:
            run_end = min(end, cstart + cs)
            nxt = host + cs
            i = idx + 1
            while run_end < end:
                e = entries[i]
                if (e & (C.QCOW_OFLAG_COPIED | C.QCOW_OFLAG_COMPRESSED | C.QCOW_OFLAG_ZERO)) != (
                    C.QCOW_OFLAG_COPIED
                ) or (e & C.L2E_OFFSET_MASK) != nxt:
                    break
                run_end = min(end, run_end + cs)
                nxt += cs
                i += 1
            return WriteStep(offset, run_end - offset, host + (offset - cstart))
        if not ext:
            # ZERO_ALLOC: write in place, fill the rest of the cluster with zeros, clear the flag.
            cend = min(end, cstart + cs)
            step = WriteStep(offset, cend - offset, host + (offset - cstart))
            step.head_len = offset - cstart
            step.head = [Extent(0, cstart, step.head_len)] if step.head_len else []
            step.tail_len = cstart + cs - cend
            step.tail = [Extent(0, cend, step.tail_len)] if step.tail_len else []
            step.links.append(Link(cstart, entry, 0, host | C.QCOW_OFLAG_COPIED, 0))
            _add_meta(img, step, cstart, 1, host, keep_old=True)
            return step
        # Extended L2, allocated cluster: subclusters may need their alloc bit.
        return _prepare_subclusters_in_place(img, offset, end, cstart, entry, bitmap, host)

    # Allocate: a run of clusters that all need new host clusters.
    nclusters = 1
    i = idx + 1
    while cstart + nclusters * cs < end:
        e, _ = _entry(entries, i, ext)
        h = _host_of(img, e)
        if h is not None and e & C.QCOW_OFLAG_COPIED:
            break
        nclusters += 1
        i += 1
    run_end = min(end, cstart + nclusters * cs)
    last_cstart = cstart + (nclusters - 1) * cs
    if meta.has_data_file:
        new_host = cstart  # external data file: host offset == guest offset, no refcounts
        alloc_range = None
    else:
        assert meta.allocator is not None
        new_host = meta.allocator.alloc_clusters(nclusters)
        alloc_range = (new_host, nclusters * cs)
        # Allocation may have evicted the table from the cache. Its entries are still
        # what the disk holds (eviction writes them back, nothing runs in between), and
        # they are only read below: commit_step looks the table up again to change it.

    step = WriteStep(offset, run_end - offset, new_host + (offset - cstart), alloc=alloc_range)
    sc = cs >> 5  # subcluster size (extended L2 only)
    if ext:
        first_e = _entry(entries, idx, True)[0]
        last_e = _entry(entries, idx + nclusters - 1, True)[0]
        # Old clusters without a host cluster only need their partial subclusters copied.
        fine_first = _host_of(img, first_e) is None and not first_e & C.QCOW_OFLAG_COMPRESSED
        fine_last = _host_of(img, last_e) is None and not last_e & C.QCOW_OFLAG_COMPRESSED
        head_start = offset & ~(sc - 1) if fine_first else cstart
        tail_end = ((run_end + sc - 1) & ~(sc - 1)) if fine_last else last_cstart + cs
        head_entry = tail_entry = -1
    else:
        head_start = cstart
        tail_end = last_cstart + cs
        head_entry = entries[idx]
        tail_entry = entries[idx + nclusters - 1]
    step.head_len = offset - head_start
    step.head = _cow_plan(img, head_start, offset, head_entry)
    step.tail_len = tail_end - run_end
    step.tail = _cow_plan(img, run_end, tail_end, tail_entry)

    for k in range(nclusters):
        g = cstart + k * cs
        e, b = _entry(entries, idx + k, ext)
        new_entry = (new_host + k * cs) | C.QCOW_OFLAG_COPIED
        new_bitmap = 0
        if ext:
            if _host_of(img, e) is None and not e & C.QCOW_OFLAG_COMPRESSED:
                lo = max(head_start, g)
                hi = min(tail_end, g + cs)
                written = _sc_mask(lo - g, hi - g, sc)
                alloc_bits = written
                zero_bits = (b >> 32) & ~written & ALL_ALLOC
            else:
                alloc_bits, zero_bits = ALL_ALLOC, 0
            new_bitmap = (zero_bits << 32) | alloc_bits
        step.links.append(Link(g, e, b, new_entry, new_bitmap))
    _add_meta(img, step, cstart, nclusters, new_host, keep_old=False)
    return step


def _sc_mask(lo: int, hi: int, sc: int) -> int:
    """Bits of the subclusters touched by in-cluster bytes ``[lo, hi)``."""
    if hi <= lo:
        return 0
    first = lo // sc
    last = (hi - 1) // sc
    return ((1 << (last + 1)) - 1) & ~((1 << first) - 1)


def _prepare_subclusters_in_place(
    img: Image, offset: int, end: int, cstart: int, entry: int, bitmap: int, host: int
) -> WriteStep:
    cs = img.meta.cluster_size
    sc = cs >> 5
    cend = min(end, cstart + cs)
    step = WriteStep(offset, cend - offset, host + (offset - cstart))
    written = _sc_mask(offset - cstart, cend - cstart, sc)
    alloc_bits = bitmap & ALL_ALLOC
    if written & ~alloc_bits == 0:
        return step  # every touched subcluster already holds data: plain in-place write
    head_start = offset & ~(sc - 1)
    if alloc_bits & (1 << ((offset - cstart) // sc)):
        head_start = offset
    tail_end = min(cstart + cs, (cend + sc - 1) & ~(sc - 1))
    if alloc_bits & (1 << ((cend - 1 - cstart) // sc)):
        tail_end = cend
    step.head_len = offset - head_start
    step.head = _cow_plan(img, head_start, offset)
    step.tail_len = tail_end - cend
    step.tail = _cow_plan(img, cend, tail_end)
    new_alloc = alloc_bits | written
    new_zero = (bitmap >> 32) & ~written & ALL_ALLOC
    step.links.append(Link(cstart, entry, bitmap, entry, (new_zero << 32) | new_alloc))
    _add_meta(img, step, cstart, 1, host, keep_old=True)
    return step


def _add_meta(
    img: Image, step: WriteStep, gstart: int, nclusters: int, host: int, *, keep_old: bool
) -> None:
    m = L2Meta(
        guest_start=gstart,
        nb_clusters=nclusters,
        host_start=host,
        cow_start=(step.guest - step.head_len, step.head_len),
        cow_end=(step.guest + step.length, step.tail_len),
        keep_old=keep_old,
    )
    img.inflight.add(m)
    step.meta = m


def mark_dirty(img: Image, offset: int, length: int) -> None:
    """Set the bits of every enabled persistent bitmap over guest ``[offset, +length)``.

    The one hook of every write kind (called where the write changes L2 or, for an
    in-place write, where it is admitted to write the data), synchronous and O(1) in
    the length: a bitmap never misses a write that reached the image."""
    bm = img._bitmaps
    if bm is not None and bm.active:
        bm.mark(offset, length)


def commit_step(img: Image, step: WriteStep) -> None:
    """Link a written step into L2 and release its in-flight entry."""
    meta = img.meta
    mark_dirty(img, step.guest, step.length)
    try:
        if not step.links:
            return
        cb = meta.cluster_bits
        ext = meta.extended_l2
        l2_mask = meta.l2_entries - 1
        l1_shift = cb + meta.l2_bits
        l1_index = -1
        table: Table | None = None
        for link in step.links:
            if table is None or link.guest >> l1_shift != l1_index:
                # A step's links are one run inside one L2 table: look it up once.
                l1_index = link.guest >> l1_shift
                table = meta.l2_table(meta.l2_offset_for(l1_index))
            idx = (link.guest >> cb) & l2_mask
            cur_e, cur_b = _entry(table.entries, idx, ext)
            if (cur_e, cur_b) != (link.old_entry, link.old_bitmap):
                meta.mark_corrupt(
                    f"L2 entry for guest offset {link.guest:#x} changed while its allocation "
                    f"was in flight ({link.old_entry:#x} -> {cur_e:#x})"
                )
            _set_entry(table, idx, ext, link.new_entry, link.new_bitmap)
            if link.old_entry and not _same_host(link):
                old_host = _host_of(img, link.old_entry)
                if link.old_entry & C.QCOW_OFLAG_COMPRESSED or old_host is not None:
                    _queue_free_old(img, link.old_entry)
    finally:
        if step.meta is not None:
            img.inflight.remove(step.meta)


def abort_step(img: Image, step: WriteStep) -> None:
    """Undo a step whose data write failed: free its new clusters, release waiters."""
    meta = img.meta
    mark_dirty(img, step.guest, step.length)  # an in-place step may have written part
    try:
        if step.alloc is not None and meta.allocator is not None:
            meta.allocator.update_refcount(step.alloc[0], step.alloc[1], -1)
    finally:
        if step.meta is not None:
            img.inflight.remove(step.meta)


# --------------------------------------------------- write-zeroes, discard
def zero_clusters(
    img: Image,
    start: int,
    end: int,
    *,
    unmap: bool,
    discard: bool,
    unallocate: bool = False,
    only_if_zero: bool = False,
    backing_zero: bool = True,
) -> list[tuple[int, int]]:
    """Make whole clusters (or subclusters) ``[start, end)`` read as zeros / be discarded.

    The caller holds the lock and has checked the in-flight list. Entries are
    changed first (dirty L2), the old clusters are freed only later (after the
    unlink is durable). Returns the ranges that must instead be written as
    zeros (parts of compressed clusters).

    ``unallocate`` (whole clusters only) makes every entry unallocated, whatever
    lies below: the range then reads from the backing file again. That is QEMU's
    full discard, which ``qemu-img commit`` uses to empty the committed image
    (:meth:`Image.make_empty`); the same unlink-then-free order applies.

    ``only_if_zero``: unless the whole range is zero in this layer, or unallocated
    here where ``backing_zero`` (the caller found that the backing chain reads as
    zeros over what it does not itself zero), nothing is changed and the range is
    returned as leftover (the caller then writes its own part of it, which may be
    narrower, as data).
    """
    leftover: list[tuple[int, int]] = []
    meta = img.meta
    if meta.version < 3 and not unallocate:
        # Checked again here, under the lock: an amend to compat=0.10 may have run
        # since the caller split its request. v2 has no zero flag: write-zeroes falls
        # back to data; a discard over a backing file cannot hide it and does nothing.
        if not discard:
            return [(start, end - start)]
        if img.backing is not None:
            return []
    if only_if_zero:
        allowed = (ZERO, BACKING) if backing_zero else (ZERO,)
        plan = map_read(meta, start, end - start, img.backing is not None)
        if any(ext.kind not in allowed for ext in plan):
            return [(start, end - start)]
    cb = meta.cluster_bits
    cs = meta.cluster_size
    ext = meta.extended_l2
    has_backing = img.backing is not None
    pos = start
    while pos < end:
        cstart = pos & ~(cs - 1)
        cend = min(cstart + cs, end)
        l1_index = pos >> (cb + meta.l2_bits)
        l2_off = meta.l2_offset_for(l1_index)
        if not l2_off and (unallocate or (not has_backing and discard)):
            # Nothing allocated here and nothing below: a discard leaves it so. (A
            # write-zeroes still gets zero clusters, in a new L2 table: QEMU's layout.)
            pos = min(end, (l1_index + 1) << (cb + meta.l2_bits))
            continue
        table = l2_for_write(img, l1_index)
        idx = (pos >> cb) & (meta.l2_entries - 1)
        entry, bitmap = _entry(table.entries, idx, ext)
        host = _host_of(img, entry)
        compressed = bool(entry & C.QCOW_OFLAG_COMPRESSED)
        whole = pos == cstart and cend == cstart + cs
        if unallocate:
            new_entry, new_bitmap = 0, 0
        elif ext:
            sc = cs >> 5
            mask = ALL_ALLOC if whole else _sc_mask(pos - cstart, cend - cstart, sc)
            if whole and (discard or unmap or compressed or not entry & C.QCOW_OFLAG_COPIED):
                new_entry, new_bitmap = 0, ALL_ZERO
                if discard and not has_backing and host is None and not compressed:
                    new_bitmap = bitmap  # unallocated, nothing below: leave it
            elif compressed:
                leftover.append((pos, cend - pos))
                pos = cend
                continue
            else:
                alloc_bits = bitmap & ALL_ALLOC & ~mask
                zero_bits = ((bitmap >> 32) | mask) & ALL_ALLOC
                new_entry, new_bitmap = entry, (zero_bits << 32) | alloc_bits
                if host is None:
                    new_entry = 0
        else:
            if discard:
                if not has_backing and host is None and not compressed:
                    pos = cend
                    continue
                new_entry = C.QCOW_OFLAG_ZERO if meta.version >= 3 else 0
            elif unmap or compressed or host is None or not entry & C.QCOW_OFLAG_COPIED:
                new_entry = C.QCOW_OFLAG_ZERO
            else:
                new_entry = entry | C.QCOW_OFLAG_ZERO
            new_bitmap = 0
        if (new_entry, new_bitmap) != (entry, bitmap):
            table = l2_for_write(img, l1_index)
            _set_entry(table, idx, ext, new_entry, new_bitmap)
            keeps_host = host is not None and (new_entry & C.L2E_OFFSET_MASK) == host and host
            if (compressed or host is not None) and not keeps_host:
                _queue_free_old(img, entry, punch=True)
        pos = cend
    return leftover


def _same_host(link: Link) -> bool:
    """True when the link keeps the cluster it had (in-place zero-flag/subcluster update)."""
    old = link.old_entry & C.L2E_OFFSET_MASK
    return (
        bool(old)
        and not link.old_entry & C.QCOW_OFLAG_COMPRESSED
        and (old == link.new_entry & C.L2E_OFFSET_MASK)
    )
