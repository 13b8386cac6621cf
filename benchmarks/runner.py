"""The workloads, the repetitions and the command line.

Every workload runs QEMU and qcow2aio in the same process run, alternating
within each repetition, on the same image layout (all images are made by
``qemu-img``; fresh images are re-created before every run). QEMU's figure is
the better of ``-i threads`` and ``-i io_uring`` at the same queue depth.

The encrypted workloads (``luks_*``, ``aes_*``) run the same request streams on
encrypted images: QEMU through ``qemu-io`` with the secret (``qemu-img bench`` takes
none; see :mod:`benchmarks.qemu`), ours opened with the passphrase.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import ours, qemu
from .bitmaps import w_bitmaps
from .convert import w_convert
from .machine import describe
from .memory import measure as measure_rss
from .movers_commit import w_commit
from .movers_compare import w_compare
from .movers_map import w_map
from .nbd import w_nbd
from .qemu import Encryption
from .report import Row, read_json, render, render_markdown, write_json
from .stream import RANDOM_STEP_4K, GiB, KiB, MiB, Stream, TiB

RESULTS = Path(__file__).resolve().parent / "results"
# Memory workload: 4 TiB image with an L2 table at every odd L1 index, read along
# 1 GiB - 4 KiB (262143 x 4 KiB, odd): request k lands at L1 index 2k - 1 while
# k * 4 KiB < 512 MiB (k < 131072), so every read looks up one of those L2 tables.
MEM_IMAGE_SIZE = 4 * TiB
MEM_STEP = GiB - 4 * KiB
MEM_LIMIT_MIB = 64.0


@dataclass(frozen=True)
class Config:
    image_size: int
    rand_reads: int
    rand_writes_fresh: int
    rand_writes_alloc: int
    compressed_size: int
    convert_size: int
    mem_reads: int
    crypt_size: int  # encrypted images: virtual size (the fresh writes fill it once)
    crypt_rand_reads: int
    reps: int

    @staticmethod
    def full() -> Config:
        return Config(
            image_size=1 * GiB,
            rand_reads=65536,
            rand_writes_fresh=8192,  # every write allocates a new cluster (1 GiB, stride)
            rand_writes_alloc=16384,
            compressed_size=256 * MiB,
            convert_size=1 * GiB,
            mem_reads=100_000,
            # QEMU decrypts at a third of our rate or less: its runs are most of the
            # time these rows take.
            crypt_size=192 * MiB,
            crypt_rand_reads=16384,
            reps=3,
        )

    @staticmethod
    def quick() -> Config:
        return Config(
            image_size=256 * MiB,
            rand_reads=16384,
            rand_writes_fresh=2048,
            rand_writes_alloc=4096,
            compressed_size=64 * MiB,
            convert_size=256 * MiB,
            mem_reads=20_000,
            crypt_size=64 * MiB,
            crypt_rand_reads=4096,
            reps=2,
        )


@dataclass
class Context:
    cfg: Config
    workdir: str
    engines: tuple[str, ...]
    log: Callable[[str], None]
    _fixtures: dict[str, str] = field(default_factory=dict)

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def fixture(self, name: str, make: Callable[[str], None]) -> str:
        """A file made once per run (``make(path)``), shared by the workloads that need it."""
        if name not in self._fixtures:
            path = self.path(name)
            t0 = time.perf_counter()
            make(path)
            self.log(f"  (set-up: {name} in {time.perf_counter() - t0:.1f} s)")
            self._fixtures[name] = path
        return self._fixtures[name]

    # ---------------------------------------------------------------- fixtures
    def allocated_image(self) -> str:
        """A fully allocated image of ``image_size``: 1 MiB writes by qemu-img bench."""

        def make(path: str) -> None:
            size = self.cfg.image_size
            qemu.create(path, size)
            stream = Stream(MiB, size // MiB, size, write=True)
            qemu.bench(path, stream, aio=self.engines[-1], depth=16)

        return self.fixture("allocated.qcow2", make)

    def encrypted_image(self, enc: Encryption) -> str:
        """A fully allocated encrypted image of ``crypt_size``: the ``qemu-img create`` of
        :meth:`fresh_template` (copied), filled with 1 MiB writes by qemu-io (``-t unsafe``:
        set-up only)."""

        def make(path: str) -> None:
            size = self.cfg.crypt_size
            shutil.copyfile(self.fresh_template(enc, size), path)
            stream = Stream(MiB, size // MiB, size, write=True)
            qemu.io_bench(
                path, stream, aio=self.engines[-1], depth=16, encryption=enc, cache="unsafe"
            )

        return self.fixture(f"allocated_{enc.format}.qcow2", make)

    def fresh_template(self, enc: Encryption, size: int) -> str:
        """A new encrypted image made by ``qemu-img create``, copied for every fresh run.

        A LUKS create spends about 2 s timing PBKDF2 whatever ``iter-time`` is; a
        copy is the same bytes (its key and salts are random anyway), in ~1 ms.
        """

        def make(path: str) -> None:
            qemu.create(path, size, encryption=enc)

        return self.fixture(f"fresh_{enc.format}_{size}.qcow2", make)


def warm(path: str) -> None:
    """Read a whole file once, so the page cache is warm."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(8 * MiB)
        view = memoryview(buf)
        pos = 0
        while True:
            n = os.preadv(fd, [view], pos)
            if n <= 0:
                break
            pos += n
    finally:
        os.close(fd)


