"""``check_image`` against ``qemu-img check`` (QEMU 7.2), clean and damaged images.

Every image is made by qemu-img/qemu-io; damage is poked into copies with raw
writes (refcount entries, L1/L2 entries, refcount table entries) or made by
killing qemu-io mid-way with lazy refcounts (iotest 039). For each image and
each mode (check, ``-r leaks``, ``-r all``) qemu-img runs on one copy and
``check_image`` on an identical one; then:

* the exit code, the human text (stdout), the stderr lines and the JSON report
  (values *and* key order) must be the same;
* after a repair, ``qemu-img check`` must judge both repaired copies the same
  way (same report, modulo the file name), their incompatible feature bits
  (dirty, corrupt) must be equal, and when QEMU's copy came out clean,
  ``qemu-img compare`` must find the same guest contents in both.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Qemu

from qcow2aio import constants as C
from qcow2aio.check import CheckResult, check_image
from qcow2aio.errors import Qcow2ReadOnlyError
from qcow2aio.io import FileBackend
from qcow2aio.metadata import Metadata

KiB = 1024
MiB = 1024 * KiB
SECRET = "secret,id=sec0,data=qcow2aio-test"

L2_OFFSET = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63


# --------------------------------------------------------------------- raw helpers
def peek(path: Path, offset: int, fmt: str) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0])


def poke(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


@dataclass
class Layout:
    """Header fields needed to find tables, read straight from the file."""

    cluster_bits: int
    l1_offset: int
    reftable_offset: int
    refcount_order: int
    extended_l2: bool

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def layout(path: Path) -> Layout:
    version = peek(path, 4, ">I")
    order = peek(path, 96, ">I") if version >= 3 else 4
    incompat = peek(path, 72, ">Q") if version >= 3 else 0
    return Layout(
        cluster_bits=peek(path, 20, ">I"),
        l1_offset=peek(path, 40, ">Q"),
        reftable_offset=peek(path, 48, ">Q"),
        refcount_order=order,
        extended_l2=bool(incompat & C.INCOMPAT_EXTL2),
    )


def l2_entry_pos(path: Path, guest: int) -> int:
    """Host offset of the L2 entry mapping guest offset ``guest`` (its L2 table must exist)."""
    lay = layout(path)
    cs = lay.cluster_size
    esize = 16 if lay.extended_l2 else 8
    per_l2 = cs // esize
    l1_index, l2_index = divmod(guest // cs, per_l2)
    l2 = peek(path, lay.l1_offset + 8 * l1_index, ">Q") & L2_OFFSET
    assert l2, f"no L2 table for guest offset {guest:#x}"
    return l2 + l2_index * esize


def l2_entry(path: Path, guest: int) -> tuple[int, int]:
    pos = l2_entry_pos(path, guest)
    return pos, peek(path, pos, ">Q")


def host_cluster(path: Path, guest: int) -> int:
    _, entry = l2_entry(path, guest)
    assert entry & L2_OFFSET, f"guest offset {guest:#x} is not allocated"
    return (entry & L2_OFFSET) >> layout(path).cluster_bits


def set_refcount(path: Path, cluster: int, value: int) -> None:
    """Overwrite the on-disk refcount of ``cluster`` (its refcount block must exist)."""
    lay = layout(path)
    order = lay.refcount_order
    per_block = lay.cluster_size * 8 >> order
    rt_index, index = divmod(cluster, per_block)
    block = peek(path, lay.reftable_offset + 8 * rt_index, ">Q") & ~0x1FF
    assert block, f"no refcount block for cluster {cluster}"
    if order >= 3:
        width = 1 << (order - 3)
        fmt = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}[width]
        poke(path, block + index * width, fmt, value)
    else:
        bits = 1 << order
        bitpos = index * bits
        mask = ((1 << bits) - 1) << (bitpos & 7)
        byte = peek(path, block + (bitpos >> 3), ">B")
        poke(path, block + (bitpos >> 3), ">B", (byte & ~mask) | ((value << (bitpos & 7)) & mask))


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy a (sparse) image file without filling its holes."""
    size = src.stat().st_size
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fd = fin.fileno()
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            fin.seek(data)
            fout.seek(data)
            remaining = hole - data
            while remaining:
                chunk = fin.read(min(remaining, 4 * MiB))
                fout.write(chunk)
                remaining -= len(chunk)
            pos = hole
        fout.truncate(size)


# -------------------------------------------------------------- images by QEMU
@dataclass
class Img:
    path: Path
    luks: bool = False  # needs the secret (qemu-img: --object/--image-opts)
    bitmaps: bool = False  # qemu-img rewrites persistent bitmaps when it closes a RW image


def qcreate(qemu: Qemu, path: Path, size: str, *opts: str, backing: Path | None = None) -> Path:
    args: list[str | Path] = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", backing, "-F", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu.img(*args, path, size)
    return path


