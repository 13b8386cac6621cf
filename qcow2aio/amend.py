"""The metadata work of ``qemu-img amend`` (qcow2 format options of an existing image).

Everything here is synchronous and runs like a resize: no request in flight, the
metadata lock held, the cached metadata written back first (``Image._exclusive``
with ``flush=True``). :func:`parse_amend` and :func:`check_amend` refuse, with
QEMU 7.2's messages, everything that cannot be done *before* anything is changed;
:func:`amend_locked` then applies the changes in QEMU's order (upgrade first, then
data file, lazy refcounts, refcount width, size, downgrade last). Each step keeps a
crash to leaks at worst:

* **compat 0.10 -> 1.1**: cluster 0 rewritten in one write (v3 header, 112 bytes,
  the feature-name table), as ``qcow2_update_header`` lays it out.
* **lazy_refcounts**: on = one 8-byte write of the compatible features. Off = the
  refcount blocks (stale while lazy) written and flushed first, then one 16-byte
  write clearing the lazy bit and the dirty bit together.
* **refcount_bits**: the new refcount blocks and table are allocated with the
  image's one allocator (so the *old* structure counts them, and a crash before the
  switch leaves them leaked), filled from the old refcounts, written and flushed;
  one 52-byte header write (offset 48: reftable offset and size .. refcount_order)
  switches; only then are the old table and blocks freed, in the new structure.
* **compat 1.1 -> 0.10**: zero clusters are expanded table by table (active and
  snapshots' L2 tables): new clusters allocated and their refcounts made durable,
  zeros written and flushed, then the L2 table rewritten in place (flushed); then
  the refcounts made consistent (lazy) and cluster 0 rewritten as a v2 header in one
  write. A crash between steps leaves a valid v3 image whose zero entries read as
  zeros either way.
* **size**: :func:`qcow2aio.resize.resize_locked` (its own crash-safe order).
* **data_file** / **data_file_raw=off**: one header write (cluster 0 / autoclear).
"""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from array import array
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import constants as C
from .errors import Qcow2CorruptError, Qcow2Error, Qcow2UnsupportedError
from .header import Header
from .refcount import RefcountBlock
from .tables import Table, decode_be64, encode_be64

if TYPE_CHECKING:
    from .crypto.payload import PayloadCrypto
    from .image import Image
    from .metadata import Metadata

# qcow2's amend options (``qemu-img amend -o help``), in QEMU's order.
AMEND_OPTIONS = (
    "backing_file",
    "backing_fmt",
    "compat",
    "data_file",
    "data_file_raw",
    "encrypt.iter-time",
    "encrypt.keyslot",
    "encrypt.new-secret",
    "encrypt.old-secret",
    "encrypt.state",
    "lazy_refcounts",
    "refcount_bits",
    "size",
)
# qcow2 creation options that amend does not take: QEMU adds a second line for them.
CREATION_ONLY = (
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "cluster_size",
    "extended_l2",
    "preallocation",
    "compression_type",
)
_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_LAZY_V2 = (
    "Lazy refcounts only supported with compatibility level 1.1 and above "
    "(use compat=1.1 or greater)"
)
_WIDTH_V2 = (
    "Refcount widths other than 16 bits require compatibility level 1.1 or above "
    "(use compat=1.1 or greater)"
)


class AmendError(Qcow2Error):
    """An amend request QEMU refuses (the message is qemu-img's); nothing was changed."""


@dataclass
class AmendPlan:
    """The requested changes, validated as values (None: option not given)."""

    version: int | None = None
    lazy_refcounts: bool | None = None
    refcount_order: int | None = None
    data_file: str | None = None
    data_file_given: bool = False
    data_file_raw: bool | None = None
    size: int | None = None


def _invalid(name: str) -> AmendError:
    if name in CREATION_ONLY:
        return AmendError(
            f"Invalid parameter '{name}'\nThis option is only supported for image creation"
        )
    return AmendError(f"Invalid parameter '{name}'")


