"""Injected I/O faults (EIO, ENOSPC, short writes; once or persistent) at every fault point.

For each fault point x error kind x once/persistent x driver (sync, async), a
seeded workload that exercises the point runs on a QEMU-made image through a
:class:`faults.FaultBackend`. Then:

* every error reached its caller as a ``qcow2aio.Qcow2Error`` (``Qcow2IOError``
  keeps the injected errno), and a fault that fired made some request fail;
* no failed request was acknowledged: successful reads, and the image read back
  after the handle is gone, hold only allowed content (:class:`faults.Oracle`:
  acknowledged data exact once a flush/close succeeded; a failed request's range
  old or new per cluster);
* after a failed fdatasync (a flush request, or one inside an eviction or a
  refcount-table growth) every later write and flush on that handle fails;
* ``qemu-img check`` finds no corruption (exit 0 or 3), and the image reopens
  read-write, takes writes, and checks clean or leaks-only again.

A second sweep fails the Nth I/O operation of a whole run (SQLite style).

``QCOW2AIO_STRESS=1`` runs every point on every workload where it occurs, with
several skip counts and seeds, and the Nth-operation sweep over every N.

Every workload also runs on LUKS and legacy-AES encrypted images (``NAME-luks``,
``NAME-aes``; short writes then tear at 512-byte sectors, see ``faults.short_part``):
in a quick run every point x kind once on each (LUKS: transient faults, AES:
persistent ones), under ``QCOW2AIO_STRESS=1`` the same full grid as plain images.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import Qemu
from crashsim import KEY
from faults import (
    ANY_IO,
    EXTRA_WORKLOADS,
    FAULT_POINTS,
    KINDS,
    POINT_WORKLOAD,
    WORKLOADS,
    Fault,
    FaultState,
    Oracle,
    RunResult,
    Template,
    Templates,
    Workload,
    copy_image,
    encrypted,
    make_ops,
    run_async,
    run_sync,
    templates_fixture,
    writes_read_back,
)
from sim import crypt_open

import qcow2aio

STRESS = os.environ.get("QCOW2AIO_STRESS") == "1"
PLAIN_WORKLOADS: dict[str, Workload] = {**WORKLOADS, **EXTRA_WORKLOADS}
CRYPTS = ("luks", "aes")
ALL_WORKLOADS: dict[str, Workload] = {
    **PLAIN_WORKLOADS,
    **{f"{n}-{c}": encrypted(wl, c) for c in CRYPTS for n, wl in PLAIN_WORKLOADS.items()},
}


templates = templates_fixture("fault-templates", ALL_WORKLOADS)


def _attach(request: pytest.FixtureRequest, cases: int, fired: int, failed: int, bad: int) -> None:
    """Counts for the session summary (``-p tests.crashsim``)."""
    row = {"kind": "faults", "cases": cases, "fired": fired, "failed_requests": failed}
    row["problems"] = bad
    request.node.user_properties.append((KEY, json.dumps(row)))


def run_case(
    qemu: Qemu,
    tpl: Template,
    tmp_path: Path,
    fault: Fault | None,
    driver: str,
    seed: int,
    *,
    must_fire: bool,
) -> tuple[FaultState, RunResult, list[str]]:
    """Run one workload under ``fault`` and return (state, result, problems found)."""
    wl = tpl.workload
    path = copy_image(tpl, tmp_path / f"case-{driver}-{seed}.qcow2")
    state = FaultState(fault, sector_atomic=wl.crypt != "plain")
    oracle = Oracle(tpl.content, wl.unit)
    ops = make_ops(wl, seed, tpl.hot)
    if driver == "sync":
        res = run_sync(path, wl, ops, state, oracle)
    else:
        res = asyncio.run(run_async(path, wl, ops, state, oracle))
    state.enabled = False
    problems = list(res.violations)
    if must_fire and not state.fired:
        problems.append(f"the fault never fired (events seen: {sorted(state.events)})")
    if state.fired_reportable and not res.errors:
        problems.append(
            f"fault fired {state.fired_reportable}x but no request failed (error swallowed)"
        )
    q_opts, q_name = wl.qemu(path)
    code, rep = qemu.check(q_name, extra_args=q_opts)
    if code not in (0, 3):
        problems.append(f"qemu-img check after the run: exit {code}: {rep}")
        return state, res, problems
    mix = fault is not None and fault.kind == "short"
    with qcow2aio.open(path, **crypt_open(wl.crypt)) as img:
        data = img.read_sync(0, wl.size)
    problems += [f"after the run: {p}" for p in oracle.problems(0, data, disk=True, mix=mix)]
    # The image reopens read-write (plain backend) and takes writes.
    rng = random.Random(seed)
    writes = [
        (rng.randrange(0, wl.size - 3000), rng.randbytes(3000)),
        (wl.size - wl.cluster_size - 100, rng.randbytes(wl.cluster_size + 100)),
    ]
    try:
        with wl.open(path) as img:
            if not writes_read_back(img, data, writes):
                problems.append("reopened image: the disk does not read as written")
    except qcow2aio.Qcow2Error as exc:
        problems.append(f"reopen read-write and write failed: {exc!r}")
    code, rep = qemu.check(q_name, extra_args=q_opts)
    if code not in (0, 3):
        problems.append(f"qemu-img check after reopen+write: exit {code}: {rep}")
    return state, res, problems


# ------------------------------------------------------------------- the grid
def _grid() -> list[tuple[str, str, str, bool, str, int]]:
    """(point, workload, kind, persistent, driver, skip) cases.

    Quick: every point x kind x once/persistent on the point's workload, the driver
    alternating so that each point and each kind runs on both; on its encrypted
    workloads every point x kind, transient on LUKS, persistent on AES. Stress: the full
    cross product with both drivers, on every workload (encrypted ones included),
    skipping 0, 1 and 4 matches first.
    """
    cases = []
    for point in FAULT_POINTS:
        wls = [POINT_WORKLOAD[point], *(f"{POINT_WORKLOAD[point]}-{c}" for c in CRYPTS)]
        skips = [0, 1, 4] if STRESS else [0]
        for wl in list(ALL_WORKLOADS) if STRESS else wls:
            crypt = ALL_WORKLOADS[wl].crypt
            for k, kind in enumerate(KINDS):
                for persistent in (False, True):
                    if not STRESS and crypt != "plain" and persistent != (crypt == "aes"):
                        continue
                    drivers = ["sync", "async"]
                    if not STRESS:
                        drivers = [drivers[(k + persistent) % 2]]
                    for driver in drivers:
                        for skip in skips:
                            cases.append((point, wl, kind, persistent, driver, skip))
    return cases


def _case_id(case: tuple[str, str, str, bool, str, int]) -> str:
    point, wl, kind, persistent, driver, skip = case
    when = "persist" if persistent else "once"
    return f"{point}-{wl}-{kind}-{when}-{driver}" + (f"-skip{skip}" if skip else "")


@pytest.mark.parametrize("case", _grid(), ids=_case_id)
def test_fault_point(
    qemu: Qemu,
    templates: Templates,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    case: tuple[str, str, str, bool, str, int],
) -> None:
    point, wl_name, kind, persistent, driver, skip = case
    fault = Fault(point, kind, persistent, skip)
    designated = POINT_WORKLOAD[point] == wl_name.split("-")[0] and skip == 0
    seed = FAULT_POINTS.index(point) * 7 + (3 if persistent else 0)
    state, res, problems = run_case(
        qemu, templates(wl_name), tmp_path, fault, driver, seed, must_fire=designated
    )
    _attach(request, 1, bool(state.fired), len(res.errors), len(problems))
    assert not problems, f"{fault} on {wl_name}/{driver}:\n" + "\n".join(problems)
    if state.fired:
        assert res.errors, "the error must reach a caller"
        # A flush that failed poisons the handle: the run must have seen it refuse.
        if state.flush_failed or res.flush_request_failed:
            assert not res.closed_ok


# ------------------------------------------------------------- Nth operation
def _count_ops(templates: Templates, tmp_path: Path, wl_name: str, seed: int) -> int:
    tpl = templates(wl_name)
    path = copy_image(tpl, tmp_path / "dry.qcow2")
    state = FaultState(None)
    wl = tpl.workload
    run_sync(path, wl, make_ops(wl, seed, tpl.hot), state, Oracle(tpl.content, wl.unit))
    return state.ops


NTH_WORKLOADS = list(ALL_WORKLOADS) if STRESS else ["mixed", "snap", "mixed-luks", "snap-aes"]


@pytest.mark.parametrize("driver", ["sync", "async"])
@pytest.mark.parametrize("wl_name", NTH_WORKLOADS)
def test_every_nth_operation(
    qemu: Qemu,
    templates: Templates,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    wl_name: str,
    driver: str,
) -> None:
    """Fail the Nth I/O operation of the run (once, or from then on), for a sweep of N."""
    seed = 11
    total = _count_ops(templates, tmp_path, wl_name, seed)
    rng = random.Random(f"{wl_name}-{driver}")
    if STRESS:
        # Every N (a stride of them on the 1,300-operation reftable-growth workload).
        ns = list(range(1, total + 1, max(1, total // 300)))
    else:
        ns = sorted(rng.sample(range(1, total + 1), min(6, total)))
    bad: list[str] = []
    fired = failed = 0
    for i, n in enumerate(ns):
        kind = KINDS[i % len(KINDS)]
        persistent = (i // len(KINDS)) % 2 == 1
        fault = Fault(ANY_IO, kind, persistent, n - 1)
        case_dir = tmp_path / f"n{n}"
        case_dir.mkdir()
        state, res, problems = run_case(
            qemu, templates(wl_name), case_dir, fault, driver, seed, must_fire=False
        )
        fired += bool(state.fired)
        failed += len(res.errors)
        bad += [f"{fault}: {p}" for p in problems]
    _attach(request, len(ns), fired, failed, len(bad))
    print(f"nth-op sweep {wl_name}/{driver}: {len(ns)} of {total} operations, {fired} fired")
    assert not bad, "\n".join(bad[:30])
    assert fired >= len(ns) // 2


# ------------------------------------------------------- regression tests
def _fresh(qemu: Qemu, tmp_path: Path, opts: str, size: str = "8M") -> Path:
    path = tmp_path / "r.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", opts, str(path), size)
    return path


def _sound(qemu: Qemu, path: Path, *, leaks_ok: bool = True) -> None:
    code, rep = qemu.check(path)
    assert code in ((0, 3) if leaks_ok else (0,)), rep
    with qcow2aio.open(path, "r+") as img:
        img.write_sync(12345, b"after")
        assert img.read_sync(12345, 5) == b"after"
    code, rep = qemu.check(path)
    assert code in ((0, 3) if leaks_ok else (0,)), rep


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_failed_eviction_flush_poisons_the_handle(qemu: Qemu, tmp_path: Path, driver: str) -> None:
    """Regression: an fdatasync failing inside an L2 eviction did not poison the image, so
    later writes and flushes succeeded (fsyncgate). Refusals keep the errno."""
    path = _fresh(qemu, tmp_path, "cluster_size=512")
    state = FaultState(Fault("flush", "enospc", persistent=False))
    img = qcow2aio.open(path, "r+", io_backend=state.factory(), l2_cache_size=512)
    img.write_sync(0, b"a" * 512)  # dirty L2 table for the first 32 KiB
    with pytest.raises(qcow2aio.Qcow2IOError) as info:
        img.write_sync(1 << 20, b"b" * 512)  # another table: evicts the first, flush fails
    assert info.value.errno == errno.ENOSPC
    assert state.injections[0].event == "l2_evict"

    async def later() -> None:
        with pytest.raises(qcow2aio.Qcow2IOError) as info:
            await img.write(2 << 20, b"c")
        assert info.value.errno == errno.ENOSPC
        with pytest.raises(qcow2aio.Qcow2IOError):
            await img.flush()

    if driver == "async":
        asyncio.run(later())
    with pytest.raises(qcow2aio.Qcow2IOError) as info:
        img.write_sync(3 << 20, b"d")
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(qcow2aio.Qcow2IOError):
        img.flush_sync()
    img.close()
    _sound(qemu, path)


def test_failed_reftable_growth_leaves_a_sound_image(qemu: Qemu, tmp_path: Path) -> None:
    """Regression: a write error while growing the refcount table left the new table in
    memory but not in the header; later refcount blocks hung off a table the file never
    used (thousands of corruptions). Now the handle is poisoned and the file only leaks."""
    path = _fresh(qemu, tmp_path, "cluster_size=512,refcount_bits=64")
    state = FaultState(Fault("reftable_grow", "eio", persistent=False))
    img = qcow2aio.open(path, "r+", io_backend=state.factory())
    data = random.Random(1).randbytes(256 << 10)
    failed = False
    for i in range(12):
        try:
            img.write_sync(i * len(data), data)
            img.flush_sync()
        except qcow2aio.Qcow2IOError:
            failed = True
    assert state.fired == 1 and failed
    with pytest.raises(qcow2aio.Qcow2IOError):
        img.write_sync(0, b"x")
    img.close()
    _sound(qemu, path)


def test_refblock_eviction_failure_keeps_the_new_block_linked(qemu: Qemu, tmp_path: Path) -> None:
    """Regression: a new refcount block was cached before the reftable pointed at it; when
    caching it evicted another block whose write failed, it stayed cached but unlinked,
    its cluster was handed out again, and the next flush overwrote that cluster with it
    (the overlap check then set the corrupt bit)."""
    path = _fresh(qemu, tmp_path, "cluster_size=512,refcount_bits=64")
    state = FaultState(Fault("refblock_update", "eio", persistent=False))
    img = qcow2aio.open(path, "r+", io_backend=state.factory(), refcount_cache_size=512)
    data = random.Random(2).randbytes(256 << 10)
    with pytest.raises(qcow2aio.Qcow2IOError):
        img.write_sync(0, data)
    assert state.fired == 1
    img.write_sync(0, data)
    img.write_sync(len(data), data)
    img.flush_sync()
    assert not img.meta.header.corrupt
    img.close()
    with qcow2aio.open(path) as ro:
        assert ro.read_sync(0, len(data)) == data
    _sound(qemu, path)


def test_l2_eviction_failure_keeps_the_new_table_linked(qemu: Qemu, tmp_path: Path) -> None:
    """A new L2 table is linked into L1 before it is cached: when caching it evicts a
    dirty table whose write fails, the new table is not orphaned (it used to leak)."""
    path = _fresh(qemu, tmp_path, "cluster_size=512")
    state = FaultState(Fault("l2_alloc", "eio", persistent=False))
    img = qcow2aio.open(path, "r+", io_backend=state.factory(), l2_cache_size=512)
    img.write_sync(0, b"a" * 512)
    with pytest.raises(qcow2aio.Qcow2IOError):
        img.write_sync(1 << 20, b"b" * 512)  # its new table evicts the first: write fails
    assert state.fired == 1
    img.write_sync(1 << 20, b"b" * 512)
    img.close()
    with qcow2aio.open(path) as ro:
        assert ro.read_sync(0, 512) == b"a" * 512
        assert ro.read_sync(1 << 20, 512) == b"b" * 512
    _sound(qemu, path, leaks_ok=False)


# ------------------------------------------------------- image operations: resize
# Snapshot create/apply/delete get an error of every kind at every I/O step in
# tests/test_snapshots.py (test_io_error_at_every_step). Here the same for each kind of
# resize: every I/O operation it does (so every fault point it reaches: l1 growth,
# refcount blocks and table, L2 tables, data clusters, truncate, fsyncs) fails in turn
# with each error kind, once or from then on.
RESIZE_OPS = {
    # (cluster size, size before, size after, preallocation)
    "grow": (512, 1 << 20, 3 << 20, "off"),  # 32 KiB per L1 entry: the L1 table moves
    "grow-metadata": (4096, 1 << 20, (5 << 20) + 512, "metadata"),
    "grow-falloc": (4096, 1 << 20, 5 << 20, "falloc"),
    "grow-full": (512, 1 << 20, 2 << 20, "full"),
    "shrink": (4096, 2 << 20, (1 << 20) + 1536, "off"),
}


def _resize_fault_cases() -> list[Any]:
    out = []
    for op in RESIZE_OPS:
        for kind in ("eio", "enospc", "short", "eio-persistent"):
            out.append(pytest.param(op, kind, id=f"{op}-{kind}"))
    return out


@pytest.mark.parametrize("event", ["cow_write", "resize_truncate"])
def test_prealloc_metadata_failure_links_nothing_past_eof(
    qemu: Qemu, tmp_path: Path, event: str
) -> None:
    """Regression (found by the stress run of the test below, grow-metadata, step 9):
    metadata preallocation linked each run of new clusters before writing the copy-on-
    write tail and before growing the file over them. A failed tail write or truncate
    left linked entries (written back on close) pointing past the end of the file:
    ~257 corruptions for ``qemu-img check``. Now the data and the file growth come
    first, so the failure leaves the new clusters unlinked (leaks at most)."""
    from faults import Fault, FaultState

    cs, old, new, prealloc = RESIZE_OPS["grow-metadata"]
    path = tmp_path / "g.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", path, str(old))
    data = random.Random(9).randbytes(old - 4096)
    with qcow2aio.open(path, "r+") as img:
        img.write_sync(0, data)
    state = FaultState(Fault(event, "eio"))
    img = qcow2aio.open(path, "r+", io_backend=state.factory())
    with pytest.raises(qcow2aio.Qcow2IOError):
        img.resize_sync(new, preallocation=prealloc)
    assert state.fired == 1
    img.close()
    code, rep = qemu.check(path)
    assert code in (0, 3) and not rep.get("corruptions"), rep
    with qcow2aio.open(path, "r+") as img:
        assert img.size == old
        assert img.read_sync(0, len(data)) == data
        img.resize_sync(new, preallocation=prealloc)  # the retry completes
    code, rep = qemu.check(path)
    assert code in (0, 3) and not rep.get("corruptions"), rep
    qemu.io(path, f"read -P 0 {old} {new - old}")


@pytest.mark.parametrize(("op", "kind"), _resize_fault_cases())
def test_resize_fault_at_every_io_step(
    qemu: Qemu, tmp_path: Path, request: pytest.FixtureRequest, op: str, kind: str
) -> None:
    """The call fails with a Qcow2Error (or completes); the file then checks without
    corruption (leaks at most), has the old or the new size, keeps the data below
    both, reopens read-write and takes a write. Quick runs take every few steps;
    QCOW2AIO_STRESS=1 every step."""
    import contextlib

    from faults import ANY_IO, Fault, FaultState

    import qcow2aio

    cs, old, new, prealloc = RESIZE_OPS[op]
    template = tmp_path / "template.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", template, str(old))
    data = random.Random(op).randbytes(min(old, new) - 4096)
    with qcow2aio.open(template, "r+") as img:
        img.write_sync(0, data)
    shrink = new < old

    def run(fault: Fault | None, path: Path) -> tuple[FaultState, int, bool]:
        path.write_bytes(template.read_bytes())
        state = FaultState(fault)
        state.enabled = False
        img = qcow2aio.open(path, "r+", io_backend=state.factory())
        state.enabled = True
        start = state.ops
        failed = False
        try:
            img.resize_sync(new, shrink=shrink, preallocation=prealloc)
        except qcow2aio.Qcow2Error:
            failed = True
        used = state.ops - start
        with contextlib.suppress(qcow2aio.Qcow2Error):
            img.close()
        return state, used, failed

    _, total, _ = run(None, tmp_path / "probe.qcow2")
    assert total > 3
    stride = 1 if STRESS else max(1, total // 8)
    path = tmp_path / "f.qcow2"
    fired = failed_calls = 0
    problems: list[str] = []
    for k in range(0, total, stride):
        fault = Fault(ANY_IO, kind.split("-")[0], persistent=kind.endswith("persistent"), skip=k)
        state, _, failed = run(fault, path)
        fired += state.fired > 0
        failed_calls += failed
        code, rep = qemu.check(path)
        if code not in (0, 3) or rep.get("corruptions"):
            problems.append(f"step {k}: qemu-img check {code} {rep}")
            continue
        with qcow2aio.open(path, "r+") as img:
            if img.size not in (old, new):
                problems.append(f"step {k}: size {img.size}")
            if img.read_sync(0, len(data)) != data:
                problems.append(f"step {k}: data below both sizes changed")
            img.write_sync(0, b"after")
            if img.read_sync(0, 5) != b"after":
                problems.append(f"step {k}: a write after reopening does not read back")
        code, rep = qemu.check(path)
        if code not in (0, 3) or rep.get("corruptions"):
            problems.append(f"step {k}: after the reopen and a write, qemu-img check {code}")
    steps = len(range(0, total, stride))
    _attach(request, steps, fired, failed_calls, len(problems))
    print(json.dumps({"resize": op, "kind": kind, "io_ops": total, "steps": steps, "fired": fired}))
    assert not problems, "\n".join(problems[:10])
    assert fired == steps
