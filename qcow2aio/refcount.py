"""The refcount codec: refcount blocks of every width QEMU supports (1 to 64 bits).

This module is the one place that knows how refcount entries are packed
(qcow2.txt): widths of 8 bits and more are big-endian integers; 1, 2 and 4-bit
entries are packed least-significant-first inside each byte.

Two access patterns, one encoding:

* :class:`RefcountBlock` keeps a block's bytes in a ``bytearray`` and decodes
  one entry at a time. The write path touches one entry per cluster it
  allocates or frees, so decoding whole blocks would cost more than it saves.
* :func:`decode_entries` / :func:`encode_entries` convert a whole block (or a
  prefix of one) to and from a native ``array``, for ``check``, which compares
  every refcount of the image with its reference count and rebuilds blocks from
  scratch. They use C-level conversions (``array.byteswap``,
  ``bytes.translate``), so a whole block costs a few buffer passes rather than
  one Python call per entry.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass

__all__ = ["RefcountBlock", "decode_entries", "encode_entries", "entry_typecode"]

_SWAP = sys.byteorder == "little"


def entry_typecode(order: int) -> str:
    """The narrowest ``array`` type holding refcounts of ``1 << order`` bits."""
    if order <= 3:
        return "B"
    width = 1 << (order - 3)
    for code in ("H", "I", "L", "Q"):
        if array(code).itemsize == width:
            return code
    raise AssertionError(f"no array type of {width} bytes")


def _unpack_tables(order: int) -> list[bytes]:
    """For sub-byte entries: one ``bytes.translate`` table per entry slot of a byte."""
    bits = 1 << order
    mask = (1 << bits) - 1
    return [bytes((b >> (j * bits)) & mask for b in range(256)) for j in range(8 >> order)]


def _pack_tables(order: int) -> list[bytes]:
    bits = 1 << order
    return [bytes((b << (j * bits)) & 0xFF for b in range(256)) for j in range(8 >> order)]


_UNPACK = {order: _unpack_tables(order) for order in range(3)}
_PACK = {order: _pack_tables(order) for order in range(3)}


def decode_entries(data: bytes | bytearray | memoryview, order: int) -> array[int]:
    """Refcount block bytes -> a native ``array`` of its entries (``len(data) * 8 >> order``).

    The array's type is :func:`entry_typecode` of ``order``.
    """
    out: array[int] = array(entry_typecode(order))
    if order >= 3:
        out.frombytes(data)
        if _SWAP and out.itemsize > 1:
            out.byteswap()
        return out
    per = 8 >> order
    raw = bytes(data)
    vals = bytearray(len(raw) * per)
    for j, table in enumerate(_UNPACK[order]):
        vals[j::per] = raw.translate(table)
    out.frombytes(vals)
    return out


def encode_entries(entries: array[int], order: int, nbytes: int) -> bytes:
    """Native refcount entries -> refcount block bytes, zero padded or cut to ``nbytes``.

    ``entries`` holds values that fit ``1 << order`` bits, in an array of
    :func:`entry_typecode` of ``order``.
    """
    if order >= 3:
        arr: array[int] = array(entries.typecode, entries)
        if _SWAP and arr.itemsize > 1:
            arr.byteswap()
        raw = arr.tobytes()
    else:
        per = 8 >> order
        vals = entries.tobytes()
        vals += bytes(-len(vals) % per)
        n = len(vals) // per
        acc = 0
        for j, table in enumerate(_PACK[order]):
            acc |= int.from_bytes(vals[j::per].translate(table), "big")
        raw = acc.to_bytes(n, "big") if n else b""
    if len(raw) < nbytes:
        raw += bytes(nbytes - len(raw))
    return raw[:nbytes]


@dataclass(slots=True)
class RefcountBlock:
    """One refcount block: ``cluster_size * 8 / refcount_bits`` entries.

    ``get``/``set`` are the per-entry half of the codec (the same packing as
    :func:`decode_entries`; ``tests/test_refcount_runs.py`` holds them to it).
    """

    offset: int
    data: bytearray
    order: int
    dirty: bool = False
    fresh: bool = False  # allocated and never written yet ("refblock_alloc")

    @property
    def entries(self) -> int:
        return len(self.data) * 8 >> self.order

    def get(self, index: int) -> int:
        order = self.order
        if order >= 3:
            width = 1 << (order - 3)
            start = index * width
            return int.from_bytes(self.data[start : start + width], "big")
        bits = 1 << order
        bitpos = index * bits
        return (self.data[bitpos >> 3] >> (bitpos & 7)) & ((1 << bits) - 1)

    def set(self, index: int, value: int) -> None:
        order = self.order
        if order >= 3:
            width = 1 << (order - 3)
            start = index * width
            self.data[start : start + width] = value.to_bytes(width, "big")
        else:
            bits = 1 << order
            bitpos = index * bits
            mask = ((1 << bits) - 1) << (bitpos & 7)
            b = self.data[bitpos >> 3]
            self.data[bitpos >> 3] = (b & ~mask) | ((value << (bitpos & 7)) & mask)
        self.dirty = True

    def entry_span(self, index: int) -> tuple[int, int]:
        """The byte range ``[start, end)`` of ``data`` that holds entry ``index`` (what a
        one-entry update must write: the whole byte for sub-byte entries)."""
        order = self.order
        if order >= 3:
            width = 1 << (order - 3)
            return index * width, (index + 1) * width
        byte = (index << order) >> 3
        return byte, byte + 1

    def decode(self, count: int | None = None) -> array[int]:
        """The first ``count`` entries (all by default) as a native array."""
        if count is None:
            return decode_entries(self.data, self.order)
        nbytes = ((count << self.order) + 7) >> 3
        return decode_entries(memoryview(self.data)[:nbytes], self.order)[:count]

    def is_free_run(self, index: int, n: int) -> bool:
        """True when entries ``[index, index + n)`` are all zero (one slice test for
        byte-wide and wider entries: an allocation checks its whole run at once)."""
        order = self.order
        if order >= 3:
            width = 1 << (order - 3)
            return not any(self.data[index * width : (index + n) * width])
        return not any(self.get(i) for i in range(index, index + n))

    def set_run(self, index: int, n: int, value: int) -> None:
        """Set entries ``[index, index + n)`` to ``value`` (one slice assignment when
        entries are whole bytes, as a run of new clusters all get refcount 1)."""
        order = self.order
        if order >= 3:
            width = 1 << (order - 3)
            self.data[index * width : (index + n) * width] = value.to_bytes(width, "big") * n
            self.dirty = True
            return
        for i in range(index, index + n):
            self.set(i, value)

    def to_bytes(self) -> bytes:
        return bytes(self.data)
