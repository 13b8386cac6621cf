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

import struct
from collections.abc import Callable
from dataclasses import dataclass

from . import constants as C
from .errors import Qcow2FormatError
from .io import FileBackend

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


def _read_table(
    pread: Callable[[int, int], bytes], offset: int, count: int
) -> tuple[list[Snapshot], int]:
    """QEMU's ``qcow2_do_read_snapshots`` (no repair), reading through a window.

    Up to 65536 entries: one unpack and a few slices each, so even a table of
    empty entries past the end of the file is read in well under a second.
    """
    snaps: list[Snapshot] = []
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
            window, base, rel = _fill(pread, pos, hsize, i), pos, 0
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmstate, extra_len) = unpack_from(
            window, rel
        )
        if extra_len > max_extra:
            raise Qcow2FormatError(
                f"Too much extra metadata in snapshot table entry {i}: "
                f"extra_data_size={extra_len} (at most {max_extra})"
            )
        entry_len = hsize + extra_len + id_len + name_len
        if rel + entry_len > len(window):
            window, base, rel = _fill(pread, pos, entry_len, i), pos, 0
        p = rel + hsize
        extra = window[p : p + extra_len]
        p += extra_len
        id_raw = _c_bytes(window[p : p + id_len])
        id_str = _name(id_raw)
        p += id_len
        name_raw = _c_bytes(window[p : p + name_len])
        name = _name(name_raw)
        pos += entry_len
        table_length += entry_len
        if table_length > C.QCOW_MAX_SNAPSHOTS_SIZE or pos - offset > _INT_MAX:
            raise Qcow2FormatError(
                f"Snapshot table is too big: {table_length} bytes after entry {i} "
                f"(nb_snapshots={count}, at most {C.QCOW_MAX_SNAPSHOTS_SIZE} bytes)"
            )
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
                id_str,
                name,
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
    return snaps, pos


def _fill(pread: Callable[[int, int], bytes], pos: int, need: int, index: int) -> bytes:
    """The window at ``pos``: at least ``need`` bytes (up to 64 KiB when the file allows)."""
    if pos + need > C.INT64_MAX:
        raise Qcow2FormatError(
            f"Snapshot table entry {index} runs past the largest file offset (at {pos:#x})"
        )
    return pread(pos, max(need, min(_WINDOW, C.INT64_MAX - pos)))


def read_snapshot_table(file: FileBackend, offset: int, count: int) -> tuple[list[Snapshot], int]:
    """Read ``count`` entries at ``offset``; returns them and the offset just past the last.

    The header's ``snapshots_offset``/``nb_snapshots`` must already be validated
    (aligned, count <= 65536). Memory is bounded by the 64 MiB table limit, and a
    table past the end of the file reads as zeros (empty entries), as in QEMU.
    """
    if count == 0:
        return [], offset
    return _read_table(lambda pos, n: file.pread(pos, n, "snapshot_load"), offset, count)
