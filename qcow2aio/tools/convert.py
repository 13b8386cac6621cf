"""``qemu-img convert`` as a coroutine: copy one or more images into a new (or existing) one.

What is copied is decided as QEMU 7.2's ``convert`` decides it (observed with the
tool, see docs/architecture.md "Movers"):

* The sources are concatenated: the target is as large as all of them together
  (each rounded up to whole 512-byte sectors), source *i* starting where source
  *i - 1* ends.
* Each source range is classified by the chain's block status: *data* (allocated
  somewhere in the chain, compressed included), *zero* (zero clusters, holes of a
  raw file, unallocated all the way down, past the end of a shorter backing file),
  or, with ``backing=`` (``-B``), *skip*: unallocated in the source's top layer, so
  the target's new backing file answers there. With ``-B`` only the top layer is
  asked, as QEMU does: the target gets what the source's top layer holds, not the
  difference between the source's content and the new backing file.
* Data is read in 2 MiB chunks and scanned for zeros as QEMU scans it (by sectors,
  runs aligned to ``min_sparse``, ``-S``, 4 KiB by default): zero runs are treated
  as zero ranges, so a written block of zeros is not copied either.
  ``min_sparse=0`` turns all of this off and every byte, zero ranges included, is
  written as data (a fully allocated target).
* Zero ranges are left alone on a new target without a backing file (it reads as
  zeros already: unallocated clusters, holes); elsewhere (``-n``, ``-B``) they are
  written with ``write_zeroes`` (zero clusters on v3, holes punched in raw).
* ``compress=True`` (``-c``) writes whole target clusters compressed (zlib or zstd,
  the target's ``compression_type``); a cluster that is all zeros is a zero range.

The copy is pipelined: workers each take the next chunk of at most :data:`CHUNK`
bytes (with zero detection, in order, without ``compress``: up to :data:`GROUP`
contiguous data chunks, with ``parallel // GROUP`` workers), read it through the image
API and write it; reads of different workers overlap, and unless ``unordered``
(``-W``) each chunk's writes wait for the previous chunk's, so the target's clusters
are allocated in guest order as QEMU's are. Memory in flight is bounded: chunk
buffers of ``parallel * CHUNK`` bytes (16 MiB by default; at least one worker's
``GROUP * CHUNK``) plus, with ``compress``, the compressed clusters of the chunks
being written. Compression runs in the I/O threads (zlib and
zstd release the GIL), the clusters of a chunk at once, so it uses every core.

Progress (``progress(done, total)``) counts target bytes: ``total`` is the target's
size, a chunk counts when its writes are done, and skipped ranges count as soon as
they are classified.

Cancelling the coroutine stops the workers; writes already started finish (the
image API shields a write's data-then-link steps), the target is closed (flushed) and
is a consistent image that ``qemu-img check`` accepts, holding part of the copy.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import os
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backing import RAW_FORMATS, RawImage, probe_format
from ..blockstatus import block_status
from ..create import create
from ..errors import Qcow2Error, Qcow2IOError, Qcow2RangeError, Qcow2UnsupportedError
from ..image import Image
from .progress import Counter, Progress
from .raw import EarlyWriteback, RawTarget

CHUNK = 2 << 20
"""Bytes one worker reads and writes at a time (QEMU's convert buffer is 2 MiB too)."""

MAX_PARALLEL = 16
GROUP = 4
"""Consecutive data chunks one worker reads and writes together (with ``parallel // GROUP``
workers, so the same bytes are in flight): a data run that crosses a chunk boundary is
then one write, not one per chunk (the half-zero GiB: 561 writes instead of 737)."""
MAX_MIN_SPARSE = 16 << 20

# Range kinds in the target.
DATA = 0
ZEROS = 1
SKIP = 2

Passphrase = str | bytes | None
StrPath = str | os.PathLike[str]


@dataclass(slots=True)
class _Source:
    img: Image | RawImage
    base: int  # where it starts in the target
    size: int  # its length in the target (rounded up to 512)
    real_size: int  # bytes that can be read (a raw file's size may not be a sector multiple)


Target = Image | RawTarget


def _round512(n: int) -> int:
    return (n + 511) & ~511


def _layer_status(
    img: Image | RawImage, offset: int, length: int, top_only: bool
) -> Iterator[tuple[int, int, int]]:
    """``(offset, length, kind)`` runs of ``img`` over ``[offset, offset+length)``,
    from the chain's block status (what ``qemu-img map`` reports): reads as zeros ->
    ZEROS (QEMU's convert asks for the zero flag first), else data -> DATA, else
    (allocated nowhere) ZEROS. With ``top_only`` a range the top layer leaves to its
    backing file is SKIP (past the backing file's end it reads as zeros: ZEROS)."""
    for st in block_status(img, offset, length):
        if top_only and st.depth > 0:
            kind = SKIP
        elif st.zero or not st.data:
            kind = ZEROS
        else:
            kind = DATA
        yield st.start, st.length, kind


def _runs(sources: Sequence[_Source], top_only: bool) -> Iterator[tuple[int, int, int]]:
    """Merged ``(target offset, length, kind)`` runs over all the sources in order."""
    cur: list[int] | None = None
    for src in sources:
        # Ask for status a piece at a time, so a plan stays small: at most 16384
        # clusters' worth (a GiB of 64 KiB clusters; less with smaller ones).
        cs = src.img.cluster_size if isinstance(src.img, Image) else 65536
        step = cs * 16384
        pos = 0
        while pos < src.size:
            n = min(step, src.size - pos)
            # A raw file's last partial sector: past its end the target reads zeros.
            known = max(0, min(n, src.real_size - pos))
            runs = list(_layer_status(src.img, pos, known, top_only)) if known else []
            if known < n:
                runs.append((pos + known, n - known, ZEROS))
            for off, length, kind in runs:
                start = src.base + off
                # Runs of data stay apart, as QEMU's block status extents: the zero
                # scan of a chunk depends on where it starts.
                if cur is not None and cur[2] == kind != DATA and cur[0] + cur[1] == start:
                    cur[1] += length
                    continue
                if cur is not None:
                    yield cur[0], cur[1], cur[2]
                cur = [start, length, kind]
            pos += n
    if cur is not None:
        yield cur[0], cur[1], cur[2]


_ZERO_BLOCK = bytes(64 << 10)
_BLOCK_SECTORS = len(_ZERO_BLOCK) // 512


def _nonzero_sectors(buf: bytearray, full: int, at: int = 0) -> Any:
    """Which of the ``full`` 512-byte sectors of ``buf`` from byte ``at`` (a multiple
    of 512) hold a nonzero byte (a numpy bool array). A sector whose first 8 bytes
    are not all zero is data (one strided look per sector: nearly every data sector is
    decided so); 64 KiB blocks that are all zeros are found with ``memcmp``
    (``bytearray.startswith``, no copy); only the sectors left (first 8 bytes zero, in
    a block that is not all zeros) are read whole. The same answer as OR-ing every
    word of every sector, at less than half its cost on data that is half zeros (1 GiB:
    about 0.15 s against 0.3 s)."""
    words = np.frombuffer(buf, dtype=np.uint64, count=full * 64, offset=at).reshape(full, 64)
    nonzero = words[:, 0] != 0
    maybe = ~nonzero
    if not maybe.any():
        return nonzero
    blocks = full // _BLOCK_SECTORS
    if blocks:
        zero_blocks = np.fromiter(
            (buf.startswith(_ZERO_BLOCK, at + i * len(_ZERO_BLOCK)) for i in range(blocks)),
            dtype=np.bool_,
            count=blocks,
        )
        if zero_blocks.any():
            maybe[: blocks * _BLOCK_SECTORS] &= ~np.repeat(zero_blocks, _BLOCK_SECTORS)
    todo = np.flatnonzero(maybe)
    if todo.size:
        nonzero[todo] = np.bitwise_or.reduce(words[todo], axis=1) != 0
    return nonzero


@dataclass(slots=True)
class _Item:
    """A piece of work: a target range of one kind (DATA ranges at most CHUNK)."""

    seq: int
    offset: int
    length: int
    kind: int


class _Job:
    """One conversion: the sources, the target, and the workers' shared state."""

    def __init__(
        self,
        sources: list[_Source],
        target: Target,
        *,
        compress: bool,
        min_sparse: int,
        parallel: int,
        unordered: bool,
        zero_init: bool,
        zero_from: int,
        preallocated: bool,
        top_only: bool,
        counter: Counter,
    ) -> None:
        self.sources = sources
        self.target = target
        self.compress = compress
        self.min_sparse = min_sparse
        self.parallel = parallel
        self.unordered = unordered
        self.zero_init = zero_init
        # A new overlay reads as zeros past the end of its backing file: QEMU does not
        # write zeros there, nor do we.
        self.zero_from = zero_from
        self.top_only = top_only
        self.counter = counter
        self.total = sum(s.size for s in sources)
        self.cluster = target.cluster_size
        # The unit of zero detection: QEMU scans in -S sized units aligned to the
        # largest power of two not above it.
        unit = 1
        while unit * 2 <= max(min_sparse, 512):
            unit *= 2
        self.unit = unit
        # The target's allocation granularity: data is written in whole units of it.
        if compress:
            self.gran = self.cluster
        elif isinstance(target, Image) and not preallocated:
            self.gran = 1 << target.meta.subcluster_bits
        else:
            self.gran = 1
        self._items = self._plan()
        self._ahead: _Item | None = None  # an item pulled by _group() but not taken
        # Chunks per worker (see GROUP): grouped only where the scan decides what is
        # written, in order; compression writes cluster by cluster anyway.
        self.group = GROUP if (min_sparse and not compress and not unordered) else 1
        self.writeback: EarlyWriteback | None = None
        self._next_write = 0
        self._turns: dict[int, asyncio.Future[None]] = {}

    # ------------------------------------------------------------ planning
    def _plan(self) -> Iterator[_Item]:
        """The work items, in target order. Pulled lazily by the workers (it never
        awaits: the event loop runs one worker's ``next()`` at a time).

        Data ranges grow to whole units of the target's allocation granularity
        (:attr:`gran`: a compressed cluster, a cluster, a subcluster with extended L2)
        and are cut into CHUNK-aligned items. Reading the zeros next to data costs
        little, and a cluster is then written whole, with no hole left in its host
        cluster, as QEMU's copy-on-write leaves none. Zero ranges are items only when
        they must be written (no zero-initialised target); skipped ranges are counted
        as done at once.
        """
        g = self.gran
        seq = 0
        pending: list[int] | None = None  # [start, end) of data being grown
        held: list[tuple[int, int, int]] = []  # zero/skip runs after it, not yet sure
        data_end = 0  # the end of the data planned so far

        def data_items(start: int, end: int) -> Iterator[_Item]:
            nonlocal seq
            pos = start
            while pos < end:
                n = min(end - pos, CHUNK)  # QEMU's buffers: 2 MiB from the extent start
                yield _Item(seq, pos, n, DATA)
                seq += 1
                pos += n

        def other_items(runs: list[tuple[int, int, int]]) -> Iterator[_Item]:
            nonlocal seq
            for off, end, kind in runs:
                if end <= off:
                    continue
                if kind != SKIP and not self.zero_init and off < self.zero_from:
                    stop = min(end, self.zero_from)
                    yield _Item(seq, off, stop - off, ZEROS)
                    seq += 1
                    off = stop
                self.counter.add(end - off)

        skip_end = 0  # data is not grown over ranges the target's backing file answers
        for off, length, kind in _runs(self.sources, self.top_only):
            end = off + length
            if kind == SKIP and not self.compress:
                # The rest of a cluster next to it comes from the target's backing file
                # (copy-on-write, as in QEMU), not from the source: do not grow into it.
                if pending is not None and pending[1] > off:
                    pending[1] = max(pending[0], off)
                    data_end = pending[1]
                skip_end = end
            if kind == DATA or (kind == ZEROS and not self.min_sparse):
                start = max(data_end, skip_end, off - off % g)
                stop = min(self.total, -(-end // g) * g)
                if pending is not None and start < pending[1]:
                    pending[1] = max(pending[1], stop)  # the runs held meanwhile are inside
                elif pending is not None and start == pending[1] and not held:
                    yield from data_items(pending[0], pending[1])
                    pending = [start, stop]
                else:
                    if pending is not None:
                        yield from data_items(pending[0], pending[1])
                    yield from other_items([(o, min(e, start), k) for o, e, k in held])
                    pending = [start, stop]
                held = []
                data_end = pending[1]
                continue
            off = max(off, data_end)
            if off < end:
                held.append((off, end, kind))
        if pending is not None:
            yield from data_items(pending[0], pending[1])
        yield from other_items(held)

    # ------------------------------------------------------------- workers
    async def run(self) -> None:
        n = max(1, self.parallel // self.group)
        workers = [asyncio.ensure_future(self._worker()) for _ in range(n)]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise

    def _group(self) -> list[_Item]:
        """The next work: one item, or up to :attr:`group` consecutive data items that
        are contiguous in the target (pulled from the planner without awaiting)."""
        first = self._ahead if self._ahead is not None else next(self._items, None)
        self._ahead = None
        if first is None:
            return []
        items = [first]
        while first.kind == DATA and len(items) < self.group:
            nxt = next(self._items, None)
            if nxt is None:
                break
            last = items[-1]
            if nxt.kind != DATA or nxt.offset != last.offset + last.length:
                self._ahead = nxt
                break
            items.append(nxt)
        return items

    async def _worker(self) -> None:
        buf = bytearray(CHUNK * self.group)
        view = memoryview(buf)
        while items := self._group():
            first, last = items[0], items[-1]
            runs: list[tuple[int, int, bool]] | None = None
            if first.kind == DATA:
                scan = bool(self.min_sparse) and not self.compress
                runs = [] if scan else None
                for item in items:
                    pos = item.offset - first.offset
                    try:
                        await self._read(item.offset, view[pos : pos + item.length])
                    except Qcow2IOError as exc:
                        raise _qemu_io_error("reading", item.offset, exc) from exc
                    if runs is not None:
                        # Scanned chunk by chunk as QEMU does, here, before waiting for
                        # the turn to write: inline (a hop to a thread per chunk cost
                        # more than the scan) while earlier writes are in flight.
                        found = self._zero_runs(buf, item.length, item.offset, pos)
                        for a, b, z in self._widen(found, item.offset, item.length):
                            _add_run(runs, pos + a, pos + b, z)
            await self._turn(first.seq)
            length = last.offset + last.length - first.offset
            try:
                if first.kind == DATA:
                    await self._write_data(first.offset, buf, length, runs)
                else:
                    await self._zeroes(first.offset, first.length)
            except _WriteFailed as failed:
                # qemu-img names the chunk whose write failed: the one the request starts in.
                at = max(i.offset for i in items if i.offset <= failed.offset)
                raise _qemu_io_error("writing", at, failed.error) from failed.error
            except Qcow2IOError as exc:
                raise _qemu_io_error("writing", first.offset, exc) from exc
            finally:
                self._done(last.seq)
            self.counter.add(length)
            if first.kind == DATA and self.writeback is not None:
                # After passing the turn on: the hint (a system call in a thread, which
                # may wait for the device's queue) holds up no other worker's writes.
                await self.writeback.wrote(length)

    async def _turn(self, seq: int) -> None:
        """Wait until every earlier item has been written (unless unordered)."""
        if self.unordered or seq == self._next_write:
            return
        fut = asyncio.get_running_loop().create_future()
        self._turns[seq] = fut
        await fut

    def _done(self, seq: int) -> None:
        if self.unordered:
            return
        self._next_write = seq + 1
        fut = self._turns.pop(seq + 1, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _read(self, offset: int, view: memoryview) -> None:
        """Read the target range ``[offset, offset+len(view))`` from the sources."""
        end = offset + len(view)
        for src in self.sources:
            a = max(offset, src.base)
            b = min(end, src.base + src.size)
            if a >= b:
                continue
            part = view[a - offset : b - offset]
            readable = max(0, min(b, src.base + src.real_size) - a)
            if readable:
                await src.img.readinto(part[:readable], a - src.base)
            if readable < len(part):
                part[readable:] = bytes(len(part) - readable)

    def _zero_runs(
        self, buf: bytearray, length: int, offset: int, at: int = 0
    ) -> list[tuple[int, int, bool]]:
        """Split the chunk ``buf[at:at+length]`` (at target ``offset``) into ``(start, end,
        zero)`` runs as QEMU 7.2's convert does (observed, and as its documentation of
        ``is_allocated_sectors`` describes): by 512-byte sectors; a run's end is moved
        to the alignment (the largest power of two not above ``-S``): up for data, down
        for zeros, and a zero run that would vanish so is data; after data, zero runs
        shorter than ``-S`` are data too (a chunk shorter than ``-S`` takes its length
        as the minimum). Whether each sector is zero is found with numpy
        (:func:`_nonzero_sectors`).
        """
        full = length // 512
        nsec = -(-length // 512)
        nonzero = np.zeros(nsec, dtype=np.bool_)
        if full:
            nonzero[:full] = _nonzero_sectors(buf, full, at)
        if nsec > full:  # a raw file's partial last sector
            nonzero[full] = any(buf[at + full * 512 : at + length])
        # Where the zero/nonzero state changes: runs are looked up, never walked.
        changes = (np.flatnonzero(nonzero[1:] != nonzero[:-1]) + 1).tolist()
        changes.append(nsec)
        align = max(1, self.unit // 512)
        min_sparse = self.min_sparse // 512
        sector0 = offset // 512

        def allocated(i: int, n: int) -> tuple[bool, int]:
            """``is_allocated_sectors`` of the n sectors from sector i of the chunk."""
            zero = not nonzero[i]
            run = min(changes[bisect.bisect_right(changes, i)], i + n) - i
            if run == n:
                return not zero, n
            tail = (sector0 + i + run) & (align - 1)
            if tail:
                if zero and run <= tail:
                    zero = False
                run = min(run + align - tail, n) if not zero else run - tail
            return not zero, run

        out: list[tuple[int, int, bool]] = []
        i = 0
        while i < nsec:
            n = nsec - i
            least = min(min_sparse, n)
            data, used = allocated(i, n)
            if data:  # is_allocated_sectors_min: small zero gaps after data stay data
                checked = used
                while checked < n:
                    more, k = allocated(i + checked, n - checked)
                    checked += k
                    if more:
                        used = checked
                    elif k >= least:
                        break
            stop = min(length, (i + used) * 512)
            if out and out[-1][2] == (not data):
                out[-1] = (out[-1][0], stop, not data)
            else:
                out.append((i * 512, stop, not data))
            i += used
        return out

    def _widen(
        self, runs: list[tuple[int, int, bool]], offset: int, length: int
    ) -> list[tuple[int, int, bool]]:
        """Grow the data runs to whole allocation units of the target (:attr:`gran`):
        a cluster that gets any data is written whole (see :meth:`_plan`)."""
        g = self.gran
        if g <= 1:
            return runs
        data: list[tuple[int, int]] = []
        for a, b, z in runs:
            if z:
                continue
            a = max(0, (offset + a) // g * g - offset)
            b = min(length, -(-(offset + b) // g) * g - offset)
            if data and a <= data[-1][1]:
                data[-1] = (data[-1][0], max(b, data[-1][1]))
            else:
                data.append((a, b))
        out: list[tuple[int, int, bool]] = []
        pos = 0
        for a, b in data:
            if a > pos:
                out.append((pos, a, True))
            out.append((a, b, False))
            pos = b
        if pos < length:
            out.append((pos, length, True))
        return out

    async def _zeroes(self, offset: int, length: int, *, in_data: bool = False) -> None:
        """Zeros the target must be told about (not zero-initialised, not past the end
        of a new overlay's backing file, unless ``in_data``: QEMU writes the zeros it
        finds inside data it copies even there, which an extended-L2 target shows as
        zero subclusters)."""
        if not in_data:
            length = min(offset + length, self.zero_from) - offset
        if length <= 0 or self.zero_init:
            return
        target = self.target
        if isinstance(target, Image) and target.meta.version < 3 and target.backing is None:
            # A v2 image has no zero flag, but without a backing file an unallocated
            # cluster reads as zeros: QEMU zeroes whole clusters there by discarding
            # them (and writes zeros only into partial ones).
            cs = target.cluster_size
            a = min(offset + length, -(-offset // cs) * cs)
            end = offset + length
            b = end if end == target.size else max(a, end // cs * cs)
            if b > a:
                await target.discard(a, b - a)
            for off, n in ((offset, a - offset), (b, end - b)):
                if n > 0:
                    await target.write(off, bytes(n))
            return
        await target.write_zeroes(offset, length, unmap=True)

    async def _write_data(
        self, offset: int, buf: bytearray, length: int, runs: list[tuple[int, int, bool]] | None
    ) -> None:
        """Write a worker's chunks: compressed, or their data ``runs`` (:meth:`_zero_runs`,
        widened; None: all of it, ``-S 0``) with the zero runs between them as zero
        ranges. A failure is raised as :class:`_WriteFailed` naming where the failed
        request starts."""
        view = memoryview(buf)
        if self.compress:
            await self._write_compressed(offset, buf, length)
            return
        if runs is None:
            await self.target.write(offset, view[:length])
            return
        for a, b, z in runs:
            try:
                if not z:
                    await self.target.write(offset + a, view[a:b])
                else:
                    await self._zeroes(offset + a, b - a, in_data=True)
            except Qcow2IOError as exc:
                raise _WriteFailed(offset + a, exc) from exc

    async def _write_compressed(self, offset: int, buf: bytearray, length: int) -> None:
        """Compress the chunk's clusters at once (I/O threads), zeros as zero ranges."""
        target = self.target
        assert isinstance(target, Image)
        view = memoryview(buf)
        cs = self.cluster
        writes: list[Awaitable[object]] = []
        for pos in range(0, length, cs):
            n = min(cs, length - pos)
            if self.min_sparse and buf.startswith(bytes(n), pos, pos + n):
                writes.append(self._zeroes(offset + pos, n))
                continue
            writes.append(target.write_compressed(offset + pos, view[pos : pos + n]))
        results = await asyncio.gather(*writes, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r


class _WriteFailed(Exception):
    """A write of a worker's chunks failed at target ``offset`` (internal: the worker
    reports it with qemu-img's words and the offset of the chunk it started in)."""

    def __init__(self, offset: int, error: Qcow2IOError) -> None:
        super().__init__(offset, error)
        self.offset = offset
        self.error = error


def _add_run(runs: list[tuple[int, int, bool]], a: int, b: int, zero: bool) -> None:
    """Append ``(a, b, zero)``; a data run that continues the previous one (the next
    chunk's first run after the last one's data) joins it: one write. Zero runs stay
    per chunk, as the chunks report them."""
    if runs and not zero and not runs[-1][2] and runs[-1][1] == a:
        runs[-1] = (runs[-1][0], b, False)
    else:
        runs.append((a, b, zero))


def _qemu_io_error(what: str, offset: int, exc: Qcow2IOError) -> Qcow2IOError:
    """qemu-img's words for a failed read or write of a chunk (errno kept)."""
    code = exc.errno if exc.errno is not None else errno.EIO
    return Qcow2IOError(f"error while {what} at byte {offset}: {os.strerror(code)}", code)


SourceArg = StrPath | Image | RawImage


def _as_list(sources: SourceArg | Sequence[SourceArg]) -> list[str | Image | RawImage]:
    if isinstance(sources, str | os.PathLike | Image | RawImage):
        sources = [sources]
    return [s if isinstance(s, Image | RawImage) else os.fspath(s) for s in sources]


def _per_source(value: Any, n: int) -> list[Any]:
    """One value for every source, or a sequence with one per source."""
    if value is None or isinstance(value, str | bytes):
        return [value] * n
    seq = list(value)
    if len(seq) != n:
        raise ValueError(f"{len(seq)} values given for {n} sources")
    return seq


def open_source(
    path: str,
    fmt: str | None,
    passphrase: Passphrase = None,
    backing_passphrase: Any = None,
) -> Image | RawImage:
    """Open one source read-only: ``fmt`` "qcow2" or "raw" (None: probe as QEMU does)."""
    if fmt is None:
        fmt = probe_format(path)
    if fmt == "qcow2":
        return Image(path, "r", passphrase=passphrase, backing_passphrase=backing_passphrase)
    if fmt in RAW_FORMATS:
        return RawImage(path)
    raise Qcow2UnsupportedError(f"Unknown file format '{fmt}'")


def create_options(options: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """``qcow2aio.create`` keywords from ``options``: a mapping of its keywords (QEMU's
    ``-o`` names are accepted too: ``cluster_size``, ``compat``, ``extended_l2``...) or
    an ``-o`` string (``"cluster_size=4k,compat=0.10"``, QEMU's syntax)."""
    if options is None:
        return {}
    if isinstance(options, str):
        from ..cli.convert import create_kwargs_from_text

        return create_kwargs_from_text(options)
    return {k.replace("-", "_").replace(".", "_"): v for k, v in options.items()}


@dataclass(slots=True)
class _Opened:
    sources: list[_Source]
    target: Target
    zero_init: bool
    has_backing: bool  # the target is an overlay: copy only the sources' top layers
    zero_from: int  # zeros from here on need not be written (new overlay: its backing's end)
    # Target clusters exist already (preallocated qcow2): writes go in place, with no
    # copy-on-write to fill the rest of a cluster, so data is not widened to clusters.
    preallocated: bool = False


async def _open_all(
    stack: AsyncExitStack,
    paths: list[str | Image | RawImage],
    target: str | Image,
    *,
    source_format: str | Sequence[str | None] | None,
    target_format: str,
    compress: bool,
    options: Mapping[str, Any] | str | None,
    backing: str | None,
    backing_format: str | None,
    min_sparse: int,
    target_exists: bool,
    source_passphrase: Any,
    source_backing_passphrase: Any,
    target_passphrase: Passphrase,
) -> _Opened:
    fmts = _per_source(source_format, len(paths))
    secrets = _per_source(source_passphrase, len(paths))
    below = (
        [source_backing_passphrase] * len(paths)
        if not isinstance(source_backing_passphrase, list | tuple)
        else list(source_backing_passphrase)
    )
    sources: list[_Source] = []
    base = 0
    for path, fmt, secret, bsecret in zip(paths, fmts, secrets, below, strict=False):
        if isinstance(path, Image | RawImage):
            img = path  # the caller's open image: used as it is, and left open
        else:
            img = open_source(path, fmt, secret, bsecret)
            stack.callback(img.close)
        size = _round512(img.size)
        sources.append(_Source(img, base, size, img.size))
        base += size
    total = base
    if target_exists:
        if options:
            raise Qcow2UnsupportedError("-o has no effect when skipping image creation")
        tgt: Target
        if isinstance(target, Image):
            if not target.writable:
                raise Qcow2UnsupportedError(f"target {target.path!r} is open read-only")
            tgt = target  # the caller's: flushed at the end, left open
        elif target_format == "qcow2":
            tgt = Image(target, "r+", passphrase=target_passphrase)
            stack.push_async_callback(tgt.aclose)
        else:
            tgt = RawTarget(target)
            stack.callback(tgt.close)
        if tgt.size < total:
            raise Qcow2RangeError("output file is smaller than input file")
        if compress and isinstance(tgt, RawTarget):
            raise Qcow2UnsupportedError("Compression not supported for this file format")
        return _Opened(sources, tgt, False, backing is not None, total)
    assert not isinstance(target, Image)  # an open target implies target_exists
    if target_format == "qcow2":
        kwargs = create_options(options)
        if backing is not None:
            kwargs["backing_file"] = backing
            kwargs["backing_fmt"] = backing_format
        if target_passphrase is not None:
            kwargs.setdefault("passphrase", target_passphrase)
        try:
            create(target, total, **kwargs)
        except Qcow2Error as exc:
            # qemu-img's words for a failed creation of the target.
            raise type(exc)(f"{target}: error while converting qcow2: {exc}") from exc
        tgt = Image(target, "r+", passphrase=kwargs.get("passphrase"))
        stack.push_async_callback(tgt.aclose)
        has_backing = tgt.backing is not None
        zero_from = tgt.backing.size if tgt.backing is not None else total
        preallocated = kwargs.get("preallocation", "off") != "off"
        zero_init = bool(min_sparse) and not has_backing
        return _Opened(sources, tgt, zero_init, has_backing, zero_from, preallocated)
    prealloc = _raw_preallocation(options, target)
    raw = RawTarget(target, create=True, size=total, preallocation=prealloc)
    stack.callback(raw.close)
    return _Opened(sources, raw, bool(min_sparse), False, total)


def _raw_preallocation(options: Mapping[str, Any] | str | None, target: str) -> str:
    """The raw format's only creation option besides the size (qemu-img's messages)."""
    if options is None:
        return "off"
    if isinstance(options, str):
        pairs = [item.split("=", 1) for item in options.split(",") if item]
        items = {k: (v[0] if v else "on") for k, *v in pairs}
    else:
        items = {str(k): v for k, v in options.items()}
    for name in items:
        if name not in ("size", "preallocation"):
            raise Qcow2UnsupportedError(f"Invalid parameter '{name}'")
    mode = str(items.get("preallocation", "off"))
    if mode in ("metadata",):
        raise Qcow2UnsupportedError(
            f"{target}: error while converting raw: Unsupported preallocation mode: {mode}"
        )
    if mode not in ("off", "falloc", "full"):
        raise Qcow2UnsupportedError(
            f"{target}: error while converting raw: invalid parameter value: {mode}"
        )
    return mode


def _check_args(
    target_format: str,
    compress: bool,
    backing: str | None,
    backing_format: str | None,
    min_sparse: int,
    parallel: int,
    target_exists: bool,
) -> None:
    """The refusals qemu-img makes before opening anything (its messages)."""
    if target_format not in ("qcow2", *RAW_FORMATS):
        raise Qcow2UnsupportedError(f"Unknown file format '{target_format}'")
    if compress and target_format != "qcow2":
        raise Qcow2UnsupportedError("Compression not supported for this file format")
    if not 1 <= parallel <= MAX_PARALLEL:
        raise ValueError(
            "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"
        )
    if min_sparse < 0 or min_sparse % 512 or min_sparse > MAX_MIN_SPARSE:
        raise ValueError(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of "
            "512 up to 16777216. Select 0 to disable sparse detection (fully allocates output)."
        )
    if backing is not None and target_format != "qcow2":
        raise Qcow2UnsupportedError(f"Backing file not supported for file format '{target_format}'")
    if backing is not None and backing_format is None and not target_exists:
        raise Qcow2UnsupportedError("Use of backing file requires explicit backing format")


async def convert(
    sources: SourceArg | Sequence[SourceArg],
    target: StrPath | Image,
    *,
    source_format: str | Sequence[str | None] | None = None,
    target_format: str = "raw",
    compress: bool = False,
    options: Mapping[str, Any] | str | None = None,
    backing: str | None = None,
    backing_format: str | None = None,
    min_sparse: int = 4096,
    parallel: int = 8,
    unordered: bool = False,
    target_exists: bool = False,
    source_passphrase: Any = None,
    source_backing_passphrase: Any = None,
    target_passphrase: Passphrase = None,
    progress: Progress | None = None,
) -> None:
    """Copy ``sources`` (concatenated) into ``target``, as ``qemu-img convert``.

    A source is a file name or an open :class:`~qcow2aio.Image` /
    :class:`~qcow2aio.backing.RawImage` (used as it is and left open, so a service
    can copy an image it is serving); ``target`` may be an open writable ``Image``
    (then ``target_exists`` is implied; it is flushed, not closed).
    ``source_format`` ("qcow2", "raw"; None probes, as QEMU does) may be one value or
    one per source; ``target_format`` is qemu-img's ``-O`` (default "raw", as
    qemu-img). ``compress`` = ``-c`` (qcow2 targets only). ``options`` = ``-o``: a
    mapping of :func:`qcow2aio.create` keywords, or QEMU's ``key=value,...`` text.
    ``backing``/``backing_format`` = ``-B``/``-F``: the new target is an overlay of
    that file and receives only what the sources' top layers hold. ``min_sparse`` =
    ``-S`` in bytes (0: allocate everything). ``parallel`` = ``-m`` (1..16 chunks in
    flight), ``unordered`` = ``-W`` (writes need not wait for earlier chunks).
    ``target_exists`` = ``-n``: write into the existing ``target`` (its format is
    ``target_format``; it must be at least as large). ``source_passphrase`` (one, or
    one per source) and ``source_backing_passphrase`` open encrypted sources
    (``Image``'s ``passphrase``/``backing_passphrase``); ``target_passphrase`` opens
    an existing encrypted target or encrypts a new one (with
    ``options={"encrypt_format": "luks"}``).

    Memory in flight is bounded: ``parallel * CHUNK`` bytes of buffers (2 MiB per
    request; at least one worker's ``GROUP * CHUNK``), plus the compressed clusters
    being written. ``progress(done, total)`` counts
    target bytes (see :mod:`qcow2aio.tools.progress`). Errors are
    :class:`qcow2aio.Qcow2Error` (or ``ValueError`` for bad arguments); the target is
    closed either way and, after a failure or a cancellation, is a consistent image
    holding part of the copy.
    """
    paths = _as_list(sources)
    if not paths:
        raise ValueError("convert needs at least one source")
    if isinstance(target, Image):
        target_exists = True
        target_format = "qcow2"
    else:
        target = os.fspath(target)
    _check_args(
        target_format, compress, backing, backing_format, min_sparse, parallel, target_exists
    )
    async with AsyncExitStack() as stack:
        opened = await _open_all(
            stack,
            paths,
            target,
            source_format=source_format,
            target_format=target_format,
            compress=compress,
            options=options,
            backing=backing,
            backing_format=backing_format,
            min_sparse=min_sparse,
            target_exists=target_exists,
            source_passphrase=source_passphrase,
            source_backing_passphrase=source_backing_passphrase,
            target_passphrase=target_passphrase,
        )
        total = sum(s.size for s in opened.sources)
        counter = Counter(total, progress)
        job = _Job(
            opened.sources,
            opened.target,
            compress=compress,
            min_sparse=min_sparse,
            parallel=parallel,
            unordered=unordered,
            zero_init=opened.zero_init,
            zero_from=opened.zero_from,
            preallocated=opened.preallocated,
            top_only=opened.has_backing,
            counter=counter,
        )
        job.writeback = EarlyWriteback(target.path if isinstance(target, Image) else target)
        try:
            await job.run()
        finally:
            job.writeback.close()
        await opened.target.flush()
        counter.complete()


def convert_sync(*args: Any, **kwargs: Any) -> None:
    """:func:`convert` from synchronous code: runs it on a new event loop in this
    thread (so not from a thread whose loop is running: use ``await convert``)."""
    asyncio.run(convert(*args, **kwargs))


__all__ = ["CHUNK", "convert", "convert_sync", "create_options", "open_source"]
