"""How large a new image will be: ``qemu-img measure``'s three figures.

For a new image of ``size`` bytes, or holding what a ``source`` image holds, in the
``target_format`` (``raw`` or ``qcow2``) with creation ``options``:

* ``required``: the file size the new image needs (qcow2: every table laid out for
  the whole disk, plus the clusters the source's data occupies, or all of them with
  ``preallocation=falloc|full`` or a ``backing_file``, whose content cannot be known);
* ``fully-allocated``: the file size with every data cluster allocated;
* ``bitmaps`` (only for a qcow2 source measured for a v3 qcow2 target): the space
  the source's persistent dirty bitmaps would take.

The qcow2 layout is the one our own ``create`` and ``resize`` lay out: one header
cluster, one L2 table per :func:`qcow2aio.header.size_to_l1` entry, the L1 table in
whole clusters, and refcount blocks plus table for all of it
(:func:`qcow2aio.allocator.refcount_metadata_size`, the sizing the allocator uses
for a new refcount area), plus the LUKS area (:func:`qcow2aio.crypto.luks.area_length`)
in whole clusters. A source's data clusters come from
:func:`qcow2aio.blockstatus.block_status` down its backing chain: a cluster counts
once if any byte of it holds data that is not known to read as zeros. Figures
checked against qemu-img 7.2 on a grid of sizes and options (tests).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Union

from .. import constants as C
from ..allocator import refcount_metadata_size
from ..backing import RAW_FORMATS, RawImage, probe_format
from ..bitmaps import DIR_ENTRY
from ..blockstatus import Status, block_status, block_status_async
from ..crypto.ciphers import cipher_key_bytes
from ..crypto.luks import area_length
from ..errors import Qcow2FormatError, Qcow2UnsupportedError
from ..header import size_to_l1
from ..image import Image
from ..io import to_thread

__all__ = ["MeasureError", "measure", "measure_async"]

_SECTOR = 512
_INT64_MAX = (1 << 63) - 1
_COMPAT = {"0.10": 2, "1.1": 3}
_PREALLOCATION = ("off", "metadata", "falloc", "full")
_STATUS_WINDOW = 1 << 40

SourceArg = Union[str, "os.PathLike[str]", Image, RawImage]


class MeasureError(Qcow2FormatError):
    """A refused option or size: ``qemu`` is qemu-img's own message for it."""

    def __init__(self, qemu: str, detail: str) -> None:
        super().__init__(f"{qemu}: {detail}")
        self.qemu = qemu


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


# ------------------------------------------------------------------ the target's layout


class _Qcow2Target:
    """The validated qcow2 creation options that change the file's size."""

    def __init__(self, options: Mapping[str, object]) -> None:
        opts = dict(options)
        self.extended_l2 = bool(opts.get("extended_l2", False))
        cs = opts.get("cluster_size", 65536)
        if (
            not isinstance(cs, int)
            or isinstance(cs, bool)
            or cs & (cs - 1)
            or not (1 << C.MIN_CLUSTER_BITS <= cs <= 1 << C.MAX_CLUSTER_BITS)
        ):
            raise MeasureError(
                "Cluster size must be a power of two between 512 and 2048k",
                f"cluster_size={cs!r}",
            )
        self.cluster_size = cs
        compat = opts.get("compat", "1.1")
        if compat not in _COMPAT:
            raise MeasureError(f"Invalid compatibility level: '{compat}'", f"compat={compat!r}")
        self.version = _COMPAT[str(compat)]
        bits = opts.get("refcount_bits", 16)
        if (
            not isinstance(bits, int)
            or isinstance(bits, bool)
            or bits & (bits - 1)
            or not (0 < bits <= 64)
        ):
            raise MeasureError(
                "Refcount width must be a power of two and may not exceed 64 bits",
                f"refcount_bits={bits!r}",
            )
        if self.version < 3 and bits != 16:
            raise MeasureError(
                "Different refcount widths than 16 bits require compatibility level 1.1 "
                "or above (use compat=1.1 or greater)",
                f"refcount_bits={bits}, compat={compat}",
            )
        self.refcount_order = bits.bit_length() - 1
        prealloc = opts.get("preallocation", "off")
        if prealloc not in _PREALLOCATION:
            raise MeasureError(
                f"invalid parameter value: {prealloc}", f"preallocation={prealloc!r}"
            )
        self.preallocation = str(prealloc)
        if self.extended_l2 and cs < 1 << C.EXTL2_MIN_CLUSTER_BITS:
            raise MeasureError(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
                f"cluster_size={cs}",
            )
        self.has_backing = opts.get("backing_file") is not None
        self.luks_bytes = 0
        if opts.get("encrypt.format") == "luks":
            alg = str(opts.get("encrypt.cipher-alg", "aes-256"))
            mode = str(opts.get("encrypt.cipher-mode", "xts"))
            self.luks_bytes = _round_up(area_length(cipher_key_bytes(alg, mode)), cs)

    @property
    def _l2_bits(self) -> int:
        return self.cluster_size.bit_length() - 1 - (4 if self.extended_l2 else 3)

    def check_size(self, size: int) -> None:
        """QEMU's limit on the L1 table (32 MiB of entries)."""
        tables = size_to_l1(
            _round_up(size, self.cluster_size), self.cluster_size.bit_length() - 1, self._l2_bits
        )
        if tables * 8 > C.QCOW_MAX_L1_SIZE:
            raise MeasureError(
                "The image size is too large (try using a larger cluster size)",
                f"size={size}, cluster_size={self.cluster_size}",
            )

    def fully_allocated(self, virtual: int) -> int:
        """File size with all of ``virtual`` (whole clusters) allocated."""
        cs = self.cluster_size
        l2_tables = size_to_l1(virtual, cs.bit_length() - 1, self._l2_bits)
        meta = cs + l2_tables * cs + _round_up(l2_tables * 8, cs)
        refcounts, _ = refcount_metadata_size(
            (meta + virtual) // cs, cs, self.refcount_order, False
        )
        return self.luks_bytes + meta + refcounts + virtual