def parse_amend(options: Mapping[str, object]) -> AmendPlan:
    """Typed amend options (as ``Image.amend`` takes them) -> a plan; QEMU's refusals of
    option names and values, in the order given."""
    plan = AmendPlan()
    for name, value in options.items():
        if name not in AMEND_OPTIONS:
            raise _invalid(name)
        if name in ("backing_file", "backing_fmt"):
            raise AmendError(
                "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead."
            )
        if name.startswith("encrypt."):
            raise Qcow2UnsupportedError(
                f"amend option {name!r}: use Image.add_passphrase/remove_passphrase for keyslots"
            )
        if name == "compat":
            if not isinstance(value, str) or value not in _COMPAT:
                raise AmendError(f"Unknown compatibility level {value}")
            plan.version = _COMPAT[value]
        elif name in ("lazy_refcounts", "data_file_raw"):
            if not isinstance(value, bool):
                raise AmendError(f"Parameter '{name}' expects 'on' or 'off'")
            setattr(plan, name, value)
        elif name == "refcount_bits":
            if isinstance(value, bool) or not isinstance(value, int):
                raise AmendError("Parameter 'refcount_bits' expects a number")
            if value <= 0 or value > 64 or value & (value - 1):
                raise AmendError("Refcount width must be a power of two and may not exceed 64 bits")
            plan.refcount_order = value.bit_length() - 1
        elif name == "data_file":
            if not isinstance(value, str):
                raise AmendError(f"Parameter 'data_file' expects a string, not {value!r}")
            plan.data_file = value
            plan.data_file_given = True
        elif name == "size":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AmendError(f"Parameter 'size' expects a non-negative integer, not {value!r}")
            plan.size = value or None  # size=0 means "unchanged", as in QEMU
    return plan


def check_amend(img: Image, plan: AmendPlan) -> None:
    """Every refusal QEMU makes of this plan on this image, before any change."""
    from .resize import check_resize

    hdr = img.meta.header
    if plan.data_file_raw and not hdr.data_file_raw:
        raise AmendError("data-file-raw cannot be set on existing images")
    if plan.data_file_given and not hdr.has_data_file:
        raise AmendError("data-file can only be set for images that use an external data file")
    version = plan.version if plan.version is not None else hdr.version
    if plan.lazy_refcounts and version < 3:
        raise AmendError(_LAZY_V2)
    order = plan.refcount_order if plan.refcount_order is not None else hdr.refcount_order
    if plan.refcount_order is not None and plan.refcount_order != 4 and version < 3:
        raise AmendError(_WIDTH_V2)
    if plan.size is not None:
        check_resize(img, plan.size, True, "off")
    if version < 3 and hdr.version >= 3:
        if order != 4:
            raise AmendError("compat=0.10 requires refcount_bits=16")
        if hdr.has_data_file:
            raise AmendError("Cannot downgrade an image with a data file")
        other = hdr.incompatible_features & ~(
            C.INCOMPAT_DIRTY | C.INCOMPAT_CORRUPT | C.INCOMPAT_COMPRESSION
        )
        if other:
            raise AmendError(f"Cannot downgrade an image with incompatible features {other:#x} set")
        if hdr.compression_type != C.COMPRESSION_ZLIB and _has_compressed(img.meta):
            raise AmendError(
                "Cannot downgrade an image with zstd compression type and existing "
                "compressed clusters"
            )
    if plan.refcount_order is not None and plan.refcount_order < hdr.refcount_order:
        top = (1 << (1 << plan.refcount_order)) - 1
        for cluster, value in _refcounts(img.meta):
            if value > top:
                raise AmendError(
                    f"Cannot decrease refcount entry width to {1 << plan.refcount_order} "
                    f"bits: Cluster at offset {cluster << img.meta.cluster_bits:#x} has a "
                    f"refcount of {value}"
                )


