"""L1/L2 tables and their entries, decoded once into native integer arrays.

Tables are kept decoded (``array('Q')`` in host byte order) rather than as raw
bytes: a lookup is then one index operation, and a cached table costs the same
memory as on disk. ``to_bytes`` re-encodes big-endian only when written back.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import constants as C
from .errors import Qcow2CorruptError

if TYPE_CHECKING:
    from .io import FileBackend

_SWAP = sys.byteorder == "little"

# Cluster (and subcluster) kinds a guest range can map to.
UNALLOCATED = 0
ZERO_PLAIN = 1
ZERO_ALLOC = 2
NORMAL = 3
COMPRESSED = 4


def decode_be64(data: bytes | bytearray | memoryview) -> array[int]:
    """Big-endian u64 table bytes -> native ``array('Q')``."""
    arr = array("Q")
    arr.frombytes(data)
    if _SWAP:
        arr.byteswap()
    return arr


def read_table(file: FileBackend, offset: int, count: int, event: str = "l1_load") -> array[int]:
    """Read ``count`` big-endian u64 entries straight into one native array (no extra copy)."""
    arr = array("Q", bytes(8)) * count if count else array("Q")
    if count:
        file.readinto(memoryview(arr).cast("B"), offset, event)
        if _SWAP:
            arr.byteswap()
    return arr


def encode_be64(arr: array[int]) -> bytes:
    """Native ``array('Q')`` -> big-endian bytes."""
    if not _SWAP:
        return arr.tobytes()
    out = array("Q", arr)
    out.byteswap()
    return out.tobytes()


@dataclass(slots=True)
class Table:
    """A cached metadata table (L1 or one L2 table): decoded entries plus bookkeeping."""

    offset: int  # host offset of the table
    entries: array[int]
    dirty: bool = False
    fresh: bool = False  # allocated and never written yet (its first write is "l2_alloc")

    def to_bytes(self) -> bytes:
        return encode_be64(self.entries)


@dataclass(frozen=True, slots=True)
class CompressedDescriptor:
    """Where a compressed cluster's bytes are: ``offset`` and an upper bound ``size``."""

    offset: int
    size: int


def compressed_descriptor(entry: int, cluster_bits: int) -> CompressedDescriptor:
    """Decode the host-offset/sector-count pair of a compressed L2 entry.

    The count field holds the number of 512-byte sectors *beyond the first*
    touched by the data, so the size read may run past the compressed data
    (and past EOF, which reads as zeros).
    """
    x = 62 - (cluster_bits - 8)
    offset = entry & ((1 << x) - 1)
    nsectors = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return CompressedDescriptor(offset, nsectors * 512 - (offset & 511))


def l2_entry_kind(entry: int, version: int, has_data_file: bool, where: str) -> int:
    """Classify a standard (non-extended) L2 entry; ``where`` names it in errors."""
    if entry & C.QCOW_OFLAG_COMPRESSED:
        if has_data_file:
            raise Qcow2CorruptError(f"Compressed cluster in an image with a data file: {where}")
        return COMPRESSED
    if entry & C.L2E_STD_RESERVED_MASK:
        raise Qcow2CorruptError(f"Reserved bits set in L2 entry {where}: {entry:#018x}")
    host = entry & C.L2E_OFFSET_MASK
    if entry & C.QCOW_OFLAG_ZERO:
        if version < 3:
            raise Qcow2CorruptError(f"Zero cluster flag in a version 2 image: {where}")
        return ZERO_ALLOC if host else ZERO_PLAIN
    if host or (has_data_file and entry & C.QCOW_OFLAG_COPIED):
        return NORMAL
    return UNALLOCATED
