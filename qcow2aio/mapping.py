"""Guest ranges -> plans: which bytes are zero, come from the backing file, or live where.

This is the *mapping* half of a request. It runs under the metadata lock (or in
the synchronous fast path) and only reads metadata; the returned plan holds
plain numbers, not references to cached tables, so the bytes can be moved
afterwards without the lock and without caring whether a table was evicted.
"""

from __future__ import annotations

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
    bytes and ``skip`` is the offset of ``guest`` inside the decompressed cluster."""

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
            and (kind != DATA or last.host + last.length == host)
        ):
            last.length += length
            return
    plan.append(Extent(kind, guest, length, host))


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
            if not ext:
                if entry & C.QCOW_OFLAG_ZERO:
                    if version < 3:
                        raise Qcow2CorruptError(
                            f"Zero cluster flag in a version 2 image (L2 offset {l2_off:#x}, "
                            f"index {l2_index:#x})"
                        )
                    _append(plan, ZERO, pos, run, 0)
                elif allocated:
                    _append(plan, DATA, pos, run, host + in_cluster)
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
                    _append(plan, ZERO, pos, sc_end - pos, 0)
                else:
                    _append(plan, unalloc, pos, sc_end - pos, 0)
                pos = sc_end
    return plan
