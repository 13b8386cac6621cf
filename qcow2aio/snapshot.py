"""The internal snapshot table (read side): entries, bounds-checked like QEMU 7.2.

Each entry is a 40-byte header, ``extra_data_size`` bytes of extra data, the ID
string and the name; each entry starts on an 8-byte boundary. Sizes come from
the image, so each one is capped (QEMU's limits) before it is used to read or
allocate: ``extra_data_size`` <= 1024, and the table as a whole <= 64 MiB.

As in ``qcow2_read_snapshots``, an entry's own L1 table is *not* checked when
the image is opened: a bad snapshot L1 offset or size does not stop the active
layer from being read. :func:`validate_snapshot_l1` does QEMU's check; call it
before a snapshot's L1 table is used (loading, reverting, deleting, or marking
its clusters as metadata).
"""

from __future__ import annotations

import bisect
import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import constants as C
from .errors import Qcow2CorruptError, Qcow2FormatError
from .io import FileBackend

if TYPE_CHECKING:
    from .metadata import Metadata

_SNAP = struct.Struct(">QIHHIIQII")  # 40 bytes
_INT_MAX = 0x7FFFFFFF
_WINDOW = 1 << 16


@dataclass(slots=True)
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    icount: int | None
    extra_data: bytes
    # The ID and name as stored (up to the first NUL), for rewriting them unchanged.
    id_raw: bytes = b""
    name_raw: bytes = b""


def validate_snapshot_l1(snap: Snapshot, index: int, cluster_size: int) -> None:
    """QEMU's check of a snapshot's L1 table (``qcow2_validate_table``) before it is used."""
    if snap.l1_size > C.QCOW_MAX_L1_SIZE // 8:
        raise Qcow2FormatError(
            f"Snapshot L1 table too large: snapshot {index} (id {snap.id_str!r}) "
            f"l1_size={snap.l1_size}"
        )
    off = snap.l1_table_offset
    if off % cluster_size or C.INT64_MAX - snap.l1_size * 8 < off:
        raise Qcow2FormatError(
            f"Snapshot L1 table offset invalid: snapshot {index} (id {snap.id_str!r}) "
            f"l1_table_offset={off:#x}"
        )


def _name(raw: bytes) -> str:
    # QEMU keeps C strings: the ID and name end at the first NUL byte.
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace") if raw else ""


