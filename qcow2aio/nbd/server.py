"""An NBD server on qcow2aio's async API: many clients, one serialized image.

Design (see docs/nbd.md):

* Each export is an open :class:`~qcow2aio.Image`. Every connection's requests go
  to that one object, so they meet the same metadata lock, in-flight allocation list
  and drain rules as any other user of the image: the server adds no locking of its
  own, and a service may keep using an image it exports.
* A connection reads requests in order and runs each as its own task, up to
  :data:`MAX_IN_FLIGHT` requests and :data:`MAX_IN_FLIGHT_BYTES` of payload at once
  (a client that sends faster waits in its socket: memory per connection is bounded
  whatever the client does). Replies go out as requests complete, one whole reply
  at a time (a send lock), so they may come back out of order, as the protocol allows.
* A flush flushes the image, which covers writes completed on every connection:
  that is what ``CAN_MULTI_CONN`` promises.
* Nothing a client sends is trusted: lengths are checked before anything is read or
  allocated from them (option data over :data:`~.protocol.MAX_OPTION_READ` is drained
  in small pieces, never held), and a bad request gets the protocol's error
  (``EINVAL`` for what qemu-nbd refuses that way) while the connection goes on; only
  where the protocol leaves no way to answer (bad magic, unknown client flags, a
  write too long to read) is the connection dropped. A failure of one request or one
  connection never reaches the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import logging
import os
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..backing import RawImage
from ..blockstatus import Status, block_status_async
from ..errors import Qcow2Error, Qcow2IOError, Qcow2RangeError, Qcow2ReadOnlyError
from ..image import Image
from ..tools.raw import RawTarget
from . import protocol as P

# What an export serves: a qcow2 image, or a raw file (``-f raw``): a RawImage
# read-only, a RawTarget writable.
Disk = Image | RawImage

log = logging.getLogger("qcow2aio.nbd")

DEFAULT_PORT = 10809
# Per connection: requests running at once, and their payload bytes (a read's reply
# counts as its length). A single request may use the whole byte budget.
MAX_IN_FLIGHT = 16
MAX_IN_FLIGHT_BYTES = 64 << 20
_MIN_WEIGHT = MAX_IN_FLIGHT_BYTES // MAX_IN_FLIGHT
# Block sizes qemu-nbd advertises (minimum, preferred, maximum).
BLOCK_SIZES = (1, 4096, P.MAX_REQUEST)
# At most this many extents in one block-status reply (the protocol lets a server
# answer less than asked; a client asks again from where the answer stopped).
MAX_EXTENTS = 1 << 16
# The longest block-status descriptor: the largest 4 KiB multiple below 2^32.
_MAX_EXTENT = 0xFFFFFFFF & ~0xFFF
# Replies queued in one turn of the loop are joined into one write up to this size;
# a connection waits for its socket once this much is buffered unsent.
_JOIN_MAX = 256 << 10
_SEND_HIGH_WATER = 4 << 20

BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP = "qemu:dirty-bitmap:"


@dataclass
class Export:
    """One export: an open image under a name.

    ``read_only`` defaults to the image's mode. ``multi_conn`` advertises
    ``CAN_MULTI_CONN`` (qemu-nbd does when more than one client may connect).
    ``allocation_depth`` offers the ``qemu:allocation-depth`` context (``-A``).
    ``bitmaps`` offers ``qemu:dirty-bitmap:NAME`` for each persistent bitmap named
    (``-B``), in this order; each must exist and be consistent (not in use), as
    qemu-nbd demands, and an enabled one shows the export's own writes live.
    """

    image: Disk
    name: str = ""
    description: str = ""
    read_only: bool | None = None
    multi_conn: bool = False
    allocation_depth: bool = False
    bitmaps: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.read_only is None:
            self.read_only = not self.image.writable
        if not self.read_only and not self.image.writable:
            raise Qcow2ReadOnlyError(
                f"export {self.name!r}: image {self.image.path!r} is open read-only"
            )
        if len(self.name.encode()) > P.MAX_STRING:
            raise Qcow2Error(f"export name longer than {P.MAX_STRING} bytes: {self.name[:64]!r}")
        self.bitmaps = tuple(self.bitmaps)
        listed = self.image.bitmaps() if self.bitmaps and isinstance(self.image, Image) else []
        flags = {b["name"]: b["flags"] for b in listed}
        for name in self.bitmaps:
            if name not in flags:
                raise Qcow2Error(f"Bitmap '{name}' is not found")
            if "in-use" in flags[name]:
                raise Qcow2Error(f"Bitmap '{name}' is inconsistent and cannot be used")

    def flags(self, structured: bool) -> int:
        """The transmission flags qemu-nbd sends for the same image and options."""
        f = P.TFLAG_HAS_FLAGS | P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_SEND_CACHE
        if structured:
            f |= P.TFLAG_SEND_DF
        if self.read_only:
            f |= P.TFLAG_READ_ONLY
        else:
            f |= P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES | P.TFLAG_SEND_FAST_ZERO
        if self.multi_conn:
            f |= P.TFLAG_CAN_MULTI_CONN
        return f

    def contexts(self) -> list[str]:
        """Metadata contexts this export offers, in the order ids are given."""
        names = [BASE_ALLOCATION]
        if self.allocation_depth:
            names.append(ALLOCATION_DEPTH)
        names.extend(DIRTY_BITMAP + b for b in self.bitmaps)
        return names


class _Drop(Exception):
    """End this connection now (the protocol gives no way to answer)."""


class _Budget:
    """A byte semaphore: a request waits until its payload fits in the budget.
    Counters and a queue of futures (no Condition): the common case, a budget with
    room, costs two additions."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def try_take(self, n: int) -> bool:
        """Take ``n`` (at most the total) if it is free now and nobody waits."""
        if self.free >= n and not self._waiters:
            self.free -= n
            return True
        return False

    async def take(self, n: int) -> int:
        n = min(n, self.total)
        if self.try_take(n):
            return n
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.give(n)
            else:
                self._waiters.remove((n, fut))
            raise
        return n

    def give(self, n: int) -> None:
        self.free += n
        while self._waiters and self._waiters[0][0] <= self.free:
            k, fut = self._waiters.popleft()
            if not fut.done():
                self.free -= k
                fut.set_result(None)


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run a request's coroutine now, up to its first real wait; only then give it a
    Task. A cached read completes in the read loop's own turn (no task, no extra trip
    through the event loop), which is most of a depth-1 round trip. Like a Task, the
    coroutine runs in a copy of the context (qcow2aio keeps per-request state in
    context variables), and the Task that continues it does what a Task does."""
    ctx = contextvars.copy_context()
    try:
        yielded = ctx.run(coro.send, None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_continue(coro, yielded), context=ctx)


async def _continue(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    """Drive ``coro`` from a suspension it reached outside any Task: wait for the
    future it yielded (without taking its result: the coroutine does), resume it,
    repeat; a cancellation of this task cancels that future, as a Task's does."""
    loop = asyncio.get_running_loop()
    while True:
        if yielded is None:  # a bare yield (asyncio.sleep(0)): let others run
            await asyncio.sleep(0)
        else:
            yielded._asyncio_future_blocking = False
            while not yielded.done():
                gate = loop.create_future()
                yielded.add_done_callback(lambda _f, g=gate: g.done() or g.set_result(None))
                try:
                    await gate
                except asyncio.CancelledError:
                    yielded.cancel()
        try:
            yielded = coro.send(None)
        except StopIteration:
            return


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, Qcow2RangeError):
        return P.EINVAL
    if isinstance(exc, Qcow2ReadOnlyError):
        return P.EPERM
    if isinstance(exc, Qcow2IOError) and getattr(exc, "errno", None) == errno.ENOSPC:
        return P.ENOSPC
    return P.EIO


