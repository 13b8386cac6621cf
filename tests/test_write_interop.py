"""Write path against QEMU: images we write pass `qemu-img check` and match an oracle.

Each test drives qcow2aio with a seeded mix of async writes, writev, write_zeroes,
discard and the synchronous fast path, keeps a bytearray oracle of what the
guest must see, then asks QEMU: `qemu-img check` (no errors, no leaks) and
`qemu-img compare` against the oracle. QEMU then keeps writing and we read its
writes back.
"""

from __future__ import annotations

import asyncio
import random
import struct
from pathlib import Path

import pytest
from conftest import Qemu

import qcow2aio

SIZE = 8 << 20

CONFIGS = [
    "compat=1.1",
    "compat=0.10",
    "cluster_size=512",
    "cluster_size=4096,refcount_bits=1",
    "cluster_size=2M",
    "cluster_size=65536,refcount_bits=2",
    "refcount_bits=4",
    "refcount_bits=8",
    "refcount_bits=32",
    "refcount_bits=64",
    "lazy_refcounts=on",
    "extended_l2=on",
    "extended_l2=on,cluster_size=16k",
    "compat=0.10,cluster_size=4096",
    "compression_type=zstd",
]


def _make(
    qemu: Qemu, tmp: Path, opts: str, backing: str | None, seed: int
) -> tuple[Path, bytearray]:
    oracle = bytearray(SIZE)
    args: list[str] = ["create", "-q", "-f", "qcow2", "-o", opts]
    rng = random.Random(seed)
    if backing == "raw":
        data = rng.randbytes(6 << 20)
        (tmp / "base.raw").write_bytes(data)
        oracle[: len(data)] = data
        args += ["-b", "base.raw", "-F", "raw"]
    elif backing == "qcow2":
        qemu.img("create", "-q", "-f", "qcow2", str(tmp / "base.qcow2"), str(SIZE))
        qemu.io(tmp / "base.qcow2", "write -P 0x5a 0 3M", "write -P 0xa5 5M 1M")
        oracle[0 : 3 << 20] = b"\x5a" * (3 << 20)
        oracle[5 << 20 : 6 << 20] = b"\xa5" * (1 << 20)
        args += ["-b", "base.qcow2", "-F", "qcow2"]
    path = tmp / "img.qcow2"
    # Relative backing names: run qemu-img inside tmp.
    qemu.img(*args, str(path), str(SIZE))
    return path, oracle


