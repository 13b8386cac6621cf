"""Persistent dirty bitmaps: the on-disk codec and the in-memory bitmaps.

A qcow2 v3 image may carry *persistent dirty bitmaps* (the spec's "Bitmaps
extension"): a header extension names a *bitmap directory*, one entry per bitmap
(table offset and size, flags, granularity, name), and each bitmap's *table* lists
the clusters holding its bits (entry 0: an all-zeroes cluster, entry 1: an
all-ones cluster, else the cluster's offset). Bit ``i`` covers guest bytes
``[i * granularity, (i + 1) * granularity)`` and bits are stored LSB first in each
byte (observed: a 512-byte write at 1536 with a 512-byte granularity sets byte 0 to
0x08). The bitmaps are trusted only while autoclear bit 0 is set.

This module is the one codec of that structure: ``check`` (refcounts of the
directory, tables and data clusters), ``info`` (the list ``qemu-img info`` shows)
and the open image (loading, maintaining, storing) all go through
:func:`read_directory` / :func:`decode_directory` / :func:`decode_table`.

In memory each bitmap is a ``bytearray`` of its bits in the on-disk order, so
storing is a copy and marking a write is a few slice assignments (see
:meth:`DirtyBitmap.mark`): that runs on every write, under the same serialization
as the write's L2 update, and must stay O(1) in the length of the write.
"""

from __future__ import annotations

import struct
import sys
import threading
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import constants as C
from .errors import Qcow2CorruptError, Qcow2Error, Qcow2FormatError, Qcow2UnsupportedError

if TYPE_CHECKING:
    from .metadata import Metadata

__all__ = [
    "FLAG_AUTO",
    "FLAG_IN_USE",
    "BitmapError",
    "BitmapSet",
    "DirEntry",
    "DirtyBitmap",
    "decode_directory",
    "decode_table",
    "encode_directory",
    "read_directory",
]

# Directory entry flags.
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
RESERVED_FLAGS = 0xFFFFFFFC
# The only bitmap type.
TYPE_DIRTY_TRACKING = 1
# Limits (QEMU's, the spec's).
MIN_GRANULARITY_BITS = 9  # 512 B
MAX_GRANULARITY_BITS = 31  # 2 GiB
MAX_NAME_SIZE = 1023
MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS  # 64 MiB - 64 KiB
MAX_TABLE_SIZE = 0x8000000  # entries
MAX_PHYS_SIZE = 0x20000000  # bytes of bitmap data (table_size * cluster_size)
# Table entries.
ENTRY_RESERVED_MASK = 0xFF000000000001FE
ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
ENTRY_ALL_ONES = 1

EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved32, directory size, directory offset
DIR_ENTRY = struct.Struct(">QIIBBHI")  # table offset, table size, flags, type, gran bits,
# name size, extra data size (24 bytes, then extra data, then the name, padded to 8)

_INCONSISTENT = "Bitmap '{}' is inconsistent and cannot be used"


class BitmapConstraintError(Qcow2FormatError):
    """A directory entry QEMU refuses to load: QEMU's message, the fields in ``detail``."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"Bitmap '{name}' doesn't satisfy the constraints")
        self.detail = detail


class BitmapError(Qcow2Error):
    """A bitmap operation QEMU refuses; the message is QEMU's reason."""


class BitmapNotFoundError(BitmapError):
    """No bitmap of that name (``Dirty bitmap 'X' not found``)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Dirty bitmap '{name}' not found")


class BitmapInconsistentError(BitmapError):
    """The bitmap was found IN_USE at open: a writer died while it was maintained.
    The message is QEMU's two lines (the second, a hint, unprefixed in its output)."""

    def __init__(self, name: str) -> None:
        super().__init__(
            _INCONSISTENT.format(name)
            + "\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
        )


class BitmapsBusyError(BitmapError):
    """An operation QEMU refuses while the image has bitmaps (snapshot apply); errno
    EBUSY as QEMU returns."""

    errno = 16


# ------------------------------------------------------------------- sizes
def nbits(disk_size: int, gran_bits: int) -> int:
    """Bits a bitmap of that granularity needs for the disk (the last may be partial)."""
    return (disk_size + (1 << gran_bits) - 1) >> gran_bits


