"""Fault injection for qcow2aio, in the style of QEMU's blkdebug, plus what the tests drive it with.

:class:`FaultBackend` is a :class:`qcow2aio.io.FileBackend` that fails a chosen
operation. A :class:`Fault` names *where* (a blkdebug-style event name carried
by every I/O call, ``"flush"`` for any fdatasync, or ``"*"`` for any I/O
operation, which with ``skip`` gives "fail the Nth operation"), *how* (EIO,
ENOSPC, or a short write: part of the data is written, then ENOSPC) and *how
long* (once, or from then on). One :class:`FaultState` is shared by every file
a factory opens (the image, its data file, its backing files).

The rest is the harness of ``test_faults.py``: seeded workloads (:class:`Workload`,
:func:`make_ops`), QEMU-made template images, the two drivers (sync, async), and
:class:`Oracle`, which keeps per cluster the contents a reader may legitimately
see after failures (the failed request's range may hold old or new data, per
cluster; acknowledged data is exact once a flush or close succeeded).

A workload's ``crypt`` makes its image LUKS or legacy-AES encrypted (:func:`encrypted`):
the template is created by ``qcow2aio.create``, prefilled and snapshotted by QEMU with
the secret, and every open and every QEMU tool call passes the passphrase.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import random
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Qemu
from sim import crypt_create, crypt_open, qemu_image

import qcow2aio
from qcow2aio.io import BackendFactory, Buffer, FileBackend

_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)

# The fault points of the issue, under the event names qcow2aio's I/O calls carry.
FAULT_POINTS: tuple[str, ...] = (
    "l1_update",
    "l2_load",
    "l2_update",
    "l2_alloc",
    "refblock_load",
    "refblock_update",
    "refblock_alloc",
    "reftable_grow",
    "cluster_alloc",
    "cluster_free",
    "cow_read",
    "cow_write",
    "data_write",
    "flush",
)
KINDS: tuple[str, ...] = ("eio", "enospc", "short")
ANY_IO = "*"
IO_OPS = ("read", "write", "flush", "truncate")


@dataclass(frozen=True)
class Fault:
    """Fail the operations matching ``point`` after letting ``skip`` of them through."""

    point: str  # event name; "flush" = any fdatasync; "*" = any I/O operation
    kind: str = "eio"  # "eio" | "enospc" | "short"
    persistent: bool = False  # once (transient) or every matching operation from then on
    skip: int = 0

    def __str__(self) -> str:
        when = "persistent" if self.persistent else "once"
        at = f"op#{self.skip + 1}" if self.point == ANY_IO else f"{self.point}+{self.skip}"
        return f"{at}:{self.kind}:{when}"


@dataclass(frozen=True)
class Injection:
    op: str
    event: str
    path: str
    op_number: int


class FaultState:
    """Decides, for every operation of every file of one image, whether it fails."""

    def __init__(self, fault: Fault | None = None, *, sector_atomic: bool = False) -> None:
        self.fault = fault
        # An encrypted image's short writes tear at 512-byte sectors only (see short_part).
        self.sector_atomic = sector_atomic
        self.enabled = True
        self.matched = 0
        self.ops = 0  # I/O operations seen (reads, writes, flushes, truncates)
        self.injections: list[Injection] = []
        self.flush_failed = False  # some fdatasync was failed
        self.events: dict[str, int] = {}  # event name -> operations seen
        # Operations are decided on the event loop thread and on I/O threads alike.
        self._lock = threading.Lock()

    @property
    def fired(self) -> int:
        return len(self.injections)

    @property
    def fired_reportable(self) -> int:
        """Injections the driver must report: a failed hole punch is swallowed by
        design (the punched clusters are free already; they just keep their bytes)."""
        return sum(1 for i in self.injections if i.event != "punch_hole")

    def factory(self) -> BackendFactory:
        def make(path: str, writable: bool) -> FileBackend:
            return FaultBackend(path, writable, self)

        return make

    def decide(self, op: str, event: str, path: str) -> str | None:
        """The kind of fault to inject into this operation, or None to let it run."""
        with self._lock:
            return self._decide(op, event, path)

    def _decide(self, op: str, event: str, path: str) -> str | None:
        if op != "event":
            self.ops += 1
        key = "flush" if op == "flush" else event
        self.events[key] = self.events.get(key, 0) + 1
        f = self.fault
        if f is None or not self.enabled:
            return None
        if f.point == ANY_IO:
            match = op != "event"
        elif f.point == "flush":
            match = op == "flush"
        else:
            match = event == f.point
        if not match:
            return None
        self.matched += 1
        if self.matched <= f.skip:
            return None
        if self.injections and not f.persistent:
            return None
        self.injections.append(Injection(op, event, path, self.ops))
        if op == "flush":
            self.flush_failed = True
        return f.kind


def _error(kind: str, op: str, event: str, path: str) -> qcow2aio.Qcow2IOError:
    code = errno.EIO
    if kind == "enospc" or (kind == "short" and op == "write"):
        code = errno.ENOSPC
    return qcow2aio.Qcow2IOError(
        f"{op} ({event}) on {path!r} failed: injected {errno.errorcode[code]}", code
    )


def short_part(buffers: Sequence[Buffer], sector_atomic: bool = False) -> bytes:
    """What a short write gets onto the file: the first half, cut at 512 B (8 B when small).

    ``sector_atomic`` (encrypted images): always at 512 B. A disk writes a sector whole
    or not at all, and an encrypted sector torn inside decrypts to garbage in any
    driver, QEMU's included: that would test the disk model, not the driver.
    """
    data = b"".join(buffers)
    n = len(data)
    cut = (n // 2) & ~511 if n >= 1024 or sector_atomic else (n // 2) & ~7
    return data[:cut]


class FaultBackend(FileBackend):
    """A FileBackend whose system calls fail when its :class:`FaultState` says so.

    It overrides only the engine's ``_sys_*`` hooks (one system call each, reached
    from the sync, inline async and threaded async paths alike) and :meth:`event`, so
    the image keeps every fast path of the plain backend (``plain_reads`` and
    ``plain_writes`` stay True): faults hit the I/O production does.
    """

    def __init__(self, path: str, writable: bool, state: FaultState) -> None:
        super().__init__(path, writable)
        self.state = state

    def _decide(self, op: str, event: str) -> str | None:
        return self.state.decide(op, event, self.path)

    def _fail(self, kind: str, op: str) -> OSError:
        code = errno.EIO
        if kind == "enospc" or (kind == "short" and op == "write"):
            code = errno.ENOSPC
        return OSError(code, f"injected {errno.errorcode[code]}")

    def event(self, name: str) -> None:
        kind = self._decide("event", name)
        if kind is not None:
            raise _error(kind, "event", name, self.path)

    def _sys_pread(self, length: int, offset: int, event: str) -> bytes:
        kind = self._decide("read", event)
        if kind is not None:
            raise self._fail(kind, "read")
        return super()._sys_pread(length, offset, event)

    def _sys_preadv(self, buffers: list[Any], offset: int, event: str, flags: int = 0) -> int:
        if flags & _RWF_NOWAIT:
            # An inline attempt: a page-cache miss (EAGAIN, or a short count) is no
            # operation, the blocking read that follows it is one (and decides).
            n = super()._sys_preadv(buffers, offset, event, flags)
            if n < sum(memoryview(b).nbytes for b in buffers):
                return n
            kind = self._decide("read", event)
            if kind is not None:
                raise self._fail(kind, "read")
            return n
        kind = self._decide("read", event)
        if kind is not None:
            raise self._fail(kind, "read")
        return super()._sys_preadv(buffers, offset, event, flags)

    def _sys_pwritev(self, buffers: list[memoryview], offset: int, event: str) -> int:
        kind = self._decide("write", event)
        if kind is None:
            return super()._sys_pwritev(buffers, offset, event)
        if kind == "short":
            part = short_part(buffers, self.state.sector_atomic)
            if part:
                super()._sys_pwritev([memoryview(part)], offset, event)
        raise self._fail(kind, "write")

    def _sys_fdatasync(self, event: str) -> None:
        kind = self._decide("flush", event)
        if kind is not None:
            raise self._fail(kind, "flush")
        super()._sys_fdatasync(event)

    def _sys_ftruncate(self, size: int, event: str) -> None:
        kind = self._decide("truncate", event)
        if kind is not None:
            raise self._fail(kind, "truncate")
        super()._sys_ftruncate(size, event)

    def _sys_fallocate(self, mode: int, offset: int, length: int, event: str) -> None:
        # A hole punch ("punch_hole"): counted as a write, failing as one.
        kind = self._decide("write", event)
        if kind is not None:
            raise self._fail(kind, "write")
        super()._sys_fallocate(mode, offset, length, event)


# ---------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Workload:
    """An image recipe (made by qemu-img/qemu-io) and the shape of the requests run on it."""

    name: str
    size: int
    cluster_size: int
    refcount_bits: int = 16
    compat: str = "1.1"
    lazy: bool = False
    extended_l2: bool = False
    backing: bool = False  # a raw backing file full of seeded random bytes
    prefill: bool = False  # data written by qemu-io before the test
    snapshot: bool = False  # an internal snapshot over the prefilled data
    small_caches: bool = True  # one L2 table and one refcount block cached
    nops: int = 30
    big_writes: int = 0  # sequential 256 KiB writes first (file growth, reftable growth)
    discards: bool = True
    # An external data file (absolute name in the header). A run writes into the
    # template's data file itself, so such a template must belong to one test.
    data_file: bool = False
    data_file_raw: bool = False
    crypt: str = "plain"  # sim.CRYPTS: the image is LUKS or legacy-AES encrypted

    @property
    def unit(self) -> int:
        """The allocation unit: a request is atomic (old or new) per cluster, or per
        subcluster with extended L2 entries (in-place subcluster allocation)."""
        return self.cluster_size // 32 if self.extended_l2 else self.cluster_size

    def open(
        self, path: Path, mode: str = "r+", backend: BackendFactory | None = None
    ) -> qcow2aio.Image:
        """Open an image of this workload (small caches when asked for)."""
        cache = self.cluster_size if self.small_caches else None
        return qcow2aio.open(
            path,
            mode,
            io_backend=backend,
            l2_cache_size=cache,
            refcount_cache_size=cache,
            **crypt_open(self.crypt),
        )

    def qemu(self, path: str | os.PathLike[str]) -> tuple[list[str], str]:
        """(options, name) naming the image to QEMU's tools (the secret when encrypted)."""
        return qemu_image(path, self.crypt)


