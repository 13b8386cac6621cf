"""Image.info() and the ``qcow2aio`` command line against ``qemu-img info`` / ``create``.

``img.info()`` must equal the parsed ``qemu-img info --output=json`` (same keys,
same values, same key order), ``qcow2aio info`` must print the very same text
(JSON and human), and ``qcow2aio create`` the same ``Formatting ...`` line and
file as ``qemu-img create``. Images are built with QEMU's own tools in every
flavour ``info`` distinguishes; everything runs from the images' folder so
names given on the command line are the same text for both tools.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Qemu

import qcow2aio
from qcow2aio.cli import main, parse_size
from qcow2aio.info import format_json, size_to_str

MiB = 1 << 20


def _corrupt(path: Path) -> None:
    """Set the corrupt bit (incompatible bit 1) like QEMU does when it finds corruption."""
    with open(path, "r+b") as f:
        f.seek(72)
        (incompat,) = struct.unpack(">Q", f.read(8))
        f.seek(72)
        f.write(struct.pack(">Q", incompat | 2))


# name -> builder run in the image folder; each builds (at least) NAME.
def _build(qemu: Qemu, kind: str) -> str:
    img = qemu.img
    if kind == "v2":
        img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "64M")
        return "v2.qcow2"
    if kind == "v3":
        img("create", "-q", "-f", "qcow2", "v3.qcow2", "1G")
        return "v3.qcow2"
    if kind == "odd-size-512":
        img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "odd.qcow2", "1000000")
        return "odd.qcow2"
    if kind == "backing-raw":
        with open("base.raw", "wb") as f:
            f.truncate(32 * MiB)
        img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "bk.qcow2")
        return "bk.qcow2"
    if kind == "backing-subdir":
        os.mkdir("sub")
        img("create", "-q", "-f", "qcow2", "base.qcow2", "32M")
        img("create", "-q", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", "sub/c.qcow2")
        return "sub/c.qcow2"
    if kind == "backing-absolute":
        img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "base.qcow2", "3M")
        base = os.path.abspath("base.qcow2")
        img(
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-b",
            base,
            "-F",
            "qcow2",
            "a.qcow2",
        )
        return "a.qcow2"
    if kind == "snapshots":
        img("create", "-q", "-f", "qcow2", "snap.qcow2", "64M")
        qemu.io("snap.qcow2", "write -P 1 0 64k")
        img("snapshot", "-c", "s1", "snap.qcow2")
        img("snapshot", "-c", "second snap \u00e9\u2603", "snap.qcow2")
        return "snap.qcow2"
    if kind == "snapshots-v2":
        img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "snap2.qcow2", "16M")
        img("snapshot", "-c", "only", "snap2.qcow2")
        return "snap2.qcow2"
    if kind == "data-file":
        img("create", "-q", "-f", "qcow2", "-o", "data_file=df.data", "df.qcow2", "64M")
        qemu.io("df.qcow2", "write -P 2 0 1M")
        return "df.qcow2"
    if kind == "data-file-raw":
        img(
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=r.data,data_file_raw=on",
            "r.qcow2",
            "1M",
        )
        return "r.qcow2"
    if kind == "extended-l2":
        img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "x.qcow2", "64M")
        return "x.qcow2"
    if kind == "zstd":
        img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", "z.qcow2", "64M")
        return "z.qcow2"
    if kind == "dirty":
        img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "d.qcow2", "64M")
        # abort() leaves the dirty bit set, as a crash would.
        qemu.io("d.qcow2", "write 0 64k", "abort", check=False)
        return "d.qcow2"
    if kind == "corrupt":
        img("create", "-q", "-f", "qcow2", "c.qcow2", "64M")
        _corrupt(Path("c.qcow2"))
        return "c.qcow2"
    if kind == "bitmaps":
        img("create", "-q", "-f", "qcow2", "bm.qcow2", "64M")
        img("bitmap", "--add", "bm.qcow2", "b0")
        img("bitmap", "--add", "-g", "512k", "--disable", "bm.qcow2", "b1")
        return "bm.qcow2"
    if kind == "qcow2aio-created":
        qcow2aio.create("ours.qcow2", 100 * MiB, preallocation="metadata", lazy_refcounts=True)
        return "ours.qcow2"
    raise AssertionError(kind)


KINDS = [
    "v2",
    "v3",
    "odd-size-512",
    "backing-raw",
    "backing-subdir",
    "backing-absolute",
    "snapshots",
    "snapshots-v2",
    "data-file",
    "data-file-raw",
    "extended-l2",
    "zstd",
    "dirty",
    "corrupt",
    "bitmaps",
    "qcow2aio-created",
]


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _blocks(name: str) -> int:
    return os.stat(name).st_blocks


def _key_order(value: Any) -> Any:
    """The nested key order of a JSON value (dict equality ignores order)."""
    if isinstance(value, dict):
        return [(k, _key_order(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [_key_order(v) for v in value]
    return None


@pytest.mark.parametrize("kind", KINDS)
def test_info_matches_qemu(qemu: Qemu, in_tmp: Path, kind: str) -> None:
    name = _build(qemu, kind)
    before = _blocks(name)
    text = qemu.img("info", "--output=json", name).stdout
    expected = json.loads(text)
    with qcow2aio.open(name) as img:
        info = img.info()
    if _blocks(name) != before:  # pragma: no cover - only if something rewrote the file
        expected.pop("actual-size")
        info = {k: v for k, v in info.items() if k != "actual-size"}
    assert info == expected
    assert _key_order(info) == _key_order(expected)
    assert format_json(info) + "\n" == text


def _run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("output", ["json", "human"])
@pytest.mark.parametrize("kind", KINDS)
def test_cli_info_text(
    qemu: Qemu, in_tmp: Path, capsys: pytest.CaptureFixture[str], kind: str, output: str
) -> None:
    name = _build(qemu, kind)
    expected = qemu.img("info", f"--output={output}", name).stdout
    rc, out, err = _run_cli(capsys, "info", f"--output={output}", name)
    assert (rc, err) == (0, "")
    assert out == expected


@pytest.mark.parametrize("output", ["json", "human"])
@pytest.mark.parametrize("kind", ["backing-raw", "backing-subdir", "backing-absolute", "v3"])
def test_cli_info_backing_chain(
    qemu: Qemu, in_tmp: Path, capsys: pytest.CaptureFixture[str], kind: str, output: str
) -> None:
    name = _build(qemu, kind)
    expected = qemu.img("info", "--backing-chain", f"--output={output}", name).stdout
    rc, out, _ = _run_cli(capsys, "info", "--backing-chain", f"--output={output}", name)
    assert rc == 0
    assert out == expected


def test_python_dash_m(qemu: Qemu, in_tmp: Path) -> None:
    name = _build(qemu, "snapshots")
    expected = qemu.img("info", "--output=json", name).stdout
    proc = subprocess.run(
        [sys.executable, "-m", "qcow2aio", "info", "--output=json", name],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(qcow2aio.__file__).parent.parent)},
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == expected


CLI_CREATE: list[list[str]] = [
    ["-f", "qcow2", "NAME", "1G"],
    ["-f", "qcow2", "-o", "compat=0.10,cluster_size=4k", "NAME", "1.5G"],
    [
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=true,refcount_bits=0x8",
        "-o",
        "extended_l2=on",
        "NAME",
        "100M",
    ],
    ["-f", "qcow2", "-o", "compression_type=zstd,compat=v3", "NAME", "1000000"],
    ["-f", "qcow2", "-o", "preallocation=metadata,cluster_size=512", "NAME", "3M"],
    ["-f", "qcow2", "-o", "data_file=NAME.data,data_file_raw=on", "NAME", "1M"],
    ["-f", "qcow2", "-o", "data_file=a,,b.data", "NAME", "1M"],
    ["-f", "qcow2", "-o", "size=5M,nocow=off", "NAME"],
    ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "NAME"],
    ["-f", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=raw", "NAME", "64k"],
    ["-q", "-f", "qcow2", "NAME", "0"],
]


@pytest.mark.parametrize("args", CLI_CREATE, ids=[" ".join(a) for a in CLI_CREATE])
def test_cli_create_matches_qemu(
    qemu: Qemu,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
) -> None:
    outs: list[str] = []
    for who in ("q", "p"):
        folder = tmp_path / who
        folder.mkdir()
        monkeypatch.chdir(folder)
        qemu.img("create", "-q", "-f", "qcow2", "base.qcow2", "7M")
        argv = [a.replace("NAME", "img.qcow2") for a in args]
        if who == "q":
            outs.append(qemu.img("create", *argv).stdout)
        else:
            rc, out, err = _run_cli(capsys, "create", *argv)
            assert (rc, err) == (0, "")
            outs.append(out)
    assert outs[1] == outs[0]
    assert (tmp_path / "p" / "img.qcow2").read_bytes() == (
        tmp_path / "q" / "img.qcow2"
    ).read_bytes()
    monkeypatch.chdir(tmp_path / "p")
    rc, report = qemu.check("img.qcow2")
    assert rc == 0, report


@pytest.mark.parametrize(
    "argv,printed",
    [
        (["create", "-f", "qcow2", "-o", "cluster_size=3000", "e.qcow2", "1M"], True),
        (["create", "-f", "qcow2", "-o", "refcount_bits=3", "e.qcow2", "1M"], True),
        (["create", "-f", "qcow2", "-o", "compat=2.0", "e.qcow2", "1M"], True),
        (["create", "-f", "qcow2", "-o", "lazy_refcounts=maybe", "e.qcow2", "1M"], False),
        (["create", "-f", "qcow2", "-o", "bogus=1", "e.qcow2", "1M"], False),
        (["create", "-f", "qcow2", "e.qcow2", "12Q"], False),
        (["create", "-f", "qcow2", "e.qcow2"], False),
        (["create", "-f", "qcow2", "-b", "missing.qcow2", "-F", "qcow2", "e.qcow2"], False),
        (["info", "missing.qcow2"], False),
        (["info", "--output=xml", "missing.qcow2"], False),
    ],
)
def test_cli_errors_like_qemu(
    qemu: Qemu,
    in_tmp: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    printed: bool,
) -> None:
    proc = qemu.img(*argv, check=False)
    assert proc.returncode == 1
    rc, out, err = _run_cli(capsys, *argv)
    assert rc == 1
    assert err.startswith("qcow2aio: ") and err.endswith("\n") and len(err) > 12
    # The Formatting line is printed exactly when QEMU prints it (option errors come first).
    assert out == proc.stdout
    assert bool(out) == printed
    assert not (in_tmp / "e.qcow2").exists()


def test_cli_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run_cli(capsys, "frobnicate")
    assert rc == 1
    assert err.startswith("qcow2aio: ")


@pytest.mark.parametrize(
    "text,value",
    [
        ("0", 0),
        ("512", 512),
        ("1k", 1024),
        ("1K", 1024),
        ("64k", 65536),
        ("1M", MiB),
        ("1.5G", 3 << 29),
        ("2T", 2 << 40),
        ("1E", 1 << 60),
        ("0x200", 512),
        ("100B", 100),
        ("0.5k", 512),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "k", "-1", "1.5", "1x", "0x1.5k", "16E", "1e3k"])
def test_parse_size_invalid(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    "size",
    [0, 1, 512, 1023, 1024, 1000000, 3 << 29, 1 << 30, 1023 << 20, 1000 << 20, 5 << 40, 1 << 62],
)
def test_size_to_str_like_qemu_human_info(qemu: Qemu, in_tmp: Path, size: int) -> None:
    """The "virtual size" line of qemu-img's human output uses size_to_str."""
    size = -(-size // 512) * 512
    if size > 1 << 56:
        size = 1 << 56
    qemu.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "s.qcow2", str(size))
    line = next(
        ln for ln in qemu.img("info", "s.qcow2").stdout.splitlines() if ln.startswith("virtual")
    )
    assert line == f"virtual size: {size_to_str(size)} ({size} bytes)"
