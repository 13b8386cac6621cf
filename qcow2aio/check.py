"""``qemu-img check`` for qcow2, as QEMU 7.2 does it (``block/qcow2-refcount.c``).

The check builds an *in-memory refcount table* (QEMU's IMRT): one counter per
cluster of the image file, counting every reference it finds from the header,
the active and the snapshot L1/L2 tables, data and compressed clusters, the
refcount table and blocks, the snapshot table, the bitmap directory and tables,
and the LUKS header area. It then compares those counts with the refcounts on
disk: a refcount lower than the references is a corruption, a higher one a
leak. Finally the ``QCOW_OFLAG_COPIED`` flags of the active L1/L2 tables are
checked against the refcounts (set exactly when the refcount is 1).

Before the refcounts, the snapshot table is read as QEMU's check reads it
(``qcow2_check_read_snapshot_table``): the open for a check leaves it unread, so
a table that stops a normal open is reported here with QEMU's message, and with
``repair="all"`` repaired (count cut to 65536, extra data cut to 1024 bytes,
entries past 64 MiB dropped, v3 entries without 16 bytes of extra data
completed). After the refcount pass such a table is rewritten
(``qcow2_check_fix_snapshot_table``): new clusters from the allocator, one
header write to switch, the old table freed last.

Repair follows QEMU step by step: ``repair="leaks"`` lowers leaked refcounts in
place; ``repair="all"`` also raises refcounts that are too low, fixes
``OFLAG_COPIED`` flags and misaligned preallocated zero clusters, and, when a
refcount block is missing, misplaced or shared, rebuilds the whole refcount
structure from the IMRT (new refcount blocks and table in free space, then one
header write to switch to them). As ``qemu-img check -r`` does, a repair that
fixed something is followed by a second, read-only pass ("Double checking the
fixed image now..."), whose counts are the result, with the fixed counts of the
first pass.

The IMRT is an ``array`` with one entry per cluster of the image file (the file
size bounds it; it grows only by the clusters a repair allocates), in the
narrowest C type that holds the image's refcount width, so memory stays at
1 to 8 bytes per cluster of the file.

The messages QEMU prints on stderr while checking are collected, with QEMU's
wording, in :attr:`CheckResult.messages`; :meth:`CheckResult.human_text`,
:meth:`CheckResult.to_json`/:meth:`CheckResult.json_text` and
:meth:`CheckResult.exit_code` give what ``qemu-img check`` prints on stdout and
the exit status it returns.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import sys
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field, fields, replace
from functools import reduce
from itertools import compress, repeat
from operator import add, and_, eq, ne, or_, rshift, sub
from typing import Any

from . import bitmaps
from . import constants as C
from .errors import Qcow2Error, Qcow2ReadOnlyError
from .metadata import Metadata
from .refcount import RefcountBlock, encode_entries, entry_typecode
from .snapshot import Snapshot, SnapshotTableError, read_snapshot_table_for_check
from .tables import Table, decode_be64

__all__ = ["CheckResult", "check_image"]

# BdrvCheckMode
FIX_LEAKS = 1
FIX_ERRORS = 2

# check_refcounts_l1/l2 flag: count allocated/fragmented/compressed clusters.
_CHECK_FRAG_INFO = 0x2

_SWAP = sys.byteorder == "little"
_U64 = (1 << 64) - 1
_INT_MAX = 0x7FFFFFFF

# Overlap check bits (QCow2MetadataOverlap) and the names QEMU prints for them.
_OL_MAIN_HEADER = 1 << 0
_OL_ACTIVE_L1 = 1 << 1
_OL_ACTIVE_L2 = 1 << 2
_OL_REFCOUNT_TABLE = 1 << 3
_OL_REFCOUNT_BLOCK = 1 << 4
_OL_SNAPSHOT_TABLE = 1 << 5
_OL_INACTIVE_L1 = 1 << 6
_OL_INACTIVE_L2 = 1 << 7
_OL_BITMAP_DIRECTORY = 1 << 8
# QEMU's default overlap-check template is "cached": everything but inactive L2 tables.
_OL_CACHED = (
    _OL_MAIN_HEADER
    | _OL_ACTIVE_L1
    | _OL_REFCOUNT_TABLE
    | _OL_SNAPSHOT_TABLE
    | _OL_BITMAP_DIRECTORY
    | _OL_ACTIVE_L2
    | _OL_REFCOUNT_BLOCK
    | _OL_INACTIVE_L1
)
_OL_NAMES = {
    _OL_MAIN_HEADER: "qcow2_header",
    _OL_ACTIVE_L1: "active L1 table",
    _OL_ACTIVE_L2: "active L2 table",
    _OL_REFCOUNT_TABLE: "refcount table",
    _OL_REFCOUNT_BLOCK: "refcount block",
    _OL_SNAPSHOT_TABLE: "snapshot table",
    _OL_INACTIVE_L1: "inactive L1 table",
    _OL_INACTIVE_L2: "inactive L2 table",
    _OL_BITMAP_DIRECTORY: "bitmap directory",
}

# Subcluster allocation bitmap (extended L2 entries).
_L2_BITMAP_ALL_ALLOC = 0xFFFFFFFF
_L2_BITMAP_ALL_ZEROES = 0xFFFFFFFF << 32

# Bitmaps extension: the codec is qcow2aio.bitmaps.
_BITMAPS_EXT = bitmaps.EXT

# Refcount blocks read during one check: a small write-through cache (like QEMU's
# refcount block cache), so memory does not grow with the image.
_REFBLOCK_CACHE_BLOCKS = 16

# The keys of QEMU's ImageCheck, in the order qemu-img 7.2 prints them: its QDict
# iterates 512 hash buckets (tdb_hash), and these keys all fall in distinct buckets.
_JSON_KEYS = (
    "image-end-offset",
    "compressed-clusters",
    "total-clusters",
    "corruptions",
    "corruptions-fixed",
    "check-errors",
    "leaks",
    "leaks-fixed",
    "allocated-clusters",
    "filename",
    "format",
    "fragmented-clusters",
)


def _hx(value: int) -> str:
    """C's ``%#x``/``%#PRIx64``: no ``0x`` prefix for zero."""
    return f"{value:#x}" if value else "0"


def _last_nonzero(arr: array[int]) -> int:
    """Index of the last nonzero entry of ``arr``, or -1."""
    raw = arr.tobytes().rstrip(b"\0")
    if not raw:
        return -1
    return (len(raw) - 1) // arr.itemsize


def _first_nonzero(arr: array[int]) -> int:
    """Index of the first nonzero entry of ``arr``, or -1."""
    raw = arr.tobytes()
    stripped = raw.lstrip(b"\0")
    if not stripped:
        return -1
    return (len(raw) - len(stripped)) // arr.itemsize


def _find_zero_run(raw: bytes, itemsize: int, start: int, count: int) -> int:
    """Index of the first run of ``count`` zero items at or after item ``start``, or -1."""
    pattern = bytes(itemsize * count)
    pos = start * itemsize
    while True:
        found = raw.find(pattern, pos)
        if found < 0:
            return -1
        misaligned = found % itemsize
        if not misaligned:
            return found // itemsize
        pos = found + itemsize - misaligned


def _ranges_overlap(first1: int, len1: int, first2: int, len2: int) -> bool:
    last1 = first1 + len1 - 1
    last2 = first2 + len2 - 1
    return not (last2 < first1 or last1 < first2)


class _CheckFailed(Exception):
    """The check could not complete (QEMU's negative return): ``Check failed: <strerror>``."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


@dataclass
class _Res:
    """QEMU's BdrvCheckResult (copied and restored as a struct, like in C)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0

    def copy(self) -> _Res:
        return replace(self)

    def assign(self, other: _Res) -> None:
        """``*res = other`` in C (the counts only, also into a :class:`CheckResult`)."""
        for f in fields(_Res):
            setattr(self, f.name, getattr(other, f.name))


