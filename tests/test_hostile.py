"""Hostile images: every bad field is refused with a Qcow2Error that names it.

Each case of ``CASES`` starts from a small valid image made by ``qemu-img``/``qemu-io``
and pokes fields (header, extensions, snapshot table, L1/L2 entries, compressed
data). For every case the test

1. asks QEMU 7.2 for its verdict (``qemu-img info``, then ``qemu-io -r`` reading the
   start of the disk, plus a read-write open or a snapshot load where the case needs
   it) and checks that it is the one recorded in the table;
2. opens the image with qcow2aio and reads the whole disk (``read_sync`` and
   ``await read``), under a hang guard (``SIGALRM``) and memory guards (peak Python
   allocation by ``tracemalloc`` and peak RSS growth, each below 64 MiB): the result
   must be the recorded one, an exception of the recorded
   :class:`qcow2aio.Qcow2Error` subclass whose message holds the recorded text (the
   field and its value), or success;
3. where both accept the image, checks that qcow2aio returns the bytes of
   ``qemu-img convert -O raw``.

We accept what QEMU accepts. Where our verdict differs, ``why`` says why (only
reads that would otherwise be unsafe or return wrong data are refused early).
Then come truncated files and a seeded hypothesis fuzz of random pokes: anything
but success or a ``Qcow2Error`` fails.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from conftest import run_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcow2aio
from qcow2aio import constants as C
from qcow2aio.errors import (
    Qcow2CorruptError,
    Qcow2Error,
    Qcow2FormatError,
    Qcow2IOError,
    Qcow2UnsupportedError,
)
from qcow2aio.snapshot import validate_snapshot_l1

KiB = 1024
MiB = 1024 * KiB

MEM_LIMIT = 64 * MiB  # peak memory growth of one open + full read
ALARM_SECONDS = 5  # one open + full read; a hang fails the test instead of stalling
READ_CHUNK = 1 * MiB
READ_LIMIT = 64 * MiB  # read at most this much of the virtual disk (plus its last chunk)
QEMU_TIMEOUT = 60.0
QEMU_HANG_TIMEOUT = 1.5  # qemu-io runs this long only when QEMU itself hangs
QEMU_READ_PROBE = 1 * MiB  # qemu-io reads this much of the disk for its verdict

SIZE = 16 * MiB  # virtual size of the base images
# Layout of a fresh 64 KiB-cluster image after the first write (checked in ``bases``).
REFTABLE = 0x10000
REFBLOCK = 0x20000
L1 = 0x30000
L2 = 0x40000
DATA = 0x50000
EXT_START = 112  # the extension area of a v3 image that QEMU wrote

# Header field offsets.
MAGIC, VERSION, BACKING_OFFSET, BACKING_SIZE, CLUSTER_BITS, SIZE_FIELD = 0, 4, 8, 16, 20, 24
CRYPT, L1_SIZE, L1_OFFSET, RT_OFFSET, RT_CLUSTERS = 32, 36, 40, 48, 56
NB_SNAPSHOTS, SNAPSHOTS_OFFSET = 60, 64
INCOMPAT, COMPAT, AUTOCLEAR, REFCOUNT_ORDER = 72, 80, 88, 96
HEADER_LENGTH, COMPRESSION = 100, 104
# Snapshot table entry field offsets.
SN_L1_OFFSET, SN_L1_SIZE, SN_ID_SIZE, SN_NAME_SIZE, SN_EXTRA_SIZE = 0, 8, 12, 14, 36

U64_MAX = (1 << 64) - 1


# --------------------------------------------------------------------------- images
class Img:
    """A mutable image file image: pokes by offset, then written to a file."""

    def __init__(self, data: bytes) -> None:
        self.buf = bytearray(data)

    def poke(self, offset: int, fmt: str, value: int) -> Img:
        end = offset + struct.calcsize(fmt)
        if end > len(self.buf):
            self.buf.extend(bytes(end - len(self.buf)))
        struct.pack_into(fmt, self.buf, offset, value)
        return self

    def u8(self, offset: int, value: int) -> Img:
        return self.poke(offset, ">B", value)

    def u16(self, offset: int, value: int) -> Img:
        return self.poke(offset, ">H", value)

    def u32(self, offset: int, value: int) -> Img:
        return self.poke(offset, ">I", value)

    def u64(self, offset: int, value: int) -> Img:
        return self.poke(offset, ">Q", value)

    def get(self, offset: int, fmt: str) -> int:
        value: int = struct.unpack_from(fmt, self.buf, offset)[0]
        return value

    def put(self, offset: int, data: bytes) -> Img:
        end = offset + len(data)
        if end > len(self.buf):
            self.buf.extend(bytes(end - len(self.buf)))
        self.buf[offset:end] = data
        return self

    @property
    def cluster_size(self) -> int:
        return 1 << self.get(CLUSTER_BITS, ">I")

    def cluster0(
        self,
        exts: list[tuple[int, bytes]],
        *,
        end_marker: bool = True,
        backing: bytes | None = None,
        header_length: int | None = None,
    ) -> Img:
        """Rewrite cluster 0 after the fixed header: extensions, end marker, backing name."""
        hl = self.get(HEADER_LENGTH, ">I") if header_length is None else header_length
        if header_length is not None:
            self.u32(HEADER_LENGTH, header_length)
        body = b"".join(ext(magic, data) for magic, data in exts)
        if end_marker:
            body += bytes(8)
        if backing is not None:
            self.u64(BACKING_OFFSET, hl + len(body)).u32(BACKING_SIZE, len(backing))
            body += backing
        cs = self.cluster_size
        assert hl + len(body) <= cs
        self.buf[hl:cs] = body + bytes(cs - hl - len(body))
        return self

    def write(self, path: Path) -> Path:
        path.write_bytes(bytes(self.buf))
        return path


def ext(magic: int, data: bytes) -> bytes:
    """One header extension, padded to 8 bytes."""
    raw = struct.pack(">II", magic, len(data)) + data
    return raw + bytes(-len(raw) % 8)


def feature_table(extra: tuple[tuple[int, int, str], ...] = ()) -> bytes:
    entries = (*C.QEMU_FEATURE_TABLE, *extra)
    return b"".join(struct.pack(">BB46s", t, bit, name.encode()) for t, bit, name in entries)


FEATURES = feature_table()


@dataclass
class Bases:
    """Valid images made by QEMU, as bytes (see ``bases``)."""

    data: bytes  # 16 MiB, 64 KiB clusters, v3; 128 KiB of 0x5a at guest 0
    plain: bytes  # same, nothing written (no L2 table)
    v2: bytes  # like data, compat=0.10
    c4k: bytes  # 1 MiB, 4 KiB clusters, 128 KiB of 0x5a at guest 0
    snap: bytes  # data plus an internal snapshot "s1"
    snap512: bytes  # 1 MiB, 512-byte clusters, an internal snapshot "s1"
    compressed: bytes  # two compressed clusters at guest 0 and 64 KiB
    extl2: bytes  # extended L2 entries; 4 KiB of 0x5a at guest 0
    datafile: bytes  # external data file "img.data"; 128 KiB at guest 0
    datafile_data: bytes


def _run(argv: list[str], *, cwd: Path, timeout: float = QEMU_TIMEOUT) -> str:
    proc = run_tool(argv, cwd=cwd, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="session")
def bases(qemu_tools: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Bases:
    d = tmp_path_factory.mktemp("hostile-bases")
    qimg, qio = qemu_tools["qemu-img"], qemu_tools["qemu-io"]

    def create(name: str, size: int = SIZE, *opts: str) -> Path:
        args = [qimg, "create", "-f", "qcow2", "-q"]
        if opts:
            args += ["-o", ",".join(opts)]
        _run([*args, name, str(size)], cwd=d)
        return d / name

    def write(path: Path, *cmds: str) -> None:
        argv = [qio, "-f", "qcow2"]
        for cmd in cmds:
            argv += ["-c", cmd]
        _run([*argv, path.name], cwd=d)

    plain = create("plain.qcow2").read_bytes()
    data = create("data.qcow2")
    write(data, "write -P 0x5a 0 128k")
    v2 = create("v2.qcow2", SIZE, "compat=0.10")
    write(v2, "write -P 0x5a 0 128k")
    c4k = create("c4k.qcow2", 1 * MiB, "cluster_size=4096")
    write(c4k, "write -P 0x5a 0 128k")
    snap = create("snap.qcow2")
    write(snap, "write -P 0x5a 0 128k")
    _run([qimg, "snapshot", "-c", "s1", snap.name], cwd=d)
    snap512 = create("snap512.qcow2", 1 * MiB, "cluster_size=512")
    _run([qimg, "snapshot", "-c", "s1", snap512.name], cwd=d)
    comp = create("comp.qcow2")
    write(comp, "write -c -P 0x5a 0 64k", "write -c -P 0x33 64k 64k")
    extl2 = create("extl2.qcow2", SIZE, "extended_l2=on")
    write(extl2, "write -P 0x5a 0 4k")
    df = create("img.qcow2", SIZE, "data_file=img.data")
    write(df, "write -P 0x5a 0 128k")
    out = Bases(
        data=data.read_bytes(),
        plain=plain,
        v2=v2.read_bytes(),
        c4k=c4k.read_bytes(),
        snap=snap.read_bytes(),
        snap512=snap512.read_bytes(),
        compressed=comp.read_bytes(),
        extl2=extl2.read_bytes(),
        datafile=df.read_bytes(),
        datafile_data=(d / "img.data").read_bytes(),
    )
    # The poke offsets below assume QEMU 7.2's layout: check it, never poke blindly.
    for name in ("data", "v2", "snap", "datafile"):
        img = Img(getattr(out, name))
        assert img.get(L1_OFFSET, ">Q") == L1, name
        assert img.get(L1, ">Q") & ~C.QCOW_OFLAG_COPIED == L2, name
        entry0 = img.get(L2, ">Q") & ~C.QCOW_OFLAG_COPIED
        assert entry0 == (0 if name == "datafile" else DATA), name
    assert Img(out.data).get(EXT_START, ">I") == C.EXT_FEATURE_TABLE
    assert Img(out.compressed).get(L2, ">Q") & C.QCOW_OFLAG_COMPRESSED
    assert Img(out.c4k).get(L1_OFFSET, ">Q") == 0x3000
    return out


Builder = Callable[[Path, Bases], Path]
Poke = Callable[[Img], object]


def poke(base: str, *pokes: Poke) -> Builder:
    """A builder: copy base image ``base`` to ``img.qcow2`` and apply ``pokes`` in order."""

    def build(d: Path, b: Bases) -> Path:
        img = Img(getattr(b, base))
        for p in pokes:
            p(img)
        if base == "datafile":
            (d / "img.data").write_bytes(b.datafile_data)
        return img.write(d / "img.qcow2")

    return build


def u32(off: int, value: int) -> Poke:
    return lambda img: img.u32(off, value)


def u64(off: int, value: int) -> Poke:
    return lambda img: img.u64(off, value)


def u8(off: int, value: int) -> Poke:
    return lambda img: img.u8(off, value)


def snap_entry(field_off: int, fmt: str, value: int) -> Poke:
    """Poke a field of the first snapshot table entry."""
    return lambda img: img.poke(img.get(SNAPSHOTS_OFFSET, ">Q") + field_off, fmt, value)


def exts(*records: tuple[int, bytes], end_marker: bool = True) -> Poke:
    return lambda img: img.cluster0(list(records), end_marker=end_marker)


def with_backing(name: bytes, *records: tuple[int, bytes]) -> Builder:
    """``img.qcow2`` (from ``plain``) backed by ``base.qcow2`` (the ``data`` image) as ``name``."""

    def build(d: Path, b: Bases) -> Path:
        (d / "base.qcow2").write_bytes(b.data)
        img = Img(b.plain).cluster0([*records, (C.EXT_FEATURE_TABLE, FEATURES)], backing=name)
        return img.write(d / "img.qcow2")

    return build


def compressed_data_offset(img: Img) -> int:
    entry = img.get(L2, ">Q")
    bits = img.get(CLUSTER_BITS, ">I")
    offset: int = entry & ((1 << (62 - (bits - 8))) - 1)
    return offset


def raw_deflate(data: bytes) -> bytes:
    co = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12)
    return co.compress(data) + co.flush()


def fill_cluster0_with_extensions(overrun: int = 0) -> Poke:
    """Unknown extensions from the header to the end of cluster 0, no end marker; with
    ``overrun``, the last one claims that many bytes more than there are."""

    def apply(img: Img) -> None:
        room = img.cluster_size - EXT_START
        records = [(0x12345678, bytes(1000))] * ((room - 8) // 1008)
        last = room - len(records) * 1008 - 8
        records.append((0x12345679, bytes(last)))
        img.cluster0(records, end_marker=False)
        if overrun:
            img.u32(img.cluster_size - last - 4, last + overrun)

    return apply


def backing_loop(d: Path, b: Bases) -> Path:
    Img(b.plain).cluster0([(C.EXT_FEATURE_TABLE, FEATURES)], backing=b"b.qcow2").write(
        d / "a.qcow2"
    )
    Img(b.plain).cluster0([(C.EXT_FEATURE_TABLE, FEATURES)], backing=b"a.qcow2").write(
        d / "b.qcow2"
    )
    return d / "a.qcow2"


def backing_chain(depth: int) -> Builder:
    """``img.qcow2`` over ``depth`` more qcow2 images; the bottom one has data."""

    def build(d: Path, b: Bases) -> Path:
        (d / f"c{depth:03d}.qcow2").write_bytes(b.data)
        for i in range(depth - 1, -1, -1):
            name = f"c{i + 1:03d}.qcow2".encode()
            Img(b.plain).cluster0([(C.EXT_FEATURE_TABLE, FEATURES)], backing=name).write(
                d / f"c{i:03d}.qcow2"
            )
        return (d / "c000.qcow2").rename(d / "img.qcow2")

    return build


def backing_fifo(d: Path, b: Bases) -> Path:
    os.mkfifo(d / "base.qcow2")
    return Img(b.plain).cluster0([], backing=b"base.qcow2").write(d / "img.qcow2")


def backing_directory(d: Path, b: Bases) -> Path:
    (d / "base.qcow2").mkdir()
    return Img(b.plain).cluster0([], backing=b"base.qcow2").write(d / "img.qcow2")


def snapshot_table_over_64mib(d: Path, b: Bases) -> Path:
    """510 snapshot entries of 132 KB each (a sparse file): the table exceeds 64 MiB."""
    img = Img(b.plain)
    table = 0x100000
    img.u32(NB_SNAPSHOTS, 510).u64(SNAPSHOTS_OFFSET, table)
    path = img.write(d / "img.qcow2")
    entry = struct.pack(">QIHHIIQII", 0, 0, 0xFFFF, 0xFFFF, 0, 0, 0, 0, 1024)
    step = (40 + 1024 + 0xFFFF + 0xFFFF + 7) & ~7
    with path.open("r+b") as f:
        for i in range(510):
            f.seek(table + i * step)
            f.write(entry)
    return path


# --------------------------------------------------------------------------- the table
# QEMU 7.2's verdicts:
#   refuse     qemu-img info -f qcow2 fails
#   refuse-io  info works (it opens neither backing nor data file), qemu-io -r cannot open
#   read-error qemu-io -r opens the image but reading the start of the disk fails
#   refuse-rw  qemu-io -r reads, a read-write open is refused
#   snap-error the image reads, loading the snapshot (qemu-img convert -l s1) fails
#   hang       qemu-io -r does not finish within QEMU_HANG_TIMEOUT
#   ok         all of that works
# Our phases: "open" (open "r" raises), "read" (open works, reading the disk raises),
# "rw" (reads work, open "r+" raises), "snapshot" (reads work, validate_snapshot_l1
# raises), "ok" (open and reads work).
@dataclass(frozen=True)
class Case:
    id: str
    build: Builder
    qemu: str
    phase: str
    exc: type[Qcow2Error] | None = None
    match: str = ""
    why: str = ""  # required when our verdict differs from QEMU's
    xfail: str = ""  # a known bug in code this test does not cover the fixes of


def refuse(
    id: str, build: Builder, exc: type[Qcow2Error], match: str, qemu: str = "refuse", why: str = ""
) -> Case:
    return Case(id, build, qemu, "open", exc, match, why)


def read_error(
    id: str,
    build: Builder,
    exc: type[Qcow2Error],
    match: str,
    qemu: str = "read-error",
    why: str = "",
    xfail: str = "",
) -> Case:
    return Case(id, build, qemu, "read", exc, match, why, xfail)


def ok(id: str, build: Builder, qemu: str = "ok", why: str = "", xfail: str = "") -> Case:
    return Case(id, build, qemu, "ok", why=why, xfail=xfail)


F = Qcow2FormatError
U = Qcow2UnsupportedError
X = Qcow2CorruptError

STRICTER_RESERVED = (
    "mapping.py refuses reserved bits in table entries; QEMU 7.2 masks them off when "
    "reading (only qemu-img check reports them)"
)

CASES: list[Case] = [
    # ---- 1. header
    refuse("magic", poke("data", u32(MAGIC, 0x12345678)), F, "magic=0x12345678"),
    *(
        refuse(f"version-{v:#x}", poke("data", u32(VERSION, v)), U, f"version={v}")
        for v in (0, 1, 4, 0xFFFFFFFF)
    ),
    *(
        refuse(f"cluster_bits-{v:#x}", poke("data", u32(CLUSTER_BITS, v)), F, f"cluster_bits={v}")
        for v in (8, 22, 0xFFFFFFFF)
    ),
    refuse(
        "extended_l2-4k-clusters",
        poke("c4k", u64(INCOMPAT, C.INCOMPAT_EXTL2)),
        F,
        "cluster_bits=12",
    ),
    *(
        refuse(
            f"header_length-{v:#x}", poke("data", u32(HEADER_LENGTH, v)), F, f"header_length={v}"
        )
        for v in (0, 100, 103, 0x10001, 0xFFFFFFFF)
    ),
    # 108: the extension area starts inside the header; its first record's length runs
    # past cluster 0.
    refuse("header_length-108", poke("data", u32(HEADER_LENGTH, 108)), F, "too large"),
    ok(
        "header_length-120-unknown-fields",
        poke(
            "data",
            lambda img: img.put(112, b"\xaa" * 8).cluster0(
                [(C.EXT_FEATURE_TABLE, FEATURES)], header_length=120
            ),
        ),
    ),
    ok("header_length-104", poke("data", exts(), u32(HEADER_LENGTH, 104))),
    refuse("refcount_order-7", poke("data", u32(REFCOUNT_ORDER, 7)), F, "refcount_order=7"),
    refuse(
        "incompatible-bit5",
        poke("data", u64(INCOMPAT, 1 << 5)),
        U,
        "Unknown incompatible feature: 20",
    ),
    refuse(
        "incompatible-bits5-63",
        poke("data", u64(INCOMPAT, U64_MAX & ~0x1F)),
        U,
        "Unknown incompatible feature: ffffffffffffffe0",
    ),
    refuse(
        "incompatible-bit5-named",
        poke(
            "data",
            exts((C.EXT_FEATURE_TABLE, feature_table(((0, 5, "my feature"),)))),
            u64(INCOMPAT, 1 << 5 | 1 << 40),
        ),
        U,
        "my feature, Unknown incompatible feature: 10000000000",
    ),
    refuse(
        "incompatible-bit5-named-in-truncated-table",
        poke(
            "data",
            exts((C.EXT_FEATURE_TABLE, struct.pack(">BB46s", 0, 5, b"my feature")[:47])),
            u64(INCOMPAT, 1 << 5),
        ),
        U,
        "feature(s): my feature (incompatible_features=0x20)",
    ),
    refuse(
        # QEMU reads the name table on a best-effort basis: a broken extension after it
        # does not change the reason.
        "incompatible-bit5-named-then-broken-extension",
        poke(
            "data",
            exts(
                (C.EXT_FEATURE_TABLE, feature_table(((0, 5, "my feature"),))),
                (C.EXT_BACKING_FORMAT, b"x" * 20),
            ),
            u64(INCOMPAT, 1 << 5),
        ),
        U,
        "Unsupported qcow2 feature(s): my feature",
    ),
    Case(
        "corrupt-bit",
        poke("data", u64(INCOMPAT, C.INCOMPAT_CORRUPT)),
        "refuse-rw",
        "rw",
        X,
        "corrupt",
    ),
    ok("dirty-bit", poke("data", u64(INCOMPAT, C.INCOMPAT_DIRTY))),
    ok(
        "unknown-compatible-and-autoclear-bits",
        poke("data", u64(COMPAT, 1 << 9), u64(AUTOCLEAR, 1 << 9)),
    ),
    refuse("compression_type-18", poke("data", u8(COMPRESSION, 18)), U, "compression_type=18"),
    refuse(
        "compression_type-1-without-bit3",
        poke("data", u8(COMPRESSION, 1)),
        F,
        "compression_type=1, incompatible_features=0x0",
    ),
    refuse(
        "compression-bit3-with-type-0",
        poke("data", u64(INCOMPAT, C.INCOMPAT_COMPRESSION)),
        F,
        "compression_type=0, incompatible_features=0x8",
    ),
    # header_length 104 has no compression_type byte: byte 104 is then padding.
    ok(
        "compression_type-byte-beyond-header_length",
        poke("data", exts(), u32(HEADER_LENGTH, 104), u8(COMPRESSION, 1)),
    ),
    refuse("crypt_method-3", poke("data", u32(CRYPT, 3)), U, "crypt_method=3"),
    refuse(
        "crypt_method-aes",
        poke("data", u32(CRYPT, C.CRYPT_AES)),
        qcow2aio.Qcow2PassphraseError,
        "encrypted (AES): a passphrase is missing",
        qemu="refuse-io",
        # Both need the key to open it for I/O (and then read garbage: no key check).
    ),
    refuse(
        # qemu-img info crashes on this one (SIGSEGV: no crypto context with BDRV_O_NO_IO).
        "crypt_method-luks-without-crypto-extension",
        poke("data", u32(CRYPT, C.CRYPT_LUKS)),
        F,
        "Missing CRYPTO header extension for crypt_method=2",
    ),
    refuse(
        "size-int64-max",
        poke("data", u64(SIZE_FIELD, (1 << 63) - 1)),
        F,
        "size=9223372036854775807",
    ),
    refuse("size-u64-max", poke("data", u64(SIZE_FIELD, U64_MAX)), F, f"size={U64_MAX}"),
    refuse(
        "size-2^52-l1-too-small",
        poke("data", u64(SIZE_FIELD, 1 << 52)),
        F,
        "L1 table is too small: l1_size=1",
    ),
    refuse(
        "size-2^52-l1-over-32MiB",
        poke("data", u64(SIZE_FIELD, 1 << 52), u32(L1_SIZE, 1 << 23)),
        F,
        "Active L1 table too large: l1_size=8388608",
    ),
    ok("size-unaligned", poke("data", u64(SIZE_FIELD, 1000000))),
    refuse("l1_size-u32-max", poke("data", u32(L1_SIZE, 0xFFFFFFFF)), F, "l1_size=4294967295"),
    refuse("l1_size-4194305", poke("data", u32(L1_SIZE, 4194305)), F, "l1_size=4194305"),
    ok("l1_size-4194304-past-eof", poke("data", u32(L1_SIZE, 4194304))),
    refuse("l1_size-0-too-small", poke("data", u32(L1_SIZE, 0)), F, "l1_size=0"),
    refuse(
        "l1_table_offset-unaligned",
        poke("data", u64(L1_OFFSET, 0x1234567890ABCDEF)),
        F,
        "l1_table_offset=0x1234567890abcdef",
    ),
    refuse(
        "l1_table_offset-overflow",
        poke("data", u64(L1_OFFSET, 0x7FFFFFFFFFFF0000), u32(L1_SIZE, 0xFFFF)),
        F,
        "l1_table_offset=0x7fffffffffff0000",
    ),
    refuse(
        "l1_table_offset-unaligned-empty-l1",
        poke("data", u64(SIZE_FIELD, 0), u32(L1_SIZE, 0), u64(L1_OFFSET, 0x200)),
        F,
        "l1_table_offset=0x200",
    ),
    # ---- 2. refcount table
    refuse(
        "refcount_table_clusters-0",
        poke("data", u32(RT_CLUSTERS, 0)),
        F,
        "refcount_table_clusters=0",
    ),
    refuse(
        "refcount_table_clusters-u32-max",
        poke("data", u32(RT_CLUSTERS, 0xFFFFFFFF)),
        F,
        "refcount_table_clusters=4294967295",
    ),
    refuse(
        "refcount_table_clusters-over-8MiB",
        poke("data", u32(RT_CLUSTERS, 129)),
        F,
        "refcount_table_clusters=129",
    ),
    ok("refcount_table_clusters-8MiB-past-eof", poke("data", u32(RT_CLUSTERS, 128))),
    refuse(
        "refcount_table_offset-unaligned",
        poke("data", u64(RT_OFFSET, 0x1234567890ABCDEF)),
        F,
        "refcount_table_offset=0x1234567890abcdef",
    ),
    refuse(
        "refcount_table_offset-overflow",
        poke("data", u64(RT_OFFSET, 0xFFFFFFFFFFFF0000), u32(RT_CLUSTERS, 0x7F)),
        F,
        "refcount_table_offset=0xffffffffffff0000",
    ),
    # ---- 3. snapshots
    refuse("nb_snapshots-65537", poke("data", u32(NB_SNAPSHOTS, 65537)), F, "nb_snapshots=65537"),
    refuse(
        "nb_snapshots-u32-max",
        poke("data", u32(NB_SNAPSHOTS, 0xFFFFFFFF)),
        F,
        "nb_snapshots=4294967295",
    ),
    refuse(
        "snapshots_offset-unaligned",
        poke("data", u32(NB_SNAPSHOTS, 1), u64(SNAPSHOTS_OFFSET, 0x12345678)),
        F,
        "snapshots_offset=0x12345678",
    ),
    refuse(
        "snapshots_offset-unaligned-no-snapshots",
        poke("data", u64(SNAPSHOTS_OFFSET, 0x12345678)),
        F,
        "snapshots_offset=0x12345678",
    ),
    refuse(
        "snapshots_offset-overflow",
        poke("data", u32(NB_SNAPSHOTS, 0xFFFF), u64(SNAPSHOTS_OFFSET, 0xFFFFFFFFFFFF0000)),
        F,
        "snapshots_offset=0xffffffffffff0000",
    ),
    # Entries past the end of the file read as empty entries, as in QEMU (which
    # needs 0.4 s for these 2048; see test_snapshot_table_65536_entries_past_eof).
    ok(
        "snapshot-table-past-eof",
        poke("data", u32(NB_SNAPSHOTS, 2048), u64(SNAPSHOTS_OFFSET, 1 << 40)),
    ),
    refuse("snapshot-table-over-64MiB", snapshot_table_over_64mib, F, "Snapshot table is too big"),
    refuse(
        "snapshot-extra_data_size-1025",
        poke("snap", snap_entry(SN_EXTRA_SIZE, ">I", 1025)),
        F,
        "extra_data_size=1025",
    ),
    refuse(
        "snapshot-extra_data_size-u32-max",
        poke("snap", snap_entry(SN_EXTRA_SIZE, ">I", 0xFFFFFFFF)),
        F,
        "extra_data_size=4294967295",
    ),
    # The table is the last thing in the file: the overrun reads zeros, in QEMU too.
    ok("snapshot-id_str_size-0xffff", poke("snap", snap_entry(SN_ID_SIZE, ">H", 0xFFFF))),
    ok("snapshot-name_size-0xffff", poke("snap", snap_entry(SN_NAME_SIZE, ">H", 0xFFFF))),
    # QEMU does not check a snapshot's L1 table at open, only when the snapshot is used.
    Case(
        "snapshot-l1_size-0x10000000",
        poke("snap", snap_entry(SN_L1_SIZE, ">I", 0x10000000)),
        "snap-error",
        "snapshot",
        F,
        "Snapshot L1 table too large: snapshot 0 (id '1') l1_size=268435456",
    ),
    # With 512-byte clusters the bogus L1 table would span 2^26 clusters.
    Case(
        "snapshot-l1_size-u32-max-512-byte-clusters",
        poke("snap512", snap_entry(SN_L1_SIZE, ">I", 0xFFFFFFFF)),
        "snap-error",
        "snapshot",
        F,
        "l1_size=4294967295",
    ),
    Case(
        "snapshot-l1_table_offset-unaligned",
        poke("snap", snap_entry(SN_L1_OFFSET, ">Q", 0x400200)),
        "snap-error",
        "snapshot",
        F,
        "l1_table_offset=0x400200",
    ),
    # ---- 4. backing file
    refuse(
        "backing_file_offset-past-cluster0",
        poke("data", u64(BACKING_OFFSET, 0x10001)),
        F,
        "backing_file_offset=0x10001",
    ),
    refuse(
        "backing_file_size-1024",
        poke("data", lambda img: img.cluster0([], backing=b"a" * 1024)),
        F,
        "backing_file_size=1024",
    ),
    refuse(
        "backing-name-past-cluster0",
        poke("data", u64(BACKING_OFFSET, 0xFFF0), u32(BACKING_SIZE, 0x20)),
        F,
        "backing_file_size=32",
    ),
    ok(
        "backing-name-to-end-of-cluster0",
        poke("data", u64(BACKING_OFFSET, 0x10000), u32(BACKING_SIZE, 0)),
    ),
    ok("backing", with_backing(b"base.qcow2", (C.EXT_BACKING_FORMAT, b"qcow2"))),
    ok("backing-probed-format", with_backing(b"base.qcow2")),
    # An empty name, or a name cut at a NUL byte: QEMU uses C strings.
    ok("backing-empty-name", with_backing(b"")),
    ok("backing-name-with-nul", with_backing(b"base.qcow2\0junk")),
    refuse(
        "backing-json",
        with_backing(b'json:{"file": {"driver": "file", "filename": "base.qcow2"}}'),
        U,
        "Only local backing files",
        qemu="ok",
        why="json: names can make QEMU open anything (CVE-2024-4467): we follow files only",
    ),
    refuse(
        "backing-nbd",
        with_backing(b"nbd://host/x"),
        U,
        "backing_file='nbd://host/x'",
        qemu="refuse-io",
    ),
    refuse(
        "backing-loop",
        backing_loop,
        F,
        "Backing chain loops",
        qemu="hang",
    ),
    refuse(
        "backing-chain-too-deep",
        backing_chain(C.MAX_BACKING_DEPTH + 1),
        F,
        f"more than {C.MAX_BACKING_DEPTH} images",
        qemu="ok",
        why="every level holds open files and caches: a hostile chain is cut at MAX_BACKING_DEPTH",
    ),
    ok("backing-chain-max-depth", backing_chain(C.MAX_BACKING_DEPTH - 1)),
    refuse(
        "backing-missing",
        with_backing(b"missing.qcow2"),
        Qcow2IOError,
        "missing.qcow2",
        "refuse-io",
    ),
    refuse(
        "backing-fifo",
        backing_fifo,
        U,
        "not a regular file",
        qemu="hang",
    ),
    refuse("backing-directory", backing_directory, U, "not a regular file", qemu="refuse-io"),
    refuse(
        "backing_format-unknown",
        with_backing(b"base.qcow2", (C.EXT_BACKING_FORMAT, b"bogus")),
        U,
        "backing_format='bogus'",
        qemu="refuse-io",
    ),
    # ---- 5. header extensions
    refuse(
        "extension-length-0x7fffffff",
        poke("data", u32(EXT_START, 0x12345678), u32(EXT_START + 4, 0x7FFFFFFF)),
        F,
        "Header extension too large: magic=0x12345678 length=2147483647",
    ),
    refuse(
        # The extension area ends where the backing file name starts (080).
        "extension-past-backing-name",
        poke("data", u64(BACKING_OFFSET, EXT_START + 4)),
        F,
        "Header extension too large",
    ),
    # A repeated extension: the last copy wins in QEMU (here: raw, then qcow2).
    ok(
        "extension-duplicate-backing-format",
        with_backing(
            b"base.qcow2", (C.EXT_BACKING_FORMAT, b"raw"), (C.EXT_BACKING_FORMAT, b"qcow2")
        ),
    ),
    refuse(
        "extension-backing-format-16",
        poke("data", exts((C.EXT_BACKING_FORMAT, b"q" * 16))),
        F,
        "length=16",
    ),
    ok(
        "extension-feature-table-truncated",
        poke("data", exts((C.EXT_FEATURE_TABLE, FEATURES[:100]))),
    ),
    refuse(
        "extension-feature-table-past-cluster0",
        poke("data", u32(EXT_START + 4, 0x10000)),
        F,
        "Header extension too large: magic=0x6803f857 length=65536",
    ),
    refuse(
        "extension-crypto-without-luks",
        poke("data", exts((C.EXT_CRYPTO, struct.pack(">QQ", 0x10000, 0x1000)))),
        F,
        "crypt_method=0",
    ),
    refuse(
        "extension-crypto-length-8",
        poke("data", u32(CRYPT, C.CRYPT_LUKS), exts((C.EXT_CRYPTO, bytes(8)))),
        F,
        "length=8",
    ),
    refuse(
        "extension-crypto-offset-unaligned",
        poke(
            "data",
            u32(CRYPT, C.CRYPT_LUKS),
            exts((C.EXT_CRYPTO, struct.pack(">QQ", 0x40008, 0x1000))),
        ),
        F,
        "Encryption header offset 0x40008",
    ),
    refuse(
        "extension-bitmaps-length-16",
        poke("data", exts((C.EXT_BITMAPS, bytes(16)))),
        F,
        "length=16",
    ),
    refuse(
        "extension-bitmaps-zero-bitmaps",
        poke("data", exts((C.EXT_BITMAPS, bytes(24))), u64(AUTOCLEAR, C.AUTOCLEAR_BITMAPS)),
        F,
        "nb_bitmaps=0",
    ),
    # Without the autoclear bit QEMU ignores the bitmaps (a program without bitmap
    # support wrote the image).
    ok("extension-bitmaps-without-autoclear-bit", poke("data", exts((C.EXT_BITMAPS, bytes(24))))),
    refuse(
        "data-file-bit-without-extension",
        poke("data", u64(INCOMPAT, C.INCOMPAT_DATA_FILE)),
        F,
        "incompatible_features=0x4",
        qemu="refuse-io",
    ),
    # QEMU ignores the extension without the bit: the data stays in the image file.
    ok(
        "data-file-extension-without-bit",
        poke("data", exts((C.EXT_DATA_FILE, b"img.data"), (C.EXT_FEATURE_TABLE, FEATURES))),
    ),
    refuse(
        "data-file-extension-empty",
        poke("datafile", exts((C.EXT_DATA_FILE, b""), (C.EXT_FEATURE_TABLE, FEATURES))),
        F,
        "External data file name is empty",
        qemu="refuse-io",
    ),
    refuse(
        "data_file_raw-without-data-file",
        poke("data", u64(AUTOCLEAR, C.AUTOCLEAR_DATA_FILE_RAW)),
        F,
        "autoclear_features=0x2",
        qemu="refuse-io",
    ),
    refuse(
        "extensions-run-past-cluster0",
        poke("data", fill_cluster0_with_extensions(8)),
        F,
        "Header extension too large: magic=0x12345679",
    ),
    ok(
        "extensions-fill-cluster0-without-end-marker",
        poke("data", fill_cluster0_with_extensions()),
    ),
    # ---- 6. L1 and L2 entries (found by a read)
    read_error(
        "l1-reserved-bits",
        poke("data", u64(L1, C.QCOW_OFLAG_COPIED | L2 | C.L1E_RESERVED_MASK)),
        X,
        "Reserved bits set in L1 entry 0",
        qemu="ok",
        why=STRICTER_RESERVED,
    ),
    read_error(
        "l1-unaligned-l2-offset",
        poke("data", u64(L1, C.QCOW_OFLAG_COPIED | (L2 + 0x200))),
        X,
        "L2 table offset 0x40200 unaligned",
    ),
    ok("l1-l2-past-eof", poke("data", u64(L1, C.QCOW_OFLAG_COPIED | 1 << 40))),
    read_error(
        "l2-reserved-bits",
        poke("data", u64(L2, C.QCOW_OFLAG_COPIED | DATA | C.L2E_STD_RESERVED_MASK)),
        X,
        "Reserved bits set in L2 entry",
        qemu="ok",
        why=STRICTER_RESERVED,
    ),
    read_error(
        "l2-unaligned-data-offset",
        poke("data", u64(L2, C.QCOW_OFLAG_COPIED | (DATA + 0x200))),
        X,
        "Cluster allocation offset 0x50200 unaligned",
    ),
    read_error(
        "l2-zero-flag-v2",
        poke("v2", u64(L2, DATA | C.QCOW_OFLAG_ZERO)),
        X,
        "Zero cluster flag in a version 2 image",
    ),
    read_error(
        "l2-compressed-with-data-file",
        poke("datafile", u64(L2, C.QCOW_OFLAG_COMPRESSED | DATA)),
        X,
        "Compressed cluster in an image with a data file",
    ),
    read_error(
        "l2-data-file-offset-not-guest-offset",
        poke("datafile", u64(L2, C.QCOW_OFLAG_COPIED | 0x10000)),
        X,
        "does not match",
    ),
    read_error(
        "compressed-garbage",
        poke("compressed", lambda img: img.put(compressed_data_offset(img), b"\xff" * 64)),
        X,
        "zlib data of compressed cluster",
    ),
    read_error(
        "compressed-short-stream",
        poke(
            "compressed",
            lambda img: img.put(compressed_data_offset(img), raw_deflate(b"\x5a" * 100)),
        ),
        X,
        "inflates to 100 bytes",
    ),
    read_error(
        "extended-l2-bitmap-allocated-and-zero",
        poke("extl2", lambda img: img.u64(L2 + 8, 0x0000000100000001)),
        X,
        "Invalid subcluster bitmap 0x0000000100000001",
    ),
]


# --------------------------------------------------------------------------- guards
class Hang(BaseException):
    """Raised by the alarm: the code under test did not finish in time."""


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    assert match, field
    return int(match.group(1)) * 1024


def bounded(
    fn: Callable[[], object], *, trace: bool = True, seconds: float = ALARM_SECONDS
) -> BaseException | None:
    """Run ``fn`` under the hang and memory guards; returns what it raised (or None).

    Two meters, each limited to MEM_LIMIT: the peak of Python's allocations
    (tracemalloc: exact and deterministic, counts even memory never touched) and
    the growth of the process's peak resident set (``VmHWM``, reset through
    ``/proc/self/clear_refs``: counts C allocations too, e.g. zlib's). ``trace=False``
    keeps only the second, for a case with so many objects that tracemalloc would
    make it 13 times slower.
    """

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    _CLEAR_REFS.write_text("5")  # VmHWM := VmRSS
    start = _rss("VmRSS")
    if trace:
        tracemalloc.start()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    raised: BaseException | None = None
    hang: Hang | None = None
    traced = 0
    try:
        fn()
    except Exception as exc:
        raised = exc
    except Hang as exc:  # not an Exception: the code under test cannot swallow it
        hang = exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if trace:
            traced = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    grown = _rss("VmHWM") - start
    if hang is not None:
        raise AssertionError(f"hang: {hang}") from hang
    assert traced < MEM_LIMIT, f"peak Python allocation {traced / MiB:.1f} MiB"
    assert grown < MEM_LIMIT, f"peak memory grew by {grown / MiB:.1f} MiB"
    if raised is not None and not isinstance(raised, Qcow2Error):
        raise AssertionError(f"not a Qcow2Error: {raised!r}") from raised
    return raised


def test_guards_catch_memory_and_hangs() -> None:
    def hog() -> None:
        blob = bytearray(MEM_LIMIT + MiB)
        del blob

    with pytest.raises(AssertionError, match="peak Python allocation"):
        bounded(hog)
    with pytest.raises(AssertionError, match="peak memory grew"):
        bounded(hog, trace=False)
    with pytest.raises(AssertionError, match="hang: no result after"):
        bounded(lambda: signal.pause(), seconds=0.2)
    with pytest.raises(AssertionError, match="not a Qcow2Error"):
        bounded(lambda: struct.unpack(">I", b""))
    assert isinstance(bounded(lambda: qcow2aio.open("/nonexistent/x.qcow2")), Qcow2IOError)


def read_ranges(size: int) -> Iterator[tuple[int, int]]:
    """The disk in READ_CHUNK pieces (the first READ_LIMIT bytes, then the last chunk)."""
    end = min(size, READ_LIMIT)
    for off in range(0, end, READ_CHUNK):
        yield off, min(READ_CHUNK, end - off)
    if size > end:
        last = max(end, size - READ_CHUNK)
        yield last, size - last


def read_all_sync(path: Path, mode: str = "r") -> None:
    with qcow2aio.open(path, mode) as img:
        for off, n in read_ranges(img.size):
            img.read_sync(off, n)


def read_all_async(path: Path) -> None:
    async def main() -> None:
        async with qcow2aio.open(path) as img:
            for off, n in read_ranges(img.size):
                await img.read(off, n)

    asyncio.run(main())


def check_snapshots(path: Path) -> None:
    with qcow2aio.open(path) as img:
        for i, snap in enumerate(img.meta.snapshots):
            validate_snapshot_l1(snap, i, img.cluster_size)


# --------------------------------------------------------------------------- QEMU
def qemu_verdict(tools: dict[str, str], path: Path, case: Case) -> str:
    cwd = path.parent

    def run(argv: list[str], timeout: float = QEMU_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return run_tool(argv, cwd=cwd, timeout=timeout)

    info = run([tools["qemu-img"], "info", "-f", "qcow2", "--output=json", path.name])
    if info.returncode != 0:
        return "refuse"
    size = json.loads(info.stdout)["virtual-size"]
    length = min(size, QEMU_READ_PROBE) & ~511
    cmd = f"read 0 {length}" if length else "info"
    try:
        io = run(
            [tools["qemu-io"], "-r", "-f", "qcow2", "-c", cmd, path.name],
            timeout=QEMU_HANG_TIMEOUT if case.qemu == "hang" else QEMU_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return "hang"
    out = io.stdout + io.stderr
    if "can't open" in out:
        return "refuse-io"
    if io.returncode != 0 or "failed" in out:
        return "read-error"
    if case.phase == "rw":
        copy = cwd / f"rw-{path.name}"
        shutil.copyfile(path, copy)
        rw = run([tools["qemu-io"], "-f", "qcow2", "-c", "read 0 512", copy.name])
        if "can't open" in rw.stdout + rw.stderr:
            return "refuse-rw"
    if case.phase == "snapshot":
        load = run(
            [
                tools["qemu-img"],
                "convert",
                "-f",
                "qcow2",
                "-l",
                "s1",
                "-O",
                "raw",
                path.name,
                "s1.raw",
            ]
        )
        if load.returncode != 0:
            return "snap-error"
    return "ok"


def same_as_qemu(tools: dict[str, str], path: Path) -> None:
    """Both accept the image: the guest bytes must be QEMU's (first READ_LIMIT bytes)."""
    raw = path.parent / "qemu.raw"
    _run(
        [tools["qemu-img"], "convert", "-f", "qcow2", "-O", "raw", path.name, raw.name],
        cwd=path.parent,
    )
    with qcow2aio.open(path) as img, raw.open("rb") as f:
        assert img.size >= os.path.getsize(raw) > img.size - 512
        for off, n in read_ranges(os.path.getsize(raw)):
            f.seek(off)
            assert img.read_sync(off, n) == f.read(n), f"guest bytes differ at {off:#x}"


