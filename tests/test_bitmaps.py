"""Persistent dirty bitmaps against QEMU 7.2 (issue 15).

QEMU is the oracle throughout: bitmaps made by ``qemu-img bitmap`` and dirtied by
``qemu-io`` must read back through :meth:`Image.dirty_extents` exactly as QEMU
exports them (``qemu-nbd -B NAME`` + ``nbdinfo --map=qemu:dirty-bitmap:NAME``);
bitmaps we maintain must be exported by QEMU exactly as we report them, and the
image must stay ``qemu-img check`` clean.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Qemu

import qcow2aio
from qcow2aio import bitmaps as B
from qcow2aio.bitmaps import BitmapInconsistentError, BitmapNotFoundError, DirtyBitmap
from qcow2aio.errors import Qcow2Error

KiB = 1024
MiB = 1024 * KiB


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # the oracle must be present, never silently skipped
        pytest.fail(f"{name} not found: `make test` installs qemu-utils and libnbd-bin")
    return path


def qemu_view(path: Path, name: str) -> list[tuple[int, int]]:
    """QEMU's dirty ranges of bitmap ``name``: qemu-nbd -B, nbdinfo --map, merged."""
    sockdir = tempfile.mkdtemp(prefix="bm", dir="/tmp")
    sock = os.path.join(sockdir, "s")
    proc = subprocess.Popen(
        [_tool("qemu-nbd"), "-r", "-B", name, "-k", sock, "-f", "qcow2", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(500):
            if os.path.exists(sock) or proc.poll() is not None:
                break
            time.sleep(0.01)
        if proc.poll() is not None:
            raise AssertionError(f"qemu-nbd failed: {proc.stderr.read() if proc.stderr else ''!r}")
        out = subprocess.run(
            [
                _tool("nbdinfo"),
                "--json",
                f"--map=qemu:dirty-bitmap:{name}",
                f"nbd+unix:///?socket={sock}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    finally:
        proc.wait(timeout=30)
        shutil.rmtree(sockdir, ignore_errors=True)
    runs: list[tuple[int, int]] = []
    for rec in json.loads(out):
        if rec["type"] & 1:
            start, n = rec["offset"], rec["length"]
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((start, n))
    return runs


def qemu_bitmaps(qemu: Qemu, path: Path) -> list[dict[str, object]]:
    data = qemu.info(path)["format-specific"]["data"]
    out: list[dict[str, object]] = data.get("bitmaps", [])
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def naive_extents(
    ranges: list[tuple[int, int]], gran: int, size: int, off: int = 0, n: int | None = None
) -> list[tuple[int, int]]:
    """The oracle: a set of dirty chunks, turned into clipped merged ranges."""
    chunks = set()
    for s, ln in ranges:
        if ln <= 0:
            continue
        for c in range(s // gran, min((s + ln - 1) // gran, (size - 1) // gran) + 1):
            chunks.add(c)
    end = size if n is None else min(off + n, size)
    out: list[tuple[int, int]] = []
    for c in sorted(chunks):
        lo, hi = max(off, c * gran), min(end, (c + 1) * gran)
        if hi <= lo:
            continue
        if out and out[-1][0] + out[-1][1] == lo:
            out[-1] = (out[-1][0], out[-1][1] + hi - lo)
        else:
            out.append((lo, hi - lo))
    return out


# ------------------------------------------------------------------- codec
def test_directory_codec_roundtrip_and_limits() -> None:
    entries = [
        B.DirEntry("a", 0x10000, 1, B.FLAG_AUTO, 16, raw_name=b"a"),
        B.DirEntry("b" * 1023, 0x20000, 2, B.FLAG_IN_USE, 9, raw_name=b"b" * 1023),
    ]
    raw = B.encode_directory(entries)
    assert len(raw) == (24 + 1 + 7) // 8 * 8 + (24 + 1023 + 7) // 8 * 8
    back = B.decode_directory(raw, 2, 65536, 64 * MiB)
    assert [(e.name, e.table_offset, e.table_size, e.flags, e.gran_bits) for e in back] == [
        ("a", 0x10000, 1, B.FLAG_AUTO, 16),
        ("b" * 1023, 0x20000, 2, B.FLAG_IN_USE, 9),
    ]
    with pytest.raises(Qcow2Error, match="More bitmaps"):
        B.decode_directory(raw, 1, 65536, 64 * MiB)
    with pytest.raises(Qcow2Error, match="Less bitmaps"):
        B.decode_directory(raw, 3, 65536, 64 * MiB)
    # A consistent bitmap whose table cannot cover the disk; granularity out of range;
    # reserved flags; an unaligned table: each names the bitmap.
    for bad in (
        B.DirEntry("x", 0x10000, 1, 0, 9, raw_name=b"x"),  # 1 cluster of bits: 256 MiB
        B.DirEntry("x", 0x10000, 1, 0, 32, raw_name=b"x"),
        B.DirEntry("x", 0x10000, 1, 0, 8, raw_name=b"x"),
        B.DirEntry("x", 0x10000, 1, 4, 16, raw_name=b"x"),
        B.DirEntry("x", 0x10200, 1, 0, 16, raw_name=b"x"),
        B.DirEntry("x", 0, 1, 0, 16, raw_name=b"x"),
    ):
        with pytest.raises(Qcow2Error, match="Bitmap 'x'"):
            B.decode_directory(B.encode_directory([bad]), 1, 65536, 1024 * MiB)
    assert B.table_entry_ok(0, 65536) and B.table_entry_ok(1, 65536)
    assert B.table_entry_ok(0x30000, 65536)
    assert not B.table_entry_ok(0x30001, 65536)  # all-ones with an offset
    assert not B.table_entry_ok(0x30200, 65536)  # unaligned
    assert not B.table_entry_ok(1 << 60, 65536)  # reserved
    with pytest.raises(Qcow2Error, match="entry 1"):
        B.decode_table(B.encode_table([0, 2]), 65536, "t")


def test_mark_and_extents_against_naive_oracle() -> None:
    rng = random.Random(15)
    for _ in range(200):
        gran_bits = rng.choice([9, 10, 12, 16, 20])
        gran = 1 << gran_bits
        size = rng.randrange(1, 300) * 512 * rng.choice([1, 7, 64, 1024])
        bm = DirtyBitmap("t", gran_bits, size)
        ranges = []
        for _ in range(rng.randrange(0, 12)):
            s = rng.randrange(0, size)
            n = rng.randrange(0, min(size - s, 40 * gran) + 1)
            ranges.append((s, n))
            bm.mark(s, n)
        assert bm.extents() == naive_extents(ranges, gran, size)
        off = rng.randrange(0, size)
        n = rng.randrange(0, size - off + 1)
        assert bm.extents(off, n) == naive_extents(ranges, gran, size, off, n)
        assert bm.extents(size + 512, 512) == []


def test_mark_is_constant_time_for_huge_ranges() -> None:
    """1 TiB at 64 KiB granularity: 2 MiB of bits; a full-disk mark is one slice."""
    bm = DirtyBitmap("t", 16, 1 << 40)
    assert len(bm.bits) == 2 * MiB
    bm.mark(12345, (1 << 40) - 20000)
    assert bm.extents() == [(0, 1 << 40)]
    assert bm.extents(5 * MiB, 4096) == [(5 * MiB, 4096)]
    bm.clear()
    bm.mark((1 << 40) - 1, 1)
    assert bm.extents(0, None) == [((1 << 40) - 65536, 65536)]


# ---------------------------------------------------------- QEMU -> us
def _qemu_image(qemu: Qemu, path: Path, size: str = "64M", *opts: str) -> Path:
    args: list[str] = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu.img(*args, path, size)
    return path


def test_read_bitmaps_written_by_qemu(qemu: Qemu, tmp_path: Path) -> None:
    """Granularities from QEMU's minimum to its maximum, disabled ones untouched, the
    writes of every kind qemu-io has; the list as qemu-img info, the bits as qemu-nbd."""
    p = _qemu_image(qemu, tmp_path / "a.qcow2", "96M")
    qemu.img("bitmap", "--add", "-g", "512", p, "g512")
    qemu.img("bitmap", "--add", p, "dflt")
    qemu.img("bitmap", "--add", "-g", "1M", p, "g1M")
    qemu.img("bitmap", "--add", "-g", "2G", p, "g2G")
    qemu.img("bitmap", "--add", "--disable", p, "off")
    qemu.io(
        p,
        "write -P 1 1536 512",
        "write 1M 64k",
        "write -z 5M 512",
        "write -z -u 8M 1M",
        "discard 7M 64k",
        "discard 12345 777",
        "write -c 20M 64k",
        f"write {96 * MiB - 4096} 4k",
    )
    size = 96 * MiB
    with qcow2aio.open(p) as img:
        assert img.bitmaps() == qemu_bitmaps(qemu, p)
        names = [b["name"] for b in img.bitmaps()]
        assert names == ["g512", "dflt", "g1M", "g2G", "off"]
        for name in names:
            assert img.dirty_extents(name) == qemu_view(p, name), name
        assert img.dirty_extents("off") == []
        assert img.dirty_extents("g2G") == [(0, size)]
        # Clipped to the request.
        assert img.dirty_extents("dflt", MiB + 4096, 8192) == [(MiB + 4096, 8192)]
        with pytest.raises(BitmapNotFoundError, match="Dirty bitmap 'nope' not found"):
            img.dirty_extents("nope")


def test_read_only_open_changes_nothing(qemu: Qemu, tmp_path: Path) -> None:
    p = _qemu_image(qemu, tmp_path / "a.qcow2")
    qemu.img("bitmap", "--add", p, "b")
    qemu.io(p, "write 0 1M")
    before = digest(p)
    with qcow2aio.open(p) as img:
        assert img.dirty_extents("b") == [(0, MiB)]
        img.read_sync(0, 4096)
    assert digest(p) == before


def test_all_ones_and_all_zeroes_table_entries(qemu: Qemu, tmp_path: Path) -> None:
    """Table entry 1 (all ones) and 0 (all zeroes): QEMU never writes entry 1, so the
    table is patched; qemu-nbd must agree with us on the result."""
    p = _qemu_image(qemu, tmp_path / "a.qcow2", "1G")
    qemu.img("bitmap", "--add", "-g", "512", p, "b")  # 2 MiB of bits: 32 table entries
    qemu.io(p, "write 0 4k")
    with qcow2aio.open(p) as img:
        (e,) = B.read_directory(img.meta)
    with open(p, "r+b") as f:
        f.seek(e.table_offset + 8 * 3)
        f.write((1).to_bytes(8, "big"))
    with qcow2aio.open(p) as img:
        ours = img.dirty_extents("b")
    cluster = 65536 * 8 * 512  # guest bytes one cluster of bits covers
    assert ours == [(0, 4096), (3 * cluster, cluster)]
    assert ours == qemu_view(p, "b")


# ---------------------------------------------------------- us -> QEMU
def _random_io(img: qcow2aio.Image, rng: random.Random, size: int) -> list[tuple[int, int]]:
    done = []
    for _ in range(40):
        kind = rng.choice(["w", "w", "w", "z", "d", "c", "big"])
        if kind == "c":
            cs = img.cluster_size  # one cluster: a refused one writes nothing
            off = rng.randrange(0, size // cs) * cs
            try:
                img.write_compressed_sync(off, bytes([7]) * cs)
            except Qcow2Error:
                continue  # allocated already: QEMU's EIO
            done.append((off, cs))
            continue
        off = rng.randrange(0, size - 1)
        n = min(size - off, rng.choice([1, 512, 4096, 65536, 300000]))
        if kind == "big":
            n = min(size - off, 3 * MiB)
        if kind in ("w", "big"):
            img.write_sync(off, bytes([rng.randrange(256)]) * n)
        else:
            import asyncio

            coro = img.write_zeroes(off, n) if kind == "z" else img.discard(off, n)
            asyncio.run(coro)
        done.append((off, n))
    return done


def test_we_maintain_qemu_reads(qemu: Qemu, tmp_path: Path) -> None:
    size = 64 * MiB
    p = _qemu_image(qemu, tmp_path / "a.qcow2")
    qemu.img("bitmap", "--add", "-g", "512", p, "fine")
    qemu.img("bitmap", "--add", p, "b64k")
    qemu.img("bitmap", "--add", "--disable", p, "off")
    qemu.io(p, "write 0 64k")
    rng = random.Random(7)
    with qcow2aio.open(p, "r+") as img:
        # IN_USE on disk from the open on, before any write (qemu-img info -U agrees).
        flags = {
            b["name"]: b["flags"]
            for b in qemu.info(p, extra_args=["-U"])["format-specific"]["data"]["bitmaps"]
        }
        assert flags == {"fine": ["in-use", "auto"], "b64k": ["in-use", "auto"], "off": ["in-use"]}
        done = _random_io(img, rng, size)
        img.add_bitmap_sync("late", granularity=4096)
        late = _random_io(img, rng, size)
        ours = {n: img.dirty_extents(n) for n in ("fine", "b64k", "off", "late")}
    assert ours["fine"] == naive_extents([(0, 65536), *done, *late], 512, size)
    assert ours["b64k"] == naive_extents([(0, 65536), *done, *late], 65536, size)
    assert ours["off"] == []
    assert ours["late"] == naive_extents(late, 4096, size)
    rc, report = qemu.check(p)
    assert rc == 0 and report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0
    assert qemu_bitmaps(qemu, p) == [
        {"flags": ["auto"], "name": "fine", "granularity": 512},
        {"flags": ["auto"], "name": "b64k", "granularity": 65536},
        {"flags": [], "name": "off", "granularity": 65536},
        {"flags": ["auto"], "name": "late", "granularity": 4096},
    ]
    for name, runs in ours.items():
        assert qemu_view(p, name) == runs, name
    # And QEMU keeps maintaining them after us.
    qemu.io(p, "write 40M 4k")
    with qcow2aio.open(p) as img:
        assert img.dirty_extents("late", 40 * MiB, 4096) == [(40 * MiB, 4096)]


def test_async_writes_mark(qemu: Qemu, tmp_path: Path) -> None:
    import asyncio

    p = _qemu_image(qemu, tmp_path / "a.qcow2")
    qemu.img("bitmap", "--add", "-g", "4k", p, "b")

    async def go() -> list[tuple[int, int]]:
        async with qcow2aio.open(p, "r+") as img:
            await asyncio.gather(*(img.write(i * 3 * MiB + 100, b"x" * 5000) for i in range(8)))
            await img.write(0, b"y" * 512)  # allocated now: the in-place fast path
            await img.write_compressed(50 * MiB, b"z" * 65536)
            await img.write_zeroes(60 * MiB + 1, 2 * 65536)
            await img.discard(62 * MiB + 7, 100)  # unaligned: marked, nothing discarded
            return img.dirty_extents("b")

    ours = asyncio.run(go())
    writes = [(i * 3 * MiB + 100, 5000) for i in range(8)]
    writes += [(0, 512), (50 * MiB, 65536), (60 * MiB + 1, 2 * 65536), (62 * MiB + 7, 100)]
    assert ours == naive_extents(writes, 4096, 64 * MiB)
    assert qemu_view(p, "b") == ours


# -------------------------------------------------------------- in use
def _crash_qemu(qemu: Qemu, path: Path, *cmds: str) -> None:
    """qemu-io's ``abort``: the process dies with the bitmaps IN_USE on disk."""
    qemu.io(path, *cmds, "abort", check=False)


def test_bitmaps_found_in_use(qemu: Qemu, tmp_path: Path) -> None:
    p = _qemu_image(qemu, tmp_path / "a.qcow2")
    qemu.img("bitmap", "--add", p, "b0")
    qemu.img("bitmap", "--add", "--disable", p, "b1")
    qemu.img("bitmap", "--add", p, "ok")
    _crash_qemu(qemu, p, "write 0 64k")
    with qcow2aio.open(p) as img:
        assert img.bitmaps() == qemu_bitmaps(qemu, p)
        assert img.bitmaps()[0]["flags"] == ["in-use", "auto"]
        with pytest.raises(BitmapInconsistentError, match="Bitmap 'b0' is inconsistent"):
            img.dirty_extents("b0")
    # A read-write open of only inconsistent bitmaps leaves the directory alone (QEMU).
    before = B.EXT.unpack(qcow2aio.open(p).meta.header.bitmaps_ext or b"")
    with qcow2aio.open(p, "r+") as img:
        img.write_sync(MiB, b"x" * 4096)
        for op in (img.clear_bitmap_sync, img.enable_bitmap_sync, img.disable_bitmap_sync):
            with pytest.raises(BitmapInconsistentError):
                op("b0")
    with qcow2aio.open(p) as img:
        assert B.EXT.unpack(img.meta.header.bitmaps_ext or b"") == before
    # Removal works; the rest stay in use; check is clean.
    with qcow2aio.open(p, "r+") as img:
        img.remove_bitmap_sync("b0")
    assert [b["name"] for b in qemu_bitmaps(qemu, p)] == ["b1", "ok"]
    assert qemu.check(p)[0] == 0


def test_crash_while_open_leaves_in_use(qemu: Qemu, tmp_path: Path) -> None:
    """A writer that dies without closing leaves IN_USE bitmaps, never a consistent
    bitmap that misses a write."""
    p = _qemu_image(qemu, tmp_path / "a.qcow2")
    qemu.img("bitmap", "--add", p, "b")
    img = qcow2aio.open(p, "r+")
    img.write_sync(0, b"x" * 4096)
    img.flush_sync()
    img._close_files()  # the process dies: no close steps
    img._closed = True
    assert qemu_bitmaps(qemu, p) == [
        {"flags": ["in-use", "auto"], "name": "b", "granularity": 65536}
    ]
    assert qemu.check(p)[0] == 0


@pytest.fixture
def chdir_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    yield tmp_path


# ------------------------------------------------------------------- CLI
def _setup_cli_dir(qemu: Qemu, d: Path) -> None:
    d.mkdir()
    _qemu_image(qemu, d / "img.qcow2")
    qemu.io(d / "img.qcow2", "write 0 1M")
    _qemu_image(qemu, d / "src.qcow2")
    qemu.img("bitmap", "--add", "-g", "4k", d / "src.qcow2", "s")
    qemu.io(d / "src.qcow2", "write 10M 4k", "write 20M 1M")
    _qemu_image(qemu, d / "small.qcow2", "32M")
    qemu.img("bitmap", "--add", d / "small.qcow2", "s")
    _qemu_image(qemu, d / "v2.qcow2", "1M", "compat=0.10")
    qemu.img("create", "-q", "-f", "raw", d / "r.img", "1M")


CLI_STEPS: list[list[str]] = [
    ["--add", "img.qcow2", "b0"],
    ["--add", "-g", "512", "img.qcow2", "fine"],
    ["--add", "img.qcow2", "b0"],
    ["--add", "-g", "256", "img.qcow2", "x"],
    ["--add", "-g", "3000", "img.qcow2", "x"],
    ["--add", "-g", "4G", "img.qcow2", "x"],
    ["--add", "-g", "4294967808", "img.qcow2", "t512"],
    ["--add", "-g", "abc", "img.qcow2", "x"],
    ["--add", "-g", "-1", "img.qcow2", "x"],
    ["--add", "-g", "0", "img.qcow2", "g0"],
    ["--add", "--granularity=2G", "img.qcow2", "g2G"],
    ["--add", "--disable", "img.qcow2", "off"],
    ["--add", "img.qcow2", ""],
    ["--add", "img.qcow2", "n" * 1024],
    ["--add", "img.qcow2", "n" * 1023],
    ["--remove", "img.qcow2", "nope"],
    ["--clear", "img.qcow2", "nope"],
    ["--enable", "img.qcow2", "nope"],
    ["--disable", "img.qcow2", "nope"],
    ["--merge", "nope", "img.qcow2", "b0"],
    ["--merge", "b0", "img.qcow2", "nope"],
    ["--merge", "s", "-b", "src.qcow2", "img.qcow2", "fine"],
    ["--merge", "s", "-b", "small.qcow2", "img.qcow2", "fine"],
    ["--merge", "s", "-b", "src.qcow2", "-F", "raw", "img.qcow2", "fine"],
    ["--merge", "s", "--source-file", "nofile", "img.qcow2", "fine"],
    ["--merge=fine", "img.qcow2", "b0"],
    ["--enable", "img.qcow2", "off", "--disable", "--disable"],
    ["--add", "--remove", "--add", "img.qcow2", "y"],
    ["--clear", "img.qcow2", "y"],
    ["--add", "--clear", "img.qcow2", "b0"],
    ["img.qcow2", "b0"],
    ["--add", "img.qcow2"],
    ["--add", "img.qcow2", "a", "b"],
    ["-g", "1k", "--clear", "img.qcow2", "b0"],
    ["-b", "src.qcow2", "--clear", "img.qcow2", "b0"],
    ["-F", "qcow2", "--merge", "s", "img.qcow2", "b0"],
    ["--add", "nofile.qcow2", "b"],
    ["--add", "-f", "bogus", "img.qcow2", "b"],
    ["--bogus", "img.qcow2", "b"],
    ["-x", "img.qcow2", "b"],
    ["--merge"],
    ["--add", "v2.qcow2", "b"],
    ["--add", "-f", "raw", "r.img", "b"],
    ["--remove", "-f", "raw", "r.img", "b"],
    ["--remove", "img.qcow2", "n" * 1023],
    ["--remove", "img.qcow2", "g2G"],
]


def _norm(text: str, d: Path) -> str:
    import re

    text = text.replace("qemu-img:", "PROG:").replace("qcow2aio:", "PROG:")
    text = text.replace("'qemu-img --help'", "'PROG --help'").replace(
        "'qcow2aio --help'", "'PROG --help'"
    )
    text = re.sub(r"#block\d+", "NODE", text)
    for name in ("img.qcow2", "v2.qcow2", "r.img"):
        text = text.replace(f"in '{name}'", "in 'NODE'").replace(f"to {name}:", "to NODE:")
    return text


def test_cli_matches_qemu_img_bitmap(
    qemu: Qemu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qcow2aio.cli import main

    theirs, mine = tmp_path / "theirs", tmp_path / "mine"
    _setup_cli_dir(qemu, theirs)
    _setup_cli_dir(qemu, mine)
    monkeypatch.chdir(mine)
    for step in CLI_STEPS:
        proc = subprocess.run(
            [qemu.qemu_img, "bitmap", *step], cwd=theirs, capture_output=True, text=True
        )
        rc = main(["bitmap", *step])
        out, err = capsys.readouterr()
        assert (rc, out) == (proc.returncode, proc.stdout), step
        assert _norm(err, mine) == _norm(proc.stderr, theirs), step
        assert qemu_bitmaps(qemu, mine / "img.qcow2") == qemu_bitmaps(qemu, theirs / "img.qcow2"), (
            step
        )
    for b in qemu_bitmaps(qemu, theirs / "img.qcow2"):
        name = str(b["name"])
        assert qemu_view(mine / "img.qcow2", name) == qemu_view(theirs / "img.qcow2", name), name
    rc, report = qemu.check(mine / "img.qcow2")
    assert rc == 0 and not report.get("leaks") and not report.get("corruptions")


def test_tool_on_open_image(qemu: Qemu, tmp_path: Path) -> None:
    """The job on an image a caller has open: its bitmaps change in place."""
    from qcow2aio.tools.bitmap import BitmapActionError, bitmap_sync

    p = _qemu_image(qemu, tmp_path / "a.qcow2")
    with qcow2aio.open(p, "r+") as img:
        bitmap_sync(img, "b", ["add", "disable"], granularity=4096)
        img.write_sync(0, b"x" * 4096)
        bitmap_sync(img, "b", ["enable"])
        img.write_sync(MiB, b"x" * 4096)
        assert img.dirty_extents("b") == [(MiB, 4096)]
        with pytest.raises(BitmapActionError, match="Operation add on bitmap b failed"):
            bitmap_sync(img, "b", ["add"])
    assert qemu_view(p, "b") == [(MiB, 4096)]


# ----------------------------------------------------------- interactions
def _twins(qemu: Qemu, tmp_path: Path, size: str = "64M") -> tuple[Path, Path]:
    theirs = _qemu_image(qemu, tmp_path / "theirs.qcow2", size)
    qemu.img("bitmap", "--add", theirs, "b")
    qemu.img("bitmap", "--add", "-g", "512", "--disable", theirs, "d")
    qemu.io(theirs, "write 0 64k", "write 63M 1M")
    qemu.img("bitmap", "--enable", theirs, "d")
    qemu.io(theirs, "write 40M 4k")
    mine = tmp_path / "mine.qcow2"
    shutil.copyfile(theirs, mine)
    return theirs, mine


def _same_bitmaps(qemu: Qemu, theirs: Path, mine: Path) -> None:
    assert qemu_bitmaps(qemu, mine) == qemu_bitmaps(qemu, theirs)
    for b in qemu_bitmaps(qemu, theirs):
        name = str(b["name"])
        assert qemu_view(mine, name) == qemu_view(theirs, name), name
    rc, report = qemu.check(mine)
    assert rc == 0 and not report.get("leaks") and not report.get("corruptions")


def test_resize_resizes_bitmaps(qemu: Qemu, tmp_path: Path) -> None:
    """qemu-img resize (grow and shrink) keeps the bitmaps: new bits clean, cut bits gone."""
    theirs, mine = _twins(qemu, tmp_path)
    qemu.img("resize", "--shrink", theirs, "48M")
    qemu.io(theirs, "write 47M 64k")
    qemu.img("resize", theirs, "128M")
    qemu.io(theirs, "write 100M 4k")
    with qcow2aio.open(mine, "r+") as img:
        img.resize_sync(48 * MiB, shrink=True)
        img.write_sync(47 * MiB, b"x" * 65536)
        img.resize_sync(128 * MiB)
        img.write_sync(100 * MiB, b"x" * 4096)
    _same_bitmaps(qemu, theirs, mine)


def test_resize_refused_with_inconsistent_bitmap(qemu: Qemu, tmp_path: Path) -> None:
    from qcow2aio.cli import main

    p = _qemu_image(qemu, tmp_path / "a.qcow2")
    qemu.img("bitmap", "--add", p, "b0")
    _crash_qemu(qemu, p, "write 0 64k")
    q = tmp_path / "q.qcow2"
    shutil.copyfile(p, q)
    proc = qemu.img("resize", q, "128M", check=False)
    assert proc.returncode == 1
    assert main(["resize", str(p), "128M"]) == 1
    with qcow2aio.open(p, "r+") as img, pytest.raises(BitmapInconsistentError):
        img.resize_sync(128 * MiB)
    assert digest(p) != "" and qcow2aio.open(p).size == 64 * MiB
    assert "Bitmap 'b0' is inconsistent and cannot be used\n" in proc.stderr


def test_snapshots_with_bitmaps(
    qemu: Qemu, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Create and delete work; apply is refused while there is any bitmap (QEMU's
    ``Device has active dirty bitmaps``), disabled ones included."""
    from qcow2aio.cli import main

    theirs, mine = _twins(qemu, tmp_path)
    qemu.img("bitmap", "--disable", theirs, "b")
    qemu.img("bitmap", "--disable", theirs, "d")
    qemu.img("snapshot", "-c", "s1", theirs)
    qemu.io(theirs, "write 5M 4k")
    proc = qemu.img("snapshot", "-a", "s1", theirs, check=False)
    with qcow2aio.open(mine, "r+") as img:
        img.disable_bitmap_sync("b")
        img.disable_bitmap_sync("d")
        img.create_snapshot_sync("s1")
        img.write_sync(5 * MiB, b"x" * 4096)
    capsys.readouterr()
    assert main(["snapshot", "-a", "s1", str(mine)]) == proc.returncode == 1
    assert (
        capsys.readouterr().err.replace("qcow2aio", "qemu-img").replace(str(mine), str(theirs))
        == proc.stderr
    )
    assert "Device has active dirty bitmaps" in proc.stderr
    qemu.img("snapshot", "-d", "s1", theirs)
    assert main(["snapshot", "-d", "s1", str(mine)]) == 0
    _same_bitmaps(qemu, theirs, mine)


def test_commit_into_base_with_bitmaps(qemu: Qemu, tmp_path: Path) -> None:
    """The base's enabled bitmaps record what a commit writes into it, as QEMU's."""
    runs = {}
    for who in ("theirs", "mine"):
        d = tmp_path / who
        d.mkdir()
        base = _qemu_image(qemu, d / "base.qcow2")
        qemu.img("bitmap", "--add", base, "bb")
        qemu.img("bitmap", "--add", "-g", "1M", "--disable", base, "off")
        top = d / "top.qcow2"
        qemu.img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
        qemu.io(top, "write 0 64k", "write 2M 4k", "write -z 8M 1M", "write 30M 300k")
        # The top's own bitmap: emptying it after the copy marks nothing (QEMU's
        # bdrv_make_empty bypasses dirty tracking).
        qemu.img("bitmap", "--add", top, "tb")
        if who == "theirs":
            qemu.img("commit", top)
        else:
            qcow2aio.commit_sync(str(top))
        runs[who] = {n: qemu_view(base, n) for n in ("bb",)}
        assert qemu_view(top, "tb") == []
        assert qemu_bitmaps(qemu, base)[1] == {"flags": [], "name": "off", "granularity": MiB}
        assert qemu.check(base)[0] == 0
    assert runs["mine"] == runs["theirs"]


def test_amend_downgrade_with_bitmaps(qemu: Qemu, tmp_path: Path) -> None:
    """compat=0.10 is allowed (QEMU too): the bitmaps are left behind as leaks."""
    theirs, mine = _twins(qemu, tmp_path)
    qemu.img("amend", "-o", "compat=0.10", theirs)
    with qcow2aio.open(mine, "r+") as img:
        img.amend_sync(compat="0.10")
    rt, t = qemu.check(theirs)
    rm, m = qemu.check(mine)
    assert (rm, m.get("leaks"), m.get("corruptions", 0)) == (rt, t.get("leaks"), 0)
    assert qemu.info(mine)["format-specific"]["data"]["compat"] == "0.10"


def test_measure_counts_bitmaps(qemu: Qemu, tmp_path: Path) -> None:
    """``bitmaps`` of qemu-img measure, from the same directory codec."""
    from qcow2aio.tools.measure import measure

    p = _qemu_image(qemu, tmp_path / "a.qcow2", "3G")
    qemu.img("bitmap", "--add", "-g", "512", p, "fine")
    qemu.img("bitmap", "--add", "--disable", p, "x" * 300)
    for cs in (4096, 65536, 2 * MiB):
        out = qemu.img("measure", "--output=json", "-O", "qcow2", "-o", f"cluster_size={cs}", p)
        theirs = json.loads(out.stdout)
        ours = measure(source=str(p), target_format="qcow2", options={"cluster_size": cs})
        assert ours["bitmaps"] == theirs["bitmaps"], cs


def test_check_repair_keeps_in_use_bitmaps(
    qemu: Qemu, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``check -r all`` reports nothing for IN_USE bitmaps and keeps them (QEMU)."""
    from qcow2aio.cli import main

    theirs = _qemu_image(qemu, tmp_path / "theirs.qcow2")
    qemu.img("bitmap", "--add", theirs, "b0")
    _crash_qemu(qemu, theirs, "write 0 64k", "write 1M 4k")
    mine = tmp_path / "mine.qcow2"
    shutil.copyfile(theirs, mine)
    proc = qemu.img("check", "-r", "all", "--output=json", theirs, check=False)
    capsys.readouterr()
    rc = main(["check", "-r", "all", "--output=json", str(mine)])
    out = capsys.readouterr().out
    assert rc == proc.returncode
    assert json.loads(out.replace(str(mine), str(theirs))) == json.loads(proc.stdout)
    assert qemu_bitmaps(qemu, mine) == qemu_bitmaps(qemu, theirs)
    assert qemu_bitmaps(qemu, mine)[0]["flags"] == ["in-use", "auto"]


@pytest.mark.parametrize(
    "opts", ["lazy_refcounts=on", "extended_l2=on", "cluster_size=512", "refcount_bits=1"]
)
def test_maintained_on_image_variants(qemu: Qemu, tmp_path: Path, opts: str) -> None:
    """Lazy refcounts (the store runs before the refcounts are made exact), extended L2,
    512-byte clusters (a directory and tables over many clusters), 1-bit refcounts."""
    size = 8 * MiB
    p = _qemu_image(qemu, tmp_path / "a.qcow2", "8M", opts)
    qemu.img("bitmap", "--add", "-g", "512", p, "b")
    for i in range(3):
        qemu.img("bitmap", "--add", "--disable", p, f"pad{i}-" + "x" * 200)
    with qcow2aio.open(p, "r+") as img:
        done = _random_io(img, random.Random(opts), size)
        with pytest.raises(Qcow2Error):
            img.dirty_extents("b", -1, 5)
    rc, report = qemu.check(p)
    assert rc == 0 and not report.get("leaks") and not report.get("corruptions")
    assert qemu_view(p, "b") == naive_extents(done, 512, size)


def test_inconsistent_and_consistent_bitmaps_together(qemu: Qemu, tmp_path: Path) -> None:
    """An IN_USE bitmap next to consistent ones: those are maintained and stored, it
    is written back unchanged (QEMU does the same on the twin image)."""
    theirs = _qemu_image(qemu, tmp_path / "theirs.qcow2")
    qemu.img("bitmap", "--add", theirs, "old")
    _crash_qemu(qemu, theirs, "write 0 64k")
    qemu.img("bitmap", "--add", "-g", "4k", theirs, "fresh")
    mine = tmp_path / "mine.qcow2"
    shutil.copyfile(theirs, mine)
    qemu.io(theirs, "write 3M 8k", "write -z 9M 1M")
    with qcow2aio.open(mine, "r+") as img:
        img.write_sync(3 * MiB, b"\0" * 8192)
        asyncio.run(img.write_zeroes(9 * MiB, MiB))
    _same_bitmaps_fresh(qemu, theirs, mine)


def _same_bitmaps_fresh(qemu: Qemu, theirs: Path, mine: Path) -> None:
    assert qemu_bitmaps(qemu, mine) == qemu_bitmaps(qemu, theirs)
    assert qemu_bitmaps(qemu, mine)[0]["flags"] == ["in-use", "auto"]
    assert (
        qemu_view(mine, "fresh") == qemu_view(theirs, "fresh") == [(3 * MiB, 8192), (9 * MiB, MiB)]
    )
    assert qemu.check(mine)[0] == 0


def test_hostile_directory_and_tables(qemu: Qemu, tmp_path: Path) -> None:
    """Random damage to the directory, a table or the extension: every open, listing,
    read of the bits and read-write open either works or raises a Qcow2Error, and a
    read-only open never writes."""
    p = _qemu_image(qemu, tmp_path / "a.qcow2", "300M")
    qemu.img("bitmap", "--add", "-g", "512", p, "b0")
    qemu.img("bitmap", "--add", "--disable", p, "b1")
    qemu.io(p, "write 0 1M", "write 260M 64k")
    with qcow2aio.open(p) as img:
        entries = B.read_directory(img.meta)
        loc = B.directory_location(img.meta)
        hdr_len = img.meta.header.header_length
    assert loc is not None
    pristine = p.read_bytes()
    regions = [(loc[2], loc[1]), (entries[0].table_offset, entries[0].table_size * 8)]
    regions.append((hdr_len, 64))  # the extensions area (bitmaps ext among them)
    rng = random.Random(1515)
    work = tmp_path / "w.qcow2"
    for _ in range(60):
        data = bytearray(pristine)
        off, n = rng.choice(regions)
        for _ in range(rng.randrange(1, 4)):
            data[off + rng.randrange(n)] = rng.randrange(256)
        work.write_bytes(bytes(data))
        before = digest(work)
        try:
            with qcow2aio.open(work) as img:
                for b in img.bitmaps():
                    img.dirty_extents(str(b["name"]), 0, 1 << 30)
        except Qcow2Error:
            pass
        assert digest(work) == before
        try:
            with qcow2aio.open(work, "r+") as img:
                img.write_sync(4096, b"x" * 512)
        except Qcow2Error:
            pass


def test_extents_across_scan_windows() -> None:
    """Runs that cross the 64 KiB-byte windows extents() scans by, full windows, and
    requests starting and ending inside bytes."""
    gran = 512
    size = 1 << 30  # 2 Mi bits: four windows
    w = B._WINDOW * 8 * gran  # guest bytes one window covers
    ranges = [
        (w - 3 * gran, 7 * gran),  # across the first boundary
        (2 * w - 4096, w + 8192),  # a full window plus both neighbours' edges
        (size - 700, 700),  # the last chunk
        (5 * gran + 1, 1),
    ]
    bm = DirtyBitmap("t", 9, size)
    for s, n in ranges:
        bm.mark(s, n)

    def oracle(off: int, n: int) -> list[tuple[int, int]]:
        """Interval arithmetic (no per-chunk set: the ranges span 2^19 chunks)."""
        spans = sorted((s // gran * gran, min(size, -(-(s + n) // gran) * gran)) for s, n in ranges)
        merged: list[list[int]] = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        clipped = [(max(lo, off), min(hi, off + n)) for lo, hi in merged]
        return [(lo, hi - lo) for lo, hi in clipped if hi > lo]

    assert bm.extents() == oracle(0, size)
    for off, n in [(w - gran - 5, 3 * gran), (2 * w + 100, w), (0, size), (w, 1)]:
        assert bm.extents(off, n) == oracle(off, n), (off, n)


def test_check_survives_a_table_offset_past_any_file(qemu: Qemu, tmp_path: Path) -> None:
    """A table offset of 2^63 and more: check fails with EIO (QEMU's read error)
    instead of an OverflowError from the read; a read-only open reports it by name."""
    from qcow2aio.check import check_image
    from qcow2aio.io import FileBackend
    from qcow2aio.metadata import Metadata

    p = _qemu_image(qemu, tmp_path / "a.qcow2")
    qemu.img("bitmap", "--add", p, "b0")
    with qcow2aio.open(p) as img:
        loc = B.directory_location(img.meta)
    assert loc is not None
    with open(p, "r+b") as f:
        f.seek(loc[2])
        f.write((0x8000000000010000).to_bytes(8, "big"))
    fb = FileBackend(str(p), writable=False)
    try:
        res = check_image(Metadata(fb, writable=False))
    finally:
        fb.close()
    assert res.error is not None
    with qcow2aio.open(p) as img, pytest.raises(Qcow2Error, match="table_offset"):
        img.dirty_extents("b0")


def test_discard_ignore_marks_nothing(qemu: Qemu, tmp_path: Path) -> None:
    """discard=ignore: a discard is a no-op and marks nothing; write-zeroes marks
    (observed with qemu-io -d ignore on a twin)."""
    theirs = _qemu_image(qemu, tmp_path / "theirs.qcow2")
    qemu.io(theirs, "write 0 1M")
    qemu.img("bitmap", "--add", theirs, "b")
    mine = tmp_path / "mine.qcow2"
    shutil.copyfile(theirs, mine)
    qemu.io(theirs, "discard 0 64k", "write -z 1M 64k", extra_args=["-d", "ignore"])

    async def go() -> None:
        async with qcow2aio.open(mine, "r+", discard="ignore") as img:
            await img.discard(0, 65536)
            await img.write_zeroes(MiB, 65536)

    asyncio.run(go())
    assert qemu_view(mine, "b") == qemu_view(theirs, "b") == [(MiB, 65536)]


def test_set_mark_equals_bitmap_mark() -> None:
    """The inlined per-write hook (BitmapSet.mark) sets exactly DirtyBitmap.mark's bits."""
    import threading

    rng = random.Random(99)
    for _ in range(50):
        size = rng.randrange(1, 4000) * 512
        grans = [rng.choice([9, 10, 12, 16]) for _ in range(3)]
        ours = [DirtyBitmap(f"b{i}", g, size) for i, g in enumerate(grans)]
        ref = [DirtyBitmap(f"r{i}", g, size) for i, g in enumerate(grans)]
        bset = B.BitmapSet.__new__(B.BitmapSet)
        bset._mutex = threading.Lock()
        bset.active = tuple(ours)
        for _ in range(30):
            s = rng.randrange(0, size + 4096)
            n = rng.randrange(0, 200000)
            bset.mark(s, n)
            for r in ref:
                r.mark(s, n)
        assert [bytes(b.bits) for b in ours] == [bytes(r.bits) for r in ref]