async def _workload(
    img: qcow2aio.Image, oracle: bytearray, rng: random.Random, rounds: int
) -> None:
    cs = img.cluster_size
    size = img.size
    for r in range(rounds):
        # A batch of requests with disjoint ranges runs concurrently; the oracle is exact.
        used: list[tuple[int, int]] = []
        tasks = []
        while len(used) < 12:
            n = rng.choice([1, 511, 4096, 5000, 65536, 100000, 300000])
            off = rng.randrange(0, size - n)
            if any(off < b and a < off + n for a, b in used):
                continue
            used.append((off, off + n))
            op = rng.random()
            if op < 0.45:
                data = rng.randbytes(n)
                tasks.append(img.write(off, data))
                oracle[off : off + n] = data
            elif op < 0.55:
                data = rng.randbytes(n)
                cut = rng.randrange(0, n + 1)
                tasks.append(img.writev(off, [data[:cut], bytearray(data[cut:])]))
                oracle[off : off + n] = data
            elif op < 0.7:
                tasks.append(img.write_zeroes(off, n))
                oracle[off : off + n] = bytes(n)
            elif op < 0.8:
                tasks.append(img.discard(off, n))
                a = -(-off // cs) * cs
                b = (off + n) // cs * cs
                if b > a and not (img.meta.version < 3 and img.backing is not None):
                    oracle[a:b] = bytes(b - a)
            else:
                data = rng.randbytes(n)
                img.write_sync(off, data)
                oracle[off : off + n] = data
        await asyncio.gather(*tasks)
        if r % 3 == 2:
            await img.flush()


@pytest.mark.parametrize("opts", CONFIGS)
@pytest.mark.parametrize("backing", [None, "raw", "qcow2"])
async def test_concurrent_writes_match_oracle_and_check_clean(
    qemu: Qemu, tmp_path: Path, opts: str, backing: str | None
) -> None:
    if backing == "qcow2" and "cluster_size=512" in opts:
        backing = "raw"  # keep the grid small: qcow2 backing is covered elsewhere
    seed = hash((opts, backing)) & 0xFFFF
    path, oracle = _make(qemu, tmp_path, opts, backing, seed)
    rng = random.Random(seed)
    async with qcow2aio.open(path, "r+") as img:
        await _workload(img, oracle, rng, rounds=6)
        assert await img.read(0, SIZE) == bytes(oracle)
        assert img.read_sync(0, SIZE) == bytes(oracle)
    code, report = qemu.check(path)
    assert code == 0, report
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0
    (tmp_path / "oracle.raw").write_bytes(oracle)
    qemu.img("compare", "-f", "qcow2", "-F", "raw", str(path), str(tmp_path / "oracle.raw"))
    # QEMU keeps writing our image, and we read its writes back.
    qemu.io(path, "write -P 0x6b 1000 70000", "write -z 3M 128k")
    oracle[1000:71000] = b"\x6b" * 70000
    oracle[3 << 20 : (3 << 20) + (128 << 10)] = bytes(128 << 10)
    with qcow2aio.open(path) as img:
        assert img.read_sync(0, SIZE) == bytes(oracle)
    assert qemu.check(path)[0] == 0


def test_reftable_growth_512_byte_clusters(qemu: Qemu, tmp_path: Path) -> None:
    """A 512 B-cluster image written over 32 MiB must grow its refcount table."""
    path = tmp_path / "g.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path), "64M")
    data = random.Random(7).randbytes(40 << 20)
    with qcow2aio.open(path, "r+") as img:
        before = img.meta.header.refcount_table_clusters
        for off in range(0, len(data), 1 << 20):
            img.write_sync(off, data[off : off + (1 << 20)])
        assert img.meta.header.refcount_table_clusters > before
    assert qemu.check(path)[0] == 0
    assert qemu.convert_raw(path)[: len(data)] == data
    # The new table location is in the header QEMU reads.
    rt = struct.unpack(">QI", path.read_bytes()[48:60])
    assert rt[1] > before


def test_writes_into_qemu_image_with_snapshot_compressed_and_zero_clusters(
    qemu: Qemu, tmp_path: Path
) -> None:
    path = tmp_path / "q.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(path), "4M")
    qemu.io(
        path,
        "write -P 0x11 0 1M",
        "write -c -P 0x22 1M 128k",
        "write -P 0x66 2M 128k",
        "write -z 2M 128k",  # without -u: allocated zero clusters (ZERO_ALLOC)
        "write -P 0x33 3M 64k",
    )
    qemu.img("snapshot", "-c", "s1", str(path))
    snap_state = qemu.convert_raw(path)
    qemu.io(path, "write -P 0x44 3M 4k")
    oracle = bytearray(qemu.convert_raw(path))
    writes = [
        (100, b"a" * 5000),  # shared (snapshot) cluster: COW
        ((1 << 20) + 1000, b"b" * 3000),  # compressed cluster: partial overwrite
        ((1 << 20) + 65536 + 60000, b"c" * 10000),  # spans compressed + shared
        ((2 << 20) + 4000, b"d" * 100),  # allocated zero cluster (shared with the snapshot)
        ((3 << 20) + 10, b"e" * 70000),
    ]
    with qcow2aio.open(path, "r+") as img:
        for off, data in writes:
            img.write_sync(off, data)
            oracle[off : off + len(data)] = data

        async def more() -> None:
            await img.write_zeroes(1 << 20, 131072)
            await img.discard(3 << 20, 65536)

        asyncio.run(more())
        oracle[1 << 20 : (1 << 20) + 131072] = bytes(131072)
        oracle[3 << 20 : (3 << 20) + 65536] = bytes(65536)
    assert qemu.check(path)[0] == 0
    assert qemu.convert_raw(path) == bytes(oracle)
    # The snapshot still holds what it held.
    qemu.img("snapshot", "-a", "s1", str(path))
    assert qemu.convert_raw(path) == snap_state
    assert qemu.check(path)[0] == 0


def test_extended_l2_allocates_per_subcluster(qemu: Qemu, tmp_path: Path) -> None:
    """A 4 KiB write at 4 KiB into a fresh 64 KiB-cluster extended-L2 cluster sets bitmap 0x0c."""
    path = tmp_path / "x.qcow2"
    base = tmp_path / "b.raw"
    base.write_bytes(b"\x99" * (1 << 20))
    qemu.img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        "b.raw",
        "-F",
        "raw",
        str(path),
        "1M",
    )
    with qcow2aio.open(path, "r+") as img:
        img.write_sync(4096, b"\x01" * 4096)
        img.write_sync(65536 + 100, b"\x02" * 10)  # partial subcluster: COW of 2 KiB only
        img.flush_sync()
        l2 = img.meta.l2_table(img.meta.l2_offset_for(0)).entries
        assert l2[1] & 0xFFFFFFFF == 0x0C
        assert l2[3] & 0xFFFFFFFF == 0x01
    raw = qemu.convert_raw(path)
    expect = bytearray(b"\x99" * (1 << 20))
    expect[4096:8192] = b"\x01" * 4096
    expect[65636:65646] = b"\x02" * 10
    assert raw == bytes(expect)
    assert qemu.check(path)[0] == 0