_RAW_OPTIONS = ("size", "preallocation", "nocow", "extent_size_hint")


def _target(target_format: str, options: Mapping[str, object]) -> _Qcow2Target | None:
    if target_format == "qcow2":
        return _Qcow2Target(options)
    if target_format in RAW_FORMATS - {"host_device", "host_cdrom"} or target_format == "raw":
        for name in options:
            if name not in _RAW_OPTIONS:
                raise MeasureError(f"Invalid parameter '{name}'", f"target_format={target_format}")
        return None
    raise Qcow2UnsupportedError(
        f"Only raw and qcow2 targets can be measured: target_format={target_format!r}"
    )


# ------------------------------------------------------------------ the source


def _open(
    source: SourceArg, fmt: str | None, passphrase: str | bytes | None
) -> tuple[Image | RawImage, bool]:
    if isinstance(source, Image | RawImage):
        return source, False
    path = os.fspath(source)
    kind = fmt if fmt is not None else probe_format(path)
    if kind in RAW_FORMATS:
        return RawImage(path), True
    if kind != "qcow2":
        raise Qcow2UnsupportedError(f"Unsupported image format: source_format={kind!r}")
    # Measuring reads metadata only: an encrypted source needs no passphrase.
    img = Image(
        path,
        "r",
        passphrase=passphrase,
        backing_passphrase=passphrase,
        metadata_only=passphrase is None,
    )
    return img, True


def _source_size(img: Image | RawImage) -> int:
    """The disk size QEMU sees: a raw file counts in whole sectors."""
    if isinstance(img, RawImage):
        return _round_up(img.size, _SECTOR)
    return img.size


