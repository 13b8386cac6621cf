"""The qcow2 header, its extensions, and cluster 0 as QEMU writes it.

Parsing validates every field the way QEMU 7.2's open does (same limits), so a
hostile image is refused before any table is read or any memory is sized from
it. Serialising reproduces ``qcow2_update_header``: the whole of cluster 0 is
rebuilt and written in one go, unknown header fields and unknown extensions are
kept, and the backing file name follows the end-of-extensions marker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from dataclasses import dataclass, field

from . import constants as C
from .errors import Qcow2Error, Qcow2FormatError, Qcow2UnsupportedError

_V2 = struct.Struct(">IIQIIQIIQQIIQ")  # 72 bytes
_V3_EXTRA = struct.Struct(">QQQII")  # 32 bytes (72..104)
_EXT_HDR = struct.Struct(">II")
_FEATURE = struct.Struct(">BB46s")


def _align8(n: int) -> int:
    return (n + 7) & ~7


@dataclass
class HeaderExtension:
    """One ``{magic, length, data}`` record after the header; unknown ones are kept verbatim."""

    magic: int
    data: bytes


@dataclass
class Header:
    """The fixed header fields, plus everything QEMU keeps from cluster 0."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    backing_file_offset: int = 0
    backing_file_size: int = 0
    crypt_method: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = C.V3_HEADER_LENGTH
    compression_type: int = C.COMPRESSION_ZLIB
    # Bytes of the header beyond the fields we know (v3 header_length > 112).
    unknown_fields: bytes = b""
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    crypto_area: tuple[int, int] | None = None  # FDE (offset, length) for LUKS
    bitmaps_ext: bytes | None = None
    # Names from the feature-name table: (type, bit) -> name.
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    unknown_extensions: list[HeaderExtension] = field(default_factory=list)

    # ------------------------------------------------------------------ derived
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_EXTL2)

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & C.AUTOCLEAR_DATA_FILE_RAW)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & C.COMPAT_LAZY_REFCOUNTS)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_CORRUPT)

    # ------------------------------------------------------------ serialising
    def pack_fixed(self) -> bytes:
        """The fixed header fields (72 bytes for v2, ``header_length`` for v3)."""
        out = _V2.pack(
            C.QCOW_MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.cluster_bits,
            self.size,
            self.crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        )
        if self.version < 3:
            return out
        out += _V3_EXTRA.pack(
            self.incompatible_features,
            self.compatible_features,
            self.autoclear_features,
            self.refcount_order,
            self.header_length,
        )
        out += bytes([self.compression_type]) + bytes(7)
        out += self.unknown_fields
        return out[: max(self.header_length, C.V3_MIN_HEADER_LENGTH)]

    def to_cluster0(self) -> bytes:
        """Cluster 0 as ``qcow2_update_header`` lays it out; updates the backing fields.

        Order: header, unknown header fields, backing format, data file, crypto,
        feature table (v3 with clusters > 4k only), bitmaps, unknown extensions,
        end marker, backing name. Like QEMU (``-ENOSPC``), nothing is dropped to
        make room: an overflowing cluster 0 is an error.
        """
        cluster_size = self.cluster_size
        if self.version >= 3:
            self.header_length = C.V3_HEADER_LENGTH + len(self.unknown_fields)
        exts: list[tuple[int, bytes]] = []
        if self.backing_format is not None:
            exts.append((C.EXT_BACKING_FORMAT, self.backing_format.encode()))
        if self.data_file is not None:
            exts.append((C.EXT_DATA_FILE, self.data_file.encode()))
        if self.crypto_area is not None:
            exts.append((C.EXT_CRYPTO, struct.pack(">QQ", *self.crypto_area)))
        if self.version >= 3 and cluster_size > 4096:
            # QEMU omits the feature table for clusters of 4k and less, to leave
            # room for a backing file name in 512-byte clusters.
            table = b"".join(
                _FEATURE.pack(t, bit, name.encode()) for t, bit, name in C.QEMU_FEATURE_TABLE
            )
            exts.append((C.EXT_FEATURE_TABLE, table))
        if self.bitmaps_ext is not None:
            exts.append((C.EXT_BITMAPS, self.bitmaps_ext))
        exts.extend((e.magic, e.data) for e in self.unknown_extensions)

        # pack_fixed needs the final backing fields, which depend on the extension sizes.
        fixed_len = C.V2_HEADER_LENGTH if self.version < 3 else self.header_length
        body = bytearray()
        for magic, data in exts:
            ext = _EXT_HDR.pack(magic, len(data)) + data
            ext += bytes(_align8(len(ext)) - len(ext))
            body += ext
        body += _EXT_HDR.pack(C.EXT_END, 0)
        if self.backing_file is not None:
            name = self.backing_file.encode()
            self.backing_file_offset = fixed_len + len(body)
            self.backing_file_size = len(name)
            body += name
        else:
            self.backing_file_offset = 0
            self.backing_file_size = 0
        out = self.pack_fixed() + bytes(body)
        if len(out) > cluster_size:
            raise Qcow2FormatError(
                f"header and extensions need {len(out)} bytes, more than "
                f"cluster_size {cluster_size}"
            )
        return out + bytes(cluster_size - len(out))