@dataclass
class CheckResult(_Res):
    """The outcome of :func:`check_image`, in the terms of ``qemu-img check``.

    The counts are those ``qemu-img check`` reports: after a repair that fixed
    anything, they come from the second ("double checking") pass, and
    ``corruptions_fixed``/``leaks_fixed`` from the repairing pass. ``messages``
    holds the lines QEMU writes to stderr, in order. ``error`` is set when the
    check could not complete (``qemu-img: Check failed: <error>``, exit code 1,
    nothing printed on stdout).
    """

    messages: list[str] = field(default_factory=list)
    error: str | None = None
    # True when a repair fixed something and the image was checked a second time.
    double_checked: bool = False

    # ------------------------------------------------------------ reports
    def to_json(self, filename: str) -> dict[str, Any]:
        """QEMU's ImageCheck object, keys in the order ``qemu-img --output=json`` prints.

        Optional members are left out when zero, as qemu-img does. (When
        :attr:`error` is set qemu-img prints nothing; this still returns the
        counts gathered so far.)
        """
        values: dict[str, Any] = {
            "filename": filename,
            "format": "qcow2",
            "check-errors": self.check_errors,
            "image-end-offset": self.image_end_offset,
            "corruptions": self.corruptions,
            "leaks": self.leaks,
            "corruptions-fixed": self.corruptions_fixed,
            "leaks-fixed": self.leaks_fixed,
            "total-clusters": self.total_clusters,
            "allocated-clusters": self.allocated_clusters,
            "fragmented-clusters": self.fragmented_clusters,
            "compressed-clusters": self.compressed_clusters,
        }
        required = ("filename", "format", "check-errors")
        return {k: values[k] for k in _JSON_KEYS if k in required or values[k]}

    def json_text(self, filename: str) -> str:
        """Exactly what ``qemu-img check --output=json`` writes to stdout."""
        if self.error is not None:
            return ""
        return json.dumps(self.to_json(filename), indent=4) + "\n"

    def human_text(self, filename: str = "") -> str:
        """Exactly what ``qemu-img check`` (human output) writes to stdout.

        ``filename`` is accepted for symmetry with :meth:`to_json`; the human
        output does not name the image.
        """
        out: list[str] = []
        if self.double_checked:
            out.append(
                "The following inconsistencies were found and repaired:\n\n"
                f"    {self.leaks_fixed} leaked clusters\n"
                f"    {self.corruptions_fixed} corruptions\n\n"
                "Double checking the fixed image now...\n"
            )
        if self.error is not None:
            return "".join(out)
        if not (self.corruptions or self.leaks or self.check_errors):
            out.append("No errors were found on the image.\n")
        else:
            if self.corruptions:
                out.append(
                    f"\n{self.corruptions} errors were found on the image.\n"
                    "Data may be corrupted, or further writes to the image may corrupt it.\n"
                )
            if self.leaks:
                out.append(
                    f"\n{self.leaks} leaked clusters were found on the image.\n"
                    "This means waste of disk space, but no harm to data.\n"
                )
            if self.check_errors:
                out.append(
                    f"\n{self.check_errors} internal errors have occurred during the check.\n"
                )
        if self.total_clusters and self.allocated_clusters:
            out.append(
                f"{self.allocated_clusters}/{self.total_clusters} = "
                f"{self.allocated_clusters * 100.0 / self.total_clusters:0.2f}% allocated, "
                f"{self.fragmented_clusters * 100.0 / self.allocated_clusters:0.2f}% fragmented, "
                f"{self.compressed_clusters * 100.0 / self.allocated_clusters:0.2f}% "
                "compressed clusters\n"
            )
        if self.image_end_offset:
            out.append(f"Image end offset: {self.image_end_offset}\n")
        return "".join(out)

    def exit_code(self) -> int:
        """``qemu-img check``'s exit status: 0 clean, 1 check failed, 2 corrupt, 3 leaks only."""
        if self.error is not None or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0


class _Context:
    """State that lives as long as QEMU's open image does (across both check passes)."""

    def __init__(self, meta: Metadata, fix: int) -> None:
        self.meta = meta
        self.fix_any = fix != 0
        self.messages: list[str] = []
        self.signaled_corruption = False
        # qcow2_signal_corruption(fatal) on a writable image sets bs->drv = NULL.
        self.drv_dead = False
        self.l2_written = False
        self.refblocks_written = False

    def msg(self, line: str) -> None:
        self.messages.append(line)

    def write(self, data: bytes, offset: int, event: str) -> None:
        self.meta.file.pwrite(data, offset, event=event)

    def set_incompat(self, value: int) -> None:
        """Write the incompatible-features field (v3 headers only)."""
        hdr = self.meta.header
        hdr.incompatible_features = value
        self.write(struct.pack(">Q", value), 72, "header_update")
        self.meta.file.flush(event="header_update")

    def signal_corruption(self, fatal: bool, message: str) -> None:
        """qcow2_signal_corruption(): report once; a fatal one marks the image corrupt."""
        hdr = self.meta.header
        fatal = fatal and self.fix_any
        if self.signaled_corruption and (
            not fatal or hdr.incompatible_features & C.INCOMPAT_CORRUPT
        ):
            return
        if fatal:
            self.msg(
                f"qcow2: Marking image as corrupt: {message}; further corruption events "
                "will be suppressed"
            )
            if hdr.version >= 3:
                self.set_incompat(hdr.incompatible_features | C.INCOMPAT_CORRUPT)
            self.drv_dead = True
        else:
            self.msg(
                f"qcow2: Image is corrupt: {message}; further non-fatal corruption events "
                "will be suppressed"
            )
        self.signaled_corruption = True


