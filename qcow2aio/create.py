"""Create qcow2 images byte-for-byte the way ``qemu-img create -f qcow2`` does.

Create is a resize
------------------
QEMU does not write a precomputed layout: it writes a stub (a header with size
0, a one-cluster refcount table naming one empty refcount block), opens the
stub as an ordinary image, counts clusters 0-2, *resizes* it to the requested
size with the requested preallocation, places the LUKS area (if any) and
rewrites the header. :func:`create` does the same with this driver: the stub
is opened as an :class:`~qcow2aio.image.Image`, and the growth, the
preallocation and every refcount block or refcount table that they need are
placed by the driver's one allocator (:mod:`qcow2aio.allocator`, whose
placement rules are QEMU's: first fit, refcount blocks after the run that
needed them, refcount tables laid out after the covered area) through the
same code as :meth:`Image.resize <qcow2aio.image.Image.resize_sync>`
(:mod:`qcow2aio.resize`). The result is the same bytes as QEMU's, down to the
stale bytes of freed tables and the allocated-block footprint.

Options, sizes, the L1 limit and the header's fit in cluster 0 are checked
before any file is touched; a failure after that deletes the new image, as
QEMU does.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass

from . import constants as C
from .backing import RAW_FORMATS, resolve_name
from .errors import (
    Qcow2Error,
    Qcow2FormatError,
    Qcow2IOError,
    Qcow2PassphraseError,
    Qcow2UnsupportedError,
)
from .header import Header, size_to_l1
from .io import FileBackend

__all__ = ["PREALLOCATION_MODES", "create", "normalize_compat"]

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
COMPAT_LEVELS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
COMPRESSION_TYPES = {"zlib": C.COMPRESSION_ZLIB, "zstd": C.COMPRESSION_ZSTD}

_SECTOR = 512


def normalize_compat(compat: str) -> int:
    """The qcow2 version for a ``compat`` value ("0.10"/"v2" -> 2, "1.1"/"v3" -> 3)."""
    try:
        return COMPAT_LEVELS[compat]
    except (KeyError, TypeError):
        raise Qcow2FormatError(
            f"Invalid compatibility level: compat={compat!r} (use 0.10, 1.1, v2 or v3)"
        ) from None


def _div_round_up(n: int, d: int) -> int:
    return -(-n // d)


def _round_up(n: int, align: int) -> int:
    return _div_round_up(n, align) * align


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------
@dataclass
class _Encryption:
    """What ``encrypt.*`` asks for, validated; a LUKS area already formatted (its
    PBKDF2 benchmark takes a while, so before anything is laid out or written)."""

    method: int  # C.CRYPT_AES or C.CRYPT_LUKS
    area: bytes = b""  # LUKS: header + keyslot material, length = the payload offset


ENCRYPT_DEFAULTS = {
    "encrypt_cipher_alg": "aes-256",
    "encrypt_cipher_mode": "xts",
    "encrypt_ivgen_alg": "plain64",
    "encrypt_ivgen_hash_alg": None,
    "encrypt_hash_alg": "sha256",
    "encrypt_iter_time": 2000,
}


def _encryption(
    encrypt_format: str | None, passphrase: str | bytes | None, options: dict[str, object]
) -> _Encryption | None:
    """QEMU's checks of the ``encrypt.*`` options, in its order and with its messages."""
    if encrypt_format is None:
        if passphrase is not None:
            raise Qcow2FormatError("Parameter 'encrypt.format' is missing")
        return None
    if encrypt_format not in ("aes", "luks"):
        raise Qcow2FormatError(
            f"Parameter 'encrypt.format' does not accept value {encrypt_format!r}"
        )
    if encrypt_format == "aes":
        for name, default in ENCRYPT_DEFAULTS.items():
            if options[name] != default:
                qname = "encrypt." + name.removeprefix("encrypt_").replace("_", "-")
                raise Qcow2FormatError(f"Parameter {qname!r} is unexpected")
    if passphrase is None:
        raise Qcow2PassphraseError("Parameter 'encrypt.key-secret' is required for cipher")
    if encrypt_format == "aes":
        return _Encryption(C.CRYPT_AES)
    from .crypto.luks import format_area
    from .crypto.payload import passphrase_bytes

    iter_time = options["encrypt_iter_time"]
    if isinstance(iter_time, bool) or not isinstance(iter_time, int) or iter_time <= 0:
        raise Qcow2FormatError(f"encrypt.iter-time must be a positive integer: {iter_time!r}")
    area, key = format_area(
        passphrase_bytes(passphrase),
        cipher_alg=str(options["encrypt_cipher_alg"]),
        cipher_mode=str(options["encrypt_cipher_mode"]),
        ivgen_alg=str(options["encrypt_ivgen_alg"]),
        ivgen_hash_alg=(
            None
            if options["encrypt_ivgen_hash_alg"] is None
            else str(options["encrypt_ivgen_hash_alg"])
        ),
        hash_alg=str(options["encrypt_hash_alg"]),
        iter_time_ms=iter_time,
    )
    del key  # the new image is unlocked again by whoever opens it
    return _Encryption(C.CRYPT_LUKS, area)


