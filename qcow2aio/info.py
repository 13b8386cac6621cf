"""``qemu-img info`` for an open image: the same keys, values, order and text.

QEMU 7.2 builds its answer as a QAPI ``ImageInfo`` and converts it to a
``QDict`` before printing, so both the JSON and the human output list keys in
*QDict iteration order*: by bucket (``tdb_hash(key) % 512``) and, inside a
bucket, most recently inserted first. :func:`qdict` reproduces that order from
the order in which QEMU's visitor inserts the members (the field order of the
QAPI schema), so the dicts returned here iterate exactly like QEMU's output
and :func:`format_json`/:func:`format_human` can print them verbatim.

Only what ``qemu-img info`` shows for an image opened without its backing
chain (``BDRV_O_NO_BACKING``) is reported: QEMU never opens the backing file
for ``info`` unless asked for the chain.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import constants as C
from .errors import Qcow2UnsupportedError

if TYPE_CHECKING:
    from .backing import RawImage
    from .image import Image

__all__ = ["format_human", "format_json", "image_info", "qdict", "raw_image_info", "size_to_str"]

_QDICT_BUCKET_MAX = 512
_SECTOR = 512

# QEMUSnapshotInfo's fixed buffers (pstrcpy keeps one byte for the NUL).
_SN_ID_MAX = 127
_SN_NAME_MAX = 255


# --------------------------------------------------------------------- QDict
def _tdb_hash(name: str) -> int:
    """QEMU's ``tdb_hash`` (qobject/qdict.c)."""
    data = name.encode("utf-8", errors="surrogateescape")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, c in enumerate(data):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """A dict that iterates like a QEMU ``QDict`` filled with ``items`` in that order."""
    buckets: dict[int, list[tuple[str, Any]]] = {}
    for key, value in items:
        buckets.setdefault(_tdb_hash(key) % _QDICT_BUCKET_MAX, []).insert(0, (key, value))
    return {k: v for b in sorted(buckets) for k, v in buckets[b]}


# ------------------------------------------------------------------- values
def _path_has_protocol(path: str) -> bool:
    for ch in path:
        if ch == "/":
            return False
        if ch == ":":
            return True
    return False


def full_backing_filename(image_filename: str, backing: str) -> str:
    """``bdrv_get_full_backing_filename``: the name joined to the image's directory *text*."""
    if _path_has_protocol(backing) or backing.startswith("/"):
        return backing
    slash = image_filename.rfind("/")
    return image_filename[: slash + 1] + backing


def _truncate_name(text: str, limit: int) -> str:
    """``pstrcpy`` into QEMUSnapshotInfo's fixed buffer: stops at NUL, keeps ``limit`` bytes."""
    raw = text.encode("utf-8", errors="surrogateescape")
    cut = raw.split(b"\0", 1)[0][:limit]
    if cut == raw:
        return text
    return cut.decode("utf-8", errors="replace")


def _allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def _bitmaps(img: Image) -> list[dict[str, Any]] | None:
    """``qcow2_get_bitmap_info_list``: None when QEMU would not list any bitmap (the
    directory is decoded and checked by :mod:`qcow2aio.bitmaps`, the one codec)."""
    listed = img.bitmaps()
    return listed or None


def _format_specific(img: Image) -> dict[str, Any]:
    """``qcow2_get_specific_info``, members in ImageInfoSpecificQCow2 schema order."""
    hdr = img.meta.header
    compression = C.COMPRESSION_NAMES.get(hdr.compression_type, "zlib")
    members: list[tuple[str, Any]] = [("compat", "0.10" if hdr.version == 2 else "1.1")]
    if hdr.version == 2:
        members += [("refcount-bits", hdr.refcount_bits)]
        encrypt = _encrypt(img)
        if encrypt is not None:
            members.append(("encrypt", encrypt))
        members.append(("compression-type", "zlib"))
    else:
        bitmaps = _bitmaps(img)
        if hdr.data_file is not None:
            members.append(("data-file", hdr.data_file))
        if hdr.has_data_file:
            members.append(("data-file-raw", hdr.data_file_raw))
        members += [
            ("extended-l2", hdr.extended_l2),
            ("lazy-refcounts", hdr.lazy_refcounts),
            ("corrupt", hdr.corrupt),
            ("refcount-bits", hdr.refcount_bits),
        ]
        encrypt = _encrypt(img)
        if encrypt is not None:
            members.append(("encrypt", encrypt))
        if bitmaps is not None:
            members.append(("bitmaps", bitmaps))
        members.append(("compression-type", compression))
    return qdict([("type", "qcow2"), ("data", qdict(members))])


