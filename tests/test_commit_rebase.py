"""``qcow2aio commit`` / ``rebase`` (and their Python API) against ``qemu-img commit`` /
``rebase`` on the same chains.

Each case builds one chain with qemu-img and qemu-io, copies it twice, runs qemu-img
in one copy and ``qcow2aio`` in the other (same arguments, same working folder), and
then asks QEMU about both: same exit code, stdout and stderr (program name
normalised), every image of the two chains equal as guests see them
(``qemu-img compare``), the same ``qemu-img map --output=json`` layout (data / zero /
unallocated per range and depth; host offsets and the file-hole ``zero`` flag of data
ranges left out), the same backing name and format, and a clean ``qemu-img check``.

The quick grid covers 2- and 3-deep chains, v2 and v3, 512-byte and 64 KiB clusters,
extended L2, zero and compressed clusters, relative backing names in a subfolder,
``-d`` and ``-b``; ``QCOW2AIO_STRESS=1`` runs the whole cross product.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Qemu

import qcow2aio
from qcow2aio.cli import main
from qcow2aio.tools.commit import CommitError, commit, commit_sync
from qcow2aio.tools.rebase import RebaseError, differing_runs, rebase, rebase_sync

STRESS = os.environ.get("QCOW2AIO_STRESS") == "1"


@dataclass(frozen=True)
class Chain:
    """A chain to build: top.qcow2 over [mid.qcow2 over] base.qcow2 (+ nb.qcow2, a
    candidate new backing file). ``sub``: mid and base live in ``sub/``, named
    relative to the image above (``sub/mid.qcow2`` from top, ``base.qcow2`` from mid)."""

    compat: str = "1.1"
    cluster_size: int = 65536
    extended_l2: bool = False
    depth: int = 2
    sub: bool = False

    def opts(self) -> str:
        o = f"compat={self.compat},cluster_size={self.cluster_size}"
        return o + (",extended_l2=on" if self.extended_l2 else "")


def _build(qemu: Qemu, folder: Path, c: Chain) -> list[str]:
    """Create the chain in ``folder``; return its file names (relative)."""
    v3 = c.compat == "1.1"
    d = "sub/" if c.sub else ""
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    base, mid, top = f"{d}base.qcow2", f"{d}mid.qcow2", "top.qcow2"

    def create(name: str, backing: str | None, size: str = "4M") -> None:
        args = ["create", "-q", "-f", "qcow2", "-o", c.opts()]
        if backing is not None:
            args += ["-b", backing, "-F", "qcow2"]
        qemu.img(*args, folder / name, size)

    def write(name: str, *cmds: str) -> None:
        qemu.io(folder / name, *cmds)

    zero = "write -z" if v3 else "write -P 0"
    create(base, None)
    write(base, "write -P 1 0 1M", "write -c -P 8 3M 64k", f"{zero} 2M 64k")
    create("nb.qcow2", None, "3M")
    write("nb.qcow2", "write -P 1 0 64k", "write -P 3 128k 256k", "write -P 3 1536k 4k")
    names = [base, "nb.qcow2"]
    below = base
    if c.depth == 3:
        create(mid, "base.qcow2" if c.sub else base)
        write(mid, "write -P 5 512k 1M", f"{zero} 1600k 64k", "write -P 7 2560k 1k")
        names.append(mid)
        below = mid
    create(top, below)
    write(
        top,
        "write -P 2 64k 64k",
        f"{zero} 256k 128k",
        "write -c -P 3 1M 64k",
        "write -P 4 2M 512",
        f"{zero} 3M 64k",
        "write -P 6 3100k 2k",
        "write -P 0 3200k 64k",
    )
    names.append(top)
    return names


def _layout(qemu: Qemu, path: Path) -> list[tuple[Any, ...]]:
    """``qemu-img map --output=json`` without host offsets, merged where only they
    differed; a data range's ``zero`` flag (a hole in the file) is left out too."""
    out: list[list[Any]] = []
    for r in json.loads(qemu.img("map", "--output=json", path).stdout):
        key = (r["depth"], r["present"], r["data"], None if r["data"] else r["zero"])
        if out and tuple(out[-1][2:]) == key and out[-1][0] + out[-1][1] == r["start"]:
            out[-1][1] += r["length"]
        else:
            out.append([r["start"], r["length"], *key])
    return [tuple(x) for x in out]


def _backing(qemu: Qemu, path: Path) -> tuple[Any, Any]:
    info = qemu.info(path)
    return info.get("backing-filename"), info.get("backing-filename-format")