@contextlib.contextmanager
def fresh_image(ctx: Context, size: int, encryption: Encryption | None = None) -> Iterator[str]:
    path = ctx.path("fresh.qcow2")
    if encryption is None:
        qemu.create(path, size)
    else:
        shutil.copyfile(ctx.fresh_template(encryption, size), path)
    try:
        yield path
    finally:
        os.unlink(path)


# ------------------------------------------------------------------ request streams
def _rate(stream: Stream, seconds: float, unit: str) -> float:
    if unit == "IOPS":
        return stream.count / seconds
    return stream.total_bytes / MiB / seconds


def stream_workload(
    ctx: Context,
    name: str,
    stream: Stream,
    *,
    unit: str,
    image: Callable[[], str] | None,
    sync_target: float | None,
    async_targets: tuple[float | None, float | None],
    note: str = "",
    warm_files: Callable[[], list[str]] | None = None,
    encryption: Encryption | None = None,
    depths: tuple[int, ...] = (1, 16),
    readinto: bool = True,
) -> list[Row]:
    """Each depth through QEMU (each engine), read_sync/write_sync, and await read/write
    (with each engine; reads also through await readinto unless ``readinto`` is False).

    ``image`` gives the persistent image to use; ``None`` means a fresh image per run.
    ``async_targets`` are for depths 1 and 16. ``encryption`` is the image kind: an
    encrypted image is made with it (fresh ones copied from one ``qemu-img create``),
    QEMU runs through qemu-io with its secret, ours opens it with its passphrase.
    """
    if 1 not in depths:
        raise ValueError("the sync row compares with depth 1: depths must include 1")
    depth_targets = {1: async_targets[0], 16: async_targets[1]}
    passphrase = None if encryption is None else encryption.passphrase
    run_qemu = functools.partial(qemu.bench, encryption=encryption)
    run_sync = functools.partial(ours.run_sync, passphrase=passphrase)
    run_async = functools.partial(ours.run_async, passphrase=passphrase)
    # Async variants at each depth: (row kind, readinto?). One engine: the default.
    variants = [("async", False)]
    if readinto and not stream.write:
        variants.append(("readinto", True))
    rows = {"sync": Row(name, "sync", unit, target=sync_target, note=note)}
    for kind, _ in variants:
        for depth in depths:
            mode = f"{kind} d{depth}"
            rows[mode] = Row(name, mode, unit, target=depth_targets.get(depth), note=note)
    persistent = image() if image is not None else None
    if warm_files is not None:
        for f in warm_files():
            warm(f)

    @contextlib.contextmanager
    def target() -> Iterator[str]:
        if persistent is not None:
            yield persistent
        else:
            with fresh_image(ctx, stream.image_size, encryption) as p:
                yield p

    for rep in range(ctx.cfg.reps):
        for depth in depths:
            same_depth = [f"{kind} d{depth}" for kind, _ in variants]
            if depth == 1:
                same_depth.append("sync")
            for engine in ctx.engines:
                with target() as p:
                    secs = run_qemu(p, stream, aio=engine, depth=depth)
                value = _rate(stream, secs, unit)
                for mode in same_depth:
                    rows[mode].qemu.setdefault(engine, []).append(value)
                ctx.log(f"  rep {rep + 1} qemu {engine:8} d{depth:<2}  {value:12.1f} {unit}")
            if depth == 1:
                with target() as p:
                    value = _rate(stream, run_sync(p, stream), unit)
                rows["sync"].ours.append(value)
                ctx.log(f"  rep {rep + 1} ours sync         {value:12.1f} {unit}")
            for kind, into in variants:
                with target() as p:
                    secs = run_async(p, stream, depth, into=into)
                value = _rate(stream, secs, unit)
                rows[f"{kind} d{depth}"].ours.append(value)
                ctx.log(f"  rep {rep + 1} ours {kind:8} d{depth:<2}    {value:12.1f} {unit}")
    return list(rows.values())


