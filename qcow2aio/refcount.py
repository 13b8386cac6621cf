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

    def is_empty(self) -> bool:
        return not any(self.data)

    def to_bytes(self) -> bytes:
        return bytes(self.data)
