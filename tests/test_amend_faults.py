"""Injected I/O faults at every I/O step of ``Image.amend_sync`` (``qemu-img amend``).

As ``tests/test_faults.py::test_resize_fault_at_every_io_step`` does for resize: for
each kind of amend, the Nth I/O operation of the call (reads, writes, fdatasyncs,
truncates: so every fault point it reaches) fails with EIO, ENOSPC, a short write
(part written, then ENOSPC) or EIO from then on. After each:

* the call completed or raised a ``qcow2aio.Qcow2Error``;
* ``qemu-img check`` finds no corruption (leaks allowed); an image left dirty (lazy
  refcounts, the handle poisoned before it could clean up) must be one QEMU repairs
  (``qemu-img check -r all``) and our read-write open repairs;
* the image opens read-write with our driver, its guest content is the content
  before the amend (a grown tail reads zeros), and it takes a write;
* ``qemu-img info``'s options (compat, lazy refcounts, refcount width, size) are
  either all the old ones or all the new ones (a call that completed: the new ones).

Quick runs take one step per case (at 0, 1/4, 1/2 and 3/4 of the call for the four
error kinds: 24 steps in all); ``QCOW2AIO_STRESS=1`` every step (668 in all).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Qemu
from faults import ANY_IO, Fault, FaultState

import qcow2aio

STRESS = os.environ.get("QCOW2AIO_STRESS") == "1"
KiB = 1024
MiB = 1024 * KiB
ERRORS = ("eio", "enospc", "short", "eio-persistent")
QUICK_STEPS = 1  # per case in a quick run: 4 per amend kind (one per error kind)


@dataclass(frozen=True)
class AmendCase:
    """A QEMU-made image, what our driver does to it before the amend (no faults
    then), and the amend whose I/O steps fail."""

    build: Callable[[Qemu, Path], None]
    options: dict[str, Any]
    before: Callable[[qcow2aio.Image], None] | None = None


def _written(qemu: Qemu, path: Path, create: str, size: str, seed: int) -> None:
    """Data over most of the image, a snapshot sharing it, then scattered overwrites:
    refcounts of 1 and 2 in many refcount blocks."""
    qemu.img("create", "-q", "-f", "qcow2", "-o", create, path, size)
    span = qemu_size(size)
    qemu.io(path, f"write -P 1 0 {span * 3 // 4}")
    qemu.img("snapshot", "-c", "s", path)
    rng = random.Random(seed)
    offsets = [rng.randrange(0, span // 4096) * 4096 for _ in range(24)]
    qemu.io(path, *(f"write -P {i + 2} {off} 3k" for i, off in enumerate(offsets)))


def qemu_size(size: str) -> int:
    return int(size[:-1]) * {"K": KiB, "M": MiB}[size[-1]]


def _refcounts(qemu: Qemu, path: Path) -> None:
    # 512-byte clusters: at 64 bits one refcount block covers 64 clusters (32 KiB), so
    # the rebuild writes many blocks and a multi-cluster table.
    _written(qemu, path, "cluster_size=512", "1M", 5)


def _zero_clusters(qemu: Qemu, path: Path) -> None:
    """A v3 overlay over a full base: zero clusters with and without an offset, in the
    active tables and a snapshot's (downgrading writes clusters of zeros)."""
    base = path.parent / "base.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", base, "512k")
    qemu.io(base, "write -P 9 0 512k")
    qemu.img(
        "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", base, "-F", "qcow2", path
    )
    cmds = []
    for i in range(24):
        off = i * 16 * KiB
        cmds.append(f"write -P {i + 1} {off} 4k" if i % 3 == 0 else f"write -z {off} 4k")
    qemu.io(path, *cmds)
    qemu.img("snapshot", "-c", "s", path)
    qemu.io(path, "write -z 0 4k", "write -z 8k 4k")


def _v2(qemu: Qemu, path: Path) -> None:
    _written(qemu, path, "compat=0.10,cluster_size=4k", "1M", 6)


