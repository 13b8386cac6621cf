"""``qcow2aio convert`` / ``qcow2aio.convert`` against ``qemu-img convert`` 7.2.

Every case runs both tools on the same sources and compares: exit code, stdout and
stderr (program name normalised), content (``qemu-img compare``), the allocation
layout (``qemu-img map --output=json`` with host offsets removed: which ranges are
data, zero or unallocated), and ``qemu-img check`` of our output. The sources hold
what convert must tell apart: data, zero clusters, written zeros (whole clusters and
single 4 KiB blocks), a compressed cluster, a backing chain, a sparse raw file.
``QCOW2AIO_STRESS=1`` adds a larger grid of target options.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from conftest import Qemu

import qcow2aio
from qcow2aio.cli import main

STRESS = os.environ.get("QCOW2AIO_STRESS", "").strip() not in ("", "0")


def _build_sources(qemu: Qemu, d: Path) -> None:
    """The source images every case converts (built once per module)."""
    qemu.img("create", "-q", "-f", "qcow2", d / "base.qcow2", "3M")
    qemu.io(d / "base.qcow2", "write -P 7 0 2M", "write -z 64k 64k", "write -P 8 2M 64k")
    qemu.img(
        "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "top.qcow2", "4M"
    )
    qemu.io(
        d / "top.qcow2",
        "write -P 1 64k 64k",  # data over a zero cluster of the base
        "write -z 256k 64k",  # a zero cluster hiding base data
        "write -P 0 512k 64k",  # written zeros (a data cluster of zeros)
        "write -P 2 1M 4k",  # 4 KiB of data, the rest of the cluster zeros
        "write -P 0 1536k 4k",
        "write -P 3 1540k 60k",  # a zero 4 KiB block, then data
        "write -c -P 4 3M 64k",  # a compressed cluster past the base's end
        "write -P 5 3200k 1k",
    )
    qemu.img("create", "-q", "-f", "qcow2", d / "base2.qcow2", "3M")
    qemu.io(d / "base2.qcow2", "write -P 9 0 3M")
    qemu.img("create", "-q", "-f", "raw", d / "sparse.raw", "3M")
    qemu.io(
        d / "sparse.raw",
        "write -P 1 8k 4k",
        "write -P 0 64k 64k",
        "write -P 5 200k 1k",
        "write -P 6 1M 300k",
        fmt="raw",
    )
    # A raw file whose size is not a multiple of 512 (the target is rounded up).
    (d / "odd.raw").write_bytes(b"\x11" * 5000)
    qemu.img(
        "create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", d / "v2.qcow2", "1M"
    )
    qemu.io(d / "v2.qcow2", "write -P 6 0 1536", "write -P 0 4k 4k", "write -P 7 600k 8k")
    qemu.img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", d / "ext.qcow2", "2M")
    qemu.io(d / "ext.qcow2", "write -P 3 4k 4k", "write -z 64k 128k", "write -P 4 1M 70k")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, qemu_tools: dict[str, str]) -> Path:
    d = tmp_path_factory.mktemp("convert-src")
    _build_sources(Qemu(qemu_tools["qemu-img"], qemu_tools["qemu-io"], d), d)
    return d


def _ours(args: list[str], cwd: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(["convert", *args])
    finally:
        os.chdir(old)
    return rc, out.getvalue(), err.getvalue().replace("qcow2aio:", "PROG:")


def _theirs(qemu: Qemu, args: list[str], cwd: Path) -> tuple[int, str, str]:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        proc = qemu.img("convert", *args, check=False)
    finally:
        os.chdir(old)
    return proc.returncode, proc.stdout, proc.stderr.replace("qemu-img:", "PROG:")


def _layout(qemu: Qemu, path: Path, fmt: str) -> list[dict[str, object]]:
    """``qemu-img map`` records without host offsets (they depend on allocation order)."""
    proc = qemu.img("map", "--output=json", "-f", fmt, path)
    merged: list[dict[str, object]] = []
    for rec in json.loads(proc.stdout):
        rec.pop("offset", None)
        last = merged[-1] if merged else None
        if last is not None and {**last, "start": 0, "length": 0} == {
            **rec,
            "start": 0,
            "length": 0,
        }:
            last["length"] = int(str(last["length"])) + rec["length"]
        else:
            merged.append(rec)
    return merged


def _differential(
    qemu: Qemu, sources: Path, tmp_path: Path, args: list[str], out_fmt: str, prefill: str = ""
) -> None:
    """Run ``convert ARGS DST`` with both tools (in copies of the sources) and compare."""
    results = []
    for who in ("ours", "qemu"):
        d = tmp_path / who
        d.mkdir()
        for f in sources.iterdir():
            os.link(f, d / f.name)  # read-only sources: hard links are enough
        if prefill:
            fmt, size, opts = prefill.split(":")
            qemu.img("create", "-q", "-f", fmt, *(["-o", opts] if opts else []), d / "dst", size)
            qemu.io(d / "dst", "write -P 0x55 0 " + size, fmt=fmt)
        run = _ours([*args, "dst"], d) if who == "ours" else _theirs(qemu, [*args, "dst"], d)
        results.append(run)
    ours, theirs = results
    assert ours[0] == theirs[0], (ours, theirs)
    assert ours[1] == theirs[1], (ours, theirs)
    assert ours[2] == theirs[2], (ours, theirs)
    if theirs[0] != 0:
        return
    a, b = tmp_path / "ours" / "dst", tmp_path / "qemu" / "dst"
    cmp = qemu.img("compare", "-f", out_fmt, "-F", out_fmt, a, b, check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert _layout(qemu, a, out_fmt) == _layout(qemu, b, out_fmt)
    if out_fmt == "qcow2":
        rc, report = qemu.check(a)
        assert rc == 0 and not report.get("corruptions") and not report.get("leaks"), report
        assert qemu.info(a).get("backing-filename") == qemu.info(b).get("backing-filename")


QUICK = [
    ("-O qcow2 top.qcow2", "qcow2"),
    ("-O raw top.qcow2", "raw"),
    ("top.qcow2", "raw"),  # qemu-img's default output format is raw
    ("-O qcow2 -S 0 top.qcow2", "qcow2"),
    ("-O qcow2 -c top.qcow2", "qcow2"),
    ("-O qcow2 -c -o compression_type=zstd top.qcow2", "qcow2"),
    ("-O qcow2 -o compat=0.10,cluster_size=512 top.qcow2", "qcow2"),
    ("-O qcow2 -o extended_l2=on sparse.raw", "qcow2"),
    ("-f raw -O raw sparse.raw", "raw"),
    ("-O qcow2 -B base2.qcow2 -F qcow2 top.qcow2", "qcow2"),
    ("-O qcow2 -o compat=0.10 -B base2.qcow2 -F qcow2 v2.qcow2", "qcow2"),
    ("-O qcow2 top.qcow2 odd.raw sparse.raw v2.qcow2 ext.qcow2", "qcow2"),
    ("-O qcow2 -W -m 2 -o cluster_size=4k top.qcow2", "qcow2"),
    ("-O qcow2 -o preallocation=metadata top.qcow2", "qcow2"),
    ("-O raw -o preallocation=full sparse.raw", "raw"),
    ("-O raw -S 6k top.qcow2", "raw"),  # QEMU's run-based zero scan, not units
    ("-O qcow2 -S 4M top.qcow2", "qcow2"),  # -S above the 2 MiB chunk
]


@pytest.mark.parametrize(("args", "out_fmt"), QUICK, ids=[a for a, _ in QUICK])
def test_convert_like_qemu_img(
    qemu: Qemu, sources: Path, tmp_path: Path, args: str, out_fmt: str
) -> None:
    _differential(qemu, sources, tmp_path, args.split(), out_fmt)


EXISTING = [
    ("-n -O qcow2 top.qcow2", "qcow2", "qcow2:4M:"),
    ("-n -O qcow2 top.qcow2", "qcow2", "qcow2:4M:compat=0.10"),
    ("-n -O raw top.qcow2", "raw", "raw:4M:"),
    ("-n -O qcow2 -c sparse.raw", "qcow2", "qcow2:4M:"),
    ("-n -O qcow2 top.qcow2", "qcow2", "qcow2:2M:"),  # smaller: refused
]


@pytest.mark.parametrize(
    ("args", "out_fmt", "prefill"), EXISTING, ids=[f"{a} {p}" for a, _, p in EXISTING]
)
def test_convert_into_existing_like_qemu_img(
    qemu: Qemu, sources: Path, tmp_path: Path, args: str, out_fmt: str, prefill: str
) -> None:
    """``-n``: zero ranges must be written (zero clusters on v3, discarded clusters on
    v2 without a backing file, holes in raw) over the old data."""
    _differential(qemu, sources, tmp_path, args.split(), out_fmt, prefill)


ERRORS = [
    "-O bogus top.qcow2",
    "-f bogus top.qcow2",
    "-O raw -c top.qcow2",
    "-O qcow2 -B base2.qcow2 top.qcow2",
    "-O raw -B base2.qcow2 -F qcow2 top.qcow2",
    "-O raw -o cluster_size=4k top.qcow2",
    "-O qcow2 -o foo=1 top.qcow2",
    "-O qcow2 -F qcow2 top.qcow2",
    "-O qcow2 nonexist.qcow2",
    "-m 0 top.qcow2",
    "-m 17 top.qcow2",
    "-S x top.qcow2",
    "-S 1023 top.qcow2",
    "-n -O qcow2 -o cluster_size=4k top.qcow2",
    "-n -O qcow2 top.qcow2 nonexist.qcow2",
    "-O qcow2 -o compat=0.9 top.qcow2",
    "-O raw -o preallocation=metadata top.qcow2",
    "-O raw -o preallocation=bogus top.qcow2",
]


@pytest.mark.parametrize("args", ERRORS)
def test_convert_errors_like_qemu_img(qemu: Qemu, sources: Path, tmp_path: Path, args: str) -> None:
    _differential(qemu, sources, tmp_path, args.split(), "qcow2")
    assert not (tmp_path / "ours" / "dst").exists() or "-n" in args


def test_convert_errors_without_file_names(qemu: Qemu, tmp_path: Path) -> None:
    for args in ([], ["top.qcow2"]):
        assert _ours(args, tmp_path) == _theirs(qemu, args, tmp_path)


def test_create_errors_name_the_target(qemu: Qemu, sources: Path, tmp_path: Path) -> None:
    """A bad -o value fails in the target's creation, prefixed as qemu-img does (our
    message then names the field and value, as ``qcow2aio create`` does)."""
    for opts in ("cluster_size=3", "compat=0.10,refcount_bits=8"):
        args = ["-O", "qcow2", "-o", opts, str(sources / "top.qcow2"), "dst"]
        ours, theirs = _ours(args, tmp_path), _theirs(qemu, args, tmp_path)
        assert ours[0] == theirs[0] == 1
        head = re.sub(r" \(use version=.*\)$", "", theirs[2].strip())
        assert ours[2].startswith(head), (ours, theirs)


def test_progress_records(qemu: Qemu, sources: Path, tmp_path: Path) -> None:
    """``-p``: qemu-img's records, rising, from 0.00 to 100.00 twice and a newline."""
    rc, out, err = _ours(["-p", "-O", "qcow2", str(sources / "top.qcow2"), "dst"], tmp_path)
    theirs = _theirs(qemu, ["-p", "-O", "qcow2", str(sources / "top.qcow2"), "dst2"], tmp_path)
    assert rc == theirs[0] == 0 and err == theirs[2] == ""
    assert out.endswith("\r\n")
    for text in (out, theirs[1]):  # (qemu's "\r" came through universal newlines)
        records = re.split(r"[\r\n]+", text.strip("\r\n"))
        assert records[0] == "    (0.00/100%)"
        assert records[-2:] == ["    (100.00/100%)"] * 2
        figures = [float(r.strip()[1:].split("/")[0]) for r in records]
        assert figures == sorted(figures)
    quiet = _ours(["-p", "-q", "-O", "qcow2", str(sources / "top.qcow2"), "dst3"], tmp_path)
    assert quiet == (0, "", "")