@dataclass
class _Options:
    version: int
    cluster_size: int
    refcount_bits: int
    lazy_refcounts: bool
    compression_type: int
    extended_l2: bool
    backing_file: str | None
    backing_fmt: str | None
    data_file: str | None
    data_file_raw: bool
    preallocation: str
    encryption: _Encryption | None = None


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _validate(
    *,
    compat: str,
    cluster_size: int,
    refcount_bits: int,
    lazy_refcounts: bool,
    compression_type: str,
    extended_l2: bool,
    backing_file: str | None,
    backing_fmt: str | None,
    data_file: str | None,
    data_file_raw: bool,
    preallocation: str,
) -> _Options:
    """The checks of ``qcow2_co_create`` (same order, same conditions)."""
    version = normalize_compat(compat)
    if preallocation not in PREALLOCATION_MODES:
        raise Qcow2FormatError(
            f"Invalid preallocation mode: preallocation={preallocation!r} "
            f"(allowed: {', '.join(PREALLOCATION_MODES)})"
        )
    if compression_type not in COMPRESSION_TYPES:
        raise Qcow2UnsupportedError(
            f"Unknown compression type: compression_type={compression_type!r} (allowed: zlib, zstd)"
        )
    for name, value in (("cluster_size", cluster_size), ("refcount_bits", refcount_bits)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise Qcow2FormatError(f"{name} must be an integer, not {value!r}")
    if extended_l2 and version < 3:
        raise Qcow2FormatError(
            "Extended L2 entries are only supported with compatibility level 1.1 and "
            f"above: extended_l2=on, compat={compat}"
        )
    bits = cluster_size.bit_length() - 1
    if not (_is_pow2(cluster_size) and C.MIN_CLUSTER_BITS <= bits <= C.MAX_CLUSTER_BITS):
        raise Qcow2FormatError(
            "Cluster size must be a power of two between 512 and 2048k: "
            f"cluster_size={cluster_size}"
        )
    if extended_l2 and bits < C.EXTL2_MIN_CLUSTER_BITS:
        raise Qcow2FormatError(
            "Extended L2 entries are only supported with cluster sizes of at least "
            f"16384 bytes: cluster_size={cluster_size}"
        )
    if backing_file is not None and preallocation != "off" and not extended_l2:
        raise Qcow2FormatError(
            "Backing file and preallocation can only be used at the same time if "
            f"extended_l2 is on: preallocation={preallocation}"
        )
    if backing_fmt is not None and backing_file is None:
        raise Qcow2FormatError(
            f"Backing format cannot be used without backing file: backing_fmt={backing_fmt!r}"
        )
    if lazy_refcounts and version < 3:
        raise Qcow2FormatError(
            "Lazy refcounts only supported with compatibility level 1.1 and above: "
            f"lazy_refcounts=on, compat={compat}"
        )
    if refcount_bits > 64 or not _is_pow2(refcount_bits):
        raise Qcow2FormatError(
            "Refcount width must be a power of two and may not exceed 64 bits: "
            f"refcount_bits={refcount_bits}"
        )
    if version < 3 and refcount_bits != 16:
        raise Qcow2FormatError(
            "Different refcount widths than 16 bits require compatibility level 1.1 "
            f"or above: refcount_bits={refcount_bits}, compat={compat}"
        )
    if data_file_raw and data_file is None:
        raise Qcow2FormatError("data-file-raw requires data-file: data_file_raw=on")
    if data_file_raw and backing_file is not None:
        raise Qcow2FormatError(
            "Backing file and data-file-raw cannot be used at the same time: "
            f"backing_file={backing_file!r}"
        )
    if data_file_raw and preallocation == "off":
        # The external file must read as the raw image, so the L1/L2 tables must
        # map it 1:1: QEMU silently upgrades to metadata preallocation.
        preallocation = "metadata"
    if data_file is not None:
        if version < 3:
            raise Qcow2FormatError(
                "External data files are only supported with compatibility level 1.1 "
                f"and above: data_file={data_file!r}, compat={compat}"
            )
        if data_file == "":
            raise Qcow2FormatError("data_file must not be empty")
    ctype = COMPRESSION_TYPES[compression_type]
    if ctype != C.COMPRESSION_ZLIB and version < 3:
        raise Qcow2FormatError(
            "Non-zlib compression type is only supported with compatibility level 1.1 "
            f"and above: compression_type={compression_type}, compat={compat}"
        )
    return _Options(
        version=version,
        cluster_size=cluster_size,
        refcount_bits=refcount_bits,
        lazy_refcounts=lazy_refcounts,
        compression_type=ctype,
        extended_l2=extended_l2,
        backing_file=backing_file,
        backing_fmt=backing_fmt,
        data_file=data_file,
        data_file_raw=data_file_raw,
        preallocation=preallocation,
    )


def backing_size(path: str, backing_file: str, backing_fmt: str) -> int:
    """The size ``bdrv_getlength`` reports for the backing file (sector granularity).

    QEMU opens the backing file (and its chain) to check it is usable, and
    takes its size when none was given: a qcow2 image's virtual size rounded
    down to 512 bytes, a raw file's length rounded up to 512 bytes.
    """
    full = resolve_name(backing_file, path)
    if backing_fmt == "qcow2":
        from .image import Image

        # Only its size is needed: an encrypted backing file opens without its
        # passphrase, as QEMU opens it here (no I/O).
        with Image(full, "r", metadata_only=True) as img:
            return img.size // _SECTOR * _SECTOR
    if backing_fmt in RAW_FORMATS:
        try:
            st = os.stat(full)
        except OSError as exc:
            raise Qcow2IOError(
                f"Could not open backing file {full!r}: {exc.strerror or exc}", exc.errno
            ) from exc
        return _round_up(st.st_size, _SECTOR)
    raise Qcow2UnsupportedError(
        f"Unsupported backing file format: backing_fmt={backing_fmt!r} (use qcow2 or raw)"
    )


def _header(opts: _Options, size: int, *, stub: bool) -> Header:
    """The stub header ``qemu-img create`` opens (size 0, no L1, one refcount table
    cluster; only the features the layout depends on), or the final header's fields
    (the table offsets are filled in from the image once laid out)."""
    cs = opts.cluster_size
    incompat = 0
    if opts.data_file is not None:
        incompat |= C.INCOMPAT_DATA_FILE
    if opts.compression_type != C.COMPRESSION_ZLIB:
        incompat |= C.INCOMPAT_COMPRESSION
    if opts.extended_l2:
        incompat |= C.INCOMPAT_EXTL2
    final = not stub
    luks = final and opts.encryption is not None and opts.encryption.method == C.CRYPT_LUKS
    return Header(
        version=opts.version,
        cluster_bits=cs.bit_length() - 1,
        size=size if final else 0,
        l1_size=0,
        l1_table_offset=0,
        refcount_table_offset=cs,
        refcount_table_clusters=1,
        incompatible_features=incompat,
        compatible_features=C.COMPAT_LAZY_REFCOUNTS if opts.lazy_refcounts and final else 0,
        autoclear_features=C.AUTOCLEAR_DATA_FILE_RAW if opts.data_file_raw and final else 0,
        refcount_order=opts.refcount_bits.bit_length() - 1,
        header_length=C.V3_HEADER_LENGTH if opts.version >= 3 else C.V2_HEADER_LENGTH,
        compression_type=opts.compression_type,
        backing_file=opts.backing_file if final else None,
        backing_format=opts.backing_fmt if final and opts.backing_file is not None else None,
        data_file=opts.data_file,
        crypt_method=(
            opts.encryption.method if final and opts.encryption is not None else C.CRYPT_NONE
        ),
        crypto_area=(cs, len(opts.encryption.area)) if luks and opts.encryption else None,
    )


def _check_layout(opts: _Options, size: int) -> None:
    """What would fail while laying the image out, checked before any file is touched:
    an L1 table beyond QEMU's limit, a header that does not fit in cluster 0."""
    cluster_bits = opts.cluster_size.bit_length() - 1
    l2_bits = cluster_bits - (4 if opts.extended_l2 else 3)
    if size_to_l1(size, cluster_bits, l2_bits) > C.QCOW_MAX_L1_SIZE // 8:
        raise Qcow2FormatError(
            "The image size is too large for file format 'qcow2' (try using a larger "
            f"cluster size): size={size}, cluster_size={opts.cluster_size}"
        )
    if opts.backing_file is not None and len(opts.backing_file.encode()) > C.QCOW_MAX_BACKING_NAME:
        raise Qcow2FormatError(
            f"Could not assign backing file: name longer than {C.QCOW_MAX_BACKING_NAME} "
            f"bytes: backing_file={opts.backing_file!r}"
        )
    try:
        _header(opts, size, stub=False).to_cluster0()
    except Qcow2FormatError as exc:
        raise Qcow2FormatError(
            f"Could not write the header (no space left in cluster 0): {exc}"
        ) from None


def _write_stub(path: str, opts: _Options) -> None:
    """Header (cluster 0) and a refcount table (cluster 1) naming one empty refcount
    block (cluster 2): what ``qemu-img create`` writes before it opens the image."""
    cs = opts.cluster_size
    fb = FileBackend(path, writable=True)
    try:
        fb.pwrite(_header(opts, 0, stub=True).to_cluster0(), 0, "create_write")
        rest = bytearray(2 * cs)
        struct.pack_into(">Q", rest, 0, 2 * cs)
        fb.pwrite(rest, cs, "create_write")
        fb.flush("create_flush")
    finally:
        fb.close()


def _lay_out(path: str, opts: _Options, size: int) -> Header:
    """Open the stub with the driver, count clusters 0-2, resize it to ``size`` with
    the requested preallocation, place the LUKS area; returns the final header."""
    from .image import Image
    from .resize import resize_locked

    img = Image(path, "r+", open_backing=False)
    try:
        alloc = img.meta.allocator
        assert alloc is not None
        if alloc.alloc_clusters(3) != 0:
            raise Qcow2Error("internal error: the stub's first clusters are not free")
        # What Image.resize_sync does (nothing else can use this image yet), also
        # to size 0: QEMU's create resizes the stub even then.
        img._drive_sync(img._flush_steps())
        resize_locked(img, size, opts.preallocation, creating=True)
        hdr = _header(opts, size, stub=False)
        if opts.encryption is not None and opts.encryption.method == C.CRYPT_LUKS:
            # After the resize the area is allocated (whole clusters zeroed) like any
            # other cluster, then the LUKS header and keyslots are written into it.
            area = opts.encryption.area
            cs = opts.cluster_size
            off = alloc.alloc_clusters(_div_round_up(len(area), cs))
            img._file.pwrite(bytes(_round_up(len(area), cs)), off, "create_write")
            img._file.pwrite(area, off, "create_write")
            hdr.crypto_area = (off, len(area))
        mh = img.meta.header
        hdr.l1_size = mh.l1_size
        hdr.l1_table_offset = mh.l1_table_offset
        hdr.refcount_table_offset = mh.refcount_table_offset
        hdr.refcount_table_clusters = mh.refcount_table_clusters
    finally:
        img.close()
    return hdr


# --------------------------------------------------------------------------
# Writing the files
# --------------------------------------------------------------------------
def _create_file(path: str) -> None:
    """file-posix's create: O_CREAT (mode 0644 before umask) and truncate to 0."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise Qcow2IOError(f"Could not create {path!r}: {exc.strerror or exc}", exc.errno) from exc
    try:
        os.ftruncate(fd, 0)
    except OSError as exc:
        raise Qcow2IOError(
            f"Could not truncate {path!r}: {exc.strerror or exc}", exc.errno
        ) from exc
    finally:
        os.close(fd)


def create(
    path: str | os.PathLike[str],
    size: int | None,
    *,
    compat: str = "1.1",
    cluster_size: int = 65536,
    refcount_bits: int = 16,
    lazy_refcounts: bool = False,
    compression_type: str = "zlib",
    extended_l2: bool = False,
    backing_file: str | os.PathLike[str] | None = None,
    backing_fmt: str | None = None,
    data_file: str | os.PathLike[str] | None = None,
    data_file_raw: bool = False,
    preallocation: str = "off",
    encrypt_format: str | None = None,
    passphrase: str | bytes | None = None,
    encrypt_cipher_alg: str = "aes-256",
    encrypt_cipher_mode: str = "xts",
    encrypt_ivgen_alg: str = "plain64",
    encrypt_ivgen_hash_alg: str | None = None,
    encrypt_hash_alg: str = "sha256",
    encrypt_iter_time: int = 2000,
) -> None:
    """Create a qcow2 image with the same bytes as ``qemu-img create -f qcow2 -o ...``.

    Keyword names are qemu-img's ``-o`` option names. ``size`` is in bytes and
    is rounded up to a multiple of 512 like qemu-img does; it may be ``None``
    when ``backing_file`` is given, in which case the backing file's size is
    used. ``compat`` is "0.10"/"v2" or "1.1"/"v3".

    ``backing_file`` is stored exactly as given; a relative name is resolved
    against the new image's folder (as QEMU will resolve it when opening).
    ``backing_fmt`` is required with a backing file (QEMU 7.2 refuses to
    probe), and the backing file must open. ``data_file`` is created (or
    truncated) at the given path, which, as in QEMU, is relative to the
    current directory, and is stored as given in the header (QEMU 7.2 also
    opens a relative data-file name from the current directory, not from the
    image's folder). ``data_file_raw`` implies at least
    ``preallocation="metadata"``.

    ``preallocation``: "off"; "metadata" (L2 tables written and every data
    cluster allocated, but not written); "falloc"/"full" (as metadata, plus
    the data area allocated with ``posix_fallocate`` or written with zeros).

    ``encrypt_format`` "aes" (legacy, QEMU's ``encrypt.format=aes``) or "luks"
    encrypts the guest data with ``passphrase`` (``str`` as UTF-8, or ``bytes``);
    the ``encrypt_*`` options are QEMU's ``encrypt.cipher-alg`` ... ``iter-time``
    (milliseconds of PBKDF2 per keyslot), accepted for LUKS only, with QEMU's
    defaults. The LUKS area is placed as QEMU places it (after the L1 table);
    its random master key, salts and UUID are new, so only those bytes differ
    from what ``qemu-img create`` writes.

    Options are validated before any file is touched; an existing file at
    ``path`` is truncated, and deleted again if the layout fails. Raises
    :class:`~qcow2aio.Qcow2FormatError` for invalid values,
    :class:`~qcow2aio.Qcow2UnsupportedError` for unsupported ones and
    :class:`~qcow2aio.Qcow2IOError` for file errors.
    """
    path = os.fspath(path)
    for name, flag in (
        ("lazy_refcounts", lazy_refcounts),
        ("extended_l2", extended_l2),
        ("data_file_raw", data_file_raw),
    ):
        if not isinstance(flag, bool):
            # bool("off") is True: refuse anything but a real bool.
            raise Qcow2FormatError(f"{name} must be True or False, not {flag!r}")
    bf = os.fspath(backing_file) if backing_file is not None else None
    df = os.fspath(data_file) if data_file is not None else None

    opts = _validate(
        compat=compat,
        cluster_size=cluster_size,
        refcount_bits=refcount_bits,
        lazy_refcounts=lazy_refcounts,
        compression_type=compression_type,
        extended_l2=extended_l2,
        backing_file=bf,
        backing_fmt=backing_fmt,
        data_file=df,
        data_file_raw=data_file_raw,
        preallocation=preallocation,
    )
    if isinstance(passphrase, str | bytes) or passphrase is None:
        pass
    else:
        raise Qcow2FormatError(f"passphrase must be str or bytes, not {type(passphrase).__name__}")
    if bf is not None:
        # bdrv_img_create's checks on the backing file come before the format's.
        if bf == path:
            raise Qcow2FormatError(
                "Trying to create an image with the same filename as the backing file: "
                f"backing_file={bf!r}"
            )
        if bf == "":
            raise Qcow2FormatError("Expected backing file name, got empty string")
        if backing_fmt is None:
            raise Qcow2FormatError(
                f"Backing file specified without backing format: backing_file={bf!r}"
            )
        probed = backing_size(path, bf, backing_fmt)
        if size is None:
            size = probed
    if size is None:
        raise Qcow2FormatError("Image creation needs a size parameter")
    if isinstance(size, bool) or not isinstance(size, int):
        raise Qcow2FormatError(f"size must be an integer number of bytes, not {size!r}")
    if size < 0 or size > C.INT64_MAX:
        raise Qcow2FormatError(
            f"Invalid image size specified: size={size} (must be between 0 and {C.INT64_MAX})"
        )
    size = _round_up(size, _SECTOR)
    if size > C.INT64_MAX:
        raise Qcow2FormatError(f"Invalid image size specified: size={size}")

    opts.encryption = _encryption(
        encrypt_format,
        passphrase,
        {
            "encrypt_cipher_alg": encrypt_cipher_alg,
            "encrypt_cipher_mode": encrypt_cipher_mode,
            "encrypt_ivgen_alg": encrypt_ivgen_alg,
            "encrypt_ivgen_hash_alg": encrypt_ivgen_hash_alg,
            "encrypt_hash_alg": encrypt_hash_alg,
            "encrypt_iter_time": encrypt_iter_time,
        },
    )
    _check_layout(opts, size)
    _create_file(path)
    try:
        if df is not None:
            _create_file(df)
        _write_stub(path, opts)
        hdr = _lay_out(path, opts, size)
        # The final header, written whole over the stub's cluster 0.
        fb = FileBackend(path, writable=True)
        try:
            fb.pwrite(hdr.to_cluster0(), 0, "create_write")
            fb.flush("create_flush")
        finally:
            fb.close()
    except BaseException:
        # QEMU deletes what it created when creation fails.
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