# --------------------------------------------------------------------------- tests
def _params() -> list[Any]:
    out = []
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def test_table_is_consistent() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    for c in CASES:
        assert c.phase in ("open", "read", "rw", "snapshot", "ok"), c.id
        assert (c.exc is None) == (c.phase == "ok"), c.id
        assert c.exc is None or c.match, f"{c.id}: say what the message must name"
        # Where QEMU opens and reads the image, so must we (and the other way round).
        we_read = c.phase in ("ok", "rw", "snapshot")
        qemu_reads = c.qemu in ("ok", "refuse-rw", "snap-error")
        if we_read != qemu_reads:
            assert c.why or c.xfail, f"{c.id}: our verdict differs from QEMU's, say why"


@pytest.mark.parametrize("case", _params())
def test_hostile(case: Case, bases: Bases, qemu_tools: dict[str, str], tmp_path: Path) -> None:
    path = case.build(tmp_path, bases)
    assert qemu_verdict(qemu_tools, path, case) == case.qemu, "QEMU's verdict changed"

    if case.phase == "open":
        raised = bounded(lambda: read_all_sync(path))
        assert isinstance(raised, case.exc or Qcow2Error), raised
        assert case.match in str(raised)
        return
    if case.phase == "read":
        assert bounded(lambda: qcow2aio.open(path).close()) is None  # opening works
        for reader in (read_all_sync, read_all_async):
            raised = bounded(functools.partial(reader, path))
            assert isinstance(raised, case.exc or Qcow2Error), (reader.__name__, raised)
            assert case.match in str(raised), reader.__name__
        return
    assert bounded(lambda: read_all_sync(path)) is None
    assert bounded(lambda: read_all_async(path)) is None
    if case.phase == "rw":
        raised = bounded(lambda: read_all_sync(path, "r+"))
        assert isinstance(raised, case.exc or Qcow2Error), raised
        assert case.match in str(raised)
    if case.phase == "snapshot":
        raised = bounded(lambda: check_snapshots(path))
        assert isinstance(raised, case.exc or Qcow2Error), raised
        assert case.match in str(raised)
        # QEMU opens it read-write but then fails every write (its overlap check
        # covers the bogus inactive L1 table); we refuse the read-write open.
        raised = bounded(lambda: qcow2aio.open(path, "r+").close())
        assert isinstance(raised, case.exc or Qcow2Error), raised
        assert case.match in str(raised)
    if case.qemu in ("ok", "refuse-rw", "snap-error"):
        same_as_qemu(qemu_tools, path)


