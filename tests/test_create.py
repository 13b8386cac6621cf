"""qcow2aio.create() against ``qemu-img create -f qcow2``: whole files must be identical.

Each case creates the same image twice, once with QEMU 7.2 and once with
qcow2aio, in two sibling folders (``q/`` and ``p/``) so that relative names
stored in the header (data file, backing file) are the same text while the
files themselves are distinct. Then every byte of both files (and of the
external data files) is compared, and QEMU must find our image clean and be
able to write to it and read the data back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import Qemu

import qcow2aio
from qcow2aio import Qcow2Error, Qcow2FormatError, Qcow2UnsupportedError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


def _opt_text(kwargs: dict[str, Any]) -> str:
    parts = []
    for key, value in kwargs.items():
        if key in ("backing_file", "backing_fmt") or value is None:
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append(f"{key}={value}")
    return ",".join(parts)


def _qemu_create(qemu: Qemu, name: str, size: int | None, kwargs: dict[str, Any]) -> None:
    args: list[str] = ["create", "-q", "-f", "qcow2"]
    opts = _opt_text(kwargs)
    if opts:
        args += ["-o", opts]
    if kwargs.get("backing_file") is not None:
        args += ["-b", kwargs["backing_file"]]
    if kwargs.get("backing_fmt") is not None:
        args += ["-F", kwargs["backing_fmt"]]
    args.append(name)
    if size is not None:
        args.append(str(size))
    qemu.img(*args)


def _both(
    qemu: Qemu,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    size: int | None,
    **kwargs: Any,
) -> tuple[Path, Path]:
    """Create ``name`` with QEMU in q/ and with qcow2aio in p/ (each run from its folder)."""
    qdir, pdir = tmp_path / "q", tmp_path / "p"
    for d in (qdir, pdir):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(qdir)
    _qemu_create(qemu, name, size, kwargs)
    monkeypatch.chdir(pdir)
    qcow2aio.create(name, size, **kwargs)
    # Stay in p/: QEMU 7.2 opens a relative data-file name from the current directory.
    return qdir / name, pdir / name


def _assert_same_file(theirs: Path, ours: Path) -> None:
    a, b = theirs.read_bytes(), ours.read_bytes()
    assert len(a) == len(b), f"{ours.name}: length {len(b):#x}, QEMU wrote {len(a):#x}"
    if a != b:
        first = next(i for i in range(len(a)) if a[i] != b[i])
        pytest.fail(
            f"{ours.name}: first difference at {first:#x}: "
            f"QEMU {a[first : first + 16].hex()} / ours {b[first : first + 16].hex()}"
        )


def _assert_usable(qemu: Qemu, path: Path, size: int) -> None:
    """qemu-img check is clean (exit 0) and qemu-io can write and read back."""
    rc, report = qemu.check(path)
    assert rc == 0, report
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    n = min(64 * KiB, size // 512 * 512)
    if n:
        qemu.io(path, f"write -P 0x61 0 {n}", f"read -P 0x61 0 {n}")
        rc, report = qemu.check(path)
        assert rc == 0, report


def _round512(size: int) -> int:
    return -(-size // 512) * 512


# compat, cluster_size, refcount_bits, size, lazy_refcounts, compression_type, extended_l2
GRID: list[tuple[str, int, int, int, bool, str, bool]] = [
    ("0.10", 512, 16, 0, False, "zlib", False),
    ("0.10", 512, 16, 1 * GiB, False, "zlib", False),  # refblocks placed after the L1
    ("0.10", 4096, 16, 1_000_000, False, "zlib", False),
    ("0.10", 65536, 16, 1 * GiB, False, "zlib", False),  # L1 written with 16 bytes
    ("0.10", 2 * MiB, 16, 64 * TiB, False, "zlib", False),
    ("v2", 65536, 16, 511, False, "zlib", False),  # alias, size rounded up to 512
    ("1.1", 512, 1, 8 * GiB, False, "zlib", False),
    ("1.1", 512, 2, 1 * GiB, False, "zlib", False),
    ("1.1", 512, 4, 100 * MiB, True, "zlib", False),
    ("1.1", 512, 8, 2 * GiB, False, "zstd", False),
    ("1.1", 512, 32, 1 * GiB, False, "zlib", False),
    ("1.1", 512, 64, 8 * GiB, False, "zlib", False),  # refcount table must grow
    ("1.1", 1024, 64, 1 * GiB, False, "zlib", False),
    ("1.1", 4096, 16, 1 * MiB, False, "zlib", False),  # no feature table (<= 4k clusters)
    ("1.1", 4096, 2, 1 * TiB, False, "zlib", False),
    ("1.1", 8192, 16, 0, False, "zlib", False),  # feature table again (> 4k)
    ("1.1", 16384, 16, 1 * GiB, False, "zlib", True),
    ("1.1", 16384, 64, 64 * TiB, False, "zstd", True),
    ("1.1", 32768, 16, 12345, True, "zlib", False),
    ("1.1", 65536, 16, 0, False, "zlib", False),
    ("1.1", 65536, 16, 1 * GiB, False, "zlib", False),
    ("1.1", 65536, 1, 4 * TiB, False, "zlib", False),
    ("1.1", 65536, 4, 64 * TiB, True, "zstd", False),
    ("1.1", 65536, 8, 1_000_000, False, "zstd", True),
    ("1.1", 65536, 32, 1 * GiB, True, "zlib", True),
    ("1.1", 65536, 64, 64 * TiB, False, "zlib", True),
    ("v3", 131072, 16, 3 * GiB + 512, False, "zlib", False),
    ("1.1", 262144, 8, 1 * TiB, True, "zstd", False),
    ("1.1", 1 * MiB, 16, 5 * GiB, False, "zlib", True),
    ("1.1", 2 * MiB, 64, 1 * TiB, True, "zstd", True),
    ("1.1", 2 * MiB, 1, 0, False, "zlib", False),
]


@pytest.mark.parametrize(
    "compat,cluster_size,refcount_bits,size,lazy,ctype,extl2",
    GRID,
    ids=[
        f"{c}-{cs}-rb{rb}-{s}{'-lazy' if lz else ''}{'-zstd' if ct == 'zstd' else ''}"
        f"{'-extl2' if x else ''}"
        for c, cs, rb, s, lz, ct, x in GRID
    ],
)
def test_create_grid(
    qemu: Qemu,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    compat: str,
    cluster_size: int,
    refcount_bits: int,
    size: int,
    lazy: bool,
    ctype: str,
    extl2: bool,
) -> None:
    theirs, ours = _both(
        qemu,
        tmp_path,
        monkeypatch,
        "img.qcow2",
        size,
        compat=compat,
        cluster_size=cluster_size,
        refcount_bits=refcount_bits,
        lazy_refcounts=lazy,
        compression_type=ctype,
        extended_l2=extl2,
    )
    _assert_same_file(theirs, ours)
    _assert_usable(qemu, ours, _round512(size))


PREALLOC: list[tuple[str, int, dict[str, Any]]] = [
    ("metadata", 0, {}),
    ("metadata", 12345, {}),  # COW of the tail of the last cluster
    ("metadata", 1_000_000, {"extended_l2": True}),  # tail COW up to the subcluster only
    ("metadata", 64 * MiB, {"lazy_refcounts": True}),
    ("metadata", 3 * MiB, {"cluster_size": 512, "refcount_bits": 1}),
    ("metadata", 2 * MiB, {"cluster_size": 512, "refcount_bits": 64}),  # reftable grows
    ("metadata", 5 * MiB, {"cluster_size": 2 * MiB}),
    ("metadata", 1 * MiB, {"compat": "0.10"}),
    ("falloc", 0, {}),
    ("falloc", 1_000_000, {}),
    ("falloc", 1 * MiB, {"cluster_size": 512, "refcount_bits": 64}),
    ("falloc", 1 * MiB, {"extended_l2": True}),
    ("full", 12345, {}),
    ("full", 3 * MiB, {"cluster_size": 512, "refcount_bits": 1}),
    ("full", 5 * MiB, {"cluster_size": 2 * MiB, "compat": "0.10"}),
]


@pytest.mark.parametrize(
    "mode,size,extra",
    PREALLOC,
    ids=[f"{m}-{s}-{'-'.join(f'{k}={v}' for k, v in e.items())}" for m, s, e in PREALLOC],
)
def test_create_preallocation(
    qemu: Qemu,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    size: int,
    extra: dict[str, Any],
) -> None:
    theirs, ours = _both(qemu, tmp_path, monkeypatch, "pa.qcow2", size, preallocation=mode, **extra)
    # Identical bytes even for falloc/full: the data area reads as zeros either way
    # (posix_fallocate or written zeros, as file-posix does).
    _assert_same_file(theirs, ours)
    _assert_usable(qemu, ours, _round512(size))
    if size:
        extents = json.loads(qemu.img("map", "--output=json", "-f", "qcow2", ours).stdout)
        assert sum(e["length"] for e in extents) == _round512(size)
        if extra.get("extended_l2"):
            # QEMU preallocates clusters but leaves the subcluster bitmaps empty, so
            # only what qemu-io wrote (the first 64k) reads as data.
            assert [e["start"] for e in extents if e["data"]] == [0], extents
        else:
            # Every guest cluster is mapped to a host cluster: all of the disk is data.
            assert all(e["data"] for e in extents), extents


DATA_FILE: list[tuple[str, int, dict[str, Any]]] = [
    ("off", 0, {}),
    ("off", 1_000_000, {}),  # data file truncated to the (rounded) size
    ("off", 1 * MiB, {"data_file_raw": True}),  # raw implies metadata preallocation
    ("metadata", 12345, {}),
    ("metadata", 1_000_000, {"extended_l2": True}),
    ("metadata", 1_000_000, {"cluster_size": 512, "lazy_refcounts": True}),
    ("falloc", 1 * MiB, {"data_file_raw": True}),
    ("full", 1_000_000, {}),
    ("full", 2 * MiB, {"data_file_raw": True, "cluster_size": 4096}),
]


@pytest.mark.parametrize(
    "mode,size,extra",
    DATA_FILE,
    ids=[f"{m}-{s}-{'-'.join(f'{k}={v}' for k, v in e.items())}" for m, s, e in DATA_FILE],
)
def test_create_data_file(
    qemu: Qemu,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    size: int,
    extra: dict[str, Any],
) -> None:
    theirs, ours = _both(
        qemu,
        tmp_path,
        monkeypatch,
        "df.qcow2",
        size,
        data_file="df.data",
        preallocation=mode,
        **extra,
    )
    _assert_same_file(theirs, ours)
    _assert_same_file(tmp_path / "q" / "df.data", tmp_path / "p" / "df.data")
    _assert_usable(qemu, ours, _round512(size))


def test_create_data_file_absolute_name(qemu: Qemu, tmp_path: Path) -> None:
    """An absolute data file name is stored as given (same text for both images)."""
    data = tmp_path / "abs.data"
    qemu.img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", tmp_path / "q.qcow2", "1M")
    os.rename(data, tmp_path / "q.data")
    qcow2aio.create(tmp_path / "p.qcow2", MiB, data_file=data)
    _assert_same_file(tmp_path / "q.qcow2", tmp_path / "p.qcow2")
    assert data.stat().st_size == MiB
    _assert_usable(qemu, tmp_path / "p.qcow2", MiB)


@pytest.fixture
def bases(tmp_path: Path, qemu: Qemu) -> None:
    """The same backing files in q/ and p/: a qcow2 (v3 and v2) and an odd-sized raw file."""
    payload = bytes(range(256)) * 4 + b"tail"
    for d in ("q", "p"):
        (tmp_path / d / "sub").mkdir(parents=True)
        qemu.img("create", "-q", "-f", "qcow2", tmp_path / d / "base.qcow2", "10M")
        qemu.img(
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            tmp_path / d / "base2.qcow2",
            "3000000",
        )
        (tmp_path / d / "base.raw").write_bytes(payload)  # 1028 bytes: size rounds up to 1536


BACKING: list[tuple[str, int | None, dict[str, Any]]] = [
    ("b.qcow2", None, {"backing_file": "base.qcow2", "backing_fmt": "qcow2"}),
    ("b.qcow2", 1 * GiB, {"backing_file": "base.qcow2", "backing_fmt": "qcow2"}),
    ("b.qcow2", None, {"backing_file": "base.raw", "backing_fmt": "raw"}),
    ("b.qcow2", None, {"backing_file": "base.qcow2", "backing_fmt": "raw"}),
    ("b.qcow2", None, {"backing_file": "base2.qcow2", "backing_fmt": "qcow2", "compat": "0.10"}),
    ("b.qcow2", None, {"backing_file": "base2.qcow2", "backing_fmt": "qcow2", "cluster_size": 512}),
    (
        "b.qcow2",
        None,
        {"backing_file": "./base.qcow2", "backing_fmt": "qcow2", "cluster_size": 4096},
    ),
    ("sub/b.qcow2", None, {"backing_file": "../base.qcow2", "backing_fmt": "qcow2"}),
    (
        "b.qcow2",
        None,
        {
            "backing_file": "base2.qcow2",
            "backing_fmt": "qcow2",
            "preallocation": "metadata",
            "extended_l2": True,
        },
    ),
    (
        "b.qcow2",
        None,
        {"backing_file": "base.qcow2", "backing_fmt": "qcow2", "data_file": "b.data"},
    ),
]


@pytest.mark.parametrize(
    "name,size,kwargs",
    BACKING,
    ids=[f"{n}-{s}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, s, kw in BACKING],
)
def test_create_backing(
    qemu: Qemu,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bases: None,
    name: str,
    size: int | None,
    kwargs: dict[str, Any],
) -> None:
    theirs, ours = _both(qemu, tmp_path, monkeypatch, name, size, **kwargs)
    _assert_same_file(theirs, ours)
    with qcow2aio.open(ours) as img:
        assert img.meta.header.backing_file == kwargs["backing_file"]
        vsize = img.size
        if size is None:
            base = img.backing
            assert base is not None
            assert vsize == _round512(base.size)
    _assert_usable(qemu, ours, vsize)


def test_create_backing_absolute_name(qemu: Qemu, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", base, "4M")
    qemu.img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", tmp_path / "q.qcow2")
    qcow2aio.create(tmp_path / "p.qcow2", None, backing_file=str(base), backing_fmt="qcow2")
    _assert_same_file(tmp_path / "q.qcow2", tmp_path / "p.qcow2")
    _assert_usable(qemu, tmp_path / "p.qcow2", 4 * MiB)


def test_create_truncates_existing_file(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    path.write_bytes(b"\xff" * (3 * MiB))
    qcow2aio.create(path, 1 * GiB)
    qemu.img("create", "-q", "-f", "qcow2", tmp_path / "q.qcow2", "1G")
    _assert_same_file(tmp_path / "q.qcow2", path)


# kwargs, size, expected exception, words the message must contain
INVALID: list[tuple[dict[str, Any], int | None, type[Qcow2Error], tuple[str, ...]]] = [
    ({"cluster_size": 3000}, MiB, Qcow2FormatError, ("cluster_size", "3000")),
    ({"cluster_size": 256}, MiB, Qcow2FormatError, ("cluster_size", "256")),
    ({"cluster_size": 4 * MiB}, MiB, Qcow2FormatError, ("cluster_size", "4194304")),
    ({"refcount_bits": 3}, MiB, Qcow2FormatError, ("refcount_bits", "3")),
    ({"refcount_bits": 128}, MiB, Qcow2FormatError, ("refcount_bits", "128")),
    ({"refcount_bits": 8, "compat": "0.10"}, MiB, Qcow2FormatError, ("refcount_bits", "8")),
    ({"compat": "1.2"}, MiB, Qcow2FormatError, ("compat", "1.2")),
    ({"lazy_refcounts": True, "compat": "0.10"}, MiB, Qcow2FormatError, ("lazy_refcounts",)),
    ({"compression_type": "zstd", "compat": "0.10"}, MiB, Qcow2FormatError, ("zstd",)),
    ({"compression_type": "lz4"}, MiB, Qcow2UnsupportedError, ("compression_type", "lz4")),
    ({"extended_l2": True, "compat": "0.10"}, MiB, Qcow2FormatError, ("extended_l2",)),
    ({"extended_l2": True, "cluster_size": 8192}, MiB, Qcow2FormatError, ("8192",)),
    ({"data_file_raw": True}, MiB, Qcow2FormatError, ("data_file_raw",)),
    ({"data_file": "x.data", "compat": "0.10"}, MiB, Qcow2FormatError, ("data_file", "x.data")),
    ({"preallocation": "sparse"}, MiB, Qcow2FormatError, ("preallocation", "sparse")),
    ({"backing_fmt": "qcow2"}, MiB, Qcow2FormatError, ("backing_fmt", "qcow2")),
    ({"backing_file": "base.qcow2"}, MiB, Qcow2FormatError, ("backing format",)),
    (
        {"backing_file": "base.qcow2", "backing_fmt": "qcow2", "preallocation": "metadata"},
        MiB,
        Qcow2FormatError,
        ("preallocation", "extended_l2"),
    ),
    (
        {
            "backing_file": "base.qcow2",
            "backing_fmt": "qcow2",
            "data_file": "d",
            "data_file_raw": True,
        },
        MiB,
        Qcow2FormatError,
        ("data-file-raw", "base.qcow2"),
    ),
    ({"cluster_size": 512}, 1 * TiB, Qcow2FormatError, ("too large", "cluster_size")),
    ({}, None, Qcow2FormatError, ("size",)),
]


@pytest.mark.parametrize(
    "kwargs,size,exc,words", INVALID, ids=[str(i) for i in range(len(INVALID))]
)
def test_create_invalid_like_qemu(
    qemu: Qemu,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kwargs: dict[str, Any],
    size: int | None,
    exc: type[Qcow2Error],
    words: tuple[str, ...],
) -> None:
    monkeypatch.chdir(tmp_path)
    qemu.img("create", "-q", "-f", "qcow2", "base.qcow2", "1M")
    # QEMU refuses the same options...
    args: list[str] = ["create", "-q", "-f", "qcow2"]
    if _opt_text(kwargs):
        args += ["-o", _opt_text(kwargs)]
    if "backing_file" in kwargs:
        args += ["-b", kwargs["backing_file"]]
    if "backing_fmt" in kwargs:
        args += ["-o", f"backing_fmt={kwargs['backing_fmt']}"]
    args.append("q.qcow2")
    if size is not None:
        args.append(str(size))
    assert qemu.img(*args, check=False).returncode == 1
    # ... and so do we, with a message naming the option and value, touching nothing.
    with pytest.raises(exc) as info:
        qcow2aio.create("p.qcow2", size, **kwargs)
    for word in words:
        assert word in str(info.value)
    assert not (tmp_path / "p.qcow2").exists()
    assert not (tmp_path / "d").exists()


def test_create_backing_missing(tmp_path: Path) -> None:
    with pytest.raises(Qcow2Error):
        qcow2aio.create(tmp_path / "x.qcow2", None, backing_file="nope.qcow2", backing_fmt="qcow2")
    assert not (tmp_path / "x.qcow2").exists()


@pytest.mark.parametrize("flag", ["lazy_refcounts", "extended_l2", "data_file_raw"])
def test_create_refuses_non_bool_flags(tmp_path: Path, flag: str) -> None:
    # "off" is truthy: a string must not silently turn a feature on.
    with pytest.raises(Qcow2FormatError, match=flag):
        qcow2aio.create(tmp_path / "x.qcow2", MiB, **{flag: "off"})
    assert not (tmp_path / "x.qcow2").exists()
