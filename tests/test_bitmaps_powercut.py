"""Power cuts while bitmaps are maintained (issue 15).

A run on a QEMU-made image with persistent bitmaps (an enabled one, a disabled one
with bits set, one added during the run) is recorded by :class:`crashsim.
RecordingBackend`; every crash state of the model (:func:`crashsim.build_states`:
prefixes, flushed writes plus subsets of the later ones, torn last writes) must:

* check without corruption (qcow2aio's checker on every state, ``qemu-img check``
  and ``qemu-img info`` on a sample, agreeing with ours);
* list each bitmap either IN_USE (inconsistent: a reader must not trust it) or
  consistent, and a consistent bitmap must hold *exactly* its bits before the run
  plus every write issued before the crash (enabled), its bits before the run
  (disabled), or the writes issued after it was added: never a consistent-looking
  bitmap that misses a write that may have reached the disk.

Control: a store that clears IN_USE before the data are marked (the bitmaps written
without the run's writes) must be caught.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from conftest import Qemu
from crashsim import Journal, build_states, materialize
from test_bitmaps import naive_extents, qemu_bitmaps

import qcow2aio
from qcow2aio import bitmaps as B
from qcow2aio.check import check_image
from qcow2aio.io import FileBackend
from qcow2aio.metadata import Metadata

KiB = 1024
MiB = 1024 * KiB
SIZE = 16 * MiB


def _prepare(qemu: Qemu, path: Path) -> list[tuple[int, int]]:
    qemu.img("create", "-q", "-f", "qcow2", path, str(SIZE))
    qemu.img("bitmap", "--add", "-g", "4k", path, "a")
    qemu.img("bitmap", "--add", path, "d")
    before = [(0, 64 * KiB), (5 * MiB, 4 * KiB)]
    qemu.io(path, *(f"write {o} {n}" for o, n in before))
    qemu.img("bitmap", "--disable", path, "d")
    return before


async def _workload(img: qcow2aio.Image, journal: Journal) -> None:
    rng = random.Random(15)

    async def req(kind: str, off: int, n: int) -> None:
        data = bytes([rng.randrange(1, 256)]) * n if kind == "write" else None
        rid = journal.issue(kind, off, n, data)
        if kind == "write":
            assert data is not None
            await img.write(off, data)
        elif kind == "zero":
            await img.write_zeroes(off, n)
        elif kind == "discard":
            await img.discard(off, n)
        else:
            await img.flush()
        journal.ack(rid)

    await req("write", 1 * MiB, 8 * KiB)
    await req("write", 9 * MiB + 512, 100 * KiB)
    await req("flush", 0, 0)
    await req("zero", 3 * MiB, 128 * KiB)
    await req("discard", 0, 64 * KiB)
    await img.add_bitmap("n", granularity=65536)
    await req("write", 12 * MiB, 4 * KiB)
    await req("flush", 0, 0)
    await req("write", 14 * MiB, 64 * KiB)


def _record(path: Path) -> Journal:
    journal = Journal()

    async def run() -> None:
        img = qcow2aio.open(path, "r+", io_backend=journal.factory(path))
        await _workload(img, journal)
        await img.aclose()

    asyncio.run(run())
    return journal


def _violations(
    state_file: Path,
    journal: Journal,
    crash: int,
    before: list[tuple[int, int]],
    consistent: set[str] | None = None,
) -> list[str]:
    fb = FileBackend(str(state_file), writable=False)
    try:
        res = check_image(Metadata(fb, writable=False))
    finally:
        fb.close()
    out = []
    if res.corruptions or res.error:
        out.append(f"check: {res.corruptions} corruptions, error {res.error}")
    issued = [r for r in journal.requests if r.issued < crash and r.kind != "flush"]
    add_pos = next((r.issued for r in journal.requests if r.offset == 12 * MiB), None)
    with qcow2aio.open(state_file) as img:
        for b in img.bitmaps():
            name = str(b["name"])
            if "in-use" in b["flags"]:
                continue
            if consistent is not None:
                consistent.add(name)
            got = img.dirty_extents(name)
            gran = int(b["granularity"])  # type: ignore[call-overload]
            if name == "a":
                want = naive_extents(before + [(r.offset, r.length) for r in issued], gran, SIZE)
            elif name == "d":
                want = naive_extents(before, gran, SIZE)
            else:
                assert add_pos is not None
                late = [(r.offset, r.length) for r in issued if r.issued >= add_pos]
                want = naive_extents(late, gran, SIZE)
            if got != want:
                out.append(f"consistent bitmap {name!r}: {got} != {want}")
    return out


def _states(qemu: Qemu, tmp_path: Path) -> tuple[Path, Journal, bytes, list[tuple[int, int]]]:
    path = tmp_path / "img.qcow2"
    before = _prepare(qemu, path)
    initial = path.read_bytes()
    journal = _record(path)
    return path, journal, initial, before


def test_power_cut_states_with_bitmaps(qemu: Qemu, tmp_path: Path) -> None:
    _, journal, initial, before = _states(qemu, tmp_path)
    states = build_states(journal, random.Random(1), randoms=8)
    assert len(states) > 50
    state_file = tmp_path / "state.qcow2"
    seen_flags: set[tuple[str, ...]] = set()
    consistent: set[str] = set()
    bad = []
    for i, st in enumerate(states):
        state_file.write_bytes(materialize(initial, journal, st))
        v = _violations(state_file, journal, st.crash, before, consistent)
        if v:
            bad.append((st.label, v))
        if i % 25 == 0:
            rc, report = qemu.check(state_file)
            assert rc in (0, 3) and not report.get("corruptions"), (st.label, report)
            with qcow2aio.open(state_file) as img:
                assert img.bitmaps() == qemu_bitmaps(qemu, state_file), st.label
                seen_flags.update(tuple(b["flags"]) for b in img.bitmaps())
    assert not bad, bad[:5]
    # The run went through both kinds of state.
    assert ("in-use", "auto") in seen_flags and ("auto",) in seen_flags
    assert consistent == {"a", "d", "n"}  # "n" only exists once the close stored it


def test_store_without_marks_is_caught(
    qemu: Qemu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: bitmaps that are not marked by the writes but still stored as
    consistent at close: the harness must report the states after the store."""
    monkeypatch.setattr(B.BitmapSet, "mark", lambda self, offset, length: None)
    monkeypatch.setattr(qcow2aio.writes, "mark_dirty", lambda img, off, n: None)
    import qcow2aio.image as image_mod

    monkeypatch.setattr(image_mod, "mark_dirty", lambda img, off, n: None)
    _, journal, initial, before = _states(qemu, tmp_path)
    states = build_states(journal, random.Random(1), randoms=2)
    state_file = tmp_path / "state.qcow2"
    caught = 0
    # The states after the store are the ones that must show it: latest crash first.
    for st in sorted(states, key=lambda s: -s.crash):
        state_file.write_bytes(materialize(initial, journal, st))
        caught += bool(_violations(state_file, journal, st.crash, before))
        if caught:
            break
    assert caught
