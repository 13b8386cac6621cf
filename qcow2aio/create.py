"""Create qcow2 images byte-for-byte the way ``qemu-img create -f qcow2`` does.

Why a replay rather than a layout formula
-----------------------------------------
QEMU does not write a precomputed layout. ``qcow2_co_create`` writes a stub
(header with size 0, a one-cluster refcount table, an empty refcount block),
opens that stub as an ordinary image, allocates clusters 0-2 for itself,
rewrites the header, and then *resizes* the image with the normal allocator:
``qcow2_grow_l1_table`` for the L1 table, ``preallocate_co`` or the
falloc/full path of ``qcow2_co_truncate`` for preallocation, and
``alloc_refcount_block``/``qcow2_refcount_area`` whenever a refcount block or
a bigger refcount table is needed. The resulting placement depends on
first-fit allocation, on refcount blocks placed *after* the clusters they
describe, on allocations undone and retried (``-EAGAIN``), and on freed
clusters (the old refcount table) keeping their stale bytes. The simplest way
to be identical for every cluster size, refcount width and virtual size is to
run the same algorithm: :class:`_Qcow2Sim` is a line-by-line port of the QEMU
7.2 functions involved (names kept, so it can be diffed against
``block/qcow2-refcount.c`` and ``block/qcow2-cluster.c``), operating on an
in-memory model of the image file.

The replay happens entirely in memory, *before* any file is touched, so every
error (bad option, image too large, header overflow) is raised without leaving
a half-written or deleted file behind (QEMU creates the file first and deletes
it on failure). Only then are the files created, truncated, and the bytes
QEMU would have written are written with positional I/O, extent by extent, so
even the allocated-block footprint (``actual-size``) matches.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass

from . import constants as C
from .backing import RAW_FORMATS, resolve_name
from .errors import (
    Qcow2Error,
    Qcow2FormatError,
    Qcow2IOError,
    Qcow2PassphraseError,
    Qcow2UnsupportedError,
)
from .header import Header, size_to_l1
from .io import FileBackend
from .refcount import RefcountBlock

__all__ = ["PREALLOCATION_MODES", "create", "normalize_compat"]

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
COMPAT_LEVELS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
COMPRESSION_TYPES = {"zlib": C.COMPRESSION_ZLIB, "zstd": C.COMPRESSION_ZSTD}

_SECTOR = 512
_INT_MAX = (1 << 31) - 1
# BDRV_REQUEST_MAX_BYTES: the block layer's per-request cap (INT_MAX sectors-aligned).
_REQUEST_MAX_BYTES = (_INT_MAX >> 9) << 9
_INV_OFFSET = -1
_REFT_OFFSET_MASK = C.REFT_OFFSET_MASK
_L1E_OFFSET_MASK = C.L1E_OFFSET_MASK
_COPIED = C.QCOW_OFLAG_COPIED
_WRITE_CHUNK = 4 << 20


def normalize_compat(compat: str) -> int:
    """The qcow2 version for a ``compat`` value ("0.10"/"v2" -> 2, "1.1"/"v3" -> 3)."""
    try:
        return COMPAT_LEVELS[compat]
    except (KeyError, TypeError):
        raise Qcow2FormatError(
            f"Invalid compatibility level: compat={compat!r} (use 0.10, 1.1, v2 or v3)"
        ) from None


def _div_round_up(n: int, d: int) -> int:
    return -(-n // d)


def _round_up(n: int, align: int) -> int:
    return _div_round_up(n, align) * align


# --------------------------------------------------------------------------
# In-memory model of a file being written.
# --------------------------------------------------------------------------
class _FileModel:
    """What a sequence of pwrite/ftruncate/fallocate calls leaves in a file.

    Written bytes are kept per cluster (only metadata is ever written, so this
    stays small); ``extents`` remembers which byte ranges were written so the
    real file gets the same allocated blocks, and ``fills`` the preallocation
    of data areas (``posix_fallocate`` or explicit zeros, as file-posix does).
    """

    def __init__(self, cluster_size: int) -> None:
        self.cs = cluster_size
        self.clusters: dict[int, bytearray] = {}
        self.length = 0
        self.extents: list[tuple[int, int]] = []
        self.fills: list[tuple[int, int, str]] = []

    def write(self, offset: int, data: bytes | bytearray) -> None:
        if not data:
            return
        end = offset + len(data)
        self.extents.append((offset, end))
        self.length = max(self.length, end)
        cs = self.cs
        pos = 0
        while pos < len(data):
            ci, co = divmod(offset + pos, cs)
            n = min(cs - co, len(data) - pos)
            buf = self.clusters.get(ci)
            if buf is None:
                buf = self.clusters[ci] = bytearray(cs)
            buf[co : co + n] = data[pos : pos + n]
            pos += n

    def write_zeros(self, offset: int, length: int) -> None:
        """A write of zeros (COW of an unallocated area); no cluster buffers needed."""
        if length <= 0:
            return
        end = offset + length
        self.extents.append((offset, end))
        self.length = max(self.length, end)
        cs = self.cs
        pos = offset
        while pos < end:
            ci, co = divmod(pos, cs)
            n = min(cs - co, end - pos)
            buf = self.clusters.get(ci)
            if buf is not None:
                buf[co : co + n] = bytes(n)
            pos += n

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        cs = self.cs
        pos = 0
        while pos < length:
            ci, co = divmod(offset + pos, cs)
            n = min(cs - co, length - pos)
            buf = self.clusters.get(ci)
            if buf is not None:
                out[pos : pos + n] = buf[co : co + n]
            pos += n
        if offset + length > self.length:
            cut = max(0, self.length - offset)
            out[cut:] = bytes(length - cut)
        return bytes(out)

    def truncate(self, length: int, prealloc: str = "off") -> None:
        """file-posix ``raw_regular_truncate``: exact size; falloc/full fill the new tail."""
        if length < self.length:
            if prealloc != "off":
                raise Qcow2FormatError("Cannot use preallocation for shrinking files")
            self._drop_beyond(length)
        elif length > self.length and prealloc in ("falloc", "full"):
            self.fills.append((self.length, length, prealloc))
        self.length = length

    def _drop_beyond(self, length: int) -> None:
        cs = self.cs
        for ci in [c for c in self.clusters if (c + 1) * cs > length]:
            if ci * cs >= length:
                del self.clusters[ci]
            else:
                self.clusters[ci][length - ci * cs :] = bytes((ci + 1) * cs - length)
        self.extents = [(s, min(e, length)) for s, e in self.extents if s < length]
        self.fills = [(s, min(e, length), m) for s, e, m in self.fills if s < length]

    def merged_extents(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for s, e in sorted(self.extents):
            e = min(e, self.length)
            if s >= e:
                continue
            if out and s <= out[-1][1]:
                if e > out[-1][1]:
                    out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
        return out


# --------------------------------------------------------------------------
# The replay of QEMU's allocator.
# --------------------------------------------------------------------------
class _EAgain(Exception):
    """``-EAGAIN``: new refcount metadata was placed; the caller restarts its search."""


class _EFBig(Exception):
    """``-EFBIG``: a table would exceed QEMU's limits."""