def _lazy(qemu: Qemu, path: Path) -> None:
    _written(qemu, path, "lazy_refcounts=on,cluster_size=512", "1M", 7)


def _dirty(img: qcow2aio.Image) -> None:
    """Writes under lazy refcounts: the dirty bit on disk, refcount blocks stale."""
    rng = random.Random(8)
    for i in range(40):
        img.write_sync(rng.randrange(0, 2000) * 512, bytes([i + 40]) * 1024)
    img.flush_sync()
    assert img.meta.header.dirty


def _grow(qemu: Qemu, path: Path) -> None:
    _written(qemu, path, "cluster_size=512", "1M", 9)


CASES = {
    "refcount-16to64": AmendCase(_refcounts, {"refcount_bits": 64}),
    "refcount-16to8": AmendCase(_refcounts, {"refcount_bits": 8}),
    "downgrade": AmendCase(_zero_clusters, {"compat": "0.10"}),
    "upgrade": AmendCase(_v2, {"compat": "1.1"}),
    "lazy-off-dirty": AmendCase(_lazy, {"lazy_refcounts": False}, _dirty),
    # 512-byte clusters: 32 KiB per L1 entry, so growing 1 MiB -> 3 MiB moves the L1 table.
    "grow": AmendCase(_grow, {"size": 3 * MiB}),
}


def _options(qemu: Qemu, path: Path) -> tuple[Any, ...]:
    info = qemu.info(path)
    data = info["format-specific"]["data"]
    return (data["compat"], data.get("lazy-refcounts"), data["refcount-bits"], info["virtual-size"])


def _sound(qemu: Qemu, path: Path, where: str) -> list[str]:
    """No corruption by QEMU's check; a dirty image must be one QEMU and we repair."""
    if qemu.info(path).get("dirty-flag"):
        rep_path = path.with_suffix(".rep")
        shutil.copyfile(path, rep_path)
        proc = qemu.img("check", "-r", "all", rep_path, check=False)
        if proc.returncode != 0:
            return [f"{where}: dirty, qemu-img check -r all exit {proc.returncode}"]
        with qcow2aio.open(path, "r+"):
            pass  # our open repairs it
    code, rep = qemu.check(path)
    if code not in (0, 3) or rep.get("corruptions"):
        return [f"{where}: qemu-img check {code} {rep}"]
    return []


def _cases() -> list[Any]:
    return [pytest.param(op, kind, id=f"{op}-{kind}") for op in CASES for kind in ERRORS]


def _run(
    case: AmendCase, template: Path, fault: Fault | None, path: Path
) -> tuple[FaultState, int, bool, bytes]:
    """The case on a copy of the template, faults on for the amend only: (the fault
    state, I/O operations of the amend, whether it raised, guest content before it)."""
    shutil.copyfile(template, path)
    state = FaultState(fault)
    state.enabled = False
    img = qcow2aio.open(path, "r+", io_backend=state.factory())
    if case.before is not None:
        case.before(img)
    content = img.read_sync(0, img.size)
    state.enabled = True
    start = state.ops
    failed = False
    try:
        img.amend_sync(**case.options)
    except qcow2aio.Qcow2Error:
        failed = True
    used = state.ops - start
    with contextlib.suppress(qcow2aio.Qcow2Error):
        img.close()
    return state, used, failed, content


@dataclass(frozen=True)
class Built:
    template: Path
    old_options: tuple[Any, ...]
    new_options: tuple[Any, ...]
    total: int  # I/O operations of the amend without faults


