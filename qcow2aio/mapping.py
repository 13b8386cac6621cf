"""Guest ranges -> plans: which bytes are zero, come from the backing file, or live where.

This is the *mapping* half of a request. It runs under the metadata lock (or in
the synchronous fast path) and only reads metadata; the returned plan holds
plain numbers, not references to cached tables, so the bytes can be moved
afterwards without the lock and without caring whether a table was evicted.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from . import constants as C
from .errors import Qcow2CorruptError
from .metadata import Metadata
from .tables import compressed_descriptor

# Extent kinds of a read plan.
ZERO = 0  # reads as zeros
BACKING = 1  # unallocated here: read the backing file at the same guest offset
DATA = 2  # plain data at ``host`` in the data file (image file or external data file)
COMPRESSED = 3  # inside the compressed cluster described by ``host``/``csize``

KIND_NAMES = {ZERO: "zero", BACKING: "backing", DATA: "data", COMPRESSED: "compressed"}


@dataclass(slots=True)
class Extent:
    """One run of a plan. For COMPRESSED, ``host``/``csize`` locate the compressed
    bytes and ``skip`` is the offset of ``guest`` inside the decompressed cluster.
    A ZERO or BACKING run keeps the ``host`` of the clusters it lies in when they are
    allocated (preallocated zero clusters; zero or unallocated subclusters of an
    allocated cluster), 0 otherwise: reads ignore it, block status reports it as QEMU
    does (``qemu-img map``'s ``offset``)."""

    kind: int
    guest: int
    length: int
    host: int = 0
    csize: int = 0
    skip: int = 0


def _append(plan: list[Extent], kind: int, guest: int, length: int, host: int) -> None:
    """Add a run, merging it into the previous one when contiguous on both sides."""
    if plan:
        last = plan[-1]
        if (
            last.kind == kind
            and last.guest + last.length == guest
            and (
                last.host + last.length == host
                if kind == DATA
                else last.host == host == 0 or (last.host and host == last.host + last.length)
            )
        ):
            last.length += length
            return
    plan.append(Extent(kind, guest, length, host))


# Entries looked at per step of map_read's scan for a run of unallocated entries.
_SCAN = 1023
# The largest host offset an L2 entry holds (bits 9-55): a run never carries past it.
_MAX_HOST = C.L2E_OFFSET_MASK


def _continued(entries: array[int], i: int, stop: int, entry: int, step: int) -> int:
    """How many entries from index ``i`` (before ``stop``) continue a run of plain data
    whose entry at ``i - 1`` is ``entry``: each the same flags and the next host
    cluster, ``entries[i + k] == entry + (k + 1) * step``.

    Compared at C speed against the expected entries, in windows that grow from 8 to
    1024 (a fragmented table costs one failed window per run, not a long one); the
    end of a failed window is found by halving. A fully allocated, contiguous table
    (what a copy or ``qemu-img convert`` leaves) is then a few steps, not one Python
    iteration per cluster: block status of 1 GiB took ~35 ms that way."""
    n = 0
    w = 8
    limit = min(stop - i, (_MAX_HOST - (entry & _MAX_HOST)) // step)
    while n < limit:
        w = min(w, limit - n)
        base = entry + (n + 1) * step
        want = array("Q", range(base, base + w * step, step))
        got = entries[i + n : i + n + w]
        if got == want:
            n += w
            w = min(2 * w, _SCAN + 1)
            continue
        lo, hi = 0, w  # got[:lo] == want[:lo]; a mismatch lies in [lo, hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if got[lo:mid] == want[lo:mid]:
                lo = mid
            else:
                hi = mid
        return n + lo
    return n


def map_read(meta: Metadata, offset: int, length: int, has_backing: bool) -> list[Extent]:
    """Plan the read of ``length`` bytes at guest ``offset`` (already range-checked)."""
    plan: list[Extent] = []
    cluster_bits = meta.cluster_bits
    cluster_size = meta.cluster_size
    l2_bits = meta.l2_bits
    l2_mask = meta.l2_entries - 1
    unalloc = BACKING if has_backing else ZERO
    ext = meta.extended_l2
    version = meta.version
    data_file = meta.has_data_file
    end = offset + length
    pos = offset
    while pos < end:
        cluster_index = pos >> cluster_bits
        l1_index = cluster_index >> l2_bits
        l2_off = meta.l2_offset_for(l1_index)
        if not l2_off:
            # Whole L2 range unallocated: jump to the end of it in one step.
            stop = min(end, (l1_index + 1) << (cluster_bits + l2_bits))
            _append(plan, unalloc, pos, stop - pos, 0)
            pos = stop
            continue
        entries = meta.l2_table(l2_off).entries
        l2_stop = min(end, (l1_index + 1) << (cluster_bits + l2_bits))
        while pos < l2_stop:
            l2_index = (pos >> cluster_bits) & l2_mask
            in_cluster = pos & (cluster_size - 1)
            run = min(l2_stop, (pos | (cluster_size - 1)) + 1) - pos
            if ext:
                entry = entries[2 * l2_index]
                bitmap = entries[2 * l2_index + 1]
            else:
                entry = entries[l2_index]
                bitmap = 0
                if not entry:
                    # A run of unallocated entries, found at C speed: a sparse table
                    # costs a few steps, not one per cluster (map of a huge image).
                    # The window is bounded, so a table of alternating entries does
                    # not copy the rest of the table at every empty one.
                    last = min(((l2_stop - 1) >> cluster_bits) & l2_mask, l2_index + _SCAN)
                    chunk = entries[l2_index : last + 1].tobytes()
                    n = (len(chunk) - len(chunk.lstrip(b"\0"))) >> 3
                    stop = min(l2_stop, ((pos >> cluster_bits) + n) << cluster_bits)
                    _append(plan, unalloc, pos, stop - pos, 0)
                    pos = stop
                    continue
            if entry & C.QCOW_OFLAG_COMPRESSED:
                if data_file:
                    raise Qcow2CorruptError(
                        f"Compressed cluster in an image with a data file (guest offset {pos:#x})"
                    )
                d = compressed_descriptor(entry, cluster_bits)
                plan.append(Extent(COMPRESSED, pos, run, d.offset, d.size, in_cluster))
                pos += run
                continue
            if entry & C.L2E_STD_RESERVED_MASK:
                raise Qcow2CorruptError(
                    f"Reserved bits set in L2 entry (L2 offset {l2_off:#x}, index {l2_index:#x}): "
                    f"{entry:#018x}"
                )
            host = entry & C.L2E_OFFSET_MASK
            allocated = bool(host) or (data_file and bool(entry & C.QCOW_OFLAG_COPIED))
            if allocated and host & (cluster_size - 1):
                raise Qcow2CorruptError(
                    f"Cluster allocation offset {host:#x} unaligned (L2 offset: {l2_off:#x}, "
                    f"L2 index: {l2_index:#x})"
                )
            if allocated and data_file and host != pos - in_cluster:
                raise Qcow2CorruptError(
                    f"External data file host cluster offset {host:#x} does not match guest "
                    f"cluster offset: {pos - in_cluster:#x}"
                )
            if not ext:
                if entry & C.QCOW_OFLAG_ZERO:
                    if version < 3:
                        raise Qcow2CorruptError(
                            f"Zero cluster flag in a version 2 image (L2 offset {l2_off:#x}, "
                            f"index {l2_index:#x})"
                        )
                    _append(plan, ZERO, pos, run, host + in_cluster if host else 0)
                elif allocated:
                    _append(plan, DATA, pos, run, host + in_cluster)
                    pos += run
                    if (
                        pos < l2_stop
                        and not data_file
                        and entries[l2_index + 1] == entry + cluster_size
                    ):
                        # The next clusters continue the run: count them at C speed.
                        last = ((l2_stop - 1) >> cluster_bits) & l2_mask
                        n = _continued(entries, l2_index + 1, last + 1, entry, cluster_size)
                        stop = min(l2_stop, pos + (n << cluster_bits))
                        plan[-1].length += stop - pos
                        pos = stop
                    continue
                else:
                    _append(plan, unalloc, pos, run, 0)
                pos += run
                continue
            # Extended L2: 32 subclusters, each allocated, zero or unallocated.
            alloc_bits = bitmap & 0xFFFFFFFF
            zero_bits = bitmap >> 32
            if alloc_bits & zero_bits or (alloc_bits and not allocated):
                raise Qcow2CorruptError(
                    f"Invalid subcluster bitmap {bitmap:#018x} (L2 offset {l2_off:#x}, "
                    f"index {l2_index:#x})"
                )
            sc_bits = cluster_bits - 5
            cend = pos + run
            while pos < cend:
                sc = (pos & (cluster_size - 1)) >> sc_bits
                sc_end = min(cend, ((pos >> sc_bits) + 1) << sc_bits)
                bit = 1 << sc
                if alloc_bits & bit:
                    _append(plan, DATA, pos, sc_end - pos, host + (pos & (cluster_size - 1)))
                elif zero_bits & bit:
                    zhost = host + (pos & (cluster_size - 1)) if host else 0
                    _append(plan, ZERO, pos, sc_end - pos, zhost)
                else:
                    uhost = host + (pos & (cluster_size - 1)) if host else 0
                    _append(plan, unalloc, pos, sc_end - pos, uhost)
                pos = sc_end
    return plan


# Entry bits that keep an L2 entry off the fast path: compressed, zero, reserved.
_NOT_PLAIN = C.QCOW_OFLAG_COMPRESSED | C.QCOW_OFLAG_ZERO | C.L2E_STD_RESERVED_MASK
# map_plain's answer when the whole range is unallocated (reads from the backing file,
# or as zeros without one); -1 means "take the general path".
UNALLOCATED = -2
_COPIED = C.QCOW_OFLAG_COPIED
_L1_OFFSET = C.L1E_OFFSET_MASK
_L1_RESERVED = C.L1E_RESERVED_MASK
_L2_OFFSET = C.L2E_OFFSET_MASK


def map_plain(meta: Metadata, offset: int, length: int, copied: bool = False) -> int:
    """Host offset of guest ``[offset, offset+length)`` when it is one run of plain data.

    The fast path of reads (and of in-place writes): the range must lie in one L2
    table, every cluster it touches must be an allocated, uncompressed, non-zero
    standard entry, and the clusters must be contiguous in the image file. Anything
    else (extended L2, external data file, unallocated, compressed, zero, a corrupt
    entry, a range that crosses L2 tables) returns -1, and the caller takes
    :func:`map_read` (or :func:`qcow2aio.writes.prepare_write`), which plans it fully
    and reports corruption. No objects are built, so a 4 KiB read costs a few table
    lookups. With ``copied`` the L1 entry and every L2 entry must also have the
    COPIED flag (refcount 1): exactly the clusters a write may overwrite in place.

    Returns :data:`UNALLOCATED` instead when every entry the range touches is
    zero (or its L2 table does not exist), so a read can go straight to the
    backing file (or return zeros) without building a plan either.
    """
    if not meta.plain_layout or length <= 0:
        return -1
    shift = meta.l1_shift
    l1_index = offset >> shift
    if (offset + length - 1) >> shift != l1_index:
        return -1
    try:
        l1_entry = meta.l1.entries[l1_index]
    except IndexError:  # past the L1 table: unallocated, as map_read treats it
        return UNALLOCATED
    if not l1_entry:
        return UNALLOCATED
    cmask = meta.cluster_mask
    l2_off = l1_entry & _L1_OFFSET
    want = _COPIED if copied else 0
    if l1_entry & _L1_RESERVED or not l2_off or l2_off & cmask or (l1_entry & want) != want:
        return -1
    table = meta.l2_cache.get(l2_off)
    entries = (table if table is not None else meta.l2_table(l2_off)).entries
    cluster_bits = meta.cluster_bits
    idx = (offset >> cluster_bits) & meta.l2_mask
    entry = entries[idx]
    last = idx + (((offset & cmask) + length - 1) >> cluster_bits)
    if not entry:
        if last == idx or not any(entries[idx + 1 : last + 1]):
            return UNALLOCATED
        return -1
    bad = _NOT_PLAIN | want
    host = entry & _L2_OFFSET
    if (entry & bad) != want or not host or host & cmask:
        return -1
    if last != idx:
        nxt = host
        for i in range(idx + 1, last + 1):
            nxt += cmask + 1
            entry = entries[i]
            if (entry & bad) != want or (entry & _L2_OFFSET) != nxt:
                return -1
    return host + (offset & cmask)


def plan_is_zero(plan: list[Extent]) -> bool:
    """True when every extent of ``plan`` reads as zeros (no backing, no data)."""
    return all(ext.kind == ZERO for ext in plan)