def _fmt_features(names: dict[tuple[int, int], str], mask: int) -> str:
    """QEMU's ``report_unsupported_feature``: names in table order, then the rest in hex."""
    parts: list[str] = []
    for (ftype, bit), name in names.items():
        if ftype == C.FEATURE_TYPE_INCOMPATIBLE and bit < 64 and mask & (1 << bit):
            parts.append(name)
            mask &= ~(1 << bit)
    if mask:
        parts.append(f"Unknown incompatible feature: {mask:x}")
    return ", ".join(parts)


def _validate_table(
    what: str,
    offset: int,
    entries: int,
    entry_len: int,
    max_bytes: int,
    cluster_size: int,
    fields: tuple[str, str] = ("offset", "entries"),
) -> None:
    """QEMU's ``qcow2_validate_table``: bounded size, aligned offset, no overflow.

    ``fields`` names the header fields holding ``(offset, entries)`` for the message.
    """
    if entries > max_bytes // entry_len:
        raise Qcow2FormatError(f"{what} too large: {fields[1]}={entries}")
    size = entries * entry_len
    if C.INT64_MAX - size < offset or offset % cluster_size:
        raise Qcow2FormatError(
            f"{what} offset invalid: {fields[0]}={offset:#x} ({fields[1]}={entries})"
        )


def size_to_l1(size: int, cluster_bits: int, l2_bits: int) -> int:
    """How many L1 entries a virtual disk of ``size`` bytes needs."""
    shift = cluster_bits + l2_bits
    return (size + (1 << shift) - 1) >> shift


def _c_string(raw: bytes) -> str:
    """A name as QEMU sees it: a C string, so it ends at the first NUL byte."""
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="surrogateescape")


