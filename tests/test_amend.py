"""``Image.amend`` and ``qcow2aio amend`` against ``qemu-img amend`` 7.2.

Each case amends twin copies of one QEMU-made image, one with qemu-img, one with
us, and asks QEMU to judge ours: same bytes where QEMU's result is sound (layout
included), else same ``info`` JSON (filename aside), ``check`` clean, ``compare``
equal, same ``map``; QEMU reads the data patterns back. Refusals: same message
and exit status, file untouched. Power cuts: every crash state of a recorded
amend (refcount width, downgrade with zero clusters, lazy refcounts off) must
check without corruption and keep the guest content (``QCOW2AIO_STRESS=1``: larger
images, every state, >= 2,000 per operation).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Qemu
from crashsim import Journal, build_states, materialize

import qcow2aio
from qcow2aio.amend import AmendError
from qcow2aio.check import check_image

ROOT = Path(__file__).resolve().parent.parent
STRESS = os.environ.get("QCOW2AIO_STRESS") == "1"
KiB = 1024
MiB = 1024 * KiB


def _ours(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcow2aio", "amend", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "LC_ALL": "C", "PYTHONPATH": str(ROOT)},
    )


def _info(qemu: Qemu, path: Path) -> dict[str, Any]:
    info = qemu.info(path)
    for key in ("filename", "actual-size"):
        info.pop(key, None)
    return info


def _map(qemu: Qemu, path: Path) -> Any:
    return json.loads(qemu.img("map", "--output=json", path).stdout)


def _clean(qemu: Qemu, path: Path) -> None:
    code, rep = qemu.check(path)
    assert code == 0 and not rep.get("corruptions") and not rep.get("leaks"), rep


def _judge(qemu: Qemu, ours: Path, theirs: Path, *, exact: bool) -> None:
    """QEMU's verdict on our amended image next to its own."""
    _clean(qemu, ours)
    assert _info(qemu, ours) == _info(qemu, theirs)
    qemu.img("compare", ours, theirs)
    assert _map(qemu, ours) == _map(qemu, theirs)
    if exact:
        assert ours.read_bytes() == theirs.read_bytes(), "not the bytes qemu-img amend wrote"


# ------------------------------------------------------------------ layouts
def _plain(qemu: Qemu, path: Path, opts: str = "") -> None:
    qemu.img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), path, "4M")
    qemu.io(
        path,
        "write -P 0x11 0 64k",
        "write -P 0x22 2M 128k",
        "write -z 1M 64k",
        "write -P 0x33 3M 64k",
        "write -z 3M 64k",  # zero flag on an allocated cluster
    )


def _reads(qemu: Qemu, path: Path) -> None:
    """QEMU reads the patterns of :func:`_plain` from the image."""
    qemu.io(
        path,
        "read -P 0x11 0 64k",
        "read -P 0x22 2M 128k",
        "read -P 0 1M 64k",
        "read -P 0 3M 64k",
    )


CASES = [
    # (create options, amend options, byte-exact)
    ("", "compat=0.10", True),
    ("", "compat=v2", True),
    ("compat=0.10", "compat=1.1", True),
    ("compat=0.10", "compat=v3,lazy_refcounts=on,refcount_bits=8", True),
    ("", "lazy_refcounts=on", True),
    ("lazy_refcounts=on", "lazy_refcounts=off", True),
    ("", "refcount_bits=1", True),
    ("", "refcount_bits=64", True),
    ("refcount_bits=8", "refcount_bits=16,compat=0.10", True),
    ("cluster_size=512", "refcount_bits=2", True),
    ("", "size=16M", True),
    ("", "size=1M", True),
    ("", "compat=0.10,size=2M", True),
    ("compression_type=zstd", "compat=0.10", True),
    ("", "size=0", True),
]


@pytest.mark.parametrize(("create", "opts", "exact"), CASES, ids=[c[1] for c in CASES])
def test_cli_same_as_qemu_img(
    qemu: Qemu,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    create: str,
    opts: str,
    exact: bool,
) -> None:
    from qcow2aio.cli import main

    base = tmp_path / "base.qcow2"
    _plain(qemu, base, create)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copyfile(base, ours)
    shutil.copyfile(base, theirs)
    qemu.img("amend", "-o", opts, theirs)
    capsys.readouterr()
    code = main(["amend", "-o", opts, str(ours)])
    out = capsys.readouterr()
    assert (code, out.out, out.err) == (0, "", "")
    _judge(qemu, ours, theirs, exact=exact)
    if "size=1M" not in opts and "size=2M" not in opts:
        _reads(qemu, ours)


