"""``qemu-img commit``: copy an overlay's data down into a base image of its chain.

What is copied is what QEMU 7.2's commit copies (observed with the tool, see
``tests/test_commit_rebase.py``): the ranges allocated in the top image or in any
layer between it and the base (the chain's block status,
:func:`qcow2aio.blockstatus.block_status`: present at a depth above the base's),
rounded out to chunks of the job's granularity (the base's cluster size, clamped to
4 KiB .. 64 KiB). A chunk that reads as zeros all through (in the same block status:
zero clusters, unallocated with nothing below, past a layer's end) is
``write_zeroes`` into the base (whole base clusters become zero clusters, their host
clusters freed; a partial cluster gets written zeros; a raw base gets a hole); any
other chunk is read through the top image and written into the base whole, zeros and
all. "Reads as zeros" is judged as qemu-img judges it: one run of zeros must cover the
chunk, and a layer reports no run across one of its L2 tables (so with 512-byte
clusters, whose tables map 32 KiB, a 64 KiB chunk of zeros over a raw base is copied).

The chunks are grouped into pieces of work that cover whole base clusters, so no two
ever touch one base cluster, and each reads all its data before writing any: data
the base itself holds is read through the top's read-only handle of the base, whose
idea of where those clusters live must not be changed under it by the writes.

Order (crash-safe): the copy into the base, flushed; only then the top emptied
(:meth:`Image.make_empty`: entries unlinked and written back before their clusters
are freed). A crash or a cancel in the copy leaves the top untouched and the base
holding new data only in ranges the top (or an intermediate) covers, so the chain
reads as before; after the flush the base alone reads as the committed chain.
With ``drop`` (``-d``), or when ``base`` names the image (``-b``, which implies
``-d`` as in qemu-img), the top and intermediate images are left as they are.

The copy is pipelined: up to ``max_inflight`` pieces of at most ``chunk_size``
bytes in flight at once, each a read of the top into a buffer of its own (reused from
piece to piece: ``max_inflight * (chunk_size + one base cluster)``, about 8 MiB by
default: 2 pieces of 4 MiB) and a write (or write-zeroes) of the base; the base is a
normal read-write :class:`~qcow2aio.image.Image`, so its allocations obey the driver's
serialization. Few large pieces rather than many small ones: each write of the base
costs the event loop a fixed amount of Python and a thread hop whatever its size (on
the bench chain, 8 pieces of 1 MiB: 0.78-1.26 s; 2 of 4 MiB: 0.70-0.79 s, the same
buffer memory).
The kernel's writeback of the base is started every 32 MiB
(:class:`~qcow2aio.tools.raw.EarlyWriteback`, a hint with no durability promise), so
the disk works while the copy goes on instead of all at the closing flush (which
qemu-img leaves to its ``fdatasync``: on the 1 GiB bench chain that flush is 0.7 s of
its 1 s).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..backing import RawImage
from ..blockstatus import Status, block_status_async
from ..errors import Qcow2Error, Qcow2ReadOnlyError
from ..image import Image
from ..io import BackendFactory, Buffer, to_thread
from .progress import Counter, Progress
from .raw import EarlyWriteback

__all__ = ["CommitError", "commit", "commit_sync", "find_base"]

_T = TypeVar("_T")
_I = TypeVar("_I")

Layer = Image | RawImage
Passphrase = str | bytes | Sequence[str | bytes | None] | None

DATA_PIECE = 0
ZERO_PIECE = 1


class CommitError(Qcow2Error):
    """The chain does not allow the commit asked for (qemu-img's messages)."""


@dataclass(slots=True)
class Piece:
    """A run of guest bytes and what the job does with it (copy, zero, or nothing)."""

    kind: int
    start: int
    length: int


def run_sync(make: Callable[[], Awaitable[_T]]) -> _T:
    """Run a job's coroutine to completion from synchronous code: on a new event loop
    in this thread, or (this thread already runs a loop, which must not block) in a
    helper thread that owns its own loop. Images may be awaited from any loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_as_coro(make))
    box: list[_T] = []
    err: list[BaseException] = []

    def body() -> None:
        try:
            box.append(asyncio.run(_as_coro(make)))
        except BaseException as exc:  # re-raised in the caller's thread
            err.append(exc)

    t = threading.Thread(target=body, name="qcow2aio-job")
    t.start()
    t.join()
    if err:
        raise err[0]
    return box[0]


async def _as_coro(make: Callable[[], Awaitable[_T]]) -> _T:
    return await make()


def chain_of(top: Image) -> list[Layer]:
    """``[top, its backing, ...]`` as opened by the top image."""
    layers: list[Layer] = [top]
    cur: Layer = top
    while isinstance(cur, Image) and cur.backing is not None:
        cur = cur.backing
        layers.append(cur)
    return layers


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def find_base(top: Image, name: str, top_name: str | None = None) -> int:
    """The depth of the image ``name`` (qemu-img's ``-b``) in ``top``'s chain (>= 1).

    Matched as qemu-img matches it: the name exactly as the image above stores it,
    or the file the name leads to, an absolute name as is and a relative one from
    the folder of the image above (not from the working directory)."""
    layers = chain_of(top)
    for depth in range(1, len(layers)):
        above = layers[depth - 1]
        assert isinstance(above, Image)
        layer = layers[depth]
        if name == above.meta.header.backing_file:
            return depth
        path = name if os.path.isabs(name) else os.path.join(os.path.dirname(above.path), name)
        if _same_file(path, layer.path):
            return depth
    shown = top.path if top_name is None else top_name
    raise CommitError(f"Did not find '{name}' in the backing chain of '{shown}'")


def _granularity(base: Layer) -> int:
    """The job's chunk: the base's cluster size within 4 KiB .. 64 KiB; 64 KiB for a
    raw base, which has none."""
    if isinstance(base, RawImage):
        return 65536
    return max(4096, min(65536, base.cluster_size))


class RawTarget:
    """A raw base file as the commit writes it: guest offset = file offset; a chunk of
    zeros becomes a hole (QEMU's write-zeroes with unmap on a file), or written zeros
    where the file system cannot punch."""

    def __init__(self, path: str, factory: BackendFactory) -> None:
        self.path = path
        self.file = factory(path, True)
        self.cluster_size = 65536

    @property
    def size(self) -> int:
        return self.file.size()

    async def resize(self, size: int) -> None:
        await self.file.atruncate(size, "commit_grow")

    async def write(self, offset: int, data: Buffer) -> None:
        await self.file.apwritev([data], offset, "data_write")

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        if not await to_thread(self.file.punch_hole, offset, length, "commit_zero"):
            await self.file.apwritev([bytes(length)], offset, "commit_zero")

    async def flush(self) -> None:
        await self.file.aflush("commit_flush")

    async def aclose(self) -> None:
        self.file.close()


def _table_span(layer: Layer) -> int:
    """Guest bytes one L2 table of ``layer`` maps (0: a raw file, no tables)."""
    if isinstance(layer, RawImage):
        return 0
    cs = layer.cluster_size
    return cs * (cs // (16 if layer.meta.extended_l2 else 8))


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _round_out(ranges: list[tuple[int, int]], gran: int, size: int) -> list[tuple[int, int]]:
    return _merge([(a - a % gran, min(size, -(-b // gran) * gran)) for a, b in ranges])


def plan_commit(top: Image, depth: int, chunk_size: int, status: list[Status]) -> list[list[Piece]]:
    """The work of a commit of ``top`` into the layer at ``depth`` (see the module),
    from the block status of the top's whole chain: groups of pieces, each group
    covering whole base clusters (so that no two groups ever touch one base cluster)
    and about ``chunk_size`` bytes."""
    layers = chain_of(top)
    base = layers[depth]
    size = top.size
    gran = _granularity(base)
    bcs = gran if isinstance(base, RawImage) else base.cluster_size
    above = [(st.start, st.start + st.length) for st in status if st.present and st.depth < depth]
    pieces: list[Piece] = []

    def emit(kind: int, start: int, end: int) -> None:
        last = pieces[-1] if pieces else None
        if last is not None and last.kind == kind and last.start + last.length == start:
            last.length = end - last.start
        else:
            pieces.append(Piece(kind, start, end - start))

    # The chunks (``gran``-aligned) are classified a run of block status at a time, not
    # one by one: a 1 GiB commit is 16384 chunks of 64 KiB but a handful of runs.
    i = 0
    for a, b in _round_out(_merge(above), gran, size):
        c = a
        while c < b:
            while status[i].start + status[i].length <= c:
                i += 1
            st = status[i]
            run_end = st.start + st.length
            if not st.zero or st.data:
                # Every chunk that starts in this run holds data.
                stop = min(b, -(-run_end // gran) * gran)
                emit(DATA_PIECE, c, stop)
                c = stop
                continue
            # A chunk is zeroed when one run of zeros covers it, as the layer that
            # answers reports runs: never across one of its L2 tables (observed: with
            # 512-byte clusters, 32 KiB runs of zeros in 64 KiB chunks are copied).
            span = _table_span(layers[st.depth]) if st.depth < len(layers) else 0
            if span and span % gran:
                # Tables smaller than a chunk (or not a multiple of it): judged chunk
                # by chunk, capped at the table holding the chunk's start.
                c_end = min(b, c + gran)
                zero = min(run_end, (c // span + 1) * span) >= c_end
                emit(ZERO_PIECE if zero else DATA_PIECE, c, c_end)
                c = c_end
                continue
            # Tables are whole chunks: every chunk inside the run is zero (a chunk never
            # crosses a table); the one the run ends inside is data.
            stop = b if run_end >= b else run_end - run_end % gran
            if stop > c:
                emit(ZERO_PIECE, c, stop)
                c = stop
            else:
                c_end = min(b, c + gran)
                emit(DATA_PIECE, c, c_end)
                c = c_end
    groups: list[list[Piece]] = []
    cur: list[Piece] = []
    cur_bytes = 0
    for p in pieces:
        pos, p_end = p.start, p.start + p.length
        while pos < p_end:
            if cur_bytes >= chunk_size and pos % bcs == 0:
                groups.append(cur)
                cur, cur_bytes = [], 0
            if cur_bytes >= chunk_size:  # full: only up to the end of this base cluster
                stop = min(p_end, (pos // bcs + 1) * bcs)
            else:
                stop = min(p_end, pos + chunk_size - cur_bytes)
            cur.append(Piece(p.kind, pos, stop - pos))
            cur_bytes += stop - pos
            pos = stop
    if cur:
        groups.append(cur)
    return groups


async def pipeline(
    items: Sequence[_I],
    work: Callable[[_I], Awaitable[int]],
    counter: Counter,
    max_inflight: int,
) -> None:
    """Run ``work`` over ``items`` with at most ``max_inflight`` at once, adding the
    bytes each returns to ``counter``; the first failure cancels the rest (and is
    raised once they have stopped)."""
    it = iter(items)  # shared: each worker takes the next item when it is free

    async def worker() -> None:
        for item in it:
            counter.add(await work(item))
            # Page-cache hits complete inline, without suspending: yield once per item
            # so that the loop's other tasks run and a cancel is seen between items.
            await asyncio.sleep(0)

    n = max(1, min(max_inflight, len(items)))
    tasks = [asyncio.ensure_future(worker()) for _ in range(n)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _base_passphrase(secret: Passphrase, depth: int) -> str | bytes | None:
    if secret is None:
        return None
    if isinstance(secret, str | bytes):
        return secret if depth == 1 else None
    seq = list(secret)
    return seq[depth - 1] if depth - 1 < len(seq) else None


def _below_passphrases(secret: Passphrase, depth: int) -> Passphrase:
    if secret is None or isinstance(secret, str | bytes):
        return None
    return list(secret)[depth:] or None


async def commit(
    path_or_image: str | os.PathLike[str] | Image,
    *,
    base: str | None = None,
    drop: bool = False,
    progress: Progress | None = None,
    passphrase: str | bytes | None = None,
    backing_passphrase: Passphrase = None,
    max_inflight: int = 2,
    chunk_size: int = 4 << 20,
    io_backend: BackendFactory | None = None,
) -> None:
    """Commit the image's data into a base image of its chain, as ``qemu-img commit``.

    ``base``: the base's name as ``-b`` takes it (default: the image's backing file);
    naming it implies ``drop``. ``drop`` (``-d``): leave the image as it is instead of
    emptying it. ``progress(done, total)`` counts bytes of the ranges to copy.
    ``backing_passphrase``: as :func:`qcow2aio.open` (one per depth, for encrypted
    layers). An :class:`Image` passed in must be writable unless nothing is emptied;
    its backing chain is reopened afterwards (it would otherwise keep the base's old
    tables). Nothing else may write to the image meanwhile (qemu-img holds its write
    lock; a live commit that also copies new writes is not implemented): a write
    landing after its range was copied would be lost when the image is emptied.
    ``io_backend``: as :func:`qcow2aio.open` (the base is opened with the
    top image's). Raises :class:`CommitError` with qemu-img's messages.
    """
    if chunk_size <= 0 or chunk_size % 512:
        raise ValueError(f"chunk_size must be a positive multiple of 512, not {chunk_size}")
    empty_top = not drop and base is None
    own = not isinstance(path_or_image, Image)
    if isinstance(path_or_image, Image):
        top = path_or_image
        shown = top.path
    else:
        shown = os.fspath(path_or_image)
        top = Image(
            shown,
            "r+" if empty_top else "r",
            passphrase=passphrase,
            backing_passphrase=backing_passphrase,
            io_backend=io_backend,
        )
    try:
        if top.backing is None:
            raise CommitError("Image does not have a backing file")
        if empty_top and not top.writable:
            raise Qcow2ReadOnlyError(f"image {top.path!r} is opened read-only")
        depth = 1 if base is None else find_base(top, base, shown)
        layer = chain_of(top)[depth]
        below = top._backing_passphrase if not own else backing_passphrase
        target: Image | RawTarget = (
            RawTarget(layer.path, top._io_backend)
            if isinstance(layer, RawImage)
            else Image(
                layer.path,
                "r+",
                passphrase=_base_passphrase(below, depth),
                backing_passphrase=_below_passphrases(below, depth),
                wait_timeout=top.wait_timeout,
                io_backend=top._io_backend,
            )
        )
        try:
            if target.size < top.size:
                # qemu-img grows a smaller base to the top's size first.
                await target.resize(top.size)
            status = await block_status_async(top, 0, top.size)
            groups = plan_commit(top, depth, chunk_size, status)
            counter = Counter(sum(p.length for g in groups for p in g), progress)
            writeback = EarlyWriteback(layer.path)

            # One buffer per piece of work in flight, reused: a fresh 1 MiB buffer
            # per read costs its page faults (and an mmap/munmap) every time.
            bcs = target.cluster_size
            pool = [bytearray(chunk_size + bcs) for _ in range(min(max_inflight, len(groups)))]

            async def work(group: list[Piece]) -> int:
                buf = pool.pop()
                try:
                    return await copy_group(group, memoryview(buf))
                finally:
                    pool.append(buf)

            async def copy_group(group: list[Piece], view: memoryview) -> int:
                # All reads first: data the base itself holds is read through the
                # top's (read-only) handle of the base, which must not see this
                # group's writes move those base clusters; no other group shares them.
                pos = 0
                for p in group:
                    if p.kind == DATA_PIECE:
                        await top.readinto(view[pos : pos + p.length], p.start)
                        pos += p.length
                pos = 0
                for p in group:
                    if p.kind == DATA_PIECE:
                        await target.write(p.start, view[pos : pos + p.length])
                        pos += p.length
                    else:
                        await target.write_zeroes(p.start, p.length, unmap=True)
                n = sum(p.length for p in group)
                await writeback.wrote(n)
                return n

            try:
                await pipeline(groups, work, counter, max_inflight)
            finally:
                writeback.close()
            await target.flush()
        finally:
            await target.aclose()
        if empty_top:
            await top.make_empty()
        if not own:
            await top.reopen_backing()
        counter.complete()
    finally:
        if own:
            await top.aclose()


def commit_sync(path_or_image: str | os.PathLike[str] | Image, **kwargs: object) -> None:
    """:func:`commit` from synchronous code (its own event loop; see :func:`run_sync`)."""
    run_sync(lambda: commit(path_or_image, **kwargs))  # type: ignore[arg-type]