def qio(qemu: Qemu, path: Path, *commands: str) -> None:
    qemu.io(path, *commands)


def _v2(q: Qemu, d: Path) -> Img:
    p = qcreate(q, d / "v2.qcow2", "64M", "compat=0.10")
    qio(q, p, "write -P 1 0 300k", "write -P 2 20M 64k")
    return Img(p)


def _v3(q: Qemu, d: Path) -> Img:
    p = qcreate(q, d / "v3.qcow2", "64M")
    qio(q, p, "write -P 1 0 300k", "write -P 2 20M 64k", "write -z 40M 64k", "discard 64k 64k")
    return Img(p)


def _c512(q: Qemu, d: Path) -> Img:
    p = qcreate(q, d / "c512.qcow2", "8M", "cluster_size=512")
    qio(q, p, "write -P 1 0 300k", "write -P 2 5M 3k")
    return Img(p)


def _c2m(q: Qemu, d: Path) -> Img:
    p = qcreate(q, d / "c2m.qcow2", "64M", "cluster_size=2M")
    qio(q, p, "write -P 1 0 3M", "write -P 2 20M 64k")
    return Img(p)


def _rc(bits: int) -> Callable[[Qemu, Path], Img]:
    def build(q: Qemu, d: Path) -> Img:
        p = qcreate(q, d / f"rc{bits}.qcow2", "64M", f"refcount_bits={bits}")
        qio(q, p, "write -P 1 0 300k", "write -P 2 1M 64k")
        return Img(p)

    return build


def _compressed(q: Qemu, d: Path) -> Img:
    p = qcreate(q, d / "comp.qcow2", "64M")
    qio(
        q,
        p,
        "write -c -P 1 0 64k",
        "write -c -P 2 64k 64k",
        "write -c -P 3 1M 128k",
        "write -P 4 2M 64k",
    )
    return Img(p)


def _snapshots(q: Qemu, d: Path) -> Img:
    p = qcreate(q, d / "snap.qcow2", "64M")
    qio(q, p, "write -P 1 0 256k")
    q.img("snapshot", "-c", "s1", p)
    qio(q, p, "write -P 2 64k 64k", "write -P 3 5M 64k")
    q.img("snapshot", "-c", "s2", p)
    qio(q, p, "write -P 4 0 64k")
    return Img(p)


def _data_file(q: Qemu, d: Path) -> Img:
    p = qcreate(q, d / "df.qcow2", "64M", f"data_file={d / 'df.data'}")
    qio(q, p, "write -P 1 0 300k", "write -P 2 20M 64k")
    return Img(p)


def _data_file_raw(q: Qemu, d: Path) -> Img:
    p = qcreate(q, d / "dfr.qcow2", "64M", f"data_file={d / 'dfr.data'}", "data_file_raw=on")
    qio(q, p, "write -P 1 0 300k")
    return Img(p)


def _extended_l2(q: Qemu, d: Path) -> Img:
    p = qcreate(q, d / "extl2.qcow2", "64M", "extended_l2=on")
    qio(
        q,
        p,
        "write -P 1 0 4k",
        "write -P 2 100k 8k",
        "write -z 1M 64k",
        "write -P 3 2M 128k",
        "discard 2M 4k",
    )
    return Img(p)


def _backing(q: Qemu, d: Path) -> Img:
    base = qcreate(q, d / "base.qcow2", "64M")
    qio(q, base, "write -P 1 0 1M")
    p = qcreate(q, d / "overlay.qcow2", "64M", backing=base.resolve())
    qio(q, p, "write -P 2 512k 64k", "write -P 3 10M 4k")
    return Img(p)


def _prealloc(q: Qemu, d: Path) -> Img:
    p = qcreate(q, d / "prealloc.qcow2", "16M", "preallocation=metadata")
    qio(q, p, "write -z 0 64k", "write -P 5 1M 64k")
    return Img(p)


def _big_prealloc(q: Qemu, d: Path) -> Img:
    # 131072 allocated clusters over 16 L2 tables and 4 refcount blocks.
    return Img(qcreate(q, d / "bigpre.qcow2", "8G", "preallocation=metadata"))


def _zero_alloc(q: Qemu, d: Path) -> Img:
    p = qcreate(q, d / "zeroalloc.qcow2", "16M")
    qio(q, p, "write -P 1 0 256k", "write -z 0 128k")
    return Img(p)


def _fragmented(q: Qemu, d: Path) -> Img:
    p = qcreate(q, d / "frag.qcow2", "64M")
    qio(
        q,
        p,
        "write -P 1 1M 64k",
        "write -P 1 0 64k",
        "write -P 1 3M 64k",
        "write -P 1 2M 64k",
        "write -c -P 7 5M 64k",
        "write -P 1 6M 128k",
    )
    return Img(p)


def _empty(q: Qemu, d: Path) -> Img:
    return Img(qcreate(q, d / "empty.qcow2", "1G"))