def test_async_api_with_writes_around(qemu: Qemu, tmp_path: Path) -> None:
    """``await img.amend(...)`` waits for the writes in flight; those issued meanwhile
    go on after it; the result is what QEMU makes of the same data."""
    path = tmp_path / "a.qcow2"
    _plain(qemu, path)

    async def run() -> None:
        async with qcow2aio.open(path, "r+") as img:
            w1 = asyncio.create_task(img.write(512 * KiB, b"\x44" * 65536))
            am = asyncio.create_task(img.amend(refcount_bits=4, lazy_refcounts=True))
            w2 = asyncio.create_task(img.write(640 * KiB, b"\x55" * 4096))
            await asyncio.gather(w1, am, w2)
            assert img.meta.header.refcount_bits == 4

    asyncio.run(run())
    _clean(qemu, path)
    _reads(qemu, path)
    qemu.io(path, "read -P 0x44 512k 64k", "read -P 0x55 640k 4k")
    info = qemu.info(path)["format-specific"]["data"]
    assert info["refcount-bits"] == 4 and info["lazy-refcounts"] is True


def test_refcount_bits_every_width_both_ways(qemu: Qemu, tmp_path: Path) -> None:
    """1..64 bits to every other width: the bytes qemu-img amend writes. 512-byte
    clusters: many refcount blocks at 64 bits, and QEMU, which walks every entry of the
    old blocks, stays fast from 1 bit (with 64 KiB clusters it takes 20 s)."""
    widths = (1, 2, 4, 8, 16, 32, 64)
    for a in widths:
        base = tmp_path / f"base{a}.qcow2"
        opts = f"refcount_bits={a},cluster_size=512"
        qemu.img("create", "-q", "-f", "qcow2", "-o", opts, base, "1M")
        qemu.io(base, "write -P 7 0 64k", "write -P 8 512k 192k")
        for b in widths:
            if a == b:
                continue
            ours, theirs = tmp_path / "o.qcow2", tmp_path / "t.qcow2"
            shutil.copyfile(base, ours)
            shutil.copyfile(base, theirs)
            qemu.img("amend", "-o", f"refcount_bits={b}", theirs)
            with qcow2aio.open(ours, "r+") as img:
                img.amend_sync(refcount_bits=b)
                assert img.read_sync(512 * KiB, 4096) == b"\x08" * 4096
                img.write_sync(768 * KiB, b"\x09" * 4096)  # the new width allocates
            qemu.io(theirs, "write -P 9 768k 4k")
            assert ours.read_bytes() == theirs.read_bytes(), (a, b)
    _clean(qemu, ours)
    qemu.io(ours, "read -P 7 0 64k", "read -P 8 512k 192k", "read -P 9 768k 4k")


def _snapshotted(qemu: Qemu, folder: Path) -> Path:
    """An overlay over a full base, zero clusters (plain and allocated) in the active
    tables and in two snapshots' tables, some tables shared."""
    base = folder / "base.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", base, "4M")
    qemu.io(base, "write -P 9 0 4M")
    top = folder / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu.io(top, "write -z 64k 64k", "write -P 1 512k 64k", "write -z 512k 64k")
    qemu.img("snapshot", "-c", "s1", top)
    qemu.io(top, "write -z 256k 64k", "write -P 2 2M 64k")
    qemu.img("snapshot", "-c", "s2", top)
    qemu.io(top, "write -z 1M 64k")
    return top


