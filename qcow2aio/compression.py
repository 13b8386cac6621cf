"""Cluster compression as QEMU does it: raw deflate (4 KiB window) and zstd.

Compression (:func:`compress_cluster`) produces what QEMU writes for ``write -c``:
raw deflate with a 4 KiB window (wbits -12, default level) or one zstd frame.
A cluster whose compressed form would not be at least two bytes smaller than the
cluster is not compressed at all (QEMU 7.2, observed with ``qemu-img convert -c``:
a 64 KiB cluster deflating to 65534 bytes is stored compressed, to 65535 bytes as a
normal cluster), so the caller writes it as a normal cluster instead.

Decompression always yields exactly one cluster or fails: the output is bounded
by the cluster size (no decompression bomb can grow memory), trailing bytes
after the stream are ignored (the L2 descriptor rounds the size up to whole
sectors, so they belong to the next compressed cluster), and a stream that
ends early is corruption.
"""

from __future__ import annotations

import zlib

import zstandard

from . import constants as C
from .errors import Qcow2CorruptError, Qcow2UnsupportedError


def compress_cluster(
    data: bytes | bytearray | memoryview, cluster_size: int, ctype: int
) -> bytes | None:
    """``data`` (one whole cluster) compressed as QEMU stores it, or None when the
    result would not be smaller than ``cluster_size - 1`` (stored uncompressed).

    Pure computation on the caller's bytes: zlib and zstd release the GIL, so it may
    run in any thread without touching image state.
    """
    if len(data) != cluster_size:
        raise ValueError(
            f"compress_cluster needs one whole cluster ({cluster_size} bytes), got {len(data)}"
        )
    if ctype == C.COMPRESSION_ZLIB:
        obj = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        out = obj.compress(data) + obj.flush()
    elif ctype == C.COMPRESSION_ZSTD:
        out = zstandard.ZstdCompressor().compress(data)
    else:
        raise Qcow2UnsupportedError(f"Unknown compression type: compression_type={ctype}")
    if len(out) >= cluster_size - 1:
        return None
    return out


def decompress_cluster(data: bytes, cluster_size: int, ctype: int, where: str) -> bytes:
    """Inflate ``data`` into exactly ``cluster_size`` bytes; ``where`` names the cluster."""
    if ctype == C.COMPRESSION_ZLIB:
        try:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        except zlib.error as exc:
            raise Qcow2CorruptError(
                f"zlib data of compressed cluster {where} is invalid: {exc}"
            ) from exc
    elif ctype == C.COMPRESSION_ZSTD:
        out = _zstd_decompress(data, cluster_size, where)
    else:
        raise Qcow2UnsupportedError(f"Unknown compression type: compression_type={ctype}")
    if len(out) != cluster_size:
        raise Qcow2CorruptError(
            f"compressed cluster {where} inflates to {len(out)} bytes, not cluster_size "
            f"{cluster_size}"
        )
    return out


def _zstd_decompress(data: bytes, cluster_size: int, where: str) -> bytes:
    # QEMU keeps decompressing frame after frame until the cluster is full.
    dctx = zstandard.ZstdDecompressor()
    parts: list[bytes] = []
    have = 0
    rest = data
    while have < cluster_size and rest:
        obj = dctx.decompressobj()
        try:
            chunk = obj.decompress(rest)
        except zstandard.ZstdError as exc:
            raise Qcow2CorruptError(
                f"zstd data of compressed cluster {where} is invalid: {exc}"
            ) from exc
        if not chunk and not obj.eof:
            break
        parts.append(chunk[: cluster_size - have])
        have += len(parts[-1])
        rest = obj.unused_data if obj.eof else b""
    return b"".join(parts)