def _odd_size(q: Qemu, d: Path) -> Img:
    p = qcreate(q, d / "odd.qcow2", "12345678")
    qio(q, p, "write -P 1 12000000 300k")
    return Img(p)


def _lazy(q: Qemu, d: Path) -> Img:
    p = qcreate(q, d / "lazy.qcow2", "64M", "lazy_refcounts=on")
    qio(q, p, "write -P 1 0 300k")
    return Img(p)


def _bitmaps(q: Qemu, d: Path) -> Img:
    p = qcreate(q, d / "bitmaps.qcow2", "64M")
    q.img("bitmap", "--add", p, "b0")
    q.img("bitmap", "--add", "-g", "512k", p, "b1")
    qio(q, p, "write -P 1 0 1M", "write -P 2 30M 64k")
    return Img(p, bitmaps=True)


# qemu-img spends seconds benchmarking PBKDF when it creates a LUKS image: make one per
# test process and hand out copies (tmp_path directories live as long as the session).
_LUKS_TEMPLATE: list[Path] = []


def _luks(q: Qemu, d: Path) -> Img:
    if not _LUKS_TEMPLATE or not _LUKS_TEMPLATE[0].exists():
        template = d / "luks-template.qcow2"
        q.img(
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=1",
            template,
            "16M",
        )
        q.io(
            f"driver=qcow2,file.filename={template},encrypt.key-secret=sec0",
            "write -P 1 0 128k",
            fmt=None,
            extra_args=["--object", SECRET, "--image-opts"],
        )
        _LUKS_TEMPLATE[:] = [template]
    p = d / "luks.qcow2"
    sparse_copy(_LUKS_TEMPLATE[0], p)
    return Img(p, luks=True)


CLEAN: dict[str, Callable[[Qemu, Path], Img]] = {
    "v2": _v2,
    "v3": _v3,
    "cluster512": _c512,
    "cluster2M": _c2m,
    "refcount1": _rc(1),
    "refcount2": _rc(2),
    "refcount4": _rc(4),
    "refcount8": _rc(8),
    "refcount32": _rc(32),
    "refcount64": _rc(64),
    "compressed": _compressed,
    "snapshots": _snapshots,
    "data_file": _data_file,
    "data_file_raw": _data_file_raw,
    "extended_l2": _extended_l2,
    "backing": _backing,
    "prealloc_metadata": _prealloc,
    "prealloc_8G": _big_prealloc,
    "zero_alloc": _zero_alloc,
    "fragmented": _fragmented,
    "empty": _empty,
    "odd_size": _odd_size,
    "lazy_refcounts": _lazy,
    "bitmaps": _bitmaps,
    "luks": _luks,
}


# ------------------------------------------------------------------- damages
def _damaged(
    base: Callable[[Qemu, Path], Img], damage: Callable[[Path], None]
) -> Callable[[Qemu, Path], Img]:
    def build(q: Qemu, d: Path) -> Img:
        img = base(q, d)
        damage(img.path)
        return img

    return build


def _leak_header(p: Path) -> None:
    set_refcount(p, 0, 2)


def _leak_data(p: Path) -> None:
    set_refcount(p, host_cluster(p, 0), 3)