class _Connection:
    def __init__(
        self,
        server: NbdServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.no_zeroes = False
        self.structured = False
        self.tls_done = False
        # NBD_OPT_SET_META_CONTEXT's choice: export name -> contexts (one export).
        self.meta: dict[str, list[str]] = {}
        self.export: Export | None = None
        self.contexts: list[tuple[int, str]] = []
        self._out: list[bytes | memoryview] = []
        self._flush_pending = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._budget = _Budget(MAX_IN_FLIGHT_BYTES)

    # ------------------------------------------------------------ plumbing
    async def _read(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    async def _skip(self, n: int) -> None:
        while n:
            k = min(n, 1 << 16)
            await self.reader.readexactly(k)
            n -= k

    async def _send(self, *parts: bytes | memoryview) -> None:
        """Queue one whole reply. Replies completed in the same turn of the event
        loop go out in one write (a depth-16 client's replies in one system call);
        nothing awaits between the parts of a reply, so replies never interleave.
        Waits only when the socket's buffer is full (the client reads slowly)."""
        self._out.extend(parts)
        if not self._tasks and len(self.reader._buffer) < P.REQUEST_SIZE:  # type: ignore[attr-defined]
            # Nothing else in flight and no request waiting to be read (depth 1):
            # no other reply to wait for, send now.
            self.flush_out()
        elif not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self.flush_out)
        transport = self.writer.transport
        if transport.get_write_buffer_size() > _SEND_HIGH_WATER:
            self.flush_out()
            await self.writer.drain()

    def flush_out(self) -> None:
        """Hand the queued replies to the transport."""
        self._flush_pending = False
        parts, self._out = self._out, []
        if not parts or self.writer.transport.is_closing():
            return
        if len(parts) == 1:
            self.writer.write(parts[0])
        elif sum(len(p) for p in parts) <= _JOIN_MAX:
            self.writer.write(b"".join(parts))
        else:
            for part in parts:
                self.writer.write(part)

    async def _reply(self, option: int, kind: int, data: bytes = b"") -> None:
        await self._send(P.option_reply(option, kind, data))

    # ----------------------------------------------------------- handshake
    async def handshake(self) -> Export | None:
        """Option haggling; the export to serve, or None when the client left."""
        await self._send(P.greeting())
        try:
            flags = P.parse_client_flags(await self._read(4))
        except P.ProtocolError:
            raise _Drop from None
        self.no_zeroes = bool(flags & P.FLAG_NO_ZEROES)
        while True:
            try:
                option, length = P.parse_option_header(await self._read(P.OPT_HEADER_SIZE))
            except P.ProtocolError:
                raise _Drop from None
            if length > P.MAX_OPTION_READ:
                if option == P.OPT_EXPORT_NAME:
                    raise _Drop
                await self._skip(length)
                await self._reply(option, P.REP_ERR_TOO_BIG)
                continue
            data = await self._read(length)
            export = await self._option(option, data)
            if export is not None:
                return export

    async def _option(self, option: int, data: bytes) -> Export | None:
        server = self.server
        if server.tls is not None and not self.tls_done:
            if option == P.OPT_STARTTLS:
                if data:
                    await self._reply(option, P.REP_ERR_INVALID)
                    return None
                await self._reply(option, P.REP_ACK)
                self.flush_out()
                await self.writer.drain()
                await self.writer.start_tls(server.tls)
                self.tls_done = True
                return None
            if option == P.OPT_ABORT:
                await self._reply(option, P.REP_ACK)
                raise _Drop
            if option == P.OPT_EXPORT_NAME:
                raise _Drop
            await self._reply(option, P.REP_ERR_TLS_REQD)
            return None
        try:
            return await self._plain_option(option, data)
        except P.ProtocolError:
            if option == P.OPT_EXPORT_NAME:
                raise _Drop from None
            await self._reply(option, P.REP_ERR_INVALID)
            return None

    async def _plain_option(self, option: int, data: bytes) -> Export | None:
        server = self.server
        if option == P.OPT_EXPORT_NAME:
            export = server.exports.get(P.parse_export_name(data))
            if export is None or server.closing:
                raise _Drop
            flags = export.flags(self.structured)
            await self._send(P.export_name_reply(export.image.size, flags, self.no_zeroes))
            return export
        if option == P.OPT_ABORT:
            await self._reply(option, P.REP_ACK)
            raise _Drop
        if option == P.OPT_LIST:
            if data:
                await self._reply(option, P.REP_ERR_INVALID)
                return None
            for exp in server.exports.values():
                await self._reply(option, P.REP_SERVER, P.server_entry(exp.name, exp.description))
            await self._reply(option, P.REP_ACK)
            return None
        if option == P.OPT_STARTTLS:
            # No TLS configured (with TLS this was handled before).
            reply = P.REP_ERR_INVALID if self.tls_done else P.REP_ERR_POLICY
            await self._reply(option, reply)
            return None
        if option == P.OPT_STRUCTURED_REPLY:
            if data or self.structured:
                await self._reply(option, P.REP_ERR_INVALID)
                return None
            self.structured = True
            await self._reply(option, P.REP_ACK)
            return None
        if option in (P.OPT_INFO, P.OPT_GO):
            what = "NBD_OPT_GO" if option == P.OPT_GO else "NBD_OPT_INFO"
            name, items = P.parse_info_request(data, what)
            export = server.exports.get(name)
            if export is None:
                await self._reply(option, P.REP_ERR_UNKNOWN)
                return None
            if server.closing:
                await self._reply(option, P.REP_ERR_SHUTDOWN)
                return None
            flags = export.flags(self.structured)
            await self._reply(option, P.REP_INFO, P.info_export(export.image.size, flags))
            if P.INFO_NAME in items:
                await self._reply(option, P.REP_INFO, P.info_name(export.name))
            if P.INFO_DESCRIPTION in items and export.description:
                await self._reply(option, P.REP_INFO, P.info_description(export.description))
            await self._reply(option, P.REP_INFO, P.info_block_size(*BLOCK_SIZES))
            await self._reply(option, P.REP_ACK)
            return export if option == P.OPT_GO else None
        if option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            setting = option == P.OPT_SET_META_CONTEXT
            what = "NBD_OPT_SET_META_CONTEXT" if setting else "NBD_OPT_LIST_META_CONTEXT"
            name, queries = P.parse_meta_request(data, what)
            if setting and not self.structured:
                await self._reply(option, P.REP_ERR_INVALID)
                return None
            export = server.exports.get(name)
            if export is None:
                await self._reply(option, P.REP_ERR_UNKNOWN)
                return None
            offered = export.contexts()
            found = _match_contexts(offered, queries, listing=not setting)
            for ctx in found:
                await self._reply(
                    option, P.REP_META_CONTEXT, P.meta_context_entry(offered.index(ctx), ctx)
                )
            if setting:
                self.meta = {name: found}
            await self._reply(option, P.REP_ACK)
            return None
        await self._reply(option, P.REP_ERR_UNSUP)
        return None

    # --------------------------------------------------------- transmission
    async def transmission(self, export: Export) -> None:
        self.export = export
        chosen = self.meta.get(export.name)
        offered = export.contexts()
        self.contexts = [(offered.index(c), c) for c in chosen or []]
        try:
            while True:
                try:
                    req = P.parse_request(await self._read(P.REQUEST_SIZE))
                except P.ProtocolError:
                    raise _Drop from None
                if req.type == P.CMD_DISC:
                    return
                payload = b""
                if req.type == P.CMD_WRITE and req.length > P.MAX_REQUEST:
                    await self._error(req, P.EINVAL, "write longer than 32 MiB")
                    raise _Drop
                # Each request weighs its payload, and at least a share of the budget,
                # which also bounds how many run at once.
                weight = min(MAX_IN_FLIGHT_BYTES, max(req.length, _MIN_WEIGHT))
                if not self._budget.try_take(weight):
                    await self._budget.take(weight)
                try:
                    if req.type == P.CMD_WRITE:
                        payload = await self._read(req.length)
                except BaseException:
                    self._budget.give(weight)
                    raise
                task = start_eagerly(self._run(req, payload, weight))
                if task is not None:
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, req: P.Request, payload: bytes, weight: int) -> None:
        try:
            await self._serve(req, payload)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; its connection ends in the read loop
        except Exception:  # a bug must cost one request, never the server
            log.exception("NBD request %r failed", req)
            with contextlib.suppress(Exception):
                await self._error(req, P.EIO, "internal error")
        finally:
            self._budget.give(weight)

    async def _error(self, req: P.Request, error: int, message: str) -> None:
        if self.structured and req.type in (P.CMD_READ, P.CMD_BLOCK_STATUS):
            await self._send(P.error_chunk(req.cookie, error, message))
        else:
            await self._send(P.simple_reply(req.cookie, error))

    async def _serve(self, req: P.Request, payload: bytes) -> None:
        export = self.export
        assert export is not None
        img = export.image
        kind = req.type
        allowed = P.CMD_FLAGS_ALLOWED.get(kind)
        if allowed is None:
            await self._error(req, P.EINVAL, f"unknown command {kind}")
            return
        if req.flags & ~allowed or (req.flags & P.CMD_FLAG_DF and not self.structured):
            await self._error(req, P.EINVAL, f"flags {req.flags:#x} not allowed")
            return
        if kind in (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES) and export.read_only:
            await self._error(req, P.EINVAL, "export is read-only")
            return
        if kind != P.CMD_FLUSH and req.offset + req.length > img.size:
            await self._error(req, P.EINVAL, "request past the end of the export")
            return
        if kind == P.CMD_FLUSH and (req.offset or req.length):
            await self._error(req, P.EINVAL, "flush with offset or length")
            return
        try:
            if kind == P.CMD_READ:
                await self._do_read(req)
                return
            if kind == P.CMD_BLOCK_STATUS:
                await self._do_block_status(req)
                return
            if kind == P.CMD_WRITE:
                assert isinstance(img, Image | RawTarget)  # not read-only
                await img.write(req.offset, payload)
            elif kind == P.CMD_TRIM:
                assert isinstance(img, Image | RawTarget)
                await img.discard(req.offset, req.length)
            elif kind == P.CMD_WRITE_ZEROES:
                fast = bool(req.flags & P.CMD_FLAG_FAST_ZERO)
                unmap = not req.flags & P.CMD_FLAG_NO_HOLE
                if isinstance(img, RawTarget):
                    done = await img.write_zeroes(req.offset, req.length, unmap=unmap, fast=fast)
                else:
                    assert isinstance(img, Image)
                    done = not fast or self._fast_zero(req, img)
                    if done:
                        await img.write_zeroes(req.offset, req.length, unmap=unmap)
                if not done:
                    await self._error(req, P.ENOTSUP, "zeroing would not be fast")
                    return
            elif kind == P.CMD_FLUSH:
                await img.flush()
            # CMD_CACHE: the page cache is the host's; nothing to do.
            if req.flags & P.CMD_FLAG_FUA:
                await img.flush()
        except Qcow2Error as exc:
            await self._error(req, _errno_of(exc), str(exc))
            return
        await self._send(P.simple_reply(req.cookie))

    def _fast_zero(self, req: P.Request, img: Image) -> bool:
        """A zeroing is fast when it only writes zero flags: whole clusters of a v3
        image (the disk's end counts as a cluster end). Else qemu-nbd answers a
        FAST_ZERO request ENOTSUP, and so do we. (A raw file's zeroing is fast where
        the file system zeroes ranges: see RawTarget.write_zeroes.)"""
        cs = img.cluster_size
        end = req.offset + req.length
        return img.meta.version >= 3 and not req.offset % cs and (not end % cs or end == img.size)

    async def _do_read(self, req: P.Request) -> None:
        assert self.export is not None
        img = self.export.image
        if req.length > P.MAX_REQUEST:
            await self._error(req, P.EINVAL, "read longer than 32 MiB")
            return
        try:
            data = await img.read(req.offset, req.length) if req.length else b""
        except Qcow2Error as exc:
            await self._error(req, _errno_of(exc), str(exc))
            return
        if self.structured:
            if not data:
                await self._send(P.done_chunk(req.cookie))
                return
            head = P.data_chunk_header(req.cookie, req.offset, len(data), True)
            await self._send(head, data)
        else:
            await self._send(P.simple_reply(req.cookie), data)

    async def _do_block_status(self, req: P.Request) -> None:
        assert self.export is not None
        if not self.structured or not self.contexts:
            await self._error(req, P.EINVAL, "no metadata context negotiated")
            return
        if req.length == 0:
            await self._error(req, P.EINVAL, "block status of zero bytes")
            return
        image = self.export.image
        one = bool(req.flags & P.CMD_FLAG_REQ_ONE)
        runs: list[Status] | None = None
        replies: list[tuple[int, list[tuple[int, int]]]] = []
        try:
            for ctx_id, name in self.contexts:
                if name.startswith(DIRTY_BITMAP):
                    assert isinstance(image, Image)  # Export admits bitmaps of qcow2 only
                    dirty = image.dirty_extents(name[len(DIRTY_BITMAP) :], req.offset, req.length)
                    extents = _bitmap_extents(dirty, req.offset, req.length, one)
                else:
                    if runs is None:
                        runs = await block_status_async(image, req.offset, req.length)
                    extents = _extents(runs, name, one)
                replies.append((ctx_id, extents))
        except Qcow2Error as exc:
            await self._error(req, _errno_of(exc), str(exc))
            return
        last = len(replies) - 1
        for i, (ctx_id, extents) in enumerate(replies):
            await self._send(P.block_status_chunk(req.cookie, ctx_id, extents, i == last))


