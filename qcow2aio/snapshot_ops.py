"""Internal snapshots as operations of an open image: create, apply (goto), delete.

Each function here runs synchronously with the image's metadata lock held and no
request in flight (``Image._exclusive``): it never awaits, so no request can see
half an operation. The behaviour follows ``qemu-img snapshot`` 7.2 (observed):

* a new snapshot gets id ``max(strtoul(id)) + 1``; names need not be unique;
  the VM state size, VM clock and icount are 0; the date is the wall clock with
  microsecond resolution; the table entry carries 24 bytes of extra data;
* apply resolves an id first, then a name; delete (qemu-img ``-d``) a name, and
  here, when no name matches, an id too;
* the snapshot table is rewritten to newly allocated clusters and switched by
  one 12-byte header write (``nb_snapshots`` + ``snapshots_offset``, offset 60);
  the old table is freed afterwards. An empty table is offset 0.

Allocation order is QEMU's (L1 copy, refcount updates, new table, free old
table) so an image snapshotted here is laid out like one snapshotted by qemu-img.

Crash ordering (docs/reliability.md):

* create: L1 copy and refcount increases written and made durable (with the
  COPIED flags they change) before the header switch that links them; the old
  table is freed after it. A crash before the switch leaks.
* apply: a snapshot taken at another disk size first resizes the disk (a
  complete resize of its own, as QEMU truncates before loading; v2 images with
  snapshots refuse it) and grows the active L1 table if the snapshot's is larger
  (the active table never shrinks). Then the snapshot's clusters' refcount
  increases are durable before the active L1 table is overwritten (the
  snapshot's own L1 copy loses its COPIED flags, as in QEMU); the old active
  tree's decreases come after, and its tables still used by snapshots get their
  COPIED flags recomputed in place (layout only: QEMU does it too).
* delete: the header switch first, then the decreases.

Refcounts and COPIED flags are in different clusters, so between their writes
``qemu-img check`` would see an OFLAG_COPIED mismatch (QEMU 7.2 has the same
window). On v3 images the operation therefore sets the dirty bit first (made
durable) and clears it at the end: a crash in between leaves an image that QEMU
and qcow2aio repair at their next read-write open. v2 images have no dirty bit:
there a crash inside that window leaves COPIED mismatches (no data at risk; the
refcounts are leaks at worst), as with QEMU.

Everything that could refuse the operation (a hostile snapshot table, an L1 or
L2 table out of the file or over other metadata, a refcount that would overflow
or drop below zero) is checked before the first write.
"""

from __future__ import annotations

import errno
import struct
import time
from array import array
from collections import Counter
from typing import TYPE_CHECKING

from . import constants as C
from .errors import Qcow2CorruptError, Qcow2Error
from .snapshot import Snapshot, check_placement, validate_snapshot_l1
from .tables import Table, compressed_descriptor, encode_be64, read_table

if TYPE_CHECKING:
    from collections.abc import Callable

    from .image import Image
    from .metadata import Metadata

_SNAP = struct.Struct(">QIHHIIQII")
_EXTRA = struct.Struct(">QQQ")
_NAME_MAX = 255  # qemu-img copies the name into a char[256] (pstrcpy: truncated)
_ULONG = (1 << 64) - 1


class SnapshotError(Qcow2Error):
    """A snapshot operation was refused; ``errno`` is what QEMU's would return."""

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = err


class SnapshotResizeError(SnapshotError):
    """Loading a snapshot of another disk size needs a resize, which was refused
    (qemu-img reports the resize error itself, then the failed load)."""