def test_api_progress_and_content(qemu: Qemu, sources: Path, tmp_path: Path) -> None:
    """The coroutine: progress never goes back and ends at the target's size; the copy
    reads as the source (``qemu-img compare``)."""
    seen: list[tuple[int, int]] = []
    dst = tmp_path / "api.qcow2"
    qcow2aio.convert_sync(
        [sources / "top.qcow2", sources / "sparse.raw"],
        dst,
        source_format=["qcow2", "raw"],
        target_format="qcow2",
        options={"cluster_size": 16384},
        parallel=3,
        progress=lambda done, total: seen.append((done, total)),
    )
    total = 7 << 20
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    qemu.img(
        "convert", "-O", "raw", sources / "top.qcow2", sources / "sparse.raw", tmp_path / "ref.raw"
    )
    cmp = qemu.img("compare", "-F", "raw", dst, tmp_path / "ref.raw", check=False)
    assert cmp.returncode == 0, cmp.stdout
    assert qemu.info(dst)["cluster-size"] == 16384


def test_api_argument_errors(sources: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="coroutines"):
        qcow2aio.convert_sync(sources / "top.qcow2", tmp_path / "x", parallel=0)
    with pytest.raises(ValueError, match="sparse"):
        qcow2aio.convert_sync(sources / "top.qcow2", tmp_path / "x", min_sparse=100)
    with pytest.raises(qcow2aio.Qcow2UnsupportedError, match="Compression"):
        qcow2aio.convert_sync(sources / "top.qcow2", tmp_path / "x", compress=True)
    assert not (tmp_path / "x").exists()