def amend_locked(img: Image, plan: AmendPlan) -> None:
    """Apply a checked plan (exclusive, cached metadata written back)."""
    meta = img.meta
    hdr = meta.header
    if plan.version == 3 and hdr.version < 3:
        _upgrade(meta)
    if plan.data_file_given and plan.data_file != hdr.data_file:
        _rewrite_cluster0(meta, data_file=plan.data_file or None)
    if plan.data_file_raw is False and hdr.data_file_raw:
        _write_autoclear(meta, hdr.autoclear_features & ~C.AUTOCLEAR_DATA_FILE_RAW)
    if plan.lazy_refcounts is not None and plan.lazy_refcounts != hdr.lazy_refcounts:
        if plan.lazy_refcounts:
            _lazy_on(meta)
        else:
            _lazy_off(meta)
    if plan.refcount_order is not None and plan.refcount_order != hdr.refcount_order:
        change_refcount_order(meta, plan.refcount_order)
    if plan.size is not None and plan.size != hdr.size:
        from .resize import resize_locked

        resize_locked(img, plan.size, "off")
    if plan.version == 2 and hdr.version >= 3:
        _downgrade(img)


# ------------------------------------------------------------------ header writes
def _header_write(meta: Metadata, data: bytes, offset: int, event: str) -> None:
    """One header write, flushed.

    A failed write may still have put part of ``data`` on the file (a short write:
    some bytes written, then ENOSPC), and a header torn inside its fields can name
    structures that do not go together (the refcount switch: the new table's offset
    with the old width, thousands of corruptions). So the bytes it replaces are read
    first and, on any failure, written back and flushed (best effort): the header on
    disk is then the old one, which is what memory still describes (whatever the
    step allocated beforehand is counted in it: a leak at worst). Either way the
    image refuses all further metadata writeback until it is reopened."""
    old = meta.file.pread(offset, len(data), event)
    try:
        meta.file.pwrite(data, offset, event)
        meta.flush_files(event)
    except Qcow2Error as exc:
        meta.poison(exc)
        with contextlib.suppress(Qcow2Error):
            meta.file.pwrite(old, offset, "amend_header_undo")
            meta.file.flush("amend_header_undo")
        raise


def _rewrite_cluster0(meta: Metadata, **changes: object) -> None:
    """Cluster 0 rebuilt with ``changes`` applied to the header (one write), then the
    in-memory header updated to match (same object: others hold references to it)."""
    new = dataclasses.replace(meta.header, **changes)  # type: ignore[arg-type]
    new.unknown_extensions = list(new.unknown_extensions)
    new.feature_names = dict(new.feature_names)
    data = new.to_cluster0()
    _header_write(meta, data, 0, "amend_header")
    for f in dataclasses.fields(Header):
        setattr(meta.header, f.name, getattr(new, f.name))
    meta.version = meta.header.version


def _write_autoclear(meta: Metadata, value: int) -> None:
    _header_write(meta, struct.pack(">Q", value), 88, "amend_header")
    meta.header.autoclear_features = value


def _settle_refcounts(meta: Metadata, event: str) -> None:
    """Make the on-disk refcounts exact (lazy refcounts leave blocks dirty in memory)."""
    assert meta.writeback is not None
    meta.refuse_if_poisoned()
    meta.writeback.write_refblocks()
    meta.flush_files(event)


# ------------------------------------------------------------------ compat / lazy
def _upgrade(meta: Metadata) -> None:
    _set_version(meta, 3)


def _set_version(meta: Metadata, version: int) -> None:
    """Cluster 0 rewritten as a plain header of ``version`` (feature bits cleared,
    16-bit refcounts, zlib): what both directions of a compat change leave."""
    _rewrite_cluster0(
        meta,
        version=version,
        incompatible_features=0,
        compatible_features=0,
        autoclear_features=0,
        refcount_order=4,
        header_length=C.V3_HEADER_LENGTH if version >= 3 else C.V2_HEADER_LENGTH,
        compression_type=C.COMPRESSION_ZLIB,
        unknown_fields=b"",
    )


def _lazy_on(meta: Metadata) -> None:
    value = meta.header.compatible_features | C.COMPAT_LAZY_REFCOUNTS
    _header_write(meta, struct.pack(">Q", value), 80, "amend_header")
    meta.header.compatible_features = value


