"""The internal snapshot table (read side): entries, bounds-checked.

Each entry is a 40-byte header, ``extra_data_size`` bytes of extra data, the ID
string and the name, padded to 8 bytes. Sizes come from the image, so every one
is capped (QEMU's limits) before it is used to slice or allocate.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import constants as C
from .errors import Qcow2FormatError

_SNAP = struct.Struct(">QIHHIIQII")  # 40 bytes


@dataclass
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


def parse_snapshots(table: bytes, count: int, cluster_size: int) -> list[Snapshot]:
    """Decode ``count`` entries from the raw snapshot table bytes."""
    snaps: list[Snapshot] = []
    pos = 0
    for i in range(count):
        if pos + _SNAP.size > len(table):
            raise Qcow2FormatError(f"Snapshot table truncated at snapshot {i}: offset {pos}")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmstate, extra_len) = (
            _SNAP.unpack_from(table, pos)
        )
        pos += _SNAP.size
        if extra_len > C.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise Qcow2FormatError(
                f"Too much extra metadata in snapshot table entry {i}: extra_data_size={extra_len}"
            )
        end = pos + extra_len + id_len + name_len
        if end > len(table):
            raise Qcow2FormatError(f"Snapshot table entry {i} exceeds the snapshot table")
        extra = table[pos : pos + extra_len]
        pos += extra_len
        id_str = table[pos : pos + id_len].decode("utf-8", errors="replace")
        pos += id_len
        name = table[pos : pos + name_len].decode("utf-8", errors="replace")
        pos += name_len
        pos = (pos + 7) & ~7
        vm_state = vmstate
        disk_size: int | None = None
        icount: int | None = None
        if len(extra) >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        if len(extra) >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if len(extra) >= 24:
            raw_icount = struct.unpack_from(">Q", extra, 16)[0]
            icount = None if raw_icount == 0xFFFFFFFFFFFFFFFF else raw_icount
        if l1_size > C.QCOW_MAX_L1_SIZE // 8:
            raise Qcow2FormatError(f"Snapshot {i} L1 table too large: l1_size={l1_size}")
        if l1_off % cluster_size or C.INT64_MAX - l1_size * 8 < l1_off:
            raise Qcow2FormatError(f"Snapshot {i} L1 table offset invalid: {l1_off:#x}")
        snaps.append(
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
                bytes(extra),
            )
        )
    return snaps


def snapshot_table_length(table: bytes, count: int) -> int:
    """Byte length of ``count`` entries (to bound the read of the table)."""
    pos = 0
    for _ in range(count):
        if pos + _SNAP.size > len(table):
            return pos
        id_len, name_len = struct.unpack_from(">HH", table, pos + 12)
        extra_len = struct.unpack_from(">I", table, pos + 36)[0]
        pos = (pos + _SNAP.size + extra_len + id_len + name_len + 7) & ~7
    return pos