def encrypted(wl: Workload, crypt: str) -> Workload:
    """The workload on an encrypted image (named ``NAME-CRYPT``)."""
    return dataclasses.replace(wl, name=f"{wl.name}-{crypt}", crypt=crypt)


KiB = 1024
MiB = 1024 * KiB

WORKLOADS: dict[str, Workload] = {
    # 512 B clusters, 64-bit refcounts: a refcount block covers 32 KiB of file and the
    # first reftable cluster 2 MiB, so refblock_alloc and reftable_grow come quickly.
    "grow": Workload("grow", 8 * MiB, 512, refcount_bits=64, nops=24, big_writes=10),
    # Backing file + internal snapshot over prefilled data: COW from the backing file
    # (cow_write) and from our own shared clusters (cow_read), shared L2 tables copied
    # (l2_alloc), refcount 2 -> 1 decreases (cluster_free).
    "snap": Workload("snap", 1 * MiB, 4096, backing=True, prefill=True, snapshot=True, nops=30),
    # 512 B clusters over a backing file, discards, zero writes and flushes.
    "mixed": Workload("mixed", 2 * MiB, 512, backing=True, prefill=True, nops=36),
}
# Stress mode adds these.
EXTRA_WORKLOADS: dict[str, Workload] = {
    "v2": Workload("v2", 2 * MiB, 1024, compat="0.10", prefill=True, nops=30),
    "ext_l2": Workload(
        "ext_l2", 2 * MiB, 16384, extended_l2=True, backing=True, prefill=True, nops=30
    ),
    "rc1": Workload("rc1", 2 * MiB, 512, refcount_bits=1, prefill=True, snapshot=False, nops=30),
    "big": Workload("big", 8 * MiB, 65536, prefill=True, snapshot=True, nops=30, big_writes=3),
}