def _lazy_off(meta: Metadata) -> None:
    """Refcounts durable first; then lazy and dirty bits cleared by one write."""
    assert meta.writeback is not None
    _settle_refcounts(meta, "amend_refcounts")
    hdr = meta.header
    incompat = hdr.incompatible_features & ~C.INCOMPAT_DIRTY
    compat = hdr.compatible_features & ~C.COMPAT_LAZY_REFCOUNTS
    _header_write(meta, struct.pack(">QQ", incompat, compat), 72, "amend_header")
    hdr.incompatible_features = incompat
    hdr.compatible_features = compat
    meta.writeback.dirty_on_disk = False


# ------------------------------------------------------------------ L2 walks
def _l1_tables(meta: Metadata) -> Iterator[array[int]]:
    """The active L1 table, then each snapshot's (validated as snapshot operations do)."""
    from .snapshot_ops import _read_snapshot_l1

    yield meta.l1.entries
    for i, sn in enumerate(meta.snapshots):
        yield _read_snapshot_l1(meta, sn, i)


def _l2_offsets(meta: Metadata) -> dict[int, int]:
    """Every distinct L2 table of the image (-> the L1 index it was first seen at),
    active ones first, in L1 order."""
    seen: dict[int, int] = {}
    cmask = meta.cluster_size - 1
    for l1 in _l1_tables(meta):
        for i, l1e in enumerate(l1):
            off = l1e & C.L1E_OFFSET_MASK
            if not off:
                continue
            if l1e & C.L1E_RESERVED_MASK or off & cmask:
                raise Qcow2CorruptError(f"Invalid L1 entry {i}: {l1e:#018x}")
            seen.setdefault(off, i)
    return seen


def _read_l2(meta: Metadata, off: int) -> array[int]:
    """A copy of the L2 table at ``off`` as it is now (cached copy if any)."""
    cached = meta.l2_cache.get(off)
    if cached is not None:
        return array("Q", cached.entries)
    return decode_be64(meta.file.pread(off, meta.cluster_size, "l2_load"))


def _has_compressed(meta: Metadata) -> bool:
    step = 2 if meta.extended_l2 else 1
    for off in _l2_offsets(meta):
        entries = _read_l2(meta, off)
        if any(e & C.QCOW_OFLAG_COMPRESSED for e in entries[::step]):
            return True
    return False


# ------------------------------------------------------------------ downgrade
def _downgrade(img: Image) -> None:
    meta = img.meta
    has_backing = meta.header.backing_file is not None
    tables = _l2_offsets(meta)
    # Clusters every reference to which is a zero entry (with an offset): zeros may be
    # written into them in place, as QEMU does; any other use keeps its content.
    cb = meta.cluster_bits
    zero_refs: Counter[int] = Counter()
    for off in tables:
        rc = meta.get_refcount(off >> cb)
        for e in _read_l2(meta, off):
            if e & C.QCOW_OFLAG_ZERO and not e & C.QCOW_OFLAG_COMPRESSED:
                host = e & C.L2E_OFFSET_MASK
                if host:
                    zero_refs[host] += rc
    only_zero = {h for h, n in zero_refs.items() if meta.get_refcount(h >> cb) == n}
    for off, l1_index in tables.items():
        guest = l1_index << (cb + meta.l2_bits)
        _expand_zeros(meta, off, guest, has_backing, only_zero, img._crypto)
    _settle_refcounts(meta, "amend_refcounts")
    _set_version(meta, 2)
    assert meta.writeback is not None
    meta.writeback.dirty_on_disk = False