# QCryptoBlockInfoLUKS and QCryptoBlockInfoLUKSSlot members in QAPI schema order: the
# order QEMU's visitor inserts them into its QDicts (``format``, the union's
# discriminator, comes first).
_LUKS_INFO_MEMBERS = (
    "format",
    "cipher-alg",
    "cipher-mode",
    "ivgen-alg",
    "ivgen-hash-alg",
    "hash-alg",
    "payload-offset",
    "master-key-iters",
    "uuid",
    "slots",
)
_LUKS_SLOT_MEMBERS = ("active", "iters", "stripes", "key-offset")
# The LUKS1 header: what qemu-img info reports needs no key material beyond it.
_LUKS_HEADER_BYTES = 592


def _schema_qdict(members: dict[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    """``qdict`` of ``members`` inserted in schema ``order`` (absent optionals skipped)."""
    return qdict((name, members[name]) for name in order if name in members)


def _encrypt(img: Image) -> dict[str, Any] | None:
    """``qcrypto_block_get_info``: the ``encrypt`` member (needs no passphrase).

    LUKS reports its header (algorithms, keyslots, offsets), legacy AES only its
    format. The LUKS header is read from the image's encryption area.
    """
    hdr = img.meta.header
    method = hdr.crypt_method
    if method == C.CRYPT_NONE:
        return None
    if method == C.CRYPT_AES:
        return qdict([("format", "aes")])
    if method != C.CRYPT_LUKS or hdr.crypto_area is None:
        raise Qcow2UnsupportedError(f"Unsupported encryption method: crypt_method={method}")
    from .crypto.luks import LuksHeader  # only LUKS images need the crypto package

    offset, length = hdr.crypto_area
    raw = img._file.pread(offset, _LUKS_HEADER_BYTES, "luks_header")
    members = dict(LuksHeader.parse(raw, length).info())
    members["format"] = "luks"
    members["slots"] = [_schema_qdict(slot, _LUKS_SLOT_MEMBERS) for slot in members["slots"]]
    return _schema_qdict(members, _LUKS_INFO_MEMBERS)


def _snapshots(img: Image) -> list[dict[str, Any]]:
    """``bdrv_query_snapshot_info_list`` (none for images with an external data file)."""
    if img.meta.header.has_data_file:
        return []
    out: list[dict[str, Any]] = []
    for sn in img.meta.snapshots:
        members: list[tuple[str, Any]] = [
            ("id", _truncate_name(sn.id_str, _SN_ID_MAX)),
            ("name", _truncate_name(sn.name, _SN_NAME_MAX)),
            ("vm-state-size", sn.vm_state_size),
            ("date-sec", sn.date_sec),
            ("date-nsec", sn.date_nsec),
            ("vm-clock-sec", sn.vm_clock_nsec // 1_000_000_000),
            ("vm-clock-nsec", sn.vm_clock_nsec % 1_000_000_000),
        ]
        if sn.icount is not None:
            members.append(("icount", sn.icount))
        out.append(qdict(members))
    return out


def image_info(img: Image) -> dict[str, Any]:
    """The ``qemu-img info --output=json`` object for an open qcow2 image, in QEMU's order."""
    hdr = img.meta.header
    # Only the image file counts: QEMU 7.2 reports the same actual-size with and
    # without blocks allocated in an external data file (checked with qemu-img).
    actual = _allocated(img._file.fd)
    members: list[tuple[str, Any]] = [
        ("filename", img.path),
        ("format", "qcow2"),
        ("dirty-flag", hdr.dirty),
        ("actual-size", actual),
        ("virtual-size", hdr.size // _SECTOR * _SECTOR),
        ("cluster-size", hdr.cluster_size),
    ]
    if hdr.crypt_method:
        members.append(("encrypted", True))
    if hdr.backing_file:
        members.append(("backing-filename", hdr.backing_file))
        members.append(("full-backing-filename", full_backing_filename(img.path, hdr.backing_file)))
        if hdr.backing_format:
            members.append(("backing-filename-format", hdr.backing_format))
    snapshots = _snapshots(img)
    if snapshots:
        members.append(("snapshots", snapshots))
    members.append(("format-specific", _format_specific(img)))
    return qdict(members)


def raw_image_info(img: RawImage, filename: str) -> dict[str, Any]:
    """``qemu-img info`` of a raw file (a raw backing file in ``--backing-chain``)."""
    fd = img._file.fd
    size = os.fstat(fd).st_size
    return qdict(
        [
            ("filename", filename),
            ("format", "raw"),
            ("dirty-flag", False),
            ("actual-size", _allocated(fd)),
            ("virtual-size", -(-size // _SECTOR) * _SECTOR),
        ]
    )


# ------------------------------------------------------------------- output
_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _quoted(text: str) -> str:
    """json-writer.c ``quoted_str``: ASCII only, uppercase ``\\uXXXX`` escapes."""
    out = ['"']
    for ch in text:
        escaped = _SHORT_ESCAPES.get(ch)
        if escaped is not None:
            out.append(escaped)
            continue
        cp = ord(ch)
        if 0xDC80 <= cp <= 0xDCFF:  # an undecodable byte (surrogateescape)
            cp = 0xFFFD
        if cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _json(value: Any, depth: int, out: list[str]) -> None:
    pad = "\n" + " " * (4 * (depth + 1))
    if isinstance(value, bool):
        out.append("true" if value else "false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, str):
        out.append(_quoted(value))
    elif isinstance(value, dict):
        out.append("{")
        for i, (k, v) in enumerate(value.items()):
            out.append(("," if i else "") + pad + _quoted(k) + ": ")
            _json(v, depth + 1, out)
        out.append("\n" + " " * (4 * depth) + "}")
    elif isinstance(value, list):
        out.append("[")
        for i, v in enumerate(value):
            out.append(("," if i else "") + pad)
            _json(v, depth + 1, out)
        out.append("\n" + " " * (4 * depth) + "]")
    elif value is None:
        out.append("null")
    else:
        raise TypeError(f"cannot write {type(value).__name__} as QEMU JSON")


def format_json(value: Any) -> str:
    """``qobject_to_json_pretty``: QEMU's exact pretty JSON text (no trailing newline).

    Differs from ``json.dumps(indent=4)`` for empty containers (``[`` newline
    ``]``) and non-ASCII text (uppercase ``\\uXXXX``).
    """
    out: list[str] = []
    _json(value, 0, out)
    return "".join(out)


_IEC = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]


def size_to_str(val: int) -> str:
    """util/cutils.c ``size_to_str``: "1 GiB", "196 KiB", "1.5 MiB", "0 B"."""
    _, exp = math.frexp(val / (1000.0 / 1024.0))
    i = int((exp - 1) / 10) * 10  # C division truncates toward zero
    return "%0.3g %sB" % (val / (1 << i), _IEC[i // 10])  # noqa: UP031 - C's %g


def _dump_qobject(indent: int, value: Any, out: list[str]) -> None:
    if isinstance(value, dict):
        for key, v in value.items():
            composite = isinstance(v, (dict, list))
            out.append(" " * (indent * 4) + key.replace("-", " ") + (":\n" if composite else ": "))
            _dump_qobject(indent + 1, v, out)
            if not composite:
                out.append("\n")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            composite = isinstance(v, (dict, list))
            out.append(" " * (indent * 4) + f"[{i}]:" + ("\n" if composite else " "))
            _dump_qobject(indent + 1, v, out)
            if not composite:
                out.append("\n")
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    else:
        out.append(str(value))


def _ljust_bytes(text: str, width: int) -> str:
    """printf's ``%-Ns``: pads to N *bytes* of UTF-8, not N characters."""
    return text + " " * max(0, width - len(text.encode("utf-8", errors="surrogateescape")))


def _snapshot_line(sn: dict[str, Any]) -> str:
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
    clock = sn["vm-clock-sec"] * 1_000_000_000 + sn["vm-clock-nsec"]
    secs = clock // 1_000_000_000
    clock_buf = "%02d:%02d:%02d.%03d" % (  # noqa: UP031 - mirrors QEMU's printf
        secs // 3600,
        (secs // 60) % 60,
        secs % 60,
        (clock // 1_000_000) % 1000,
    )
    icount = str(sn["icount"]) if "icount" in sn else ""
    return "%s %s %8s%20s%13s%11s" % (  # noqa: UP031
        _ljust_bytes(sn["id"], 9),
        _ljust_bytes(sn["name"], 16),
        size_to_str(sn["vm-state-size"]),
        date,
        clock_buf,
        icount,
    )


def format_human(info: dict[str, Any]) -> str:
    """``bdrv_image_info_dump``: qemu-img info's human-readable text (ends with a newline)."""
    out: list[str] = []
    actual = info.get("actual-size")
    out.append(f"image: {info['filename']}\n")
    out.append(f"file format: {info['format']}\n")
    out.append(
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)\n"
    )
    out.append(f"disk size: {'unavailable' if actual is None else size_to_str(actual)}\n")
    if info.get("encrypted"):
        out.append("encrypted: yes\n")
    if "cluster-size" in info:
        out.append(f"cluster_size: {info['cluster-size']}\n")
    if info.get("dirty-flag"):
        out.append("cleanly shut down: no\n")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        out.append(line + "\n")
        if "backing-filename-format" in info:
            out.append(f"backing file format: {info['backing-filename-format']}\n")
    if info.get("snapshots"):
        out.append("Snapshot list:\n")
        out.append(
            "%-10s%-17s%8s%20s%13s%11s\n"  # noqa: UP031
            % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
        )
        for sn in info["snapshots"]:
            out.append(_snapshot_line(sn) + "\n")
    if "format-specific" in info:
        out.append("Format specific information:\n")
        _dump_qobject(1, info["format-specific"]["data"], out)
    return "".join(out)