def _c_bytes(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


class SnapshotTableError(Qcow2FormatError):
    """The snapshot table cannot be read (QEMU refuses to open the image).

    ``str()`` names the field and value; :attr:`qemu_message` is what QEMU 7.2
    prints (``qemu-img check`` repeats it), :attr:`hint` its hint line (or ""),
    and :attr:`errno` the error code QEMU returns (``Check failed: ...``).
    """

    def __init__(self, message: str, qemu_message: str, err: int, hint: str = "") -> None:
        super().__init__(message)
        self.qemu_message = qemu_message
        self.errno = err
        self.hint = hint


@dataclass(slots=True)
class TableRead:
    """What reading the table found; the counts are non-zero only when repairing."""

    snapshots: list[Snapshot]
    end: int  # file offset just past the last entry kept (unpadded)
    extra_data_dropped: int = 0  # entries whose extra data was cut to 1024 bytes
    nb_reduced: int = 0  # entries dropped because the table was too big
    messages: list[str] = field(default_factory=list)


def _read_table(
    pread: Callable[[int, int], bytes], offset: int, count: int, repair: bool = False
) -> TableRead:
    """QEMU's ``qcow2_do_read_snapshots``, reading through a window.

    Up to 65536 entries: one unpack and a few slices each, so even a table of
    empty entries past the end of the file is read in well under a second.

    With ``repair`` (``qemu-img check -r all``), as QEMU does: extra data beyond
    1024 bytes is cut (the ID and name are still read where the full extra data
    says they are), and the entries from the one that makes the table too big
    on are dropped; each such repair is counted and reported in
    :attr:`TableRead.messages`. Memory stays bounded: at most 1024 bytes of
    extra data and two 64 KiB strings an entry, 64 MiB in all.
    """
    result = TableRead([], offset)
    snaps = result.snapshots
    append = snaps.append
    unpack_from = _SNAP.unpack_from
    hsize = _SNAP.size
    max_extra = C.QCOW_MAX_SNAPSHOT_EXTRA_DATA
    window = b""
    base = offset  # file offset of window[0]
    pos = offset
    table_length = 0
    for i in range(count):
        table_length = (table_length + 7) & ~7
        pos = (pos + 7) & ~7
        rel = pos - base
        if rel + hsize > len(window):
            window, base, rel = _fill(pread, pos, hsize), pos, 0
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmstate, extra_len) = unpack_from(
            window, rel
        )
        if extra_len > max_extra:
            if not repair:
                raise SnapshotTableError(
                    f"Too much extra metadata in snapshot table entry {i}: "
                    f"extra_data_size={extra_len} (at most {max_extra})",
                    f"Too much extra metadata in snapshot table entry {i}",
                    errno.EFBIG,
                    "You can force-remove this extra metadata with qemu-img check -r all",
                )
            result.messages.append(
                f"Discarding too much extra metadata in snapshot table entry {i} "
                f"({extra_len} > {max_extra})"
            )
            result.extra_data_dropped += 1
            # The first 1024 bytes are kept; the ID and name follow the whole extra data.
            extra = _fill(pread, pos + hsize, max_extra)[:max_extra]
            names = _fill(pread, pos + hsize + extra_len, id_len + name_len)
            window, base = b"", pos  # the next entry reads afresh
            id_raw = _c_bytes(names[:id_len])
            name_raw = _c_bytes(names[id_len : id_len + name_len])
            kept_extra = max_extra
        else:
            entry_len = hsize + extra_len + id_len + name_len
            if rel + entry_len > len(window):
                window, base, rel = _fill(pread, pos, entry_len), pos, 0
            p = rel + hsize
            extra = window[p : p + extra_len]
            p += extra_len
            id_raw = _c_bytes(window[p : p + id_len])
            p += id_len
            name_raw = _c_bytes(window[p : p + name_len])
            kept_extra = extra_len
        table_length += hsize + kept_extra + id_len + name_len
        entry_end = pos + hsize + extra_len + id_len + name_len
        if table_length > C.QCOW_MAX_SNAPSHOTS_SIZE or entry_end - offset > _INT_MAX:
            if not repair:
                raise SnapshotTableError(
                    f"Snapshot table is too big: {table_length} bytes after entry {i} "
                    f"(nb_snapshots={count}, at most {C.QCOW_MAX_SNAPSHOTS_SIZE} bytes)",
                    "Snapshot table is too big",
                    errno.EFBIG,
                    f"You can force-remove all {count - i} overhanging snapshots with "
                    "qemu-img check -r all",
                )
            result.messages.append(
                f"Discarding {count - i} overhanging snapshots (snapshot table is too big)"
            )
            result.nb_reduced += count - i
            return result
        pos = entry_end
        result.end = pos
        vm_state = vmstate
        disk_size: int | None = None
        icount: int | None = None
        if extra_len >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
            if extra_len >= 16:
                disk_size = struct.unpack_from(">Q", extra, 8)[0]
            if extra_len >= 24:
                raw_icount = struct.unpack_from(">Q", extra, 16)[0]
                icount = None if raw_icount == 0xFFFFFFFFFFFFFFFF else raw_icount
        append(
            Snapshot(
                l1_off,
                l1_size,
                _name(id_raw),
                _name(name_raw),
                dsec,
                dnsec,
                vmclock,
                vm_state,
                disk_size,
                icount,
                extra,
                id_raw,
                name_raw,
            )
        )
    return result


# The block layer refuses requests ending past BDRV_MAX_LENGTH (INT64_MAX rounded
# down to 1 GiB) with EIO: QEMU then fails with "Failed to read snapshot table".
_MAX_LENGTH = C.INT64_MAX & ~((1 << 30) - 1)


def _fill(pread: Callable[[int, int], bytes], pos: int, need: int) -> bytes:
    """The window at ``pos``: at least ``need`` bytes (up to 64 KiB when the file allows)."""
    if pos + need > _MAX_LENGTH:
        raise SnapshotTableError(
            f"Failed to read snapshot table: {need} bytes at {pos:#x} lie past the largest "
            f"file offset ({_MAX_LENGTH:#x})",
            "Failed to read snapshot table: Input/output error",
            errno.EIO,
        )
    return pread(pos, max(need, min(_WINDOW, _MAX_LENGTH - pos)))