def nbytes(disk_size: int, gran_bits: int) -> int:
    return (nbits(disk_size, gran_bits) + 7) >> 3


def table_size(disk_size: int, gran_bits: int, cluster_size: int) -> int:
    """Entries in the bitmap's table: one per cluster of bit data."""
    return (nbytes(disk_size, gran_bits) + cluster_size - 1) // cluster_size


def default_granularity(cluster_size: int) -> int:
    """``qemu-img bitmap --add`` without ``-g``: the cluster size clamped to 4-64 KiB."""
    return min(max(cluster_size, 4096), 65536)


# --------------------------------------------------------------- directory
@dataclass(slots=True)
class DirEntry:
    """One bitmap directory entry, as on disk."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    gran_bits: int
    btype: int = TYPE_DIRTY_TRACKING
    raw_name: bytes = b""

    def encoded_size(self) -> int:
        return (DIR_ENTRY.size + len(self.raw_name) + 7) & ~7


def parse_ext(data: bytes) -> tuple[int, int, int]:
    """(nb_bitmaps, directory size, directory offset) of the extension's 24 bytes."""
    if len(data) != EXT.size:
        raise Qcow2FormatError(
            f"bitmaps_ext: Invalid extension length: {len(data)} (must be {EXT.size})"
        )
    nb, _reserved, dir_size, dir_offset = EXT.unpack(data)
    return nb, dir_size, dir_offset


def encode_ext(nb: int, dir_size: int, dir_offset: int) -> bytes:
    return EXT.pack(nb, 0, dir_size, dir_offset)


def decode_directory(
    raw: bytes, nb_bitmaps: int, cluster_size: int, disk_size: int
) -> list[DirEntry]:
    """The entries of a directory, checked as QEMU checks them when it loads it.

    ``disk_size`` is the virtual size (whole sectors); a consistent bitmap's table must
    cover it. Raises Qcow2FormatError (Qcow2UnsupportedError for extra data) with
    QEMU's words, naming the bitmap.
    """
    out: list[DirEntry] = []
    pos = 0
    size = len(raw)
    while pos < size:
        if pos + DIR_ENTRY.size > size:
            raise Qcow2FormatError("Broken bitmap directory")  # QEMU's words
        if len(out) + 1 > nb_bitmaps:
            raise Qcow2FormatError("More bitmaps found than specified in header extension")
        t_off, t_size, flags, btype, gran, name_size, extra = DIR_ENTRY.unpack_from(raw, pos)
        entry_len = (DIR_ENTRY.size + extra + name_size + 7) & ~7
        if pos + entry_len > size:
            raise Qcow2FormatError("Broken bitmap directory")
        start = pos + DIR_ENTRY.size + extra
        raw_name = bytes(raw[start : start + name_size])
        # surrogateescape: a name that is not UTF-8 is stored back byte for byte.
        name = raw_name.decode("utf-8", errors="surrogateescape")
        if extra:
            raise Qcow2UnsupportedError(f"Bitmap extra data is not supported: bitmap {name!r}")
        phys = t_size * cluster_size
        if (
            t_size == 0
            or t_off == 0
            or t_off % cluster_size
            or t_size > MAX_TABLE_SIZE
            or not MIN_GRANULARITY_BITS <= gran <= MAX_GRANULARITY_BITS
            or flags & RESERVED_FLAGS
            or name_size > MAX_NAME_SIZE
            or btype != TYPE_DIRTY_TRACKING
            or phys > MAX_PHYS_SIZE
            or (not flags & FLAG_IN_USE and disk_size > (phys * 8) << gran)
        ):
            # QEMU's words exactly (the CLI prints them as qemu-img does); the fields
            # ride along on the exception.
            raise BitmapConstraintError(
                name,
                f"table_offset={t_off:#x}, table_size={t_size}, flags={flags:#x}, "
                f"type={btype}, granularity_bits={gran}, name_size={name_size}",
            )
        out.append(DirEntry(name, t_off, t_size, flags, gran, btype, raw_name))
        pos += entry_len
    if len(out) < nb_bitmaps:
        raise Qcow2FormatError("Less bitmaps found than specified in header extension")
    return out


