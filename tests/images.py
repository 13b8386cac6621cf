"""Building test images with QEMU's tools, and small raw pokes of their headers.

Every image is made by ``qemu-img``/``qemu-io`` (through the ``qemu`` fixture of
``conftest.py``); the pokes only touch cluster 0 in ways QEMU itself still accepts
(dropping the backing-format extension, adding unknown header fields or an unknown
extension, setting header bits), so ``qemu-img convert`` stays a valid oracle.
"""

from __future__ import annotations

import os
import random
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Qemu

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 112
INCOMPAT_OFFSET = 72  # incompatible_features, big-endian u64 (v3 only)

OptionValue = str | int | bool


def _opt(value: OptionValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def create(
    qemu: Qemu,
    path: Path,
    size: int | str | None,
    *,
    fmt: str = "qcow2",
    backing: str | os.PathLike[str] | None = None,
    backing_fmt: str | None = None,
    objects: tuple[str, ...] = (),
    options: Mapping[str, OptionValue] | None = None,
    **opts: OptionValue,
) -> Path:
    """``qemu-img create -f FMT [-b B -F BF] [-o k=v,...] PATH [SIZE]``; returns ``path``.

    Keyword arguments are ``-o`` options under qemu-img's own names (cluster_size,
    refcount_bits, extended_l2, data_file, data_file_raw, compression_type...); names
    that are not identifiers (``encrypt.format``) go in ``options``. Booleans become
    on/off.
    """
    opts = {**opts, **(options or {})}
    args: list[str | os.PathLike[str]] = ["create", "-q", "-f", fmt]
    for obj in objects:
        args += ["--object", obj]
    if backing is not None:
        args += ["-b", backing]
        if backing_fmt is not None:
            args += ["-F", backing_fmt]
    if opts:
        args += ["-o", ",".join(f"{k}={_opt(v)}" for k, v in opts.items())]
    args.append(path)
    if size is not None:
        args.append(str(size))
    qemu.img(*args)
    return path


def qemu_io(qemu: Qemu, path: Path, commands: list[str], *, fmt: str = "qcow2") -> None:
    """Run qemu-io commands on ``path`` (in batches, so argv stays short)."""
    for i in range(0, len(commands), 64):
        qemu.io(path, *commands[i : i + 64], fmt=fmt)


_NUMS = re.compile(r"(-?\d+)\s+(\d+)\s*$")


def touched(commands: list[str]) -> list[int]:
    """The start and end offsets of every ``write``/``discard`` command: read hot spots."""
    out: list[int] = []
    for cmd in commands:
        m = _NUMS.search(cmd)
        if m:
            off, length = int(m.group(1)), int(m.group(2))
            out += [off, off + length]
    return out


@dataclass
class WriteMix:
    """Knobs for :func:`random_commands`: how many of each kind of qemu-io command."""

    writes: int = 20
    zeroes: int = 4  # write -z (zero clusters, allocated ones when preallocated)
    unmaps: int = 2  # write -z -u
    discards: int = 2
    compressed: int = 0  # write -c of whole clusters
    granule: int = 1  # alignment of offsets/lengths of plain writes (1: any byte)
    max_len: int = 0  # 0: 3 clusters


def random_commands(rng: random.Random, size: int, cluster_size: int, mix: WriteMix) -> list[str]:
    """A seeded, varied list of qemu-io commands over a disk of ``size`` bytes."""
    max_len = mix.max_len or 3 * cluster_size
    cmds: list[str] = []

    def span(granule: int, longest: int) -> tuple[int, int]:
        longest = max(granule, min(longest, size))
        length = rng.randrange(1, longest // granule + 1) * granule
        off = rng.randrange(0, (size - length) // granule + 1) * granule
        return off, length

    for _ in range(mix.writes):
        off, length = span(mix.granule, max_len)
        cmds.append(f"write -P {rng.randrange(1, 256):#04x} {off} {length}")
    # Zeroing and discards are cluster-friendly but not always cluster-aligned.
    for _ in range(mix.zeroes):
        off, length = span(512, 2 * cluster_size)
        cmds.append(f"write -z {off} {length}")
    for _ in range(mix.unmaps):
        off, length = span(cluster_size, 2 * cluster_size)
        cmds.append(f"write -z -u {off} {length}")
    for _ in range(mix.discards):
        off, length = span(cluster_size, 2 * cluster_size)
        cmds.append(f"discard {off} {length}")
    for _ in range(mix.compressed):
        off, length = span(cluster_size, 2 * cluster_size)
        cmds.append(f"write -c -P {rng.randrange(1, 256):#04x} {off} {length}")
    rng.shuffle(cmds)
    return cmds


def mixed_content(rng: random.Random, size: int, chunk: int) -> bytes:
    """Random, repetitive and zero chunks (plus odd-sized runs) for ``convert -c`` sources."""
    out = bytearray()
    while len(out) < size:
        n = min(size - len(out), rng.choice((chunk // 2, chunk, 2 * chunk, chunk + 512, 512)))
        kind = rng.randrange(4)
        if kind == 0:
            out += rng.randbytes(n)
        elif kind == 1:
            word = f"qcow2aio-{rng.randrange(1000)}-".encode()
            out += (word * (n // len(word) + 1))[:n]
        elif kind == 2:
            out += bytes(n)
        else:
            # Mostly repetitive with a few random bytes: compressible, but not trivially.
            block = bytearray(bytes([rng.randrange(256)]) * n)
            for _ in range(max(1, n // 256)):
                block[rng.randrange(n)] = rng.randrange(256)
            out += block
    return bytes(out)


# ------------------------------------------------------------------ header pokes
@dataclass
class Cluster0:
    """The header area of an image: fixed fields, extensions, backing name."""

    fixed: bytearray
    extensions: list[tuple[int, bytes]]
    backing_name: bytes | None
    cluster_size: int

    @property
    def version(self) -> int:
        return int(struct.unpack_from(">I", self.fixed, 4)[0])


def read_cluster0(path: Path) -> Cluster0:
    with open(path, "rb") as f:
        head = f.read(2 * MiB)
    version = struct.unpack_from(">I", head, 4)[0]
    cluster_bits = struct.unpack_from(">I", head, 20)[0]
    cluster_size = 1 << cluster_bits
    hlen = V2_HEADER_LENGTH if version == 2 else struct.unpack_from(">I", head, 100)[0]
    bfo, bfs = struct.unpack_from(">QI", head, 8)
    end = bfo if bfo else cluster_size
    exts: list[tuple[int, bytes]] = []
    pos = hlen
    while pos + 8 <= end:
        magic, length = struct.unpack_from(">II", head, pos)
        pos += 8
        if magic == EXT_END:
            break
        exts.append((magic, bytes(head[pos : pos + length])))
        pos += (length + 7) & ~7
    name = bytes(head[bfo : bfo + bfs]) if bfo else None
    return Cluster0(bytearray(head[:hlen]), exts, name, cluster_size)


def write_cluster0(path: Path, c0: Cluster0) -> None:
    """Lay out ``c0`` as QEMU would (extensions, end marker, backing name) and write it."""
    fixed = bytearray(c0.fixed)
    if c0.version >= 3:
        struct.pack_into(">I", fixed, 100, len(fixed))
    body = bytearray()
    for magic, data in c0.extensions:
        rec = struct.pack(">II", magic, len(data)) + data
        body += rec + bytes(-len(rec) % 8)
    body += struct.pack(">II", EXT_END, 0)
    if c0.backing_name is not None:
        struct.pack_into(">QI", fixed, 8, len(fixed) + len(body), len(c0.backing_name))
        body += c0.backing_name
    else:
        struct.pack_into(">QI", fixed, 8, 0, 0)
    out = bytes(fixed + body)
    assert len(out) <= c0.cluster_size, "header area does not fit in cluster 0"
    with open(path, "r+b") as f:
        f.write(out + bytes(c0.cluster_size - len(out)))


def drop_backing_format(path: Path) -> None:
    """Remove the backing-format extension (qemu-img 7.2 refuses to write such images)."""
    c0 = read_cluster0(path)
    assert any(m == EXT_BACKING_FORMAT for m, _ in c0.extensions), "no backing format to drop"
    c0.extensions = [(m, d) for m, d in c0.extensions if m != EXT_BACKING_FORMAT]
    write_cluster0(path, c0)


def add_unknown_header_parts(path: Path, fields: bytes, ext_magic: int, ext_data: bytes) -> None:
    """Grow a v3 header by unknown ``fields`` and append an unknown extension."""
    c0 = read_cluster0(path)
    assert c0.version == 3 and len(c0.fixed) == V3_HEADER_LENGTH
    assert len(fields) % 8 == 0
    c0.fixed += fields
    c0.extensions.append((ext_magic, ext_data))
    write_cluster0(path, c0)


def set_incompatible_bits(path: Path, bits: int) -> None:
    with open(path, "r+b") as f:
        f.seek(INCOMPAT_OFFSET)
        cur = struct.unpack(">Q", f.read(8))[0]
        f.seek(INCOMPAT_OFFSET)
        f.write(struct.pack(">Q", cur | bits))


def incompatible_bits(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(INCOMPAT_OFFSET)
        return int(struct.unpack(">Q", f.read(8))[0])
