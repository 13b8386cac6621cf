"""Where metadata lives in the image file, for QEMU-style overlap checks.

Before guest data or a metadata table is written, the target clusters are
checked against this map (QEMU's ``qcow2_pre_write_overlap_check`` at its
default "cached" level: header, active L1, active L2 tables, refcount table
and blocks, snapshot table, snapshot L1 tables). Single-cluster tables (L2
tables, refcount blocks: many, often added and dropped) are kept in a dict by
cluster index; multi-cluster tables (few, possibly huge: a 32 MiB L1 on 512 B
clusters is 65536 clusters) as sorted intervals, so neither memory nor open
time grows with a table's size.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator


class MetaMap:
    def __init__(self, cluster_bits: int) -> None:
        self.cluster_bits = cluster_bits
        self.clusters: dict[int, str] = {}
        self._starts: list[int] = []  # byte offsets, sorted
        self._ranges: list[tuple[int, int, str]] = []  # (start, end, kind), same order

    def __bool__(self) -> bool:
        return bool(self.clusters or self._ranges)

    def clear(self) -> None:
        self.clusters.clear()
        self._starts.clear()
        self._ranges.clear()

    def add(self, offset: int, length: int, kind: str) -> None:
        if length <= 0:
            return
        cb = self.cluster_bits
        first = offset >> cb
        last = (offset + length - 1) >> cb
        if first == last:
            self.clusters[first] = kind
            return
        start, end = first << cb, (last + 1) << cb
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._ranges.insert(i, (start, end, kind))

    def add_many(self, items: list[tuple[int, int, str]]) -> None:
        """Add many ``(offset, length, kind)`` at once: one sort instead of n inserts."""
        cb = self.cluster_bits
        for offset, length, kind in items:
            if length <= 0:
                continue
            first = offset >> cb
            last = (offset + length - 1) >> cb
            if first == last:
                self.clusters[first] = kind
            else:
                self._ranges.append((first << cb, (last + 1) << cb, kind))
        self._ranges.sort()
        self._starts = [r[0] for r in self._ranges]

    def remove(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        cb = self.cluster_bits
        first = offset >> cb
        last = (offset + length - 1) >> cb
        if first == last:
            self.clusters.pop(first, None)
            return
        start = first << cb
        i = bisect.bisect_left(self._starts, start)
        while i < len(self._starts) and self._starts[i] == start:
            del self._starts[i]
            del self._ranges[i]

    def kinds_in(self, offset: int, length: int) -> Iterator[str]:
        """The kinds of metadata overlapping bytes ``[offset, offset+length)``."""
        if length <= 0:
            return
        cb = self.cluster_bits
        first = offset >> cb
        last = (offset + length - 1) >> cb
        if last - first < 64 or last - first < len(self.clusters):
            for c in range(first, last + 1):
                kind = self.clusters.get(c)
                if kind is not None:
                    yield kind
        else:
            for c, kind in self.clusters.items():
                if first <= c <= last:
                    yield kind
        end = offset + length
        i = bisect.bisect_right(self._starts, offset) - 1
        # Ranges may nest in a corrupt image: walk back over any that still reach us.
        j = i
        while j >= 0:
            _, e, kind = self._ranges[j]
            if e > offset:
                yield kind
            j -= 1
            if j >= 0 and i - j > 64:
                break
        i += 1
        while i < len(self._ranges) and self._ranges[i][0] < end:
            yield self._ranges[i][2]
            i += 1

    def only(self, offset: int, length: int, kind: str) -> str | None:
        """None when every byte of the range lies in metadata of ``kind``, else the culprit."""
        if length <= 0:
            return None
        cb = self.cluster_bits
        first = offset >> cb
        last = (offset + length - 1) >> cb
        if first == last and self.clusters.get(first) == kind:
            return None
        covered = False
        i = bisect.bisect_right(self._starts, offset) - 1
        if i >= 0:
            s, e, k = self._ranges[i]
            covered = k == kind and s <= offset and offset + length <= e
        if not covered:
            return next(iter(k for k in self.kinds_in(offset, length) if k != kind), "data")
        other = next(iter(k for k in self.kinds_in(offset, length) if k != kind), None)
        return other