class _Checker:
    """One run of ``qcow2_check_refcounts`` (and its helpers) over one image."""

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        meta = ctx.meta
        self.meta = meta
        self.file = meta.file
        hdr = meta.header
        self.hdr = hdr
        self.cluster_bits = hdr.cluster_bits
        self.cluster_size = hdr.cluster_size
        self.order = hdr.refcount_order
        self.refcount_max = (1 << (1 << self.order)) - 1
        self.rb_bits = self.cluster_bits + 3 - self.order  # refcount_block_bits
        self.rb_size = 1 << self.rb_bits  # refcount_block_size
        self.typecode = entry_typecode(self.order)
        self.extended_l2 = hdr.extended_l2
        self.entry_words = 2 if self.extended_l2 else 1
        self.l2_size = self.cluster_size // (8 * self.entry_words)
        self.has_data_file = hdr.has_data_file
        x = 62 - (self.cluster_bits - 8)
        self.csize_shift = x
        self.csize_mask = (1 << (self.cluster_bits - 8)) - 1
        self.cluster_offset_mask = (1 << x) - 1
        self.reftable: array[int] = array("Q", meta.reftable.entries)
        self.reftable_offset = hdr.refcount_table_offset
        self.file_len = self.file.size()
        self.imrt: array[int] = array(self.typecode)
        self.nb_clusters = 0
        self.rb_cache: OrderedDict[int, RefcountBlock] = OrderedDict()
        self._ones_cache: array[int] = array(self.typecode)
        self.snapshots_size = self._snapshot_table_size()
        self.bitmaps = self._bitmaps_ext()

    # ------------------------------------------------------------ helpers
    def msg(self, line: str) -> None:
        self.ctx.msg(line)

    def _pread(self, offset: int, length: int, event: str) -> bytes:
        if offset < 0 or offset + length > (1 << 63) - 1:
            # Past any file offset (a hostile bitmap table offset): EIO, as QEMU's read.
            raise _CheckFailed(errno.EIO)
        try:
            return self.file.pread(offset, length, event=event)
        except Qcow2Error as exc:
            raise _CheckFailed(getattr(exc, "errno", None) or errno.EIO) from exc

    def _write(self, data: bytes, offset: int, event: str) -> None:
        try:
            self.ctx.write(data, offset, event)
        except Qcow2Error as exc:
            raise _CheckFailed(getattr(exc, "errno", None) or errno.EIO) from exc
        self.file_len = max(self.file_len, offset + len(data))

    def _flush(self, event: str) -> None:
        try:
            self.file.flush(event=event)
        except Qcow2Error as exc:
            raise _CheckFailed(getattr(exc, "errno", None) or errno.EIO) from exc

    def _size_to_clusters(self, size: int) -> int:
        return (size + self.cluster_size - 1) >> self.cluster_bits

    def _snapshot_table_size(self) -> int:
        """``s->snapshots_size``: from the table start to the end of the last entry
        (unpadded), as :func:`_check_read_snapshot_table` read it."""
        if not self.hdr.nb_snapshots:
            return 0
        return self.meta.snapshot_table_end - self.hdr.snapshots_offset

    def _bitmaps_ext(self) -> tuple[int, int, int] | None:
        """(nb_bitmaps, directory offset, directory size) when QEMU uses the bitmaps."""
        hdr = self.hdr
        if hdr.bitmaps_ext is None or not hdr.autoclear_features & C.AUTOCLEAR_BITMAPS:
            return None
        if len(hdr.bitmaps_ext) != _BITMAPS_EXT.size:
            return None
        nb, _reserved, dir_size, dir_offset = _BITMAPS_EXT.unpack(hdr.bitmaps_ext)
        if nb == 0:
            return None
        return nb, dir_offset, dir_size

    # ------------------------------------------------------ in-memory refcounts
    def _realloc(self, new_size: int) -> None:
        """realloc_refcount_array(): grow the IMRT to ``new_size`` entries (zeroed)."""
        old = self.nb_clusters
        if new_size > old:
            self.imrt.frombytes(bytes((new_size - old) * self.imrt.itemsize))
        self.nb_clusters = new_size

    def inc_refcounts(self, res: _Res, offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt(): one more reference to each cluster of a range."""
        if size <= 0:
            return
        cs = self.cluster_size
        if offset + size - self.file_len >= cs:
            self.msg(
                "ERROR: counting reference for region exceeding the end of the file by one "
                f"cluster or more: offset {offset:#x} size {size:#x}"
            )
            res.corruptions += 1
            return
        bits = self.cluster_bits
        first = offset >> bits
        last = (offset + size - 1) >> bits
        if last >= self.nb_clusters:
            self._realloc(last + 1)
        imrt = self.imrt
        rmax = self.refcount_max
        for k in range(first, last + 1):
            rc = imrt[k]
            if rc == rmax:
                self.msg(f"ERROR: overflow cluster offset={(k << bits):#x}")
                self.msg(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img "
                    "convert to create a clean copy if the image cannot be opened for writing"
                )
                res.corruptions += 1
                continue
            imrt[k] = rc + 1

    # --------------------------------------------------------- overlap check
    def _overlap(self, ign: int, offset: int, size: int) -> int:
        """qcow2_check_metadata_overlap() with QEMU's default ("cached") checks."""
        chk = _OL_CACHED & ~ign
        if not size:
            return 0
        cs = self.cluster_size
        hdr = self.hdr
        if chk & _OL_MAIN_HEADER and offset < cs:
            return _OL_MAIN_HEADER
        size = -(-((offset & (cs - 1)) + size) // cs) * cs
        offset &= ~(cs - 1)

        def hit(ofs: int, sz: int) -> bool:
            return _ranges_overlap(offset, size, ofs, sz)

        if chk & _OL_ACTIVE_L1 and hdr.l1_size and hit(hdr.l1_table_offset, hdr.l1_size * 8):
            return _OL_ACTIVE_L1
        reftable_bytes = len(self.reftable) * 8
        if (
            chk & _OL_REFCOUNT_TABLE
            and reftable_bytes
            and hit(self.reftable_offset, reftable_bytes)
        ):
            return _OL_REFCOUNT_TABLE
        if (
            chk & _OL_SNAPSHOT_TABLE
            and self.snapshots_size
            and hit(hdr.snapshots_offset, self.snapshots_size)
        ):
            return _OL_SNAPSHOT_TABLE
        if chk & _OL_INACTIVE_L1:
            for sn in self.meta.snapshots:
                if sn.l1_size and hit(sn.l1_table_offset, sn.l1_size * 8):
                    return _OL_INACTIVE_L1
        if chk & _OL_ACTIVE_L2:
            for entry in self.meta.l1.entries:
                off = entry & C.L1E_OFFSET_MASK
                if off and hit(off, cs):
                    return _OL_ACTIVE_L2
        if chk & _OL_REFCOUNT_BLOCK:
            for entry in self.reftable:
                off = entry & C.REFT_OFFSET_MASK
                if off and hit(off, cs):
                    return _OL_REFCOUNT_BLOCK
        bitmaps = self.bitmaps
        if chk & _OL_BITMAP_DIRECTORY and bitmaps is not None and hit(bitmaps[1], bitmaps[2]):
            return _OL_BITMAP_DIRECTORY
        return 0

    def _pre_write_overlap_check(self, ign: int, offset: int, size: int) -> bool:
        """qcow2_pre_write_overlap_check(): False (and the image marked corrupt) on overlap."""
        ol = self._overlap(ign, offset, size)
        if not ol:
            return True
        self.ctx.signal_corruption(
            True, f"Preventing invalid write on metadata (overlaps with {_OL_NAMES[ol]})"
        )
        return False

    # ------------------------------------------------------------ L1 / L2
    def _fix_l2_entry_by_zero(
        self, res: _Res, l2_offset: int, table: array[int], index: int, active: bool
    ) -> bool:
        """Turn a misaligned preallocated zero cluster into a plain zero cluster.

        Returns whether a metadata overlap prevented the write (the caller then stops).
        """
        w = self.entry_words
        if self.extended_l2:
            bitmap = table[index * 2 + 1]
            bitmap |= (bitmap << 32) & _U64
            bitmap &= _L2_BITMAP_ALL_ZEROES
            table[index * 2 + 1] = bitmap
            table[index * 2] = 0
        else:
            table[index] = C.QCOW_OFLAG_ZERO
        entry_size = 8 * w
        l2e_offset = l2_offset + index * entry_size
        ign = _OL_ACTIVE_L2 if active else _OL_INACTIVE_L2
        if not self._pre_write_overlap_check(ign, l2e_offset, entry_size):
            self.msg("ERROR: Overlap check failed")
            res.check_errors += 1
            return True
        raw: array[int] = array("Q", table[index * w : index * w + w])
        if _SWAP:
            raw.byteswap()
        try:
            self._write(raw.tobytes(), l2e_offset, "l2_update")
            self._flush("l2_update")
        except _CheckFailed as exc:
            self.msg(f"ERROR: Failed to overwrite L2 table entry: {exc}")
            res.check_errors += 1
            return False
        self.ctx.l2_written = True
        res.corruptions -= 1
        res.corruptions_fixed += 1
        return False

    def _l2_fast(self, res: _Res, table: array[int], flags: int) -> bool:
        """check_refcounts_l2() for a table with nothing to report, in bulk.

        Returns False, having changed nothing, when some entry needs the
        entry-by-entry path (compressed, reserved bits, misaligned, subcluster
        bitmap errors, offset 0 in a data file, past the end of file, overflow).
        """
        cs = self.cluster_size
        mask = C.L2E_OFFSET_MASK
        if self.extended_l2:
            entries: array[int] = table[0::2]
            bitmaps: array[int] = table[1::2]
        else:
            entries = table
            bitmaps = array("Q")
        acc = reduce(or_, entries, 0)
        bad = C.QCOW_OFLAG_COMPRESSED | C.L2E_STD_RESERVED_MASK | (mask & (cs - 1))
        if acc & bad:
            return False
        if self.extended_l2 and any(bitmaps):
            if any(map(and_, map(rshift, bitmaps, repeat(32)), bitmaps)):
                return False
            if any(
                b & _L2_BITMAP_ALL_ALLOC
                for e, b in zip(entries, bitmaps, strict=True)
                if not e & mask
            ):
                return False
        offs = list(filter(None, map(and_, entries, repeat(mask))))
        if (
            self.has_data_file
            and acc & C.QCOW_OFLAG_COPIED
            and any(
                e & C.QCOW_OFLAG_COPIED
                and not e & mask
                and (self.extended_l2 or not e & C.QCOW_OFLAG_ZERO)
                for e in entries
            )
        ):
            return False
        if not offs:
            return True
        # Where a run of host-contiguous clusters breaks (QEMU's fragmentation count).
        breaks = list(compress(range(1, len(offs)), map(ne, offs[1:], map(add, offs, repeat(cs)))))
        if not self.has_data_file and not self._count_runs(offs, breaks):
            return False
        if flags & _CHECK_FRAG_INFO:
            res.allocated_clusters += len(offs)
            res.fragmented_clusters += len(breaks)
        return True

    def _count_runs(self, offs: list[int], breaks: list[int]) -> bool:
        """One reference to each cluster at ``offs`` (aligned), run by run.

        Returns False, with the IMRT unchanged, when a cluster is past the end of
        the file or its count would overflow (the caller then goes entry by entry).
        """
        if max(offs) >= self.file_len:
            return False
        # Every offset is below the file size, so inside the IMRT already.
        bits = self.cluster_bits
        imrt = self.imrt
        rmax = self.refcount_max
        itemsize = imrt.itemsize
        undo: list[tuple[int, int]] = []  # (first cluster, count) of runs set from 0 to 1
        undo_each: list[int] = []
        bounds = [0, *breaks, len(offs)]
        for r in range(len(bounds) - 1):
            first, end = bounds[r], bounds[r + 1]
            k0 = offs[first] >> bits
            n = end - first
            if imrt[k0 : k0 + n].tobytes().count(0) == n * itemsize:
                # The common case: clusters nothing referenced yet.
                imrt[k0 : k0 + n] = self._ones(n)
                undo.append((k0, n))
                continue
            for k in range(k0, k0 + n):
                v = imrt[k]
                if v == rmax:
                    for u0, un in undo:
                        imrt[u0 : u0 + un] = array(imrt.typecode, bytes(un * itemsize))
                    for uk in undo_each:
                        imrt[uk] -= 1
                    return False
                imrt[k] = v + 1
                undo_each.append(k)
        return True

    def _ones(self, n: int) -> array[int]:
        ones = self._ones_cache
        if len(ones) < n:
            ones = self._ones_cache = array(self.typecode, [1]) * max(n, self.l2_size)
        return ones[:n]

    def check_refcounts_l2(
        self, res: _Res, l2_offset: int, flags: int, fix: int, active: bool
    ) -> None:
        cs = self.cluster_size
        w = self.entry_words
        table = decode_be64(self._pread(l2_offset, self.l2_size * 8 * w, "l2_load"))
        if self._l2_fast(res, table, flags):
            return
        next_contiguous_offset = 0
        frag = bool(flags & _CHECK_FRAG_INFO)
        has_data_file = self.has_data_file
        extended = self.extended_l2
        for i in range(self.l2_size):
            entry = table[i * w]
            bitmap = table[i * w + 1] if extended else 0
            if not entry and not bitmap:
                continue
            # qcow2_get_cluster_type()
            if entry & C.QCOW_OFLAG_COMPRESSED:
                ctype = "compressed"
            elif entry & C.QCOW_OFLAG_ZERO and not extended:
                ctype = "zero_alloc" if entry & C.L2E_OFFSET_MASK else "zero_plain"
            elif not entry & C.L2E_OFFSET_MASK:
                # Offset 0 is ambiguous with a data file: COPIED (refcount 1) says allocated.
                allocated = has_data_file and entry & C.QCOW_OFLAG_COPIED
                ctype = "normal" if allocated else "unallocated"
            else:
                ctype = "normal"

            if ctype != "compressed" and entry & C.L2E_STD_RESERVED_MASK:
                self.msg(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1

            if ctype == "compressed":
                if entry & C.QCOW_OFLAG_COPIED:
                    self.msg(
                        f"ERROR: coffset=0x{entry & self.cluster_offset_mask:x}: copied flag "
                        "must never be set for compressed clusters"
                    )
                    entry &= ~C.QCOW_OFLAG_COPIED
                    res.corruptions += 1
                if has_data_file:
                    self.msg(f"ERROR compressed cluster {i} with data file, entry=0x{entry:x}")
                    res.corruptions += 1
                    continue
                if bitmap:
                    self.msg(
                        f"ERROR compressed cluster {i} with non-zero subcluster allocation "
                        f"bitmap, entry=0x{entry:x}"
                    )
                    res.corruptions += 1
                    continue
                coffset = entry & self.cluster_offset_mask
                nb_csectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
                csize = nb_csectors * 512 - (coffset & 511)
                self.inc_refcounts(res, coffset, csize)
                if frag:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
            elif ctype in ("normal", "zero_alloc"):
                offset = entry & C.L2E_OFFSET_MASK
                if (bitmap >> 32) & bitmap:
                    res.corruptions += 1
                    self.msg(
                        f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster "
                        "allocation bitmap"
                    )
                if offset & (cs - 1):
                    res.corruptions += 1
                    if extended:
                        contains_data = bool(bitmap & _L2_BITMAP_ALL_ALLOC)
                    else:
                        contains_data = not entry & C.QCOW_OFLAG_ZERO
                    if not contains_data:
                        self.msg(
                            f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} offset={offset:x}: "
                            "Preallocated cluster is not properly aligned; L2 entry corrupted."
                        )
                        if fix & FIX_ERRORS:
                            before = res.corruptions_fixed
                            overlap = self._fix_l2_entry_by_zero(res, l2_offset, table, i, active)
                            if overlap:
                                raise _CheckFailed(errno.EIO)
                            if res.corruptions_fixed != before:
                                continue  # the cluster is unused now
                    else:
                        self.msg(
                            f"ERROR offset={offset:x}: Data cluster is not properly aligned; "
                            "L2 entry corrupted."
                        )
                if frag:
                    res.allocated_clusters += 1
                    if next_contiguous_offset and offset != next_contiguous_offset:
                        res.fragmented_clusters += 1
                    next_contiguous_offset = offset + cs
                if not has_data_file:
                    # qcow2_inc_refcounts_imrt() for one aligned cluster, inlined (the hot
                    # path); an unaligned offset touches two clusters.
                    if offset & (cs - 1) or offset >= self.file_len:
                        self.inc_refcounts(res, offset, cs)
                    else:
                        k = offset >> self.cluster_bits
                        if k >= self.nb_clusters:
                            self._realloc(k + 1)
                        rc = self.imrt[k]
                        if rc == self.refcount_max:
                            self.inc_refcounts(res, offset, cs)
                        else:
                            self.imrt[k] = rc + 1
            elif ctype == "unallocated" and bitmap & _L2_BITMAP_ALL_ALLOC:
                res.corruptions += 1
                self.msg("ERROR: Unallocated cluster has non-zero subcluster allocation map")
            # zero_plain: nothing to count

    def check_refcounts_l1(
        self, res: _Res, l1_offset: int, l1_size: int, flags: int, fix: int, active: bool
    ) -> None:
        if not l1_size:
            return
        self.inc_refcounts(res, l1_offset, l1_size * 8)
        l1 = decode_be64(self._pread(l1_offset, l1_size * 8, "l1_load"))
        cs = self.cluster_size
        for entry in l1:
            if not entry:
                continue
            if entry & C.L1E_RESERVED_MASK:
                self.msg(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            l2_offset = entry & C.L1E_OFFSET_MASK
            self.inc_refcounts(res, l2_offset, cs)
            if l2_offset & (cs - 1):
                self.msg(
                    f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                    "L1 entry corrupted"
                )
                res.corruptions += 1
            self.check_refcounts_l2(res, l2_offset, flags, fix, active)

    # ------------------------------------------------------------- bitmaps
    def check_bitmaps_refcounts(self, res: _Res) -> None:
        """qcow2_check_bitmaps_refcounts(): the directory, each table, each data cluster."""
        if self.bitmaps is None:
            return
        nb_bitmaps, dir_offset, dir_size = self.bitmaps
        self.inc_refcounts(res, dir_offset, dir_size)
        tables = self._bitmap_list_load(nb_bitmaps, dir_offset, dir_size)
        if tables is None:
            res.corruptions += 1
            raise _CheckFailed(errno.EINVAL)
        cs = self.cluster_size
        for table_offset, table_size in tables:
            self.inc_refcounts(res, table_offset, table_size * 8)
            entries = decode_be64(self._pread(table_offset, table_size * 8, "read"))
            if any(not self._bitmap_entry_ok(e) for e in entries):
                res.corruptions += 1
                raise _CheckFailed(errno.EINVAL)
            for e in entries:
                offset = e & bitmaps.ENTRY_OFFSET_MASK
                if offset:
                    self.inc_refcounts(res, offset, cs)

    def _bitmap_entry_ok(self, entry: int) -> bool:
        return bitmaps.table_entry_ok(entry, self.cluster_size)

    def _bitmap_list_load(
        self, nb_bitmaps: int, offset: int, size: int
    ) -> list[tuple[int, int]] | None:
        """bitmap_list_load(): the (table offset, table size) of each bitmap, or None
        (the directory decoded and checked by the one codec, :mod:`qcow2aio.bitmaps`)."""
        if size == 0 or size > bitmaps.MAX_DIRECTORY_SIZE:
            return None
        data = self._pread(offset, size, "read")
        try:
            entries = bitmaps.decode_directory(
                data, nb_bitmaps, self.cluster_size, (self.hdr.size // 512) * 512
            )
        except Qcow2Error:
            return None
        return [(e.table_offset, e.table_size) for e in entries]

    # ------------------------------------------------------------ refblocks
    def check_refblocks(self, res: _Res, fix: int) -> bool:
        """check_refblocks(): count each refblock; returns whether a rebuild is needed."""
        rebuild = False
        cs = self.cluster_size
        for i, entry in enumerate(self.reftable):
            offset = entry & C.REFT_OFFSET_MASK
            cluster = offset >> self.cluster_bits
            if entry & C.REFT_RESERVED_MASK:
                self.msg(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                rebuild = True
                continue
            if offset & (cs - 1):
                self.msg(
                    f"ERROR refcount block {i} is not cluster aligned; refcount table entry "
                    "corrupted"
                )
                res.corruptions += 1
                rebuild = True
                continue
            if cluster >= self.nb_clusters:
                res.corruptions += 1
                self.msg(
                    f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} refcount block {i} "
                    "is outside image"
                )
                if fix & FIX_ERRORS:
                    err = self._grow_file_for(offset)
                    if err is None and cluster < self.nb_clusters:
                        res.corruptions -= 1
                        res.corruptions_fixed += 1
                        self.inc_refcounts(res, offset, cs)
                        continue
                    rebuild = True
                    self.msg(f"ERROR could not resize image: {os.strerror(err or errno.EINVAL)}")
                continue
            if offset:
                self.inc_refcounts(res, offset, cs)
                rc = self.imrt[cluster]
                if rc != 1:
                    self.msg(f"ERROR refcount block {i} refcount={rc}")
                    res.corruptions += 1
                    rebuild = True
        return rebuild

    def _grow_file_for(self, offset: int) -> int | None:
        """Extend the file to cover the cluster at ``offset``; returns an errno or None."""
        cs = self.cluster_size
        if offset > C.INT64_MAX - cs:
            return errno.EINVAL
        try:
            self.file.truncate(offset + cs, event="refblock_alloc")
            size = self.file.size()
        except Qcow2Error as exc:
            return getattr(exc, "errno", None) or errno.EIO
        self.file_len = size
        self._realloc(max(self.nb_clusters, self._size_to_clusters(size)))
        return None

    def calculate_refcounts(self, res: _Res, fix: int) -> bool:
        """calculate_refcounts(): fill the IMRT; returns whether a rebuild is needed."""
        hdr = self.hdr
        cs = self.cluster_size
        self.inc_refcounts(res, 0, cs)  # header
        self.check_refcounts_l1(res, hdr.l1_table_offset, hdr.l1_size, _CHECK_FRAG_INFO, fix, True)
        if self.has_data_file and hdr.nb_snapshots:
            self.msg(f"ERROR {hdr.nb_snapshots} snapshots in image with data file")
            res.corruptions += 1
        for sn in self.meta.snapshots:
            if sn.l1_table_offset & (cs - 1):
                self.msg(
                    f"ERROR snapshot {sn.id_str} ({sn.name}) l1_offset={_hx(sn.l1_table_offset)}"
                    ": L1 table is not cluster aligned; snapshot table entry corrupted"
                )
                res.corruptions += 1
                continue
            if sn.l1_size > C.QCOW_MAX_L1_SIZE // 8:
                self.msg(
                    f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={_hx(sn.l1_size)}: "
                    "L1 table is too large; snapshot table entry corrupted"
                )
                res.corruptions += 1
                continue
            self.check_refcounts_l1(res, sn.l1_table_offset, sn.l1_size, 0, fix, False)
        self.inc_refcounts(res, hdr.snapshots_offset, self.snapshots_size)
        self.inc_refcounts(res, self.reftable_offset, len(self.reftable) * 8)
        if hdr.crypto_area is not None and hdr.crypto_area[1]:
            self.inc_refcounts(res, hdr.crypto_area[0], hdr.crypto_area[1])
        self.check_bitmaps_refcounts(res)
        return self.check_refblocks(res, fix)

    # ------------------------------------------------- on-disk refcounts
    def _refblock(self, offset: int) -> RefcountBlock:
        """The refcount block at ``offset`` (through the small write-through cache)."""
        cache = self.rb_cache
        blk = cache.get(offset)
        if blk is None:
            raw = self._pread(offset, self.cluster_size, "refblock_load")
            blk = RefcountBlock(offset, bytearray(raw), self.order)
            cache[offset] = blk
            while len(cache) > _REFBLOCK_CACHE_BLOCKS:
                cache.popitem(last=False)
        else:
            cache.move_to_end(offset)
        return blk

    def _refblock_offset(self, rt_index: int) -> int:
        """The refblock offset for ``rt_index``; 0 when none; raises on misalignment."""
        if rt_index >= len(self.reftable):
            return 0
        offset = self.reftable[rt_index] & C.REFT_OFFSET_MASK
        if offset and offset & (self.cluster_size - 1):
            self.ctx.signal_corruption(
                True,
                f"Refblock offset {_hx(offset)} unaligned (reftable index: {_hx(rt_index)})",
            )
            raise _CheckFailed(errno.EIO)
        return offset

    def get_refcount(self, cluster: int) -> int:
        """qcow2_get_refcount() (raises _CheckFailed(EIO) for a misaligned refblock)."""
        offset = self._refblock_offset(cluster >> self.rb_bits)
        if not offset:
            return 0
        return self._refblock(offset).get(cluster & (self.rb_size - 1))

    def update_refcount(self, cluster: int, addend: int, decrease: bool) -> bool:
        """update_refcount() for one cluster whose refcount block exists; False on failure."""
        try:
            offset = self._refblock_offset(cluster >> self.rb_bits)
        except _CheckFailed:
            return False
        if not offset:
            return False  # not reached: only called for clusters with a refcount
        blk = self._refblock(offset)
        index = cluster & (self.rb_size - 1)
        refcount = blk.get(index)
        if decrease:
            if refcount - addend < 0:
                return False
            refcount -= addend
        else:
            if refcount + addend > self.refcount_max:
                return False
            refcount += addend
        if not self._pre_write_overlap_check(_OL_REFCOUNT_BLOCK, offset, self.cluster_size):
            return False
        blk.set(index, refcount)
        start, end = blk.entry_span(index)
        try:
            self._write(bytes(blk.data[start:end]), offset + start, "refblock_update")
        except _CheckFailed:
            return False
        self.ctx.refblocks_written = True
        return True

    def _disk_refcounts(self, rt_index: int, count: int) -> array[int] | None:
        """The first ``count`` on-disk refcounts of block ``rt_index`` (None: misaligned)."""
        try:
            offset = self._refblock_offset(rt_index)
        except _CheckFailed:
            return None
        if not offset:
            return array(self.typecode, bytes(count * array(self.typecode).itemsize))
        return self._refblock(offset).decode(count)

    def _oflag_all_consistent(
        self, entries: array[int], blocks: dict[int, array[int] | None]
    ) -> bool:
        """True when no data cluster of this L2 table has a wrong COPIED flag (bulk test).

        False means "look entry by entry" (there may be nothing to report).
        """
        mask = C.L2E_OFFSET_MASK
        allocated = list(compress(entries, map(and_, entries, repeat(mask))))
        if not allocated:
            return True
        if reduce(or_, allocated, 0) & C.QCOW_OFLAG_COMPRESSED:
            return False
        copied = map(rshift, allocated, repeat(63))
        if self.has_data_file:
            return all(copied)
        clusters = list(map(rshift, map(and_, allocated, repeat(mask)), repeat(self.cluster_bits)))
        rt_lo = min(clusters) >> self.rb_bits
        rt_hi = max(clusters) >> self.rb_bits
        if rt_hi - rt_lo > 3:
            return False
        span: array[int] = array(self.typecode)
        for rt_index in range(rt_lo, rt_hi + 1):
            block = self._disk_block(rt_index, blocks)
            if block is None:
                return False
            span += block
        base = rt_lo << self.rb_bits
        refcounts = map(span.__getitem__, map(sub, clusters, repeat(base)))
        return not any(map(ne, map(eq, refcounts, repeat(1)), copied))

    def _disk_block(self, rt_index: int, blocks: dict[int, array[int] | None]) -> array[int] | None:
        """All on-disk refcounts of block ``rt_index`` (None: misaligned block, signaled).

        ``blocks`` memoizes decoded blocks for a pass that writes no refcounts.
        """
        if rt_index in blocks:
            return blocks[rt_index]
        decoded = self._disk_refcounts(rt_index, self.rb_size)
        if len(blocks) >= _REFBLOCK_CACHE_BLOCKS:
            blocks.clear()
        blocks[rt_index] = decoded
        return decoded

    def compare_refcounts(self, res: _Res, fix: int) -> tuple[bool, int]:
        """compare_refcounts(): returns (rebuild needed, highest cluster in use)."""
        rebuild = False
        highest = 0
        nb = self.nb_clusters
        imrt = self.imrt
        rb_size = self.rb_size
        for rt_index in range((nb + rb_size - 1) // rb_size):
            start = rt_index * rb_size
            end = min(start + rb_size, nb)
            expected = imrt[start:end]
            disk = self._disk_refcounts(rt_index, end - start)
            if disk is None:
                # QEMU fails qcow2_get_refcount() for each cluster of the block.
                for i in range(start, end):
                    self.msg(f"Can't get refcount for cluster {i}: {os.strerror(errno.EIO)}")
                    res.check_errors += 1
                continue
            if disk.tobytes() == expected.tobytes():
                last = _last_nonzero(expected)
                if last >= 0:
                    highest = start + last
                continue
            # Fixes in this pass already went to the block (write-through), and each
            # entry is repaired only when it is reached, so ``disk`` stays current.
            last = max(_last_nonzero(expected), _last_nonzero(disk))
            if last >= 0:
                highest = start + last
            for j in compress(range(end - start), map(ne, disk, expected)):
                i = start + j
                refcount1 = disk[j]
                refcount2 = expected[j]
                fixed_kind = ""
                if refcount1 == 0:
                    rebuild = True
                elif refcount1 > refcount2 and fix & FIX_LEAKS:
                    fixed_kind = "leak"
                elif refcount1 < refcount2 and fix & FIX_ERRORS:
                    fixed_kind = "corruption"
                what = "Repairing" if fixed_kind else "ERROR" if refcount1 < refcount2 else "Leaked"
                self.msg(f"{what} cluster {i} refcount={refcount1} reference={refcount2}")
                if fixed_kind and self.update_refcount(
                    i, abs(refcount1 - refcount2), refcount1 > refcount2
                ):
                    if fixed_kind == "leak":
                        res.leaks_fixed += 1
                    else:
                        res.corruptions_fixed += 1
                    continue
                if refcount1 < refcount2:
                    res.corruptions += 1
                else:
                    res.leaks += 1
        return rebuild, highest

    # -------------------------------------------------------------- rebuild
    def _alloc_clusters_imrt(self, count: int, first_free: int) -> tuple[int, int]:
        """alloc_clusters_imrt(): returns (offset, new first_free_cluster).

        The first run of ``count`` free clusters at or after ``first_free``; a
        free run reaching the end of the IMRT is extended past it. The returned
        first_free is the first free cluster found (even if its gap was too small).
        """
        nb = self.nb_clusters
        raw = self.imrt.tobytes()
        first_zero = _find_zero_run(raw, self.imrt.itemsize, first_free, 1)
        new_first_free = first_zero if 0 <= first_zero < nb else first_free
        cluster = _find_zero_run(raw, self.imrt.itemsize, first_free, count)
        if cluster < 0:
            # Use the free clusters at the end of the IMRT, and grow it for the rest.
            trailing = -(-len(raw.rstrip(b"\0")) // self.imrt.itemsize)
            cluster = max(first_free, trailing)
            self._realloc(cluster + count)
        imrt = self.imrt
        imrt[cluster : cluster + count] = array(self.typecode, [1]) * count
        return cluster << self.cluster_bits, new_first_free

    def _refblock_bytes(self, rt_index: int) -> bytes:
        start = rt_index * self.rb_size
        entries = self.imrt[start : start + self.rb_size]
        return encode_entries(entries, self.order, self.cluster_size)

    def _write_refblocks(self, first: int, end: int, reftable: list[int]) -> bool:
        """rebuild_refcounts_write_refblocks(); returns whether ``reftable`` grew."""
        grown = False
        first_free = 0
        cluster = first
        rb_size = self.rb_size
        while cluster < end:
            block_end = min(end, ((cluster >> self.rb_bits) + 1) << self.rb_bits, self.nb_clusters)
            if cluster >= block_end:
                break
            found = _first_nonzero(self.imrt[cluster:block_end])
            if found < 0:
                cluster = block_end
                continue
            cluster += found
            rt_index = cluster >> self.rb_bits
            rstart = rt_index << self.rb_bits
            if len(reftable) > rt_index and reftable[rt_index]:
                refblock_offset = reftable[rt_index]
            else:
                first_free = max(first_free, rstart)
                refblock_offset, first_free = self._alloc_clusters_imrt(1, first_free)
                refblock_cluster = refblock_offset >> self.cluster_bits
                if refblock_cluster >= end:
                    end = refblock_cluster + 1
                if len(reftable) <= rt_index:
                    entries = -(-((rt_index + 1) * 8) // self.cluster_size) * self.cluster_size // 8
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[rt_index] = refblock_offset
            if not self._pre_write_overlap_check(0, refblock_offset, self.cluster_size):
                self.msg(f"qemu-img: ERROR writing refblock: {os.strerror(errno.EIO)}")
                raise _CheckFailed(errno.EIO)
            try:
                self._write(self._refblock_bytes(rt_index), refblock_offset, "refblock_update")
            except _CheckFailed as exc:
                self.msg(f"qemu-img: ERROR writing refblock: {exc}")
                raise
            cluster = rstart + rb_size
        return grown

    def rebuild_refcount_structure(self, res: _Res) -> None:
        """rebuild_refcount_structure(): new refblocks + reftable from the IMRT, then switch."""
        self.rb_cache.clear()
        reftable: list[int] = []
        try:
            grown = self._write_refblocks(0, self.nb_clusters, reftable)
        except _CheckFailed:
            res.check_errors += 1
            raise
        assert grown or not reftable
        reftable_offset = -1
        reftable_clusters = 0
        while True:
            reftable_clusters = self._size_to_clusters(len(reftable) * 8)
            reftable_offset, _ = self._alloc_clusters_imrt(reftable_clusters, 0)
            start = reftable_offset >> self.cluster_bits
            try:
                grown = self._write_refblocks(start, start + reftable_clusters, reftable)
            except _CheckFailed:
                res.check_errors += 1
                raise
            if not grown:
                break
        raw: array[int] = array("Q", reftable)
        if _SWAP:
            raw.byteswap()
        if not self._pre_write_overlap_check(0, reftable_offset, len(reftable) * 8):
            self.msg(f"qemu-img: ERROR writing reftable: {os.strerror(errno.EIO)}")
            raise _CheckFailed(errno.EIO)
        try:
            self._write(raw.tobytes(), reftable_offset, "reftable_update")
            # Everything the new header points at must be durable before the switch.
            self._flush("reftable_update")
        except _CheckFailed as exc:
            self.msg(f"qemu-img: ERROR writing reftable: {exc}")
            raise
        try:
            self._write(
                struct.pack(">QI", reftable_offset, reftable_clusters),
                48,
                "refblock_alloc_switch_table",
            )
            self._flush("refblock_alloc_switch_table")
        except _CheckFailed as exc:
            self.msg(f"qemu-img: ERROR setting reftable: {exc}")
            raise
        self.ctx.refblocks_written = True
        hdr = self.hdr
        hdr.refcount_table_offset = reftable_offset
        hdr.refcount_table_clusters = reftable_clusters
        self.reftable = array("Q", reftable)
        self.reftable_offset = reftable_offset
        # The image now uses the new table: so must the Metadata (and the second pass).
        self.meta.reftable = Table(reftable_offset, array("Q", reftable))
        self.meta.refblock_cache.clear()

    # -------------------------------------------------------- OFLAG_COPIED
    def check_oflag_copied(self, res: _Res, fix: int) -> None:
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        meta = self.meta
        l1 = meta.l1.entries
        cs = self.cluster_size
        w = self.entry_words
        word = "Repairing" if repair else "ERROR"
        blocks: dict[int, array[int] | None] = {}
        for i in range(self.hdr.l1_size):
            l1_entry = l1[i] if i < len(l1) else 0
            l2_offset = l1_entry & C.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            try:
                refcount = self.get_refcount(l2_offset >> self.cluster_bits)
            except _CheckFailed:
                continue
            if (refcount == 1) != bool(l1_entry & C.QCOW_OFLAG_COPIED):
                res.corruptions += 1
                self.msg(
                    f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} "
                    f"refcount={refcount}"
                )
                if repair:
                    new = (
                        l1_entry | C.QCOW_OFLAG_COPIED
                        if refcount == 1
                        else l1_entry & ~C.QCOW_OFLAG_COPIED
                    )
                    l1[i] = new
                    l1_pos = self.hdr.l1_table_offset + 8 * i
                    if not self._pre_write_overlap_check(_OL_ACTIVE_L1, l1_pos, 8):
                        res.check_errors += 1
                        raise _CheckFailed(errno.EIO)
                    try:
                        self._write(struct.pack(">Q", new), l1_pos, "l1_update")
                        self._flush("l1_update")
                    except _CheckFailed:
                        res.check_errors += 1
                        raise
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            try:
                table = decode_be64(
                    self.file.pread(l2_offset, self.l2_size * 8 * w, event="l2_load")
                )
            except Qcow2Error as exc:
                self.msg(f"ERROR: Could not read L2 table: {exc}")
                res.check_errors += 1
                raise _CheckFailed(errno.EIO) from exc
            l2_dirty = 0
            mask = C.L2E_OFFSET_MASK
            entries: array[int] = table[0::w] if w > 1 else table
            # NORMAL and ZERO_ALLOC entries: an offset and not compressed (with a data
            # file, offset-0 entries are NORMAL only with COPIED set, so never mismatch).
            if self._oflag_all_consistent(entries, blocks):
                continue
            candidates = [
                (j, e)
                for j, e in enumerate(entries)
                if e & mask and not e & C.QCOW_OFLAG_COMPRESSED
            ]
            last_block = -1
            block: array[int] | None = None
            for j, entry in candidates:
                if self.has_data_file:
                    refcount = 1
                else:
                    cluster = (entry & mask) >> self.cluster_bits
                    if cluster >> self.rb_bits != last_block:
                        last_block = cluster >> self.rb_bits
                        block = self._disk_block(last_block, blocks)
                    if block is None:
                        continue  # qcow2_get_refcount() failed: no message, no count
                    refcount = block[cluster & (self.rb_size - 1)]
                if (refcount == 1) != bool(entry & C.QCOW_OFLAG_COPIED):
                    res.corruptions += 1
                    self.msg(
                        f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}"
                    )
                    if repair:
                        table[j * w] = (
                            entry | C.QCOW_OFLAG_COPIED
                            if refcount == 1
                            else entry & ~C.QCOW_OFLAG_COPIED
                        )
                        l2_dirty += 1
            if l2_dirty:
                if not self._pre_write_overlap_check(_OL_ACTIVE_L2, l2_offset, cs):
                    self.msg(
                        "ERROR: Could not write L2 table; metadata overlap check failed: "
                        f"{os.strerror(errno.EIO)}"
                    )
                    res.check_errors += 1
                    raise _CheckFailed(errno.EIO)
                raw: array[int] = array("Q", table)
                if _SWAP:
                    raw.byteswap()
                try:
                    self._write(raw.tobytes()[:cs], l2_offset, "l2_update")
                except _CheckFailed as exc:
                    self.msg(f"ERROR: Could not write L2 table: {exc}")
                    res.check_errors += 1
                    raise
                self.ctx.l2_written = True
                res.corruptions -= l2_dirty
                res.corruptions_fixed += l2_dirty

    # ------------------------------------------------------------ the check
    def check_refcounts(self, res: _Res, fix: int) -> None:
        """qcow2_check_refcounts(); raises _CheckFailed when QEMU returns an error."""
        size = self.file_len
        nb = self._size_to_clusters(size)
        if nb > _INT_MAX:
            res.check_errors += 1
            raise _CheckFailed(errno.EFBIG)
        res.total_clusters = self._size_to_clusters((self.hdr.size // 512) * 512)
        self._realloc(nb)
        rebuild = self.calculate_refcounts(res, fix)
        pre_compare_res = res.copy()
        rebuild2, highest = self.compare_refcounts(res, 0)
        rebuild = rebuild or rebuild2
        if rebuild and fix & FIX_ERRORS:
            old_res = res.copy()
            fresh_leaks = 0
            self.msg("Rebuilding refcount structure")
            self.rebuild_refcount_structure(res)
            res.corruptions = 0
            res.leaks = 0
            # The references have to be recounted against the new refcount structure.
            self.imrt = array(self.typecode, bytes(self.nb_clusters * self.imrt.itemsize))
            self.rb_cache.clear()
            self.calculate_refcounts(res, 0)
            if fix & FIX_LEAKS:
                # The old refcount structures are now leaked: fix that. Only leaks the
                # rebuild itself introduced and could not fix are reported.
                saved_res = res.copy()
                fresh = _Res()
                still_broken, highest = self.compare_refcounts(fresh, FIX_LEAKS)
                if still_broken:
                    self.msg("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = fresh.leaks
                res.assign(saved_res)
            if res.corruptions < old_res.corruptions:
                res.corruptions_fixed += old_res.corruptions - res.corruptions
            if res.leaks < old_res.leaks:
                res.leaks_fixed += old_res.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if rebuild:
                self.msg("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise _CheckFailed(errno.EIO)
            if res.leaks or res.corruptions:
                res.assign(pre_compare_res)
                _, highest = self.compare_refcounts(res, fix)
        self.check_oflag_copied(res, fix)
        res.image_end_offset = (highest + 1) * self.cluster_size


def _co_check(ctx: _Context, fix: int) -> _Res:
    """qcow2_co_check_locked(); an I/O error anywhere fails the check (EIO or its errno)."""
    try:
        return _co_check_locked(ctx, fix)
    except _CheckFailed:
        raise
    except Qcow2Error as exc:
        raise _CheckFailed(getattr(exc, "errno", None) or errno.EIO) from exc


def _co_check_locked(ctx: _Context, fix: int) -> _Res:
    """qcow2_co_check_locked(): the snapshot table, the refcounts, the table's repair,
    then (after a clean repair) clean/consistent marking."""
    if ctx.drv_dead:
        raise _CheckFailed(errno.ENOMEDIUM)
    snapshot_res = _Res()
    _check_read_snapshot_table(ctx, snapshot_res, fix)
    res = _Res()
    checker = _Checker(ctx)
    checker.check_refcounts(res, fix)
    _check_fix_snapshot_table(ctx, checker, snapshot_res, fix)
    for name in ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed"):
        setattr(res, name, getattr(res, name) + getattr(snapshot_res, name))
    if fix and res.check_errors == 0 and res.corruptions == 0:
        hdr = ctx.meta.header
        if hdr.version >= 3 and hdr.incompatible_features & C.INCOMPAT_DIRTY:
            ctx.meta.file.flush(event="flush")
            ctx.set_incompat(hdr.incompatible_features & ~C.INCOMPAT_DIRTY)
        if hdr.version >= 3 and hdr.incompatible_features & C.INCOMPAT_CORRUPT:
            ctx.meta.file.flush(event="flush")
            ctx.set_incompat(hdr.incompatible_features & ~C.INCOMPAT_CORRUPT)
    return res


# ------------------------------------------------------------ snapshot table
def _set_snapshot_table(meta: Metadata, offset: int, snaps: list[Snapshot], end: int) -> None:
    """The in-memory snapshot table (header fields, entries, extent) after a read or switch."""
    hdr = meta.header
    hdr.nb_snapshots = len(snaps)
    hdr.snapshots_offset = offset
    meta.snapshots = snaps
    meta.snapshot_table_end = end


def _check_read_snapshot_table(ctx: _Context, res: _Res, fix: int) -> None:
    """qcow2_check_read_snapshot_table(): read the table the open left unread.

    The pointer comes from the file (an open for check ignores it). Without
    ``FIX_ERRORS`` a table QEMU cannot read fails the check with QEMU's message.
    With it, as ``qemu-img check -r all``: a count above 65536 is cut to 65536,
    extra data beyond 1024 bytes is cut, entries past the 64 MiB limit are
    dropped (a dropped count is written to the header at once: the refcount pass
    must see the header's count; the clusters this leaks it frees), and each of
    those and each v3 entry with less than 16 bytes of extra data is a
    corruption that :func:`_check_fix_snapshot_table` fixes by rewriting the table.
    """
    meta = ctx.meta
    try:
        nb, offset = struct.unpack(">IQ", meta.file.pread(60, 12, "header_read"))
    except Qcow2Error as exc:
        err = getattr(exc, "errno", None) or errno.EIO
        res.check_errors += 1
        ctx.msg(
            "ERROR failed to read the snapshot table pointer from the image header: "
            f"{os.strerror(err)}"
        )
        raise _CheckFailed(err) from exc
    repair = bool(fix & FIX_ERRORS)
    reduced = 0
    if nb > C.QCOW_MAX_SNAPSHOTS and repair:
        ctx.msg(f"Discarding {nb - C.QCOW_MAX_SNAPSHOTS} overhanging snapshots")
        reduced = nb - C.QCOW_MAX_SNAPSHOTS
        nb = C.QCOW_MAX_SNAPSHOTS
    # qcow2_validate_table(..., "snapshot table"): 40 bytes an entry header.
    invalid: tuple[str, int] | None = None
    if nb > C.QCOW_MAX_SNAPSHOTS:
        invalid = ("snapshot table too large", errno.EFBIG)
    elif C.INT64_MAX - nb * 40 < offset or offset % meta.cluster_size:
        invalid = ("snapshot table offset invalid", errno.EINVAL)
    if invalid is not None:
        res.check_errors += 1
        ctx.msg(f"qemu-img: ERROR {invalid[0]}")
        if nb > C.QCOW_MAX_SNAPSHOTS:
            ctx.msg(
                f"You can force-remove all {nb - C.QCOW_MAX_SNAPSHOTS} overhanging snapshots "
                "with qemu-img check -r all"
            )
        _set_snapshot_table(meta, 0, [], 0)
        raise _CheckFailed(invalid[1])
    try:
        read = read_snapshot_table_for_check(meta.file, offset, nb, repair=repair)
    except SnapshotTableError as exc:
        res.check_errors += 1
        ctx.msg(f"qemu-img: ERROR failed to read the snapshot table: {exc.qemu_message}")
        if exc.hint:
            ctx.msg(exc.hint)
        _set_snapshot_table(meta, 0, [], 0)
        raise _CheckFailed(exc.errno) from exc
    except Qcow2Error as exc:
        err = getattr(exc, "errno", None) or errno.EIO
        res.check_errors += 1
        ctx.msg(
            "qemu-img: ERROR failed to read the snapshot table: Failed to read snapshot table: "
            f"{os.strerror(err)}"
        )
        _set_snapshot_table(meta, 0, [], 0)
        raise _CheckFailed(err) from exc
    ctx.messages.extend(read.messages)
    snaps = read.snapshots
    _set_snapshot_table(meta, offset, snaps, read.end)
    reduced += read.nb_reduced
    res.corruptions += reduced + read.extra_data_dropped
    if reduced:
        try:
            ctx.write(struct.pack(">I", len(snaps)), 60, "header_update")
            meta.file.flush(event="header_update")
        except Qcow2Error as exc:
            err = getattr(exc, "errno", None) or errno.EIO
            res.check_errors += 1
            ctx.msg(
                f"ERROR failed to update the snapshot count in the image header: {os.strerror(err)}"
            )
            raise _CheckFailed(err) from exc
        res.corruptions_fixed += reduced
        res.corruptions -= reduced
    if meta.header.version >= 3:
        # Every v3 entry needs at least vm_state_size_large and disk_size (16 bytes).
        word = "Repairing" if repair else "ERROR"
        for i, sn in enumerate(snaps):
            if len(sn.extra_data) < 16:
                res.corruptions += 1
                ctx.msg(f"{word} snapshot table entry {i} is incomplete")


def _check_fix_snapshot_table(ctx: _Context, checker: _Checker, res: _Res, fix: int) -> None:
    """qcow2_check_fix_snapshot_table(): rewrite a table found corrupt (``-r all``)."""
    if not (res.corruptions and fix & FIX_ERRORS):
        return
    try:
        _write_snapshot_table(ctx, checker)
    except _CheckFailed as exc:
        res.check_errors += 1
        ctx.msg(f"ERROR failed to update snapshot table: {exc}")
        raise
    res.corruptions_fixed += res.corruptions
    res.corruptions = 0


def _write_snapshot_table(ctx: _Context, checker: _Checker) -> None:
    """qcow2_write_snapshots() after the refcount pass, in the project's order: the
    entries as read (repaired) encoded by :func:`snapshot_ops.encode_table` into new
    clusters from the image's allocator, their refcounts durable, the table written
    and durable, then one 12-byte header write (``nb_snapshots`` + ``snapshots_offset``)
    switches to it, and only then is the old table freed. A crash leaks, at worst.
    """
    from .snapshot_ops import SnapshotError, encode_table

    meta = ctx.meta
    hdr = meta.header
    try:
        table = encode_table(meta.snapshots, hdr.size)
    except SnapshotError as exc:
        raise _CheckFailed(exc.errno) from exc
    if ctx.refblocks_written:
        # The refcount pass wrote refcount blocks behind the metadata's cache.
        meta.refblock_cache.clear()
    if meta.allocator is None or meta.writeback is None:
        meta.enable_writes(None)
    alloc, wb = meta.allocator, meta.writeback
    assert alloc is not None and wb is not None
    alloc.free_cluster_index = 0  # first fit, as from a fresh open
    old_offset, old_size = hdr.snapshots_offset, checker.snapshots_size
    try:
        new_offset = alloc.alloc_clusters(checker._size_to_clusters(len(table))) if table else 0
        wb.write_refblocks()  # bdrv_flush: the refcount cache goes out first
        meta.file.flush(event="snapshot_table_write")
    except Qcow2Error as exc:
        raise _CheckFailed(getattr(exc, "errno", None) or errno.EIO) from exc
    ctx.refblocks_written = True
    # The overlap check sees the refcount structures as they are now.
    checker.reftable = array("Q", meta.reftable.entries)
    checker.reftable_offset = meta.reftable.offset
    if table and not checker._pre_write_overlap_check(0, new_offset, len(table)):
        raise _CheckFailed(errno.EIO)
    if table:
        checker._write(table, new_offset, "snapshot_table_write")
    checker._flush("snapshot_table_write")
    checker._write(struct.pack(">IQ", len(meta.snapshots), new_offset), 60, "snapshot_table_switch")
    checker._flush("snapshot_table_switch")
    _set_snapshot_table(meta, new_offset, meta.snapshots, new_offset + len(table))
    _free_clusters(ctx, old_offset, old_size)


def _free_clusters(ctx: _Context, offset: int, size: int) -> None:
    """qcow2_free_clusters(): all or nothing; a failure is only reported (the clusters
    stay allocated: a leak).

    As QEMU's ``update_refcount``, the clusters are taken in order and the first
    problem stops it: a cluster without a refcount block gets one (allocated and
    linked, as when counting a new cluster) and the free fails with EAGAIN; a
    refcount that would drop below zero fails it with EINVAL.
    """
    meta = ctx.meta
    alloc, wb = meta.allocator, meta.writeback
    assert alloc is not None and wb is not None
    if size <= 0:
        return
    cb = meta.cluster_bits
    rb_bits = cb + 3 - meta.header.refcount_order
    try:
        for cluster in range(offset >> cb, ((offset + size - 1) >> cb) + 1):
            if meta.refblock(cluster >> rb_bits) is None:
                alloc.ensure_refblock(cluster >> rb_bits)
                wb.write_refblocks()
                meta.file.flush(event="snapshot_table_free")
                ctx.msg(f"qcow2_free_clusters failed: {os.strerror(errno.EAGAIN)}")
                return
            if meta.get_refcount(cluster) == 0:
                ctx.msg(f"qcow2_free_clusters failed: {os.strerror(errno.EINVAL)}")
                return
        alloc.update_refcount(offset, size, -1)
        wb.write_refblocks()
        meta.file.flush(event="snapshot_table_free")
    except Qcow2Error as exc:
        err = getattr(exc, "errno", None) or errno.EIO
        ctx.msg(f"qcow2_free_clusters failed: {os.strerror(err)}")


def check_image(
    meta: Metadata, *, repair: str | None = None, data_file_size: int | None = None
) -> CheckResult:
    """Check (and with ``repair``, fix) the image behind ``meta`` like ``qemu-img check``.

    ``repair`` is None (check only), ``"leaks"`` (``-r leaks``) or ``"all"``
    (``-r all``). A repair needs ``meta`` opened writable.

    Precondition: ``meta`` holds no dirty cached tables (``meta.l2_cache`` and
    ``meta.refblock_cache`` have nothing unwritten): the check reads the
    metadata from the file, as QEMU's does. Violating it raises AssertionError.

    After a repair, the caches it invalidated are dropped and the in-memory
    state follows the file: ``meta.refblock_cache`` is emptied, rewritten L2
    tables leave ``meta.l2_cache``, ``meta.l1`` carries the fixed L1 entries,
    and after a rebuild ``meta.header.refcount_table_offset``/``_clusters``
    and ``meta.reftable`` describe the new refcount table. As when qemu-img
    closes the image, a repair clears the dirty bit (it also clears the
    corrupt bit when no corruption remains).

    The snapshot table is read from the file (``meta`` may come from an open that
    skipped it: ``Metadata(..., check=True)``); afterwards ``meta.snapshots``,
    ``meta.snapshot_table_end`` and the header's ``nb_snapshots`` /
    ``snapshots_offset`` describe the table as read, or as rewritten by the repair.

    ``data_file_size`` is accepted for callers that know the external data
    file; QEMU 7.2's check never looks at the data file, and neither does this.
    """
    del data_file_size  # QEMU's check does not use the data file.
    fixes = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}
    if repair not in fixes:
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    fix = fixes[repair]
    if meta.l2_cache.dirty() or meta.refblock_cache.dirty():
        raise AssertionError(
            "check_image needs a Metadata without dirty cached tables: flush them first"
        )
    if fix and not (meta.writable and meta.file.writable):
        raise Qcow2ReadOnlyError("qemu-img check -r needs the image opened read-write")

    ctx = _Context(meta, fix)
    result = CheckResult(messages=ctx.messages)
    try:
        try:
            first = _co_check(ctx, fix)
        except _CheckFailed as exc:
            result.error = str(exc)
            ctx.msg(f"qemu-img: Check failed: {exc}")
            return result
        result.assign(first)
        if first.corruptions_fixed or first.leaks_fixed:
            result.double_checked = True
            try:
                second = _co_check(ctx, 0)
            except _CheckFailed as exc:
                result.error = str(exc)
                ctx.msg(f"qemu-img: Check failed: {exc}")
                return result
            second.corruptions_fixed = first.corruptions_fixed
            second.leaks_fixed = first.leaks_fixed
            result.assign(second)
        if result.check_errors:
            ctx.msg("qemu-img: Check failed")
        return result
    finally:
        if fix:
            _close_after_repair(ctx)


def _close_after_repair(ctx: _Context) -> None:
    """What closing the image does after ``qemu-img check -r``; drop stale cached state."""
    meta = ctx.meta
    hdr = meta.header
    try:
        meta.file.flush(event="flush")
        # qcow2_inactivate() marks the image clean on close, whatever the check found.
        if not ctx.drv_dead and hdr.version >= 3 and hdr.incompatible_features & C.INCOMPAT_DIRTY:
            ctx.set_incompat(hdr.incompatible_features & ~C.INCOMPAT_DIRTY)
    finally:
        if ctx.refblocks_written:
            meta.refblock_cache.clear()
        if ctx.l2_written:
            meta.l2_cache.clear()
