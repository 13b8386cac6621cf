"""The metadata half of compressed writes (QEMU's ``write -c``/``qemu-img convert -c``).

A compressed write works cluster by cluster, like a normal write step
(:mod:`qcow2aio.writes`), with the same phases and the same ordering:

1. the cluster is compressed (:func:`qcow2aio.compression.compress_cluster`) before
   any lock is taken: pure CPU, in a thread on the async path;
2. :func:`prepare_compressed`, under the metadata lock: wait for an in-flight
   allocation of the same guest cluster (the in-flight list), refuse a cluster that
   is already allocated (QEMU 7.2 fails such a write with EIO; unallocated and
   zero clusters are fine), take the bytes from the allocator's compressed-space
   packing (:meth:`Allocator.alloc_bytes`: refcounts are counted here, before any
   link) and record an :class:`~qcow2aio.inflight.L2Meta`;
3. the driver writes the compressed bytes without the lock (data before link);
4. :func:`qcow2aio.writes.commit_step` links the compressed descriptor (or
   :func:`~qcow2aio.writes.abort_step` gives the bytes back).

A cluster that does not compress enough is written as a normal cluster by the
driver instead (QEMU does the same, and then does not refuse allocated clusters).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from . import constants as C
from .errors import Qcow2IOError, Qcow2RangeError, Qcow2UnsupportedError
from .inflight import L2Meta
from .writes import Link, WriteStep, _entry, _host_of, l2_for_write

if TYPE_CHECKING:
    from .image import Image


def check_compressed_write(img: Image, offset: int, length: int) -> None:
    """Refuse what QEMU refuses (or what we refuse on purpose), before any change.

    Whole clusters only; the image's last cluster may be partial when the write
    runs to the end of the image (QEMU: ``Invalid argument`` otherwise). Refused:
    an external data file (QEMU: ``Operation not supported``) and encrypted
    images (QEMU 7.2 accepts these but stores the compressed cluster *unencrypted*
    in the encrypted image; we refuse rather than leak plaintext).
    """
    meta = img.meta
    cs = meta.cluster_size
    if meta.has_data_file:
        raise Qcow2UnsupportedError(
            f"compressed writes are not supported with an external data file "
            f"(data_file={meta.header.data_file!r})"
        )
    if img.encrypted:
        raise Qcow2UnsupportedError(
            f"compressed writes to an encrypted image are refused "
            f"(crypt_method={meta.header.crypt_method}): QEMU 7.2 would store them unencrypted"
        )
    if offset & (cs - 1):
        raise Qcow2RangeError(
            f"compressed write offset={offset} is not a multiple of cluster_size={cs}"
        )
    if length & (cs - 1) and offset + length != img.size:
        raise Qcow2RangeError(
            f"compressed write length={length} is not a multiple of cluster_size={cs} "
            f"and does not end at the end of the image (size={img.size})"
        )


def compressed_entry(host: int, size: int, cluster_bits: int) -> int:
    """The L2 entry of ``size`` compressed bytes at byte offset ``host``: the count
    field holds the 512-byte sectors the bytes touch beyond the first (spec)."""
    x = 62 - (cluster_bits - 8)
    extra = ((host + size - 1) >> 9) - (host >> 9)
    return C.QCOW_OFLAG_COMPRESSED | (extra << x) | host


def prepare_compressed(img: Image, guest: int, payload: bytes) -> WriteStep | L2Meta:
    """Allocate room for one compressed cluster at guest ``guest`` (cluster aligned)
    and plan its link, or return the in-flight allocation to wait for first.

    Runs under the metadata lock. Raises Qcow2IOError (EIO, as QEMU) when the guest
    cluster is allocated (data, compressed, or an allocated zero cluster); nothing
    is allocated then.
    """
    meta = img.meta
    cs = meta.cluster_size
    cb = meta.cluster_bits
    _, wait = img.inflight.conflict(guest, cs)
    if wait is not None:
        return wait
    table = l2_for_write(img, guest >> (cb + meta.l2_bits))
    idx = (guest >> cb) & (meta.l2_entries - 1)
    entry, bitmap = _entry(table.entries, idx, meta.extended_l2)
    if entry & C.QCOW_OFLAG_COMPRESSED or _host_of(img, entry) is not None:
        raise Qcow2IOError(
            f"compressed write at guest offset {guest:#x}: the cluster is already allocated "
            f"(L2 entry {entry:#018x})",
            errno.EIO,
        )
    alloc = meta.allocator
    assert alloc is not None
    size = len(payload)
    host = alloc.alloc_bytes(size)
    try:
        meta.check_data_write(host, size)
    except BaseException:
        alloc.free_bytes_now(host, size)
        raise
    # A compressed cluster read earlier may have lived at these very bytes (freed and
    # reused): its inflated copy must not answer for the new one.
    img._compressed_cache = None
    step = WriteStep(guest, cs, host, alloc=(host, size))
    step.links.append(Link(guest, entry, bitmap, compressed_entry(host, size, cb), 0))
    m = L2Meta(
        guest_start=guest,
        nb_clusters=1,
        host_start=host,
        cow_start=(guest, 0),
        cow_end=(guest + cs, 0),
    )
    img.inflight.add(m)
    step.meta = m
    return step
