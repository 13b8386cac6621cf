"""Refcount blocks of every width QEMU supports (1 to 64 bits per entry).

Widths of 8 bits and more are big-endian integers; 1, 2 and 4-bit entries are
packed least-significant-first inside each byte (qcow2.txt). A block keeps its
bytes in a ``bytearray`` and decodes one entry at a time: refcount blocks are
touched one entry per cluster allocated, so decoding whole blocks would cost
more than it saves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RefcountBlock:
    """One refcount block: ``cluster_size * 8 / refcount_bits`` entries."""

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