def test_copied_flags_and_first_allocation_layout(qemu: Qemu, tmp_path: Path) -> None:
    """Same layout as QEMU after the first 4 KiB write: L2 at 0x40000, data at 0x50000."""
    path = tmp_path / "a.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(path), "1G")
    with qcow2aio.open(path, "r+") as img:
        img.write_sync(0, b"x" * 4096)
    raw = path.read_bytes()
    assert struct.unpack(">Q", raw[0x30000:0x30008])[0] == 0x8000000000040000
    assert struct.unpack(">Q", raw[0x40000:0x40008])[0] == 0x8000000000050000
    assert qemu.check(path)[0] == 0


def test_v2_discard_with_backing_is_a_noop(qemu: Qemu, tmp_path: Path) -> None:
    (tmp_path / "b.raw").write_bytes(b"\x42" * (1 << 20))
    path = tmp_path / "v2.qcow2"
    qemu.img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "b.raw",
        "-F",
        "raw",
        str(path),
        "1M",
    )

    async def go() -> None:
        async with qcow2aio.open(path, "r+") as img:
            await img.write(0, b"\x07" * 65536)
            await img.discard(0, 65536)
            assert await img.read(0, 4) == b"\x07" * 4

    asyncio.run(go())
    assert qemu.check(path)[0] == 0


def test_lazy_refcounts_dirty_bit_and_clean_close(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "l.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path), "4M")
    img = qcow2aio.open(path, "r+")
    img.write_sync(0, b"z" * 100000)
    img.flush_sync()
    assert qemu.info(path, extra_args=["-U"])["dirty-flag"] is True
    img.close()
    assert qemu.info(path)["dirty-flag"] is False
    assert qemu.check(path)[0] == 0


def test_write_refused_on_read_only_and_out_of_range(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "r.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(path), "1M")
    with qcow2aio.open(path) as img, pytest.raises(qcow2aio.Qcow2ReadOnlyError):
        img.write_sync(0, b"x")
    with qcow2aio.open(path, "r+") as img, pytest.raises(qcow2aio.Qcow2RangeError):
        img.write_sync((1 << 20) - 1, b"xy")