def _match_contexts(offered: list[str], queries: list[str], *, listing: bool) -> list[str]:
    """The contexts the queries select: exact names; with LIST, an empty query list
    selects all, and a namespace prefix (``base:``, ``qemu:``) all of its contexts."""
    if not queries:
        return list(offered) if listing else []
    found: list[str] = []
    for q in queries:
        for ctx in offered:
            hit = ctx == q or (listing and q.endswith(":") and ctx.startswith(q))
            if hit and ctx not in found:
                found.append(ctx)
    return found


def _extents(runs: list[Status], context: str, one: bool) -> list[tuple[int, int]]:
    """Block-status descriptors of ``base:allocation`` or ``qemu:allocation-depth``."""
    out: list[tuple[int, int]] = []
    for st in runs:
        if context == BASE_ALLOCATION:
            flags = (0 if st.data else P.STATE_HOLE) | (P.STATE_ZERO if st.zero else 0)
        elif st.present:
            flags = st.depth + 1
        else:  # absent, except past a shorter backing file: counted at its depth
            flags = st.depth + 2 if st.past_backing_end else 0
        out.append((st.length, flags))
    return _descriptors(out, one)


def _bitmap_extents(
    dirty: list[tuple[int, int]], offset: int, length: int, one: bool
) -> list[tuple[int, int]]:
    """``qemu:dirty-bitmap:*`` descriptors over the request: the dirty ranges
    (flag 1) and the clean gaps between them (flag 0)."""
    runs: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    for start, n in dirty:
        if start > pos:
            runs.append((start - pos, 0))
        runs.append((n, P.STATE_DIRTY))
        pos = start + n
    if pos < end:
        runs.append((end - pos, 0))
    return _descriptors(runs, one)