def _ours(folder: Path, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        os.chdir(cwd)
    return (
        rc,
        out.getvalue(),
        err.getvalue().replace("qcow2aio:", "PROG:").replace("'qcow2aio --help'", "'PROG --help'"),
    )


def _theirs(qemu: Qemu, folder: Path, argv: list[str]) -> tuple[int, str, str]:
    import subprocess

    proc = subprocess.run(
        [qemu.qemu_img, *argv],
        cwd=folder,
        capture_output=True,
        env={**os.environ, "LC_ALL": "C"},
        timeout=120,
    )
    # Bytes, decoded by hand: text mode would turn the progress records' \r into \n.
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    err = stderr.replace("qemu-img:", "PROG:").replace("'qemu-img --help'", "'PROG --help'")
    return proc.returncode, stdout, err


def _progress_ends(text: str) -> tuple[str, str]:
    """First and last ``-p`` records: qemu-img's commit job repeats records in between
    as its internal iterations go, which no other tool can reproduce."""
    recs = text.split("\r")
    return recs[0], "\r".join(recs[-2:])


_BUILT: dict[Chain, tuple[Path, list[str]]] = {}


@pytest.fixture
def built(qemu: Qemu, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``built(chain)``: the folder holding that chain, built once per session (the
    tests copy it before changing anything)."""

    def get(chain: Chain) -> tuple[Path, list[str]]:
        if chain not in _BUILT:
            src = tmp_path_factory.mktemp("chain")
            _BUILT[chain] = (src, _build(qemu, src, chain))
        return _BUILT[chain]

    return get


def _same(
    qemu: Qemu, tmp_path: Path, built: Any, chain: Chain, argv: list[str], *, deep: bool = True
) -> None:
    src, names = built(chain)
    q, p = tmp_path / "q", tmp_path / "p"
    shutil.copytree(src, q)
    shutil.copytree(src, p)
    theirs = _theirs(qemu, q, argv)
    ours = _ours(p, argv)
    if "-p" in argv:
        assert (ours[0], _progress_ends(ours[1]), ours[2]) == (
            theirs[0],
            _progress_ends(theirs[1]),
            theirs[2],
        )
    else:
        assert ours == theirs
    if not deep:  # a refusal: nothing may have changed, in either copy
        for name in names:
            assert (p / name).read_bytes() == (q / name).read_bytes() == (src / name).read_bytes()
        return
    for name in names:
        assert _backing(qemu, p / name) == _backing(qemu, q / name), name
        cmp = qemu.img("compare", q / name, p / name, check=False)
        assert cmp.returncode == 0, (name, cmp.stdout, cmp.stderr)
        assert _layout(qemu, p / name) == _layout(qemu, q / name), name
        rc, report = qemu.check(p / name)
        assert rc == 0 and not report.get("leaks") and not report.get("corruptions"), (
            name,
            report,
        )


QUICK_CHAINS = [
    Chain(),
    Chain(compat="0.10", cluster_size=512, depth=3),
    Chain(extended_l2=True, depth=3, sub=True),
    Chain(cluster_size=512, sub=True),
]
ALL_CHAINS = [
    Chain(compat=v, cluster_size=cs, extended_l2=ext, depth=dp, sub=sub)
    for v, cs, ext, dp, sub in itertools.product(
        ("0.10", "1.1"), (512, 65536), (False, True), (2, 3), (False, True)
    )
    if not (ext and (v == "0.10" or cs < 16384))
]

COMMIT_ARGS = [
    ["commit", "top.qcow2"],
    ["commit", "-d", "top.qcow2"],
    ["commit", "-q", "-p", "top.qcow2"],
    ["commit", "-p", "top.qcow2"],
]
COMMIT_DEEP_ARGS = [
    ["commit", "-b", "base.qcow2", "top.qcow2"],
    ["commit", "-b", "sub/base.qcow2", "top.qcow2"],
    ["commit", "-b", "mid.qcow2", "top.qcow2"],
    ["commit", "-b", "sub/mid.qcow2", "top.qcow2"],
]
REBASE_ARGS = [
    ["rebase", "-b", "nb.qcow2", "-F", "qcow2", "top.qcow2"],
    ["rebase", "-b", "", "top.qcow2"],
    ["rebase", "-u", "-b", "nb.qcow2", "-F", "qcow2", "top.qcow2"],
    ["rebase", "-b", "nb.qcow2", "top.qcow2"],
    ["rebase", "-p", "-b", "nb.qcow2", "-F", "raw", "top.qcow2"],
    # An image without a backing file gets one: its unallocated ranges read as zeros.
    ["rebase", "-b", "base.qcow2", "-F", "qcow2", "nb.qcow2"],
]


def _cases(chains: list[Chain]) -> list[tuple[Chain, list[str]]]:
    out: list[tuple[Chain, list[str]]] = []
    for c in chains:
        out += [(c, a) for a in COMMIT_ARGS + REBASE_ARGS]
        if c.depth == 3:
            out += [(c, a) for a in COMMIT_DEEP_ARGS]
            # Rebase the top past its backing file, onto the base (the usual use).
            b = "sub/base.qcow2" if c.sub else "base.qcow2"
            out.append((c, ["rebase", "-b", b, "-F", "qcow2", "top.qcow2"]))
    return out


def _quick() -> list[tuple[Chain, list[str]]]:
    picked = [
        (QUICK_CHAINS[0], COMMIT_ARGS[0]),
        (QUICK_CHAINS[0], REBASE_ARGS[0]),
        (QUICK_CHAINS[0], REBASE_ARGS[1]),
        (QUICK_CHAINS[1], COMMIT_ARGS[0]),
        (QUICK_CHAINS[1], COMMIT_DEEP_ARGS[0]),
        (QUICK_CHAINS[1], REBASE_ARGS[0]),
        (QUICK_CHAINS[2], COMMIT_ARGS[3]),
        (QUICK_CHAINS[2], COMMIT_DEEP_ARGS[1]),
        (QUICK_CHAINS[2], COMMIT_DEEP_ARGS[3]),
        (QUICK_CHAINS[2], ["rebase", "-b", "sub/base.qcow2", "-F", "qcow2", "top.qcow2"]),
        (QUICK_CHAINS[3], COMMIT_ARGS[1]),
        (QUICK_CHAINS[3], REBASE_ARGS[3]),
        (QUICK_CHAINS[3], REBASE_ARGS[4]),
        (QUICK_CHAINS[1], REBASE_ARGS[5]),
        (
            QUICK_CHAINS[0],
            ["rebase", "-q", "-p", "-u", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
        ),
    ]
    return picked


CASES = _cases(ALL_CHAINS) if STRESS else _quick()


@pytest.mark.parametrize(("chain", "argv"), CASES, ids=lambda x: str(x).replace(" ", ""))
def test_like_qemu_img(
    qemu: Qemu, tmp_path: Path, built: Any, chain: Chain, argv: list[str]
) -> None:
    _same(qemu, tmp_path, built, chain, argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["commit"],
        ["commit", "none.qcow2"],
        ["commit", "nb.qcow2"],
        ["commit", "-b", "other.qcow2", "top.qcow2"],
        ["commit", "-b", "top.qcow2", "top.qcow2"],
        ["commit", "-f", "raw", "top.qcow2"],
        ["rebase", "top.qcow2"],
        ["rebase"],
        ["rebase", "-u", "-b", "x.qcow2", "top.qcow2"],
        ["rebase", "-b", "nonexist.qcow2", "-F", "qcow2", "top.qcow2"],
        ["rebase", "-b", "base.qcow2", "-F", "qcow2", "-f", "raw", "top.qcow2"],
    ],
)
def test_errors_like_qemu_img(qemu: Qemu, tmp_path: Path, built: Any, argv: list[str]) -> None:
    _same(qemu, tmp_path, built, Chain(), argv, deep=False)


def test_differing_runs() -> None:
    a = bytes(2048)
    b = bytearray(a)
    b[10] = 1
    b[1100] = 2
    b[2047] = 3
    assert differing_runs(a, a) == []
    assert differing_runs(a, bytes(b)) == [(0, 512), (1024, 1024)]
    assert differing_runs(a[:700], bytes(b[:700])) == [(0, 512)]
    assert differing_runs(bytes(600), bytes(599) + b"\1") == [(512, 88)]


def test_api_on_open_image(qemu: Qemu, tmp_path: Path) -> None:
    """commit and rebase on an :class:`Image` the caller keeps open: it reads the same
    before and after (its backing chain reopened), progress ends at the total."""
    names = _build(qemu, tmp_path, Chain(depth=3))
    assert names[-1] == "top.qcow2"
    top = tmp_path / "top.qcow2"
    before = qemu.convert_raw(top)
    calls: list[tuple[int, int]] = []

    async def run() -> bytes:
        async with qcow2aio.open(top, "r+") as img:
            await qcow2aio.commit(img, progress=lambda d, t: calls.append((d, t)))
            after_commit = await img.read(0, img.size)
            assert after_commit == before
            await qcow2aio.rebase(img, "base.qcow2", backing_format="qcow2")
            return await img.read(0, img.size)

    assert asyncio.run(run()) == before
    assert calls[-1][0] == calls[-1][1] > 0
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert qemu.convert_raw(top) == before
    assert _backing(qemu, top) == ("base.qcow2", "qcow2")
    for name in names:
        rc, _ = qemu.check(tmp_path / name)
        assert rc == 0


def test_sync_api_and_errors(qemu: Qemu, tmp_path: Path) -> None:
    _build(qemu, tmp_path, Chain())
    top = tmp_path / "top.qcow2"
    before = qemu.convert_raw(top)
    with pytest.raises(CommitError, match=r"Did not find 'x\.qcow2' in the backing chain"):
        commit_sync(top, base="x.qcow2")
    with pytest.raises(CommitError, match="Image does not have a backing file"):
        commit_sync(tmp_path / "nb.qcow2")
    with pytest.raises(RebaseError, match="backing format must be specified"):
        rebase_sync(top, "nb.qcow2", unsafe=True)
    rebase_sync(top, "nb.qcow2", backing_format="qcow2")
    assert qemu.convert_raw(top) == before
    commit_sync(top)
    assert qemu.convert_raw(top) == before
    assert qemu.convert_raw(tmp_path / "nb.qcow2")[: 3 << 20] == before[: 3 << 20]


@pytest.mark.parametrize("job", ["commit", "rebase"])
def test_cancel_leaves_chain_reading_the_same(qemu: Qemu, tmp_path: Path, job: str) -> None:
    """A cancel after the first piece of work: the chain reads as before, every image
    checks clean (leaks allowed), the header still names the old backing file."""
    _build(qemu, tmp_path, Chain(cluster_size=4096))
    top = tmp_path / "top.qcow2"
    before = qemu.convert_raw(top)
    base_before = (tmp_path / "base.qcow2").read_bytes()
    seen: list[int] = []

    async def run() -> None:
        task: asyncio.Task[None]

        def progress(done: int, total: int) -> None:
            seen.append(done)
            if done and len(seen) == 2:
                task.cancel()

        if job == "commit":
            coro = commit(top, progress=progress, max_inflight=2, chunk_size=8192)
        else:
            coro = rebase(top, "nb.qcow2", backing_format="qcow2", progress=progress)
        task = asyncio.ensure_future(coro)
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert len(seen) == 2  # it did stop
    assert qemu.convert_raw(top) == before
    assert _backing(qemu, top) == ("base.qcow2", "qcow2")
    if job == "commit":
        assert (tmp_path / "base.qcow2").read_bytes() != base_before  # it had begun
    for name in ("top.qcow2", "base.qcow2"):
        rc, report = qemu.check(tmp_path / name)
        assert rc in (0, 3) and not report.get("corruptions"), report


def _raw_chain(qemu: Qemu, folder: Path, base_size: str, cs: int) -> None:
    folder.mkdir()
    base, top = folder / "base.raw", folder / "top.qcow2"
    qemu.img("create", "-q", "-f", "raw", base, base_size)
    qemu.io(base, "write -P 1 0 2M", "write -P 0 2560k 64k", fmt="raw")
    qemu.img(
        "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}",
        "-b", "base.raw", "-F", "raw", top, "4M",
    )  # fmt: skip
    qemu.io(
        top,
        "write -P 2 64k 64k",
        "write -z 256k 128k",
        "write -P 4 1M 512",
        "write -z 3M 64k",
        "write -z 1600k 4k",
        "write -c -P 5 3200k 64k",
        "write -P 0 2500k 192k",
    )


@pytest.mark.parametrize(
    ("base_size", "cs", "args"),
    [("4M", 65536, []), ("3M", 512, []), ("4M", 1024, ["-d"])],
)
def test_commit_into_raw_like_qemu_img(
    qemu: Qemu, tmp_path: Path, base_size: str, cs: int, args: list[str]
) -> None:
    """A raw base: the same bytes and the same holes (zero chunks punched, a smaller
    file grown to the top's size), the top emptied (or not) the same way."""
    argv = ["commit", *args, "top.qcow2"]
    _raw_chain(qemu, tmp_path / "q", base_size, cs)
    _raw_chain(qemu, tmp_path / "p", base_size, cs)
    assert _ours(tmp_path / "p", argv) == _theirs(qemu, tmp_path / "q", argv)
    q, p = tmp_path / "q", tmp_path / "p"
    assert (p / "base.raw").read_bytes() == (q / "base.raw").read_bytes()
    raw_map = [qemu.img("map", "--output=json", "-f", "raw", d / "base.raw").stdout for d in (p, q)]
    assert raw_map[0] == raw_map[1]
    assert _layout(qemu, p / "top.qcow2") == _layout(qemu, q / "top.qcow2")
    assert qemu.img("compare", q / "top.qcow2", p / "top.qcow2", check=False).returncode == 0
    rc, report = qemu.check(p / "top.qcow2")
    assert rc == 0, report
