"""Image.resize / resize_sync and ``qcow2aio resize`` against ``qemu-img resize``.

Each layout case builds the same image twice with QEMU (``qemu-img create`` and
``qemu-io`` writes), resizes one with ``qemu-img resize`` and the other with
qcow2aio, and compares the whole files byte for byte (QEMU's placement is
deterministic); ``qemu-img check`` must find ours clean with no leaks, and the
guest content must equal a bytearray oracle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Qemu

import qcow2aio
from qcow2aio import Qcow2Error

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# (create options, initial size, writes (offset, length), new size, preallocation, shrink)
LAYOUT_CASES = [
    ("cluster_size=65536", 1 * MiB, [], 10 * GiB, "off", False),
    ("cluster_size=65536", 1 * MiB, [(0, 64 * KiB)], 5 * GiB, "metadata", False),
    # falloc past a refcount block's reach (512 MiB at 64-bit refcounts), in 1.5 GB of
    # disk for both files rather than the 6 GB that 3 GiB at the default width took.
    ("cluster_size=65536,refcount_bits=64", 1 * MiB, [(0, 64 * KiB)], 768 * MiB, "falloc", False),
    ("cluster_size=65536", 1 * MiB, [(0, 64 * KiB)], 3 * MiB, "full", False),
    ("cluster_size=65536", 1 * MiB + 512, [(0, 1 * KiB)], 3 * MiB + 512, "metadata", False),
    ("cluster_size=65536", 1 * MiB + 512, [(0, 1 * KiB)], 3 * MiB + 512, "falloc", False),
    ("cluster_size=4096", 1 * MiB, [(0, 64 * KiB)], 1 * GiB, "metadata", False),
    ("cluster_size=512,refcount_bits=1", 1 * MiB, [(0, 64 * KiB)], 256 * MiB, "metadata", False),
    ("cluster_size=512", 1 * MiB, [(0, 64 * KiB)], 64 * MiB, "falloc", False),
    ("cluster_size=512,refcount_bits=64", 1 * MiB, [(4096, 8192)], 32 * MiB, "full", False),
    ("cluster_size=2M", 1 * MiB, [(0, 4096)], 3 * GiB, "metadata", False),
    ("extended_l2=on", 1 * MiB, [(0, 64 * KiB)], 100 * MiB, "metadata", False),
    ("extended_l2=on", 1 * MiB, [(0, 64 * KiB)], 100 * MiB, "falloc", False),
    ("extended_l2=on", 1 * MiB + 512, [(0, 1 * KiB)], 5 * MiB + 2560, "metadata", False),
    ("extended_l2=on", 1 * MiB + 512, [(0, 1 * KiB)], 5 * MiB + 2560, "full", False),
    ("compat=0.10", 1 * MiB, [(0, 64 * KiB)], 100 * MiB, "metadata", False),
    ("lazy_refcounts=on", 1 * MiB, [(0, 64 * KiB)], 8 * GiB, "off", False),
    # Shrinks: clusters past the end freed, empty refcount blocks dropped, file cut.
    ("cluster_size=65536", 10 * GiB, [(0, 64 * KiB), (5 * GiB, 1 * MiB)], 1 * MiB, "off", True),
    ("cluster_size=512", 64 * MiB, [(0, 1 * MiB), (40 * MiB, 2 * MiB)], 1 * MiB, "off", True),
    ("cluster_size=4096", 64 * MiB, [(0, 1 * MiB), (40 * MiB, 2 * MiB)], 41 * MiB, "off", True),
    ("cluster_size=65536", 8 * MiB, [(0, 8 * MiB)], 4 * MiB + 512, "off", True),
    ("extended_l2=on", 8 * MiB, [(0, 8 * MiB)], 3 * MiB, "off", True),
]


def _ids() -> list[str]:
    return [
        f"{o.replace(',', '+')}-{s0}-{n}-{p}{'-shrink' if sh else ''}"
        for o, s0, _, n, p, sh in LAYOUT_CASES
    ]


def _assert_same_file(a: Path, b: Path) -> None:
    """Byte-for-byte equal, compared in chunks (the files reach several GiB), data
    areas only where both files agree on the holes (SEEK_DATA)."""
    size = a.stat().st_size
    assert size == b.stat().st_size, f"length {b.stat().st_size:#x}, QEMU wrote {size:#x}"
    chunk = 16 * MiB
    with a.open("rb") as fa, b.open("rb") as fb:
        pos = 0
        while pos < size:
            try:
                da = os.lseek(fa.fileno(), pos, os.SEEK_DATA)
                db = os.lseek(fb.fileno(), pos, os.SEEK_DATA)
            except OSError:  # no data after pos in one of them
                da = db = size
            start = min(da, db)
            if start >= size:
                # The rest is a hole in one file: the other must read as zeros there.
                break
            start &= ~(chunk - 1)
            n = min(chunk, size - start)
            x = os.pread(fa.fileno(), n, start)
            y = os.pread(fb.fileno(), n, start)
            if x != y:
                i = next(k for k in range(n) if x[k] != y[k])
                raise AssertionError(f"{b.name} differs from QEMU's at {start + i:#x}")
            pos = start + n
        for f in (fa, fb):
            # Whatever is left after the last data both files hold must be zeros.
            try:
                rest = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                continue
            while rest < size:
                n = min(chunk, size - rest)
                assert not any(os.pread(f.fileno(), n, rest)), f"{f.name}: data at {rest:#x}"
                rest += n


def _build(qemu: Qemu, path: Path, opts: str, size: int, writes: list[tuple[int, int]]) -> None:
    qemu.img("create", "-q", "-f", "qcow2", "-o", opts, path, str(size))
    for i, (off, n) in enumerate(writes):
        qemu.io(path, f"write -P {0x41 + i} {off} {n}")


def _check_sparse_content(img: qcow2aio.Image, writes: list[tuple[int, int]], new: int) -> None:
    """The written ranges read back (cut at the new size) and probes elsewhere read as
    zeros: a sparse oracle, as the images reach many GiB."""
    assert img.size == new
    oracle: dict[int, int] = {}
    for i, (off, n) in enumerate(writes):
        for c in range(off, off + n, 512):
            oracle[c] = 0x41 + i
    for off, n in writes:
        n = min(n, new - off)
        if n > 0:
            want = b"".join(bytes([oracle[c]]) * 512 for c in range(off, off + n, 512))
            assert img.read_sync(off, n) == want[:n]
    rng = random.Random(new)
    for _ in range(64):
        probe = rng.randrange(0, new // 512) * 512
        if probe not in oracle:
            assert img.read_sync(probe, 512) == bytes(512), probe


def _same_content(img: qcow2aio.Image, oracle: bytearray) -> None:
    assert img.size == len(oracle)
    step = 16 * MiB
    for off in range(0, img.size, step):
        n = min(step, img.size - off)
        assert img.read_sync(off, n) == bytes(oracle[off : off + n]), f"differs in {off}+{n}"


@pytest.mark.parametrize(
    ("opts", "size0", "writes", "new", "prealloc", "shrink"), LAYOUT_CASES, ids=_ids()
)
def test_resize_same_bytes_as_qemu(
    qemu: Qemu,
    tmp_path: Path,
    opts: str,
    size0: int,
    writes: list[tuple[int, int]],
    new: int,
    prealloc: str,
    shrink: bool,
) -> None:
    q = tmp_path / "q.qcow2"
    p = tmp_path / "p.qcow2"
    _build(qemu, q, opts, size0, writes)
    _build(qemu, p, opts, size0, writes)
    flags = ["--shrink"] if shrink else []
    qemu.img("resize", "-q", f"--preallocation={prealloc}", *flags, q, str(new))
    with qcow2aio.open(p, "r+") as img:
        img.resize_sync(new, shrink=shrink, preallocation=prealloc)
        assert img.size == new
    _assert_same_file(q, p)
    rc, report = qemu.check(p)
    assert rc == 0 and not report.get("leaks") and not report.get("corruptions"), report
    assert qemu.info(p)["virtual-size"] == new
    with qcow2aio.open(p) as img:
        _check_sparse_content(img, writes, new)


@pytest.mark.parametrize("prealloc", ["off", "metadata", "falloc", "full"])
def test_async_resize_grow_then_shrink_then_grow(qemu: Qemu, tmp_path: Path, prealloc: str) -> None:
    """Grow, shrink and grow again through the coroutine: what was cut reads as zeros
    afterwards (as iotest 292), QEMU finds the image clean, the oracle agrees."""
    path = tmp_path / "a.qcow2"
    qcow2aio.create(path, 4 * MiB)
    oracle = bytearray(4 * MiB)
    rng = random.Random(7)

    async def run() -> None:
        img = qcow2aio.open(path, "r+")
        try:
            data = rng.randbytes(3 * MiB)
            await img.write(512 * KiB, data)
            oracle[512 * KiB : 512 * KiB + len(data)] = data
            await img.resize(64 * MiB, preallocation=prealloc)
            oracle.extend(bytes(60 * MiB))
            more = rng.randbytes(1 * MiB)
            await img.write(40 * MiB, more)
            oracle[40 * MiB : 41 * MiB] = more
            await img.resize(1 * MiB, shrink=True)
            del oracle[1 * MiB :]
            await img.resize(48 * MiB)
            oracle.extend(bytes(47 * MiB))
            assert await img.read(0, img.size) == bytes(oracle)
        finally:
            await img.aclose()

    asyncio.run(run())
    rc, report = qemu.check(path)
    assert rc == 0 and not report.get("leaks"), report
    assert qemu.convert_raw(path) == bytes(oracle)


def test_resize_with_concurrent_writes_in_flight(qemu: Qemu, tmp_path: Path) -> None:
    """Writes started before and after a resize all complete and none is lost: the
    resize drains the ones in flight and new ones wait for its metadata lock."""
    path = tmp_path / "a.qcow2"
    qcow2aio.create(path, 8 * MiB, cluster_size=4096)
    oracle = bytearray(8 * MiB)
    rng = random.Random(3)

    async def run() -> None:
        img = qcow2aio.open(path, "r+")
        try:
            tasks = []
            for _ in range(200):
                off = rng.randrange(0, 8 * MiB - 8192)
                data = rng.randbytes(rng.choice([512, 4096, 8192, 5000]))
                oracle[off : off + len(data)] = data
                tasks.append(asyncio.ensure_future(img.write(off, data)))
            tasks.append(asyncio.ensure_future(img.resize(256 * MiB, preallocation="metadata")))
            later = []
            for _ in range(100):
                off = rng.randrange(0, 8 * MiB - 8192)
                data = rng.randbytes(4096)
                later.append((off, data))
            # Same-range writes must keep their order: issue the later ones after the
            # earlier batch settled, but while the resize may still be queued.
            await asyncio.gather(*tasks)
            more = [asyncio.ensure_future(img.write(o, d)) for o, d in later]
            more.append(asyncio.ensure_future(img.resize(512 * MiB)))
            big = rng.randbytes(64 * KiB)
            await asyncio.gather(*more)
            for o, d in later:
                oracle[o : o + len(d)] = d
            await img.write(300 * MiB, big)
            oracle.extend(bytes(512 * MiB - len(oracle)))
            oracle[300 * MiB : 300 * MiB + len(big)] = big
        finally:
            await img.aclose()

    asyncio.run(run())
    rc, report = qemu.check(path)
    assert rc == 0 and not report.get("leaks") and not report.get("corruptions"), report
    with qcow2aio.open(path) as img:
        assert img.size == 512 * MiB
        _same_content(img, oracle)


def test_resize_interleaved_with_unawaited_writes(qemu: Qemu, tmp_path: Path) -> None:
    """A resize issued while writes on disjoint ranges are suspended mid-flight: it
    waits for them (drain), they complete, and the new size holds all of them."""
    path = tmp_path / "a.qcow2"
    qcow2aio.create(path, 16 * MiB)
    rng = random.Random(11)
    chunks = [(i * MiB, rng.randbytes(MiB)) for i in range(16)]

    async def run() -> None:
        img = qcow2aio.open(path, "r+")
        try:
            writes = [asyncio.ensure_future(img.write(o, d)) for o, d in chunks]
            await asyncio.sleep(0)  # let them start and suspend
            await img.resize(32 * MiB, preallocation="falloc")
            assert all(t.done() for t in writes)
            await asyncio.gather(*writes)
            for o, d in chunks:
                assert await img.read(o, len(d)) == d
            assert await img.read(16 * MiB, 16 * MiB) == bytes(16 * MiB)
        finally:
            await img.aclose()

    asyncio.run(run())
    rc, report = qemu.check(path)
    assert rc == 0 and not report.get("leaks"), report


def test_grow_over_longer_backing_reads_zeros(qemu: Qemu, tmp_path: Path) -> None:
    """Growing an overlay whose backing file is longer must not expose the backing
    data in the new range (QEMU writes zero clusters there)."""
    base = tmp_path / "base.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", base, "8M")
    qemu.io(base, "write -P 0x77 0 8M")
    for name in ("q.qcow2", "p.qcow2"):
        qemu.img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", tmp_path / name, "2M")
    qemu.img("resize", "-q", tmp_path / "q.qcow2", "6M")
    with qcow2aio.open(tmp_path / "p.qcow2", "r+") as img:
        img.resize_sync(6 * MiB)
        assert img.read_sync(0, 2 * MiB) == b"\x77" * (2 * MiB)
        assert img.read_sync(2 * MiB, 4 * MiB) == bytes(4 * MiB)
    assert (tmp_path / "q.qcow2").read_bytes() == (tmp_path / "p.qcow2").read_bytes()
    assert qemu.convert_raw(tmp_path / "p.qcow2") == b"\x77" * (2 * MiB) + bytes(4 * MiB)


@pytest.mark.parametrize("prealloc", ["full", "falloc"])
def test_preallocated_grow_over_free_bytes_at_the_file_end_reads_zeros(
    qemu: Qemu, tmp_path: Path, prealloc: str
) -> None:
    """falloc/full place the new data area after the last used cluster; bytes the
    file still holds there (clusters freed after a shrink cut the file because readers
    held them, as resize_mid_io seeds 4197 and 4243 found; junk a crash left) must
    read as zeros, as preallocated clusters do. QEMU 7.2 frees at once, so it never
    meets freed bytes there; over junk it shows the junk (its own quirk, not copied)."""
    path = tmp_path / "s.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", path, "1M")
    qemu.io(path, "write -P 7 0 1M")
    with open(path, "ab") as f:
        f.write(b"\x07" * (256 * 1024))  # free, unreferenced bytes past the last cluster
    with qcow2aio.open(path, "r+") as img:
        img.resize_sync(2 * MiB, preallocation=prealloc)
        assert img.read_sync(0, MiB) == b"\x07" * MiB
        assert img.read_sync(MiB, MiB) == bytes(MiB)
    qemu.io(path, "read -P 7 0 1M", "read -P 0 1M 1M")
    assert qemu.check(path)[0] == 0


def test_snapshots_v3_may_shrink_v2_may_not_resize(qemu: Qemu, tmp_path: Path) -> None:
    """QEMU 7.2 resizes (and shrinks) a v3 image with internal snapshots, and refuses
    any resize of a v2 image that has snapshots."""
    v3 = tmp_path / "v3.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", v3, "8M")
    qemu.io(v3, "write -P 0x11 0 8M")
    qemu.img("snapshot", "-c", "s1", v3)
    with qcow2aio.open(v3, "r+") as img:
        img.resize_sync(2 * MiB, shrink=True)
        img.resize_sync(4 * MiB)
    rc, report = qemu.check(v3)
    assert rc == 0 and not report.get("leaks"), report
    qemu.img("snapshot", "-a", "s1", v3)
    assert qemu.convert_raw(v3)[: 2 * MiB] == b"\x11" * (2 * MiB)

    v2 = tmp_path / "v2.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "8M")
    qemu.img("snapshot", "-c", "s1", v2)
    with (
        qcow2aio.open(v2, "r+") as img,
        pytest.raises(Qcow2Error, match="Can't resize a v2 image which has snapshots"),
    ):
        img.resize_sync(16 * MiB)


@pytest.mark.parametrize(
    ("size", "kwargs", "message"),
    [
        (0, {}, "New image size must be positive"),
        (-512, {}, "New image size must be positive"),
        (MiB, {}, "Use the --shrink option to perform a shrink operation."),
        (MiB, {"shrink": True, "preallocation": "full"}, "Preallocation can only be used"),
        (MiB, {"preallocation": "falloc"}, "Preallocation can only be used"),
        (4 * MiB, {"preallocation": "metadata"}, "Preallocation can only be used"),
        (8 * MiB + 1, {}, "The new size must be a multiple of 512"),
        (8 * MiB, {"preallocation": "bogus"}, "Invalid preallocation mode 'bogus'"),
        ((1 << 63) - 1, {}, r"offset\(9223372036854775807\) exceeds maximum"),
    ],
)
def test_resize_errors_change_nothing(
    tmp_path: Path, size: int, kwargs: dict[str, object], message: str
) -> None:
    path = tmp_path / "a.qcow2"
    qcow2aio.create(path, 4 * MiB)
    before = path.read_bytes()
    with qcow2aio.open(path, "r+") as img:
        with pytest.raises(Qcow2Error, match=message):
            img.resize_sync(size, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(Qcow2Error, match=message):
            asyncio.run(img.resize(size, **kwargs))  # type: ignore[arg-type]
    assert path.read_bytes() == before


def test_resize_needs_writable_image(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    qcow2aio.create(path, 4 * MiB)
    with qcow2aio.open(path) as img, pytest.raises(Qcow2Error, match="read-only"):
        img.resize_sync(8 * MiB)


# ---------------------------------------------------------------------- CLI
CLI_CASES = [
    ["x 512K"],
    ["x -- -1G"],
    ["x 0"],
    ["x 1000"],
    ["--shrink --preallocation=full x 512K"],
    ["--preallocation=bogus x 2M"],
    ["x +1M"],
    ["x 10x"],
    ["x 8388609"],
    ["--shrink x 1M"],
    ["--shrink x -- -512K"],
    ["x"],
    [""],
    ["x 1M 2M"],
    ["nosuch.qcow2 1M"],
    ["--preallocation=metadata x 8M"],
    ["--preallocation=falloc x +3M"],
    ["-f qcow2 --preallocation=full x 5M"],
    ["-q x +1M"],
    ["x 9223372036854775807"],
    ["-f raw x +1M"],
    ["--preallocation=falloc x 1M"],
    ["x 1M"],
]


def _norm(text: str) -> str:
    return text.replace("qemu-img", "P").replace("qcow2aio", "P")


@pytest.mark.parametrize("args", [c[0] for c in CLI_CASES])
def test_cli_like_qemu_img(qemu: Qemu, tmp_path: Path, args: str) -> None:
    results = []
    for tool, folder in (("q", tmp_path / "q"), ("p", tmp_path / "p")):
        folder.mkdir()
        qemu.img("create", "-q", "-f", "qcow2", folder / "x", "1M")
        qemu.io(folder / "x", "write -P 0x33 0 1M")
        argv = args.split()
        if tool == "q":
            proc = subprocess.run(
                [qemu.qemu_img, "resize", *argv],
                cwd=folder,
                capture_output=True,
                text=True,
                env={**os.environ, "LC_ALL": "C"},
            )
        else:
            proc = subprocess.run(
                [sys.executable, "-m", "qcow2aio", "resize", *argv],
                cwd=folder,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
            )
        results.append((proc.returncode, _norm(proc.stdout), _norm(proc.stderr)))
        results.append((folder / "x").read_bytes())
    assert results[0] == results[2]
    assert results[1] == results[3]


@pytest.mark.parametrize(
    ("new", "prealloc", "shrink"),
    [
        (3 * MiB, "off", True),
        (20 * MiB, "off", False),
        (20 * MiB + 512, "metadata", False),
        (12 * MiB, "falloc", False),
        (12 * MiB, "full", False),
    ],
)
def test_resize_with_data_file_like_qemu(
    qemu: Qemu,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    new: int,
    prealloc: str,
    shrink: bool,
) -> None:
    """An external data file follows the virtual size (QEMU truncates it on shrink
    and grow), and preallocation maps guest offset = host offset in it."""
    flags = ["--shrink"] if shrink else []
    for side in ("q", "p"):
        folder = tmp_path / side
        folder.mkdir()
        # QEMU 7.2 creates and opens a relative data-file name from the current folder.
        monkeypatch.chdir(folder)
        qemu.img("create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "i.qcow2", "8M")
        qemu.io("i.qcow2", "write -P 0x21 0 8M")
        if side == "q":
            qemu.img("resize", "-q", f"--preallocation={prealloc}", *flags, "i.qcow2", str(new))
        else:
            with qcow2aio.open("i.qcow2", "r+") as img:
                img.resize_sync(new, shrink=shrink, preallocation=prealloc)
            rc, report = qemu.check("i.qcow2")
            assert rc == 0 and not report.get("leaks"), report
            keep = min(new, 8 * MiB)
            assert qemu.convert_raw("i.qcow2") == b"\x21" * keep + bytes(new - keep)
    for name in ("i.qcow2", "d.raw"):
        assert (tmp_path / "q" / name).read_bytes() == (tmp_path / "p" / name).read_bytes(), name


def test_write_waiting_for_a_shrink_is_refused_after_it(qemu: Qemu, tmp_path: Path) -> None:
    """A write checked against the old size that waits for the lock while a shrink
    runs is refused (range error) when its turn comes, instead of allocating past the
    new end; writes inside the new size go through."""
    path = tmp_path / "a.qcow2"
    qcow2aio.create(path, 8 * MiB)

    async def run() -> None:
        img = qcow2aio.open(path, "r+")
        try:
            await img.write(0, b"\x01" * MiB)
            shrink = asyncio.ensure_future(img.resize(2 * MiB, shrink=True))
            await asyncio.sleep(0)
            late = asyncio.ensure_future(img.write(6 * MiB, b"\x02" * 4096))
            inside = asyncio.ensure_future(img.write(MiB, b"\x03" * 4096))
            await shrink
            with pytest.raises(qcow2aio.Qcow2RangeError):
                await late
            await inside
            assert await img.read(MiB, 4096) == b"\x03" * 4096
            assert img.size == 2 * MiB
        finally:
            await img.aclose()

    asyncio.run(run())
    rc, report = qemu.check(path)
    assert rc == 0 and not report.get("leaks"), report
    assert qemu.convert_raw(path) == b"\x01" * MiB + b"\x03" * 4096 + bytes(MiB - 4096)


RESIZE_FAULT_CASES = [
    # (create options, initial size, new size, preallocation, shrink)
    ("cluster_size=512,refcount_bits=64", 1 * MiB, 6 * MiB, "metadata", False),
    ("cluster_size=4096", 4 * MiB, 64 * MiB, "falloc", False),
    ("cluster_size=512", 8 * MiB, 1 * MiB, "off", True),
]


@pytest.mark.parametrize("persistent", [False, True], ids=["once", "from-then-on"])
@pytest.mark.parametrize(("opts", "size0", "new", "prealloc", "shrink"), RESIZE_FAULT_CASES)
def test_resize_io_failure_at_every_step_leaves_a_sound_image(
    qemu: Qemu,
    tmp_path: Path,
    persistent: bool,
    opts: str,
    size0: int,
    new: int,
    prealloc: str,
    shrink: bool,
) -> None:
    """Every I/O operation of a resize failed in turn (once, or from then on: what the
    file holds at a crash there, with every issued write landed): the image is never
    corrupt (leaks at most), its size is the old or the new one, and the data below
    both sizes is intact."""
    from faults import ANY_IO, Fault, FaultState

    template = tmp_path / "template.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", opts, template, str(size0))
    data = random.Random(5).randbytes(min(size0, new) // 2)
    with qcow2aio.open(template, "r+") as img:
        img.write_sync(0, data)
    counting = FaultState()
    probe = tmp_path / "probe.qcow2"
    probe.write_bytes(template.read_bytes())
    with qcow2aio.open(probe, "r+", io_backend=counting.factory()) as img:
        base = counting.ops
        img.resize_sync(new, shrink=shrink, preallocation=prealloc)
        total = counting.ops - base
    assert total > 3
    stride = max(1, total // 60)
    path = tmp_path / "a.qcow2"
    fired = 0
    for k in range(0, total, stride):
        path.write_bytes(template.read_bytes())
        state = FaultState()
        img = qcow2aio.open(path, "r+", io_backend=state.factory())
        state.fault = Fault(ANY_IO, "eio", persistent=persistent, skip=k)
        with contextlib.suppress(Qcow2Error):
            img.resize_sync(new, shrink=shrink, preallocation=prealloc)
        with contextlib.suppress(Qcow2Error):
            img.close()
        fired += state.fired > 0
        code, rep = qemu.check(path)
        assert code in (0, 3) and not rep.get("corruptions"), (k, rep)
        size = qemu.info(path)["virtual-size"]
        assert size in (size0, new), (k, size)
        with qcow2aio.open(path) as check_img:
            assert check_img.read_sync(0, len(data)) == data, k
    assert fired == len(range(0, total, stride))
