"""A bounded least-recently-used cache of metadata tables.

Entries are keyed by their host offset (like QEMU's Qcow2Cache). The cache does
not know how to write an entry back: when it must drop a dirty entry it calls
the owner's ``writeback`` hook, which applies the write-ordering rules (for an
L2 table: refcount blocks and data durable first). Callers never keep a table
across another cache operation; they look it up again, so an eviction cannot
leave them modifying a table that is no longer cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Generic, Protocol, TypeVar


class CacheEntry(Protocol):
    offset: int
    dirty: bool


T = TypeVar("T", bound=CacheEntry)


class LRUCache(Generic[T]):
    """At most ``capacity`` tables; dirty ones are written back before they are dropped."""

    def __init__(self, capacity: int, writeback: Callable[[T], None]) -> None:
        self.capacity = max(1, capacity)
        self._writeback = writeback
        self._items: OrderedDict[int, T] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, offset: int) -> bool:
        return offset in self._items

    def get(self, offset: int) -> T | None:
        item = self._items.get(offset)
        if item is not None:
            self._items.move_to_end(offset)
        return item

    def peek(self, offset: int) -> T | None:
        """Look up without touching the LRU order (for overlap checks)."""
        return self._items.get(offset)

    def insert(self, item: T) -> None:
        self._items[item.offset] = item
        self._items.move_to_end(item.offset)
        self._evict()

    def _evict(self) -> None:
        while len(self._items) > self.capacity:
            # Prefer the least recently used clean entry (never the one just used);
            # write back a dirty one only when every older entry is dirty.
            victim: T | None = None
            for cand in islice(self._items.values(), len(self._items) - 1):
                if not cand.dirty:
                    victim = cand
                    break
            if victim is None:
                victim = next(iter(self._items.values()))
                self._writeback(victim)
            self._items.pop(victim.offset, None)

    def discard(self, offset: int) -> None:
        self._items.pop(offset, None)

    def values(self) -> Iterator[T]:
        return iter(list(self._items.values()))

    def dirty(self) -> list[T]:
        return [t for t in self._items.values() if t.dirty]

    def clear(self) -> None:
        self._items.clear()