def _expand_zeros(
    meta: Metadata,
    l2_off: int,
    guest_base: int,
    has_backing: bool,
    only_zero: set[int],
    crypto: PayloadCrypto | None,
) -> None:
    """Rewrite one L2 table without zero flags (v2 has none).

    A zero cluster without an offset becomes unallocated when no backing file can
    show through, else a new cluster of zeros (refcount = the table's own, as every
    tree using the table uses it). One with an offset keeps it, zeros written into it,
    when every use of that cluster is a zero entry (``only_zero``); else it gets a new
    one and the old reference is dropped after the table is rewritten. Refcounts and
    zeros durable before the table, the table durable before any decrease.

    On an encrypted image the zeros are written encrypted for their host (LUKS) or
    guest (legacy AES) offset, so they read as zeros (QEMU 7.2 writes plain zeros
    there, which then decrypt to garbage)."""
    alloc = meta.allocator
    assert alloc is not None
    cb = meta.cluster_bits
    cs = meta.cluster_size
    entries = _read_l2(meta, l2_off)
    zero_entries = [
        i
        for i, e in enumerate(entries)
        if e & C.QCOW_OFLAG_ZERO and not e & C.QCOW_OFLAG_COMPRESSED
    ]
    if not zero_entries:
        return
    table_rc = meta.get_refcount(l2_off >> cb)
    if table_rc == 0:
        raise Qcow2CorruptError(f"L2 table at {l2_off:#x} is in use but its refcount is 0")
    targets: list[tuple[int, int]] = []  # (host, guest) of the clusters to zero
    drops: list[int] = []
    for i in zero_entries:
        e = entries[i]
        host = e & C.L2E_OFFSET_MASK
        if host and host in only_zero:
            entries[i] = e & ~C.QCOW_OFLAG_ZERO
            targets.append((host, guest_base + (i << cb)))
            continue
        if host:
            drops.append(host)
        elif not has_backing:
            entries[i] = 0
            continue
        new = alloc.alloc_clusters(1)
        if table_rc > 1:
            alloc.update_refcount(new, cs, table_rc - 1)
        entries[i] = new | (C.QCOW_OFLAG_COPIED if table_rc == 1 else 0)
        targets.append((new, guest_base + (i << cb)))
    for host, guest in targets:
        zeros = bytearray(cs)
        if crypto is not None:
            crypto.encrypt(zeros, host, guest)
        meta.check_data_write(host, cs)
        meta.file.pwrite(zeros, host, "amend_zero_cluster")
    _settle_refcounts(meta, "amend_zero_data")
    _check_l2_write(meta, l2_off)
    meta.l2_cache.discard(l2_off)
    meta.file.pwrite(encode_be64(entries), l2_off, "amend_l2_update")
    meta.flush_files("amend_l2_update")
    if drops:
        for host in drops:
            alloc.update_refcount(host, cs, -table_rc)
        _settle_refcounts(meta, "amend_refcounts")


def _check_l2_write(meta: Metadata, l2_off: int) -> None:
    """A snapshot-only L2 table is not in the overlap map; it must still not lie on
    other metadata."""
    for kind in meta.meta_map.kinds_in(l2_off, meta.cluster_size):
        if kind != "l2":
            meta.mark_corrupt(
                f"Preventing invalid write on metadata (overlaps with {kind}): "
                f"l2 write at {l2_off:#x}+{meta.cluster_size:#x}"
            )


# ------------------------------------------------------------------ refcount width
def _refcounts(meta: Metadata) -> Iterator[tuple[int, int]]:
    """(cluster index, refcount) of every cluster with a nonzero refcount, in file order."""
    import numpy as np

    order = meta.header.refcount_order
    rb_bits = meta.cluster_bits + 3 - order
    for rt in range(len(meta.reftable.entries)):
        blk = meta.refblock(rt)
        if blk is None:
            continue
        base = rt << rb_bits
        if order >= 3:
            dtype = {3: ">u1", 4: ">u2", 5: ">u4", 6: ">u8"}[order]
            values = np.frombuffer(bytes(blk.data), dtype=dtype)
            for j in np.flatnonzero(values).tolist():
                yield base + j, int(values[j])
        else:
            per = 8 >> order
            for byte_index, b in enumerate(blk.data):
                if b:
                    for k in range(per):
                        v = blk.get(byte_index * per + k)
                        if v:
                            yield base + byte_index * per + k, v


def _needed_blocks(meta: Metadata, new_rb_bits: int) -> set[int]:
    return {c >> new_rb_bits for c, _ in _refcounts(meta)}


