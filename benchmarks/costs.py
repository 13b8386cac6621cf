"""Python-level cost per request: qcow2aio's calls next to the bare system calls they need.

``python -m benchmarks.costs [--quick]`` times each operation in-process on
images made by ``qemu-img`` (page cache warm) and prints microseconds per
request: wall clock, and CPU time split into user and system. The ``os.*`` rows
are the floor (the system calls alone, no qcow2 work); the difference between a
qcow2aio row and its floor is what the Python layer costs. CPU time is the
steadier figure on a shared machine: it does not count time spent waiting for
a CPU or for another thread.

The last rows are encrypted images (LUKS aes-256-xts and legacy AES, made by
``qemu-img``), after the sector ciphers alone on the same sizes (their floor).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import mmap
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import qcow2aio
from qcow2aio.crypto.ciphers import SectorCipher, legacy_aes_cipher, make_cipher
from qcow2aio.io import BackendFactory

from . import qemu
from .runner import write_compressible
from .stream import RANDOM_STEP_4K, KiB, MiB, Stream


@dataclass
class Cost:
    name: str
    wall_us: float
    user_us: float
    sys_us: float

    def line(self) -> str:
        cpu = self.user_us + self.sys_us
        return (
            f"{self.name:52} {self.wall_us:9.2f} {cpu:9.2f} {self.user_us:9.2f} {self.sys_us:9.2f}"
        )


def _measure(name: str, n: int, run: Callable[[], None]) -> Cost:
    gc.collect()
    t0 = resource.getrusage(resource.RUSAGE_SELF)
    w0 = time.perf_counter()
    run()
    w1 = time.perf_counter()
    t1 = resource.getrusage(resource.RUSAGE_SELF)
    return Cost(
        name,
        (w1 - w0) / n * 1e6,
        (t1.ru_utime - t0.ru_utime) / n * 1e6,
        (t1.ru_stime - t0.ru_stime) / n * 1e6,
    )


Setup = Callable[[], "Callable[[], None] | tuple[Callable[[], None], Callable[[], None]]"]


def _best(name: str, n: int, make: Setup, reps: int) -> Cost:
    """The repetition with the least CPU time (the least disturbed one).

    ``make()`` prepares one repetition (untimed) and returns the timed function, or
    (timed function, untimed clean-up).
    """
    runs = []
    for _ in range(reps):
        made = make()
        run, done = made if isinstance(made, tuple) else (made, None)
        runs.append(_measure(name, n, run))
        if done is not None:
            done()
    return min(runs, key=lambda c: c.user_us + c.sys_us)


def _async_case(
    open_image: Callable[[], qcow2aio.Image], body: Callable[[qcow2aio.Image], Awaitable[None]]
) -> Setup:
    """Open (untimed), run ``body`` on an event loop (timed), close (untimed)."""

    def make() -> tuple[Callable[[], None], Callable[[], None]]:
        loop = asyncio.new_event_loop()
        im = open_image()

        def run() -> None:
            loop.run_until_complete(body(im))

        def done() -> None:
            loop.run_until_complete(im.aclose())
            loop.close()

        return run, done

    return make


def _async(coro_fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        asyncio.run(coro_fn())  # type: ignore[arg-type]

    return run


def costs(workdir: str, quick: bool) -> Iterator[Cost]:
    size = 256 * MiB
    reps = 3
    n4k = 16384 if quick else 65536
    alloc = os.path.join(workdir, "alloc.qcow2")
    qemu.create(alloc, size)
    qemu.bench(alloc, Stream(MiB, size // MiB, size, write=True), aio="threads", depth=16)
    offs4k = Stream(4 * KiB, n4k, size, step=RANDOM_STEP_4K).offset_list()
    offs1m = Stream(MiB, size // MiB, size).offset_list()
    data4k = b"\xa5" * (4 * KiB)
    data1m = b"\xa5" * MiB
    fd = os.open(alloc, os.O_RDWR)
    # Page-aligned buffers (a bytearray's data starts 16 bytes into a page, where the
    # kernel's copy is 3-4x slower on this CPU: that is not qcow2aio's cost).
    buf4k = mmap.mmap(-1, 4 * KiB)
    buf1m = mmap.mmap(-1, MiB)
    host4k = [o + 5 * MiB for o in offs4k]  # roughly where the data lives in the file

    # ---------------------------------------------------------------- floors
    def pread4k() -> None:
        for o in host4k:
            os.pread(fd, 4096, o)

    yield _best("os.pread 4K (new bytes)", n4k, lambda: pread4k, reps)

    nowait = getattr(os, "RWF_NOWAIT", 0)

    def preadv_nowait4k() -> None:
        v = [buf4k]
        for o in host4k:
            os.preadv(fd, v, o, nowait)

    yield _best("os.preadv RWF_NOWAIT 4K (into buffer)", n4k, lambda: preadv_nowait4k, reps)

    def pread1m() -> None:
        for o in offs1m:
            os.pread(fd, MiB, o + 5 * MiB)

    yield _best("os.pread 1M", len(offs1m), lambda: pread1m, reps)

    def pwrite4k() -> None:
        for o in host4k:
            os.pwrite(fd, data4k, o)

    yield _best("os.pwrite 4K (cached overwrite)", n4k, lambda: pwrite4k, reps)

    # -------------------------------------------------------------- qcow2aio
    img = qcow2aio.open(alloc)
    r = img.read_sync

    def read_sync4k() -> None:
        for o in offs4k:
            r(o, 4096)

    yield _best("read_sync 4K", n4k, lambda: read_sync4k, reps)
    view4k = memoryview(buf4k)
    ri = img.readinto_sync

    def readinto_sync4k() -> None:
        for o in offs4k:
            ri(view4k, o)

    yield _best("readinto_sync 4K", n4k, lambda: readinto_sync4k, reps)

    def read_sync1m() -> None:
        for o in offs1m:
            r(o, MiB)

    yield _best("read_sync 1M", len(offs1m), lambda: read_sync1m, reps)

    async def aread4k() -> None:
        rd = img.read
        for o in offs4k:
            await rd(o, 4096)

    yield _best("await read 4K (depth 1)", n4k, lambda: _async(aread4k), reps)

    async def areadinto4k() -> None:
        rd = img.readinto
        for o in offs4k:
            await rd(view4k, o)

    yield _best("await readinto 4K (depth 1)", n4k, lambda: _async(areadinto4k), reps)

    async def aread1m() -> None:
        rd = img.read
        for o in offs1m:
            await rd(o, MiB)

    yield _best("await read 1M (depth 1)", len(offs1m), lambda: _async(aread1m), reps)
    view1m = memoryview(buf1m)

    async def areadinto1m() -> None:
        rd = img.readinto
        for o in offs1m:
            await rd(view1m, o)

    yield _best("await readinto 1M (depth 1)", len(offs1m), lambda: _async(areadinto1m), reps)
    img.close()

    # A 3-deep chain, as in the benchmark: 1/8 of the clusters in the top, 1/8 in the
    # middle, the rest read from the base (the allocated image above).
    mid = qemu.create(os.path.join(workdir, "mid.qcow2"), size, backing=alloc)
    fill = Stream(64 * KiB, size // (512 * KiB), size, step=512 * KiB, write=True)
    qemu.bench(mid, fill, aio="threads", depth=16)
    top = qemu.create(os.path.join(workdir, "top.qcow2"), size, backing=mid)
    fill = Stream(64 * KiB, size // (512 * KiB), size, step=512 * KiB, offset=256 * KiB, write=True)
    qemu.bench(top, fill, aio="threads", depth=16)
    img = qcow2aio.open(top)
    rc = img.read_sync
    for o in offs4k:  # warm: page cache, and the chain's per-cluster answers
        rc(o, 4096)

    def chain_read_sync4k() -> None:
        for o in offs4k:
            rc(o, 4096)

    yield _best("read_sync 4K, 3-deep chain", n4k, lambda: chain_read_sync4k, reps)
    img.close()

    # Compressed: 1 MiB reads of `qemu-img convert -c` output (zlib, text-like data).
    comp_size = 16 * MiB if quick else 64 * MiB
    raw = os.path.join(workdir, "compressible.raw")
    write_compressible(raw, comp_size)
    comp = os.path.join(workdir, "compressed.qcow2")
    qemu.convert(raw, comp, compress=True)
    img = qcow2aio.open(comp)
    offs_c = Stream(MiB, comp_size // MiB, comp_size).offset_list()

    def compressed_read_sync1m() -> None:
        for o in offs_c:
            img.read_sync(o, MiB)

    yield _best("read_sync 1M, compressed image", len(offs_c), lambda: compressed_read_sync1m, 2)
    img.close()

    img = qcow2aio.open(alloc, "r+")
    w = img.write_sync

    def write_sync4k() -> None:
        for o in offs4k:
            w(o, data4k)

    yield _best("write_sync 4K in place", n4k, lambda: write_sync4k, reps)

    img.close()
    # One engine now (FastFileBackend is the default FileBackend under its old name).
    engines: tuple[tuple[str, BackendFactory | None], ...] = (("default engine", None),)
    for engine, backend in engines:

        async def awrite4k(im: qcow2aio.Image) -> None:
            wr = im.write
            for o in offs4k[: n4k // 4]:
                await wr(o, data4k)

        yield _best(
            f"await write 4K in place (depth 1, {engine})",
            n4k // 4,
            _async_case(
                functools.partial(qcow2aio.open, alloc, "r+", io_backend=backend), awrite4k
            ),
            reps,
        )

    # Allocating writes: a fresh image per repetition.
    fresh = os.path.join(workdir, "fresh.qcow2")
    nfresh = 2048  # 256 MiB / 64 KiB / 2: every write allocates a cluster

    def fresh_image() -> str:
        if os.path.exists(fresh):
            os.unlink(fresh)
        return qemu.create(fresh, size)

    def pwrite64k_new() -> Callable[[], None]:
        path = os.path.join(workdir, "raw.bin")
        f = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        data = b"\xa5" * (64 * KiB)

        def run() -> None:
            for k in range(nfresh):
                os.pwrite(f, data, (k + 1) * 64 * KiB)
            os.close(f)
            os.unlink(path)

        return run

    yield _best("os.pwrite 64K appending (floor of a 4K alloc)", nfresh, pwrite64k_new, reps)
    offs_fresh = Stream(4 * KiB, nfresh, size, step=RANDOM_STEP_4K).offset_list()

    def write_sync_fresh(
        offs: list[int], data: bytes
    ) -> Callable[[], tuple[Callable[[], None], Callable[[], None]]]:
        """One repetition: a fresh image (untimed), ``write_sync`` at ``offs`` (timed)."""

        def make() -> tuple[Callable[[], None], Callable[[], None]]:
            fresh_image()
            im = qcow2aio.open(fresh, "r+")

            def run() -> None:
                ws = im.write_sync
                for o in offs:
                    ws(o, data)

            return run, im.close

        return make

    yield _best("write_sync 4K allocating", nfresh, write_sync_fresh(offs_fresh, data4k), reps)

    def open_fresh(backend: BackendFactory | None) -> qcow2aio.Image:
        fresh_image()
        return qcow2aio.open(fresh, "r+", io_backend=backend)

    async def awrite_fresh4k(im: qcow2aio.Image) -> None:
        wr = im.write
        for o in offs_fresh:
            await wr(o, data4k)

    for engine, backend in engines:
        yield _best(
            f"await write 4K allocating (depth 1, {engine})",
            nfresh,
            _async_case(functools.partial(open_fresh, backend), awrite_fresh4k),
            reps,
        )

    def pwrite1m_new() -> tuple[Callable[[], None], Callable[[], None]]:
        path = os.path.join(workdir, "raw.bin")
        f = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)

        def run() -> None:
            for k in range(len(offs1m)):
                os.pwrite(f, data1m, k * MiB)

        def done() -> None:
            os.close(f)
            os.unlink(path)

        return run, done

    yield _best("os.pwrite 1M appending (floor of a 1M alloc)", len(offs1m), pwrite1m_new, reps)

    yield _best("write_sync 1M allocating", len(offs1m), write_sync_fresh(offs1m, data1m), reps)

    async def awrite_fresh1m(im: qcow2aio.Image) -> None:
        wr = im.write
        for o in offs1m:
            await wr(o, data1m)

    for engine, backend in engines:
        yield _best(
            f"await write 1M allocating (depth 1, {engine})",
            len(offs1m),
            _async_case(functools.partial(open_fresh, backend), awrite_fresh1m),
            reps,
        )

    def python_only(n_bytes: int, offs: list[int]) -> tuple[Callable[[], None], Callable[[], None]]:
        fresh_image()
        im = qcow2aio.open(fresh, "r+")
        data = b"\xa5" * n_bytes
        # Data writes replaced by nothing: what is left is the Python (metadata) work.
        setattr(im._data, "pwritev", lambda buffers, offset, event="write": None)  # noqa: B010

        def run() -> None:
            ws = im.write_sync
            for o in offs:
                ws(o, data)

        def done() -> None:
            im.close()

        return run, done

    yield _best(
        "write_sync 4K allocating, data write stubbed",
        nfresh,
        lambda: python_only(4 * KiB, offs_fresh),
        reps,
    )
    yield _best(
        "write_sync 1M allocating, data write stubbed",
        len(offs1m),
        lambda: python_only(MiB, offs1m),
        reps,
    )
    os.close(fd)
    yield from encrypted_costs(workdir, quick)


def _cipher_loop(
    transform: Callable[[memoryview, int], None], buf: mmap.mmap, n: int
) -> Callable[[], None]:
    """``n`` in-place transforms of ``buf`` (page aligned), sector numbers 0, 1, ..."""

    def run() -> None:
        view = memoryview(buf)
        for k in range(n):
            transform(view, k)

    return run


def _read_loop(
    read: Callable[[int, int], object], offsets: list[int], size: int
) -> Callable[[], None]:
    def run() -> None:
        for o in offsets:
            read(o, size)

    return run


def _readinto_loop(
    readinto: Callable[[memoryview, int], object], view: memoryview, offsets: list[int]
) -> Callable[[], None]:
    def run() -> None:
        for o in offsets:
            readinto(view, o)

    return run


def _fixed(run: Callable[[], None]) -> Callable[[], Callable[[], None]]:
    """A :data:`Setup` with nothing to prepare."""
    return lambda: run


def encrypted_costs(workdir: str, quick: bool) -> Iterator[Cost]:
    """The read/write calls on encrypted images, after the sector ciphers alone."""
    size = 64 * MiB if quick else 128 * MiB
    reps = 3
    n4k = 4096 if quick else 16384
    n1m = size // MiB
    offs4k = Stream(4 * KiB, n4k, size, step=RANDOM_STEP_4K).offset_list()
    offs1m = Stream(MiB, n1m, size).offset_list()
    buf4k = mmap.mmap(-1, 4 * KiB)
    buf1m = mmap.mmap(-1, MiB)
    ciphers: tuple[tuple[str, SectorCipher], ...] = (
        ("aes-256-xts", make_cipher("aes-256", "xts", "plain64", None, os.urandom(64))),
        ("aes-128-cbc", legacy_aes_cipher(b"qcow2aio-bench")),
    )
    for label, cipher in ciphers:
        for op, transform in (("decrypt", cipher.decrypt), ("encrypt", cipher.encrypt)):
            for name, buf, n in (("4K", buf4k, n4k), ("1M", buf1m, n1m)):
                run = _cipher_loop(transform, buf, n)
                yield _best(f"{label} {op} {name} (cipher alone)", n, _fixed(run), reps)

    data1m = b"\xa5" * MiB
    for enc in (qemu.Encryption("luks"), qemu.Encryption("aes")):
        fmt = enc.format
        template = qemu.create(os.path.join(workdir, f"{fmt}_new.qcow2"), size, encryption=enc)
        path = os.path.join(workdir, f"{fmt}.qcow2")
        shutil.copyfile(template, path)
        fill = Stream(MiB, n1m, size, write=True)
        qemu.io_bench(path, fill, aio="threads", depth=16, encryption=enc, cache="unsafe")
        img = qcow2aio.open(path, passphrase=enc.passphrase)
        _read_loop(img.read_sync, offs1m, MiB)()  # warm the page cache
        run4k = _read_loop(img.read_sync, offs4k, 4096)
        yield _best(f"read_sync 4K, {fmt}", n4k, _fixed(run4k), reps)
        run1m = _read_loop(img.read_sync, offs1m, MiB)
        yield _best(f"read_sync 1M, {fmt}", n1m, _fixed(run1m), reps)
        into1m = _readinto_loop(img.readinto_sync, memoryview(buf1m), offs1m)
        yield _best(f"readinto_sync 1M, {fmt}", n1m, _fixed(into1m), reps)
        img.close()

        def write_fresh(
            template: str = template, passphrase: str = enc.passphrase
        ) -> tuple[Callable[[], None], Callable[[], None]]:
            fresh = os.path.join(workdir, "fresh_enc.qcow2")
            shutil.copyfile(template, fresh)
            im = qcow2aio.open(fresh, "r+", passphrase=passphrase)

            def run() -> None:
                ws = im.write_sync
                for o in offs1m:
                    ws(o, data1m)

            def done() -> None:
                im.close()
                os.unlink(fresh)

            return run, done

        yield _best(f"write_sync 1M allocating, {fmt}", n1m, write_fresh, reps)
        os.unlink(path)
        os.unlink(template)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.costs")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(results, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="costs-", dir=results)
    try:
        print(f"{'operation (us per request)':52} {'wall':>9} {'cpu':>9} {'user':>9} {'sys':>9}")
        for c in costs(workdir, args.quick):
            print(c.line(), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