@pytest.fixture(scope="module")
def built(qemu_tools: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Each case's template, built once per module (four error kinds share it)."""
    cache: dict[str, Built] = {}

    def get(op: str) -> Built:
        if op not in cache:
            folder = tmp_path_factory.mktemp(f"amend-{op}")
            qemu = Qemu(qemu_tools["qemu-img"], qemu_tools["qemu-io"], folder)
            case = CASES[op]
            template = folder / "template.qcow2"
            case.build(qemu, template)
            probe = folder / "probe.qcow2"
            _, total, failed, _ = _run(case, template, None, probe)
            assert not failed and total >= 2
            old, new = _options(qemu, template), _options(qemu, probe)
            assert old != new
            cache[op] = Built(template, old, new, total)
        return cache[op]

    return get


@pytest.mark.parametrize(("op", "kind"), _cases())
def test_amend_fault_at_every_io_step(
    qemu: Qemu, tmp_path: Path, built: Any, op: str, kind: str
) -> None:
    case = CASES[op]
    b: Built = built(op)
    total, old_options, new_options = b.total, b.old_options, b.new_options
    if STRESS:
        steps = range(total)
    else:
        stride = max(1, total // QUICK_STEPS)
        steps = range(ERRORS.index(kind) * stride // len(ERRORS), total, stride)
    path = tmp_path / "f.qcow2"
    fired = failed_calls = 0
    problems: list[str] = []
    for k in steps:
        fault = Fault(ANY_IO, kind.split("-")[0], persistent=kind.endswith("persistent"), skip=k)
        try:
            state, _, failed, content = _run(case, b.template, fault, path)
        except Exception as exc:  # anything but a Qcow2Error from the call itself
            problems.append(f"step {k}: {exc!r}")
            continue
        fired += state.fired > 0
        failed_calls += failed
        where = f"step {k} ({state.injections[0].event if state.injections else '-'})"
        bad = _sound(qemu, path, where)
        if bad:
            problems += bad
            continue
        options = _options(qemu, path)
        if options not in (old_options, new_options) or (not failed and options != new_options):
            problems.append(f"{where}: options {options}, old {old_options}, new {new_options}")
        try:
            with qcow2aio.open(path, "r+") as img:
                got = img.read_sync(0, img.size)
                # (a grown tail reads zeros)
                if got != content + bytes(max(0, img.size - len(content))):
                    problems.append(f"{where}: guest content changed")
                img.write_sync(0, b"after")
                if img.read_sync(0, 5) != b"after":
                    problems.append(f"{where}: a write after reopening does not read back")
        except qcow2aio.Qcow2Error as exc:
            problems.append(f"{where}: reopen: {exc!r}")
            continue
        problems += _sound(qemu, path, f"{where}, after a reopen and a write")
    print(
        json.dumps(
            {"amend": op, "kind": kind, "io_ops": total, "steps": len(steps), "fired": fired}
            | {"failed_calls": failed_calls, "problems": len(problems)}
        )
    )
    assert not problems, "\n".join(problems[:10])
    assert fired == len(steps)


@pytest.mark.parametrize("bits", [64, 8])
def test_short_write_of_the_refcount_switch_keeps_the_old_header(
    qemu: Qemu, tmp_path: Path, bits: int
) -> None:
    """The refcount switch is one 52-byte header write (table offset .. refcount
    order). A short write of it put the new table's offset on disk with the old width:
    1,000-1,500 corruptions in ``qemu-img check`` (found by the sweep above). The old
    bytes are now written back: the old header, the new blocks leaked, nothing lost."""
    path = tmp_path / "r.qcow2"
    _refcounts(qemu, path)
    old_options = _options(qemu, path)
    state = FaultState(Fault("amend_refcount_switch", "short"))
    with qcow2aio.open(path, "r+", io_backend=state.factory()) as img:
        content = img.read_sync(0, img.size)
        with pytest.raises(qcow2aio.Qcow2IOError):
            img.amend_sync(refcount_bits=bits)
        assert [i.event for i in state.injections] == ["amend_refcount_switch"]
    code, rep = qemu.check(path)
    assert code == 3 and not rep.get("corruptions") and rep["leaks"] > 0, rep
    assert _options(qemu, path) == old_options
    with qcow2aio.open(path, "r+") as img:
        assert img.read_sync(0, img.size) == content
        img.amend_sync(refcount_bits=bits)  # and the amend can be done again
    assert _options(qemu, path)[2] == bits
    code, rep = qemu.check(path)
    assert code in (0, 3) and not rep.get("corruptions"), rep
