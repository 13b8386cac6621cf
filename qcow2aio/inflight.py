"""The in-flight allocation list: QEMU's ``QCowL2Meta`` entries on ``cluster_allocs``.

Between allocating clusters (under the metadata lock) and linking them into
L2 (under the lock again), an allocating write moves its data without the
lock. Its :class:`L2Meta` on this list tells every other request that the
guest clusters it covers are in transition: the L2 entry still shows the old
mapping while the new cluster is being filled. Writes, write-zeroes and
discards that touch such a cluster wait for it and then map again from
scratch; a request that merely *starts* before one is shortened to stop
there, so two requests never wait on each other. Dependencies are tracked
per cluster, like QEMU's. Unlike QEMU 7.2 there is no exception for in-place
updates whose COW regions look disjoint: a second in-place update of the same
cluster would plan its COW from the stale zero flag, so it waits too.

The list itself changes only under the image's metadata lock. Waiting for an
entry happens outside it, from any thread or loop: ``finish`` (under the lock,
in whichever thread links) wakes each waiter in its own loop or thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .lock import Wakeup

# Guards every L2Meta's done flag and waiter list (waits are rare: one lock for all).
_WAIT_MUTEX = threading.Lock()


@dataclass(eq=False)
class L2Meta:
    """One allocation in flight.

    ``guest_start``/``nb_clusters`` give the guest clusters (cluster aligned);
    ``cow_start``/``cow_end`` the guest byte ranges filled from the old
    content. ``keep_old`` marks an in-place update of an already allocated
    cluster (only its zero flag or subcluster bits change).
    """

    guest_start: int
    nb_clusters: int
    host_start: int
    cow_start: tuple[int, int]
    cow_end: tuple[int, int]
    keep_old: bool = False
    cluster_size: int = 0
    _waiters: list[Wakeup] = field(default_factory=list)
    done: bool = False

    @property
    def span(self) -> tuple[int, int]:
        """Guest bytes this allocation blocks: whole clusters."""
        return self.guest_start, self.guest_start + self.nb_clusters * self.cluster_size

    def _waiter(self) -> Wakeup | None:
        with _WAIT_MUTEX:
            if self.done:
                return None
            w = Wakeup()
            self._waiters.append(w)
            return w

    async def wait(self) -> None:
        """Until linked or aborted, in a coroutine of any loop (cancellable)."""
        w = self._waiter()
        if w is not None:
            await w.wait_async()

    def wait_blocking(self, timeout: float) -> bool:
        """Until linked or aborted, in a thread without a loop; False after ``timeout``."""
        w = self._waiter()
        return w is None or w.wait_blocking(timeout)

    def finish(self) -> None:
        with _WAIT_MUTEX:
            self.done = True
            waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.wake()


class InflightList:
    """All allocations of one image that are between allocation and L2 linking."""

    def __init__(self, cluster_size: int) -> None:
        self.cluster_size = cluster_size
        self.items: list[L2Meta] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, meta: L2Meta) -> None:
        meta.cluster_size = self.cluster_size
        self.items.append(meta)

    def remove(self, meta: L2Meta) -> None:
        # Idempotent: an abort after a failed link must not remove twice (QEMU iotest 305).
        if meta in self.items:
            self.items.remove(meta)
        meta.finish()

    def conflict(self, start: int, length: int) -> tuple[int, L2Meta | None]:
        """How much of ``[start, start+length)`` may proceed now.

        Returns ``(length, None)`` when nothing conflicts, ``(shorter, None)``
        when the request must stop before an in-flight allocation, and
        ``(0, meta)`` when it must wait for ``meta`` and map again.
        """
        cs = self.cluster_size
        end = start + length
        # Cluster granularity, as in QEMU.
        a = start & ~(cs - 1)
        b = (end + cs - 1) & ~(cs - 1)
        for m in self.items:
            ms, me = m.span
            if me <= a or b <= ms:
                continue
            if start < ms:
                end = min(end, ms)
                b = (end + cs - 1) & ~(cs - 1)
                continue
            return 0, m
        return end - start, None

    def overlapping(self, start: int, length: int) -> L2Meta | None:
        """Any allocation touching the clusters of the range (for discard/zeroes/sync path)."""
        cs = self.cluster_size
        a = start & ~(cs - 1)
        b = (start + length + cs - 1) & ~(cs - 1)
        for m in self.items:
            ms, me = m.span
            if ms < b and a < me:
                return m
        return None


class NoInflightList(InflightList):
    """Tracks nothing, so nothing ever waits: for ``qcow2aio.testing.unserialized()`` only."""

    def add(self, meta: L2Meta) -> None:
        meta.cluster_size = self.cluster_size

    def conflict(self, start: int, length: int) -> tuple[int, L2Meta | None]:
        return length, None

    def overlapping(self, start: int, length: int) -> L2Meta | None:
        return None
