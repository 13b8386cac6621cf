"""Reads through backing chains take the fast path (``Image.locate``) and stay exact.

A backing image answers "where does this cluster live" once and caches it, because
its mapping cannot change while an overlay uses it. These tests build chains whose
layers disagree on everything that matters to that cache (cluster sizes, compressed
and zero clusters, extended L2, raw layers, shorter backing files, files of other
layers), read them in many sizes through all four read calls, and compare with
``qemu-img convert``. They also check the cache is used, bounded, and never kept for
a writable image.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from conftest import Qemu
from images import KiB, MiB, create, qemu_io

import qcow2aio
from qcow2aio import image as image_mod

SIZE = 4 * MiB


def _chain(qemu: Qemu, tmp: Path, *, raw_base: bool, base_size: int) -> Path:
    """base (raw or 512 B clusters, maybe shorter) <- mid (4 KiB clusters, compressed and
    zero clusters, then overwrites) <- ext (16 KiB, extended L2) <- top (64 KiB)."""
    rng = random.Random(7)
    if raw_base:
        base = tmp / "base.raw"
        base.write_bytes(rng.randbytes(base_size))
        base_fmt = "raw"
    else:
        base = create(qemu, tmp / "base.qcow2", base_size, cluster_size=512)
        qemu_io(qemu, base, [f"write -P 0x{i + 1:02x} {i * 96 * KiB} 80k" for i in range(30)])
        base_fmt = "qcow2"
    src = tmp / "mid-src.qcow2"
    create(qemu, src, SIZE, cluster_size=4096, backing=base.name, backing_fmt=base_fmt)
    qemu_io(qemu, src, [f"write -P 0x{0x40 + i:02x} {i * 200 * KiB} 12k" for i in range(20)])
    mid = tmp / "mid.qcow2"
    qemu.img(
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        f"cluster_size=4096,backing_file={base.name}",
        "-F",
        base_fmt,
        "-B",
        base.name,
        src,
        mid,
    )
    cmds = [f"write -z {i * 300 * KiB + 4096} 8k" for i in range(12)]
    cmds += [f"write -P 0x{0x80 + i:02x} {i * 256 * KiB + 1000} 5000" for i in range(14)]
    qemu_io(qemu, mid, cmds)
    ext = create(
        qemu,
        tmp / "ext.qcow2",
        SIZE,
        cluster_size=16384,
        extended_l2="on",
        backing=mid.name,
        backing_fmt="qcow2",
    )
    qemu_io(qemu, ext, [f"write -P 0x{0xA0 + i:02x} {i * 384 * KiB + 2048} 3k" for i in range(9)])
    top = create(qemu, tmp / "top.qcow2", SIZE, backing=ext.name, backing_fmt="qcow2")
    qemu_io(qemu, top, [f"write -P 0x{0xC0 + i:02x} {i * 512 * KiB} 64k" for i in range(8)])
    return top


def _ranges(rng: random.Random, n: int) -> list[tuple[int, int]]:
    out = []
    for _ in range(n):
        length = rng.choice((1, 511, 512, 4096, 5000, 16384, 65536, 70000, 200 * KiB))
        out.append((rng.randrange(0, SIZE - length + 1), length))
    return out


@pytest.mark.parametrize("raw_base", [False, True], ids=["qcow2-base", "raw-base"])
@pytest.mark.parametrize("base_size", [SIZE, 3 * MiB + 1536], ids=["full", "short"])
def test_chain_reads_match_qemu(
    qemu: Qemu, tmp_path: Path, raw_base: bool, base_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    top = _chain(qemu, tmp_path, raw_base=raw_base, base_size=base_size)
    want = qemu.convert_raw(top)
    # A tiny cache bound, so it fills and is cleared many times during the run.
    monkeypatch.setattr(image_mod, "_LOCATED_MAX", 64)
    rng = random.Random(base_size + raw_base)
    ranges = _ranges(rng, 1500)
    with qcow2aio.open(top) as img:
        for off, n in ranges:
            assert img.read_sync(off, n) == want[off : off + n], (off, n)
        for off, n in ranges[:300]:
            buf = bytearray(b"\xee" * n)
            img.readinto_sync(memoryview(buf), off)
            assert buf == want[off : off + n], (off, n)

        async def run() -> None:
            async def one(off: int, n: int) -> None:
                assert await img.read(off, n) == want[off : off + n], (off, n)
                buf = bytearray(b"\xee" * n)
                await img.readinto(memoryview(buf), off)
                assert buf == want[off : off + n], (off, n)

            await asyncio.gather(*(one(off, n) for off, n in ranges[:400]))

        asyncio.run(run())
        # The layers below the top cached their answers, within the bound.
        layers = []
        b = img.backing
        while isinstance(b, qcow2aio.Image):
            layers.append(b)
            b = b.backing
        assert len(layers) == 3 if not raw_base else len(layers) == 2
        assert any(layer._located for layer in layers)
        assert all(len(layer._located) <= 64 for layer in layers)


def test_locate_is_cached_per_cluster_and_never_for_a_writable_image(
    qemu: Qemu, tmp_path: Path
) -> None:
    base = create(qemu, tmp_path / "b.qcow2", 1 * MiB)
    qemu.io(base, "write -P 0x5a 0 1M")
    top = create(qemu, tmp_path / "t.qcow2", 1 * MiB, backing=base.name, backing_fmt="qcow2")
    with qcow2aio.open(top, "r+") as img:
        assert isinstance(img.backing, qcow2aio.Image)
        assert img.read_sync(4096, 4096) == b"\x5a" * 4096
        assert list(img.backing._located) == [0]  # one lookup, for the whole cluster
        # The writable top never answers from a cache: its mapping changes.
        assert img.locate(0, 4096) == (None, -1)
        assert img._located == {}
        img.write_sync(4096, b"\x11" * 4096)
        assert img.read_sync(4096, 4096) == b"\x11" * 4096
        assert img.read_sync(8192, 4096) == b"\x5a" * 4096