def test_downgrade_with_snapshots_and_backing(qemu: Qemu, tmp_path: Path) -> None:
    """Zero clusters over a backing file become clusters of zeros in every table; each
    snapshot still reads as QEMU's downgrade of it. QEMU marks the kept zero cluster
    shared by three tables COPIED (``qemu-img check``: 1 error); ours checks clean."""
    top = _snapshotted(qemu, tmp_path)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copyfile(top, ours)
    shutil.copyfile(top, theirs)
    qemu.img("amend", "-o", "compat=0.10", theirs)
    with qcow2aio.open(ours, "r+") as img:
        img.amend_sync(compat="0.10")
    _clean(qemu, ours)
    assert _info(qemu, ours) == _info(qemu, theirs)
    assert _map(qemu, ours) == _map(qemu, theirs)
    qemu.img("compare", ours, theirs)
    qemu.io(ours, "read -P 0 64k 64k", "read -P 0 512k 64k", "read -P 0 1M 64k", "read -P 9 0 64k")
    for snap in ("s1", "s2"):
        o2, t2 = tmp_path / f"o-{snap}.qcow2", tmp_path / f"t-{snap}.qcow2"
        shutil.copyfile(ours, o2)
        shutil.copyfile(theirs, t2)
        qemu.img("snapshot", "-a", snap, o2)
        qemu.img("snapshot", "-a", snap, t2)
        qemu.img("compare", o2, t2)
        qemu.io(o2, "read -P 0 64k 64k", "read -P 0 512k 64k")
    qemu.io(tmp_path / "o-s2.qcow2", "read -P 0 256k 64k", "read -P 2 2M 64k")


def test_refcount_bits_with_snapshots(qemu: Qemu, tmp_path: Path) -> None:
    top = _snapshotted(qemu, tmp_path)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for width in (2, 64, 8):
        shutil.copyfile(top, ours)
        shutil.copyfile(top, theirs)
        qemu.img("amend", "-o", f"refcount_bits={width}", theirs)
        with qcow2aio.open(ours, "r+") as img:
            img.amend_sync(refcount_bits=width)
        _judge(qemu, ours, theirs, exact=True)
        if width >= 8:  # (at 2 bits, applying s1 would overflow a refcount of 3)
            qemu.img("snapshot", "-a", "s1", ours)
            _clean(qemu, ours)


