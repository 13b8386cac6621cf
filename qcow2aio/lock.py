"""The per-image metadata lock (QEMU's ``s->lock``), usable from sync code too.

A plain ``asyncio.Lock`` cannot serve the synchronous fast path: that path must
find out *without waiting* whether it could take the lock, and must work with
no event loop at all. This lock is FIFO with direct hand-off (a releasing
holder passes ownership to the first waiter, so nobody can barge in between),
binds to no loop, and records whether its holder keeps the metadata readable
(a flush does; a table rewrite does not), so reads can proceed during a flush.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class MetaLock:
    def __init__(self) -> None:
        self._held = False
        self._readers_ok = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    def locked(self) -> bool:
        return self._held

    def blocks_readers(self) -> bool:
        """True while the holder may leave metadata half-updated."""
        return self._held and not self._readers_ok

    def try_acquire(self, *, readers_ok: bool = False) -> bool:
        """Take the lock if free, never waiting (the synchronous fast path)."""
        if self._held:
            return False
        self._held = True
        self._readers_ok = readers_ok
        return True

    async def acquire(self, *, readers_ok: bool = False) -> None:
        if not self._held:
            self._held = True
            self._readers_ok = readers_ok
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Ownership was handed to us as we were cancelled: pass it on.
                self.release()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise
        self._readers_ok = readers_ok

    def release(self) -> None:
        assert self._held, "release of an unlocked MetaLock"
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self._readers_ok = False
                fut.set_result(None)  # hand-off: the lock stays held by the waiter
                return
        self._held = False
        self._readers_ok = False


class NoLock(MetaLock):
    """A lock that never excludes anyone: for ``qcow2aio.testing.unserialized()`` only."""

    def locked(self) -> bool:
        return False

    def blocks_readers(self) -> bool:
        return False

    def try_acquire(self, *, readers_ok: bool = False) -> bool:
        return True

    async def acquire(self, *, readers_ok: bool = False) -> None:
        return None

    def release(self) -> None:
        return None
