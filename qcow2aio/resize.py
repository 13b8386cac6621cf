"""The metadata work of a resize (grow, shrink, preallocation), as ``qemu-img resize`` does it.

Everything here is synchronous and runs with the image's metadata lock held,
no request in flight and the cached metadata written back (the drivers in
:mod:`qcow2aio.image` drain, lock and flush first), so nothing can see half a
resize. The ordering keeps a crash to leaks at worst:

* **L1 growth:** the new, larger table is allocated with the image's one
  allocator (first fit), its refcounts are written and flushed, then the table
  itself, flushed; one 12-byte header write (``l1_size`` + ``l1_table_offset``
  at offset 36), flushed, switches to it; only then is the old table freed.
  On a resize the new table has exactly the entries the new size needs.
* **Preallocation** (``metadata``/``falloc``/``full``) allocates L2 tables and
  data clusters for the new range; the usual writeback (refcount blocks, flush,
  L2 tables, flush, L1) publishes them. ``metadata`` writes each run's data
  (copy-on-write head and tail) and grows the file over the run before linking
  it, so a failure leaves the run unlinked (a leak), never linked past the end
  of the file. ``falloc``/``full`` first lay a new,
  exactly sized refcount structure at the end of the used area (covering the
  new data and L2 tables), place the data clusters right after it, and extend
  the file with ``posix_fallocate`` or written zeros, as QEMU does.
* **Shrink:** the clusters past the new end are unlinked (L2 entries, then L1
  entries beyond the new L1 size, each write made durable) and freed only
  after; refcount blocks left describing nothing are dropped from the refcount
  table; the file is truncated after its last used cluster.
* The new virtual size is written last (8 bytes at offset 24), flushed.
"""

from __future__ import annotations

import os
import struct
from array import array
from typing import TYPE_CHECKING

from . import constants as C
from .errors import Qcow2Error, Qcow2FormatError, Qcow2IOError, Qcow2UnsupportedError
from .header import size_to_l1
from .metadata import DEFAULT_L2_CACHE_BYTES
from .tables import Table, encode_be64
from .writes import ALL_ALLOC, l2_for_write, zero_clusters

if TYPE_CHECKING:
    from .image import Image

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
_INT_MAX = (1 << 31) - 1
_WRITE_CHUNK = 4 << 20
# QEMU's BDRV_MAX_LENGTH: INT64_MAX rounded down to 1 GiB.
_BDRV_MAX_LENGTH = C.INT64_MAX & ~((1 << 30) - 1)