def _data_clusters(runs: list[Status], cs: int, seen: int) -> tuple[int, int]:
    """Clusters holding data in ``runs`` (not counting clusters below ``seen``, the
    end of the last counted cluster); returns (count, new seen)."""
    count = 0
    for st in runs:
        if st.zero or not (st.data and st.present):
            continue
        first = max(st.start // cs, seen)
        last = -(-(st.start + st.length) // cs)
        if last > first:
            count += last - first
            seen = last
    return count, seen


def _bitmaps_size(img: Image, cs: int) -> int:
    """Room for the source's persistent bitmaps in a target of ``cs``-byte clusters:
    each bitmap's data clusters and table, and the directory (whole clusters). The
    bitmaps are those :mod:`qcow2aio.bitmaps` (the one directory codec) lists."""
    bset = img._bitmap_set()
    if bset.loaded:
        items = [(len(b.name.encode("utf-8", "surrogateescape")), b.gran_bits) for b in bset.list]
    else:
        items = [(len(e.raw_name), e.gran_bits) for e in bset.on_disk]
    total = 0
    directory = 0
    for name_size, gran_bits in items:
        granularity = 1 << gran_bits
        bits = _round_up(img.size, granularity) // granularity
        nbytes = _round_up(bits, 8) // 8
        clusters = -(-nbytes // cs)
        total += clusters * cs + _round_up(clusters * 8, cs)
        directory += _round_up(DIR_ENTRY.size + name_size, 8)
    return total + _round_up(directory, cs) if items else 0


# ------------------------------------------------------------------ measuring


def _figures(
    target: _Qcow2Target | None,
    size: int | None,
    src: Image | RawImage | None,
    data_clusters: int,
) -> dict[str, int]:
    if target is None:  # raw: every byte of the disk is in the file
        n = _round_up(size or 0, _SECTOR) if src is None else _source_size(src)
        return {"required": n, "fully-allocated": n}
    cs = target.cluster_size
    if src is None:
        virtual = _round_up(size or 0, cs)
        data = 0
    else:
        virtual = _round_up(_source_size(src), cs)
        data = virtual if target.has_backing else data_clusters * cs
    if target.preallocation in ("falloc", "full"):
        data = virtual
    full = target.fully_allocated(virtual)
    out = {"required": full - virtual + data, "fully-allocated": full}
    if src is not None and isinstance(src, Image) and target.version >= 3:
        out["bitmaps"] = _bitmaps_size(src, cs)
    return out


def _prepare(
    size: int | None,
    source: SourceArg | None,
    target_format: str,
    options: Mapping[str, object] | None,
) -> _Qcow2Target | None:
    if (size is None) == (source is None):
        raise ValueError("measure needs exactly one of size= and source=")
    if size is not None and not 0 <= size <= _INT64_MAX:
        raise MeasureError(
            "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.",
            f"size={size}",
        )
    target = _target(target_format, options or {})
    if target is not None and size is not None:
        target.check_size(size)
    return target


def measure(
    *,
    size: int | None = None,
    source: SourceArg | None = None,
    source_format: str | None = None,
    target_format: str = "raw",
    options: Mapping[str, object] | None = None,
    passphrase: str | bytes | None = None,
) -> dict[str, int]:
    """``qemu-img measure``: the ``required`` and ``fully-allocated`` file sizes (and
    ``bitmaps``, for a qcow2 source and a v3 qcow2 target) of a new image of ``size``
    bytes or with the content of ``source`` (a path, probed unless ``source_format``;
    or an open image, left open). ``options`` are the ``-o`` creation options by
    qemu-img's names (``cluster_size``, ``compat``, ``refcount_bits``,
    ``extended_l2``, ``preallocation``, ``backing_file``, ``encrypt.format``,
    ``encrypt.cipher-alg``, ``encrypt.cipher-mode``), typed as ``qcow2aio.create``
    takes them. Reads a source's block status (metadata only), never its data."""
    target = _prepare(size, source, target_format, options)
    if source is None:
        return _figures(target, size, None, 0)
    src, close = _open(source, source_format, passphrase)
    try:
        count = 0
        if target is not None and not target.has_backing:
            seen = 0
            for start in range(0, src.size, _STATUS_WINDOW):
                n = min(_STATUS_WINDOW, src.size - start)
                got, seen = _data_clusters(block_status(src, start, n), target.cluster_size, seen)
                count += got
        return _figures(target, None, src, count)
    finally:
        if close:
            src.close()


async def measure_async(
    *,
    size: int | None = None,
    source: SourceArg | None = None,
    source_format: str | None = None,
    target_format: str = "raw",
    options: Mapping[str, object] | None = None,
    passphrase: str | bytes | None = None,
) -> dict[str, int]:
    """:func:`measure` for a coroutine: the source is opened and its block status
    read on an I/O thread window by window, so the loop is never blocked on it."""
    target = _prepare(size, source, target_format, options)
    if source is None:
        return _figures(target, size, None, 0)
    src, close = await to_thread(_open, source, source_format, passphrase)
    try:
        count = 0
        if target is not None and not target.has_backing:
            seen = 0
            for start in range(0, src.size, _STATUS_WINDOW):
                n = min(_STATUS_WINDOW, src.size - start)
                runs = await block_status_async(src, start, n)
                got, seen = _data_clusters(runs, target.cluster_size, seen)
                count += got
        return _figures(target, None, src, count)
    finally:
        if close:
            src.close()
