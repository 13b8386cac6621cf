"""Block status down a backing chain: what ``qemu-img map`` reports, and what the
movers (convert, commit, rebase, compare, measure) and the NBD export ask.

One walk serves them all. For each layer it takes that layer's read plan from the
one mapping path (:func:`qcow2aio.mapping.map_read`, asked to report unallocated
ranges as such even at the bottom of the chain) and descends into the backing file
only for the ranges the layer leaves unallocated, so a 1 TiB sparse image costs one
step per empty L2 range, not per cluster. A raw layer answers from the file
system's record of data and holes (``SEEK_DATA``/``SEEK_HOLE``), as QEMU's file
driver does.

The records are QEMU's (observed with ``qemu-img map --output=json``, 7.2):

* ``depth`` is the layer that answered; a range no layer allocates reports the
  bottom layer's depth, and a range past the end of a shorter backing file the
  depth of the layer whose backing file ended.
* ``present`` is "allocated in some layer" (a raw layer is allocated everywhere
  inside its size); ``zero`` and ``data`` say how it reads.
* ``offset`` is where the bytes lie in the layer's file (its external data file
  when it has one) for data and for allocated zero clusters; never for compressed
  or encrypted clusters, whose bytes cannot be read in place.
* A metadata-preallocated image (see :func:`_looks_preallocated`) reports data
  clusters lying in holes of its file as ``zero`` too.
* Adjacent runs merge when every field agrees and their offsets are contiguous.

The plans are taken under each layer's metadata lock, one layer at a time (see
:meth:`Image._plan_sync`): the answer describes each layer as it was at that
moment, exactly what a concurrent ``qemu-img map`` of an image in use promises.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .io import to_thread
from .mapping import BACKING, COMPRESSED, DATA, ZERO, Extent

if TYPE_CHECKING:
    from typing import TypeAlias

    from .backing import RawImage
    from .image import Image

    Layer: TypeAlias = Image | RawImage


@dataclass(slots=True)
class Status:
    """One run of block status, with ``qemu-img map --output=json``'s fields."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None
    compressed: bool = False
    # The file the bytes lie in (a layer's image file or its external data file),
    # as the human-readable map names it; None where no file holds them.
    filename: str | None = None

    def record(self) -> dict[str, Any]:
        """The JSON record ``qemu-img map --output=json`` prints for this run."""
        rec: dict[str, Any] = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
        }
        if self.offset is not None:
            rec["offset"] = self.offset
        return rec

    def _joins(self, nxt: Status) -> bool:
        if (
            self.start + self.length != nxt.start
            or self.depth != nxt.depth
            or self.present != nxt.present
            or self.zero != nxt.zero
            or self.data != nxt.data
            or self.compressed != nxt.compressed
            or self.filename != nxt.filename
            or (self.offset is None) != (nxt.offset is None)
        ):
            return False
        return self.offset is None or nxt.offset == self.offset + self.length


def _add(out: list[Status], st: Status) -> None:
    if out and out[-1]._joins(st):
        out[-1].length += st.length
    else:
        out.append(st)


def _raw_status(layer: RawImage, offset: int, length: int, depth: int, out: list[Status]) -> None:
    for start, n, is_data in layer.data_runs(offset, length):
        _add(out, Status(start, n, depth, True, not is_data, is_data, start, False, layer.path))


# Per open image: does it look metadata-preallocated? (Decided once, as QEMU does.)
_PREALLOCATED: weakref.WeakKeyDictionary[Image, bool] = weakref.WeakKeyDictionary()


def _looks_preallocated(layer: Image) -> bool:
    """QEMU's metadata-preallocation test, as observed: an image whose clusters with
    a refcount outnumber the clusters its file really occupies (``st_blocks``) by
    more than a ninth, and by more than two, was preallocated with holes; its data
    clusters that lie in holes of the file then report ``zero`` as well as ``data``.
    An image with an external data file never does (its data are elsewhere)."""
    known = _PREALLOCATED.get(layer)
    if known is None:
        known = False
        if layer.data_file_path is None:
            cs = layer.cluster_size
            real = os.fstat(layer._file.fd).st_blocks * 512 // cs
            threshold = max(real * 10 // 9, real + 2)
            known = layer._count_refcounted(threshold) > threshold
        _PREALLOCATED[layer] = known
    return known


def _data(layer: Image, ext: Extent, depth: int, name: str, out: list[Status]) -> None:
    if layer.header.crypt_method:  # encrypted: the bytes cannot be read in place
        _add(out, Status(ext.guest, ext.length, depth, True, False, True, None, False, name))
        return
    if not _looks_preallocated(layer):
        st = Status(ext.guest, ext.length, depth, True, False, True, ext.host, False, name)
        _add(out, st)
        return
    for host, n, is_data in layer._file.data_runs(ext.host, ext.length):
        guest = ext.guest + host - ext.host
        _add(out, Status(guest, n, depth, True, not is_data, True, host, False, name))


def _walk(layer: Layer, offset: int, length: int, depth: int, out: list[Status]) -> None:
    from .backing import RawImage

    if isinstance(layer, RawImage):
        _raw_status(layer, offset, length, depth, out)
        return
    plan = layer._plan_sync(offset, length, unallocated=BACKING)
    in_place = layer.header.crypt_method == 0
    data_name = layer.data_file_path or layer.path
    below = layer.backing
    for ext in plan:
        if ext.kind == DATA:
            _data(layer, ext, depth, data_name, out)
        elif ext.kind == ZERO:
            off = ext.host if ext.host and in_place else None
            name = data_name if off is not None else None
            _add(out, Status(ext.guest, ext.length, depth, True, True, False, off, False, name))
        elif ext.kind == COMPRESSED:
            _add(out, Status(ext.guest, ext.length, depth, True, False, True, None, True, None))
        else:  # unallocated here: the backing file answers, inside its size
            start, end = ext.guest, ext.guest + ext.length
            if below is not None and start < below.size:
                inside = min(end, below.size)
                _walk(below, start, inside - start, depth + 1, out)
                start = inside
            if start < end:  # nothing below: unallocated (in an allocated cluster?)
                off = ext.host + (start - ext.guest) if ext.host and in_place else None
                st = Status(start, end - start, depth, False, True, False, off)
                st.filename = data_name if off is not None else None
                _add(out, st)


def block_status(img: Layer, offset: int = 0, length: int | None = None) -> list[Status]:
    """Block status of guest ``[offset, offset+length)`` (to the end of the disk by
    default), merged into runs as ``qemu-img map`` prints them. Synchronous: it
    takes each layer's metadata lock only to plan, never awaiting in between."""
    if length is None:
        length = img.size - offset
    if offset < 0 or length < 0 or offset + length > img.size:
        from .errors import Qcow2RangeError

        raise Qcow2RangeError(
            f"block status of {length} bytes at offset {offset} is outside the disk "
            f"({img.size} bytes)"
        )
    out: list[Status] = []
    if length:
        _walk(img, offset, length, 0, out)
    return out


async def block_status_async(
    img: Layer, offset: int = 0, length: int | None = None
) -> list[Status]:
    """:func:`block_status` for a coroutine: the walk runs on a worker thread, where
    waiting for a layer's lock (held by a request of this very loop) is allowed."""
    return await to_thread(block_status, img, offset, length)
