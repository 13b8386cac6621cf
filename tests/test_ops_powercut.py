"""Power cuts inside each image operation, counted per operation.

Each run records one operation between writes (tests/crashsim.py's journal, as in
tests/test_powercut.py): the image is first prepared without recording (writes, and
for apply/delete two snapshots), then the recorded part writes a little, runs the
operation, writes a little more and closes. Every crash state the journal yields
(every prefix; per completed flush, subsets of the later writes; torn last writes)
goes through test_powercut's ``Verifier``: our check and ``qemu-img check`` (sampled,
and on every state ours flags; they must agree), acknowledged and flushed writes kept,
reopen read-write, take writes, check again. Per operation:

* ``create``/``apply``/``delete``: every snapshot a state lists holds its content
  (applied on a copy; ``apply`` is journaled as a whole-disk write of the snapshot's
  content, so a state may show either);
* ``grow`` (preallocation off, across L1 entries: the L1 table is relocated),
  ``grow-metadata``, ``grow-falloc``, ``grow-full``: a state has the old or the new
  size, and a grown range reads as zeros;
* ``shrink``: the old or the new size; the dropped tail is journaled as a zero
  request, so a state of the old size may show it dropped in part, and a state of the
  new size reads as the workload's content cut there.

``make test`` runs one small case per operation (sampled states);
``QCOW2AIO_STRESS=1`` runs enough cases for over 2,000 states per operation
(``-p tests.crashsim`` prints the table; rows are named ``ops/OPERATION/...``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import Qemu
from crashsim import Journal, build_states
from faults import Templates, Workload, encrypted, templates_fixture
from test_powercut import Recorded, Verifier, _attach, _snapshots_hold

import qcow2aio

STRESS = os.environ.get("QCOW2AIO_STRESS") == "1"
KiB = 1024
MiB = 1024 * KiB

OPS_WL: dict[str, Workload] = {
    # Default caches: ordering is the operation's and the flush's.
    "c4k": Workload("c4k", 1 * MiB, 4096, backing=True, prefill=True, small_caches=False),
    # 512-byte clusters, one-table caches: an L1 entry covers 32 KiB (every grow moves
    # the L1 table), evictions all along.
    "c512": Workload("c512", 1 * MiB, 512, backing=True, prefill=True),
    "lazy": Workload("lazy", 1 * MiB, 4096, lazy=True, prefill=True, small_caches=False),
    "ext_l2": Workload("ext_l2", 1 * MiB, 16384, extended_l2=True, backing=True, prefill=True),
    "c64k": Workload("c64k", 4 * MiB, 65536, prefill=True, small_caches=False),
}
OPS_WL["c4k-luks"] = encrypted(OPS_WL["c4k"], "luks")
OPS_WL["c512-aes"] = encrypted(OPS_WL["c512"], "aes")

templates = templates_fixture("ops-powercut-templates", OPS_WL)

OPERATIONS = (
    "create",
    "apply",
    "delete",
    "grow",
    "grow-metadata",
    "grow-falloc",
    "grow-full",
    "shrink",
)


def _cases() -> list[Any]:
    """(operation, workload, driver, seed)."""
    if not STRESS:
        quick = {
            "create": ("c512", "async"),
            "apply": ("c4k-luks", "sync"),
            "delete": ("lazy", "sync"),
            "grow": ("c512", "sync"),
            "grow-metadata": ("ext_l2", "async"),
            "grow-falloc": ("c4k", "sync"),
            "grow-full": ("c512", "async"),
            "shrink": ("c4k", "async"),
        }
        return [pytest.param(op, wl, drv, 1) for op, (wl, drv) in quick.items()]
    out = []
    for op in OPERATIONS:
        names = list(OPS_WL)
        if op.startswith("grow-"):
            # Preallocated clusters of an encrypted image hold no ciphertext (QEMU too):
            # no content to judge them by.
            names = [n for n in names if OPS_WL[n].crypt == "plain"]
        for name in names:
            for driver in ("sync", "async"):
                for seed in (1, 2):
                    out.append(pytest.param(op, name, driver, seed))
    return out


QUICK_STATES = 40
# Under stress: every state of a run up to this many, else a sample (the preallocating
# runs build up to ~600): over 2,000 states per operation in all, in a few minutes.
STRESS_STATES = 160


def _writes(rng: random.Random, wl: Workload, limit: int, n: int) -> list[tuple[int, bytes]]:
    out = []
    for _ in range(n):
        length = rng.choice([512, 4096, wl.cluster_size, 3 * 4096 + 512])
        off = rng.randrange(0, (limit - length) // 512) * 512
        out.append((off, rng.randbytes(length)))
    return out


def _new_size(op: str, wl: Workload) -> int:
    if op == "shrink":
        return wl.size // 2 + 7 * 512  # inside a cluster: a partial last cluster
    # Past several L1 entries (4 KiB clusters: 2 MiB each; 512 B: 32 KiB each).
    return wl.size * 3 + 512 * 5


@dataclasses.dataclass
class OpRun:
    rec: Recorded
    sizes: tuple[int, ...] | None
    snapshots: dict[str, bytes]  # content of every snapshot the run may leave


def _record(tpl_get: Templates, name: str, op: str, folder: Path, driver: str, seed: int) -> OpRun:
    tpl = tpl_get(name)
    wl = tpl.workload
    rng = random.Random(f"{op}:{name}:{seed}")
    path = folder / "recorded.qcow2"
    shutil.copyfile(tpl.path, path)
    cur = bytearray(tpl.content)
    snaps: dict[str, bytes] = {}
    # Unrecorded preparation.
    with wl.open(path, "r+") as img:
        for off, data in _writes(rng, wl, wl.size, 4):
            img.write_sync(off, data)
            cur[off : off + len(data)] = data
        if op in ("apply", "delete"):
            img.create_snapshot_sync("a")
            snaps["a"] = bytes(cur)
            for off, data in _writes(rng, wl, wl.size, 4):
                img.write_sync(off, data)
                cur[off : off + len(data)] = data
            img.create_snapshot_sync("b")
            snaps["b"] = bytes(cur)
            for off, data in _writes(rng, wl, wl.size, 3):
                img.write_sync(off, data)
                cur[off : off + len(data)] = data
    initial = path.read_bytes()
    base = bytes(cur)
    journal = Journal()
    new = _new_size(op, wl) if op.startswith(("grow", "shrink")) else wl.size
    limit = min(new, wl.size)
    before = _writes(rng, wl, wl.size, 4)
    after = _writes(rng, wl, limit, 3)
    img = wl.open(path, "r+", journal.factory(path))
    content = bytearray(base)
    for off, data in before:
        content[off : off + len(data)] = data

    def issue_op() -> list[int]:
        # Every operation starts with a flush of everything acknowledged before it.
        rids = [journal.issue("flush")]
        if op == "apply":
            rids.append(journal.issue("write", 0, wl.size, snaps["a"]))
        elif op == "shrink":
            if wl.backing:
                # A state of the old size whose tail's L2 entries are already cleared
                # shows the backing file there (QEMU's reads too): either may land.
                # Acknowledged before the zero request: a finished shrink reads zeros.
                backing = (tpl.path.parent / f"{wl.name}-base.raw").read_bytes()
                rids.append(journal.issue("write", new, wl.size - new, backing[new:]))
            rids.append(journal.issue("zero", new, wl.size - new))
        return rids

    if op == "create":
        snaps["c"] = bytes(content)
    elif op == "delete":
        del snaps["a"]
    prealloc = op.split("-", 1)[1] if op.startswith("grow-") else "off"

    def call_sync() -> None:
        if op in ("create", "apply", "delete"):
            arg = {"create": "c", "apply": "a", "delete": "a"}[op]
            getattr(img, f"{op}_snapshot_sync")(arg)
        elif op == "shrink":
            img.resize_sync(new, shrink=True)
        else:
            img.resize_sync(new, preallocation=prealloc)

    async def call_async() -> None:
        if op in ("create", "apply", "delete"):
            arg = {"create": "c", "apply": "a", "delete": "a"}[op]
            await getattr(img, f"{op}_snapshot")(arg)
        elif op == "shrink":
            await img.resize(new, shrink=True)
        else:
            await img.resize(new, preallocation=prealloc)

    if driver == "sync":
        for off, data in before:
            rid = journal.issue("write", off, len(data), data)
            img.write_sync(off, data)
            journal.ack(rid)
        rids = issue_op()
        call_sync()
        for rid in rids:
            journal.ack(rid)
        for off, data in after:
            rid = journal.issue("write", off, len(data), data)
            img.write_sync(off, data)
            journal.ack(rid)
        rid = journal.issue("flush")
        img.close()
        journal.ack(rid)
    else:

        async def run() -> None:
            async def w(off: int, data: bytes) -> None:
                rid = journal.issue("write", off, len(data), data)
                await img.write(off, data)
                journal.ack(rid)

            async def concurrently(writes: list[tuple[int, bytes]]) -> None:
                # Batches of writes to distinct clusters run at once (overlapping ones
                # in flight together have no defined order to judge them by).
                cs = wl.cluster_size
                batch: list[tuple[int, bytes]] = []
                for off, data in [*writes, (-1, b"")]:
                    span = set(range(off // cs, (off + len(data) - 1) // cs + 1))
                    taken = {
                        c for o, d in batch for c in range(o // cs, (o + len(d) - 1) // cs + 1)
                    }
                    if off < 0 or span & taken:
                        await asyncio.gather(*(w(o, d) for o, d in batch))
                        batch = []
                    batch.append((off, data))

            await concurrently(before)
            rids = issue_op()
            await call_async()
            for rid in rids:
                journal.ack(rid)
            await concurrently(after)
            rid = journal.issue("flush")
            await img.aclose()
            journal.ack(rid)

        asyncio.run(run())
    with qcow2aio.open(path, "r", **({} if wl.crypt == "plain" else {"passphrase": "pw"})) as chk:
        if chk.size != new:
            raise AssertionError(f"the recorded run ended at size {chk.size}, not {new}")
    template = dataclasses.replace(tpl, content=base)
    rec = Recorded(template, initial, journal, [], image_file=str(path))
    sizes = (wl.size, new) if new != wl.size else None
    return OpRun(rec, sizes, snaps)


@pytest.mark.parametrize(("op", "wl_name", "driver", "seed"), _cases())
def test_power_cut_inside_operation(
    qemu: Qemu,
    templates: Templates,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    op: str,
    wl_name: str,
    driver: str,
    seed: int,
) -> None:
    run = _record(templates, wl_name, op, tmp_path, driver, seed)
    rec = run.rec
    wl = rec.template.workload
    rng = random.Random(seed)
    states = build_states(rec.journal, rng, randoms=16 if STRESS else 4)
    total = len(states)
    cap = STRESS_STATES if STRESS else QUICK_STATES
    if total > cap:
        last = max(states, key=lambda s: (len(s.ops), s.torn is None))
        states = [last, *rng.sample(states, cap)]
    v = Verifier(qemu, rec, tmp_path, qemu_every=20 if STRESS else 8, sizes=run.sizes)
    failures: list[str] = []
    held = 0
    for i, st in enumerate(states):
        failures += [f"[{st.label}] {p}" for p in v.verify(st)]
        if run.snapshots and i % 5 == 0:
            v.path.write_bytes(rec.state_files(st)[0])
            problems = _snapshots_hold(wl, v.path, tmp_path / "snapcheck.qcow2", run.snapshots)
            failures += [f"[{st.label}] {p}" for p in problems]
            held += 1
    label = f"ops/{op}/{wl_name}/{driver}/{seed}"
    _attach(request, {"kind": "crash", "name": label, **v.counts.as_dict()})
    print(f"{label}: {total} states built, {json.dumps(v.counts.as_dict())}")
    assert not failures, f"{len(failures)} problems, e.g.:\n" + "\n".join(failures[:20])
    assert v.counts.corrupt == 0 and v.counts.lost_ack == 0
    assert not run.snapshots or held
    assert v.counts.qemu_checked and v.counts.qemu_agree == v.counts.qemu_checked