class SnapshotNotFoundError(SnapshotError):
    """No snapshot has the given name (or id)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno.ENOENT)


# ------------------------------------------------------------------ resolution
def find_for_apply(snaps: list[Snapshot], name_or_id: str) -> int:
    """``find_snapshot_by_id_or_name``: the first snapshot with that id, else that name."""
    for i, sn in enumerate(snaps):
        if sn.id_str == name_or_id:
            return i
    for i, sn in enumerate(snaps):
        if sn.name == name_or_id:
            return i
    raise SnapshotNotFoundError(f"no snapshot with id or name {name_or_id!r}")


def find_by_id_and_name(snaps: list[Snapshot], snapshot_id: str | None, name: str | None) -> int:
    """``find_snapshot_by_id_and_name``: the first snapshot matching every one given."""
    for i, sn in enumerate(snaps):
        if (snapshot_id is None or sn.id_str == snapshot_id) and (name is None or sn.name == name):
            return i
    raise SnapshotNotFoundError("Can't find snapshot")


def load_tmp(img: Image, snapshot_id: str | None, name: str | None) -> None:
    """``bdrv_snapshot_load_tmp`` on a read-only image: its L1 table becomes the
    snapshot's, so every read, map and block status shows the snapshot. The disk
    keeps its present size, as in QEMU 7.2 (past a smaller snapshot's L1 table:
    zeros). Nothing is written; the L2 cache stays valid (keyed by host offset)."""
    meta = img.meta
    index = find_by_id_and_name(meta.snapshots, snapshot_id, name)
    sn = meta.snapshots[index]
    l1 = _read_snapshot_l1(meta, sn, index)
    meta.l1 = Table(sn.l1_table_offset, l1)


def find_by_name(snaps: list[Snapshot], name: str) -> int:
    """``bdrv_snapshot_find`` of qemu-img 7.2 (``snapshot -d``): names only."""
    for i, sn in enumerate(snaps):
        if sn.name == name:
            return i
    raise SnapshotNotFoundError(f"no snapshot named {name!r}")


def find_for_delete(snaps: list[Snapshot], name_or_id: str) -> int:
    """A name (as ``qemu-img snapshot -d``), else an id (as QMP's delete)."""
    try:
        return find_by_name(snaps, name_or_id)
    except SnapshotNotFoundError:
        for i, sn in enumerate(snaps):
            if sn.id_str == name_or_id:
                return i
    raise SnapshotNotFoundError(f"no snapshot with name or id {name_or_id!r}")


def _strtoul(raw: bytes) -> int:
    """C's ``strtoul(s, NULL, 10)`` on a 64-bit host (what QEMU's id search uses)."""
    s = raw.lstrip(b" \t\n\v\f\r")
    neg = s[:1] == b"-"
    if s[:1] in (b"+", b"-"):
        s = s[1:]
    n = 0
    digits = 0
    for ch in s:
        if not 48 <= ch <= 57:
            break
        n = n * 10 + ch - 48
        digits += 1
    if not digits:
        return 0
    if n > _ULONG:
        return _ULONG
    return (-n) & _ULONG if neg else n


def new_snapshot_id(snaps: list[Snapshot]) -> str:
    """``find_new_snapshot_id``: one more than the largest numeric id."""
    top = max((_strtoul(sn.id_raw or sn.id_str.encode()) for sn in snaps), default=0)
    return str((top + 1) & _ULONG)


# ------------------------------------------------------------------- encoding
def _raw(sn: Snapshot) -> tuple[bytes, bytes]:
    return (sn.id_raw or sn.id_str.encode(), sn.name_raw or sn.name.encode())


def encode_table(snaps: list[Snapshot], disk_size: int) -> bytes:
    """``qcow2_write_snapshots``' table: entries 8-byte aligned, the last unpadded."""
    out = bytearray()
    for sn in snaps:
        out += bytes(-len(out) % 8)
        id_raw, name_raw = _raw(sn)
        if len(id_raw) > 0xFFFF or len(name_raw) > 0xFFFF:
            raise SnapshotError("snapshot id or name too long", errno.EINVAL)
        unknown = sn.extra_data[_EXTRA.size :]
        extra_len = _EXTRA.size + len(unknown)
        vm_state = sn.vm_state_size
        out += _SNAP.pack(
            sn.l1_table_offset,
            sn.l1_size,
            len(id_raw),
            len(name_raw),
            sn.date_sec,
            sn.date_nsec,
            sn.vm_clock_nsec,
            vm_state if vm_state <= 0xFFFFFFFF else 0,
            extra_len,
        )
        disk = disk_size if sn.disk_size is None else sn.disk_size
        icount = _ULONG if sn.icount is None else sn.icount
        out += _EXTRA.pack(vm_state, disk, icount)
        out += unknown
        out += id_raw
        out += name_raw
    if len(out) > C.QCOW_MAX_SNAPSHOTS_SIZE:
        raise SnapshotError(
            f"Snapshot table too large: {len(out)} bytes (at most {C.QCOW_MAX_SNAPSHOTS_SIZE})",
            errno.EFBIG,
        )
    return bytes(out)


# ----------------------------------------------------------------- tree walks
def _clusters(meta: Metadata, nbytes: int) -> int:
    return (nbytes + meta.cluster_size - 1) >> meta.cluster_bits


def tree_refs(meta: Metadata, l1: array[int], what: str) -> tuple[Counter[int], set[int]]:
    """References of the clusters an L1 tree uses (its L2 tables, data clusters and the
    host clusters of compressed data), by cluster index; and its L2 table offsets.

    Raises Qcow2CorruptError on a malformed entry (nothing is changed by a walk)."""
    cb = meta.cluster_bits
    cmask = meta.cluster_size - 1
    refs: Counter[int] = Counter()
    l2s: set[int] = set()
    step = 2 if meta.extended_l2 else 1
    file_size = meta.file.size()
    for i, l1e in enumerate(l1):
        if not l1e:
            continue
        if l1e & C.L1E_RESERVED_MASK:
            raise Qcow2CorruptError(f"Reserved bits set in {what} L1 entry {i}: {l1e:#018x}")
        l2_off = l1e & C.L1E_OFFSET_MASK
        if not l2_off:
            continue
        if l2_off & cmask:
            raise Qcow2CorruptError(f"{what}: L2 table offset {l2_off:#x} unaligned (L1 {i})")
        if l2_off + meta.cluster_size > file_size:
            raise Qcow2CorruptError(
                f"{what}: L2 table at {l2_off:#x} (L1 {i}) lies past the end of the file"
            )
        refs[l2_off >> cb] += 1
        l2s.add(l2_off)
        entries = meta.l2_table(l2_off).entries
        used = [e for e in (entries[::step] if step == 2 else entries) if e]
        for e in used:
            if e & C.QCOW_OFLAG_COMPRESSED:
                d = compressed_descriptor(e, cb)
                for c in range(d.offset >> cb, ((d.offset + d.size - 1) >> cb) + 1):
                    refs[c] += 1
                continue
            if e & C.L2E_STD_RESERVED_MASK:
                raise Qcow2CorruptError(
                    f"{what}: reserved bits set in L2 entry (L2 {l2_off:#x}): {e:#018x}"
                )
            host = e & C.L2E_OFFSET_MASK
            if not host:
                continue
            if e & C.QCOW_OFLAG_ZERO and meta.version < 3 and step == 1:
                raise Qcow2CorruptError(f"{what}: zero cluster flag in a version 2 image")
            if host & cmask:
                raise Qcow2CorruptError(
                    f"{what}: cluster offset {host:#x} unaligned (L2 {l2_off:#x})"
                )
            refs[host >> cb] += 1
    return refs, l2s


def _check_no_overlap(meta: Metadata, refs: Counter[int], l2s: set[int], what: str) -> None:
    """An inactive tree's clusters must not lie on the active metadata (except shared
    L2 tables, which are active L2 tables too)."""
    cb = meta.cluster_bits
    cs = meta.cluster_size
    mm = meta.meta_map
    for c in refs:
        off = c << cb
        for kind in mm.kinds_in(off, cs):
            if kind == "l2" and off in l2s:
                continue
            raise Qcow2CorruptError(
                f"{what}: cluster {off:#x} overlaps with {kind.replace('_', ' ')}"
            )


def _check_increase(meta: Metadata, refs: Counter[int], what: str) -> None:
    assert meta.allocator is not None
    top = meta.allocator.refcount_max
    for c, n in refs.items():
        rc = meta.get_refcount(c)
        if rc == 0:
            raise Qcow2CorruptError(
                f"{what}: cluster {c << meta.cluster_bits:#x} is used but its refcount is 0"
            )
        if rc + n > top:
            raise SnapshotError(
                f"{what}: refcount of cluster {c << meta.cluster_bits:#x} would overflow "
                f"({rc} + {n} > {top}, refcount_bits={meta.header.refcount_bits})",
                errno.EINVAL,
            )


def _check_decrease(meta: Metadata, refs: Counter[int], what: str) -> None:
    for c, n in refs.items():
        rc = meta.get_refcount(c)
        if rc < n:
            raise Qcow2CorruptError(
                f"{what}: refcount of cluster {c << meta.cluster_bits:#x} would drop below 0 "
                f"(refcount {rc}, {n} references)"
            )


def _apply(meta: Metadata, refs: Counter[int], sign: int) -> None:
    assert meta.allocator is not None
    cb = meta.cluster_bits
    cs = meta.cluster_size
    update = meta.allocator.update_refcount
    for c in sorted(refs):
        update(c << cb, cs, sign * refs[c])


def _drop_freed_l2(meta: Metadata, l2s: set[int]) -> None:
    """Forget cached L2 tables whose clusters are free now (they may be reused)."""
    for off in l2s:
        if meta.get_refcount(off >> meta.cluster_bits) == 0:
            meta.l2_cache.discard(off)


def recompute_copied(meta: Metadata) -> None:
    """``qcow2_update_snapshot_refcount(addend 0)`` on the active tables: COPIED set
    exactly where the refcount is 1 (compressed entries never have it)."""
    cb = meta.cluster_bits
    copied = C.QCOW_OFLAG_COPIED
    l1 = meta.l1
    for i, l1e in enumerate(l1.entries):
        l2_off = l1e & C.L1E_OFFSET_MASK
        if not l2_off:
            continue
        want = l1e | copied if meta.get_refcount(l2_off >> cb) == 1 else l1e & ~copied
        if want != l1e:
            l1.entries[i] = want
            l1.dirty = True
        _recompute_l2(meta, l2_off)


def recompute_released(meta: Metadata, l2s: set[int]) -> None:
    """The L2 tables of a tree whose references were just dropped (the old active
    tree of an apply, a deleted snapshot's): those still used only by snapshots get
    their COPIED flags recomputed and written in place, as QEMU does while it
    decreases (freed ones are left alone, active ones are :func:`recompute_copied`'s).
    Only the layout depends on it: COPIED in an inactive table means nothing, so a
    crash around these writes loses nothing."""
    cb = meta.cluster_bits
    cs = meta.cluster_size
    for l2_off in sorted(l2s):
        if not meta.get_refcount(l2_off >> cb) or meta.meta_map.only(l2_off, cs, "l2") is None:
            continue
        cached = meta.l2_cache.peek(l2_off)
        entries = array("Q", cached.entries) if cached is not None else None
        if entries is None:
            entries = read_table(meta.file, l2_off, cs // 8, "snapshot_l2_load")
        if _copied_flags(meta, entries):
            # Not in QEMU's overlap map either (inactive L2 tables are not checked),
            # but it must not land on any active metadata.
            meta.check_data_write(l2_off, cs)
            meta.file.pwrite(encode_be64(entries), l2_off, "snapshot_l2_update")
        meta.l2_cache.discard(l2_off)


def _recompute_l2(meta: Metadata, l2_off: int) -> None:
    table = meta.l2_table(l2_off)
    if _copied_flags(meta, table.entries):
        table.dirty = True


def _copied_flags(meta: Metadata, entries: array[int]) -> bool:
    """Set COPIED exactly on the entries whose cluster has refcount 1 (compressed
    entries never have it); True when an entry changed."""
    cb = meta.cluster_bits
    step = 2 if meta.extended_l2 else 1
    copied = C.QCOW_OFLAG_COPIED
    changed = False
    for j in range(0, len(entries), step):
        e = entries[j]
        if not e or e & C.QCOW_OFLAG_COMPRESSED:
            continue
        host = e & C.L2E_OFFSET_MASK
        if not host:
            continue
        new = e | copied if meta.get_refcount(host >> cb) == 1 else e & ~copied
        if new != e:
            entries[j] = new
            changed = True
    return changed


# -------------------------------------------------------------- the operations
class _Op:
    """One operation's shared steps: the flushes, the dirty-bit window, the switch."""

    def __init__(self, img: Image) -> None:
        self.img = img
        self.meta = img.meta
        meta = self.meta
        if meta.allocator is None or meta.writeback is None:
            raise Qcow2Error(f"image {img.path!r} is opened read-only")
        self.alloc = meta.allocator
        self.wb = meta.writeback
        self.set_dirty = False
        if meta.has_data_file:
            raise SnapshotError(
                "Snapshots are not supported on images with an external data file",
                errno.ENOTSUP,
            )

    def sync(self) -> None:
        """Everything cached written back, ordered, refcount blocks included (lazy too)."""
        self.img._drive_sync(self.img._check_steps())

    def begin(self) -> None:
        """Open the window in which refcounts and COPIED flags may disagree on disk."""
        meta = self.meta
        if meta.version >= 3 and not self.wb.dirty_on_disk:
            self.wb._mark_dirty_bit()
            meta.flush_files("dirty_bit")
            self.set_dirty = True

    def end(self) -> None:
        meta = self.meta
        meta._build_meta_map()
        self.sync()
        if self.set_dirty and not self.wb.lazy:
            hdr = meta.header
            hdr.incompatible_features &= ~C.INCOMPAT_DIRTY
            meta.file.pwrite(struct.pack(">Q", hdr.incompatible_features), 72, "header_update")
            meta.flush_files("mark_clean")
            self.wb.dirty_on_disk = False
        self.img._compressed_cache = None

    def write_table(self, snaps: list[Snapshot]) -> tuple[int, int]:
        """Allocate and write the new table (not yet linked); returns offset, length."""
        table = encode_table(snaps, self.meta.header.size)
        if not table:
            return 0, 0
        off = self.alloc.alloc_clusters(_clusters(self.meta, len(table)))
        self.meta.file.pwrite(table, off, "snapshot_table_write")
        return off, len(table)

    def switch(self, snaps: list[Snapshot], offset: int, length: int) -> tuple[int, int]:
        """One 12-byte header write links the new table (everything it needs durable
        first); returns the old table's place, now free to be released."""
        meta = self.meta
        hdr = meta.header
        # The new clusters' content first: a refcount made durable for a cluster past
        # the end of the file would be a leak no check sees until the file grows.
        meta.flush_files("snapshot_table_write")
        self.sync()
        meta.file.pwrite(struct.pack(">IQ", len(snaps), offset), 60, "snapshot_table_switch")
        meta.flush_files("snapshot_table_switch")
        old = (hdr.snapshots_offset, meta.snapshot_table_end - hdr.snapshots_offset)
        hdr.nb_snapshots = len(snaps)
        hdr.snapshots_offset = offset
        meta.snapshot_table_end = offset + length
        meta.snapshots = snaps
        return old

    def free_table(self, old: tuple[int, int]) -> None:
        off, length = old
        if off and length > 0:
            self.alloc.update_refcount(off, length, -1)

    def guarded(self, body: Callable[[], None]) -> None:
        """Run the part that changes the image; a failure in it poisons the image (its
        cached metadata may be half changed: a reopen sees the file, leaks at worst)."""
        try:
            body()
        except Qcow2Error as exc:
            self.meta.poison(exc)
            self.img._poison(exc)
            raise


def _read_snapshot_l1(meta: Metadata, sn: Snapshot, index: int) -> array[int]:
    validate_snapshot_l1(sn, index, meta.cluster_size)
    nbytes = sn.l1_size * 8
    if sn.l1_size and sn.l1_table_offset + nbytes > meta.file.size():
        raise Qcow2CorruptError(
            f"Snapshot {sn.id_str!r}: L1 table at {sn.l1_table_offset:#x} (+{nbytes}) lies "
            "past the end of the file"
        )
    if sn.l1_size and not sn.l1_table_offset:
        raise Qcow2CorruptError(f"Snapshot {sn.id_str!r}: L1 table at offset 0")
    l1 = read_table(meta.file, sn.l1_table_offset, sn.l1_size, "snapshot_l1_load")
    return l1


def _l1_copy_refs(meta: Metadata, sn: Snapshot) -> Counter[int]:
    refs: Counter[int] = Counter()
    first = sn.l1_table_offset >> meta.cluster_bits
    for c in range(first, first + _clusters(meta, sn.l1_size * 8)):
        refs[c] += 1
    return refs


def _table_refs(meta: Metadata) -> Counter[int]:
    hdr = meta.header
    length = meta.snapshot_table_end - hdr.snapshots_offset
    refs: Counter[int] = Counter()
    if hdr.nb_snapshots and length > 0:
        cb = meta.cluster_bits
        for c in range(hdr.snapshots_offset >> cb, ((hdr.snapshots_offset + length - 1) >> cb) + 1):
            refs[c] += 1
    return refs


def create(img: Image, name: str) -> None:
    """``qcow2_snapshot_create`` for a disk-only snapshot (``qemu-img snapshot -c``)."""
    op = _Op(img)
    meta = op.meta
    hdr = meta.header
    op.sync()
    check_placement(meta)
    snaps = list(meta.snapshots)
    if len(snaps) >= C.QCOW_MAX_SNAPSHOTS:
        raise SnapshotError(f"Too many snapshots: {len(snaps)}", errno.EFBIG)
    name_raw = name.encode("utf-8", errors="surrogateescape")[:_NAME_MAX]
    new_id = new_snapshot_id(snaps)
    if any(sn.id_str == new_id for sn in snaps):
        raise SnapshotError(f"Snapshot id {new_id!r} exists already", errno.EEXIST)
    refs, _ = tree_refs(meta, meta.l1.entries, "active L1 table")
    _check_increase(meta, refs, "snapshot create")
    now = time.time_ns()
    sn = Snapshot(
        l1_table_offset=0,
        l1_size=hdr.l1_size,
        id_str=new_id,
        name=name_raw.decode("utf-8", errors="replace"),
        date_sec=(now // 1_000_000_000) & 0xFFFFFFFF,
        date_nsec=(now // 1000 % 1_000_000) * 1000,
        vm_clock_nsec=0,
        vm_state_size=0,
        disk_size=hdr.size,
        icount=0,
        extra_data=bytes(_EXTRA.size),
        id_raw=new_id.encode(),
        name_raw=name_raw,
    )
    new = [*snaps, sn]
    encode_table(new, hdr.size)  # refused (too large) before anything changes

    def body() -> None:
        op.begin()
        l1_bytes = hdr.l1_size * 8
        if l1_bytes:
            sn.l1_table_offset = op.alloc.alloc_clusters(_clusters(meta, l1_bytes))
            meta.add_meta_range(sn.l1_table_offset, l1_bytes, "inactive_l1")
            meta.file.pwrite(encode_be64(meta.l1.entries), sn.l1_table_offset, "snapshot_l1_write")
            meta.flush_files("snapshot_l1_write")  # before any refcount block that counts it
        _apply(meta, refs, +1)
        recompute_copied(meta)
        off, length = op.write_table(new)
        old = op.switch(new, off, length)
        op.free_table(old)
        op.end()

    op.guarded(body)


def apply(img: Image, name_or_id: str) -> None:
    """``qcow2_snapshot_goto``: the active L1 table becomes a copy of the snapshot's."""
    if img._bitmaps is not None:
        img._bitmaps.check_snapshot_apply()  # QEMU: refused while there are bitmaps
    op = _Op(img)
    meta = op.meta
    hdr = meta.header
    op.sync()
    check_placement(meta)
    snaps = meta.snapshots
    index = find_for_apply(snaps, name_or_id)
    sn = snaps[index]
    resize_to = sn.disk_size if sn.disk_size is not None and sn.disk_size != hdr.size else None
    if resize_to is not None and meta.version < 3:
        # QEMU resizes the disk to the snapshot's size first, which v2 refuses.
        raise SnapshotResizeError("Can't resize a v2 image which has snapshots", errno.ENOTSUP)
    what = f"snapshot {sn.id_str!r}"
    # Everything that could refuse is checked on the image as it is now; a resize
    # first (only ever dropping references or adding new clusters) keeps it valid.
    new_l1 = _read_snapshot_l1(meta, sn, index)
    plus, sn_l2s = tree_refs(meta, new_l1, what)
    _check_no_overlap(meta, plus, sn_l2s, what)
    _check_increase(meta, plus, "snapshot apply")
    minus, _ = tree_refs(meta, meta.l1.entries, "active L1 table")
    _check_decrease(meta, minus, "snapshot apply")

    def body() -> None:
        from .resize import grow_l1, resize_locked

        if resize_to is not None:
            # The disk takes the snapshot's size first (a complete resize of its own,
            # as QEMU truncates before it loads the table): a crash after it leaves
            # the resized image, still consistent.
            resize_locked(img, resize_to, "off")
        # The active table must hold the snapshot's whole L1 (QEMU keeps a larger one).
        grow_l1(img, sn.l1_size)
        n = len(meta.l1.entries)
        goto_l1 = array("Q", new_l1)
        goto_l1.extend(array("Q", bytes(8 * (n - len(goto_l1)))))
        minus, act_l2s = tree_refs(meta, meta.l1.entries, "active L1 table")
        op.begin()
        _apply(meta, plus, +1)
        # Every table the snapshot's L1 names is shared now (refcount >= 2): its copy
        # loses its COPIED flags as in QEMU, which rewrites it after the increase.
        uncopied = array("Q", (e & ~C.QCOW_OFLAG_COPIED for e in new_l1))
        if uncopied != new_l1:
            meta.check_meta_write(sn.l1_table_offset, len(new_l1) * 8, "inactive_l1")
            meta.file.pwrite(encode_be64(uncopied), sn.l1_table_offset, "snapshot_l1_update")
        op.sync()  # the increases are durable before the L1 table points at the clusters
        l1 = meta.l1
        meta.check_meta_write(l1.offset, n * 8, "l1")
        meta.file.pwrite(encode_be64(goto_l1), l1.offset, "l1_update")
        meta.flush_files("snapshot_goto")
        l1.entries = goto_l1
        l1.dirty = False
        meta._build_meta_map()  # the new active L2 tables may be written back from now on
        _apply(meta, minus, -1)
        _drop_freed_l2(meta, act_l2s)
        recompute_released(meta, act_l2s)
        recompute_copied(meta)
        op.end()

    op.guarded(body)


def delete(img: Image, name_or_id: str, *, by_name_only: bool = False) -> None:
    """``qcow2_snapshot_delete``: unlink the entry (header switch), then release its
    clusters and recompute the active COPIED flags."""
    op = _Op(img)
    meta = op.meta
    op.sync()
    check_placement(meta)
    snaps = meta.snapshots
    index = find_by_name(snaps, name_or_id) if by_name_only else find_for_delete(snaps, name_or_id)
    sn = snaps[index]
    what = f"snapshot {sn.id_str!r}"
    sn_l1 = _read_snapshot_l1(meta, sn, index)
    minus, sn_l2s = tree_refs(meta, sn_l1, what)
    _check_no_overlap(meta, minus, sn_l2s, what)
    l1_refs = _l1_copy_refs(meta, sn)
    minus.update(l1_refs)
    minus.update(_table_refs(meta))
    _check_decrease(meta, minus, "snapshot delete")
    new = [s for i, s in enumerate(snaps) if i != index]
    encode_table(new, meta.header.size)

    def body() -> None:
        op.begin()
        off, length = op.write_table(new)
        op.switch(new, off, length)
        # The old table's clusters are in ``minus`` already (checked with the rest).
        _apply(meta, minus, -1)
        # As QEMU (whatever its discard option): the clusters nothing references any
        # more are punched from the file; the unlink is durable, nothing is in flight.
        assert meta.allocator is not None
        meta.allocator.punch_free([(c << meta.cluster_bits, meta.cluster_size) for c in minus])
        _drop_freed_l2(meta, sn_l2s)
        recompute_released(meta, sn_l2s)
        recompute_copied(meta)
        op.end()

    op.guarded(body)
