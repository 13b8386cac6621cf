"""Power cuts inside ``commit`` and ``rebase`` (tests/crashsim.py's journal and states).

Each run records every write, punch, truncate and fdatasync of the files the job
writes (commit: the top image and the base; rebase: the overlay), then rebuilds every
crash state crashsim's model yields (every prefix; per completed flush, subsets of the
later writes of each file; torn last writes) and asks of each:

* ``qemu-img check`` of every written image finds no corruption (leaks allowed);
* the chain reads as before (commit: the top image, whatever part of its emptying
  landed, over a base that already holds the data; rebase: the overlay over whichever
  backing file its header names);
* commit: each cluster of the base alone holds its old or its new content;
  rebase: each cluster of the overlay alone holds its old or its new content.

Content is read with qcow2aio on every state and with ``qemu-img convert`` on a sample.
``QCOW2AIO_STRESS=1`` takes every state of larger runs (``-p tests.crashsim`` prints
the counts; rows ``movers/JOB/...``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import Qemu
from crashsim import Counts, CrashState, Journal, RecordingBackend, build_states, materialize_files
from test_powercut import _attach

import qcow2aio
from qcow2aio.blockstatus import block_status
from qcow2aio.io import BackendFactory, FileBackend
from qcow2aio.tools.commit import commit
from qcow2aio.tools.rebase import rebase

STRESS = os.environ.get("QCOW2AIO_STRESS") == "1"
KiB = 1024
QUICK_STATES = 40
STRESS_STATES = 150


def _recording(journal: Journal) -> BackendFactory:
    """Every file opened writable is recorded (the job's targets); others read plainly."""

    def make(path: str, writable: bool) -> FileBackend:
        if writable:
            return RecordingBackend(path, writable, journal)
        return FileBackend(path, writable)

    return make


def _build(qemu: Qemu, folder: Path, cs: int, seed: int) -> None:
    """base.qcow2 <- top.qcow2, and nb.qcow2 (a new backing file for rebase): 512 KiB
    each, random writes, zero and compressed clusters."""
    rng = random.Random(seed)
    for name, backing in (("base", None), ("nb", None), ("top", "base.qcow2")):
        args = ["create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}"]
        if backing:
            args += ["-b", backing, "-F", "qcow2"]
        qemu.img(*args, folder / f"{name}.qcow2", "512K")
        cmds = []
        for _ in range(10):
            n = rng.choice([512, 4096, cs, 3 * cs])
            off = rng.randrange(0, (512 * KiB - n) // 512) * 512
            kind = rng.random()
            if kind < 0.2:
                cmds.append(f"write -z {off} {n}")
            elif kind < 0.3:
                c = rng.randrange(0, 512 * KiB // cs) * cs
                cmds.append(f"write -c -P {rng.randrange(1, 255)} {c} {cs}")
            else:
                cmds.append(f"write -P {rng.randrange(1, 255)} {off} {n}")
        qemu.io(folder / f"{name}.qcow2", *cmds, check=False)


def _read(path: Path) -> bytes:
    with qcow2aio.open(path) as img:
        return img.read_sync(0, img.size)


def _per_cluster(
    got: bytes, old: bytes, new: bytes, cs: int, in_place: set[int] | None = None
) -> list[str]:
    """Each cluster old or new as a whole; a cluster in ``in_place`` (data the image
    already held there, overwritten where it lies, as QEMU does too) may mix old and
    new 512-byte sectors: a write is not atomic, sectors are (the crash model tears
    writes at sector boundaries)."""
    bad = []
    for off in range(0, max(len(got), len(new)), cs):
        g = got[off : off + cs]
        if g == old[off : off + cs] or g == new[off : off + cs]:
            continue
        if in_place is not None and off in in_place:
            if all(
                g[i : i + 512] in (old[off + i : off + i + 512], new[off + i : off + i + 512])
                for i in range(0, len(g), 512)
            ):
                continue
            bad.append(f"overwritten cluster at {off} has a sector neither old nor new")
        else:
            bad.append(f"cluster at {off} is neither old nor new")
    return bad


def _data_clusters(path: Path, cs: int) -> set[int]:
    """Clusters holding data in the image itself (not compressed): written in place."""
    out: set[int] = set()
    with qcow2aio.open(path) as img:
        for st in block_status(img):
            if st.depth == 0 and st.data and not st.compressed:
                out.update(range(st.start // cs * cs, st.start + st.length, cs))
    return out


def _check(qemu: Qemu, path: Path, counts: Counts) -> list[str]:
    rc, report = qemu.check(path)
    counts.qemu_checked += 1
    if report.get("corruptions") or rc == 2:
        counts.corrupt += 1
        return [f"{path.name}: qemu-img check found corruptions: {report}"]
    if report.get("leaks"):
        counts.leaks += 1
    else:
        counts.clean += 1
    counts.qemu_agree += 1
    return []


def _run(job: str, folder: Path, journal: Journal) -> None:
    rec = _recording(journal)
    if job == "commit":
        asyncio.run(commit(folder / "top.qcow2", io_backend=rec, max_inflight=4, chunk_size=8192))
    else:
        asyncio.run(
            rebase(folder / "top.qcow2", "nb.qcow2", backing_format="qcow2", io_backend=rec)
        )


def _cases() -> list[Any]:
    if not STRESS:
        return [pytest.param("commit", 4096, 1), pytest.param("rebase", 4096, 1)]
    return [
        pytest.param(job, cs, seed)
        for job in ("commit", "rebase")
        for cs in (512, 4096, 65536)
        for seed in (1, 2)
    ]


@pytest.mark.parametrize(("job", "cs", "seed"), _cases())
def test_power_cut_inside_mover(
    qemu: Qemu, tmp_path: Path, request: pytest.FixtureRequest, job: str, cs: int, seed: int
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _build(qemu, src, cs, seed)
    chain_before = _read(src / "top.qcow2")
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    journal = Journal()
    _run(job, run_dir, journal)
    written = sorted({op.file for op in journal.ops} | {f.file for f in journal.flushes})
    names = {p: Path(p).name for p in written}
    initial = {p: (src / names[p]).read_bytes() for p in written}
    old = {"commit": _read(src / "base.qcow2"), "rebase": _overlay_alone(src, tmp_path)}[job]
    new = {
        "commit": _read(run_dir / "base.qcow2"),
        "rebase": _overlay_alone(run_dir, tmp_path),
    }[job]
    assert _read(run_dir / "top.qcow2") == chain_before
    # Commit overwrites the base's data clusters where they lie (in place); rebase
    # writes only into clusters the overlay did not hold (new ones, linked after).
    in_place = _data_clusters(src / "base.qcow2", cs) if job == "commit" else set()
    rng = random.Random(seed)
    states = build_states(journal, rng, randoms=8 if STRESS else 3)
    total = len(states)
    cap = STRESS_STATES if STRESS else QUICK_STATES
    if total > cap:
        states = [states[-1], *rng.sample(states, cap)]
    counts = Counts()
    failures: list[str] = []
    state_dir = tmp_path / "state"
    for i, st in enumerate(states):
        failures += [f"[{st.label}] {p}" for p in _verify(qemu, src, state_dir, journal, st,
                                                          initial, names, job, chain_before,
                                                          old, new, cs, counts, i % 8 == 0,
                                                          tmp_path, in_place)]  # fmt: skip
        counts.states += 1
    label = f"movers/{job}/c{cs}/{seed}"
    _attach(request, {"kind": "crash", "name": label, **counts.as_dict()})
    print(f"{label}: {total} states built, {json.dumps(counts.as_dict())}")
    assert not failures, f"{len(failures)} problems, e.g.:\n" + "\n".join(failures[:20])
    assert counts.corrupt == 0 and counts.states > 1


def _overlay_alone(folder: Path, tmp: Path) -> bytes:
    """The overlay's own clusters (unallocated ranges as zeros): read with no backing."""
    with qcow2aio.Image(folder / "top.qcow2", open_backing=False) as img:
        return img.read_sync(0, img.size)


def _verify(
    qemu: Qemu,
    src: Path,
    state_dir: Path,
    journal: Journal,
    st: CrashState,
    initial: dict[str, bytes],
    names: dict[str, str],
    job: str,
    chain_before: bytes,
    old: bytes,
    new: bytes,
    cs: int,
    counts: Counts,
    with_qemu: bool,
    tmp: Path,
    in_place: set[int],
) -> list[str]:
    if state_dir.exists():
        shutil.rmtree(state_dir)
    shutil.copytree(src, state_dir)
    for path, data in materialize_files(initial, journal, st).items():
        (state_dir / names[path]).write_bytes(data)
    problems: list[str] = []
    for path in initial:
        problems += _check(qemu, state_dir / names[path], counts)
    if problems:
        counts.violating += 1
        return problems
    top = state_dir / "top.qcow2"
    if _read(top) != chain_before:
        problems.append("the chain does not read as before")
    if with_qemu:
        counts.qemu_convert += 1
        if qemu.convert_raw(top) != chain_before:
            problems.append("qemu-img reads the chain differently from before")
    alone = _read(state_dir / "base.qcow2") if job == "commit" else _overlay_alone(state_dir, tmp)
    problems += _per_cluster(alone, old, new, cs, in_place)
    if problems:
        counts.violating += 1
        counts.bad_data += 1
    return problems