def check_resize(img: Image, size: int, shrink: bool, preallocation: str) -> None:
    """qemu-img's checks of a resize request, in its order and with its messages."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise Qcow2FormatError(f"size must be an integer number of bytes, not {size!r}")
    if size <= 0:
        raise Qcow2FormatError("New image size must be positive")
    if preallocation not in PREALLOCATION_MODES:
        raise Qcow2FormatError(f"Invalid preallocation mode '{preallocation}'")
    if not img.writable:
        from .errors import Qcow2ReadOnlyError

        raise Qcow2ReadOnlyError(f"image {img.path!r} is opened read-only")
    old = img.meta.header.size
    if size <= old and preallocation != "off":
        raise Qcow2FormatError("Preallocation can only be used for growing images")
    if size < old and not shrink:
        raise Qcow2FormatError("Use the --shrink option to perform a shrink operation.")
    if size > _BDRV_MAX_LENGTH:
        raise Qcow2FormatError(f"offset({size}) exceeds maximum({_BDRV_MAX_LENGTH})")
    if size % 512:
        raise Qcow2FormatError("The new size must be a multiple of 512")
    if img.meta.header.nb_snapshots and img.meta.version < 3:
        raise Qcow2UnsupportedError("Can't resize a v2 image which has snapshots")
    if img._bitmaps is not None:
        img._bitmaps.check_resize()  # an inconsistent bitmap refuses, as in QEMU


def resize_locked(img: Image, size: int, preallocation: str, *, creating: bool = False) -> None:
    """Change the virtual size to ``size`` (checked by :func:`check_resize`).

    ``creating``: the growth of a new image from size 0 (``qcow2aio.create``), which
    runs even to size 0 (falloc/full then still lay out their refcount area).
    """
    meta = img.meta
    old = meta.header.size
    if size > _BDRV_MAX_LENGTH:
        raise Qcow2FormatError(f"offset({size}) exceeds maximum({_BDRV_MAX_LENGTH})")
    if size < old:
        _shrink(img, size)
    elif size > old or creating:
        _grow(img, old, size, preallocation)
    _write_size(img, size)
    if img._bitmaps is not None:
        img._bitmaps.resize(size & ~511)  # stored at close, as QEMU does


# ------------------------------------------------------------------ common
def _flush(img: Image, event: str) -> None:
    """Write back everything cached (refcounts, flush, L2, flush, L1, flush) and apply
    the frees it made safe: no request is in flight, so every durable free applies."""
    meta = img.meta
    assert meta.writeback is not None and meta.allocator is not None
    for step in meta.writeback.flush_steps():
        meta.flush_files(f"{event}_{step}")
    meta.allocator.apply_frees(None)


def _write_size(img: Image, size: int) -> None:
    meta = img.meta
    meta.file.pwrite(struct.pack(">Q", size), 24, "resize_header")
    meta.flush_files("resize_header")
    meta.header.size = size


def grow_l1(img: Image, new_l1_size: int) -> None:
    """Replace the active L1 table by one of exactly ``new_l1_size`` entries."""
    meta = img.meta
    alloc = meta.allocator
    wb = meta.writeback
    assert alloc is not None and wb is not None
    old = meta.l1
    old_n = len(old.entries)
    if new_l1_size <= old_n:
        return
    if new_l1_size > C.QCOW_MAX_L1_SIZE // 8:
        raise Qcow2FormatError(
            "The image size is too large for file format 'qcow2' (try using a larger "
            f"cluster size): l1_size={new_l1_size}"
        )
    cs = meta.cluster_size
    entries = array("Q", old.entries)
    entries.extend(array("Q", bytes(8 * (new_l1_size - old_n))))
    nbytes = new_l1_size * 8
    offset = alloc.alloc_clusters((nbytes + cs - 1) // cs)
    meta.add_meta_range(offset, nbytes, "l1")
    # Refcounts of the new table durable, then the table, then the switch.
    wb.write_refblocks()
    meta.flush_files("l1_grow_alloc_table")
    meta.file.pwrite(encode_be64(entries), offset, "l1_grow_write_table")
    meta.flush_files("l1_grow_write_table")
    try:
        meta.file.pwrite(struct.pack(">IQ", new_l1_size, offset), 36, "l1_grow_activate_table")
        meta.flush_files("l1_grow_activate_table")
    except Qcow2Error as exc:
        # Which table the header names is unknown now: no more writeback until reopen.
        meta.poison(exc)
        raise
    meta.l1 = Table(offset, entries)
    meta.header.l1_size = new_l1_size
    meta.header.l1_table_offset = offset
    if old_n:
        meta.remove_meta_range(old.offset, old_n * 8)
        # Nothing refers to the old table any more (nothing in flight, header switched).
        alloc.update_refcount(old.offset, old_n * 8, -1)
    # A default L2 cache was sized to cover the old disk: let it cover the new one
    # (a size the caller chose stays as it is).
    want = min(new_l1_size, max(1, DEFAULT_L2_CACHE_BYTES // cs))
    if meta.l2_cache_default and meta.l2_cache.capacity < want:
        meta.l2_cache.capacity = want


# -------------------------------------------------------------------- grow
def _grow(img: Image, old: int, size: int, preallocation: str) -> None:
    meta = img.meta
    grow_l1(img, size_to_l1(size, meta.cluster_bits, meta.l2_bits))
    if preallocation == "off":
        if meta.has_data_file:
            _truncate_data(img, size, "off")
    elif preallocation == "metadata" or meta.has_data_file:
        _prealloc_map(img, old, size, preallocation)
    else:
        _prealloc_file(img, old, size, preallocation)
    backing = img.backing
    if backing is not None and backing.size > old:
        # A longer backing file must not show through the new range.
        if preallocation in ("off", "metadata"):
            _zero_new_range(img, old, size)
        elif meta.extended_l2:
            # falloc/full wrote or allocated the new range as data that reads as
            # zeros, but linked it with unallocated subclusters (the backing file
            # would show): QEMU then marks every subcluster allocated.
            _mark_allocated(img, old, size)
        # Else falloc/full linked data that reads as zeros: QEMU sets no zero flags.
    _flush(img, "resize")


def _mark_allocated(img: Image, old: int, size: int) -> None:
    """Every subcluster of the clusters falloc/full preallocated for ``[old, size)``
    allocated (the first, partial one included: its head was copied into it)."""
    meta = img.meta
    cb = meta.cluster_bits
    pos = old & ~(meta.cluster_size - 1)
    while pos < size:
        table = l2_for_write(img, pos >> (cb + meta.l2_bits))
        idx = (pos >> cb) & (meta.l2_entries - 1)
        if table.entries[2 * idx] & C.L2E_OFFSET_MASK:
            table.entries[2 * idx + 1] = ALL_ALLOC
            table.dirty = True
        pos += meta.cluster_size


def _zero_new_range(img: Image, old: int, size: int) -> None:
    """A longer backing file must not show through the new range: it reads as zeros."""
    meta = img.meta
    if meta.version < 3:
        raise Qcow2UnsupportedError("Block driver does not support requested flags")
    sub = 1 << meta.subcluster_bits
    start = (old + sub - 1) & ~(sub - 1)
    if size > start:
        cs = meta.cluster_size
        aligned_end = (size + cs - 1) & ~(cs - 1)
        left = zero_clusters(img, start, aligned_end, unmap=False, discard=False)
        if left:
            raise Qcow2Error("internal error: zeroing the new range left compressed parts")
    if start > old:
        n = min(start, size) - old
        _write_guest(img, old, bytes(n))


def _write_guest(img: Image, offset: int, data: bytes) -> None:
    """A small guest write with the lock already held (the unaligned head of a range)."""
    img._write_locked_sync(offset, memoryview(data))


def _truncate_data(img: Image, length: int, mode: str) -> None:
    """file-posix truncate of the data file: exact size; falloc/full fill the new tail."""
    f = img._data
    cur = f.size()
    if length < cur:
        f.truncate(length, "resize_truncate")
        return
    if length == cur:
        return
    f.truncate(length, "resize_truncate")
    _fill(img, f.path, f, cur, length, mode)


def _fill(img: Image, path: str, f: object, start: int, end: int, mode: str) -> None:
    from .io import FileBackend

    assert isinstance(f, FileBackend)
    if mode == "falloc":
        try:
            os.posix_fallocate(f.fd, start, end - start)
        except OSError as exc:
            raise Qcow2IOError(
                f"Could not preallocate new data in {path!r}: {exc.strerror or exc}", exc.errno
            ) from exc
    elif mode == "full":
        zeros = bytes(min(_WRITE_CHUNK, end - start))
        pos = start
        while pos < end:
            n = min(len(zeros), end - pos)
            f.pwrite(memoryview(zeros)[:n], pos, "prealloc_full")
            pos += n


def _entry_words(meta_ext: bool, table: Table, idx: int) -> tuple[int, int]:
    if meta_ext:
        return table.entries[2 * idx], table.entries[2 * idx + 1]
    return table.entries[idx], 0


def _link(table: Table, idx: int, ext: bool, host: int) -> None:
    if ext:
        table.entries[2 * idx] = host | C.QCOW_OFLAG_COPIED
    else:
        table.entries[idx] = host | C.QCOW_OFLAG_COPIED
    table.dirty = True


def _needs_alloc(img: Image, entry: int) -> bool:
    """Whether preallocation must give this L2 entry a cluster (not already our own)."""
    if entry & C.QCOW_OFLAG_COMPRESSED:
        return True
    host = entry & C.L2E_OFFSET_MASK
    if entry & C.QCOW_OFLAG_COPIED and (host or img.meta.has_data_file):
        return bool(entry & C.QCOW_OFLAG_ZERO) and not host
    return True


def _prealloc_map(img: Image, start: int, end: int, mode: str) -> None:
    """Metadata preallocation of guest ``[start, end)``: every cluster allocated and
    mapped (data clusters are not written, except the partial ones' unmapped parts, as
    QEMU's copy-on-write writes them); then the file grows over the last data run."""
    meta = img.meta
    alloc = meta.allocator
    assert alloc is not None
    cs = meta.cluster_size
    cb = meta.cluster_bits
    ext = meta.extended_l2
    l2_span = 1 << (cb + meta.l2_bits)
    data_file = meta.has_data_file
    pos = start
    last_end = 0  # host end of the last contiguous data run
    next_host = -1  # where the current run would continue
    chunk_end = start + min(end - start, (_INT_MAX // cs) * cs)
    while pos < end:
        if pos >= chunk_end:
            chunk_end = pos + min(end - pos, (_INT_MAX // cs) * cs)
            next_host = -1
        l1_index = pos >> (cb + meta.l2_bits)
        table = l2_for_write(img, l1_index)
        idx = (pos >> cb) & (meta.l2_entries - 1)
        entry, _ = _entry_words(ext, table, idx)
        cstart = pos & ~(cs - 1)
        if not _needs_alloc(img, entry):
            # Already ours (QEMU keeps it); a run may continue after it.
            host = cstart if data_file else entry & C.L2E_OFFSET_MASK
            next_host = host + cs
            pos = min(end, cstart + cs)
            last_end = host + (pos - cstart)
            continue
        # A run of clusters needing allocation, up to the end of this L2 table.
        stop = min(end, (pos & ~(l2_span - 1)) + l2_span)
        n = 0
        p = cstart
        while p < stop:
            e, _ = _entry_words(ext, table, (p >> cb) & (meta.l2_entries - 1))
            if not _needs_alloc(img, e):
                break
            n += 1
            p += cs
        if data_file:
            host = cstart
            got = n
        elif next_host != -1:
            got = alloc.alloc_at(next_host, n)
            host = next_host
            if not got:
                next_host = -1
                continue
        else:
            host = alloc.alloc_clusters(n)
            got = n
        # Data before links: the run's data (copy-on-write of the partial first and
        # last clusters, zeros over reused clusters) is written, and the file grown
        # over the run, before any entry of the run is linked. A failed write or
        # truncate then leaves the new clusters counted but unlinked (a leak), never
        # an entry pointing at a cluster that is past the end of the file (qemu-img
        # check counts that as corruption) or that misses its copied head.
        # The head is read before the link: linked, it would read the new (unwritten)
        # cluster instead of the backing file's or the old cluster's bytes.
        head = pos - cstart
        head_data = _old_content(img, cstart, head) if head else b""
        run_end = min(end, cstart + got * cs)
        tail_from = run_end - cstart
        tail_to = (tail_from + (1 << meta.subcluster_bits) - 1) & ~((1 << meta.subcluster_bits) - 1)
        target = img._data
        if not data_file:
            _zero_reused(img, host, got, cstart)
            # QEMU grows the file to the host end of the last guest byte mapped, once
            # at the end; growing it per run, before the links, ends the same.
            if host + tail_from > target.size():
                target.truncate(host + tail_from, "resize_truncate")
        if head:
            target.pwrite(head_data, host, "cow_read")
        if tail_to > tail_from:
            zeros = bytearray(tail_to - tail_from)
            if img._crypto is not None:
                # Zeros as the guest reads them: encrypted like any data written.
                img._crypto.encrypt(zeros, host + tail_from, cstart + tail_from)
            target.pwrite(zeros, host + tail_from, "cow_write")
        for k in range(got):
            i = idx + k
            e, _ = _entry_words(ext, table, i)
            if e & C.L2E_OFFSET_MASK and not data_file:
                alloc.free_later(e & C.L2E_OFFSET_MASK, cs, img.retire_epoch())
            _link(table, i, ext, host + k * cs)
        pos = run_end
        next_host = host + got * cs
        # QEMU grows the file to the host end of the last guest byte mapped.
        last_end = host + (run_end - cstart)
    target = img._data
    if last_end > target.size():
        if target is img._file:
            target.truncate(last_end, "resize_truncate")
        else:
            _truncate_data(img, last_end, "off" if mode == "metadata" else mode)


def _zero_reused(img: Image, host: int, n: int, guest: int) -> None:
    """Zero the part of ``n`` new clusters at ``host`` (mapping guest ``guest``) that
    lies inside the file: clusters freed earlier (a shrink) keep their old bytes,
    which QEMU's discard punches out of the file (they read as zeros) and our shrink
    does not; a preallocated cluster must not show a dropped range's data. Written
    before the link, as any data (the writeback syncs it before the L2 table)."""
    f = img._file
    cs = img.meta.cluster_size
    end = min(host + n * cs, f.size())
    pos = host
    while pos < end:
        k = min(end - pos, _WRITE_CHUNK)
        zeros = bytearray(k)
        if img._crypto is not None:
            img._crypto.encrypt(zeros, pos, guest + (pos - host))
        f.pwrite(zeros, pos, "cow_write")
        pos += k


def _old_content(img: Image, offset: int, length: int) -> bytes:
    """Guest bytes ``[offset, offset+length)`` as they read now (lock held)."""
    if img._crypto is not None:
        raise Qcow2UnsupportedError(
            "preallocation from an unaligned size of an encrypted image is not supported"
        )
    out = bytearray(length)
    img._read_locked_sync(memoryview(out), offset, "cow_read")
    return bytes(out)


def _prealloc_file(img: Image, start: int, end: int, mode: str) -> None:
    """falloc/full preallocation: refcounts laid at the end of the used area for the
    new clusters, the data area right after them (allocated in the file), then mapped."""
    meta = img.meta
    alloc = meta.allocator
    assert alloc is not None
    cs = meta.cluster_size
    cb = meta.cluster_bits
    ext = meta.extended_l2
    f = img._file
    file_size = f.size()
    last = alloc.last_used_cluster(file_size)
    used_end = (last + 1) * cs if last >= 0 else (file_size + cs - 1) & ~(cs - 1)
    cstart = start & ~(cs - 1)
    nb_data = (((end + cs - 1) & ~(cs - 1)) - cstart) >> cb
    l2e = 16 if ext else 8
    nb_l2 = (nb_data + cs // l2e - 1) // (cs // l2e) + 1
    head = start - cstart
    head_data = _old_content(img, cstart, head) if head else b""
    allocation_start = alloc.refcount_area(used_end, nb_data + nb_l2)
    got = alloc.alloc_at(allocation_start, nb_data)
    if got != nb_data:
        raise Qcow2Error("internal error: the preallocated data area is not free")
    new_size = allocation_start + nb_data * cs
    cur = f.size()
    if allocation_start < cur:
        # Free clusters at the end of the file keep the bytes they had (frees that
        # waited for readers after a shrink cut the file, junk a crash left): the new
        # data area must read as zeros there too. QEMU frees at once and so never
        # meets freed bytes here; over junk it shows the junk, which we do not copy.
        _fill(img, f.path, f, allocation_start, min(cur, new_size), "full")
    if new_size > cur:
        f.truncate(new_size, "resize_truncate")
        _fill(img, f.path, f, cur, new_size, mode)
    host = allocation_start
    guest = cstart
    left = nb_data
    while left:
        l1_index = guest >> (cb + meta.l2_bits)
        table = l2_for_write(img, l1_index)
        idx = (guest >> cb) & (meta.l2_entries - 1)
        n = min(left, meta.l2_entries - idx)
        for k in range(n):
            e, _ = _entry_words(ext, table, idx + k)
            if e & C.QCOW_OFLAG_COMPRESSED or e & C.L2E_OFFSET_MASK:
                img_free_old(img, e)
            if ext:
                # Preallocated: the subclusters keep their state (unallocated reads as
                # zeros or backing data), as QEMU links preallocated clusters.
                table.entries[2 * (idx + k)] = (host + k * cs) | C.QCOW_OFLAG_COPIED
                table.dirty = True
            else:
                _link(table, idx + k, ext, host + k * cs)
        guest += n * cs
        host += n * cs
        left -= n
    if head:
        f.pwrite(head_data, allocation_start, "cow_write")


def img_free_old(img: Image, entry: int) -> None:
    from .writes import _queue_free_old

    _queue_free_old(img, entry)


# ------------------------------------------------------------------ shrink
def _shrink(img: Image, size: int) -> None:
    meta = img.meta
    alloc = meta.allocator
    assert alloc is not None
    cs = meta.cluster_size
    old = meta.header.size
    start = (size + cs - 1) & ~(cs - 1)
    if old > start:
        _discard_all(img, start, old)
    _flush(img, "shrink_discard")
    new_l1 = size_to_l1(size, meta.cluster_bits, meta.l2_bits)
    l1 = meta.l1
    dropped: list[int] = []
    for i in range(new_l1, len(l1.entries)):
        off = l1.entries[i] & C.L1E_OFFSET_MASK
        if off:
            dropped.append(off)
        if l1.entries[i]:
            l1.entries[i] = 0
            l1.dirty = True
    if l1.dirty:
        assert meta.writeback is not None
        meta.writeback.write_l1()
        meta.flush_files("shrink_l1")
    for off in dropped:
        meta.l2_cache.discard(off)
        meta.remove_meta_range(off, cs)
        alloc.update_refcount(off, cs, -1)
    _flush(img, "shrink_l1")
    alloc.shrink_reftable()
    last = alloc.last_used_cluster(meta.file.size())
    if last >= 0 and meta.file.size() > (last + 1) * cs:
        meta.file.truncate((last + 1) * cs, "shrink_truncate")
    if meta.has_data_file:
        # The external data file follows the virtual size, as QEMU truncates it.
        _truncate_data(img, size, "off")


def _discard_all(img: Image, start: int, end: int) -> None:
    """Unlink every cluster of guest ``[start, end)`` (entries become 0), freed later."""
    meta = img.meta
    cs = meta.cluster_size
    cb = meta.cluster_bits
    ext = meta.extended_l2
    pos = start
    l2_span = 1 << (cb + meta.l2_bits)
    while pos < end:
        l1_index = pos >> (cb + meta.l2_bits)
        nxt = min(end, (pos & ~(l2_span - 1)) + l2_span)
        # As QEMU's discard: the table is made writable first, so a missing one is
        # allocated (empty) and a shared one copied, even where nothing is unlinked;
        # tables past the new end are freed again with the L1 entries.
        table = l2_for_write(img, l1_index)
        while pos < nxt:
            idx = (pos >> cb) & (meta.l2_entries - 1)
            e, b = _entry_words(ext, table, idx)
            if e or b:
                img_free_old(img, e)
                if ext:
                    table.entries[2 * idx] = 0
                    table.entries[2 * idx + 1] = 0
                else:
                    table.entries[idx] = 0
                table.dirty = True
            pos += cs