def test_snapshot_table_65536_entries_past_eof(bases: Bases, tmp_path: Path) -> None:
    """The largest snapshot table QEMU accepts (65536 entries, here all past the end of
    the file) reads in bounded time and memory. QEMU 7.2 accepts this image too, but
    takes 7 s for it, so it is not asked here."""
    img = Img(bases.data).u32(NB_SNAPSHOTS, 65536).u64(SNAPSHOTS_OFFSET, 1 << 40)
    path = img.write(tmp_path / "img.qcow2")

    def check() -> None:
        with qcow2aio.open(path) as img:
            assert len(img.meta.snapshots) == 65536
            assert img.meta.snapshot_table_end == (1 << 40) + 65536 * 40
            assert img.read_sync(0, 4) == b"\x5a" * 4

    assert bounded(check, trace=False) is None


def test_rw_open_many_snapshots_with_large_l1_tables(bases: Bases, tmp_path: Path) -> None:
    img = Img(bases.snap512)
    table = 0x100000
    count = 65536
    img.u32(NB_SNAPSHOTS, count).u64(SNAPSHOTS_OFFSET, table)
    entry = struct.pack(">QIHHIIQII", 0x200, C.QCOW_MAX_L1_SIZE // 8, 0, 0, 0, 0, 0, 0, 0)
    img.put(table, entry * count)
    path = img.write(tmp_path / "img.qcow2")
    assert bounded(lambda: qcow2aio.open(path).close(), trace=False) is None
    assert bounded(lambda: qcow2aio.open(path, "r+").close(), trace=False, seconds=2) is None


# ---- 7. truncation
TRUNCATIONS = sorted(
    {*range(0, 3 * 4096 + 1, 512), 1, 7, 8, 71, 72, 99, 103, 104, 111, 113, 4095, 4097}
    | {0x3000 + 8, 0x4000 + 100, 0x5000 + 777, 0x10000 - 1}
)


@pytest.mark.parametrize("cut", TRUNCATIONS)
def test_truncated(cut: int, bases: Bases, qemu_tools: dict[str, str], tmp_path: Path) -> None:
    """A file cut short: open and reads raise Qcow2Error or work. Like QEMU, we read
    the missing bytes as zeros, so the verdicts (and the bytes) are QEMU's."""
    path = tmp_path / "img.qcow2"
    path.write_bytes(bases.c4k[:cut])
    opened = bounded(lambda: qcow2aio.open(path).close()) is None
    read_ok = opened and bounded(lambda: read_all_sync(path)) is None
    if opened:
        assert (bounded(lambda: read_all_async(path)) is None) == read_ok

    def qemu_img(*args: str) -> subprocess.CompletedProcess[bytes]:
        argv = [qemu_tools["qemu-img"], *args]
        return subprocess.run(argv, cwd=tmp_path, capture_output=True, timeout=QEMU_TIMEOUT)

    info = qemu_img("info", "-f", "qcow2", path.name)
    assert opened == (info.returncode == 0), info.stderr
    if opened:
        convert = qemu_img("convert", "-f", "qcow2", "-O", "raw", path.name, "qemu.raw")
        assert read_ok == (convert.returncode == 0), convert.stderr
    if read_ok:
        same_as_qemu(qemu_tools, path)


# ---- 8. fuzz
HEADER_FIELDS = (
    (VERSION, ">I"),
    (BACKING_OFFSET, ">Q"),
    (BACKING_SIZE, ">I"),
    (CLUSTER_BITS, ">I"),
    (SIZE_FIELD, ">Q"),
    (CRYPT, ">I"),
    (L1_SIZE, ">I"),
    (L1_OFFSET, ">Q"),
    (RT_OFFSET, ">Q"),
    (RT_CLUSTERS, ">I"),
    (NB_SNAPSHOTS, ">I"),
    (SNAPSHOTS_OFFSET, ">Q"),
    (INCOMPAT, ">Q"),
    (AUTOCLEAR, ">Q"),
    (REFCOUNT_ORDER, ">I"),
    (HEADER_LENGTH, ">I"),
    (EXT_START, ">I"),
    (EXT_START + 4, ">I"),
    (0x3000, ">Q"),  # L1[0] of the 4 KiB-cluster image
    (0x4000, ">Q"),  # L2[0]
    (0x4008, ">Q"),  # L2[1]
)
INTERESTING: tuple[int, ...] = (
    *(0, 1, 2, 3, 7, 8, 9, 12, 16, 21, 22, 63, 64, 104, 112, 511, 512, 4096),
    *(0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 56, 1 << 62, 1 << 63),
)


def _field_value(fmt: str) -> st.SearchStrategy[int]:
    top = (1 << (8 * struct.calcsize(fmt))) - 1
    return st.one_of(st.sampled_from([v & top for v in INTERESTING]), st.integers(0, top))


byte_pokes = st.tuples(st.just("byte"), st.integers(0, 3 * 4096 - 1), st.integers(0, 255))
field_pokes = st.sampled_from(HEADER_FIELDS).flatmap(
    lambda f: st.tuples(st.just(f[1]), st.just(f[0]), _field_value(f[1]))
)


@settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(pokes=st.lists(st.one_of(byte_pokes, field_pokes), min_size=1, max_size=12))
def test_fuzz_pokes(
    pokes: list[tuple[str, int, int]], bases: Bases, tmp_path_factory: pytest.TempPathFactory
) -> None:
    img = Img(bases.c4k)
    for kind, offset, value in pokes:
        img.poke(offset, ">B" if kind == "byte" else kind, value)
    d = tmp_path_factory.getbasetemp() / "fuzz"
    d.mkdir(exist_ok=True)
    path = img.write(d / "img.qcow2")
    if bounded(lambda: qcow2aio.open(path).close()) is None:
        bounded(lambda: read_all_sync(path))
        bounded(lambda: read_all_async(path))