def encode_directory(entries: list[DirEntry]) -> bytes:
    out = bytearray()
    for e in entries:
        out += DIR_ENTRY.pack(
            e.table_offset, e.table_size, e.flags, e.btype, e.gran_bits, len(e.raw_name), 0
        )
        out += e.raw_name
        out += bytes(-len(out) & 7)
    return bytes(out)


def directory_location(meta: Metadata) -> tuple[int, int, int] | None:
    """(nb_bitmaps, directory size, offset) when QEMU would use the bitmaps, else None
    (no extension, or autoclear bit 0 clear: written by a program that did not
    maintain them)."""
    hdr = meta.header
    if hdr.version < 3 or hdr.bitmaps_ext is None:
        return None
    if not hdr.autoclear_features & C.AUTOCLEAR_BITMAPS:
        return None
    nb, dir_size, dir_offset = parse_ext(hdr.bitmaps_ext)
    if nb == 0:
        return None
    if dir_size == 0:
        raise Qcow2FormatError("Requested bitmap directory size is zero")
    if dir_size > MAX_DIRECTORY_SIZE:
        raise Qcow2FormatError(
            f"Requested bitmap directory size is too big: bitmap_directory_size={dir_size}"
        )
    return nb, dir_size, dir_offset


def _pread(meta: Metadata, offset: int, length: int, what: str, event: str) -> bytes:
    """A read of bitmap metadata that must lie inside the file (a hostile offset is
    refused by name, never handed to the system call)."""
    size = meta.file.size()
    if offset < 0 or offset + length > size:
        raise Qcow2CorruptError(
            f"{what} at offset {offset:#x} (+{length}) lies past the end of the file ({size} bytes)"
        )
    return meta.file.pread(offset, length, event)


def read_directory(meta: Metadata) -> list[DirEntry]:
    """The image's bitmap directory ([] when there is none QEMU would use)."""
    loc = directory_location(meta)
    if loc is None:
        return []
    nb, dir_size, dir_offset = loc
    raw = _pread(meta, dir_offset, dir_size, "bitmap_directory_offset", "bitmap_dir_load")
    return decode_directory(raw, nb, meta.cluster_size, meta.header.size & ~511)


# ------------------------------------------------------------------ tables
def table_entry_ok(entry: int, cluster_size: int) -> bool:
    """QEMU's check of one table entry: no reserved bit, an aligned offset, and the
    all-ones flag only without an offset."""
    if entry & ENTRY_RESERVED_MASK:
        return False
    offset = entry & ENTRY_OFFSET_MASK
    return not offset or not (entry & ENTRY_ALL_ONES or offset % cluster_size)


def decode_table(raw: bytes, cluster_size: int, name: str) -> array[int]:
    """A bitmap table's entries, each checked (Qcow2CorruptError names the entry)."""
    entries = array("Q", raw)
    if sys.byteorder == "little":
        entries.byteswap()
    for i, e in enumerate(entries):
        if not table_entry_ok(e, cluster_size):
            raise Qcow2CorruptError(f"Bitmap '{name}': invalid table entry {i}: {e:#018x}")
    return entries


def encode_table(entries: list[int]) -> bytes:
    return struct.pack(f">{len(entries)}Q", *entries)


def read_table(meta: Metadata, entry: DirEntry) -> array[int]:
    raw = _pread(
        meta,
        entry.table_offset,
        entry.table_size * 8,
        f"Bitmap '{entry.name}': table_offset",
        "bitmap_table_load",
    )
    return decode_table(raw, meta.cluster_size, entry.name)