def read_snapshot_table(file: FileBackend, offset: int, count: int) -> tuple[list[Snapshot], int]:
    """Read ``count`` entries at ``offset``; returns them and the offset just past the last.

    The header's ``snapshots_offset``/``nb_snapshots`` must already be validated
    (aligned, count <= 65536). Memory is bounded by the 64 MiB table limit, and a
    table past the end of the file reads as zeros (empty entries), as in QEMU.
    Raises :class:`SnapshotTableError` where QEMU refuses to open the image.
    """
    if count == 0:
        return [], offset
    read = _read_table(lambda pos, n: file.pread(pos, n, "snapshot_load"), offset, count)
    return read.snapshots, read.end


def read_snapshot_table_for_check(
    file: FileBackend, offset: int, count: int, *, repair: bool
) -> TableRead:
    """The table as ``qemu-img check`` reads it (with ``-r all``: ``repair``)."""
    if count == 0:
        return TableRead([], offset)
    return _read_table(lambda pos, n: file.pread(pos, n, "snapshot_load"), offset, count, repair)


def check_placement(meta: Metadata) -> None:
    """Refuse a snapshot table or snapshot L1 table that shares a cluster with other
    metadata (the header, the active L1 table, the refcount table or blocks, an active
    L2 table) or with each other.

    QEMU does not look: it frees the old snapshot table after writing a new one, and
    a snapshot's L1 table when deleting it, so a table lying on other metadata takes
    that metadata's refcount down with it (the cluster can then be reused: data
    loss). Snapshot operations call this before their first write, so a hostile
    table gets a :class:`Qcow2CorruptError` naming the field and value and the
    file is left as it was. Costs one sort of the image's metadata clusters.
    """
    hdr = meta.header
    cb = meta.cluster_bits
    others: list[tuple[int, int, str]] = []  # (first cluster, last cluster, what)
    ours: list[tuple[int, int, str]] = []

    def add(into: list[tuple[int, int, str]], offset: int, length: int, what: str) -> None:
        if length > 0:
            into.append((offset >> cb, (offset + length - 1) >> cb, what))

    add(others, 0, meta.cluster_size, "the image header")
    add(
        others,
        hdr.l1_table_offset,
        hdr.l1_size * 8,
        f"the active L1 table (l1_table_offset={hdr.l1_table_offset:#x})",
    )
    add(
        others,
        hdr.refcount_table_offset,
        hdr.refcount_table_clusters << cb,
        f"the refcount table (refcount_table_offset={hdr.refcount_table_offset:#x})",
    )
    for i, entry in enumerate(meta.reftable.entries):
        off = entry & C.REFT_OFFSET_MASK
        if off:
            add(others, off, 1, f"refcount block {i} (at {off:#x})")
    for i, entry in enumerate(meta.l1.entries):
        off = entry & C.L1E_OFFSET_MASK
        if off:
            add(others, off, 1, f"the active L2 table of L1 entry {i} (at {off:#x})")
    if hdr.nb_snapshots:
        add(
            ours,
            hdr.snapshots_offset,
            meta.snapshot_table_end - hdr.snapshots_offset,
            f"the snapshot table (snapshots_offset={hdr.snapshots_offset:#x}, "
            f"nb_snapshots={hdr.nb_snapshots})",
        )
    for i, sn in enumerate(meta.snapshots):
        add(
            ours,
            sn.l1_table_offset,
            sn.l1_size * 8,
            f"the L1 table of snapshot {i} (id {sn.id_str!r}, "
            f"l1_table_offset={sn.l1_table_offset:#x}, l1_size={sn.l1_size})",
        )
    if not ours:
        return
    # Snapshot tables against each other: one sweep in cluster order.
    ours.sort()
    reach, owner = -1, ""
    for first, last, what in ours:
        if first <= reach:
            raise Qcow2CorruptError(
                f"Snapshot metadata overlaps: {what} shares a cluster with {owner}"
            )
        if last > reach:
            reach, owner = last, what
    # Against the rest: for each, the one reaching furthest among those starting
    # at or before its last cluster.
    others.sort()
    firsts = [o[0] for o in others]
    best: list[int] = []  # index of the furthest-reaching item so far
    for k, item in enumerate(others):
        best.append(k if not best or item[1] > others[best[-1]][1] else best[-1])
    for first, last, what in ours:
        i = bisect.bisect_right(firsts, last) - 1
        if i >= 0 and others[best[i]][1] >= first:
            raise Qcow2CorruptError(
                f"Snapshot metadata overlaps: {what} shares a cluster with {others[best[i]][2]}"
            )
