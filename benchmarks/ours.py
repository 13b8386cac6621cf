"""Our side: the same request stream through qcow2aio, synchronous and async.

Timed window, like ``qemu-img bench``'s: from the first request to the
completion of the last. Opening the image, computing the offsets and closing
(which flushes a writable image) are outside it; nothing inside it flushes,
because ``qemu-img bench -t writeback`` without ``--flush-interval`` does not.
The async run keeps ``depth`` requests in flight: ``depth`` coroutines pull the
next offset from one shared iterator and ``await`` one request at a time, with the
I/O engine users get (``qcow2aio.open(path)``: small writes and cached reads inline,
the rest through aiofiles on qcow2aio's own executor; ``FastFileBackend`` is now the same class).
Read streams also run through ``await readinto``, each coroutine reading into its
own buffer: the API for bulk reads, which returns no new ``bytes``.
An encrypted image is opened with its ``passphrase`` (unlocking is outside the window).
"""

from __future__ import annotations

import asyncio
import gc
import time

import qcow2aio

from .qemu import PATTERN
from .stream import Stream


def run_sync(path: str, stream: Stream, *, passphrase: str | None = None) -> float:
    """``read_sync``/``write_sync`` over the stream; returns the seconds of the request loop."""
    offsets = stream.offset_list()
    size = stream.size
    img = qcow2aio.open(path, "r+" if stream.write else "r", passphrase=passphrase)
    try:
        gc.collect()
        if stream.write:
            data = bytes([PATTERN]) * size
            write = img.write_sync
            t0 = time.perf_counter()
            for off in offsets:
                write(off, data)
            return time.perf_counter() - t0
        read = img.read_sync
        t0 = time.perf_counter()
        for off in offsets:
            read(off, size)
        return time.perf_counter() - t0
    finally:
        img.close()


async def _run_async(
    path: str, stream: Stream, depth: int, into: bool, passphrase: str | None
) -> float:
    offsets = iter(stream.offset_list())
    size = stream.size
    img = qcow2aio.open(path, "r+" if stream.write else "r", passphrase=passphrase)
    try:
        if stream.write:
            data = bytes([PATTERN]) * size
            write = img.write

            async def worker() -> None:
                for off in offsets:
                    await write(off, data)

        elif into:
            readinto = img.readinto

            async def worker() -> None:
                view = memoryview(bytearray(size))
                for off in offsets:
                    await readinto(view, off)

        else:
            read = img.read

            async def worker() -> None:
                for off in offsets:
                    await read(off, size)

        gc.collect()
        t0 = time.perf_counter()
        if depth == 1:
            await worker()
        else:
            await asyncio.gather(*(worker() for _ in range(depth)))
        return time.perf_counter() - t0
    finally:
        await img.aclose()


def run_async(
    path: str, stream: Stream, depth: int, *, into: bool = False, passphrase: str | None = None
) -> float:
    """``await read/write`` with ``depth`` requests in flight; seconds of the request loop.

    ``into`` reads with ``await readinto`` into a buffer per coroutine instead of
    ``await read``."""
    if into and stream.write:
        raise ValueError("readinto is for read streams")
    return asyncio.run(_run_async(path, stream, depth, into, passphrase))