def test_cancel_leaves_a_consistent_target(qemu: Qemu, tmp_path: Path) -> None:
    """Cancelled after the first chunk: the target is closed, ``qemu-img check`` finds
    no error and what was copied reads as the source."""
    src = tmp_path / "big.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", src, "32M")
    qemu.io(src, "write -P 3 0 32M")
    dst = tmp_path / "partial.qcow2"

    async def run() -> int:
        started = asyncio.Event()
        done_at: list[int] = []

        def progress(done: int, total: int) -> None:
            if done:
                done_at.append(done)
                started.set()

        task = asyncio.ensure_future(
            qcow2aio.convert(src, dst, target_format="qcow2", parallel=2, progress=progress)
        )
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return done_at[-1]

    copied = asyncio.run(run())
    assert 0 < copied < 32 << 20
    rc, report = qemu.check(dst)
    assert rc == 0 and not report.get("corruptions"), report
    qemu.io(dst, f"read -P 3 0 {copied}")


def _stress_cases() -> Iterator[tuple[str, str]]:
    for opts in (
        "cluster_size=512",
        "cluster_size=2M",
        "compat=0.10",
        "refcount_bits=1",
        "refcount_bits=64,lazy_refcounts=on",
        "extended_l2=on,cluster_size=128k",
    ):
        for src in ("top.qcow2", "sparse.raw", "v2.qcow2", "ext.qcow2"):
            yield f"-O qcow2 -o {opts} {src}", "qcow2"
            yield f"-O qcow2 -c -o {opts} {src}", "qcow2"
    for sparse in ("0", "8k", "6k", "64k", "1M", "16M"):
        for src in ("top.qcow2", "sparse.raw", "ext.qcow2"):
            yield f"-O qcow2 -S {sparse} {src}", "qcow2"
            yield f"-O raw -S {sparse} {src}", "raw"
    yield "-O qcow2 -B base2.qcow2 -F qcow2 -c top.qcow2", "qcow2"
    yield "-O qcow2 -B base.qcow2 -F qcow2 -o extended_l2=on top.qcow2", "qcow2"