def _qemu_img_in(qemu: Qemu, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([qemu.qemu_img, *args], cwd=folder, capture_output=True, text=True)


def test_data_file_options(qemu: Qemu, tmp_path: Path) -> None:
    """data_file_raw=on only where it is on already; off clears it; data_file renames
    (an empty name drops the extension, as QEMU does). Names relative to each folder."""
    for name in ("q", "o"):
        folder = tmp_path / name
        folder.mkdir()
        opts = "data_file=d.raw,data_file_raw=on"
        proc = _qemu_img_in(
            qemu, folder, "create", "-q", "-f", "qcow2", "-o", opts, "x.qcow2", "1M"
        )
        assert proc.returncode == 0, proc.stderr
        shutil.copyfile(folder / "d.raw", folder / "e.raw")
    steps = ["data_file_raw=on", "data_file_raw=off", "data_file_raw=on", "data_file=e.raw"]
    steps.append("data_file=")
    for opts in steps:
        theirs = _qemu_img_in(qemu, tmp_path / "q", "amend", "-o", opts, "x.qcow2")
        ours = _ours("-o", opts, "x.qcow2", cwd=tmp_path / "o")
        assert (ours.returncode, ours.stderr) == (
            theirs.returncode,
            theirs.stderr.replace("qemu-img", "qcow2aio"),
        ), opts
        q, o = (tmp_path / n / "x.qcow2" for n in ("q", "o"))
        assert o.read_bytes() == q.read_bytes(), opts
    qemu.img("check", tmp_path / "o" / "x.qcow2", check=False)


# ------------------------------------------------------------------ refusals
REFUSALS = [
    # (create options, amend options)
    ("extended_l2=on", "compat=0.10"),
    ("refcount_bits=8", "compat=0.10"),
    ("", "compat=0.10,refcount_bits=8"),
    ("", "compat=0.10,lazy_refcounts=on"),
    ("compat=0.10", "lazy_refcounts=on"),
    ("compat=0.10", "refcount_bits=64"),
    ("data_file=d.raw", "compat=0.10"),
    ("", "data_file=x.raw"),
    ("", "data_file_raw=on"),
    ("data_file=d.raw", "data_file_raw=on"),
    ("", "cluster_size=4k"),
    ("", "compression_type=zstd"),
    ("", "extended_l2=on"),
    ("", "preallocation=metadata"),
    ("", "encryption=on"),
    ("", "encrypt.format=luks"),
    ("", "nocow=on"),
    ("", "foo=1"),
    ("", "backing_file=x"),
    ("", "backing_fmt=raw"),
    ("", "compat=0.9"),
    ("", "refcount_bits=3"),
    ("", "refcount_bits=128"),
    ("", "refcount_bits=x"),
    ("", "lazy_refcounts=maybe"),
    ("", "size=1000"),
    ("", "size=abc"),
    ("", ""),
]


def test_refusals_like_qemu_img(
    qemu: Qemu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each refusal: qemu-img's message and exit status 1, the image left untouched
    (by both tools: so one image per create option serves every case). Ours runs
    in-process (``qcow2aio.cli.main``), the command-line path without the start-up."""
    from qcow2aio.cli import main

    folders: dict[str, Path] = {}
    for create, opts in REFUSALS:
        folder = folders.get(create)
        if folder is None:
            folder = folders[create] = tmp_path / f"f{len(folders)}"
            folder.mkdir()
            args = ["-o", create] if create else []
            proc = _qemu_img_in(qemu, folder, "create", "-q", "-f", "qcow2", *args, "x.qcow2", "1M")
            assert proc.returncode == 0, proc.stderr
            io = subprocess.run(
                [qemu.qemu_io, "-c", "write -P 3 0 64k", "x.qcow2"], cwd=folder, capture_output=True
            )
            assert io.returncode == 0, io.stderr
        path = folder / "x.qcow2"
        before = path.read_bytes()
        theirs = _qemu_img_in(qemu, folder, "amend", "-o", opts, "x.qcow2")
        assert path.read_bytes() == before, f"{create}:{opts}: qemu-img changed the image"
        monkeypatch.chdir(folder)
        capsys.readouterr()
        code = main(["amend", "-o", opts, "x.qcow2"])
        out = capsys.readouterr()
        assert path.read_bytes() == before, f"{create}:{opts}: the refusal changed the image"
        ours = (code, out.out, out.err.replace("qcow2aio", "qemu-img"))
        assert ours == (theirs.returncode, theirs.stdout, theirs.stderr), (create, opts)
        assert code == 1


def test_zstd_downgrade_with_compressed_clusters_refused(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "z.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", path, "1M")
    qemu.io(path, "write -c -P 3 0 64k")
    before = path.read_bytes()
    with qcow2aio.open(path, "r+") as img, pytest.raises(AmendError) as exc:
        img.amend_sync(compat="0.10")
    assert str(exc.value) == (
        "Cannot downgrade an image with zstd compression type and existing compressed clusters"
    )
    assert path.read_bytes()[512:] == before[512:]  # (the open clears autoclear bits only)
    theirs = qemu.img("amend", "-o", "compat=0.10", path, check=False)
    assert theirs.returncode == 1 and str(exc.value) in theirs.stderr


def test_width_decrease_that_does_not_fit(qemu: Qemu, tmp_path: Path) -> None:
    """The first cluster in file order whose refcount the new width cannot hold."""
    path = tmp_path / "s.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", path, "1M")
    qemu.io(path, "write -P 1 0 64k")
    for i in range(17):
        qemu.img("snapshot", "-c", f"s{i}", path)
    before = path.read_bytes()
    for bits in (1, 2, 4):
        theirs = qemu.img("amend", "-o", f"refcount_bits={bits}", path, check=False)
        ours = _ours("-o", f"refcount_bits={bits}", path)
        assert ours.returncode == theirs.returncode == 1
        assert ours.stderr.replace("qcow2aio", "qemu-img") == theirs.stderr
        assert "has a refcount of 18" in ours.stderr
        assert path.read_bytes() == before
    ours = _ours("-o", "refcount_bits=8", path)
    assert ours.returncode == 0, ours.stderr
    _clean(qemu, path)


def test_cli_usage_errors(qemu: Qemu, tmp_path: Path) -> None:
    qemu.img("create", "-q", "-f", "qcow2", tmp_path / "x.qcow2", "1M")
    (tmp_path / "r.raw").write_bytes(bytes(4096))
    for argv in (
        [],
        ["x.qcow2"],
        ["-o", "help"],
        ["-o", "help", "x.qcow2"],
        ["-o", "size=2M", "x.qcow2", "y"],
        ["-o", "size=2M", "missing.qcow2"],
        ["-f", "raw", "-o", "size=2M", "x.qcow2"],
        ["-o", "size=2M", "r.raw"],
    ):
        theirs = subprocess.run(
            [qemu.qemu_img, "amend", *argv], cwd=tmp_path, capture_output=True, text=True
        )
        ours = _ours(*argv, cwd=tmp_path)
        assert ours.returncode == theirs.returncode, argv
        assert ours.stdout == theirs.stdout, argv
        # (qemu-img's probing warning for raw files is not ours to print)
        want = [ln for ln in theirs.stderr.splitlines() if ln.startswith("qemu-img")]
        got = [ln.replace("qcow2aio", "qemu-img") for ln in ours.stderr.splitlines()]
        assert [g for g in got if g.startswith("qemu-img")] == want, argv


# ------------------------------------------------------------------ power cuts
QUICK_STATES = 90  # per operation: a few hundred in all
STRESS_MIN_STATES = 2000

# The lazy-refcounts-off amend has one window of refcount-block writes (one flush
# before it, the header write after): a recording gives about 2^(dirty blocks) states
# at most, ~1,000 with the seeded random subsets. Under stress it is recorded on three
# images (cluster size, virtual size, seed of the writes), each dirtying 16-32 blocks;
# 1 KiB clusters also tear each block write at 512 bytes. Quick runs: the first one.
LAZY_RUNS = [(512, 2 * MiB, 3), (1024, 8 * MiB, 4), (512, 4 * MiB, 5)]


def _pc_image(qemu: Qemu, path: Path, kind: str, run: tuple[int, int, int]) -> None:
    """Images with enough metadata that the amend makes many writes and flushes."""
    if kind.startswith("refcount"):
        # Small clusters: many refcount blocks at the new width (one window of many
        # block writes before the switch).
        size = "8M" if STRESS else "2M"
        qemu.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, size)
        qemu.io(path, f"write -P 1 0 {size}")
        qemu.img("snapshot", "-c", "s", path)
        rng = random.Random(5)
        span = int(size[:-1]) * 1024 - 4
        cmds = [f"write -P {i % 250 + 2} {rng.randrange(0, span) * 1024} 3k" for i in range(60)]
        qemu.io(path, *cmds)
    elif kind == "downgrade":
        base = path.parent / "base.qcow2"
        qemu.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", base, "1M")
        qemu.io(base, "write -P 9 0 1M")
        qemu.img(
            "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", base, "-F", "qcow2", path
        )
        n = 120 if STRESS else 24
        cmds = []
        for i in range(n):
            off = i * 8 * KiB
            cmds.append(f"write -P {i + 1} {off} 4k" if i % 3 == 0 else f"write -z {off} 4k")
        qemu.io(path, *cmds)
        qemu.img("snapshot", "-c", "s", path)
        qemu.io(path, "write -z 4k 4k")
    else:  # lazy: a snapshot shares every cluster; overwrites then free all over
        cs, size, _ = run
        qemu.img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", path, str(size))
        qemu.io(path, f"write -P 4 0 {size}")
        qemu.img("snapshot", "-c", "s", path)


def _pc_amend(kind: str) -> dict[str, object]:
    return {
        "refcount_up": {"refcount_bits": 64},
        "refcount_down": {"refcount_bits": 8},
        "downgrade": {"compat": "0.10"},
        "lazy": {"lazy_refcounts": False},
    }[kind]


def _pc_record(
    qemu: Qemu, folder: Path, kind: str, run: tuple[int, int, int]
) -> tuple[bytes, Journal, int, bytes]:
    """One recorded amend: (file before, journal, first journal position of the
    amend's crash states, guest content)."""
    path = folder / "img.qcow2"
    _pc_image(qemu, path, kind, run)
    if kind == "lazy":
        # Lazy refcounts on, then writes: stale refcounts and the dirty bit on disk.
        with qcow2aio.open(path, "r+") as img:
            img.amend_sync(lazy_refcounts=True)
    initial = path.read_bytes()
    journal = Journal()
    with qcow2aio.open(path, "r+", io_backend=journal.factory(path)) as img:
        if kind == "lazy":
            _, size, seed = run
            rng = random.Random(seed)
            for i in range(200 if STRESS else 40):
                img.write_sync(rng.randrange(0, size // 512 - 2) * 512, bytes([i % 250 + 1]) * 1024)
            img.flush_sync()
            assert img.meta.header.dirty
        content = img.read_sync(0, img.size)
        start = journal.pos  # crash states from here on: everything before is flushed
        img.amend_sync(**_pc_amend(kind))
    return initial, journal, start, content


@pytest.mark.parametrize("kind", ["refcount_up", "refcount_down", "downgrade", "lazy"])
def test_power_cut_states_of_amend(qemu: Qemu, tmp_path: Path, kind: str) -> None:
    runs = LAZY_RUNS if kind == "lazy" else [(0, 0, 0)]
    if not STRESS:
        runs = runs[:1]
    counts = {"runs": 0, "states": 0, "clean": 0, "leaks": 0, "dirty": 0, "qemu_checked": 0}
    failures: list[str] = []
    total = 0
    for r, run in enumerate(runs):
        folder = tmp_path / f"run{r}"
        folder.mkdir()
        initial, journal, start, content = _pc_record(qemu, folder, kind, run)
        rng = random.Random(f"{kind}{r or ''}")
        states = [
            st
            for st in build_states(journal, rng, randoms=1000 if STRESS else 8)
            if st.crash > start
        ]
        total += len(states)
        counts["runs"] += 1
        if not STRESS:
            last = max(states, key=lambda s: (len(s.ops), s.torn is None))
            states = [last, *rng.sample(states, min(QUICK_STATES, len(states)))]
        tag = f"run {r} {run}: " if len(runs) > 1 else ""
        _pc_verify(qemu, folder, initial, journal, states, content, counts, failures, tag)
    print(f"amend power cuts {kind}: {total} states built, {json.dumps(counts)}")
    assert not failures, f"{len(failures)} problems, e.g.:\n" + "\n".join(failures[:20])
    if STRESS:
        assert counts["states"] >= STRESS_MIN_STATES, counts


def _pc_verify(
    qemu: Qemu,
    folder: Path,
    initial: bytes,
    journal: Journal,
    states: list[Any],
    content: bytes,
    counts: dict[str, int],
    failures: list[str],
    tag: str,
) -> None:
    """Each crash state: our check and QEMU's (sampled) agree on no corruption, the
    guest content is kept, a dirty state is one QEMU repairs, and it takes a write."""
    state_path = folder / "state.qcow2"
    for n, st in enumerate(states):
        state_path.write_bytes(materialize(initial, journal, st))
        counts["states"] += 1
        label = f"{tag}{st.label}"
        try:
            with qcow2aio.open(state_path) as img:
                res = check_image(img.meta)
                dirty = img.meta.header.dirty
                got = img.read_sync(0, len(content))
        except qcow2aio.Qcow2Error as exc:
            failures.append(f"[{label}] open/read: {exc!r}")
            continue
        code = res.exit_code()
        if dirty:
            counts["dirty"] += 1
        elif code == 0:
            counts["clean"] += 1
        elif code == 3:
            counts["leaks"] += 1
        else:
            failures.append(f"[{label}] check exit {code}: {res.messages[:3]}")
        if got != content:
            failures.append(f"[{label}] guest content changed")
        if (code not in (0, 3) and not dirty) or n % 15 == 0:
            qcode, rep = qemu.check(state_path)
            counts["qemu_checked"] += 1
            if not dirty and (qcode, rep.get("corruptions", 0)) != (code, res.corruptions):
                failures.append(f"[{label}] qemu-img check {qcode}, ours {code}")
            if dirty:
                shutil.copyfile(state_path, folder / "rep.qcow2")
                proc = qemu.img("check", "-r", "all", folder / "rep.qcow2", check=False)
                if proc.returncode != 0:
                    failures.append(f"[{label}] qemu-img check -r all failed")
        if n % 10 == 0:
            with qcow2aio.open(state_path, "r+") as img:
                img.write_sync(0, b"\x5a" * 4096)
            with qcow2aio.open(state_path) as img:
                after = check_image(img.meta).exit_code()
            if after not in (0, 3):
                failures.append(f"[{label}] after reopen + write: check exit {after}")


@pytest.mark.parametrize("fmt", ["luks", "aes"])
def test_downgrade_of_an_encrypted_image_keeps_zeros(qemu: Qemu, tmp_path: Path, fmt: str) -> None:
    """Zero clusters that keep their offset get zeros *encrypted* for it (QEMU 7.2
    writes plain zeros there, which then read as garbage: not followed)."""
    path = tmp_path / "e.qcow2"
    secret = ["--object", "secret,id=s,data=pw"]
    opts = f"encrypt.format={fmt},encrypt.key-secret=s"
    if fmt == "luks":
        opts += ",encrypt.iter-time=10"
    qemu.img("create", "-q", "-f", "qcow2", *secret, "-o", opts, path, "1M")
    spec = f"driver=qcow2,file.filename={path},encrypt.key-secret=s"
    io = [*secret, "--image-opts"]
    cmds = ["write -P 1 0 128k", "write -z 0 64k", "write -P 2 256k 64k", "write -z 512k 64k"]
    qemu.io(spec, *cmds, fmt=None, extra_args=io)
    with qcow2aio.open(path, "r+", passphrase="pw") as img:
        img.amend_sync(compat="0.10")
        assert img.read_sync(0, 64 * KiB) == bytes(64 * KiB)
    qemu.io(
        spec,
        "read -P 0 0 64k",
        "read -P 1 64k 64k",
        "read -P 2 256k 64k",
        "read -P 0 512k 64k",
        fmt=None,
        extra_args=io,
    )
    assert qemu.info(path)["format-specific"]["data"]["compat"] == "0.10"
    proc = qemu.img("check", *secret, "--image-opts", spec, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_upgrade_of_a_v2_image_with_snapshots(qemu: Qemu, tmp_path: Path) -> None:
    base = tmp_path / "v2.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", base, "4M")
    qemu.io(base, "write -P 1 0 64k")
    qemu.img("snapshot", "-c", "s", base)
    qemu.io(base, "write -P 2 0 4k")
    ours, theirs = tmp_path / "o.qcow2", tmp_path / "t.qcow2"
    shutil.copyfile(base, ours)
    shutil.copyfile(base, theirs)
    qemu.img("amend", "-o", "compat=1.1", theirs)
    with qcow2aio.open(ours, "r+") as img:
        img.amend_sync(compat="1.1")
    _judge(qemu, ours, theirs, exact=True)
    qemu.img("snapshot", "-a", "s", ours)
    qemu.io(ours, "read -P 1 0 64k")


def test_lazy_off_on_an_image_left_dirty(qemu: Qemu, tmp_path: Path) -> None:
    """A lazy-refcounts image whose writer died (dirty bit, refcounts stale): the
    read-write open repairs it (QEMU does too, elsewhere in the file: same verdicts,
    not the same bytes), then the bits go."""
    path = tmp_path / "d.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "4M")
    qemu.io(path, "write -P 1 0 64k", "write -P 2 1M 64k", "abort", check=False)
    assert qemu.info(path)["dirty-flag"] is True
    ours, theirs = tmp_path / "o.qcow2", tmp_path / "t.qcow2"
    shutil.copyfile(path, ours)
    shutil.copyfile(path, theirs)
    qemu.img("amend", "-o", "lazy_refcounts=off", theirs)
    with qcow2aio.open(ours, "r+") as img:
        img.amend_sync(lazy_refcounts=False)
    _judge(qemu, ours, theirs, exact=False)
    qemu.io(ours, "read -P 1 0 64k", "read -P 2 1M 64k")


def test_amends_and_writes_in_one_session(qemu: Qemu, tmp_path: Path) -> None:
    """Down, up, width, lazy and size in one session, writes between: every later
    request follows the new format (no zero flags in v2, the new refcount width)."""
    path = tmp_path / "x.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", path, "4M")
    qemu.io(path, "write -P 1 0 1M")

    async def run() -> None:
        async with qcow2aio.open(path, "r+") as img:
            await img.amend(compat="0.10")
            await img.write_zeroes(0, 128 * KiB, unmap=False)
            await img.discard(256 * KiB, 64 * KiB)
            await img.write(512 * KiB, b"\x07" * 4096)
            await img.amend(compat="1.1", lazy_refcounts=True)
            await img.write_zeroes(640 * KiB, 64 * KiB)
            await img.amend(refcount_bits=2)
            await img.write(2 * MiB, b"\x08" * 65536)
            await img.amend(lazy_refcounts=False, size=8 * MiB)

    asyncio.run(run())
    _clean(qemu, path)
    qemu.io(
        path,
        "read -P 0 0 128k",
        "read -P 1 128k 128k",
        "read -P 0 256k 64k",
        "read -P 7 512k 4k",
        "read -P 0 640k 64k",
        "read -P 8 2M 64k",
        "read -P 0 4M 4M",
    )
    data = qemu.info(path)["format-specific"]["data"]
    assert (data["compat"], data["lazy-refcounts"], data["refcount-bits"]) == ("1.1", False, 2)
    assert qemu.info(path)["virtual-size"] == 8 * MiB
