"""Which of several unexpected options QEMU names: the order of its QAPI input visitor.

When a QAPI struct is given members it does not have, QEMU reports only one,
"Parameter 'x' is unexpected": the first key left in the visitor's GLib hash
table once the known members are consumed. That order comes from two hash
tables in a row: the QDict the options were collected in (see
:func:`qcow2aio.info.qdict`), which the visitor copies twice (``qdict_crumple``),
and GLib's ``GHashTable`` of the keys still to visit. This module replays both
so ``qcow2aio`` names the same option as ``qemu-img`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..info import qdict

__all__ = ["first_unexpected", "visit_order"]

_MIN_SHIFT = 3
# GLib's prime_mod table, by shift.
_PRIME_MOD = (1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093)
_UNUSED = 0
_TOMBSTONE = 1


def _str_hash(key: str) -> int:
    """GLib's ``g_str_hash`` (djb2 over the UTF-8 bytes, as signed chars)."""
    h = 5381
    for byte in key.encode("utf-8", errors="surrogateescape"):
        signed = byte - 256 if byte > 127 else byte
        h = (h * 33 + signed) & 0xFFFFFFFF
    return max(h, 2)  # 0 and 1 mark unused and deleted buckets


class _GHashSet:
    """The bucket layout of a ``GHashTable`` of string keys (GLib 2.74)."""

    def __init__(self) -> None:
        self._set_shift(_MIN_SHIFT)
        self.hashes = [_UNUSED] * self.size
        self.keys: list[str | None] = [None] * self.size
        self.nnodes = 0
        self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _PRIME_MOD[shift]
        self.mask = self.size - 1

    def _lookup(self, key: str, hash_value: int) -> int:
        index = (hash_value * 11 & 0xFFFFFFFF) % self.mod  # guint arithmetic
        step = 0
        tombstone = -1
        while self.hashes[index] != _UNUSED:
            if self.hashes[index] == hash_value and self.keys[index] == key:
                return index
            if self.hashes[index] == _TOMBSTONE and tombstone < 0:
                tombstone = index
            step += 1
            index = (index + step) & self.mask
        return tombstone if tombstone >= 0 else index

    def insert(self, key: str) -> None:
        hash_value = _str_hash(key)
        index = self._lookup(key, hash_value)
        old = self.hashes[index]
        if old >= 2:
            return
        self.hashes[index] = hash_value
        self.keys[index] = key
        self.nnodes += 1
        if old == _UNUSED:  # GLib resizes only when a never-used bucket is taken
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        index = self._lookup(key, _str_hash(key))
        if self.hashes[index] < 2:
            return
        self.hashes[index] = _TOMBSTONE
        self.keys[index] = None
        self.nnodes -= 1
        self._maybe_resize()

    def _maybe_resize(self) -> None:
        too_sparse = self.size > self.nnodes * 4 and self.size > 1 << _MIN_SHIFT
        if too_sparse or self.size <= self.noccupied + self.noccupied // 16:
            self._resize()

    def _resize(self) -> None:
        """``g_hash_table_resize``: new size from the node count, rehashed in place."""
        old_size = self.size
        n = int(self.nnodes * 1.333)
        shift = 0
        while n:
            n >>= 1
            shift += 1
        self._set_shift(max(shift, _MIN_SHIFT))
        if self.size > old_size:
            self.hashes += [_UNUSED] * (self.size - old_size)
            self.keys += [None] * (self.size - old_size)
        placed = [False] * self.size
        for i in range(old_size):
            node_hash = self.hashes[i]
            if node_hash < 2:
                self.hashes[i] = _UNUSED
                continue
            if placed[i]:
                continue
            self.hashes[i] = _UNUSED
            key = self.keys[i]
            self.keys[i] = None
            while True:
                index = (node_hash * 11 & 0xFFFFFFFF) % self.mod
                step = 0
                while placed[index]:
                    step += 1
                    index = (index + step) & self.mask
                placed[index] = True
                replaced_hash, replaced_key = self.hashes[index], self.keys[index]
                self.hashes[index], self.keys[index] = node_hash, key
                if replaced_hash < 2:
                    break
                node_hash, key = replaced_hash, replaced_key
        if self.size < old_size:
            del self.hashes[self.size :], self.keys[self.size :]
        self.noccupied = self.nnodes

    def iteration(self) -> list[str]:
        return [k for h, k in zip(self.hashes, self.keys, strict=True) if h >= 2 and k]


def visit_order(keys: Iterable[str], copies: int) -> list[str]:
    """The order of ``keys`` (inserted in this order) after ``copies`` QDict copies."""
    order = list(keys)
    for _ in range(copies):
        order = list(qdict((k, None) for k in order))
    return order


def first_unexpected(members: Sequence[str], consumed: Iterable[str]) -> str | None:
    """The member ``check_struct`` reports: the visitor's hash table holds ``members``
    (inserted in this order); the visit removed ``consumed``."""
    table = _GHashSet()
    for key in members:
        table.insert(key)
    for key in consumed:
        table.remove(key)
    left = table.iteration()
    return left[0] if left else None
