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

Encrypted images add a second list, :class:`SectorRanges`: sectors are encrypted
whole, so a sub-sector write reads its partial sectors, merges and writes them back.
Like QEMU's *serialising* tracked requests, it excludes every write, write-zeroes and
discard overlapping its sectors from its read until its write-back is linked, or it
would write back bytes another request changed meanwhile.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .lock import Wakeup

# Guards every L2Meta's done flag and waiter list (waits are rare: one lock for all).
_WAIT_MUTEX = threading.Lock()


class Completion:
    """Something in flight that other requests wait for, from any loop or thread
    (subclasses provide ``_waiters`` and ``done``)."""

    _waiters: list[Wakeup]
    done: bool

    def _waiter(self) -> Wakeup | None:
        with _WAIT_MUTEX:
            if self.done:
                return None
            w = Wakeup()
            self._waiters.append(w)
            return w

    async def wait(self) -> None:
        """Until finished, in a coroutine of any loop (cancellable)."""
        w = self._waiter()
        if w is not None:
            await w.wait_async()

    def wait_blocking(self, timeout: float) -> bool:
        """Until finished, in a thread without a loop; False after ``timeout``."""
        w = self._waiter()
        return w is None or w.wait_blocking(timeout)

    def finish(self) -> None:
        with _WAIT_MUTEX:
            self.done = True
            waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.wake()


@dataclass(eq=False)
class L2Meta(Completion):
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


class SectorRange(Completion):
    """One write, write-zeroes or discard of an encrypted image, from its start until
    its last step is linked (``refs``: the request and any step that outlives it).
    ``serial``: a sub-sector read-modify-write, which excludes every overlap."""

    def __init__(self, start: int, end: int, serial: bool) -> None:
        self.start = start
        self.end = end
        self.serial = serial
        self.refs = 1
        self._waiters: list[Wakeup] = []
        self.done = False


class SectorRanges:
    """The writes in progress on an encrypted image (guest byte ranges).

    A plain write may overlap other plain writes (as in QEMU, their order is the
    caller's business), never a serial one; a serial one overlaps nothing. Entries
    are added without the metadata lock (a thread-safe list of its own); a request
    that holds the metadata lock for its whole run (the synchronous path, the
    metadata-only part of write-zeroes and discard) only checks with
    :meth:`blocker`, as no read-modify-write can read past it while it holds the lock.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._items: list[SectorRange] = []

    def blocker(self, start: int, end: int, serial: bool) -> SectorRange | None:
        """What a request on ``[start, end)`` must wait for: an overlapping serial
        request, or for a ``serial`` one any overlapping request; None if free."""
        with self._mutex:
            return self._blocker(start, end, serial)

    def _blocker(self, start: int, end: int, serial: bool) -> SectorRange | None:
        for r in self._items:
            if r.start < end and start < r.end and (serial or r.serial):
                return r
        return None

    def try_begin(
        self, start: int, end: int, serial: bool
    ) -> tuple[SectorRange | None, SectorRange | None]:
        """Register a request on ``[start, end)`` if nothing blocks it: ``(entry,
        None)``, else ``(None, blocker)`` having registered nothing."""
        with self._mutex:
            blocker = self._blocker(start, end, serial)
            if blocker is not None:
                return None, blocker
            entry = SectorRange(start, end, serial)
            self._items.append(entry)
            return entry, None

    async def begin(self, start: int, end: int, serial: bool) -> SectorRange:
        """Register a request on ``[start, end)``, waiting for its blockers first
        (cancellable: nothing is registered until it returns)."""
        while True:
            entry, blocker = self.try_begin(start, end, serial)
            if entry is not None:
                return entry
            assert blocker is not None
            await blocker.wait()

    def hold(self, entry: SectorRange) -> None:
        """One more owner of ``entry`` (a write step finishing after its request)."""
        with self._mutex:
            entry.refs += 1

    def end(self, entry: SectorRange) -> None:
        """Drop one owner; the last one removes the entry and wakes its waiters."""
        with self._mutex:
            entry.refs -= 1
            if entry.refs:
                return
            self._items.remove(entry)
        entry.finish()


class NoSectorRanges(SectorRanges):
    """Excludes nothing: for ``qcow2aio.testing.unserialized()`` only."""

    def _blocker(self, start: int, end: int, serial: bool) -> SectorRange | None:
        return None