# Known differences (strict: they fail the run once fixed, so the mark goes).
_KNOWN: dict[str, str] = {}


def _stress_params() -> list[object]:
    return [
        pytest.param(a, f, marks=pytest.mark.xfail(strict=True, reason=_KNOWN[a]))
        if a in _KNOWN
        else pytest.param(a, f)
        for a, f in _stress_cases()
    ]


@pytest.mark.stress_only
@pytest.mark.parametrize(("args", "out_fmt"), _stress_params())
def test_convert_grid_stress(
    qemu: Qemu, sources: Path, tmp_path: Path, args: str, out_fmt: str
) -> None:
    _differential(qemu, sources, tmp_path, args.split(), out_fmt)


SECRET = "secret,id=sec0,data=abc"


def _luks(qemu: Qemu, path: Path, fill: str) -> str:
    """A LUKS image (fast PBKDF) holding ``fill``'s writes; its --image-opts name."""
    opts = f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"
    qemu.img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        path,
        "2M",
    )
    if fill:
        qemu.io(opts, *fill.split(";"), fmt=None, extra_args=["--object", SECRET, "--image-opts"])
    return opts


def test_encrypted_like_qemu_img(qemu: Qemu, tmp_path: Path) -> None:
    """Encrypted source (``--image-opts`` with its secret), encrypted target (``-o
    encrypt.*``), ``-n --target-image-opts`` into an encrypted image, and the secret
    errors: same exit codes and messages; the copies read as the source."""
    src = _luks(qemu, tmp_path / "enc.qcow2", "write -P 3 64k 128k;write -z 512k 64k")
    plain = tmp_path / "plain.qcow2"
    args = ["--object", SECRET, "--image-opts", "-O", "qcow2", src]
    ours, theirs = _ours([*args, str(plain)], tmp_path), _theirs(qemu, [*args, "q1"], tmp_path)
    assert ours == theirs == (0, "", "")
    assert _layout(qemu, plain, "qcow2") == _layout(qemu, tmp_path / "q1", "qcow2")
    enc_opts = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
    args = ["--object", SECRET, "-O", "qcow2", "-o", enc_opts, str(plain)]
    assert _ours([*args, "e2"], tmp_path) == _theirs(qemu, [*args, "q2"], tmp_path)
    # (LUKS creation costs qemu-img ~2 s whatever the iter-time: copy the source instead.)
    shutil.copyfile(tmp_path / "enc.qcow2", tmp_path / "e3")
    new = src.replace("enc.qcow2", "e3")
    qemu.io(new, "write -P 0x55 0 2M", fmt=None, extra_args=["--object", SECRET, "--image-opts"])
    args = ["--object", SECRET, "-n", "--target-image-opts", "-O", "qcow2", str(plain), new]
    assert _ours(args, tmp_path) == (0, "", "")
    for name in ("e2", "e3"):
        opts = f"driver=qcow2,file.filename={tmp_path / name},encrypt.key-secret=sec0"
        both = ["--object", SECRET, "--image-opts", opts, f"driver=qcow2,file.filename={plain}"]
        assert "identical" in qemu.img("compare", *both).stdout
    for bad in (
        ["-O", "qcow2", "-o", "encrypt.format=luks", str(plain)],
        ["--object", SECRET, "-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=x"],
        [str(tmp_path / "enc.qcow2")],
    ):
        if bad[-1] != str(plain) and bad[-1].startswith("encrypt"):
            bad = [*bad, str(plain)]
        assert _ours([*bad, "e9"], tmp_path) == _theirs(qemu, [*bad, "e9"], tmp_path)


def test_api_open_images(qemu: Qemu, sources: Path, tmp_path: Path) -> None:
    """Open images as source and target (a service copying what it serves): they are
    left open, the target is flushed, and reads of the source go on meanwhile."""
    dst = tmp_path / "into.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", dst, "4M")

    async def run() -> None:
        src = qcow2aio.open(sources / "top.qcow2")
        tgt = qcow2aio.open(dst, "r+")
        try:
            copy = asyncio.ensure_future(qcow2aio.convert(src, tgt, parallel=2))
            while not copy.done():
                assert await src.read(1 << 20, 4096) == b"\x02" * 4096
                await asyncio.sleep(0)
            await copy
            assert await tgt.read(3 << 20, 65536) == b"\x04" * 65536
        finally:
            await tgt.aclose()
            src.close()

    asyncio.run(run())
    cmp = qemu.img("compare", dst, sources / "top.qcow2", check=False)
    assert cmp.returncode == 0, cmp.stdout
    rc, report = qemu.check(dst)
    assert rc == 0, report