def _descriptors(runs: list[tuple[int, int]], one: bool) -> list[tuple[int, int]]:
    """Block-status descriptors (length, flags) from runs in order: adjacent equal
    flags merged, lengths within 32 bits, at most :data:`MAX_EXTENTS`."""
    out: list[tuple[int, int]] = []
    for n, flags in runs:
        if out and out[-1][1] == flags:  # merge into the previous descriptor
            n += out.pop()[0]
        while n:  # descriptor lengths are 32-bit: split, keeping 4 KiB alignment
            k = min(n, _MAX_EXTENT)
            out.append((k, flags))
            n -= k
        if one or len(out) >= MAX_EXTENTS:
            break
    return out[:1] if one else out[:MAX_EXTENTS]


@dataclass
class NbdServer:
    """A running server (see :func:`serve`)."""

    exports: dict[str, Export]
    max_clients: int | None = None
    persistent: bool = True
    tls: ssl.SSLContext | None = None
    closing: bool = False
    _servers: list[asyncio.Server] = field(default_factory=list)
    _conns: dict[asyncio.Task[Any], _Connection] = field(default_factory=dict)
    _clients: int = 0
    _served_any: bool = False
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _gate: asyncio.Semaphore | None = None

    def __post_init__(self) -> None:
        if self.max_clients is not None:
            self._gate = asyncio.Semaphore(self.max_clients)

    @property
    def sockets(self) -> list[Any]:
        return [s for srv in self._servers for s in srv.sockets]

    @property
    def port(self) -> int | None:
        for s in self.sockets:
            if s.family in (2, 10):  # AF_INET, AF_INET6
                return int(s.getsockname()[1])
        return None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = _Connection(self, reader, writer)
        self._conns[task] = conn
        counted = False
        try:
            if self._gate is not None:
                await self._gate.acquire()
            try:
                export = await conn.handshake()
                if export is not None:
                    counted = True
                    self._clients += 1
                    self._served_any = True
                    await conn.transmission(export)
            finally:
                if self._gate is not None:
                    self._gate.release()
        except (_Drop, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # server shutdown: requests in flight were awaited above
        except Exception:
            log.exception("NBD connection failed")
        finally:
            self._conns.pop(task, None)
            with contextlib.suppress(Exception):
                conn.flush_out()
                writer.close()
            if counted:
                self._clients -= 1
                if self._clients == 0:
                    try:
                        for exp in self.exports.values():
                            if not exp.read_only:
                                await exp.image.flush()
                    except Exception:
                        log.exception("flush after the last client failed")
                    if not self.persistent:
                        self._idle.set()

    async def wait_idle(self) -> None:
        """Without ``persistent``: return once the last client that finished the
        handshake has left (qemu-nbd without ``-t`` exits then)."""
        await self._idle.wait()

    async def close(self) -> None:
        """Stop listening, let every connection finish the requests it has in flight
        (new ones are not read), then flush the writable exports."""
        self.closing = True
        for srv in self._servers:
            srv.close()
        tasks = list(self._conns)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for srv in self._servers:
            await srv.wait_closed()
        for exp in self.exports.values():
            if not exp.read_only:
                await exp.image.flush()

    async def __aenter__(self) -> NbdServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def serve(
    exports: Export | Sequence[Export],
    *,
    host: str | None = None,
    port: int | None = None,
    unix_path: str | os.PathLike[str] | None = None,
    max_clients: int | None = None,
    persistent: bool = True,
    tls: ssl.SSLContext | None = None,
) -> NbdServer:
    """Start serving ``exports`` on TCP (``host``/``port``, default port 10809; port 0
    picks a free one, see :attr:`NbdServer.port`) and/or a Unix socket.

    ``max_clients`` bounds connections at once (more wait, not refused, as with
    qemu-nbd's ``-e``); ``tls`` requires STARTTLS with that context. Use as
    ``async with await serve(...) as server:``; closing drains requests in flight
    and flushes the images (it does not close them: they belong to the caller).
    """
    items = [exports] if isinstance(exports, Export) else list(exports)
    table: dict[str, Export] = {}
    for exp in items:
        if exp.name in table:
            raise Qcow2Error(f"two exports named {exp.name!r}")
        table[exp.name] = exp
    server = NbdServer(table, max_clients=max_clients, persistent=persistent, tls=tls)
    limit = 1 << 20  # StreamReader buffer; readexactly reads larger payloads in pieces
    starters: list[Callable[[], Awaitable[asyncio.Server]]] = []
    if unix_path is not None:
        path = os.fspath(unix_path)

        async def start_unix() -> asyncio.Server:
            return await asyncio.start_unix_server(server._accept, path, limit=limit)

        starters.append(start_unix)
    if host is not None or port is not None or unix_path is None:

        async def start_tcp() -> asyncio.Server:
            return await asyncio.start_server(
                server._accept,
                host if host is not None else "0.0.0.0",
                DEFAULT_PORT if port is None else port,
                limit=limit,
                reuse_address=True,
            )

        starters.append(start_tcp)
    try:
        for start in starters:
            server._servers.append(await start())
    except BaseException:
        await server.close()
        raise
    return server