@dataclass
class _L2Meta:
    """QEMU's ``QCowL2Meta`` (the fields preallocation uses)."""

    offset: int
    alloc_offset: int
    nb_clusters: int
    cow_start: tuple[int, int]  # (offset, nb_bytes), relative to the first cluster
    cow_end: tuple[int, int]
    prealloc: bool = False


@dataclass
class _SimResult:
    header: Header
    image: _FileModel
    data: _FileModel | None


class _Qcow2Sim:
    """The state of an open ``BDRVQcow2State`` during ``qcow2_co_create``."""

    def __init__(
        self,
        *,
        cluster_bits: int,
        refcount_order: int,
        extended_l2: bool,
        has_data_file: bool,
    ) -> None:
        self.cluster_bits = cb = cluster_bits
        self.cs = cs = 1 << cb
        self.refcount_order = refcount_order
        self.extended_l2 = extended_l2
        self.l2e_size = 16 if extended_l2 else 8
        self.l2_size = cs // self.l2e_size
        self.l2_bits = self.l2_size.bit_length() - 1
        self.l2_slice_size = self.l2_size  # default l2-cache-entry-size is a cluster
        self.subcluster_bits = cb - 5 if extended_l2 else cb
        self.subcluster_size = 1 << self.subcluster_bits
        self.refcount_block_bits = cb - (refcount_order - 3)
        self.refcount_block_size = 1 << self.refcount_block_bits
        self.refcount_max = (1 << (1 << refcount_order)) - 1
        self.has_data_file = has_data_file

        self.file = _FileModel(cs)
        self.data_file = _FileModel(cs) if has_data_file else self.file

        # qcow2_co_create: the stub header and "a refcount table with one refcount block".
        self.file.write(0, bytes(cs))
        stub = bytearray(2 * cs)
        struct.pack_into(">Q", stub, 0, 2 * cs)
        self.file.write(cs, stub)

        # What qcow2_open reads back from the stub.
        self.refcount_table_offset = cs
        self.refcount_table_size = cs // 8
        self.refcount_table: list[int] = [2 * cs] + [0] * (cs // 8 - 1)
        self.max_refcount_table_index = 0
        self.free_cluster_index = 0
        self.l1_table: list[int] = []
        self.l1_table_offset = 0
        self.refblocks: dict[int, RefcountBlock] = {}
        self.l2_tables: dict[int, list[int]] = {}

    # ------------------------------------------------------------ helpers
    def size_to_clusters(self, size: int) -> int:
        return (size + self.cs - 1) >> self.cluster_bits

    def offset_into_cluster(self, offset: int) -> int:
        return offset & (self.cs - 1)

    def start_of_cluster(self, offset: int) -> int:
        return offset & ~(self.cs - 1)

    def offset_to_l1_index(self, offset: int) -> int:
        return offset >> (self.l2_bits + self.cluster_bits)

    def offset_to_l2_slice_index(self, offset: int) -> int:
        return (offset >> self.cluster_bits) & (self.l2_slice_size - 1)

    # ------------------------------------------------------ refcount cache
    def load_refcount_block(self, offset: int) -> RefcountBlock:
        blk = self.refblocks.get(offset)
        if blk is None:
            blk = RefcountBlock(
                offset, bytearray(self.file.read(offset, self.cs)), self.refcount_order
            )
            self.refblocks[offset] = blk
        return blk

    def get_empty_refcount_block(self, offset: int) -> RefcountBlock:
        blk = RefcountBlock(offset, bytearray(self.cs), self.refcount_order, dirty=True)
        self.refblocks[offset] = blk
        return blk

    def flush_refblock(self, blk: RefcountBlock) -> None:
        self.file.write(blk.offset, blk.data)
        blk.dirty = False

    def update_max_refcount_table_index(self) -> None:
        i = self.refcount_table_size - 1
        while i > 0 and (self.refcount_table[i] & _REFT_OFFSET_MASK) == 0:
            i -= 1
        self.max_refcount_table_index = i

    def get_refcount(self, cluster_index: int) -> int:
        """qcow2_get_refcount."""
        rt_index = cluster_index >> self.refcount_block_bits
        if rt_index >= self.refcount_table_size:
            return 0
        off = self.refcount_table[rt_index] & _REFT_OFFSET_MASK
        if not off:
            return 0
        return self.load_refcount_block(off).get(cluster_index & (self.refcount_block_size - 1))

    def in_same_refcount_block(self, a: int, b: int) -> bool:
        shift = self.cluster_bits + self.refcount_block_bits
        return (a >> shift) == (b >> shift)

    # ------------------------------------------------------- qcow2-refcount.c
    def alloc_refcount_block(self, cluster_index: int) -> RefcountBlock:
        """alloc_refcount_block: load or create the block covering ``cluster_index``.

        Raises :class:`_EAgain` whenever it had to allocate, like QEMU, so the
        caller restarts its search for free clusters.
        """
        cs = self.cs
        rt_index = cluster_index >> self.refcount_block_bits
        if rt_index < self.refcount_table_size:
            off = self.refcount_table[rt_index] & _REFT_OFFSET_MASK
            if off:
                return self.load_refcount_block(off)

        new_block = self.alloc_clusters_noref(cs, (1 << 63) - 1)
        if new_block == 0:
            raise Qcow2FormatError("Preventing invalid allocation of refcount block at offset 0")
        if self.in_same_refcount_block(new_block, cluster_index << self.cluster_bits):
            blk = self.get_empty_refcount_block(new_block)
            blk.set((new_block >> self.cluster_bits) & (self.refcount_block_size - 1), 1)
        else:
            # Described elsewhere; recurses at most twice.
            self.update_refcount(new_block, cs, 1, decrease=False)
            blk = self.get_empty_refcount_block(new_block)
        self.flush_refblock(blk)

        if rt_index < self.refcount_table_size:
            self.file.write(self.refcount_table_offset + rt_index * 8, struct.pack(">Q", new_block))
            self.refcount_table[rt_index] = new_block
            self.max_refcount_table_index = max(self.max_refcount_table_index, rt_index)
            raise _EAgain

        # The refcount table itself must grow.
        blocks_used = _div_round_up(
            max(cluster_index + 1, (new_block >> self.cluster_bits) + 1),
            self.refcount_block_size,
        )
        meta_offset = blocks_used * self.refcount_block_size * cs
        self.refcount_area(meta_offset, 0, False, rt_index, new_block)
        raise _EAgain

    def refcount_area(
        self,
        start_offset: int,
        additional_clusters: int,
        exact_size: bool,
        new_refblock_index: int,
        new_refblock_offset: int,
    ) -> int:
        """qcow2_refcount_area: a new self-describing refcount table and blocks."""
        cs = self.cs
        rbs = self.refcount_block_size
        _, total_refblock_count = refcount_metadata_size(
            start_offset // cs + additional_clusters, cs, self.refcount_order, not exact_size
        )
        if total_refblock_count > C.QCOW_MAX_REFTABLE_SIZE:
            raise _EFBig
        area_reftable_index = (start_offset // cs) // rbs
        if exact_size:
            table_size = total_refblock_count
        else:
            table_size = total_refblock_count + _div_round_up(total_refblock_count, 2)
        table_size = _round_up(table_size, cs // 8)
        table_clusters = table_size * 8 // cs
        if table_size > C.QCOW_MAX_REFTABLE_SIZE:
            raise _EFBig

        new_table = [0] * table_size
        if table_size > self.max_refcount_table_index:
            n = self.max_refcount_table_index + 1
            new_table[:n] = self.refcount_table[:n]
        else:
            new_table[:] = self.refcount_table[:table_size]
        if new_refblock_offset:
            new_table[new_refblock_index] = new_refblock_offset

        additional_refblock_count = sum(
            1 for i in range(area_reftable_index, total_refblock_count) if not new_table[i]
        )
        table_offset = start_offset + additional_refblock_count * cs
        end_offset = table_offset + table_clusters * cs

        block_offset = start_offset
        for i in range(area_reftable_index, total_refblock_count):
            if new_table[i]:
                blk = self.load_refcount_block(new_table[i])
            else:
                blk = self.get_empty_refcount_block(block_offset)
                new_table[i] = block_offset
                block_offset += cs
            first_offset_covered = i * rbs * cs
            if first_offset_covered < end_offset:
                if first_offset_covered < start_offset:
                    j = (start_offset - first_offset_covered) // cs
                else:
                    j = 0
                end_index = min((end_offset - first_offset_covered) // cs, rbs)
                for k in range(j, end_index):
                    if blk.get(k):
                        raise AssertionError("refcount area overlaps used clusters")
                    blk.set(k, 1)
        assert block_offset == table_offset

        for blk in self.refblocks.values():
            if blk.dirty:
                self.flush_refblock(blk)
        raw = bytearray(table_size * 8)
        for i in range(total_refblock_count):
            struct.pack_into(">Q", raw, i * 8, new_table[i])
        self.file.write(table_offset, raw)

        old_offset, old_size = self.refcount_table_offset, self.refcount_table_size
        self.refcount_table = new_table
        self.refcount_table_size = table_size
        self.refcount_table_offset = table_offset
        self.update_max_refcount_table_index()
        # The old table's bytes stay in the file; only its refcount drops.
        self.free_clusters(old_offset, old_size * 8)
        return end_offset

    def update_refcount(self, offset: int, length: int, addend: int, *, decrease: bool) -> None:
        """update_refcount, including the undo of partial updates on failure."""
        if length < 0:
            raise Qcow2FormatError(f"negative refcount update length {length}")
        if length == 0:
            return
        cb = self.cluster_bits
        rbb = self.refcount_block_bits
        mask = self.refcount_block_size - 1
        start = self.start_of_cluster(offset)
        last = self.start_of_cluster(offset + length - 1)
        old_table_index = -1
        blk: RefcountBlock | None = None
        cluster_offset = start
        try:
            while cluster_offset <= last:
                cluster_index = cluster_offset >> cb
                table_index = cluster_index >> rbb
                if table_index != old_table_index:
                    try:
                        blk = self.alloc_refcount_block(cluster_index)
                    except _EAgain:
                        if self.free_cluster_index > (start >> cb):
                            self.free_cluster_index = start >> cb
                        raise
                old_table_index = table_index
                assert blk is not None
                # Fast path: a whole run of free clusters in this block gets refcount 1.
                if not decrease and addend == 1:
                    run = self._set_free_run(blk, cluster_index, last >> cb)
                    if run:
                        cluster_offset += run << cb
                        continue
                block_index = cluster_index & mask
                refcount = blk.get(block_index)
                if decrease:
                    if addend > refcount:
                        raise ValueError("refcount underflow")
                    refcount -= addend
                else:
                    if refcount + addend > self.refcount_max:
                        raise ValueError("refcount overflow")
                    refcount += addend
                if refcount == 0 and cluster_index < self.free_cluster_index:
                    self.free_cluster_index = cluster_index
                blk.set(block_index, refcount)
                cluster_offset += self.cs
        except (_EAgain, _EFBig, ValueError):
            with contextlib.suppress(_EAgain, _EFBig, ValueError):
                self.update_refcount(offset, cluster_offset - offset, addend, decrease=not decrease)
            raise

    def _set_free_run(self, blk: RefcountBlock, first: int, last: int) -> int:
        """Set refcount 1 on clusters ``first..`` (same block, up to ``last``) whose refcount is 0.

        Equivalent to the per-cluster loop of update_refcount for byte-wide
        entries; returns how many clusters it handled (0 = use the slow path).
        """
        order = self.refcount_order
        if order < 3:
            return 0
        mask = self.refcount_block_size - 1
        idx = first & mask
        n = min(last - first + 1, self.refcount_block_size - idx)
        if n < 8:
            return 0
        width = 1 << (order - 3)
        seg = blk.data[idx * width : (idx + n) * width]
        if any(seg):
            return 0
        blk.data[idx * width : (idx + n) * width] = (bytes(width - 1) + b"\x01") * n
        blk.dirty = True
        return n

    def alloc_clusters_noref(self, size: int, max_offset: int) -> int:
        """alloc_clusters_noref: first fit from free_cluster_index, refcounts untouched.

        QEMU probes one cluster at a time and restarts its count after a used
        one; that amounts to "the first run of ``nb`` free clusters at or after
        free_cluster_index", which :meth:`_next_used` finds a block at a time.
        """
        nb_clusters = self.size_to_clusters(size)
        idx = self.free_cluster_index
        while nb_clusters:
            used = self._next_used(idx, idx + nb_clusters)
            if used == idx + nb_clusters:
                break
            idx = used + 1
        self.free_cluster_index = idx + nb_clusters
        if self.free_cluster_index > 0 and self.free_cluster_index - 1 > (
            max_offset >> self.cluster_bits
        ):
            raise _EFBig
        return idx << self.cluster_bits

    def _next_used(self, first: int, end: int) -> int:
        """The first cluster in ``[first, end)`` with a nonzero refcount, else ``end``."""
        rbb = self.refcount_block_bits
        rbs = self.refcount_block_size
        order = self.refcount_order
        idx = first
        while idx < end:
            rt_index = idx >> rbb
            block_end = min(end, (rt_index + 1) << rbb)
            off = 0
            if rt_index < self.refcount_table_size:
                off = self.refcount_table[rt_index] & _REFT_OFFSET_MASK
            if off:
                blk = self.load_refcount_block(off)
                lo = idx & (rbs - 1)
                hi = lo + (block_end - idx)
                start_byte = (lo << order) >> 3
                end_byte = ((hi << order) + 7) >> 3
                seg = blk.data[start_byte:end_byte]
                nonzero = len(seg) - len(seg.lstrip(b"\x00"))
                if nonzero < len(seg):
                    # Entries before this byte are free; check entry by entry from it.
                    k = max(lo, ((start_byte + nonzero) << 3) >> order)
                    while k < hi:
                        if blk.get(k):
                            return idx - lo + k
                        k += 1
            idx = block_end
        return end

    def alloc_clusters(self, size: int) -> int:
        """qcow2_alloc_clusters."""
        while True:
            offset = self.alloc_clusters_noref(size, C.QCOW_MAX_CLUSTER_OFFSET)
            try:
                self.update_refcount(offset, size, 1, decrease=False)
            except _EAgain:
                continue
            return offset

    def alloc_clusters_at(self, offset: int, nb_clusters: int) -> int:
        """qcow2_alloc_clusters_at: as many of ``nb_clusters`` as are free at ``offset``."""
        if nb_clusters == 0:
            return 0
        while True:
            cluster_index = offset >> self.cluster_bits
            i = 0
            while i < nb_clusters:
                if self.get_refcount(cluster_index) != 0:
                    break
                cluster_index += 1
                i += 1
            try:
                self.update_refcount(offset, i << self.cluster_bits, 1, decrease=False)
            except _EAgain:
                continue
            return i

    def free_clusters(self, offset: int, size: int) -> None:
        """qcow2_free_clusters (errors are only reported by QEMU, never raised)."""
        with contextlib.suppress(_EAgain, _EFBig, ValueError):
            self.update_refcount(offset, size, 1, decrease=True)

    def get_last_cluster(self, size: int) -> int:
        for i in range(self.size_to_clusters(size) - 1, -1, -1):
            if self.get_refcount(i) > 0:
                return i
        raise Qcow2FormatError("There are no references in the refcount table.")

    # -------------------------------------------------------- qcow2-cluster.c
    def grow_l1_table(self, min_size: int, exact_size: bool) -> None:
        """qcow2_grow_l1_table; the new table is written with its exact byte length."""
        l1_size = len(self.l1_table)
        if min_size <= l1_size:
            return
        if min_size > _INT_MAX // 8:
            raise _EFBig
        if exact_size:
            new_l1_size = min_size
        else:
            new_l1_size = max(l1_size, 1)
            while min_size > new_l1_size:
                new_l1_size = _div_round_up(new_l1_size * 3, 2)
        if new_l1_size > C.QCOW_MAX_L1_SIZE // 8:
            raise _EFBig
        new_table = self.l1_table + [0] * (new_l1_size - l1_size)
        new_offset = self.alloc_clusters(new_l1_size * 8)
        self.file.write(new_offset, struct.pack(f">{new_l1_size}Q", *new_table))
        old_offset, old_size = self.l1_table_offset, l1_size
        self.l1_table_offset = new_offset
        self.l1_table = new_table
        self.free_clusters(old_offset, old_size * 8)

    def write_l1_entry(self, l1_index: int) -> None:
        # request_alignment is 1 for a buffered regular file: one 8-byte write.
        self.file.write(
            self.l1_table_offset + 8 * l1_index, struct.pack(">Q", self.l1_table[l1_index])
        )

    def l2_allocate(self, l1_index: int) -> None:
        old = self.l1_table[l1_index]
        if old & _L1E_OFFSET_MASK:
            raise AssertionError("copy-on-write of an L2 table never happens at creation")
        l2_offset = self.alloc_clusters(self.l2_size * self.l2e_size)
        if l2_offset == 0:
            raise Qcow2FormatError("Preventing invalid allocation of L2 table at offset 0")
        self.l2_tables[l2_offset] = [0] * (self.cs // 8)
        self.file.write(l2_offset, bytes(self.cs))
        self.l1_table[l1_index] = l2_offset | _COPIED
        self.write_l1_entry(l1_index)

    def get_cluster_table(self, offset: int) -> tuple[list[int], int]:
        l1_index = self.offset_to_l1_index(offset)
        if l1_index >= len(self.l1_table):
            self.grow_l1_table(l1_index + 1, False)
        if not self.l1_table[l1_index] & _COPIED:
            self.l2_allocate(l1_index)
        l2_offset = self.l1_table[l1_index] & _L1E_OFFSET_MASK
        return self.l2_tables[l2_offset], self.offset_to_l2_slice_index(offset)

    def get_l2_entry(self, table: list[int], index: int) -> int:
        return table[index * (self.l2e_size // 8)]

    def handle_copied(self, guest_offset: int) -> None:
        """handle_copied on a fresh image: nothing to keep, but it loads (allocates) the L2."""
        table, l2_index = self.get_cluster_table(guest_offset)
        if self.get_l2_entry(table, l2_index) & _COPIED:
            raise AssertionError("allocated cluster in a freshly created image")

    def handle_alloc(
        self, guest_offset: int, host_offset: int, nb_bytes: int, metas: list[_L2Meta]
    ) -> tuple[bool, int, int]:
        """handle_alloc: returns (allocated, host_offset, bytes)."""
        cb = self.cluster_bits
        nb_clusters = self.size_to_clusters(self.offset_into_cluster(guest_offset) + nb_bytes)
        l2_index = self.offset_to_l2_slice_index(guest_offset)
        nb_clusters = min(nb_clusters, self.l2_slice_size - l2_index)
        nb_clusters = min(nb_clusters, _REQUEST_MAX_BYTES >> cb)
        table, l2_index = self.get_cluster_table(guest_offset)
        step = self.l2e_size // 8
        entries = table[l2_index * step : (l2_index + nb_clusters) * step : step]
        if any(entries):  # count_single_write_clusters; a fresh table is all zeros
            count = 0
            while count < nb_clusters and not entries[count] & _COPIED:
                count += 1
            nb_clusters = count
        assert nb_clusters > 0

        alloc = _INV_OFFSET if host_offset == _INV_OFFSET else self.start_of_cluster(host_offset)
        if self.has_data_file:
            alloc = self.start_of_cluster(guest_offset)
        elif alloc == _INV_OFFSET:
            alloc = self.alloc_clusters(nb_clusters * self.cs)
        else:
            nb_clusters = self.alloc_clusters_at(alloc, nb_clusters)
        if nb_clusters == 0:
            return False, host_offset, 0

        oic = self.offset_into_cluster(guest_offset)
        requested_bytes = nb_bytes + oic
        avail_bytes = nb_clusters << cb
        n = min(requested_bytes, avail_bytes)
        host_offset = alloc + oic
        nb_bytes = min(nb_bytes, n - oic)
        self.calculate_l2_meta(alloc, guest_offset, nb_bytes, metas)
        return True, host_offset, nb_bytes

    def calculate_l2_meta(
        self, host_cluster_offset: int, guest_offset: int, nb_bytes: int, metas: list[_L2Meta]
    ) -> None:
        """calculate_l2_meta for new clusters over unallocated (plain) entries."""
        cow_start_to = self.offset_into_cluster(guest_offset)
        cow_end_from = cow_start_to + nb_bytes
        nb_clusters = self.size_to_clusters(cow_end_from)
        sc_index = cow_start_to >> self.subcluster_bits
        cow_start_from = sc_index << self.subcluster_bits
        cow_end_to = _round_up(cow_end_from, self.subcluster_size)
        metas.insert(
            0,
            _L2Meta(
                offset=self.start_of_cluster(guest_offset),
                alloc_offset=host_cluster_offset,
                nb_clusters=nb_clusters,
                cow_start=(cow_start_from, cow_start_to - cow_start_from),
                cow_end=(cow_end_from, cow_end_to - cow_end_from),
            ),
        )

    def alloc_host_offset(self, offset: int, nb_bytes: int) -> tuple[int, int, list[_L2Meta]]:
        """qcow2_alloc_host_offset: returns (host_offset, bytes covered, metas)."""
        start = offset
        remaining = nb_bytes
        cluster_offset = _INV_OFFSET
        host_offset = _INV_OFFSET
        cur_bytes = 0
        metas: list[_L2Meta] = []
        while True:
            if host_offset == _INV_OFFSET and cluster_offset != _INV_OFFSET:
                host_offset = cluster_offset
            start += cur_bytes
            remaining -= cur_bytes
            if cluster_offset != _INV_OFFSET:
                cluster_offset += cur_bytes
            if remaining == 0:
                break
            cur_bytes = remaining
            self.handle_copied(start)
            ok, cluster_offset, cur_bytes = self.handle_alloc(
                start, cluster_offset, cur_bytes, metas
            )
            if not ok:
                break
        return host_offset, nb_bytes - remaining, metas

    def perform_cow(self, m: _L2Meta) -> None:
        """perform_cow: the image has no data (nor backing) yet, so COW writes zeros."""
        start_off, start_n = m.cow_start
        end_off, end_n = m.cow_end
        if start_n == 0 and end_n == 0:
            return
        self.data_file.write_zeros(m.alloc_offset + start_off, start_n)
        self.data_file.write_zeros(m.alloc_offset + end_off, end_n)

    def alloc_cluster_link_l2(self, m: _L2Meta) -> None:
        self.perform_cow(m)
        table, l2_index = self.get_cluster_table(m.offset)
        assert l2_index + m.nb_clusters <= self.l2_slice_size
        step = self.l2e_size // 8
        if self.extended_l2 and not m.prealloc:
            raise AssertionError("subcluster bitmaps are only written by guest writes")
        if any(table[l2_index * step : (l2_index + m.nb_clusters) * step : step]):
            raise AssertionError("linking over allocated clusters never happens at creation")
        # host | QCOW_OFLAG_COPIED for each cluster (bit 63 is never part of an offset).
        first = m.alloc_offset + _COPIED
        table[l2_index * step : (l2_index + m.nb_clusters) * step : step] = range(
            first, first + (m.nb_clusters << self.cluster_bits), self.cs
        )

    def preallocate_co(self, offset: int, new_length: int, mode: str) -> None:
        """preallocate_co: allocate and map every cluster; data clusters stay unwritten."""
        nb_bytes = new_length - offset
        host_offset = 0
        cur_bytes = 0
        chunk = (_INT_MAX // self.cs) * self.cs
        while nb_bytes:
            cur_bytes = min(nb_bytes, chunk)
            host_offset, cur_bytes, metas = self.alloc_host_offset(offset, cur_bytes)
            for m in metas:
                m.prealloc = True
                self.alloc_cluster_link_l2(m)
            nb_bytes -= cur_bytes
            offset += cur_bytes
        if host_offset + cur_bytes > self.data_file.length:
            self.data_file.truncate(host_offset + cur_bytes, "off" if mode == "metadata" else mode)

    def truncate(self, size: int, prealloc: str) -> None:
        """qcow2_co_truncate growing a fresh image from 0 to ``size`` bytes."""
        cs = self.cs
        self.grow_l1_table(size_to_l1(size, self.cluster_bits, self.l2_bits), True)
        if prealloc == "off":
            if self.has_data_file:
                self.data_file.truncate(size)
        elif prealloc == "metadata" or self.has_data_file:
            self.preallocate_co(0, size, prealloc)
        else:
            old_file_size = self.file.length
            last_cluster = self.get_last_cluster(old_file_size)
            old_file_size = (last_cluster + 1) * cs
            nb_new_data_clusters = _round_up(size, cs) >> self.cluster_bits
            nb_new_l2_tables = _div_round_up(nb_new_data_clusters, cs // self.l2e_size) + 1
            allocation_start = self.refcount_area(
                old_file_size, nb_new_data_clusters + nb_new_l2_tables, True, 0, 0
            )
            allocated = self.alloc_clusters_at(allocation_start, nb_new_data_clusters)
            assert allocated == nb_new_data_clusters
            self.file.truncate(allocation_start + nb_new_data_clusters * cs, prealloc)
            host_offset = allocation_start
            guest_offset = 0
            while nb_new_data_clusters:
                n = min(
                    nb_new_data_clusters,
                    self.l2_slice_size - self.offset_to_l2_slice_index(guest_offset),
                )
                m = _L2Meta(
                    offset=guest_offset,
                    alloc_offset=host_offset,
                    nb_clusters=n,
                    cow_start=(0, 0),
                    cow_end=(n << self.cluster_bits, 0),
                    prealloc=True,
                )
                self.alloc_cluster_link_l2(m)
                guest_offset += n * cs
                host_offset += n * cs
                nb_new_data_clusters -= n

    def flush_caches(self) -> None:
        """qcow2_write_caches at close: dirty refcount blocks and L2 tables reach the file."""
        for blk in self.refblocks.values():
            if blk.dirty:
                self.flush_refblock(blk)
        for off, entries in self.l2_tables.items():
            self.file.write(off, struct.pack(f">{len(entries)}Q", *entries))


def refcount_metadata_size(
    clusters: int, cluster_size: int, refcount_order: int, generous_increase: bool
) -> tuple[int, int]:
    """qcow2_refcount_metadata_size: (bytes of refcount metadata, refcount block count)."""
    blocks_per_table_cluster = cluster_size // 8
    refcounts_per_block = cluster_size * 8 // (1 << refcount_order)
    table = 0
    blocks = 0
    n = 0
    while True:
        last = n
        blocks = _div_round_up(clusters + table + blocks, refcounts_per_block)
        table = _div_round_up(blocks, blocks_per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous_increase:
            clusters += _div_round_up(table, 2)
            n = 0
            generous_increase = False
        if n == last:
            break
    return (blocks + table) * cluster_size, blocks


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------
@dataclass
class _Encryption:
    """What ``encrypt.*`` asks for, validated; a LUKS area already formatted (its
    PBKDF2 benchmark takes a while, so before anything is laid out or written)."""

    method: int  # C.CRYPT_AES or C.CRYPT_LUKS
    area: bytes = b""  # LUKS: header + keyslot material, length = the payload offset


ENCRYPT_DEFAULTS = {
    "encrypt_cipher_alg": "aes-256",
    "encrypt_cipher_mode": "xts",
    "encrypt_ivgen_alg": "plain64",
    "encrypt_ivgen_hash_alg": None,
    "encrypt_hash_alg": "sha256",
    "encrypt_iter_time": 2000,
}


def _encryption(
    encrypt_format: str | None, passphrase: str | bytes | None, options: dict[str, object]
) -> _Encryption | None:
    """QEMU's checks of the ``encrypt.*`` options, in its order and with its messages."""
    if encrypt_format is None:
        if passphrase is not None:
            raise Qcow2FormatError("Parameter 'encrypt.format' is missing")
        return None
    if encrypt_format not in ("aes", "luks"):
        raise Qcow2FormatError(
            f"Parameter 'encrypt.format' does not accept value {encrypt_format!r}"
        )
    if encrypt_format == "aes":
        for name, default in ENCRYPT_DEFAULTS.items():
            if options[name] != default:
                qname = "encrypt." + name.removeprefix("encrypt_").replace("_", "-")
                raise Qcow2FormatError(f"Parameter {qname!r} is unexpected")
    if passphrase is None:
        raise Qcow2PassphraseError("Parameter 'encrypt.key-secret' is required for cipher")
    if encrypt_format == "aes":
        return _Encryption(C.CRYPT_AES)
    from .crypto.luks import format_area
    from .crypto.payload import passphrase_bytes

    iter_time = options["encrypt_iter_time"]
    if isinstance(iter_time, bool) or not isinstance(iter_time, int) or iter_time <= 0:
        raise Qcow2FormatError(f"encrypt.iter-time must be a positive integer: {iter_time!r}")
    area, key = format_area(
        passphrase_bytes(passphrase),
        cipher_alg=str(options["encrypt_cipher_alg"]),
        cipher_mode=str(options["encrypt_cipher_mode"]),
        ivgen_alg=str(options["encrypt_ivgen_alg"]),
        ivgen_hash_alg=(
            None
            if options["encrypt_ivgen_hash_alg"] is None
            else str(options["encrypt_ivgen_hash_alg"])
        ),
        hash_alg=str(options["encrypt_hash_alg"]),
        iter_time_ms=iter_time,
    )
    del key  # the new image is unlocked again by whoever opens it
    return _Encryption(C.CRYPT_LUKS, area)


@dataclass
class _Options:
    version: int
    cluster_size: int
    refcount_bits: int
    lazy_refcounts: bool
    compression_type: int
    extended_l2: bool
    backing_file: str | None
    backing_fmt: str | None
    data_file: str | None
    data_file_raw: bool
    preallocation: str
    encryption: _Encryption | None = None


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _validate(
    *,
    compat: str,
    cluster_size: int,
    refcount_bits: int,
    lazy_refcounts: bool,
    compression_type: str,
    extended_l2: bool,
    backing_file: str | None,
    backing_fmt: str | None,
    data_file: str | None,
    data_file_raw: bool,
    preallocation: str,
) -> _Options:
    """The checks of ``qcow2_co_create`` (same order, same conditions)."""
    version = normalize_compat(compat)
    if preallocation not in PREALLOCATION_MODES:
        raise Qcow2FormatError(
            f"Invalid preallocation mode: preallocation={preallocation!r} "
            f"(allowed: {', '.join(PREALLOCATION_MODES)})"
        )
    if compression_type not in COMPRESSION_TYPES:
        raise Qcow2UnsupportedError(
            f"Unknown compression type: compression_type={compression_type!r} (allowed: zlib, zstd)"
        )
    for name, value in (("cluster_size", cluster_size), ("refcount_bits", refcount_bits)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise Qcow2FormatError(f"{name} must be an integer, not {value!r}")
    if extended_l2 and version < 3:
        raise Qcow2FormatError(
            "Extended L2 entries are only supported with compatibility level 1.1 and "
            f"above: extended_l2=on, compat={compat}"
        )
    bits = cluster_size.bit_length() - 1
    if not (_is_pow2(cluster_size) and C.MIN_CLUSTER_BITS <= bits <= C.MAX_CLUSTER_BITS):
        raise Qcow2FormatError(
            "Cluster size must be a power of two between 512 and 2048k: "
            f"cluster_size={cluster_size}"
        )
    if extended_l2 and bits < C.EXTL2_MIN_CLUSTER_BITS:
        raise Qcow2FormatError(
            "Extended L2 entries are only supported with cluster sizes of at least "
            f"16384 bytes: cluster_size={cluster_size}"
        )
    if backing_file is not None and preallocation != "off" and not extended_l2:
        raise Qcow2FormatError(
            "Backing file and preallocation can only be used at the same time if "
            f"extended_l2 is on: preallocation={preallocation}"
        )
    if backing_fmt is not None and backing_file is None:
        raise Qcow2FormatError(
            f"Backing format cannot be used without backing file: backing_fmt={backing_fmt!r}"
        )
    if lazy_refcounts and version < 3:
        raise Qcow2FormatError(
            "Lazy refcounts only supported with compatibility level 1.1 and above: "
            f"lazy_refcounts=on, compat={compat}"
        )
    if refcount_bits > 64 or not _is_pow2(refcount_bits):
        raise Qcow2FormatError(
            "Refcount width must be a power of two and may not exceed 64 bits: "
            f"refcount_bits={refcount_bits}"
        )
    if version < 3 and refcount_bits != 16:
        raise Qcow2FormatError(
            "Different refcount widths than 16 bits require compatibility level 1.1 "
            f"or above: refcount_bits={refcount_bits}, compat={compat}"
        )
    if data_file_raw and data_file is None:
        raise Qcow2FormatError("data-file-raw requires data-file: data_file_raw=on")
    if data_file_raw and backing_file is not None:
        raise Qcow2FormatError(
            "Backing file and data-file-raw cannot be used at the same time: "
            f"backing_file={backing_file!r}"
        )
    if data_file_raw and preallocation == "off":
        # The external file must read as the raw image, so the L1/L2 tables must
        # map it 1:1: QEMU silently upgrades to metadata preallocation.
        preallocation = "metadata"
    if data_file is not None:
        if version < 3:
            raise Qcow2FormatError(
                "External data files are only supported with compatibility level 1.1 "
                f"and above: data_file={data_file!r}, compat={compat}"
            )
        if data_file == "":
            raise Qcow2FormatError("data_file must not be empty")
    ctype = COMPRESSION_TYPES[compression_type]
    if ctype != C.COMPRESSION_ZLIB and version < 3:
        raise Qcow2FormatError(
            "Non-zlib compression type is only supported with compatibility level 1.1 "
            f"and above: compression_type={compression_type}, compat={compat}"
        )
    return _Options(
        version=version,
        cluster_size=cluster_size,
        refcount_bits=refcount_bits,
        lazy_refcounts=lazy_refcounts,
        compression_type=ctype,
        extended_l2=extended_l2,
        backing_file=backing_file,
        backing_fmt=backing_fmt,
        data_file=data_file,
        data_file_raw=data_file_raw,
        preallocation=preallocation,
    )


def backing_size(path: str, backing_file: str, backing_fmt: str) -> int:
    """The size ``bdrv_getlength`` reports for the backing file (sector granularity).

    QEMU opens the backing file (and its chain) to check it is usable, and
    takes its size when none was given: a qcow2 image's virtual size rounded
    down to 512 bytes, a raw file's length rounded up to 512 bytes.
    """
    full = resolve_name(backing_file, path)
    if backing_fmt == "qcow2":
        from .image import Image

        # Only its size is needed: an encrypted backing file opens without its
        # passphrase, as QEMU opens it here (no I/O).
        with Image(full, "r", metadata_only=True) as img:
            return img.size // _SECTOR * _SECTOR
    if backing_fmt in RAW_FORMATS:
        try:
            st = os.stat(full)
        except OSError as exc:
            raise Qcow2IOError(
                f"Could not open backing file {full!r}: {exc.strerror or exc}", exc.errno
            ) from exc
        return _round_up(st.st_size, _SECTOR)
    raise Qcow2UnsupportedError(
        f"Unsupported backing file format: backing_fmt={backing_fmt!r} (use qcow2 or raw)"
    )


def _simulate(opts: _Options, size: int) -> _SimResult:
    """Replay qcow2_co_create + qcow2_co_truncate + bdrv_change_backing_file in memory."""
    cluster_bits = opts.cluster_size.bit_length() - 1
    sim = _Qcow2Sim(
        cluster_bits=cluster_bits,
        refcount_order=opts.refcount_bits.bit_length() - 1,
        extended_l2=opts.extended_l2,
        has_data_file=opts.data_file is not None,
    )
    try:
        # Open the stub and account for the header, refcount table and block.
        offset = sim.alloc_clusters(3 * sim.cs)
        assert offset == 0
        sim.truncate(size, opts.preallocation)
        crypto_area = None
        if opts.encryption is not None and opts.encryption.method == C.CRYPT_LUKS:
            # qcow2_set_up_encryption after the resize: the area is allocated (and
            # zeroed whole clusters) like any other, then the LUKS header written.
            area = opts.encryption.area
            off = sim.alloc_clusters(len(area))
            sim.file.write_zeros(off, _round_up(len(area), sim.cs))
            sim.file.write(off, area)
            crypto_area = (off, len(area))
    except _EFBig:
        raise Qcow2FormatError(
            "The image size is too large for file format 'qcow2' (try using a larger "
            f"cluster size): size={size}, cluster_size={opts.cluster_size}"
        ) from None
    sim.flush_caches()

    incompat = 0
    if opts.data_file is not None:
        incompat |= C.INCOMPAT_DATA_FILE
    if opts.compression_type != C.COMPRESSION_ZLIB:
        incompat |= C.INCOMPAT_COMPRESSION
    if opts.extended_l2:
        incompat |= C.INCOMPAT_EXTL2
    hdr = Header(
        version=opts.version,
        cluster_bits=cluster_bits,
        size=size,
        l1_size=len(sim.l1_table),
        l1_table_offset=sim.l1_table_offset,
        refcount_table_offset=sim.refcount_table_offset,
        refcount_table_clusters=sim.refcount_table_size * 8 // sim.cs,
        incompatible_features=incompat,
        compatible_features=C.COMPAT_LAZY_REFCOUNTS if opts.lazy_refcounts else 0,
        autoclear_features=C.AUTOCLEAR_DATA_FILE_RAW if opts.data_file_raw else 0,
        refcount_order=opts.refcount_bits.bit_length() - 1,
        header_length=C.V3_HEADER_LENGTH if opts.version >= 3 else C.V2_HEADER_LENGTH,
        compression_type=opts.compression_type,
        backing_file=opts.backing_file,
        backing_format=opts.backing_fmt if opts.backing_file is not None else None,
        data_file=opts.data_file,
        crypt_method=opts.encryption.method if opts.encryption is not None else C.CRYPT_NONE,
        crypto_area=crypto_area,
    )
    if opts.backing_file is not None and len(opts.backing_file.encode()) > C.QCOW_MAX_BACKING_NAME:
        raise Qcow2FormatError(
            f"Could not assign backing file: name longer than {C.QCOW_MAX_BACKING_NAME} "
            f"bytes: backing_file={opts.backing_file!r}"
        )
    try:
        cluster0 = hdr.to_cluster0()
    except Qcow2FormatError as exc:
        raise Qcow2FormatError(
            f"Could not write the header (no space left in cluster 0): {exc}"
        ) from None
    sim.file.write(0, cluster0)
    return _SimResult(hdr, sim.file, sim.data_file if opts.data_file is not None else None)


# --------------------------------------------------------------------------
# Writing the files
# --------------------------------------------------------------------------
def _create_file(path: str) -> None:
    """file-posix's create: O_CREAT (mode 0644 before umask) and truncate to 0."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise Qcow2IOError(f"Could not create {path!r}: {exc.strerror or exc}", exc.errno) from exc
    try:
        os.ftruncate(fd, 0)
    except OSError as exc:
        raise Qcow2IOError(
            f"Could not truncate {path!r}: {exc.strerror or exc}", exc.errno
        ) from exc
    finally:
        os.close(fd)


def _materialize(path: str, model: _FileModel) -> None:
    """Give ``path`` the length, preallocation and written bytes recorded in ``model``."""
    _create_file(path)
    fb = FileBackend(path, writable=True)
    try:
        fb.truncate(model.length, "create_truncate")
        for start, end, mode in model.fills:
            if mode == "falloc":
                try:
                    os.posix_fallocate(fb.fd, start, end - start)
                except OSError as exc:
                    raise Qcow2IOError(
                        f"Could not preallocate new data in {path!r}: {exc.strerror or exc}",
                        exc.errno,
                    ) from exc
            else:
                zeros = bytes(min(_WRITE_CHUNK, end - start))
                pos = start
                while pos < end:
                    n = min(len(zeros), end - pos)
                    fb.pwrite(memoryview(zeros)[:n], pos, "prealloc_full")
                    pos += n
        for start, end in model.merged_extents():
            pos = start
            while pos < end:
                n = min(_WRITE_CHUNK, end - pos)
                fb.pwrite(model.read(pos, n), pos, "create_write")
                pos += n
        fb.flush("create_flush")
    finally:
        fb.close()


def create(
    path: str | os.PathLike[str],
    size: int | None,
    *,
    compat: str = "1.1",
    cluster_size: int = 65536,
    refcount_bits: int = 16,
    lazy_refcounts: bool = False,
    compression_type: str = "zlib",
    extended_l2: bool = False,
    backing_file: str | os.PathLike[str] | None = None,
    backing_fmt: str | None = None,
    data_file: str | os.PathLike[str] | None = None,
    data_file_raw: bool = False,
    preallocation: str = "off",
    encrypt_format: str | None = None,
    passphrase: str | bytes | None = None,
    encrypt_cipher_alg: str = "aes-256",
    encrypt_cipher_mode: str = "xts",
    encrypt_ivgen_alg: str = "plain64",
    encrypt_ivgen_hash_alg: str | None = None,
    encrypt_hash_alg: str = "sha256",
    encrypt_iter_time: int = 2000,
) -> None:
    """Create a qcow2 image with the same bytes as ``qemu-img create -f qcow2 -o ...``.

    Keyword names are qemu-img's ``-o`` option names. ``size`` is in bytes and
    is rounded up to a multiple of 512 like qemu-img does; it may be ``None``
    when ``backing_file`` is given, in which case the backing file's size is
    used. ``compat`` is "0.10"/"v2" or "1.1"/"v3".

    ``backing_file`` is stored exactly as given; a relative name is resolved
    against the new image's folder (as QEMU will resolve it when opening).
    ``backing_fmt`` is required with a backing file (QEMU 7.2 refuses to
    probe), and the backing file must open. ``data_file`` is created (or
    truncated) at the given path, which, as in QEMU, is relative to the
    current directory, and is stored as given in the header (QEMU 7.2 also
    opens a relative data-file name from the current directory, not from the
    image's folder). ``data_file_raw`` implies at least
    ``preallocation="metadata"``.

    ``preallocation``: "off"; "metadata" (L2 tables written and every data
    cluster allocated, but not written); "falloc"/"full" (as metadata, plus
    the data area allocated with ``posix_fallocate`` or written with zeros).

    ``encrypt_format`` "aes" (legacy, QEMU's ``encrypt.format=aes``) or "luks"
    encrypts the guest data with ``passphrase`` (``str`` as UTF-8, or ``bytes``);
    the ``encrypt_*`` options are QEMU's ``encrypt.cipher-alg`` ... ``iter-time``
    (milliseconds of PBKDF2 per keyslot), accepted for LUKS only, with QEMU's
    defaults. The LUKS area is placed as QEMU places it (after the L1 table);
    its random master key, salts and UUID are new, so only those bytes differ
    from what ``qemu-img create`` writes.

    Everything is validated and laid out in memory before any file is
    touched; an existing file at ``path`` is truncated. Raises
    :class:`~qcow2aio.Qcow2FormatError` for invalid values,
    :class:`~qcow2aio.Qcow2UnsupportedError` for unsupported ones and
    :class:`~qcow2aio.Qcow2IOError` for file errors.
    """
    path = os.fspath(path)
    for name, flag in (
        ("lazy_refcounts", lazy_refcounts),
        ("extended_l2", extended_l2),
        ("data_file_raw", data_file_raw),
    ):
        if not isinstance(flag, bool):
            # bool("off") is True: refuse anything but a real bool.
            raise Qcow2FormatError(f"{name} must be True or False, not {flag!r}")
    bf = os.fspath(backing_file) if backing_file is not None else None
    df = os.fspath(data_file) if data_file is not None else None

    opts = _validate(
        compat=compat,
        cluster_size=cluster_size,
        refcount_bits=refcount_bits,
        lazy_refcounts=lazy_refcounts,
        compression_type=compression_type,
        extended_l2=extended_l2,
        backing_file=bf,
        backing_fmt=backing_fmt,
        data_file=df,
        data_file_raw=data_file_raw,
        preallocation=preallocation,
    )
    if isinstance(passphrase, str | bytes) or passphrase is None:
        pass
    else:
        raise Qcow2FormatError(f"passphrase must be str or bytes, not {type(passphrase).__name__}")
    if bf is not None:
        # bdrv_img_create's checks on the backing file come before the format's.
        if bf == path:
            raise Qcow2FormatError(
                "Trying to create an image with the same filename as the backing file: "
                f"backing_file={bf!r}"
            )
        if bf == "":
            raise Qcow2FormatError("Expected backing file name, got empty string")
        if backing_fmt is None:
            raise Qcow2FormatError(
                f"Backing file specified without backing format: backing_file={bf!r}"
            )
        probed = backing_size(path, bf, backing_fmt)
        if size is None:
            size = probed
    if size is None:
        raise Qcow2FormatError("Image creation needs a size parameter")
    if isinstance(size, bool) or not isinstance(size, int):
        raise Qcow2FormatError(f"size must be an integer number of bytes, not {size!r}")
    if size < 0 or size > C.INT64_MAX:
        raise Qcow2FormatError(
            f"Invalid image size specified: size={size} (must be between 0 and {C.INT64_MAX})"
        )
    size = _round_up(size, _SECTOR)
    if size > C.INT64_MAX:
        raise Qcow2FormatError(f"Invalid image size specified: size={size}")

    opts.encryption = _encryption(
        encrypt_format,
        passphrase,
        {
            "encrypt_cipher_alg": encrypt_cipher_alg,
            "encrypt_cipher_mode": encrypt_cipher_mode,
            "encrypt_ivgen_alg": encrypt_ivgen_alg,
            "encrypt_ivgen_hash_alg": encrypt_ivgen_hash_alg,
            "encrypt_hash_alg": encrypt_hash_alg,
            "encrypt_iter_time": encrypt_iter_time,
        },
    )
    result = _simulate(opts, size)

    _materialize(path, result.image)
    if result.data is not None and df is not None:
        try:
            _materialize(df, result.data)
        except Qcow2Error:
            # QEMU deletes what it created when creation fails.
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
