"""Compressed writes (``write_compressed``) against QEMU 7.2.

QEMU is the oracle for every property: it reads our compressed clusters back exactly
(`qemu-img convert`, `qemu-io read -P`), `qemu-img check` finds no error and no leak
and counts them as compressed, `qemu-img map` reports them without a host offset
(compressed), and for the same writes the L2 entries and refcounts are the ones
`qemu-io -c 'write -c ...'` produces (same packing of compressed clusters).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from conftest import Qemu

import qcow2aio

SIZE = 4 << 20


def _mkimg(qemu: Qemu, tmp_path: Path, opts: str, size: int = SIZE, name: str = "c") -> Path:
    path = tmp_path / f"{name}.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", opts, path, str(size))
    return path


def _l2_entries(path: Path, n: int) -> list[int]:
    """The first ``n`` L2 entries (the first L1 entry's table) as stored in the file."""
    data = path.read_bytes()
    l1 = struct.unpack(">Q", data[40:48])[0]
    l2 = struct.unpack(">Q", data[l1 : l1 + 8])[0] & 0x00FFFFFFFFFFFE00
    return list(struct.unpack(f">{n}Q", data[l2 : l2 + 8 * n]))


def _refcounts(path: Path, n: int) -> list[int]:
    """The first ``n`` refcounts (16-bit refcounts, first refcount block)."""
    data = path.read_bytes()
    rt = struct.unpack(">Q", data[48:56])[0]
    rb = struct.unpack(">Q", data[rt : rt + 8])[0]
    return list(struct.unpack(f">{n}H", data[rb : rb + 2 * n]))


def _assert_clean(qemu: Qemu, path: Path, compressed: int | None = None) -> dict[str, object]:
    rc, report = qemu.check(path)
    assert rc == 0, report
    assert not report.get("leaks") and not report.get("corruptions"), report
    if compressed is not None:
        assert report.get("compressed-clusters", 0) == compressed, report
    return report


def _compressed_in_map(qemu: Qemu, path: Path) -> set[int]:
    """Guest offsets of clusters `qemu-img map` shows as data without a host offset
    (what it prints for compressed clusters)."""
    import json

    out = json.loads(qemu.img("map", "--output=json", path).stdout)
    return {e["start"] for e in out if e["data"] and "offset" not in e}


def _compressible(rng: random.Random, n: int) -> bytes:
    """Data that deflates well but is not trivial: random words from a small set."""
    words = [rng.randbytes(rng.randint(3, 9)) for _ in range(16)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words)
    return bytes(out[:n])


# ----------------------------------------------------------- layout vs QEMU
@pytest.mark.parametrize(
    "opts", ["compression_type=zlib", "compression_type=zstd", "refcount_bits=1", "refcount_bits=2"]
)
def test_packing_matches_qemu_io(qemu: Qemu, tmp_path: Path, opts: str) -> None:
    """Three compressed clusters written in a row: the same L2 entries (byte-packed
    into one host cluster; with refcounts too narrow to count them all, a new host
    cluster when the refcount is full) and refcounts as `qemu-io write -c`."""
    ours = _mkimg(qemu, tmp_path, opts, name="ours")
    theirs = _mkimg(qemu, tmp_path, opts, name="theirs")
    qemu.io(theirs, "write -c -P 1 0 64k", "write -c -P 2 64k 64k", "write -c -P 3 128k 64k")
    with qcow2aio.open(ours, "r+") as img:
        img.write_compressed_sync(0, b"\x01" * 65536)
        img.write_compressed_sync(65536, b"\x02" * 65536)
        img.write_compressed_sync(131072, b"\x03" * 65536)
    assert _l2_entries(ours, 4) == _l2_entries(theirs, 4)
    if "refcount_bits" not in opts:
        assert _refcounts(ours, 8) == _refcounts(theirs, 8)
        assert _l2_entries(ours, 3)[1] & ((1 << 54) - 1) & 511  # packed at byte granularity
    _assert_clean(qemu, ours, compressed=3)
    qemu.io(ours, "read -P 1 0 64k", "read -P 2 64k 64k", "read -P 3 128k 64k")


def test_spanning_host_clusters_as_qemu(qemu: Qemu, tmp_path: Path) -> None:
    """Compressed clusters larger than the room left run over into the next host
    cluster (refcount 2 where two share it), as `qemu-img convert -c` lays them out."""
    rng = random.Random(7)
    raw = b"".join(rng.randbytes(30000) + bytes(35536) for _ in range(4))
    src = tmp_path / "src.raw"
    src.write_bytes(raw)
    theirs = tmp_path / "theirs.qcow2"
    qemu.img("convert", "-c", "-f", "raw", "-O", "qcow2", src, theirs)
    ours = _mkimg(qemu, tmp_path, "cluster_size=65536", size=len(raw), name="ours")
    with qcow2aio.open(ours, "r+") as img:
        img.write_compressed_sync(0, raw)
    assert _l2_entries(ours, 4) == _l2_entries(theirs, 4)
    assert _refcounts(ours, 8) == _refcounts(theirs, 8)
    _assert_clean(qemu, ours, compressed=4)
    assert qemu.convert_raw(ours) == raw


# --------------------------------------------------- mixed workloads, oracle
@pytest.mark.parametrize(
    "opts",
    [
        "compression_type=zlib,cluster_size=4096",
        "compression_type=zlib,cluster_size=65536",
        "compression_type=zlib,cluster_size=2M",
        "compression_type=zstd,cluster_size=4096",
        "compression_type=zstd,cluster_size=65536",
        "compression_type=zstd,cluster_size=2M",
        "compat=0.10,cluster_size=65536",
        "extended_l2=on,cluster_size=65536",
    ],
)
def test_mixed_with_normal_writes(qemu: Qemu, tmp_path: Path, opts: str) -> None:
    """Compressible and incompressible clusters, normal writes in between, then
    normal writes over compressed clusters (partial: COW from the compressed one);
    QEMU reads exactly the oracle, check is clean, map/check see the compressed ones."""
    cs = {"4096": 4096, "65536": 65536, "2M": 2 << 20}[opts.split("cluster_size=")[1]]
    size = max(SIZE, 10 * cs)
    path = _mkimg(qemu, tmp_path, opts, size=size)
    rng = random.Random(opts)
    oracle = bytearray(size)
    compressed: set[int] = set()
    with qcow2aio.open(path, "r+") as img:
        for c in range(0, 10, 2):  # even clusters compressed, odd ones normal writes
            data = _compressible(rng, cs) if c != 4 else rng.randbytes(cs)
            img.write_compressed_sync(c * cs, data)
            oracle[c * cs : (c + 1) * cs] = data
            if c != 4:
                compressed.add(c * cs)
            other = rng.randbytes(cs // 2)
            img.write_sync((c + 1) * cs + cs // 4, other)
            oracle[(c + 1) * cs + cs // 4 : (c + 1) * cs + cs // 4 + len(other)] = other
        # Partial normal writes over compressed clusters: they become normal clusters.
        for c in (2, 6):
            patch = rng.randbytes(cs // 8)
            img.write_sync(c * cs + cs // 3, patch)
            oracle[c * cs + cs // 3 : c * cs + cs // 3 + len(patch)] = patch
            compressed.discard(c * cs)
        assert img.read_sync(0, 10 * cs) == bytes(oracle[: 10 * cs])
    assert qemu.convert_raw(path) == bytes(oracle)
    _assert_clean(qemu, path, compressed=len(compressed))
    assert _compressed_in_map(qemu, path) >= compressed
    # Cluster 4 was incompressible: stored as a normal cluster (map gives an offset).
    assert 4 * cs not in _compressed_in_map(qemu, path)
    # QEMU keeps writing, we read its writes back.
    qemu.io(path, f"write -P 0x5a {8 * cs} {cs}")
    oracle[8 * cs : 9 * cs] = b"\x5a" * cs
    with qcow2aio.open(path, "r") as img:
        assert img.read_sync(0, size) == bytes(oracle)


# ------------------------------------------------------------------ refusals
def test_refusals_as_qemu(qemu: Qemu, tmp_path: Path) -> None:
    """Unaligned: Qcow2RangeError naming the value (QEMU: EINVAL). Over allocated data,
    an allocated zero cluster or a compressed cluster: EIO as QEMU, nothing changed.
    Unallocated and zero clusters are fine; an incompressible cluster over allocated
    data is a normal write (QEMU: same)."""
    path = _mkimg(qemu, tmp_path, "cluster_size=65536")
    cs = 65536
    with qcow2aio.open(path, "r+") as img:
        with pytest.raises(qcow2aio.Qcow2RangeError, match="offset=4096"):
            img.write_compressed_sync(4096, bytes(cs))
        with pytest.raises(qcow2aio.Qcow2RangeError, match="length=4096"):
            img.write_compressed_sync(0, bytes(4096))
        img.write_sync(0, b"\x01" * cs)
        with pytest.raises(qcow2aio.Qcow2IOError) as exc:
            img.write_compressed_sync(0, b"\x02" * cs)
        assert exc.value.errno == errno.EIO
        img.write_compressed_sync(cs, b"\x03" * cs)
        with pytest.raises(qcow2aio.Qcow2IOError):
            img.write_compressed_sync(cs, b"\x04" * cs)
        img.write_sync(2 * cs, b"\x05" * cs)
        asyncio.run(img.write_zeroes(2 * cs, cs, unmap=False))  # allocated zero cluster
        with pytest.raises(qcow2aio.Qcow2IOError):
            img.write_compressed_sync(2 * cs, b"\x06" * cs)
        asyncio.run(img.write_zeroes(3 * cs, cs))  # plain zero cluster: allowed
        img.write_compressed_sync(3 * cs, b"\x07" * cs)
        rnd = os.urandom(cs)
        img.write_compressed_sync(0, rnd)  # incompressible: a normal in-place write
        assert img.read_sync(0, 4 * cs) == rnd + b"\x03" * cs + bytes(cs) + b"\x07" * cs
    # QEMU refuses the same things.
    theirs = _mkimg(qemu, tmp_path, "cluster_size=65536", name="theirs")
    qemu.io(theirs, "write -P 1 0 64k")
    out = qemu.io(theirs, "write -c -P 2 0 64k", check=False)
    assert "Input/output error" in out.stdout + out.stderr
    _assert_clean(qemu, path, compressed=2)
    qemu.io(path, "read -P 3 64k 64k", "read -P 0 128k 64k", "read -P 7 192k 64k")


def test_partial_last_cluster(qemu: Qemu, tmp_path: Path) -> None:
    """The image's last, partial cluster may be written compressed (as QEMU allows),
    padded with zeros; a partial cluster elsewhere may not."""
    path = _mkimg(qemu, tmp_path, "cluster_size=65536", size=98304)
    with qcow2aio.open(path, "r+") as img:
        with pytest.raises(qcow2aio.Qcow2RangeError):
            img.write_compressed_sync(0, bytes(32768))
        img.write_compressed_sync(0, b"\x07" * 98304)
    qemu.io(path, "read -P 7 0 98304")
    _assert_clean(qemu, path, compressed=2)
    assert _compressed_in_map(qemu, path) == {0}  # one map run of both clusters


def test_encrypted_and_data_file_refused(qemu: Qemu, tmp_path: Path) -> None:
    """QEMU 7.2 writes compressed clusters of an encrypted image in plaintext: we
    refuse instead. With a data file QEMU refuses (ENOTSUP): so do we."""
    enc = tmp_path / "enc.qcow2"
    qcow2aio.create(enc, 1 << 20, encrypt_format="luks", passphrase="pw", encrypt_iter_time=10)
    with (
        qcow2aio.open(enc, "r+", passphrase="pw") as img,
        pytest.raises(qcow2aio.Qcow2UnsupportedError, match="crypt_method"),
    ):
        img.write_compressed_sync(0, bytes(65536))
    df = tmp_path / "df.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'df.raw'}", df, "1M")
    with (
        qcow2aio.open(df, "r+") as img,
        pytest.raises(qcow2aio.Qcow2UnsupportedError, match="data_file"),
    ):
        img.write_compressed_sync(0, bytes(65536))
    out = qemu.io(df, "write -c 0 64k", check=False)
    assert "not supported" in out.stdout + out.stderr


# ---------------------------------------------------------------- concurrency
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_concurrent_async(qemu: Qemu, tmp_path: Path, ctype: str) -> None:
    """Many coroutines at once: compressed writes of distinct clusters, normal writes
    of others, normal writes over clusters just written compressed (waiting for their
    in-flight allocation), reads; then a bytearray oracle, check and map."""
    cs = 65536
    nclusters = 48
    path = _mkimg(qemu, tmp_path, f"compression_type={ctype}", size=nclusters * cs)
    rng = random.Random(ctype)
    oracle = bytearray(nclusters * cs)
    datas = {c: _compressible(rng, cs) for c in range(0, nclusters, 3)}
    normal = {c: rng.randbytes(cs) for c in range(1, nclusters, 3)}
    patches = {c: rng.randbytes(512) for c in range(0, nclusters, 9)}

    async def main() -> None:
        async with qcow2aio.open(path, "r+") as img:

            async def comp(c: int) -> None:
                await img.write_compressed(c * cs, datas[c])
                if c in patches:
                    await img.write(c * cs + 1024, patches[c])

            async def norm(c: int) -> None:
                await img.write(c * cs, normal[c])

            jobs = [comp(c) for c in datas] + [norm(c) for c in normal]
            rng.shuffle(jobs)
            await asyncio.gather(*jobs)
            got = await img.read(0, nclusters * cs)
            assert got == bytes(oracle)

    for c, d in datas.items():
        oracle[c * cs : (c + 1) * cs] = d
    for c, d in normal.items():
        oracle[c * cs : (c + 1) * cs] = d
    for c, d in patches.items():
        oracle[c * cs + 1024 : c * cs + 1024 + 512] = d
    asyncio.run(main())
    assert qemu.convert_raw(path) == bytes(oracle)
    _assert_clean(qemu, path, compressed=len(datas) - len(patches))
    assert _compressed_in_map(qemu, path) >= {c * cs for c in datas if c not in patches}


def test_same_cluster_waits_for_inflight(qemu: Qemu, tmp_path: Path) -> None:
    """Two compressed writes of one cluster at once: the second waits for the first's
    allocation to be linked, then finds the cluster allocated (EIO), as if in order;
    the cluster holds the first one's data."""
    path = _mkimg(qemu, tmp_path, "cluster_size=65536")

    async def main() -> list[object]:
        async with qcow2aio.open(path, "r+") as img:
            return await asyncio.gather(
                img.write_compressed(0, b"\x01" * 65536),
                img.write_compressed(0, b"\x02" * 65536),
                return_exceptions=True,
            )

    res = asyncio.run(main())
    # Whichever compressed first allocates first (the compression runs in threads).
    won = [i for i, r in enumerate(res) if r == 65536]
    assert len(won) == 1, res
    lost = res[1 - won[0]]
    assert isinstance(lost, qcow2aio.Qcow2IOError) and lost.errno == errno.EIO, res
    qemu.io(path, f"read -P {won[0] + 1} 0 64k")
    _assert_clean(qemu, path, compressed=1)


def test_discarded_compressed_space_reused(qemu: Qemu, tmp_path: Path) -> None:
    """Compressed clusters discarded (refcounts of their shared host cluster drop to
    0) and written again: no leak, no clash with the packing position."""
    path = _mkimg(qemu, tmp_path, "cluster_size=65536")
    cs = 65536

    async def main() -> None:
        async with qcow2aio.open(path, "r+") as img:
            for c in range(4):
                await img.write_compressed(c * cs, bytes([c + 1]) * cs)
            await img.discard(0, 4 * cs)
            await img.flush()
            for c in range(4):
                await img.write_compressed(c * cs, bytes([c + 9]) * cs)
            await img.write(4 * cs, b"\x33" * cs)

    asyncio.run(main())
    qemu.io(path, *(f"read -P {c + 9} {c * cs} {cs}" for c in range(4)), "read -P 0x33 256k 64k")
    _assert_clean(qemu, path, compressed=4)


def test_threshold_as_qemu(qemu: Qemu, tmp_path: Path) -> None:
    """A cluster deflating to cluster_size - 2 bytes is stored compressed, one
    deflating to cluster_size - 1 as a normal cluster: the same choice as
    `qemu-img convert -c` for the same data."""
    import zlib

    cs = 65536
    base = random.Random(1).randbytes(cs)

    def deflated(n: int) -> int:
        obj = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        data = base[:n] + bytes(cs - n)
        return len(obj.compress(data) + obj.flush())

    found: dict[int, int] = {}
    for n in range(cs - 160, cs):
        found.setdefault(deflated(n), n)
    assert cs - 2 in found and cs - 1 in found, sorted(found)
    for size, expect_compressed in ((cs - 2, True), (cs - 1, False)):
        n = found[size]
        data = base[:n] + bytes(cs - n)
        src = tmp_path / f"src{size}.raw"
        src.write_bytes(data)
        theirs = tmp_path / f"theirs{size}.qcow2"
        qemu.img("convert", "-c", "-f", "raw", "-O", "qcow2", src, theirs)
        ours = _mkimg(qemu, tmp_path, "cluster_size=65536", size=cs, name=f"ours{size}")
        with qcow2aio.open(ours, "r+") as img:
            img.write_compressed_sync(0, data)
        for path in (ours, theirs):
            assert bool(_l2_entries(path, 1)[0] >> 62 & 1) == expect_compressed, (path, size)
        assert _l2_entries(ours, 1) == _l2_entries(theirs, 1)
        assert qemu.convert_raw(ours) == data


@pytest.mark.parametrize("kind", ["eio", "short"])
def test_failed_data_write_frees_bytes(qemu: Qemu, tmp_path: Path, kind: str) -> None:
    """The compressed bytes' write fails (fault at "write_compressed"): the error
    reaches the caller, the bytes' references are dropped (no leak), the guest cluster
    stays unallocated, and the next compressed writes work."""
    from faults import Fault, FaultState

    path = _mkimg(qemu, tmp_path, "cluster_size=65536")
    state = FaultState(Fault("write_compressed", kind, skip=1))
    cs = 65536

    async def main() -> None:
        async with qcow2aio.open(path, "r+", io_backend=state.factory()) as img:
            await img.write_compressed(0, b"\x01" * cs)
            with pytest.raises(qcow2aio.Qcow2IOError):
                await img.write_compressed(cs, b"\x02" * cs)
            img.write_compressed_sync(2 * cs, b"\x03" * cs)
            await img.write_compressed(cs, b"\x04" * cs)

    asyncio.run(main())
    assert state.fired == 1
    _assert_clean(qemu, path, compressed=3)
    qemu.io(path, "read -P 1 0 64k", "read -P 4 64k 64k", "read -P 3 128k 64k")


def test_threads_sync(qemu: Qemu, tmp_path: Path) -> None:
    """write_compressed_sync from several threads at once (distinct clusters), with
    normal write_sync calls between them: an oracle, check and map."""
    import threading

    cs = 4096
    path = _mkimg(qemu, tmp_path, "cluster_size=4096,compression_type=zstd", size=256 * cs)
    rng = random.Random(3)
    datas = {c: _compressible(rng, cs) for c in range(256)}
    errors: list[BaseException] = []
    with qcow2aio.open(path, "r+") as img:

        def worker(k: int) -> None:
            try:
                for c in range(k, 256, 4):
                    if c % 5:
                        img.write_compressed_sync(c * cs, datas[c])
                    else:
                        img.write_sync(c * cs, datas[c])
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors
    oracle = b"".join(datas[c] for c in range(256))
    assert qemu.convert_raw(path) == oracle
    ncomp = sum(1 for c in range(256) if c % 5)
    _assert_clean(qemu, path, compressed=ncomp)
    assert len(_compressed_in_map(qemu, path)) >= 1


@pytest.mark.parametrize("turns", [0, 1, 3, 8, 20])
def test_cancelled_async_leaves_no_leak(qemu: Qemu, tmp_path: Path, turns: int) -> None:
    """Cancelling write_compressed at any point: every cluster is either linked
    (compressed data) or untouched (zeros), never an allocation left in flight."""
    cs = 65536
    path = _mkimg(qemu, tmp_path, "cluster_size=65536")
    pats = [bytes([c + 1]) * cs for c in range(8)]

    async def main() -> None:
        async with qcow2aio.open(path, "r+") as img:
            task = asyncio.ensure_future(img.write_compressed(0, b"".join(pats)))
            for _ in range(turns):
                await asyncio.sleep(0)
            if task.cancel():
                with pytest.raises(asyncio.CancelledError):
                    await task
            got = await img.read(0, 8 * cs)
            for c in range(8):
                assert got[c * cs : (c + 1) * cs] in (pats[c], bytes(cs)), c

    asyncio.run(main())
    _assert_clean(qemu, path)


@pytest.mark.parametrize("other", ["discard", "write"])
def test_waits_for_inflight_compressed(qemu: Qemu, tmp_path: Path, other: str) -> None:
    """While a compressed cluster's data is being written (allocated, not linked), a
    discard or a normal write of that cluster waits for its link, then runs on the
    compressed cluster (the write as a COW of it)."""
    cs = 65536
    path = _mkimg(qemu, tmp_path, "cluster_size=65536")
    want = bytes(cs) if other == "discard" else b"\x01" * 100 + b"\x02" * 100 + b"\x01" * (cs - 200)

    async def main() -> None:
        async with qcow2aio.open(path, "r+") as img:
            gate, entered = asyncio.Event(), asyncio.Event()
            real = img._file.apwritev

            async def gated(bufs: Any, offset: int, event: str = "write") -> None:
                if event == "write_compressed":
                    entered.set()
                    await gate.wait()
                await real(bufs, offset, event)

            img._file.apwritev = gated  # type: ignore[method-assign]
            try:
                comp = asyncio.ensure_future(img.write_compressed(0, b"\x01" * cs))
                await entered.wait()
                if other == "discard":
                    later = asyncio.ensure_future(img.discard(0, cs))
                else:
                    later = asyncio.ensure_future(img.write(100, b"\x02" * 100))
                for _ in range(20):
                    await asyncio.sleep(0)
                assert not later.done()
            finally:
                gate.set()
            await asyncio.gather(comp, later)
            assert await img.read(0, cs) == want

    asyncio.run(main())
    _assert_clean(qemu, path, compressed=0)
    assert qemu.convert_raw(path)[:cs] == want