# ------------------------------------------------------------------ the workloads
def w_seqwrite_fresh(ctx: Context) -> list[Row]:
    size = ctx.cfg.image_size
    stream = Stream(MiB, size // MiB, size, write=True)
    return stream_workload(
        ctx,
        "seqwrite_fresh_1M",
        stream,
        unit="MiB/s",
        image=None,
        sync_target=1.0,
        async_targets=(0.8, 0.8),
        note="1 MiB writes filling a fresh image (allocation); no flush inside the window",
    )


def w_seqread(ctx: Context) -> list[Row]:
    size = ctx.cfg.image_size
    # Four passes (offsets wrap): long enough for qemu-img bench's millisecond timer.
    stream = Stream(MiB, 4 * size // MiB, size)
    return stream_workload(
        ctx,
        "seqread_1M",
        stream,
        unit="MiB/s",
        image=ctx.allocated_image,
        sync_target=1.0,
        async_targets=(0.8, 0.8),
        warm_files=lambda: [ctx.allocated_image()],
    )


def w_randread(ctx: Context) -> list[Row]:
    size = ctx.cfg.image_size
    stream = Stream(4 * KiB, ctx.cfg.rand_reads, size, step=RANDOM_STEP_4K)
    return stream_workload(
        ctx,
        "randread_4K",
        stream,
        unit="IOPS",
        image=ctx.allocated_image,
        sync_target=1.5,
        async_targets=(1.0, 0.5),
        note="fully allocated image, stride 40009 x 4 KiB",
        warm_files=lambda: [ctx.allocated_image()],
    )


def w_randwrite_fresh(ctx: Context) -> list[Row]:
    size = ctx.cfg.image_size
    stream = Stream(4 * KiB, ctx.cfg.rand_writes_fresh, size, step=RANDOM_STEP_4K, write=True)
    return stream_workload(
        ctx,
        "randwrite_fresh_4K",
        stream,
        unit="IOPS",
        image=None,
        sync_target=1.0,
        async_targets=(0.8, 0.8),
        note="every write allocates a cluster (COW of the rest from zeros)",
    )


def w_randwrite_alloc(ctx: Context) -> list[Row]:
    size = ctx.cfg.image_size
    stream = Stream(4 * KiB, ctx.cfg.rand_writes_alloc, size, step=RANDOM_STEP_4K, write=True)
    return stream_workload(
        ctx,
        "randwrite_alloc_4K",
        stream,
        unit="IOPS",
        image=ctx.allocated_image,
        sync_target=None,
        async_targets=(None, None),
        note="in-place overwrites of an allocated image (no target set)",
        warm_files=lambda: [ctx.allocated_image()],
    )


def _chain(ctx: Context) -> str:
    """base (fully allocated) <- mid (every 8th cluster) <- top (every 8th, other ones)."""

    def make(path: str) -> None:
        size = ctx.cfg.image_size
        base = ctx.allocated_image()
        mid = ctx.path("chain_mid.qcow2")
        qemu.create(mid, size, backing=base)
        fill = Stream(64 * KiB, size // (512 * KiB), size, step=512 * KiB, write=True)
        qemu.bench(mid, fill, aio=ctx.engines[-1], depth=16)
        qemu.create(path, size, backing=mid)
        fill = Stream(
            64 * KiB, size // (512 * KiB), size, step=512 * KiB, offset=256 * KiB, write=True
        )
        qemu.bench(path, fill, aio=ctx.engines[-1], depth=16)

    return ctx.fixture("chain_top.qcow2", make)


def w_chain_randread(ctx: Context) -> list[Row]:
    size = ctx.cfg.image_size
    stream = Stream(4 * KiB, ctx.cfg.rand_reads, size, step=RANDOM_STEP_4K)
    return stream_workload(
        ctx,
        "chain3_randread_4K",
        stream,
        unit="IOPS",
        image=lambda: _chain(ctx),
        sync_target=1.0,
        async_targets=(0.5, 0.5),
        note="top <- mid <- base; 1/8 of clusters in top, 1/8 in mid, 3/4 read from base",
        warm_files=lambda: [_chain(ctx), ctx.path("chain_mid.qcow2"), ctx.allocated_image()],
    )


def write_compressible(path: str, size: int) -> None:
    """Text-like clusters (deflate ~3x with QEMU's 4 KiB window), 1 in 8 random (stored)."""
    rng = random.Random(20261125)
    words = [
        bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(4096)
    ]
    corpus = b" ".join(rng.choices(words, k=(8 * MiB) // 5))[: 8 * MiB]
    cs = 64 * KiB
    with open(path, "wb") as f:
        for _ in range(size // cs):
            if rng.random() < 0.125:
                f.write(rng.randbytes(cs))
            else:
                start = rng.randrange(0, len(corpus) - cs)
                f.write(corpus[start : start + cs])


def _compressed_image(ctx: Context) -> str:
    def make(path: str) -> None:
        raw = ctx.path("compressible.raw")
        write_compressible(raw, ctx.cfg.compressed_size)
        qemu.convert(raw, path, compress=True)
        os.unlink(raw)

    return ctx.fixture("compressed.qcow2", make)


def w_compressed(ctx: Context) -> list[Row]:
    size = ctx.cfg.compressed_size
    stream = Stream(MiB, size // MiB, size)
    return stream_workload(
        ctx,
        "compressed_seqread_1M",
        stream,
        unit="MiB/s",
        image=lambda: _compressed_image(ctx),
        sync_target=1.0,
        async_targets=(0.8, 0.8),
        note="qemu-img convert -c (zlib); 7/8 of clusters compressed ~3x, 1/8 stored",
        warm_files=lambda: [_compressed_image(ctx)],
    )


# ------------------------------------------------------------------ encrypted images
LUKS = Encryption("luks")  # QEMU's default LUKS: aes-256-xts, plain64
LEGACY_AES = Encryption("aes")  # legacy qcow2 AES: aes-128-cbc, plain64 (guest sector)


Targets = tuple[float | None, float | None, float | None]  # sync, async d1, async d16


def _encrypted_seqread(
    ctx: Context,
    enc: Encryption,
    name: str,
    *,
    passes: int,
    depths: tuple[int, ...],
    targets: Targets,
) -> list[Row]:
    size = ctx.cfg.crypt_size
    # Passes (offsets wrap), so that our side's run lasts about 0.2-0.3 s.
    stream = Stream(MiB, passes * size // MiB, size)
    return stream_workload(
        ctx,
        name,
        stream,
        unit="MiB/s",
        image=lambda: ctx.encrypted_image(enc),
        sync_target=targets[0],
        async_targets=(targets[1], targets[2]),
        note=f"{enc.format}: {passes} passes over a fully allocated image",
        warm_files=lambda: [ctx.encrypted_image(enc)],
        encryption=enc,
        depths=depths,
        readinto=False,
    )


def _encrypted_seqwrite(
    ctx: Context, enc: Encryption, name: str, *, depths: tuple[int, ...], targets: Targets
) -> list[Row]:
    size = ctx.cfg.crypt_size
    stream = Stream(MiB, size // MiB, size, write=True)
    return stream_workload(
        ctx,
        name,
        stream,
        unit="MiB/s",
        image=None,
        sync_target=targets[0],
        async_targets=(targets[1], targets[2]),
        note=f"{enc.format}: 1 MiB writes filling a fresh image (allocation, encryption)",
        encryption=enc,
        depths=depths,
    )


def w_luks_seqread(ctx: Context) -> list[Row]:
    return _encrypted_seqread(
        ctx, LUKS, "luks_seqread_1M", passes=2, depths=(1, 16), targets=(1.0, 0.8, 0.8)
    )


def w_luks_seqwrite_fresh(ctx: Context) -> list[Row]:
    return _encrypted_seqwrite(
        ctx, LUKS, "luks_seqwrite_1M_fresh", depths=(1, 16), targets=(1.0, 0.8, 0.8)
    )


def w_luks_randread(ctx: Context) -> list[Row]:
    size = ctx.cfg.crypt_size
    stream = Stream(4 * KiB, ctx.cfg.crypt_rand_reads, size, step=RANDOM_STEP_4K)
    return stream_workload(
        ctx,
        "luks_randread_4K",
        stream,
        unit="IOPS",
        image=lambda: ctx.encrypted_image(LUKS),
        sync_target=1.0,
        async_targets=(None, None),
        note="luks: fully allocated image, stride 40009 x 4 KiB; depth 1 only",
        warm_files=lambda: [ctx.encrypted_image(LUKS)],
        encryption=LUKS,
        depths=(1,),
        readinto=False,
    )


# Legacy AES: depth 1 only (its targets are for the sync rows; the async d1 row is shown).
def w_aes_seqread(ctx: Context) -> list[Row]:
    # CBC decryption is one ECB call and an XOR, twice XTS's rate here: twice the passes.
    return _encrypted_seqread(
        ctx, LEGACY_AES, "aes_seqread_1M", passes=4, depths=(1,), targets=(1.0, None, None)
    )


def w_aes_seqwrite_fresh(ctx: Context) -> list[Row]:
    return _encrypted_seqwrite(
        ctx, LEGACY_AES, "aes_seqwrite_1M_fresh", depths=(1,), targets=(0.5, None, None)
    )


def _half_zero_raw(ctx: Context) -> str:
    def make(path: str) -> None:
        rng = random.Random(7)
        cs = 64 * KiB
        size = ctx.cfg.convert_size
        zeros = bytes(32 * cs)
        with open(path, "wb") as f:
            pos = 0
            data = True
            while pos < size:
                n = min(size - pos, rng.randint(1, 32) * cs)
                f.write(rng.randbytes(n) if data else zeros[:n])
                pos += n
                data = not data

    return ctx.fixture("half_zero.raw", make)


def w_memory(ctx: Context) -> list[Row]:
    def make(path: str) -> None:
        qemu.create(path, MEM_IMAGE_SIZE)
        # One 4 KiB write in every other 512 MiB (odd L1 indices): 4096 L2 tables, 256 MiB
        # of them, 8x the 32 MiB L2 cache both sides default to. -t unsafe: no flush per
        # L2 allocation (set-up only).
        fill = Stream(4 * KiB, MEM_IMAGE_SIZE // GiB, MEM_IMAGE_SIZE, GiB, True, 512 * MiB)
        qemu.bench(path, fill, aio=ctx.engines[-1], depth=16, cache="unsafe")

    path = ctx.fixture("sparse_4T.qcow2", make)
    warm(path)
    count = ctx.cfg.mem_reads
    stream = Stream(4 * KiB, count, MEM_IMAGE_SIZE, step=MEM_STEP)
    tiny = ctx.path("tiny.qcow2")
    qemu.create(tiny, MiB)
    engine = ctx.engines[-1]
    _, q_base = qemu.bench_rusage(tiny, Stream(4 * KiB, 1, MiB), aio=engine, depth=1)
    os.unlink(tiny)
    rows = [
        Row(
            "memory_4T_randread",
            mode,
            "MiB",
            limit=MEM_LIMIT_MIB,
            note=f"{count} reads of 4 KiB over 4 TiB, 4096 L2 tables; peak RSS above baseline",
        )
        for mode in ("sync", "async d1")
    ]
    _, q_peak = qemu.bench_rusage(path, stream, aio=engine, depth=1)
    q_delta = (q_peak - q_base) / KiB
    ctx.log(f"  qemu {engine}: peak {q_peak / KiB:.1f} MiB, baseline {q_base / KiB:.1f} MiB")
    for row, mode in zip(rows, ("sync", "async"), strict=True):
        row.qemu[engine] = [q_delta]
        r = measure_rss(path, count, MEM_STEP, mode)
        delta = (r["peak_kib"] - r["baseline_kib"]) / KiB
        row.ours.append(delta)
        ctx.log(
            f"  ours {mode}: peak {r['peak_kib'] / KiB:.1f} MiB, "
            f"baseline {r['baseline_kib'] / KiB:.1f} MiB, delta {delta:.1f} MiB"
        )
    return rows


WORKLOADS: dict[str, Callable[[Context], list[Row]]] = {
    "seqwrite_fresh_1M": w_seqwrite_fresh,
    "seqread_1M": w_seqread,
    "randread_4K": w_randread,
    "randwrite_fresh_4K": w_randwrite_fresh,
    "randwrite_alloc_4K": w_randwrite_alloc,
    "chain3_randread_4K": w_chain_randread,
    "compressed_seqread_1M": w_compressed,
    "luks_seqread_1M": w_luks_seqread,
    "luks_seqwrite_1M_fresh": w_luks_seqwrite_fresh,
    "luks_randread_4K": w_luks_randread,
    "aes_seqread_1M": w_aes_seqread,
    "aes_seqwrite_1M_fresh": w_aes_seqwrite_fresh,
    "convert_raw2qcow2": w_convert,
    "memory_4T_randread": w_memory,
    "map_1T_sparse": w_map,
    "nbd": w_nbd,
    "compare_1G": w_compare,
    "commit_3deep": w_commit,
    "bitmaps": w_bitmaps,
}


# ------------------------------------------------------------------ command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="qcow2aio against QEMU (qemu-img bench / convert), workload by workload.",
    )
    p.add_argument(
        "-k",
        dest="patterns",
        action="append",
        default=[],
        metavar="PATTERN",
        help="run only workloads whose name contains PATTERN (repeatable)",
    )
    p.add_argument("--quick", action="store_true", help="smaller images and counts, 2 reps")
    p.add_argument("--reps", type=int, default=None, help="repetitions per measurement")
    p.add_argument(
        "--json",
        type=Path,
        default=RESULTS / "latest.json",
        help="where to write the JSON table (default: benchmarks/results/latest.json)",
    )
    p.add_argument("--workdir", default=None, help="folder for the images (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the images afterwards")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-run progress lines")
    p.add_argument(
        "--show",
        type=Path,
        metavar="JSON",
        help="print the table of an earlier run's JSON instead of running anything",
    )
    p.add_argument("--markdown", action="store_true", help="with --show: a Markdown table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(WORKLOADS))
        return 0
    if args.show is not None:
        doc, shown = read_json(args.show)
        for k, v in doc["machine"].items():
            print(f"  {k:17} {v}")
        print(f"  command           {doc.get('command', '?')}\n")
        print(render_markdown(shown) if args.markdown else render(shown))
        return 0
    selected = [
        name for name in WORKLOADS if not args.patterns or any(pat in name for pat in args.patterns)
    ]
    if not selected:
        print(f"no workload matches {args.patterns}", file=sys.stderr)
        return 2
    cfg = Config.quick() if args.quick else Config.full()
    if args.reps is not None:
        cfg = Config(**{**cfg.__dict__, "reps": max(1, args.reps)})
    if shutil.which("qemu-img") is None:
        print("qemu-img not found: run `make qemu` first", file=sys.stderr)
        return 2

    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="work-", dir=RESULTS)
    os.makedirs(workdir, exist_ok=True)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        engines = ("threads", "io_uring") if qemu.io_uring_works(workdir) else ("threads",)
        machine = describe(workdir, "io_uring" in engines)
        print("machine:")
        for k, v in machine.items():
            print(f"  {k:17} {v}")
        print(
            f"config: {'quick' if args.quick else 'full'}, {cfg.reps} reps, "
            f"image {cfg.image_size // MiB} MiB (encrypted {cfg.crypt_size // MiB} MiB), "
            f"workloads: {', '.join(selected)}",
            flush=True,
        )
        ctx = Context(cfg, workdir, engines, log)
        rows: list[Row] = []
        loads: dict[str, float] = {}
        t_start = time.perf_counter()
        for name in selected:
            log(f"{name}:")
            t0 = time.perf_counter()
            loads[name] = round(os.getloadavg()[0], 2)
            rows += WORKLOADS[name](ctx)
            log(f"  ({name}: {time.perf_counter() - t0:.1f} s)")
        elapsed = time.perf_counter() - t_start
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(render(rows))
    print()
    print(
        "Throughput: medians [min-max] over the repetitions; ratio = ours / QEMU (higher is "
        "better). QEMU = better of -i threads / -i io_uring at the same depth; sync and every "
        "d1 row compare with QEMU at depth 1. async = await read/write with the default I/O "
        "engine (small writes and cached reads inline, the rest through aiofiles on "
        "qcow2aio's executor); "
        "readinto = await readinto a buffer per coroutine (no new bytes per read). "
        "Timed window = first request to last completion, no "
        "flush (qemu-img bench -t writeback); convert includes create, open and the closing "
        "fdatasync on both sides."
    )
    if any(name.startswith(("luks_", "aes_")) for name in selected):
        print(
            "Encrypted rows (luks_*, aes_*): QEMU through qemu-io with the secret (qemu-img "
            "bench takes no --object): depth 1 = the sum of qemu-io's per-request times, "
            "depth 16 = groups of 16 aio requests, marker to marker, glibc malloc tuned "
            "(which flatters QEMU); see docs/performance.md, Encryption."
        )
    meta = {
        "command": " ".join(
            ["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]
        ),
        "config": {"mode": "quick" if args.quick else "full", **cfg.__dict__},
        "engines": list(engines),
        "elapsed_seconds": round(elapsed, 1),
        "loadavg_1min_at_workload_start": loads,
    }
    write_json(args.json, machine, meta, rows)
    print(
        "1-minute load average at the start of each workload (2 CPUs are contended above ~1): "
        + ", ".join(f"{k} {v:.1f}" for k, v in loads.items())
    )
    print(f"\nJSON: {args.json}  ({elapsed:.0f} s)")
    return 0