# Which workload exercises each fault point in the quick grid.
POINT_WORKLOAD: dict[str, str] = {
    "l1_update": "mixed",
    "l2_load": "mixed",
    "l2_update": "mixed",
    "l2_alloc": "mixed",
    "refblock_load": "grow",
    "refblock_update": "mixed",
    "refblock_alloc": "grow",
    "reftable_grow": "grow",
    "cluster_alloc": "mixed",
    "cluster_free": "mixed",
    "cow_read": "snap",
    "cow_write": "snap",
    "data_write": "mixed",
    "flush": "mixed",
}


@dataclass(frozen=True)
class Op:
    kind: str  # "write" | "discard" | "zero" | "read" | "flush"
    offset: int = 0
    length: int = 0
    data: bytes = b""

    def __str__(self) -> str:
        if self.kind == "flush":
            return "flush"
        return f"{self.kind} {self.offset:#x}+{self.length:#x}"


def make_ops(wl: Workload, seed: int, hot: Sequence[tuple[int, int]] = ()) -> list[Op]:
    """A seeded request sequence: writes of every shape, discards, zero writes, reads, flushes.

    ``hot`` ranges (the template's own data) get a share of the partial writes: with
    a snapshot, those need COW from the image's own clusters.
    """
    rng = random.Random(seed)
    cs = wl.cluster_size
    ops: list[Op] = []
    pos = 0
    for _ in range(wl.big_writes):
        n = 256 * KiB
        if pos + n > wl.size:
            break
        ops.append(Op("write", pos, n, rng.randbytes(n)))
        pos += n
        if rng.random() < 0.3:
            ops.append(Op("flush"))
    lengths = [512, 700, cs // 2 or 256, cs, cs + 512, 3 * cs + 100, 5000]
    for _ in range(wl.nops):
        r = rng.random()
        if r < 0.5:
            n = min(rng.choice(lengths), wl.size)
            off = rng.randrange(0, wl.size - n + 1)
            if hot and rng.random() < 0.4:
                h_off, h_len = rng.choice(hot)
                off = min(wl.size - n, h_off + rng.randrange(0, h_len))
            if rng.random() < 0.3:
                off &= ~511
            ops.append(Op("write", off, n, rng.randbytes(n)))
        elif r < 0.68 and wl.discards:
            # Mostly over data written earlier, so that clusters really get freed.
            k = rng.randrange(1, 4)
            off = rng.randrange(0, wl.size // cs - k + 1) * cs
            written = [op for op in ops if op.kind == "write"]
            if written and rng.random() < 0.75:
                w = rng.choice(written)
                off = min(w.offset // cs * cs, wl.size - k * cs)
            ops.append(Op("discard" if r < 0.6 else "zero", off, k * cs))
        elif r < 0.82:
            n = min(rng.choice([512, cs, 4 * cs]), wl.size)
            off = rng.randrange(0, wl.size - n + 1)
            ops.append(Op("read", off, n))
        else:
            ops.append(Op("flush"))
    ops.append(Op("flush"))
    return ops


def batches(ops: list[Op], cluster_size: int, width: int = 4) -> list[list[Op]]:
    """Group requests for the async driver: cluster-disjoint batches, flushes alone."""
    out: list[list[Op]] = []
    cur: list[Op] = []
    used: set[int] = set()

    def clusters(op: Op) -> set[int]:
        return set(
            range(op.offset // cluster_size, (op.offset + op.length - 1) // cluster_size + 1)
        )

    for op in ops:
        if op.kind == "flush":
            if cur:
                out.append(cur)
            out.append([op])
            cur, used = [], set()
            continue
        cl = clusters(op)
        if len(cur) >= width or cl & used:
            out.append(cur)
            cur, used = [], set()
        cur.append(op)
        used |= cl
    if cur:
        out.append(cur)
    return out


# ---------------------------------------------------------------- templates
@dataclass
class Template:
    path: Path
    content: bytes  # guest-visible content (qemu-img convert)
    workload: Workload
    hot: list[tuple[int, int]]  # guest ranges allocated in the image itself (qemu-img map)


def build_template(qemu: Qemu, folder: Path, wl: Workload) -> Template:
    """The workload's starting image, made by QEMU's tools; the backing path is absolute."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{wl.name}.qcow2"
    opts = [
        f"cluster_size={wl.cluster_size}",
        f"refcount_bits={wl.refcount_bits}",
        f"compat={wl.compat}",
    ]
    if wl.compat != "0.10":
        opts.append(f"lazy_refcounts={'on' if wl.lazy else 'off'}")
        opts.append(f"extended_l2={'on' if wl.extended_l2 else 'off'}")
    if wl.data_file:
        opts.append(f"data_file={folder.resolve() / (wl.name + '.data')}")
        opts.append(f"data_file_raw={'on' if wl.data_file_raw else 'off'}")
    args: list[str] = ["create", "-q", "-f", "qcow2", "-o", ",".join(opts)]
    base = folder / f"{wl.name}-base.raw"
    if wl.backing:
        base.write_bytes(random.Random(wl.name).randbytes(wl.size))
        args += ["-b", str(base), "-F", "raw"]
    if wl.crypt == "plain":
        qemu.img(*args, str(path), str(wl.size))
    else:
        qcow2aio.create(
            path,
            wl.size,
            cluster_size=wl.cluster_size,
            refcount_bits=wl.refcount_bits,
            compat=wl.compat,
            lazy_refcounts=wl.lazy,
            extended_l2=wl.extended_l2,
            data_file=folder.resolve() / (wl.name + ".data") if wl.data_file else None,
            data_file_raw=wl.data_file_raw,
            backing_file=str(base) if wl.backing else None,
            backing_fmt="raw" if wl.backing else None,
            **crypt_create(wl.crypt),
        )
    q_opts, q_name = wl.qemu(path)
    if wl.prefill:
        rng = random.Random(f"prefill-{wl.name}")
        cmds = []
        for _ in range(8):
            n = rng.choice([wl.cluster_size, 3 * wl.cluster_size, 20000])
            off = rng.randrange(0, wl.size - n) & ~511
            cmds.append(f"write -P {rng.randrange(1, 256):#04x} {off} {n}")
        if q_opts:
            qemu.io(q_name, *cmds, fmt=None, extra_args=q_opts)
        else:
            qemu.io(path, *cmds)
    if wl.snapshot:
        qemu.img("snapshot", "-c", "s1", *q_opts, q_name)
    content = qemu.convert_raw(q_name, extra_args=q_opts)
    mapping = json.loads(qemu.img("map", "--output=json", *q_opts, q_name).stdout)
    hot = [(m["start"], m["length"]) for m in mapping if m.get("data") and m.get("depth") == 0]
    return Template(path, content, wl, hot)


Templates = Callable[[str], Template]


def templates_fixture(label: str, workloads: Mapping[str, Workload]) -> Any:
    """A module-scoped pytest fixture ``templates``: ``templates(name)`` builds the named
    workload's starting image once per module (in a folder named ``label``)."""

    @pytest.fixture(scope="module")
    def templates(
        qemu_tools: dict[str, str], tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[Templates]:
        folder = tmp_path_factory.mktemp(label)
        q = Qemu(qemu_tools["qemu-img"], qemu_tools["qemu-io"], folder)
        cache: dict[str, Template] = {}

        def get(name: str) -> Template:
            if name not in cache:
                cache[name] = build_template(q, folder, workloads[name])
            return cache[name]

        yield get

    return templates


def writes_read_back(img: qcow2aio.Image, before: bytes, writes: list[tuple[int, bytes]]) -> bool:
    """Write ``writes`` through the sync path and flush; True when the whole disk then
    reads as ``before`` (its content until now) with them applied. The "reopens and
    takes writes" check of the fault and power-cut harnesses."""
    want = bytearray(before)
    for off, buf in writes:
        img.write_sync(off, buf)
        want[off : off + len(buf)] = buf
    img.flush_sync()
    return img.read_sync(0, len(want)) == want


def copy_image(template: Template, dest: Path) -> Path:
    shutil.copyfile(template.path, dest)
    return dest


# ------------------------------------------------------------------- oracle
def _dedupe(items: list[bytes], cap: int = 24) -> list[bytes]:
    out: list[bytes] = []
    for b in items:
        if b not in out:
            out.append(b)
    return out[-cap:]


@dataclass
class Oracle:
    """Per cluster (allocation unit): what the image may read now, and what the disk may hold.

    ``now[c]``: the contents cluster ``c`` may have for the open handle (several
    after a failed request). ``disk[c]``: the contents it may have after the handle
    is gone: everything possible since the last successful flush (or close).
    """

    base: bytes
    cluster_size: int
    now: dict[int, list[bytes]] = field(default_factory=dict)
    disk: dict[int, list[bytes]] = field(default_factory=dict)

    def _initial(self, c: int) -> bytes:
        cs = self.cluster_size
        return self.base[c * cs : (c + 1) * cs]

    def current(self, c: int) -> list[bytes]:
        return self.now.get(c) or [self._initial(c)]

    def apply(self, offset: int, data: bytes, ok: bool) -> None:
        cs = self.cluster_size
        end = offset + len(data)
        for c in range(offset // cs, (end - 1) // cs + 1 if data else offset // cs):
            lo = max(offset, c * cs)
            hi = min(end, (c + 1) * cs)
            cur = self.current(c)
            piece = data[lo - offset : hi - offset]
            new = [p[: lo - c * cs] + piece + p[hi - c * cs :] for p in cur]
            self.disk[c] = _dedupe(self.disk.get(c, list(cur)) + new)
            self.now[c] = _dedupe(new if ok else cur + new)

    def settle(self, offset: int, seen: bytes, *, mix: bool) -> list[str]:
        """After a failed request, the handle showed ``seen`` at ``offset``: per unit it
        must be one of the candidates, which collapse to it (so they never multiply)."""
        cs = self.cluster_size
        out: list[str] = []
        end = offset + len(seen)
        for c in range(offset // cs, (end - 1) // cs + 1 if seen else offset // cs):
            if not (offset <= c * cs and (c + 1) * cs <= end):
                continue  # only whole units are compared
            piece = seen[c * cs - offset : (c + 1) * cs - offset]
            cur = self.current(c)
            if piece in cur:
                self.now[c] = [piece]
            elif mix and _is_mix(piece, cur):
                self.now[c] = [piece]
                self.disk[c] = _dedupe([*self.disk.get(c, list(cur)), piece])
            else:
                out.append(f"unit {c} (guest {c * cs:#x}): the handle shows neither old nor new")
        return out

    def flushed(self) -> None:
        """A flush succeeded: the disk holds what the handle holds."""
        self.disk = {c: list(v) for c, v in self.now.items()}

    def problems(
        self, offset: int, data: bytes, *, disk: bool, mix: bool, limit: int = 5
    ) -> list[str]:
        """Clusters of ``data`` (read at ``offset``) that hold no allowed content."""
        cs = self.cluster_size
        out: list[str] = []
        end = offset + len(data)
        for c in range(offset // cs, (end - 1) // cs + 1 if data else offset // cs):
            lo = max(offset, c * cs)
            hi = min(end, (c + 1) * cs)
            got = data[lo - offset : hi - offset]
            table = self.disk if disk else self.now
            cands = [
                p[lo - c * cs : hi - c * cs]
                for p in (table.get(c) or self.now.get(c) or [self._initial(c)])
            ]
            if got in cands or (mix and _is_mix(got, cands)):
                continue
            first = next(
                (i for i in range(len(got)) if all(got[i] != p[i] for p in cands)), len(got)
            )
            out.append(
                f"cluster {c} (guest {c * cs:#x}): content is none of {len(cands)} allowed "
                f"versions (first odd byte at +{lo - c * cs + first:#x})"
            )
            if len(out) >= limit:
                break
        return out


def _is_mix(got: bytes, cands: list[bytes]) -> bool:
    """Every byte of ``got`` comes from some allowed version (short writes tear anywhere,
    and several of them may tear one cluster at different points)."""
    n = len(got)
    return all(any(got[i] == p[i] for p in cands) for i in range(n))


# -------------------------------------------------------------------- drivers
@dataclass
class RunResult:
    """What happened to each request of a workload run under a fault."""

    errors: list[tuple[str, BaseException]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    closed_ok: bool = False
    opened: bool = False
    flush_request_failed: bool = False


def _check_error(res: RunResult, what: str, exc: BaseException) -> None:
    res.errors.append((what, exc))
    if not isinstance(exc, qcow2aio.Qcow2Error):
        res.violations.append(f"{what}: {type(exc).__name__} is not a Qcow2Error: {exc}")
    elif isinstance(exc, qcow2aio.Qcow2IOError) and exc.errno not in (errno.EIO, errno.ENOSPC):
        res.violations.append(f"{what}: Qcow2IOError without the injected errno: {exc.errno}")


def _after_result(
    res: RunResult,
    state: FaultState,
    oracle: Oracle,
    op: Op,
    exc: BaseException | None,
    poisoned: bool,
    got: bytes | None,
    mix: bool,
    peek: Callable[[int, int], bytes | None] | None = None,
) -> None:
    """Book one finished request: oracle update, poison rule, read-back of successful reads.

    After a failed write/discard/zero, ``peek`` reads the range through the handle (faults
    off): it must show old or new data per unit, and the oracle settles on what it shows.
    """
    if exc is not None:
        _check_error(res, str(op), exc)
        if op.kind == "flush":
            res.flush_request_failed = True
    elif poisoned and op.kind != "read":
        res.violations.append(f"{op}: acknowledged after a failed flush (handle not poisoned)")
    if op.kind == "write":
        oracle.apply(op.offset, op.data, exc is None)
    elif op.kind in ("discard", "zero"):
        oracle.apply(op.offset, bytes(op.length), exc is None)
    elif op.kind == "flush" and exc is None:
        oracle.flushed()
    elif op.kind == "read" and got is not None:
        for p in oracle.problems(op.offset, got, disk=False, mix=mix):
            res.violations.append(f"{op}: read returned wrong data: {p}")
    if exc is not None and op.kind in ("write", "discard", "zero") and peek is not None:
        seen = peek(op.offset, op.length)
        if seen is not None:
            for p in oracle.settle(op.offset, seen, mix=mix):
                res.violations.append(f"{op} failed: {p}")


def run_sync(
    path: Path, wl: Workload, ops: list[Op], state: FaultState, oracle: Oracle
) -> RunResult:
    res = RunResult()
    mix = state.fault is not None and state.fault.kind == "short"
    try:
        img = wl.open(path, "r+", state.factory())
    except BaseException as exc:
        _check_error(res, "open", exc)
        return res
    res.opened = True
    for op in ops:
        poisoned = state.flush_failed or res.flush_request_failed
        fired = state.fired_reportable
        got: bytes | None = None
        err: BaseException | None = None
        try:
            if op.kind == "write":
                img.write_sync(op.offset, op.data)
            elif op.kind == "read":
                got = img.read_sync(op.offset, op.length)
            elif op.kind == "flush":
                img.flush_sync()
            else:
                # No sync API for these: a private loop runs the async call to the end.
                asyncio.run(_zero_or_discard(img, op))
        except Exception as exc:
            err = exc
        if err is None and state.fired_reportable > fired:
            res.violations.append(f"{op}: a fault fired inside it, yet it succeeded")
        _after_result(res, state, oracle, op, err, poisoned, got, mix, _peeker(img, state))
    poisoned = state.flush_failed or res.flush_request_failed
    try:
        img.close()
    except Exception as exc:
        _check_error(res, "close", exc)
    else:
        res.closed_ok = not poisoned
        if not poisoned:
            oracle.flushed()
    return res


def _peeker(img: qcow2aio.Image, state: FaultState) -> Callable[[int, int], bytes | None]:
    def peek(offset: int, length: int) -> bytes | None:
        state.enabled = False
        try:
            return img.read_sync(offset, length)
        except qcow2aio.Qcow2Error:
            return None
        finally:
            state.enabled = True

    return peek


async def _zero_or_discard(img: qcow2aio.Image, op: Op) -> None:
    if op.kind == "discard":
        await img.discard(op.offset, op.length)
    else:
        await img.write_zeroes(op.offset, op.length, unmap=op.offset % 3 == 0)


async def run_async(
    path: Path, wl: Workload, ops: list[Op], state: FaultState, oracle: Oracle
) -> RunResult:
    res = RunResult()
    mix = state.fault is not None and state.fault.kind == "short"
    try:
        img = wl.open(path, "r+", state.factory())
    except BaseException as exc:
        _check_error(res, "open", exc)
        return res
    res.opened = True

    async def one(op: Op) -> bytes | None:
        if op.kind == "write":
            await img.write(op.offset, op.data)
        elif op.kind == "read":
            return await img.read(op.offset, op.length)
        elif op.kind == "flush":
            await img.flush()
        else:
            await _zero_or_discard(img, op)
        return None

    for batch in batches(ops, wl.cluster_size):
        poisoned = state.flush_failed or res.flush_request_failed
        results = await asyncio.gather(*(one(op) for op in batch), return_exceptions=True)
        for op, r in zip(batch, results, strict=True):
            if isinstance(r, BaseException):
                _after_result(res, state, oracle, op, r, poisoned, None, mix, _peeker(img, state))
            else:
                _after_result(res, state, oracle, op, None, poisoned, r, mix)
    poisoned = state.flush_failed or res.flush_request_failed
    try:
        await img.aclose()
    except Exception as exc:
        _check_error(res, "close", exc)
    else:
        res.closed_ok = not poisoned
        if not poisoned:
            oracle.flushed()
    return res