def parse_header(cluster0: bytes, *, writable: bool = False) -> Header:
    """Parse and validate cluster 0 (or as much of it as the file has).

    The checks run in the order of QEMU 7.2's ``qcow2_do_open``, with its limits.
    Like QEMU (whose block layer reads past the end of a file as zeros),
    ``cluster0`` may be shorter than a cluster: the missing bytes read as zeros.
    """
    buf = bytes(cluster0)
    if len(buf) < C.V3_HEADER_LENGTH:
        buf += bytes(C.V3_HEADER_LENGTH - len(buf))
    magic, version = struct.unpack_from(">II", buf)
    if magic != C.QCOW_MAGIC:
        raise Qcow2FormatError(f"Image is not in qcow2 format: magic={magic:#010x}")
    if version not in (2, 3):
        raise Qcow2UnsupportedError(f"Unsupported qcow2 version: version={version}")
    (
        _magic,
        _version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _V2.unpack_from(buf)
    if not C.MIN_CLUSTER_BITS <= cluster_bits <= C.MAX_CLUSTER_BITS:
        raise Qcow2FormatError(f"Unsupported cluster size: cluster_bits={cluster_bits}")
    cluster_size = 1 << cluster_bits
    if len(buf) < cluster_size:
        buf += bytes(cluster_size - len(buf))
    hdr = Header(
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        l1_size=l1_size,
        l1_table_offset=l1_table_offset,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters,
        backing_file_offset=backing_file_offset,
        backing_file_size=backing_file_size,
        crypt_method=crypt_method,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
    )
    if version == 2:
        hdr.header_length = C.V2_HEADER_LENGTH
        hdr.refcount_order = 4
    else:
        (
            hdr.incompatible_features,
            hdr.compatible_features,
            hdr.autoclear_features,
            hdr.refcount_order,
            hdr.header_length,
        ) = _V3_EXTRA.unpack_from(buf, C.V2_HEADER_LENGTH)
        if hdr.header_length < C.V3_MIN_HEADER_LENGTH:
            raise Qcow2FormatError(f"qcow2 header too short: header_length={hdr.header_length}")
    if hdr.header_length > cluster_size:
        raise Qcow2FormatError(
            f"qcow2 header exceeds cluster size: header_length={hdr.header_length}, "
            f"cluster_size={cluster_size}"
        )
    if version >= 3:
        if hdr.header_length > C.V3_MIN_HEADER_LENGTH:
            hdr.compression_type = buf[C.V3_MIN_HEADER_LENGTH]
        if hdr.header_length > C.V3_HEADER_LENGTH:
            hdr.unknown_fields = buf[C.V3_HEADER_LENGTH : hdr.header_length]
    if backing_file_offset > cluster_size:
        raise Qcow2FormatError(
            f"Invalid backing file offset: backing_file_offset={backing_file_offset:#x} "
            f"is past cluster 0 (cluster_size={cluster_size})"
        )
    ext_end = backing_file_offset if backing_file_offset else cluster_size

    _validate_compression(hdr)
    unknown_incompat = hdr.incompatible_features & ~C.INCOMPAT_MASK
    if unknown_incompat:
        # Like QEMU, read the feature-name table on a best-effort basis (a broken
        # extension area does not hide the real reason the image is refused).
        scratch = dataclasses.replace(hdr, feature_names={}, unknown_extensions=[])
        with contextlib.suppress(Qcow2Error):
            _parse_extensions(scratch, buf, hdr.header_length, ext_end)
        raise Qcow2UnsupportedError(
            "Unsupported qcow2 feature(s): "
            + _fmt_features(scratch.feature_names, unknown_incompat)
            + f" (incompatible_features={hdr.incompatible_features:#x})"
        )
    if hdr.extended_l2 and cluster_bits < C.EXTL2_MIN_CLUSTER_BITS:
        raise Qcow2FormatError(
            "Unsupported subcluster size: extended L2 entries need clusters of at least "
            f"16 KiB (cluster_bits={cluster_bits}, incompatible_features="
            f"{hdr.incompatible_features:#x})"
        )
    if hdr.refcount_order > C.MAX_REFCOUNT_ORDER:
        raise Qcow2FormatError(
            "Reference count entry width too large; may not exceed 64 bits: "
            f"refcount_order={hdr.refcount_order}"
        )
    if refcount_table_clusters == 0:
        raise Qcow2FormatError(
            "Image does not contain a reference count table: refcount_table_clusters=0"
        )
    _validate_table(
        "Reference count table",
        refcount_table_offset,
        refcount_table_clusters,
        cluster_size,
        C.QCOW_MAX_REFTABLE_SIZE,
        cluster_size,
        ("refcount_table_offset", "refcount_table_clusters"),
    )
    # QEMU bounds the count and the offset here (40 bytes a snapshot header),
    # and the size of the whole table when it reads it.
    _validate_table(
        "Snapshot table",
        snapshots_offset,
        nb_snapshots,
        40,
        40 * C.QCOW_MAX_SNAPSHOTS,
        cluster_size,
        ("snapshots_offset", "nb_snapshots"),
    )
    _validate_table(
        "Active L1 table",
        l1_table_offset,
        l1_size,
        8,
        C.QCOW_MAX_L1_SIZE,
        cluster_size,
        ("l1_table_offset", "l1_size"),
    )
    if size > C.INT64_MAX:
        raise Qcow2FormatError(f"Image is too big: size={size}")
    needed = size_to_l1(size, cluster_bits, hdr.l2_bits)
    if needed > 0x7FFFFFFF:
        raise Qcow2FormatError(f"Image is too big: size={size} needs {needed} L1 entries")
    if l1_size < needed:
        raise Qcow2FormatError(
            f"L1 table is too small: l1_size={l1_size}, size={size} needs {needed}"
        )
    if crypt_method > C.CRYPT_LUKS:
        raise Qcow2UnsupportedError(f"Unsupported encryption method: crypt_method={crypt_method}")

    _parse_extensions(hdr, buf, hdr.header_length, ext_end)

    if hdr.data_file is not None:
        if not hdr.has_data_file:
            # QEMU ignores the extension without the incompatible bit (data stays in
            # the image file) and drops it when it rewrites the header.
            hdr.data_file = None
        elif not hdr.data_file:
            raise Qcow2FormatError(
                "External data file name is empty: data-file header extension of length 0"
            )
    if hdr.has_data_file and hdr.data_file is None:
        raise Qcow2FormatError(
            "'data-file' is required for this image: incompatible bit 2 (external data "
            f"file) set without a data-file header extension (incompatible_features="
            f"{hdr.incompatible_features:#x})"
        )
    if hdr.data_file_raw and not hdr.has_data_file:
        raise Qcow2FormatError(
            "data-file-raw requires a data file: autoclear bit 1 set without incompatible "
            f"bit 2 (autoclear_features={hdr.autoclear_features:#x}, incompatible_features="
            f"{hdr.incompatible_features:#x})"
        )
    if crypt_method == C.CRYPT_LUKS and hdr.crypto_area is None:
        raise Qcow2FormatError("Missing CRYPTO header extension for crypt_method=2 (LUKS)")

    if backing_file_offset:
        if backing_file_size > min(C.QCOW_MAX_BACKING_NAME, cluster_size - backing_file_offset):
            raise Qcow2FormatError(
                f"Backing file name too long: backing_file_size={backing_file_size} "
                f"at backing_file_offset={backing_file_offset:#x} (at most 1023 bytes, "
                f"inside cluster 0 of {cluster_size} bytes)"
            )
        raw = buf[backing_file_offset : backing_file_offset + backing_file_size]
        # QEMU keeps a C string: an empty name (or one starting with NUL) means
        # no backing file at all.
        hdr.backing_file = _c_string(raw) or None
    if writable:
        # QEMU clears unknown autoclear bits on a writable open.
        hdr.autoclear_features &= C.AUTOCLEAR_MASK
    return hdr


def _validate_compression(hdr: Header) -> None:
    has_bit = bool(hdr.incompatible_features & C.INCOMPAT_COMPRESSION)
    ct = hdr.compression_type
    if ct not in C.COMPRESSION_NAMES:
        raise Qcow2UnsupportedError(f"Unknown compression type: compression_type={ct}")
    if ct == C.COMPRESSION_ZLIB and has_bit:
        raise Qcow2FormatError(
            "Compression type incompatible feature bit must not be set for zlib "
            f"(compression_type={ct}, incompatible_features={hdr.incompatible_features:#x})"
        )
    if ct != C.COMPRESSION_ZLIB and not has_bit:
        raise Qcow2FormatError(
            "Compression type incompatible feature bit must be set "
            f"(compression_type={ct}, incompatible_features={hdr.incompatible_features:#x})"
        )


def _parse_extensions(hdr: Header, buf: bytes, start: int, end: int) -> None:
    """Read ``{magic, len, data}`` records from ``start`` up to ``end`` (QEMU's rules).

    ``buf`` holds all of cluster 0 (zero-padded) and ``end`` is at most its size.
    A record (even the end marker) whose header or data runs past ``end`` is
    refused; the list may stop at ``end`` without an end marker. A known
    extension that appears twice is taken from its last copy, as QEMU does.
    """
    offset = start
    end = min(end, hdr.cluster_size, len(buf))
    while offset < end:
        if end - offset < _EXT_HDR.size:
            raise Qcow2FormatError(
                f"Header extension too large: header at offset {offset:#x} runs past "
                f"the end of the extension area ({end:#x})"
            )
        magic, length = _EXT_HDR.unpack_from(buf, offset)
        offset += _EXT_HDR.size
        if length > end - offset:
            raise Qcow2FormatError(
                f"Header extension too large: magic={magic:#x} length={length} at offset "
                f"{offset - _EXT_HDR.size:#x} runs past the end of the extension area "
                f"({end:#x})"
            )
        if magic == C.EXT_END:
            return
        data = buf[offset : offset + length]
        if magic == C.EXT_BACKING_FORMAT:
            if length >= 16:
                raise Qcow2FormatError(
                    f"Backing format header extension too large: length={length} (>=16)"
                )
            hdr.backing_format = _c_string(data) or None
        elif magic == C.EXT_FEATURE_TABLE:
            # A partial last entry reads as if zero-padded; the first entry with an
            # empty name ends the table (QEMU's report_unsupported_feature).
            padded = data + bytes(-len(data) % _FEATURE.size)
            names: dict[tuple[int, int], str] = {}
            for pos in range(0, len(padded), _FEATURE.size):
                ftype, bit, name = _FEATURE.unpack_from(padded, pos)
                text = name.split(b"\0", 1)[0]
                if not text:
                    break
                names.setdefault((ftype, bit), text.decode("utf-8", errors="replace"))
            hdr.feature_names = names
        elif magic == C.EXT_CRYPTO:
            if hdr.crypt_method != C.CRYPT_LUKS:
                raise Qcow2FormatError(
                    "CRYPTO header extension only expected with LUKS encryption: "
                    f"crypt_method={hdr.crypt_method}"
                )
            if length != 16:
                raise Qcow2FormatError(
                    f"CRYPTO header extension size invalid: length={length} (must be 16)"
                )
            off, area_len = struct.unpack(">QQ", data)
            if off % hdr.cluster_size:
                raise Qcow2FormatError(
                    f"Encryption header offset {off:#x} is not a multiple of cluster size "
                    f"{hdr.cluster_size}"
                )
            hdr.crypto_area = (off, area_len)
        elif magic == C.EXT_BITMAPS:
            _validate_bitmaps_ext(hdr, data)
            hdr.bitmaps_ext = bytes(data)
        elif magic == C.EXT_DATA_FILE:
            hdr.data_file = _c_string(data)
        else:
            hdr.unknown_extensions.append(HeaderExtension(magic, bytes(data)))
        offset += _align8(length)


_BITMAPS_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved32, directory size, offset
_MAX_BITMAPS = 65535
_MAX_BITMAP_DIRECTORY_SIZE = 1024 * _MAX_BITMAPS


def _validate_bitmaps_ext(hdr: Header, data: bytes) -> None:
    """QEMU's checks of the bitmaps extension (only when the autoclear bit says it is valid)."""
    if len(data) != _BITMAPS_EXT.size:
        raise Qcow2FormatError(f"Bitmaps header extension: invalid length={len(data)} (must be 24)")
    if not hdr.autoclear_features & C.AUTOCLEAR_BITMAPS:
        # Written by a program without bitmap support: QEMU ignores the bitmaps.
        return
    nb, reserved, dir_size, dir_offset = _BITMAPS_EXT.unpack(data)
    if reserved:
        raise Qcow2FormatError(f"Bitmaps header extension: reserved32={reserved:#x} is not zero")
    if nb > _MAX_BITMAPS:
        raise Qcow2FormatError(
            f"Bitmaps header extension: nb_bitmaps={nb} exceeds the maximum of {_MAX_BITMAPS}"
        )
    if nb == 0:
        raise Qcow2FormatError("Bitmaps header extension with zero bitmaps: nb_bitmaps=0")
    if dir_offset % hdr.cluster_size:
        raise Qcow2FormatError(
            f"Bitmaps header extension: bitmap_directory_offset={dir_offset:#x} is unaligned"
        )
    if dir_size > _MAX_BITMAP_DIRECTORY_SIZE:
        raise Qcow2FormatError(
            f"Bitmaps header extension: bitmap_directory_size={dir_size} exceeds the "
            f"maximum of {_MAX_BITMAP_DIRECTORY_SIZE}"
        )