def _leak_free_cluster(p: Path) -> None:
    # "discard 64k 64k" freed a data cluster inside the file: claim it is used.
    cs = layout(p).cluster_size
    size = p.stat().st_size
    fb = FileBackend(str(p), writable=False)
    try:
        meta = Metadata(fb, writable=False)
        free = [c for c in range(size // cs) if meta.get_refcount(c) == 0]
    finally:
        fb.close()
    assert free, "expected a free cluster inside the file"
    set_refcount(p, free[0], 1)


def _refcount_zero(guest: int) -> Callable[[Path], None]:
    def damage(p: Path) -> None:
        set_refcount(p, host_cluster(p, guest), 0)

    return damage


def _shared_refcount_one(p: Path) -> None:
    # A cluster shared with a snapshot (refcount 2) now claims refcount 1.
    set_refcount(p, host_cluster(p, 128 * KiB), 1)


def _clear_copied_l2(p: Path) -> None:
    pos, entry = l2_entry(p, 0)
    poke(p, pos, ">Q", entry & ~COPIED)


def _clear_copied_l2_at(guest: int) -> Callable[[Path], None]:
    def damage(p: Path) -> None:
        pos, entry = l2_entry(p, guest)
        poke(p, pos, ">Q", entry & ~COPIED)

    return damage


def _clear_copied_l1(p: Path) -> None:
    l1 = layout(p).l1_offset
    poke(p, l1, ">Q", peek(p, l1, ">Q") & ~COPIED)


def _set_copied_shared(p: Path) -> None:
    pos, entry = l2_entry(p, 128 * KiB)
    poke(p, pos, ">Q", entry | COPIED)


def _l2_into_refblock(p: Path) -> None:
    # iotest 060: a data cluster that is the first refcount block.
    lay = layout(p)
    refblock = peek(p, lay.reftable_offset, ">Q")
    pos, _ = l2_entry(p, 0)
    poke(p, pos, ">Q", COPIED | refblock)


def _l2_into_reftable(p: Path) -> None:
    pos, _ = l2_entry(p, 128 * KiB)
    poke(p, pos, ">Q", COPIED | layout(p).reftable_offset)


def _l2_reserved_bits(p: Path) -> None:
    pos, entry = l2_entry(p, 0)
    poke(p, pos, ">Q", entry | 2)


def _l1_reserved_bits(p: Path) -> None:
    l1 = layout(p).l1_offset
    poke(p, l1, ">Q", peek(p, l1, ">Q") | (1 << 60))


def _reftable_reserved_bits(p: Path) -> None:
    rt = layout(p).reftable_offset
    poke(p, rt, ">Q", peek(p, rt, ">Q") | 1)


def _reftable_unaligned(p: Path) -> None:
    rt = layout(p).reftable_offset
    poke(p, rt, ">Q", peek(p, rt, ">Q") + 512)


def _refblock_outside(p: Path) -> None:
    poke(p, layout(p).reftable_offset + 8, ">Q", 64 * MiB)


def _refblock_shared(p: Path) -> None:
    rt = layout(p).reftable_offset
    poke(p, rt + 8, ">Q", peek(p, rt, ">Q"))


def _data_unaligned(p: Path) -> None:
    pos, entry = l2_entry(p, 0)
    poke(p, pos, ">Q", entry + 512)


def _l2_past_eof(p: Path) -> None:
    pos, _ = l2_entry(p, 0)
    poke(p, pos, ">Q", COPIED | (1 << 40))


def _l1_unaligned(p: Path) -> None:
    l1 = layout(p).l1_offset
    poke(p, l1, ">Q", peek(p, l1, ">Q") + 512)


def _compressed_copied(p: Path) -> None:
    pos, entry = l2_entry(p, 0)
    poke(p, pos, ">Q", entry | COPIED)


def _corrupt_bit(p: Path) -> None:
    poke(p, 72, ">Q", peek(p, 72, ">Q") | C.INCOMPAT_CORRUPT)


def _refcount1_shared(p: Path) -> None:
    # Two guest clusters map one host cluster: 2 references overflow a 1-bit refcount.
    _, entry = l2_entry(p, 0)
    pos2, _ = l2_entry(p, 1 * MiB)
    poke(p, pos2, ">Q", entry)


def _subcluster_bitmap(p: Path) -> None:
    pos, _ = l2_entry(p, 0)
    poke(p, pos + 8, ">Q", peek(p, pos + 8, ">Q") | (1 << 32))


def _unallocated_bitmap(p: Path) -> None:
    pos, _ = l2_entry(p, 50 * MiB)
    poke(p, pos + 8, ">Q", 1)


def _data_file_compressed(p: Path) -> None:
    pos, entry = l2_entry(p, 0)
    poke(p, pos, ">Q", entry | (1 << 62))


def _leak_and_low(p: Path) -> None:
    set_refcount(p, 0, 5)
    set_refcount(p, host_cluster(p, 1024), 0)


def _dirty(q: Qemu, d: Path) -> Img:
    # iotest 039: lazy refcounts, killed before the refcounts were written.
    p = qcreate(q, d / "dirty.qcow2", "128M", "compat=1.1", "lazy_refcounts=on")
    q.io(p, "write -P 0x5a 512 512", "sigraise 9", check=False)
    assert peek(p, 72, ">Q") & C.INCOMPAT_DIRTY
    return Img(p)


def _dirty_many(q: Qemu, d: Path) -> Img:
    p = qcreate(q, d / "dirty2.qcow2", "128M", "compat=1.1", "lazy_refcounts=on")
    qio(q, p, "write -P 1 0 1M")
    q.io(p, "write -P 0x5a 10M 1M", "discard 0 512k", "sigraise 9", check=False)
    assert peek(p, 72, ">Q") & C.INCOMPAT_DIRTY
    return Img(p)


DAMAGED: dict[str, Callable[[Qemu, Path], Img]] = {
    "leak_header": _damaged(_v3, _leak_header),
    "leak_data": _damaged(_v3, _leak_data),
    "leak_free_cluster": _damaged(_v3, _leak_free_cluster),
    "refcount_too_low": _damaged(_v3, _refcount_zero(0)),
    "refcount_too_low_v2": _damaged(_v2, _refcount_zero(0)),
    "shared_refcount_low": _damaged(_snapshots, _shared_refcount_one),
    "copied_clear_l2": _damaged(_v3, _clear_copied_l2),
    "copied_clear_l1": _damaged(_v3, _clear_copied_l1),
    "copied_set_shared": _damaged(_snapshots, _set_copied_shared),
    "l2_into_refblock": _damaged(_v3, _l2_into_refblock),
    "l2_into_reftable": _damaged(_v3, _l2_into_reftable),
    "l2_reserved_bits": _damaged(_v3, _l2_reserved_bits),
    "l1_reserved_bits": _damaged(_v3, _l1_reserved_bits),
    "reftable_reserved_bits": _damaged(_v3, _reftable_reserved_bits),
    "reftable_unaligned": _damaged(_v3, _reftable_unaligned),
    "refblock_outside_image": _damaged(_v3, _refblock_outside),
    "refblock_shared": _damaged(_v3, _refblock_shared),
    "data_unaligned": _damaged(_v3, _data_unaligned),
    "zero_alloc_unaligned": _damaged(_zero_alloc, _data_unaligned),
    "l2_past_eof": _damaged(_v3, _l2_past_eof),
    "l1_unaligned": _damaged(_v3, _l1_unaligned),
    "compressed_copied": _damaged(_compressed, _compressed_copied),
    "corrupt_bit": _damaged(_v3, _corrupt_bit),
    "refcount1_overflow": _damaged(_rc(1), _refcount1_shared),
    "refcount1_low": _damaged(_rc(1), _refcount_zero(0)),
    "refcount2_low": _damaged(_rc(2), _refcount_zero(64 * KiB)),
    "refcount4_leak": _damaged(_rc(4), _leak_header),
    "refcount64_low": _damaged(_rc(64), _refcount_zero(0)),
    "cluster512_leak_low": _damaged(_c512, _leak_and_low),
    "extended_l2_bitmap": _damaged(_extended_l2, _subcluster_bitmap),
    "extended_l2_unalloc_bitmap": _damaged(_extended_l2, _unallocated_bitmap),
    "extended_l2_low": _damaged(_extended_l2, _refcount_zero(0)),
    "data_file_copied": _damaged(_data_file, _clear_copied_l2_at(64 * KiB)),
    "data_file_compressed": _damaged(_data_file, _data_file_compressed),
    "snapshot_l1_low": _damaged(_snapshots, _refcount_zero(5 * MiB)),
    "luks_low": _damaged(_luks, lambda p: set_refcount(p, 1, 0)),
    "bitmaps_leak": _damaged(_bitmaps, _leak_header),
    "dirty_lazy_refcounts": _dirty,
    "dirty_lazy_refcounts_many": _dirty_many,
}


# ------------------------------------------------------------------ running
def ours(path: Path, repair: str | None = None) -> CheckResult:
    writable = repair is not None
    fb = FileBackend(str(path), writable=writable)
    try:
        meta = Metadata(fb, writable=writable)
        return check_image(meta, repair=repair)
    finally:
        fb.close()


def qemu_spec(img: Img, path: Path) -> list[str]:
    """How qemu-img names the image (and the filename its JSON report carries last)."""
    if img.luks:
        return [
            "--object",
            SECRET,
            "--image-opts",
            f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0",
        ]
    return [str(path)]


def compare_with_qemu(
    qemu: Qemu, img: Img, tmp: Path, repair: str | None
) -> tuple[CheckResult, Path, Path]:
    """Run qemu-img check and check_image on identical images; assert identical reports.

    A check without repair writes nothing, so both run on the image itself; a repair
    runs on copies. Returns our human-output result and the copies repaired with the
    human output (QEMU's, ours).
    """
    repair_args = ["-r", repair] if repair else []
    results: list[tuple[CheckResult, Path, Path]] = []
    # JSON reports of -r leaks add nothing over -r all's (same keys): skip that run.
    outputs = ("human",) if repair == "leaks" else ("human", "json")
    for output in outputs:
        if repair is None:
            theirs = mine = img.path
        else:
            theirs = tmp / f"theirs-{repair}-{output}.qcow2"
            mine = tmp / f"mine-{repair}-{output}.qcow2"
            sparse_copy(img.path, theirs)
            sparse_copy(img.path, mine)
        spec = qemu_spec(img, theirs)
        proc = qemu.img("check", f"--output={output}", *repair_args, *spec, check=False)
        result = ours(mine, repair)
        where = f"{img.path.name} repair={repair} output={output}"
        assert result.exit_code() == proc.returncode, f"{where}: {result.messages}\n{proc}"
        assert result.messages == proc.stderr.splitlines(), where
        if output == "human":
            assert result.human_text() == proc.stdout, where
        else:
            filename = spec[-1]
            if proc.stdout:
                expected = json.loads(proc.stdout)
                got = result.to_json(filename)
                assert got == expected, where
                assert list(got) == list(expected), f"{where}: key order"
                assert result.json_text(filename) == proc.stdout, where
            else:
                assert result.error is not None, where
                assert result.json_text(filename) == "", where
        results.append((result, theirs, mine))
    return results[0]


def assert_repaired_alike(qemu: Qemu, img: Img, theirs: Path, mine: Path) -> None:
    """After the same repair, qemu-img must judge both copies the same way."""
    rc_theirs, report_theirs = _check_json(qemu, img, theirs)
    rc_mine, report_mine = _check_json(qemu, img, mine)
    assert rc_mine == rc_theirs, (report_mine, report_theirs)
    if img.bitmaps:
        # qemu-img stores the persistent bitmaps again (new clusters) when it closes a
        # repaired image; ours must simply be as clean as QEMU's.
        report_mine.pop("image-end-offset", None)
        report_theirs.pop("image-end-offset", None)
    assert report_mine == report_theirs
    if peek(mine, 4, ">I") >= 3:
        assert peek(mine, 72, ">Q") == peek(theirs, 72, ">Q"), "incompatible features"
    if rc_theirs == 0:
        # Both repaired images are sound: the guest sees the same disk.
        if img.luks:
            args = ["compare", "--object", SECRET, "--image-opts"]
            args += [qemu_spec(img, theirs)[-1], qemu_spec(img, mine)[-1]]
        else:
            args = ["compare", "-f", "qcow2", "-F", "qcow2", str(theirs), str(mine)]
        proc = qemu.img(*args, check=False)
        assert proc.returncode == 0, proc


def _check_json(qemu: Qemu, img: Img, path: Path) -> tuple[int, dict[str, object]]:
    proc = qemu.img("check", "--output=json", *qemu_spec(img, path), check=False)
    report: dict[str, object] = json.loads(proc.stdout) if proc.stdout.strip() else {}
    report.pop("filename", None)
    return proc.returncode, report


# -------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", sorted(CLEAN))
def test_clean_image_matches_qemu(qemu: Qemu, tmp_path: Path, name: str) -> None:
    img = CLEAN[name](qemu, tmp_path)
    result, _, _ = compare_with_qemu(qemu, img, tmp_path, None)
    assert result.exit_code() == 0
    assert result.human_text().startswith("No errors were found on the image.\n")
    assert result.messages == []


@pytest.mark.parametrize("name", ["v3", "snapshots", "compressed", "refcount1"])
def test_clean_image_repair_is_a_no_op(qemu: Qemu, tmp_path: Path, name: str) -> None:
    img = CLEAN[name](qemu, tmp_path)
    for repair in ("leaks", "all"):
        result, theirs, mine = compare_with_qemu(qemu, img, tmp_path, repair)
        assert result.corruptions_fixed == result.leaks_fixed == 0
        assert mine.read_bytes() == img.path.read_bytes()
        assert_repaired_alike(qemu, img, theirs, mine)


# Damage qemu-img check reports as nothing wrong (the corrupt bit alone is not an error).
INVISIBLE = {"corrupt_bit"}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_image_matches_qemu(qemu: Qemu, tmp_path: Path, name: str) -> None:
    img = DAMAGED[name](qemu, tmp_path)
    before = img.path.read_bytes()
    result, _, _ = compare_with_qemu(qemu, img, tmp_path, None)
    assert (result.exit_code() != 0) == (name not in INVISIBLE), "the damage must show"
    assert img.path.read_bytes() == before, "a check must not write"
    for repair in ("leaks", "all"):
        _, theirs, mine = compare_with_qemu(qemu, img, tmp_path, repair)
        assert_repaired_alike(qemu, img, theirs, mine)


def test_leak_counts_and_repair(qemu: Qemu, tmp_path: Path) -> None:
    img = DAMAGED["leak_header"](qemu, tmp_path)
    result = ours(img.path)
    assert (result.leaks, result.corruptions, result.exit_code()) == (1, 0, 3)
    assert result.messages == ["Leaked cluster 0 refcount=2 reference=1"]
    assert "\n1 leaked clusters were found on the image.\n" in result.human_text()
    fixed = ours(img.path, "leaks")
    assert (fixed.leaks_fixed, fixed.leaks, fixed.double_checked, fixed.exit_code()) == (
        1,
        0,
        True,
        0,
    )
    assert fixed.human_text().startswith(
        "The following inconsistencies were found and repaired:\n\n"
        "    1 leaked clusters\n    0 corruptions\n\nDouble checking the fixed image now...\n"
        "No errors were found on the image.\n"
    )
    rc, report = qemu.check(img.path)
    assert rc == 0 and "leaks" not in report


def test_leaked_data_cluster_is_also_a_copied_error(qemu: Qemu, tmp_path: Path) -> None:
    img = DAMAGED["leak_data"](qemu, tmp_path)
    entry = l2_entry(img.path, 0)[1]
    result = ours(img.path)
    assert (result.leaks, result.corruptions, result.exit_code()) == (1, 1, 2)
    assert result.messages == [
        f"Leaked cluster {host_cluster(img.path, 0)} refcount=3 reference=1",
        f"ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount=3",
    ]


def test_rebuild_updates_metadata_state(qemu: Qemu, tmp_path: Path) -> None:
    """After a rebuild the Metadata's header, reftable and refcounts follow the file."""
    img = DAMAGED["refcount_too_low"](qemu, tmp_path)
    fb = FileBackend(str(img.path), writable=True)
    try:
        meta = Metadata(fb, writable=True)
        old_reftable = meta.header.refcount_table_offset
        assert meta.get_refcount(host_cluster(img.path, 0)) == 0  # fills the refblock cache
        result = check_image(meta, repair="all")
        assert (result.corruptions_fixed, result.exit_code()) == (1, 0)
        assert "Rebuilding refcount structure" in result.messages
        assert meta.header.refcount_table_offset == peek(img.path, 48, ">Q") != old_reftable
        assert meta.header.refcount_table_clusters == peek(img.path, 56, ">I")
        assert meta.reftable.offset == meta.header.refcount_table_offset
        fresh_fb = FileBackend(str(img.path), writable=False)
        try:
            fresh = Metadata(fresh_fb, writable=False)
            assert list(meta.reftable.entries) == list(fresh.reftable.entries)
            clusters = img.path.stat().st_size >> meta.cluster_bits
            assert [meta.get_refcount(c) for c in range(clusters)] == [
                fresh.get_refcount(c) for c in range(clusters)
            ]
            assert meta.get_refcount(host_cluster(img.path, 0)) == 1
        finally:
            fresh_fb.close()
    finally:
        fb.close()
    assert qemu.check(img.path)[0] == 0


def test_copied_repair_updates_l1_in_memory(qemu: Qemu, tmp_path: Path) -> None:
    img = DAMAGED["copied_clear_l1"](qemu, tmp_path)
    fb = FileBackend(str(img.path), writable=True)
    try:
        meta = Metadata(fb, writable=True)
        assert not meta.l1.entries[0] & COPIED
        result = check_image(meta, repair="all")
        assert result.corruptions_fixed == 1
        assert result.messages[-1].startswith("Repairing OFLAG_COPIED L2 cluster: l1_index=0 ")
        assert meta.l1.entries[0] & COPIED
        assert meta.l1.entries[0] == peek(img.path, meta.header.l1_table_offset, ">Q")
    finally:
        fb.close()


def test_dirty_image_is_repaired_and_marked_clean(qemu: Qemu, tmp_path: Path) -> None:
    img = DAMAGED["dirty_lazy_refcounts"](qemu, tmp_path)
    checked = ours(img.path)
    assert checked.exit_code() == 2
    assert checked.messages[0].startswith("ERROR cluster ")
    assert peek(img.path, 72, ">Q") & C.INCOMPAT_DIRTY, "a check alone keeps the dirty bit"
    fixed = ours(img.path, "all")
    assert fixed.exit_code() == 0 and fixed.corruptions_fixed >= 1
    assert not peek(img.path, 72, ">Q") & C.INCOMPAT_DIRTY


def test_dirty_open_repair_drops_refcounts_past_the_end_of_the_file(
    qemu: Qemu, tmp_path: Path
) -> None:
    """Regression (tests/test_ops_powercut.py, grow on a lazy-refcounts image): a crash
    after a new cluster's refcount was made durable but before the write that grows the
    file over it leaves a refcount past the end of the file. The check compares
    refcounts only inside the file (QEMU's too), so the dirty open's repair kept it and
    the next allocation, placed after it, made it a visible leak. QEMU's own repair
    keeps it (shown on a copy); our read-write open of a dirty image drops it."""
    import shutil

    import qcow2aio

    path = tmp_path / "lazy.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,lazy_refcounts=on", path, "1M")
    qemu.io(path, "write -P 0x11 0 64k")
    size = path.stat().st_size
    assert size % 4096 == 0
    refblock = peek(path, peek(path, 48, ">Q"), ">Q")  # reftable[0] (16-bit refcounts)
    poke(path, refblock + 2 * (size // 4096), ">H", 1)  # the cluster just past the end
    poke(path, 72, ">Q", peek(path, 72, ">Q") | C.INCOMPAT_DIRTY)
    code, _ = qemu.check(path)
    assert code == 0, "qemu-img check does not see a refcount past the end of the file"
    copy = tmp_path / "qemu.qcow2"
    shutil.copyfile(path, copy)
    qemu.io(copy, "write -P 0x22 128k 4k")  # QEMU's dirty open repairs, then allocates
    code, rep = qemu.check(copy)
    assert code == 3 and rep["leaks"] == 1, rep

    with qcow2aio.open(path, "r+") as img:
        img.write_sync(128 << 10, b"\x22" * 4096)
    assert not peek(path, 72, ">Q") & C.INCOMPAT_DIRTY
    code, rep = qemu.check(path)
    assert code == 0, rep
    qemu.io(path, "read -P 0x11 0 64k", "read -P 0x22 128k 4k", "read -P 0 64k 64k")


def test_repair_clears_corrupt_bit_when_consistent(qemu: Qemu, tmp_path: Path) -> None:
    img = DAMAGED["corrupt_bit"](qemu, tmp_path)
    assert ours(img.path).exit_code() == 0
    assert peek(img.path, 72, ">Q") & C.INCOMPAT_CORRUPT, "a check alone keeps the bit"
    # Any repair mode that finds no corruption marks the image consistent (as QEMU does).
    assert ours(img.path, "leaks").exit_code() == 0
    assert not peek(img.path, 72, ">Q") & C.INCOMPAT_CORRUPT


def test_check_failure_reports_like_qemu(qemu: Qemu, tmp_path: Path) -> None:
    img = DAMAGED["refcount_too_low"](qemu, tmp_path)
    result = ours(img.path, "leaks")
    assert result.error == "Input/output error"
    assert result.exit_code() == 1
    assert result.human_text() == "" and result.json_text("x") == ""
    assert result.messages[-2:] == [
        "ERROR need to rebuild refcount structures",
        "qemu-img: Check failed: Input/output error",
    ]


def test_dirty_cached_tables_are_refused(qemu: Qemu, tmp_path: Path) -> None:
    img = CLEAN["v3"](qemu, tmp_path)
    fb = FileBackend(str(img.path), writable=False)
    try:
        meta = Metadata(fb, writable=False)
        l2 = meta.l1.entries[0] & L2_OFFSET
        table = meta.l2_table(l2)
        table.dirty = True
        with pytest.raises(AssertionError, match="dirty"):
            check_image(meta)
        table.dirty = False
        assert check_image(meta).exit_code() == 0
        with pytest.raises(Qcow2ReadOnlyError):
            check_image(meta, repair="leaks")
        with pytest.raises(ValueError):
            check_image(meta, repair="everything")
    finally:
        fb.close()


@pytest.mark.parametrize("order", range(7))
def test_refcount_codec_whole_block_matches_entry_access(order: int) -> None:
    """check's whole-block codec and the write path's per-entry access are one packing:
    decode(bytes) equals get() entry by entry, encode(decode(bytes)) gives the bytes back,
    and entry_span() covers exactly the bytes set() changes."""
    import random

    from qcow2aio.refcount import RefcountBlock, decode_entries, encode_entries

    rng = random.Random(order)
    size = 256
    n = size * 8 >> order
    top = (1 << (1 << order)) - 1
    raw = bytes(rng.getrandbits(8) for _ in range(size))
    blk = RefcountBlock(0, bytearray(raw), order)
    entries = decode_entries(raw, order)
    assert list(entries) == [blk.get(i) for i in range(n)]
    assert encode_entries(entries, order, size) == raw
    assert list(blk.decode(n // 3)) == list(entries[: n // 3])
    # Short entry lists are zero padded; a shorter byte count cuts.
    padded = encode_entries(entries[:3], order, size)
    assert list(decode_entries(padded, order)) == list(entries[:3]) + [0] * (n - 3)
    assert encode_entries(entries, order, size // 2) == raw[: size // 2]
    for _ in range(50):
        i = rng.randrange(n)
        before = bytes(blk.data)
        blk.set(i, rng.randint(0, top))
        start, end = blk.entry_span(i)
        changed = [k for k in range(size) if blk.data[k] != before[k]]
        assert all(start <= k < end for k in changed)
        assert list(decode_entries(blk.data, order)) == [blk.get(k) for k in range(n)]


def test_image_check_repairs_snapshot_table_like_qemu(qemu: Qemu, tmp_path: Path) -> None:
    """``Image.check(repair="all")`` on an open image whose v3 snapshot entries lack the
    16 bytes of extra data: the table is rewritten as by ``qemu-img check -r all`` (same
    counts, same snapshot list), the open image follows the new table, and a snapshot
    taken afterwards leaves an image qemu-img finds clean."""
    from test_cli_check import _damage, _snap_image

    import qcow2aio

    base = _snap_image(qemu, tmp_path)
    raw = bytearray(base.read_bytes())
    _damage("short-extra", raw)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    ours.write_bytes(raw)
    theirs.write_bytes(raw)
    rc, plain = qemu.check(theirs)
    assert rc == 2 and plain["corruptions"] == 2
    rc, report = qemu.check(theirs, extra_args=["-r", "all"])
    assert rc == 0 and report["corruptions-fixed"] == 2
    with qcow2aio.Image(str(ours), "r+") as img:
        assert img.check() == {**plain, "filename": str(ours)}
        got = img.check(repair="all")
        assert got == {**report, "filename": str(ours)}
        assert [s["name"] for s in img.snapshots()] == ["s1", "s2", "s3"]
        assert img.snapshots() == qemu.info(theirs)["snapshots"]
        img.create_snapshot_sync("s4")
    assert qemu.img("snapshot", "-l", str(ours)).stdout.count("\n") == 6
    assert qemu.check(ours)[0] == 0
    listed = [qemu.img("snapshot", "-l", str(p)).stdout.splitlines()[:5] for p in (ours, theirs)]
    assert listed[0] == listed[1]
