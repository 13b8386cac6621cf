"""Internal snapshots: create, apply and delete against QEMU 7.2, both directions.

QEMU's snapshots (``qemu-img snapshot -c`` after ``qemu-io`` writes) are listed,
applied and deleted by qcow2aio; ours are listed and applied by ``qemu-img
snapshot``. Every step keeps a bytearray oracle per snapshot, and ``qemu-img
check`` must be clean with no leaks after each operation. The layout of an image
snapshotted by us is QEMU's (same clusters, same tables), dates and the content
of freed clusters aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import Qemu
from images import create

import qcow2aio
from qcow2aio.errors import ImageBusyError, Qcow2Error, WaitTimeoutError
from qcow2aio.snapshot_ops import SnapshotError, SnapshotNotFoundError

SIZE = 4 << 20

CONFIGS = [
    "compat=1.1",
    "compat=0.10",
    "cluster_size=512",
    "cluster_size=4096,refcount_bits=4",
    "refcount_bits=64",
    "lazy_refcounts=on",
    "extended_l2=on",
    "compat=0.10,cluster_size=4096",
]


def _opts(config: str) -> dict[str, str]:
    return dict(kv.split("=") for kv in config.split(","))


def _new(qemu: Qemu, path: Path, config: str, size: int = SIZE) -> Path:
    return create(qemu, path, size, **_opts(config))


def _qemu_writes(
    qemu: Qemu, path: Path, oracle: bytearray, rng: random.Random, n: int, unit: int
) -> None:
    cmds = []
    for _ in range(n):
        length = rng.choice([512, unit, 3 * unit, 4096 + 512])
        off = rng.randrange(0, (len(oracle) - length) // 512) * 512
        pat = rng.randrange(1, 255)
        cmds.append(f"write -P {pat} {off} {length}")
        oracle[off : off + length] = bytes([pat]) * length
    qemu.io(path, *cmds)


def _our_writes(img: qcow2aio.Image, oracle: bytearray, rng: random.Random, n: int) -> None:
    async def run() -> None:
        jobs = []
        for _ in range(n):
            length = rng.choice([512, 4096, 70000])
            off = rng.randrange(0, (len(oracle) - length) // 512) * 512
            data = rng.randbytes(length)
            oracle[off : off + length] = data
            jobs.append((off, data))
        # Sequential: overlapping writes in one gather would make the oracle ambiguous.
        for off, data in jobs:
            await img.write(off, data)

    asyncio.run(run())


def _clean(qemu: Qemu, path: Path) -> None:
    code, rep = qemu.check(path)
    assert code == 0, rep
    assert not rep.get("leaks") and not rep.get("corruptions"), rep


def _content(img: qcow2aio.Image) -> bytes:
    return img.read_sync(0, img.size)


@pytest.mark.parametrize("config", CONFIGS)
def test_qemu_snapshots_applied_and_deleted_by_us(qemu: Qemu, tmp_path: Path, config: str) -> None:
    path = _new(qemu, tmp_path / "q.qcow2", config)
    rng = random.Random(config)
    unit = int(_opts(config).get("cluster_size", "65536"))
    oracle = bytearray(SIZE)
    states: dict[str, bytes] = {}
    for name in ("s1", "s2", "s3"):
        _qemu_writes(qemu, path, oracle, rng, 12, unit)
        qemu.img("snapshot", "-c", name, path)
        states[name] = bytes(oracle)
    _qemu_writes(qemu, path, oracle, rng, 6, unit)
    qemu_list = qemu.info(path)["snapshots"]
    with qcow2aio.open(path, "r+") as img:
        assert img.snapshots() == qemu_list
        assert _content(img) == oracle
        img.apply_snapshot_sync("s2")
        assert _content(img) == states["s2"]
    _clean(qemu, path)
    assert qemu.convert_raw(path) == states["s2"]
    with qcow2aio.open(path, "r+") as img:
        img.delete_snapshot_sync("s2")
        _our_writes(img, oracle := bytearray(states["s2"]), rng, 8)
        assert _content(img) == oracle
    _clean(qemu, path)
    with qcow2aio.open(path, "r+") as img:
        img.apply_snapshot_sync("1")  # an id
        assert _content(img) == states["s1"]
        img.delete_snapshot_sync("s3")
        img.delete_snapshot_sync("s1")
        assert img.snapshots() == []
        assert _content(img) == states["s1"]
    _clean(qemu, path)
    assert struct.unpack(">IQ", path.read_bytes()[60:72]) == (0, 0)


@pytest.mark.parametrize("config", CONFIGS)
def test_our_snapshots_listed_and_applied_by_qemu(qemu: Qemu, tmp_path: Path, config: str) -> None:
    path = _new(qemu, tmp_path / "o.qcow2", config)
    rng = random.Random(config + "ours")
    oracle = bytearray(SIZE)
    states: dict[str, bytes] = {}
    with qcow2aio.open(path, "r+") as img:
        for name in ("a", "b", "c"):
            _our_writes(img, oracle, rng, 10)
            asyncio.run(img.create_snapshot(name))
            states[name] = bytes(oracle)
            _our_writes(img, oracle, rng, 4)
        # Each snapshot still holds its content (writes after it COWed shared clusters).
        for name in ("b", "a", "c"):
            img.apply_snapshot_sync(name)
            assert _content(img) == states[name], name
        info = img.snapshots()
    _clean(qemu, path)
    assert qemu.info(path)["snapshots"] == info
    assert [s["id"] for s in info] == ["1", "2", "3"]
    listing = qemu.img("snapshot", "-l", path).stdout
    assert listing.startswith("Snapshot list:\n")
    for name in ("a", "b"):
        qemu.img("snapshot", "-a", name, path)
        assert qemu.convert_raw(path) == states[name]
        _clean(qemu, path)
    qemu.img("snapshot", "-d", "b", path)
    _clean(qemu, path)
    with qcow2aio.open(path, "r+") as img:
        assert [s["name"] for s in img.snapshots()] == ["a", "c"]
        img.apply_snapshot_sync("c")
        assert _content(img) == states["c"]
    _clean(qemu, path)


def _used_clusters(path: Path) -> tuple[int, set[int]]:
    """Cluster size and the clusters with a nonzero refcount (qcow2aio's reading)."""
    with qcow2aio.open(path) as img:
        meta = img.meta
        n = (path.stat().st_size + meta.cluster_size - 1) // meta.cluster_size
        return meta.cluster_size, {c for c in range(n) if meta.get_refcount(c)}


def _normalized(path: Path) -> bytes:
    """The file with snapshot dates zeroed and free clusters blanked."""
    data = bytearray(path.read_bytes())
    cs, used = _used_clusters(path)
    for c in range(len(data) // cs + 1):
        if c not in used:
            data[c * cs : (c + 1) * cs] = bytes(len(data[c * cs : (c + 1) * cs]))

    def blank_tail(end: int) -> None:
        # QEMU discards freed clusters (zeros when reused); we do not punch holes yet,
        # so the unwritten tail of a reused cluster may hold older bytes.
        stop = (end + cs - 1) // cs * cs
        data[end:stop] = bytes(len(data[end:stop]))

    with qcow2aio.open(path) as img:
        for sn in img.meta.snapshots:
            blank_tail(sn.l1_table_offset + sn.l1_size * 8)
        if img.meta.header.nb_snapshots:
            blank_tail(img.meta.snapshot_table_end)
        pos = img.meta.header.snapshots_offset
        for _ in range(img.meta.header.nb_snapshots):
            pos = (pos + 7) & ~7
            _, _, id_len, name_len, _, _, _, _, extra = struct.unpack_from(">QIHHIIQII", data, pos)
            data[pos + 16 : pos + 24] = bytes(8)
            pos += 40 + extra + id_len + name_len
    return bytes(data)


@pytest.mark.parametrize("config", ["compat=1.1", "cluster_size=512", "extended_l2=on"])
def test_layout_is_qemus(qemu: Qemu, tmp_path: Path, config: str) -> None:
    """The same snapshot operations by qemu-img and by us give the same file."""
    base = _new(qemu, tmp_path / "base.qcow2", config)
    qemu.io(base, "write -P 1 0 200k", "write -P 2 1M 64k", "write -P 3 3M 8k")
    q, o = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    shutil.copyfile(base, q)
    shutil.copyfile(base, o)
    steps = [("-c", "one"), ("-c", "two"), ("-c", "one"), ("-a", "2"), ("-d", "one"), ("-c", "x")]
    for flag, name in steps:
        qemu.img("snapshot", flag, name, q)
        with qcow2aio.open(o, "r+") as img:
            {
                "-c": img.create_snapshot_sync,
                "-a": img.apply_snapshot_sync,
                "-d": img.delete_snapshot_sync,
            }[flag](name)
        assert _normalized(q) == _normalized(o), (flag, name)
    _clean(qemu, o)


def test_compressed_clusters_shared_and_released(qemu: Qemu, tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    rng = random.Random(5)
    content = bytearray(SIZE)
    for i in range(0, SIZE, 65536):
        if rng.random() < 0.6:
            content[i : i + 65536] = bytes([rng.randrange(256)]) * 40000 + rng.randbytes(25536)
    raw.write_bytes(content)
    path = tmp_path / "c.qcow2"
    qemu.img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, path)
    qemu.img("snapshot", "-c", "q", path)
    with qcow2aio.open(path, "r+") as img:
        img.create_snapshot_sync("ours")
        oracle = bytearray(content)
        _our_writes(img, oracle, rng, 20)
        img.delete_snapshot_sync("q")
        _clean_now = img.check()
        assert not _clean_now.get("leaks") and not _clean_now.get("corruptions")
        img.apply_snapshot_sync("ours")
        assert _content(img) == content
    _clean(qemu, path)
    with qcow2aio.open(path, "r+") as img:
        img.delete_snapshot_sync("ours")
    _clean(qemu, path)
    assert qemu.convert_raw(path) == content


def test_ids_names_and_resolution(qemu: Qemu, tmp_path: Path) -> None:
    path = _new(qemu, tmp_path / "n.qcow2", "compat=1.1")
    qemu.io(path, "write -P 7 0 64k")
    with qcow2aio.open(path, "r+") as img:
        img.create_snapshot_sync("dup")
        img.create_snapshot_sync("dup")  # names need not be unique (qemu-img allows it)
        qemu_free = img.write_sync(0, b"\x09" * 512)
        assert qemu_free == 512
        img.create_snapshot_sync("1")  # named like snapshot 1's id
        assert [(s["id"], s["name"]) for s in img.snapshots()] == [
            ("1", "dup"),
            ("2", "dup"),
            ("3", "1"),
        ]
        img.apply_snapshot_sync("1")  # the id wins
        assert img.read_sync(0, 1) == b"\x07"
        img.delete_snapshot_sync("1")  # the name wins (qemu-img -d: names)
        assert [s["id"] for s in img.snapshots()] == ["1", "2"]
        img.delete_snapshot_sync("dup")  # the first of that name
        assert [s["id"] for s in img.snapshots()] == ["2"]
        img.create_snapshot_sync("new")
        assert [s["id"] for s in img.snapshots()] == ["2", "3"]
        with pytest.raises(SnapshotNotFoundError):
            img.apply_snapshot_sync("nosuch")
        with pytest.raises(SnapshotNotFoundError):
            img.delete_snapshot_sync("nosuch")
    _clean(qemu, path)
    # QEMU numbers after our ids.
    qemu.img("snapshot", "-c", "q", path)
    assert [s["id"] for s in qemu.info(path)["snapshots"]] == ["2", "3", "4"]


def test_refcount_overflow_refused_before_any_change(qemu: Qemu, tmp_path: Path) -> None:
    path = create(qemu, tmp_path / "r1.qcow2", SIZE, refcount_bits=1)
    qemu.io(path, "write -P 1 0 64k")
    before = path.read_bytes()
    with qcow2aio.open(path, "r+") as img:
        with pytest.raises(SnapshotError) as exc:
            img.create_snapshot_sync("x")
        assert exc.value.errno == 22
        assert img.snapshots() == []
        assert img.read_sync(0, 1) == b"\x01"
    assert path.read_bytes() == before
    proc = qemu.img("snapshot", "-c", "x", path, check=False)
    assert proc.returncode == 1 and "-22 (Invalid argument)" in proc.stderr


def _entry0(path: Path) -> int:
    return struct.unpack(">Q", path.read_bytes()[64:72])[0]


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _hostile_cases() -> list[str]:
    return ["l1_past_eof", "l2_unaligned", "l2_on_reftable", "data_on_header", "refcount_zero"]


@pytest.mark.parametrize("case", _hostile_cases())
def test_hostile_snapshot_table_refused_before_any_change(
    qemu: Qemu, tmp_path: Path, case: str
) -> None:
    path = create(qemu, tmp_path / "h.qcow2", SIZE, cluster_size=4096)
    qemu.io(path, "write -P 1 0 64k")
    qemu.img("snapshot", "-c", "s", path)
    qemu.io(path, "write -P 2 0 4k")
    with qcow2aio.open(path) as img:
        sn = img.meta.snapshots[0]
        hdr = img.meta.header
        sn_l1 = img.meta.file.pread(sn.l1_table_offset, 8, "x")
        l2 = struct.unpack(">Q", sn_l1)[0] & 0x00FFFFFFFFFFFE00
    table = hdr.snapshots_offset
    if case == "l1_past_eof":
        _poke(path, table, struct.pack(">Q", 1 << 40))
    elif case == "l2_unaligned":
        _poke(path, sn.l1_table_offset, struct.pack(">Q", l2 + 512))
    elif case == "l2_on_reftable":
        _poke(path, sn.l1_table_offset, struct.pack(">Q", hdr.refcount_table_offset))
    elif case == "data_on_header":
        _poke(path, l2, struct.pack(">Q", (1 << 63) | 0))  # COPIED, offset 0: no data
        _poke(path, l2 + 8, struct.pack(">Q", hdr.l1_table_offset))
    else:
        # An L2 entry pointing at a cluster nobody counts (past everything allocated).
        end = (path.stat().st_size + 4095) // 4096 * 4096
        with open(path, "ab") as f:
            f.truncate(end + 4096)
        _poke(path, l2 + 8, struct.pack(">Q", end))
    before = path.read_bytes()
    with qcow2aio.open(path, "r+") as img:
        with pytest.raises(Qcow2Error):
            img.apply_snapshot_sync("s")
        with pytest.raises(Qcow2Error):
            img.delete_snapshot_sync("s")
        assert img.read_sync(0, 1) == b"\x02"
    assert path.read_bytes() == before


def test_concurrent_writes_during_create(qemu: Qemu, tmp_path: Path) -> None:
    """Async writes before, during and after create_snapshot: all complete; the snapshot
    holds every write completed before the call, none started after it returned, and
    each racing write whole or not at all."""
    path = create(qemu, tmp_path / "c.qcow2", SIZE, cluster_size=4096)
    chunk = 8192
    n = SIZE // chunk

    async def run() -> tuple[set[int], set[int], bytes, dict[int, bytes]]:
        img = qcow2aio.open(path, "r+")
        done_before: set[int] = set()
        started_after: set[int] = set()
        phase = ["before"]
        data = {i: bytes([i % 250 + 1]) * chunk for i in range(n)}

        first = [i for i in range(n) if i % 4 == 1]  # done before the snapshot starts
        firsts_done = asyncio.Event()
        snapped = asyncio.Event()
        pending_first = [len(first)]

        async def writer(i: int) -> None:
            if i % 4 == 0:
                await snapped.wait()  # starts after the snapshot
            elif i % 4 != 1:
                await asyncio.sleep(0.0005 * (i % 37))  # races with it
            if phase[0] == "after":
                started_after.add(i)
            await img.write(i * chunk, data[i])
            if phase[0] == "before":
                done_before.add(i)
            if i % 4 == 1:
                pending_first[0] -= 1
                if not pending_first[0]:
                    firsts_done.set()

        async def snapper() -> None:
            await firsts_done.wait()
            phase[0] = "during"
            await img.create_snapshot("mid")
            phase[0] = "after"
            snapped.set()

        await asyncio.gather(snapper(), *(writer(i) for i in range(n)))
        final = await img.read(0, SIZE)
        await img.apply_snapshot("mid")
        snap = await img.read(0, SIZE)
        await img.aclose()
        return done_before, started_after, snap, {i: data[i] for i in range(n)} | {-1: final}

    done_before, started_after, snap, data = asyncio.run(run())
    final = data.pop(-1)
    assert final == b"".join(data[i] for i in range(n))
    assert {i for i in range(n) if i % 4 == 1} <= done_before
    assert {i for i in range(n) if i % 4 == 0} <= started_after
    for i in range(n):
        got = snap[i * chunk : (i + 1) * chunk]
        if i in done_before:
            assert got == data[i], i
        elif i in started_after:
            assert got == bytes(chunk), i
        else:
            assert got in (data[i], bytes(chunk)), i
    _clean(qemu, path)


def test_sync_twin_in_a_loop_thread_does_not_wait(qemu: Qemu, tmp_path: Path) -> None:
    path = create(qemu, tmp_path / "b.qcow2", SIZE)

    async def run() -> None:
        img = qcow2aio.open(path, "r+")
        await img.lock.acquire()  # as a suspended request holding the lock would
        try:
            with pytest.raises(ImageBusyError):
                img.create_snapshot_sync("x")
        finally:
            img.lock.release()
        img.create_snapshot_sync("x")
        await img.aclose()

    asyncio.run(run())
    assert [s["name"] for s in qemu.info(path)["snapshots"]] == ["x"]
    _clean(qemu, path)


def test_read_only_and_data_file_refused(qemu: Qemu, tmp_path: Path) -> None:
    path = create(qemu, tmp_path / "ro.qcow2", SIZE)
    with qcow2aio.open(path) as img, pytest.raises(Qcow2Error):
        img.create_snapshot_sync("x")
    df = create(qemu, tmp_path / "df.qcow2", SIZE, data_file=str(tmp_path / "df.raw"))
    with qcow2aio.open(df, "r+") as img, pytest.raises(SnapshotError) as exc:
        img.create_snapshot_sync("x")
    assert exc.value.errno == 95


# ---------------------------------------------------------------------- CLI
ROOT = Path(__file__).resolve().parent.parent


def _ours(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcow2aio", "snapshot", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
    )


def _theirs(qemu: Qemu, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return qemu.img("snapshot", *args, check=False)


_DATE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def _same(ours: subprocess.CompletedProcess[str], theirs: subprocess.CompletedProcess[str]) -> None:
    """Same exit code and text; listings of twin images may differ in their dates only
    (each tool took its snapshots at its own time)."""
    assert ours.returncode == theirs.returncode, (ours, theirs)
    assert _DATE.sub("DATE", ours.stdout) == _DATE.sub("DATE", theirs.stdout)
    assert ours.stderr.replace("qcow2aio", "qemu-img") == theirs.stderr


def test_cli_matches_qemu_img(qemu: Qemu, tmp_path: Path) -> None:
    q = create(qemu, tmp_path / "q.qcow2", SIZE)
    qemu.io(q, "write -P 5 0 128k")
    o = tmp_path / "o.qcow2"
    shutil.copyfile(q, o)
    # Same actions on two copies: the same outputs and exit codes.
    for args in [
        ("-l",),
        (),
        ("-c", "first"),
        ("-c", "first"),
        ("-lq",),
        ("-a", "nosuch"),
        ("-d", "nosuch"),
        ("-d", "1"),
        ("-a", "1"),
        ("-l", "-c", "x"),
        ("-l", "-l"),
        ("-x",),
        ("-lx",),
        ("--bogus",),
        ("-d", "first"),
        ("-c",),
    ]:
        _same(_ours(*args, o), _theirs(qemu, *args, q))
        # -l output includes dates: compare the listings with the dates cut out.
        lo, lq = _ours("-l", o).stdout, _theirs(qemu, "-l", q).stdout
        assert [line[:30] for line in lo.splitlines()] == [line[:30] for line in lq.splitlines()]
    for args in [("-l",), ("-l", "a", "b")]:
        _same(_ours(*args), _theirs(qemu, *args))
    _same(_ours("-l", tmp_path / "none.qcow2"), _theirs(qemu, "-l", tmp_path / "none.qcow2"))
    _clean(qemu, o)
    # Ours listed by qemu-img, theirs by us: the same text.
    _ours("-c", "mine", o)
    assert _ours("-l", o).stdout == _theirs(qemu, "-l", o).stdout
    assert "mine" in _ours("-l", o).stdout
    info = subprocess.run(
        [sys.executable, "-m", "qcow2aio", "info", "--output=json", str(o)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert json.loads(info.stdout)["snapshots"] == qemu.info(o)["snapshots"]


def test_cli_create_failure_message(qemu: Qemu, tmp_path: Path) -> None:
    q = create(qemu, tmp_path / "r1.qcow2", SIZE, refcount_bits=1)
    qemu.io(q, "write -P 1 0 64k")
    o = tmp_path / "o.qcow2"
    shutil.copyfile(q, o)
    _same(_ours("-c", "new", o), _theirs(qemu, "-c", "new", q))


def test_sync_twin_in_a_plain_thread_waits(qemu: Qemu, tmp_path: Path) -> None:
    """Without a running loop the sync twins wait for the lock (and a drain), bounded."""
    path = create(qemu, tmp_path / "w.qcow2", SIZE)
    img = qcow2aio.open(path, "r+", wait_timeout=10)
    img.lock.acquire_blocking(1)
    timer = threading.Timer(0.2, img.lock.release)
    timer.start()
    img.create_snapshot_sync("x")  # waits for the holder
    timer.join()
    img.lock.acquire_blocking(1)
    img.wait_timeout = 0.1
    with pytest.raises(WaitTimeoutError):
        img.delete_snapshot_sync("x")
    img.lock.release()
    img.wait_timeout = 10
    assert [s["name"] for s in img.snapshots()] == ["x"]
    img.close()
    _clean(qemu, path)


# ------------------------------------------------------------ injected faults
def _fault_base(qemu: Qemu, folder: Path) -> tuple[Path, dict[str, bytes]]:
    """A v3 image with snapshot "a" and writes after it; its contents by name."""
    path = create(qemu, folder / "base.qcow2", 1 << 20, cluster_size=4096)
    qemu.io(path, "write -P 1 0 300k")
    rng = random.Random(3)
    with qcow2aio.open(path, "r+") as img:
        img.create_snapshot_sync("a")
        a = img.read_sync(0, 1 << 20)
        for _ in range(6):
            off = rng.randrange(0, 250) * 4096
            img.write_sync(off, rng.randbytes(6000))
        now = img.read_sync(0, 1 << 20)
    return path, {"a": a, "now": now}


@pytest.mark.parametrize("op", ["create", "apply", "delete"])
@pytest.mark.parametrize("kind", ["eio", "enospc", "short", "eio-persistent"])
def test_io_error_at_every_step(qemu: Qemu, tmp_path: Path, op: str, kind: str) -> None:
    """An I/O error at each I/O operation of a snapshot operation: the call fails cleanly
    (or succeeds), and the file then holds the state before or after it, leaks at most
    (a dirty state is repaired clean by the read-write open), every snapshot intact."""
    from faults import Fault, FaultState

    base, contents = _fault_base(qemu, tmp_path)
    arg = {"create": "b", "apply": "a", "delete": "a"}[op]
    after_content = contents["a"] if op == "apply" else contents["now"]
    path = tmp_path / "f.qcow2"

    def run(fault: Fault | None) -> tuple[FaultState, bool, int]:
        shutil.copyfile(base, path)
        state = FaultState(fault)
        state.enabled = False
        img = qcow2aio.open(path, "r+", io_backend=state.factory())
        state.enabled = True
        start = state.ops
        ok = True
        try:
            getattr(img, f"{op}_snapshot_sync")(arg)
        except Qcow2Error:
            ok = False
        state.enabled = False
        used = state.ops - start
        with contextlib.suppress(Qcow2Error):
            img.close()
        return state, ok, used

    _, ok, total = run(None)
    assert ok
    assert total > 5
    failed = 0
    for k in range(total):
        state, ok, _ = run(
            Fault("*", kind.split("-")[0], persistent=kind.endswith("persistent"), skip=k)
        )
        assert state.injections, k
        failed += not ok
        where = f"{op}: {kind} at I/O {k + 1}/{total} ({state.injections})"
        with qcow2aio.open(path, "r+") as img:  # repairs a dirty state
            content = img.read_sync(0, 1 << 20)
            names = [s["name"] for s in img.snapshots()]
            rep = img.check()
        assert not rep.get("corruptions") and not rep.get("check-errors"), (where, rep)
        done = {"create": "b" in names, "delete": "a" not in names, "apply": True}[op]
        if ok:
            assert done and content == after_content, where
        elif op != "apply":
            assert content == contents["now"], where
        else:
            assert content in (contents["now"], contents["a"]), where
        with qcow2aio.open(path, "r+") as img:
            for name in names:
                img.apply_snapshot_sync(name)
                want = contents["now"] if name == "b" else contents["a"]
                assert img.read_sync(0, 1 << 20) == want, (where, name)
        code, qrep = qemu.check(path)
        assert code in (0, 3), (where, qrep)
    assert failed, "no injected error made the operation fail"