# ------------------------------------------------------------- the bitmaps
def _shown(name: str) -> str:
    """A name as listed: bytes that are not UTF-8 shown as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_LSB_MASKS = [(1 << k) - 1 for k in range(9)]
# Bits first..last (inclusive, 0-7) of a byte, indexed by first * 8 + last.
_RANGE_MASKS = bytes(
    (0xFF >> (7 - last)) & (0xFF << first) & 0xFF if last >= first else 0
    for first in range(8)
    for last in range(8)
)
_WINDOW = 1 << 16  # bytes of bits examined at a time by DirtyBitmap.extents


def _mark_bits(bitmaps: Iterable[DirtyBitmap], offset: int, last_byte: int) -> None:
    """Set the bits covering guest ``[offset, last_byte]`` in each bitmap: whatever
    the length, at most two partial bytes (one table lookup each) and one slice
    assignment per bitmap; the caller holds the mutex that guards the bits."""
    for b in bitmaps:
        first = offset >> b.gran_bits
        last = last_byte >> b.gran_bits
        if last > b._last_bit:
            last = b._last_bit
            if last < first:
                continue
        bits = b.bits
        b0 = first >> 3
        b1 = last >> 3
        if b0 == b1:
            bits[b0] |= _RANGE_MASKS[((first & 7) << 3) | (last & 7)]
            continue
        bits[b0] |= _RANGE_MASKS[((first & 7) << 3) | 7]
        bits[b1] |= _RANGE_MASKS[last & 7]
        if b1 > b0 + 1:
            bits[b0 + 1 : b1] = b"\xff" * (b1 - b0 - 1)


class DirtyBitmap:
    """One bitmap in memory: its bits (LSB first, as on disk), name, granularity,
    whether writes mark it (``enabled``, the AUTO flag) and whether it was found
    IN_USE at open (``inconsistent``: its bits are unknown, it is never used)."""

    __slots__ = (
        "_last_bit",
        "_mutex",
        "bits",
        "disk_size",
        "enabled",
        "entry",
        "gran_bits",
        "inconsistent",
        "name",
    )

    def __init__(
        self,
        name: str,
        gran_bits: int,
        disk_size: int,
        *,
        enabled: bool = True,
        inconsistent: bool = False,
        bits: bytearray | None = None,
        entry: DirEntry | None = None,
    ) -> None:
        self.name = name
        self.gran_bits = gran_bits
        self.disk_size = disk_size
        self.enabled = enabled
        self.inconsistent = inconsistent
        self.entry = entry  # where it lies on disk (None: not stored yet)
        self.bits = bytearray(nbytes(disk_size, gran_bits)) if bits is None else bits
        self._last_bit = (disk_size - 1) >> gran_bits  # -1 for an empty disk
        # Marks come from any thread (sync writes) and may touch the same byte.
        self._mutex = threading.Lock()

    @property
    def granularity(self) -> int:
        return 1 << self.gran_bits

    def qemu_flags(self) -> list[str]:
        """The flags ``qemu-img info`` lists: "in-use" first, then "auto"."""
        out = []
        if self.inconsistent:
            out.append("in-use")
        if self.enabled:
            out.append("auto")
        return out

    def info(self) -> dict[str, Any]:
        from .info import qdict

        return qdict(
            [
                ("name", _shown(self.name)),
                ("granularity", self.granularity),
                ("flags", self.qemu_flags()),
            ]
        )

    # ---------------------------------------------------------------- bits
    def mark(self, offset: int, length: int) -> None:
        """Set the bits covering guest ``[offset, offset + length)`` (see
        :func:`_mark_bits`)."""
        if length > 0:
            with self._mutex:
                _mark_bits((self,), offset, offset + length - 1)

    def clear(self) -> None:
        self.bits = bytearray(len(self.bits))

    def set_all(self) -> None:
        self.mark(0, self.disk_size)

    def resize(self, disk_size: int) -> None:
        """A new disk size: bits past the old end start clean, bits past the new end go."""
        self.disk_size = disk_size
        self._last_bit = (disk_size - 1) >> self.gran_bits
        n = nbytes(disk_size, self.gran_bits)
        # A new buffer, not an in-place resize: a reader (extents) may hold a view.
        new = bytearray(n)
        keep = min(n, len(self.bits))
        new[:keep] = self.bits[:keep]
        self.bits = new
        self._mask_tail()

    def _mask_tail(self) -> None:
        total = nbits(self.disk_size, self.gran_bits)
        if total & 7 and self.bits:
            self.bits[-1] &= _LSB_MASKS[total & 7]

    def extents(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """Dirty guest ranges ``(start, length)`` in ``[offset, offset + length)``,
        merged and clipped to the request and the disk."""
        end = self.disk_size if length is None else min(offset + length, self.disk_size)
        if offset >= end:
            return []
        g = self.gran_bits
        first = offset >> g
        last = ((end - 1) >> g) + 1  # bit range [first, last)
        b0, b1 = first >> 3, ((last - 1) >> 3) + 1
        every = np.frombuffer(self.bits, dtype=np.uint8)
        # Windows of bytes: clean ones are skipped and full ones taken whole without
        # unpacking, so a large request over a mostly clean (or mostly dirty) bitmap
        # costs a scan of its bytes, and memory stays bounded whatever its length.
        runs: list[list[int]] = []  # absolute bit runs [start, end), merged
        for wb in range(b0, b1, _WINDOW):
            we = min(b1, wb + _WINDOW)
            raw = every[wb:we]
            if not raw.any():
                continue
            base = wb << 3
            if raw.min() == 0xFF:
                pairs: Iterable[tuple[int, int]] = ((base, we << 3),)
            else:
                padded = np.zeros(raw.size * 8 + 2, dtype=np.int8)
                padded[1:-1] = np.unpackbits(raw, bitorder="little")
                edges = (np.flatnonzero(np.diff(padded)) + base).tolist()
                pairs = zip(edges[0::2], edges[1::2], strict=True)
            for s, e in pairs:
                if runs and runs[-1][1] == s:
                    runs[-1][1] = e
                else:
                    runs.append([s, e])
        out: list[tuple[int, int]] = []
        for s, e in runs:
            lo = max(offset, max(s, first) << g)
            hi = min(end, min(e, last) << g)
            if hi > lo:
                out.append((lo, hi - lo))
        return out

    def merge_from(self, other: DirtyBitmap) -> None:
        """Every range dirty in ``other`` becomes dirty here (granularities may differ)."""
        if other.gran_bits == self.gran_bits and len(other.bits) == len(self.bits):
            a = np.frombuffer(self.bits, dtype=np.uint8)
            b = np.frombuffer(bytes(other.bits), dtype=np.uint8)
            self.bits = bytearray(np.bitwise_or(a, b).tobytes())
            return
        for start, n in other.extents():
            self.mark(start, n)


# -------------------------------------------------------- loading / storing
def load_bits(meta: Metadata, entry: DirEntry, disk_size: int) -> bytearray:
    """A consistent bitmap's bits, read through its table."""
    cs = meta.cluster_size
    n = nbytes(disk_size, entry.gran_bits)
    need = (n + cs - 1) // cs
    table = read_table(meta, entry)
    if len(table) < need:
        raise Qcow2CorruptError(
            f"Bitmap '{entry.name}': table_size={entry.table_size} is too small for "
            f"the disk ({need} clusters of bits needed)"
        )
    out = bytearray(need * cs)
    for i in range(need):
        e = table[i]
        off = e & ENTRY_OFFSET_MASK
        if off:
            what = f"Bitmap '{entry.name}': table entry {i} (data cluster)"
            data = _pread(meta, off, cs, what, "bitmap_data_load")
            out[i * cs : (i + 1) * cs] = data
        elif e & ENTRY_ALL_ONES:
            out[i * cs : (i + 1) * cs] = b"\xff" * cs
    del out[n:]
    return out