def change_refcount_order(meta: Metadata, new_order: int) -> None:
    """Rebuild the refcount structure at ``1 << new_order`` bits (see module docstring)."""
    alloc = meta.allocator
    assert alloc is not None and meta.writeback is not None
    cb = meta.cluster_bits
    cs = meta.cluster_size
    new_rb_bits = cb + 3 - new_order
    _settle_refcounts(meta, "amend_refcounts")
    # Allocate the new blocks, then the table, until they cover everything in use
    # (their own clusters included: each allocation may need one more block).
    blocks: dict[int, int] = {}
    table_off = 0
    table_clusters = 0
    while True:
        missing = sorted(_needed_blocks(meta, new_rb_bits) - blocks.keys())
        for idx in missing:
            blocks[idx] = alloc.alloc_clusters(1)
        if missing:
            continue
        want = -(-((max(blocks) + 1) * 8) // cs) if blocks else 1
        if want <= table_clusters:
            break
        if table_clusters:
            # Never referenced by anything: freed at once.
            alloc.update_refcount(table_off, table_clusters * cs, -1)
        table_clusters = want
        table_off = alloc.alloc_clusters(want)
    # Fill from the old structure (which now counts the new clusters too).
    new_blocks = {idx: RefcountBlock(off, bytearray(cs), new_order) for idx, off in blocks.items()}
    mask = (1 << new_rb_bits) - 1
    for c, v in _refcounts(meta):
        new_blocks[c >> new_rb_bits].set(c & mask, v)
    table = array("Q", bytes(table_clusters * cs))
    for idx, off in blocks.items():
        table[idx] = off
    # The old structure with the new allocations durable, then the new one.
    _settle_refcounts(meta, "amend_refcounts")
    for blk in new_blocks.values():
        meta.check_data_write(blk.offset, cs)
        meta.file.pwrite(blk.to_bytes(), blk.offset, "amend_refblock")
    meta.check_data_write(table_off, table_clusters * cs)
    meta.file.pwrite(encode_be64(table), table_off, "amend_reftable")
    meta.flush_files("amend_reftable")
    # The switch: offset 48 .. 100 (reftable offset and clusters .. refcount_order).
    hdr = meta.header
    switch = struct.pack(
        ">QIIQQQQI",
        table_off,
        table_clusters,
        hdr.nb_snapshots,
        hdr.snapshots_offset,
        hdr.incompatible_features,
        hdr.compatible_features,
        hdr.autoclear_features,
        new_order,
    )
    _header_write(meta, switch, 48, "amend_refcount_switch")
    old_table = meta.reftable
    old_clusters = hdr.refcount_table_clusters
    old_blocks = [e & C.REFT_OFFSET_MASK for e in old_table.entries if e & C.REFT_OFFSET_MASK]
    hdr.refcount_table_offset = table_off
    hdr.refcount_table_clusters = table_clusters
    hdr.refcount_order = new_order
    meta.refblock_cache.clear()  # every old block is clean (settled above)
    meta.reftable = Table(table_off, table)
    meta.remove_meta_range(old_table.offset, old_clusters * cs)
    for off in old_blocks:
        meta.remove_meta_range(off, cs)
    meta.add_meta_range(table_off, table_clusters * cs)
    for off in blocks.values():
        meta.add_meta_cluster(off)
    alloc.set_order(new_order)
    for blk in new_blocks.values():
        blk.dirty = blk.fresh = False  # written above
        meta.refblock_cache.insert(blk)
    # Nothing durable refers to the old structure any more.
    alloc.update_refcount(old_table.offset, old_clusters * cs, -1)
    for off in old_blocks:
        alloc.update_refcount(off, cs, -1)
    _settle_refcounts(meta, "amend_refcounts")


__all__ = [
    "AMEND_OPTIONS",
    "CREATION_ONLY",
    "AmendError",
    "AmendPlan",
    "amend_locked",
    "change_refcount_order",
    "check_amend",
    "parse_amend",
]
