"""``qcow2aio map`` and ``Image.map`` against ``qemu-img map`` 7.2, text for text.

Each case builds an image chain with qemu-img / qemu-io (so the layout is QEMU's),
then runs both tools with the same arguments in the same folder: same exit code, same
stdout, same stderr after the program-name prefix (qemu-img splits one long message
over two prefixed lines). ``Image.map`` must return exactly the JSON records.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Qemu
from sim import stress

import qcow2aio
from qcow2aio.blockstatus import block_status
from qcow2aio.cli import main

SECRET = "secret,id=s0,data=pw"


def _chain(qemu: Qemu, opts: str) -> str:
    """base (opts) <- top (6M > base's 4M), nested in a folder: every kind of run."""
    qemu.img("create", "-q", "-f", "qcow2", "-o", opts, "base.qcow2", "4M")
    qemu.io(
        "base.qcow2",
        "write -P 1 0 64k",
        "write -z 128k 64k",
        "write -c -P 3 256k 64k",
        "write -c -P 4 320k 64k",
        "write -P 5 1M 8k",
    )
    os.mkdir("nest")
    qemu.img(
        "create", "-q", "-f", "qcow2", "-o", opts, "-b", "../base.qcow2", "-F", "qcow2",
        "nest/top.qcow2", "6M",
    )  # fmt: skip
    qemu.io(
        "nest/top.qcow2",
        "write -P 2 32k 64k",
        "write -z 1M 4k",
        "discard 0 64k",
        "write -P 6 5M 64k",
        "write -P 7 2M 12k",
        "write -z 2M 4k",
    )
    return "nest/top.qcow2"


def _raw_backed(qemu: Qemu, opts: str) -> str:
    qemu.img("create", "-q", "-f", "raw", "r.raw", "1M")
    qemu.io("r.raw", "write -P 1 64k 4k", "write -P 2 512k 128k", fmt="raw")
    qemu.img(
        "create", "-q", "-f", "qcow2", "-o", opts, "-b", "r.raw", "-F", "raw", "t.qcow2", "2M"
    )  # fmt: skip
    qemu.io("t.qcow2", "write -P 3 600k 8k", "write -z 100k 4k")
    return "t.qcow2"


def _preallocated(qemu: Qemu, opts: str) -> str:
    qemu.img("create", "-q", "-f", "qcow2", "-o", f"{opts},preallocation=metadata", "p.qcow2", "1M")
    qemu.io("p.qcow2", "write -P 1 0 128k", "write -z 0 64k", "write -z -u 192k 64k")
    return "p.qcow2"


def _data_file(qemu: Qemu, opts: str) -> str:
    qemu.img("create", "-q", "-f", "qcow2", "-o", f"{opts},data_file=d.raw", "df.qcow2", "1M")
    qemu.io("df.qcow2", "write -P 1 64k 128k", "write -z 512k 64k")
    return "df.qcow2"


BUILDERS: dict[str, Callable[[Qemu, str], str]] = {
    "chain": _chain,
    "raw_backing": _raw_backed,
    "prealloc": _preallocated,
    "data_file": _data_file,
}
OPTS = {
    "v3": "compat=1.1",
    "v2_c512": "compat=0.10,cluster_size=512",
    "ext_l2": "extended_l2=on,cluster_size=64k",
    "c4k_r1": "cluster_size=4k,refcount_bits=1",
}
ARGS: list[list[str]] = [
    [],
    ["--output=json"],
    ["--output=json", "--start-offset=65536", "--max-length=100000"],
    ["--start-offset=1M", "--max-length=1"],
    ["--output=json", "--start-offset=1G"],
    ["-f", "raw", "--output=json"],
]


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _same(qemu: Qemu, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    want = qemu.img("map", *argv, check=False)
    rc = main(["map", *argv])
    out, err = capsys.readouterr()
    assert (rc, out) == (want.returncode, want.stdout), argv
    qemu_err = " ".join(line.removeprefix("qemu-img: ") for line in want.stderr.splitlines())
    ours = " ".join(line.removeprefix("qcow2aio: ") for line in err.splitlines())
    assert ours == qemu_err, argv
    return out


# The quick set: each builder once, each option set once; the whole grid and every
# argument list with QCOW2AIO_STRESS=1.
QUICK = {("chain", "v3"), ("chain", "ext_l2"), ("raw_backing", "v2_c512"),
         ("prealloc", "c4k_r1"), ("data_file", "v3")}  # fmt: skip
GRID = [
    (b, o)
    for b in BUILDERS
    for o in OPTS
    if (b, o) in QUICK or stress()
    if not (b == "data_file" and o.startswith("v2"))  # a data file needs compat=1.1
]


@pytest.mark.parametrize(("build", "opts"), GRID)
def test_map_matches_qemu_img(
    qemu: Qemu, in_tmp: Path, capsys: pytest.CaptureFixture[str], build: str, opts: str
) -> None:
    name = BUILDERS[build](qemu, OPTS[opts])
    for argv in ARGS if stress() else ARGS[:1] + ARGS[2:4]:
        _same(qemu, capsys, *argv, name)
    records = json.loads(_same(qemu, capsys, "--output=json", name))
    with qcow2aio.open(name) as img:
        assert img.map_sync() == records
        assert asyncio.run(img.map()) == records
        # Any window agrees with the whole, cut to the window.
        part = [st.record() for st in block_status(img, 70_000, 300_000)]
        assert part[0]["start"] == 70_000
        assert sum(r["length"] for r in part) == 300_000


def test_map_encrypted_and_errors(
    qemu: Qemu, in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    qemu.img(
        "create", "-q", "-f", "qcow2", "--object", SECRET, "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "e.qcow2", "1M",
    )  # fmt: skip
    opts = "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=s0"
    qemu.io(opts, "write -P 1 64k 64k", fmt=None, extra_args=["--object", SECRET, "--image-opts"])
    for mode in ([], ["--output=json"]):
        _same(qemu, capsys, "--object", SECRET, "--image-opts", *mode, opts)
    _same(qemu, capsys, "e.qcow2")  # no secret: refused as qemu-img refuses it
    _same(qemu, capsys, "missing.qcow2")
    _same(qemu, capsys, "--output=xml", "e.qcow2")
    _same(qemu, capsys, "--start-offset=-1", "e.qcow2")
    _same(qemu, capsys, "--max-length=x", "e.qcow2")


def test_map_of_a_huge_sparse_image_is_one_step_per_empty_l2(
    qemu: Qemu, in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    qemu.img("create", "-q", "-f", "qcow2", "big.qcow2", "64T")
    qemu.io("big.qcow2", "write -P 1 1T 64k", "write -P 1 40T 1M")
    _same(qemu, capsys, "--output=json", "big.qcow2")
    _same(qemu, capsys, "big.qcow2")