def used_clusters(meta: Metadata, entry: DirEntry) -> list[tuple[int, int]]:
    """The (offset, length) ranges a stored bitmap occupies: table and data clusters."""
    cs = meta.cluster_size
    out = [(entry.table_offset, entry.table_size * 8)]
    for e in read_table(meta, entry):
        off = e & ENTRY_OFFSET_MASK
        if off:
            out.append((off, cs))
    return out


class BitmapSet:
    """The bitmaps of one open image, in directory order (new ones appended).

    ``active`` is what every write marks: the enabled, consistent bitmaps, kept as a
    tuple so the per-write hook is one loop over a usually tiny tuple.
    """

    def __init__(self, meta: Metadata, disk_size: int) -> None:
        self.meta = meta
        self.disk_size = disk_size
        self.on_disk: list[DirEntry] = read_directory(meta)
        loc = directory_location(meta) if self.on_disk else None
        self.dir_range: tuple[int, int] | None = (loc[2], loc[1]) if loc else None
        self.list: list[DirtyBitmap] = []
        self.loaded = False
        self.active: tuple[DirtyBitmap, ...] = ()
        # Writes mark from any thread (synchronous writes); one mutex for all bitmaps.
        self._mutex = threading.Lock()
        # True from the moment we told the disk the bitmaps are in use (or changed
        # them): close must store them.
        self.dirty = False

    def load(self) -> None:
        """Read every consistent bitmap's bits (once)."""
        if self.loaded:
            return
        out = []
        for e in self.on_disk:
            inconsistent = bool(e.flags & FLAG_IN_USE)
            bits = None if inconsistent else load_bits(self.meta, e, self.disk_size)
            bm = DirtyBitmap(
                e.name,
                e.gran_bits,
                self.disk_size,
                enabled=bool(e.flags & FLAG_AUTO),
                inconsistent=inconsistent,
                bits=bits if bits is not None else bytearray(),
                entry=e,
            )
            if bits is not None:
                bm._mask_tail()
            out.append(bm)
        self.list = out
        self.loaded = True
        self.refresh()

    def refresh(self) -> None:
        self.active = tuple(b for b in self.list if b.enabled and not b.inconsistent)

    def info(self) -> list[dict[str, Any]]:
        if self.loaded:
            return [b.info() for b in self.list]
        from .info import qdict

        out = []
        for e in self.on_disk:
            flags = []
            if e.flags & FLAG_IN_USE:
                flags.append("in-use")
            if e.flags & FLAG_AUTO:
                flags.append("auto")
            out.append(
                qdict(
                    [("name", _shown(e.name)), ("granularity", 1 << e.gran_bits), ("flags", flags)]
                )
            )
        return out

    def find(self, name: str) -> DirtyBitmap | None:
        self.load()
        for b in self.list:
            if b.name == name:
                return b
        return None

    def get(self, name: str, *, usable: bool = True) -> DirtyBitmap:
        b = self.find(name)
        if b is None:
            raise BitmapNotFoundError(name)
        if usable and b.inconsistent:
            raise BitmapInconsistentError(name)
        return b

    def mark(self, offset: int, length: int) -> None:
        """Set the bits of every active bitmap over guest ``[offset, offset + length)``,
        under one mutex: this runs on every write."""
        if length > 0:
            with self._mutex:
                _mark_bits(self.active, offset, offset + length - 1)

    def check_resize(self) -> None:
        """QEMU refuses to resize an image with an inconsistent bitmap."""
        self.load()
        for b in self.list:
            if b.inconsistent:
                raise BitmapInconsistentError(b.name)

    def resize(self, disk_size: int) -> None:
        """The disk changed size: every consistent bitmap follows (new bits clean)."""
        self.load()
        self.disk_size = disk_size
        for b in self.list:
            if not b.inconsistent:
                b.resize(disk_size)
        if self.list:
            self.dirty = True

    def check_snapshot_apply(self) -> None:
        """``bdrv_snapshot_goto`` refuses while the image has any bitmap (even a
        disabled or inconsistent one)."""
        self.load()
        if self.list:
            raise BitmapsBusyError("Device has active dirty bitmaps")

    # ------------------------------------------------------------ on disk
    def mark_in_use(self) -> None:
        """At a read-write open, before any write: every bitmap IN_USE on disk, as
        QEMU does (disabled ones too). The directory changes in place (only flags),
        bracketed by the autoclear bit: cleared and flushed first, so a torn
        directory write is never trusted; set again and flushed after."""
        self.load()
        if not self.on_disk:
            return
        meta = self.meta
        assert self.dir_range is not None
        # QEMU's overlap checks cover the directory (not tables or data clusters).
        meta.bitmap_directory = self.dir_range
        meta.add_meta_range(*self.dir_range, "bitmap_directory")
        if all(e.flags & FLAG_IN_USE for e in self.on_disk):
            # Only inconsistent bitmaps: nothing to maintain, nothing to store (QEMU
            # leaves such a directory alone until a bitmap operation changes it).
            return
        self.dirty = True
        hdr = meta.header
        dir_off, dir_size = self.dir_range
        marked = [
            DirEntry(
                e.name,
                e.table_offset,
                e.table_size,
                e.flags | FLAG_IN_USE,
                e.gran_bits,
                e.btype,
                e.raw_name,
            )
            for e in self.on_disk
        ]
        data = encode_directory(marked)
        assert len(data) == dir_size
        _write_autoclear(meta, hdr.autoclear_features & ~C.AUTOCLEAR_BITMAPS, "bitmap_in_use")
        meta.check_meta_write(dir_off, dir_size, "bitmap_directory")
        meta.file.pwrite(data, dir_off, "bitmap_dir_update")
        meta.flush_files("bitmap_dir_update")
        _write_autoclear(meta, hdr.autoclear_features | C.AUTOCLEAR_BITMAPS, "bitmap_in_use")

    def store_steps(self, *, final: bool = True) -> Iterator[str]:
        """Write every bitmap to new clusters and switch to them by one header write.

        1. each consistent bitmap's data clusters (all-zero clusters get entry 0) and
           table, then the directory (IN_USE only on inconsistent ones, whose tables are
           kept as they are), all in clusters from the one allocator;
        2. refcount blocks written, flushed (yield);
        3. cluster 0 rewritten in one write (extension + autoclear bit), flushed;
        4. the old tables, data clusters and directory freed (nothing references them
           on disk any more; no request ever reads them).
        A crash before 3 leaks the new clusters and leaves the bitmaps IN_USE; after
        it, the old ones leak.
        """
        if not self.dirty:
            return
        self.load()
        meta = self.meta
        alloc = meta.allocator
        assert alloc is not None and meta.writeback is not None
        cs = meta.cluster_size
        old: list[tuple[int, int]] = []
        if meta.version < 3:
            return  # downgraded meanwhile (amend compat=0.10): v2 keeps no bitmaps
        for e in self.on_disk:
            if not e.flags & FLAG_IN_USE:
                old += used_clusters(meta, e)
            elif self._kept(e) is None:
                # A removed inconsistent bitmap: its table may be garbage (a crash
                # while it was in use); what cannot be read leaks.
                try:
                    old += used_clusters(meta, e)
                except Qcow2Error:
                    old.append((e.table_offset, e.table_size * 8))
        if self.dir_range is not None:
            old.append(self.dir_range)
        entries: list[DirEntry] = []
        for b in self.list:
            if b.inconsistent:
                assert b.entry is not None
                if self._kept(b.entry) is b:
                    entries.append(b.entry)
                continue
            b._mask_tail()
            tsize = table_size(b.disk_size, b.gran_bits, cs)
            table = []
            for i in range(tsize):
                chunk = bytes(b.bits[i * cs : (i + 1) * cs])
                if chunk.count(0) == len(chunk):
                    table.append(0)
                    continue
                off = alloc.alloc_clusters(1)
                meta.file.pwrite(chunk + bytes(cs - len(chunk)), off, "bitmap_data_store")
                table.append(off)
            tbytes = encode_table(table)
            toff = alloc.alloc_clusters((len(tbytes) + cs - 1) // cs)
            meta.file.pwrite(tbytes + bytes(-len(tbytes) % cs), toff, "bitmap_table_store")
            raw = b.name.encode("utf-8", errors="surrogateescape")
            e = DirEntry(
                b.name,
                toff,
                tsize,
                FLAG_AUTO if b.enabled else 0,
                b.gran_bits,
                TYPE_DIRTY_TRACKING,
                raw,
            )
            b.entry = e
            entries.append(e)
        hdr = meta.header
        if entries:
            data = encode_directory(entries)
            dsize = len(data)
            doff = alloc.alloc_clusters((dsize + cs - 1) // cs)
            meta.file.pwrite(data + bytes(-dsize % cs), doff, "bitmap_dir_store")
            yield from meta.writeback.refblock_steps()
            yield "bitmap_store"
            new_ext: bytes | None = encode_ext(len(entries), dsize, doff)
            autoclear = hdr.autoclear_features | C.AUTOCLEAR_BITMAPS
        else:
            yield from meta.writeback.refblock_steps()
            yield "bitmap_store"
            doff = dsize = 0
            new_ext = None
            autoclear = hdr.autoclear_features & ~C.AUTOCLEAR_BITMAPS
        from .amend import _rewrite_cluster0

        _rewrite_cluster0(meta, bitmaps_ext=new_ext, autoclear_features=autoclear)
        if self.dir_range is not None:
            meta.remove_meta_range(*self.dir_range)
        self.dir_range = (doff, dsize) if entries else None
        meta.bitmap_directory = self.dir_range
        if self.dir_range is not None:
            meta.add_meta_range(doff, dsize, "bitmap_directory")
        for off, n in old:
            alloc.update_refcount(off, n, -1)
        self.on_disk = entries
        self.dirty = not final
        if not final:
            # Still open for writing: the new directory is what the disk trusts now,
            # so writes must find the bitmaps IN_USE again before they land.
            self.mark_in_use()

    def _kept(self, e: DirEntry) -> DirtyBitmap | None:
        """The in-memory bitmap still using on-disk entry ``e`` unchanged (an
        inconsistent bitmap not removed), or None."""
        for b in self.list:
            if b.entry is e and b.inconsistent:
                return b
        return None


def _write_autoclear(meta: Metadata, value: int, event: str) -> None:
    meta.file.pwrite(struct.pack(">Q", value), 88, event)
    meta.flush_files(event)
    meta.header.autoclear_features = value


# -------------------------------------------------------------- operations
# Run by Image._exclusive (drained, metadata lock held, no await): they change the
# bitmaps in memory only; the close stores them (as qemu-img, which stores at close).
def _persist_error(img: Any, name: str, why: str) -> BitmapError:
    return BitmapError(f"Can't make bitmap '{name}' persistent in '{img.path}': {why}")


def op_add(img: Any, bset: BitmapSet, name: str, granularity: int, disabled: bool) -> None:
    """``block-dirty-bitmap-add`` with ``persistent=true``: QEMU's checks, its order."""
    if not name:
        raise BitmapError("Bitmap name cannot be empty")
    if granularity < 512 or granularity & (granularity - 1):
        raise BitmapError("Granularity must be power of 2 and at least 512")
    meta = bset.meta
    bset.load()
    if meta.version < 3:
        raise _persist_error(img, name, "Cannot store dirty bitmaps in qcow2 v2 files")
    if len(bset.list) >= MAX_BITMAPS:
        raise _persist_error(img, name, "Maximum number of persistent bitmaps is already reached")
    raw = name.encode("utf-8", errors="surrogateescape")
    if len(raw) > MAX_NAME_SIZE:
        raise _persist_error(img, name, f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)")
    gran_bits = granularity.bit_length() - 1
    if gran_bits > MAX_GRANULARITY_BITS:
        raise _persist_error(
            img, name, f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)"
        )
    tsize = table_size(bset.disk_size, gran_bits, meta.cluster_size)
    if tsize > MAX_TABLE_SIZE or tsize * meta.cluster_size > MAX_PHYS_SIZE:
        raise _persist_error(
            img, name, "Too much space will be occupied by the bitmap. Use larger granularity"
        )
    dir_size = sum(
        (DIR_ENTRY.size + len(b.name.encode("utf-8", "surrogateescape")) + 7) & ~7
        for b in bset.list
    )
    if dir_size + ((DIR_ENTRY.size + len(raw) + 7) & ~7) > MAX_DIRECTORY_SIZE:
        raise _persist_error(img, name, "Not enough space in the bitmap directory")
    if bset.find(name) is not None:
        raise BitmapError(f"Bitmap already exists: {name}")
    bset.list.append(DirtyBitmap(name, gran_bits, bset.disk_size, enabled=not disabled))
    bset.dirty = True
    bset.refresh()


def op_remove(img: Any, bset: BitmapSet, name: str) -> None:
    b = bset.get(name, usable=False)
    bset.list.remove(b)
    bset.dirty = True
    bset.refresh()


def op_clear(img: Any, bset: BitmapSet, name: str) -> None:
    bset.get(name).clear()
    bset.dirty = True


def op_enable(img: Any, bset: BitmapSet, name: str, on: bool) -> None:
    bset.get(name).enabled = on
    bset.dirty = True
    bset.refresh()


def op_merge(img: Any, bset: BitmapSet, src: str, dst: str, source: Any) -> None:
    target = bset.get(dst)
    other = bset if source is None or source is img else source._bitmap_set()
    origin = other.get(src)
    if origin.disk_size != target.disk_size:
        raise BitmapError(
            f"Bitmaps are of different sizes (destination size is {target.disk_size}, "
            f"source size is {origin.disk_size}) and can't be merged"
        )
    target.merge_from(origin)
    bset.dirty = True
