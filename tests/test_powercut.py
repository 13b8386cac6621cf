"""Power cuts at every point of a recorded run, under dm-log-writes semantics.

A workload runs on a QEMU-made image through :class:`crashsim.RecordingBackend`,
which logs each write, truncate and fdatasync (start, end) of the image file; the
test logs request issues and acknowledgements. :func:`crashsim.build_states` turns
the log into crash states (every prefix; for each completed flush, what it covered
plus subsets of the later writes; each also with its last write torn at 512 B).
Every state is written to a file and must:

* check without corruption: qcow2aio's own checker (``check_image``, QEMU 7.2's
  algorithm) on every state; ``qemu-img check`` on a sample and on every state
  ours flags, and the two must agree (exit code, corruptions, leaks);
* hold every write acknowledged before the last completed flush request (through
  qcow2aio, and through ``qemu-img convert`` on a sample); a sector a later request
  touched holds the flushed data with some subset of those requests applied;
* reopen read-write (repairing a lazy-refcounts image left dirty), keep its guest
  content doing so, take writes, and check clean or leaks-only (dirty: clean).

Snapshot operations (``test_power_cut_states_of_snapshot_operations``): create,
delete and apply between writes (an apply journaled as a whole-disk write of the
snapshot's content); the same checks, and on every fifth state each snapshot of ours
that the state lists must hold its content when applied.

Controls: with one flush removed from ``Writeback.flush_steps`` (its first one), or
L2 tables written before refcount blocks, the same harness must find violations.

``QCOW2AIO_STRESS=1``: more workloads, seeds and drivers, longer runs, every state
(the reftable-growth runs sampled to 2,000 each; over 20,000 in all), and 48 control
runs for the catch rate; run with ``-p tests.crashsim`` for the summary tables.

Encrypted images (``NAME-luks``, ``NAME-aes``: every workload, under stress all of
them): every state is read back through qcow2aio with the passphrase (a sector
encrypted for another offset than the one it is read from decrypts to garbage, which
the content check reports), and the sampled ``qemu-img check``/``convert`` get the
secret. A control (``test_wrong_iv_control_is_caught``) records runs whose LUKS
sectors are encrypted by guest offset: the states must show it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import shutil
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Qemu
from crashsim import (
    KEY,
    Counts,
    CrashState,
    Expected,
    Journal,
    RecordingBackend,
    build_states,
    expected_content,
    materialize,
    materialize_files,
    ordering_violations,
)
from faults import (
    Op,
    Template,
    Templates,
    Workload,
    batches,
    build_template,
    encrypted,
    make_ops,
    templates_fixture,
    writes_read_back,
)
from sim import crypt_create, crypt_open, memoized_unlock

import qcow2aio
from qcow2aio.check import check_image
from qcow2aio.crypto.payload import PayloadCrypto
from qcow2aio.writeback import Writeback

STRESS = os.environ.get("QCOW2AIO_STRESS") == "1"
KiB = 1024
MiB = 1024 * KiB

PC_WORKLOADS: dict[str, Workload] = {
    # Small clusters and one-table caches: evictions (each with its own fsync) all along.
    "c512": Workload("c512", 1 * MiB, 512, backing=True, prefill=True, nops=24),
    # Default caches: every ordering decision is the flush's.
    "c4k": Workload("c4k", 1 * MiB, 4096, backing=True, prefill=True, small_caches=False, nops=24),
    "lazy": Workload(
        "lazy",
        1 * MiB,
        4096,
        lazy=True,
        backing=True,
        prefill=True,
        small_caches=False,
        nops=24,
    ),
}
PC_EXTRA: dict[str, Workload] = {
    "c64k": Workload("c64k", 4 * MiB, 65536, prefill=True, small_caches=False, nops=24),
    "v2": Workload("v2", 1 * MiB, 4096, compat="0.10", prefill=True, nops=24),
    "grow": Workload("grow", 4 * MiB, 512, refcount_bits=64, nops=12, big_writes=6),
    "snap": Workload("snap", 1 * MiB, 4096, backing=True, prefill=True, snapshot=True, nops=24),
    "ext_l2": Workload(
        "ext_l2", 1 * MiB, 16384, extended_l2=True, backing=True, prefill=True, nops=24
    ),
    "lazy512": Workload("lazy512", 1 * MiB, 512, lazy=True, backing=True, prefill=True, nops=24),
}
ALL_PC: dict[str, Workload] = {**PC_WORKLOADS, **PC_EXTRA}
CRYPTS = ("luks", "aes")
ENCRYPTED_PC: dict[str, Workload] = {
    f"{n}-{c}": encrypted(wl, c) for c in CRYPTS for n, wl in ALL_PC.items()
}


templates = templates_fixture("powercut-templates", {**ALL_PC, **ENCRYPTED_PC})


# --------------------------------------------------------------- recording
@dataclass
class Recorded:
    template: Template
    initial: bytes  # the image file before the run
    journal: Journal
    ops: list[Op]
    # With an external data file: its path (as recorded, absolute) and content before.
    data_file: str | None = None
    data_initial: bytes = b""
    image_file: str = ""  # the recorded image's path (the journal's name for it)

    def state_files(self, state: CrashState) -> tuple[bytes, bytes | None]:
        """The image file and the data file (None without one) as the crash left them."""
        if self.data_file is None:
            return materialize(self.initial, self.journal, state), None
        files = materialize_files(
            {self.image_file: self.initial, self.data_file: self.data_initial},
            self.journal,
            state,
        )
        return files[self.image_file], files[self.data_file]


async def _run_async(img: qcow2aio.Image, wl: Workload, ops: list[Op], journal: Journal) -> None:
    async def one(op: Op) -> None:
        if op.kind == "read":
            await img.read(op.offset, op.length)
            return
        data = op.data if op.kind == "write" else None
        rid = journal.issue(op.kind, op.offset, op.length, data)
        if op.kind == "write":
            await img.write(op.offset, op.data)
        elif op.kind == "flush":
            await img.flush()
        elif op.kind == "discard":
            await img.discard(op.offset, op.length)
        else:
            await img.write_zeroes(op.offset, op.length, unmap=op.offset % 3 == 0)
        journal.ack(rid)

    for batch in batches(ops, wl.cluster_size):
        await asyncio.gather(*(one(op) for op in batch))
    rid = journal.issue("flush")
    await img.aclose()
    journal.ack(rid)


def _run_sync(img: qcow2aio.Image, ops: list[Op], journal: Journal) -> None:
    for op in ops:
        if op.kind == "read":
            img.read_sync(op.offset, op.length)
            continue
        data = op.data if op.kind == "write" else None
        rid = journal.issue(op.kind, op.offset, op.length, data)
        if op.kind == "write":
            img.write_sync(op.offset, op.data)
        elif op.kind == "flush":
            img.flush_sync()
        elif op.kind == "discard":
            asyncio.run(img.discard(op.offset, op.length))
        else:
            asyncio.run(img.write_zeroes(op.offset, op.length, unmap=op.offset % 3 == 0))
        journal.ack(rid)
    rid = journal.issue("flush")  # close flushes
    img.close()
    journal.ack(rid)


def record(
    tpl: Template, folder: Path, driver: str, seed: int, *, nops: int | None = None
) -> Recorded:
    """Run the workload once on a copy of the template, recording everything."""
    wl = tpl.workload
    if nops is not None:
        wl = dataclasses.replace(wl, nops=nops)
    path = folder / "recorded.qcow2"
    shutil.copyfile(tpl.path, path)
    initial = path.read_bytes()
    data_file = str(tpl.path.parent.resolve() / f"{wl.name}.data") if wl.data_file else None
    data_initial = Path(data_file).read_bytes() if data_file else b""
    journal = Journal()
    ops = make_ops(wl, seed, tpl.hot)
    img = wl.open(path, "r+", journal.factory(path, data_file=wl.data_file))
    if driver == "sync":
        _run_sync(img, ops, journal)
    else:
        asyncio.run(_run_async(img, wl, ops, journal))
    return Recorded(tpl, initial, journal, ops, data_file, data_initial, str(path))


# ----------------------------------------------------------------- checking
class Verifier:
    """Checks crash states of one recorded run; counts what they came to."""

    def __init__(
        self,
        qemu: Qemu,
        rec: Recorded,
        folder: Path,
        *,
        qemu_every: int,
        sizes: tuple[int, ...] | None = None,
    ) -> None:
        self.qemu = qemu
        self.rec = rec
        self.folder = folder
        self.path = folder / "state.qcow2"
        self.qemu_every = qemu_every
        # A run that resizes (tests/test_ops_powercut.py): the virtual sizes a state
        # may have (before or after). The guest content is then read at the state's
        # size and judged as the workload's size: a shrunk state's dropped tail as
        # zeros (the shrink is journaled as a zero request over it), a grown range
        # must read zeros.
        self.sizes = sizes
        self.expected: dict[int, Expected] = {}
        self.counts = Counts()
        self.n = 0

    def _expect(self, crash: int) -> Expected:
        exp = self.expected.get(crash)
        if exp is None:
            exp = expected_content(self.rec.template.content, self.rec.journal, crash)
            self.expected[crash] = exp
        return exp

    def verify(self, state: CrashState, *, stop_early: bool = False) -> list[str]:
        """Check one state; returns its problems (also counted)."""
        with memoized_unlock():
            return self._verify(state, stop_early=stop_early)

    def _verify(self, state: CrashState, *, stop_early: bool) -> list[str]:
        c = self.counts
        wl = self.rec.template.workload
        c.states += 1
        self.n += 1
        sample = self.n % self.qemu_every == 1 or self.qemu_every == 1
        image, data = self.rec.state_files(state)
        self.path.write_bytes(image)
        if data is not None:
            # The header names the data file by its absolute path: rewritten in place.
            assert self.rec.data_file is not None
            Path(self.rec.data_file).write_bytes(data)
        problems: list[str] = []
        try:
            with qcow2aio.open(self.path, **crypt_open(wl.crypt)) as img:
                res = check_image(img.meta)
                dirty = img.meta.header.dirty
                got = img.read_sync(0, wl.size if self.sizes is None else img.size)
        except qcow2aio.Qcow2Error as exc:
            c.reopen_failed += 1
            return self._done(state, [f"read-only open/read failed: {exc!r}"])
        judged = got
        if self.sizes is not None:
            if len(got) not in self.sizes:
                problems.append(f"virtual size {len(got)}, neither of {self.sizes}")
            if any(got[wl.size :]):
                problems.append(f"a grown range past {wl.size} does not read as zeros")
            judged = got[: wl.size] + bytes(max(0, wl.size - len(got)))
        ours = res.exit_code()
        if dirty:
            c.dirty += 1
        elif ours == 0:
            c.clean += 1
        elif ours == 3:
            c.leaks += 1
        else:
            c.corrupt += 1
            problems.append(
                f"qcow2aio check: exit {ours}, {res.corruptions} corruptions, "
                f"{res.check_errors} errors: {res.messages[:3]}"
            )
        exp = self._expect(state.crash)
        bad, lost = exp.problems(judged)
        if bad:
            c.bad_data += not lost
            c.lost_ack += lost
            problems += bad
        if stop_early and problems:
            return self._done(state, problems)
        if (ours not in (0, 3) or dirty or sample) and not stop_early:
            problems += self._qemu_compare(res.corruptions, res.leaks, ours, got, dirty, sample)
        problems += self._reopen(got, dirty)
        return self._done(state, problems)

    def _qemu_compare(
        self, corruptions: int, leaks: int, ours: int, got: bytes, dirty: bool, sample: bool
    ) -> list[str]:
        c = self.counts
        out: list[str] = []
        q_opts, q_name = self.rec.template.workload.qemu(self.path)
        code, rep = self.qemu.check(q_name, extra_args=q_opts)
        c.qemu_checked += 1
        theirs = (code, rep.get("corruptions", 0), rep.get("leaks", 0))
        if theirs == (ours, corruptions, leaks):
            c.qemu_agree += 1
        else:
            out.append(f"qemu-img check says {theirs}, qcow2aio {(ours, corruptions, leaks)}")
        if sample:
            c.qemu_convert += 1
            if self.qemu.convert_raw(q_name, extra_args=q_opts) != got:
                out.append("qemu-img convert reads other data than qcow2aio")
        if dirty and sample:
            # What QEMU's own repair makes of a dirty lazy-refcounts state (reported only).
            copy = self.folder / "qemu-repair.qcow2"
            shutil.copyfile(self.path, copy)
            c_opts, c_name = self.rec.template.workload.qemu(copy)
            proc = self.qemu.img("check", "-r", "all", *c_opts, c_name, check=False)
            if proc.returncode != 0:
                c.qemu_repair_failed += 1
        return out

    def _reopen(self, got: bytes, dirty: bool) -> list[str]:
        """Read-write open (repairs a dirty image), same content, takes writes, checks."""
        c = self.counts
        wl = self.rec.template.workload
        rng = random.Random(self.n)
        size = len(got)  # the workload's size, or the state's (self.sizes)
        writes = [
            (rng.randrange(0, size - 5000), rng.randbytes(5000)),
            (rng.randrange(0, size // 512) * 512, rng.randbytes(wl.cluster_size)),
        ]
        writes = [(o, b[: size - o]) for o, b in writes]
        out: list[str] = []
        key = crypt_open(wl.crypt)
        try:
            with qcow2aio.open(self.path, "r+", **key) as img:
                if img.read_sync(0, size) != got:
                    out.append("the read-write open changed the guest content")
                if not writes_read_back(img, got, writes):
                    out.append("after reopen + writes the disk does not read as written")
            with qcow2aio.open(self.path, **key) as img:
                res = check_image(img.meta)
        except qcow2aio.Qcow2Error as exc:
            c.reopen_failed += 1
            return [f"read-write reopen + write failed: {exc!r}"]
        code = res.exit_code()
        if dirty:
            if code == 0:
                c.repaired_clean += 1
            else:
                out.append(f"dirty state repaired by the read-write open, then check exit {code}")
        elif code not in (0, 3):
            out.append(f"check after reopen + writes: exit {code} ({res.corruptions} corruptions)")
        return out

    def _done(self, state: CrashState, problems: list[str]) -> list[str]:
        if problems:
            self.counts.violating += 1
            if len(self.counts.examples) < 10:
                self.counts.examples.append(f"[{state.label}] " + "; ".join(problems[:3]))
        return problems


def _attach(request: pytest.FixtureRequest, row: dict[str, object]) -> None:
    request.node.user_properties.append((KEY, json.dumps(row)))


# ------------------------------------------------------------------- cases
def _cases() -> list[tuple[str, str, int]]:
    if not STRESS:
        # Encrypted: sub-sector writes over a backing file with one-table caches; COW of
        # clusters shared with a snapshot (re-encrypted at their new host offset).
        return [
            ("c512", "async", 1),
            ("c4k", "sync", 2),
            ("lazy", "sync", 3),
            ("c512-luks", "async", 1),
            ("snap-luks", "sync", 2),
            ("snap-aes", "async", 3),
        ]
    out = []
    for name in [*ALL_PC, *ENCRYPTED_PC]:
        for driver in ("sync", "async"):
            for seed in (1, 2) if name.startswith("grow") else (1, 2, 3):
                out.append((name, driver, seed))
    return out


QUICK_STATES = 110  # per quick case: a few hundred in all
STRESS_NOPS = 40  # requests per stress run (the quick runs use the workload's own)
STRESS_MAX_STATES = 2000  # the reftable-growth runs make up to ~4,000 (sampled down)


@pytest.mark.parametrize(("wl_name", "driver", "seed"), _cases())
def test_power_cut_states(
    qemu: Qemu,
    templates: Templates,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    wl_name: str,
    driver: str,
    seed: int,
) -> None:
    tpl = templates(wl_name)
    _check_power_cuts(qemu, tpl, tmp_path, request, driver, seed, f"{wl_name}/{driver}/{seed}")


def _check_power_cuts(
    qemu: Qemu,
    tpl: Template,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    driver: str,
    seed: int,
    label: str,
) -> None:
    """Record one run of the template's workload, then verify its crash states."""
    nops = STRESS_NOPS if STRESS and not tpl.workload.big_writes else None
    rec = record(tpl, tmp_path, driver, seed, nops=nops)
    rng = random.Random(seed)
    states = build_states(rec.journal, rng, randoms=16 if STRESS else 6)
    total = len(states)
    if STRESS and total > STRESS_MAX_STATES:
        states = rng.sample(states, STRESS_MAX_STATES)
    if not STRESS:
        # The last prefix (the closed image) always, then a seeded sample.
        last = max(states, key=lambda s: (len(s.ops), s.torn is None))
        states = [last, *rng.sample(states, min(QUICK_STATES, total))]
    v = Verifier(qemu, rec, tmp_path, qemu_every=20 if STRESS else 10)
    failures: list[str] = []
    for st in states:
        failures += [f"[{st.label}] {p}" for p in v.verify(st)]
    row = {"kind": "crash", "name": label, **v.counts.as_dict()}
    _attach(request, row)
    print(f"{label}: {total} states built, {json.dumps(v.counts.as_dict())}")
    assert not failures, f"{len(failures)} problems, e.g.:\n" + "\n".join(failures[:20])
    assert v.counts.qemu_checked and v.counts.qemu_agree == v.counts.qemu_checked
    if rec.template.workload.lazy:
        assert v.counts.dirty, "no dirty state: the lazy workload did not exercise repair"


@pytest.mark.parametrize(
    ("driver", "seed", "raw", "lazy", "crypt"),
    [
        ("async", 1, False, False, "plain"),
        ("sync", 2, True, False, "plain"),
        ("async", 3, False, True, "plain"),
        ("sync", 4, False, False, "luks"),  # IV = the sector's offset in the data file
    ],
)
def test_power_cut_states_with_an_external_data_file(
    qemu: Qemu,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    driver: str,
    seed: int,
    raw: bool,
    lazy: bool,
    crypt: str,
) -> None:
    """The same, for an image whose data lives in an external data file: both files are
    recorded, and a crash state is a state of each (an fdatasync covers its own file)."""
    wl = Workload(
        "dfile",
        1 * MiB,
        4096,
        data_file=True,
        data_file_raw=raw,
        lazy=lazy,
        prefill=True,
        small_caches=False,
        nops=24,
        crypt=crypt,
    )
    tpl = build_template(qemu, tmp_path / "tpl", wl)
    label = f"dfile{'-raw' if raw else ''}{'-lazy' if lazy else ''}"
    label += f"{'' if crypt == 'plain' else '-' + crypt}/{driver}/{seed}"
    _check_power_cuts(qemu, tpl, tmp_path, request, driver, seed, label)


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_data_file_control_is_caught(
    qemu: Qemu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    """Control for the test above: with the data file's fdatasync doing nothing, the
    states must show acknowledged, flushed data lost."""
    wl = Workload("dfile", 1 * MiB, 4096, data_file=True, prefill=True, small_caches=False)
    tpl = build_template(qemu, tmp_path / "tpl", wl)
    monkeypatch.setattr(RecordingBackend, "flush", _flush_image_only(RecordingBackend.flush))
    monkeypatch.setattr(RecordingBackend, "aflush", _aflush_image_only(RecordingBackend.aflush))
    rec = record(tpl, tmp_path, driver, 1)
    monkeypatch.undo()
    states = build_states(rec.journal, random.Random(1), randoms=6)
    random.Random(1).shuffle(states)
    v = Verifier(qemu, rec, tmp_path, qemu_every=1 << 30)
    for st in states[:400]:
        v.verify(st, stop_early=True)
        if v.counts.violating:
            break
    assert v.counts.lost_ack, f"the missing data-file flush was not caught in {v.counts.states}"


# ---------------------------------------------------------------- controls
def _skip_first_flush(
    orig: Callable[[Writeback], Iterator[str]],
) -> Callable[[Writeback], Iterator[str]]:
    def flush_steps(self: Writeback) -> Iterator[str]:
        gen = orig(self)
        first = True
        for name in gen:
            if first:
                first = False
                continue
            yield name

    return flush_steps


def _l2_before_refblocks(self: Writeback) -> Iterator[str]:
    meta = self.meta
    dirty_l2 = meta.l2_cache.dirty()
    for table in dirty_l2:
        self._write_l2(table)
    self.write_refblocks()
    if dirty_l2 or meta.l1.dirty:
        yield "refblocks"
    if meta.l1.dirty:
        yield "l2_tables"
        self.write_l1()
    yield "flush"
    meta.allocator_frees_durable()


CONTROLS: dict[str, Callable[[], Callable[[Writeback], Iterator[str]]]] = {
    "no_first_flush": lambda: _skip_first_flush(Writeback.flush_steps),
    "l2_before_refblocks": lambda: _l2_before_refblocks,
}


def _control_cases() -> list[tuple[str, str, str, int]]:
    if not STRESS:
        return [("no_first_flush", "c4k", "sync", 1), ("l2_before_refblocks", "c4k", "async", 2)]
    out = []
    for control in CONTROLS:
        for name in ("c4k", "c64k", "c512", "snap"):
            for driver in ("sync", "async"):
                for seed in range(1, 4):
                    out.append((control, name, driver, seed))
    return out


@pytest.mark.parametrize(("control", "wl_name", "driver", "seed"), _control_cases())
def test_control_is_caught(
    qemu: Qemu,
    templates: Templates,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    control: str,
    wl_name: str,
    driver: str,
    seed: int,
) -> None:
    """A driver with one flush removed (or L2 before refcounts) must fail the harness."""
    tpl = templates(wl_name)
    with monkeypatch.context() as m:
        m.setattr(Writeback, "flush_steps", CONTROLS[control]())
        rec = record(tpl, tmp_path, driver, seed)
    rng = random.Random(seed)
    states = build_states(rec.journal, rng, randoms=8)
    rng.shuffle(states)
    states = states[: 300 if STRESS else 400]
    v = Verifier(qemu, rec, tmp_path, qemu_every=1 << 30)
    for st in states:
        v.verify(st, stop_early=True)
        if not STRESS and v.counts.violating:
            break
    row: dict[str, object] = {"kind": "control", "control": control}
    row.update(name=f"{wl_name}/{driver}/{seed}", **v.counts.as_dict())
    _attach(request, row)
    print(f"control {control} {wl_name}/{driver}/{seed}: {json.dumps(v.counts.as_dict())}")
    print("\n".join(v.counts.examples[:3]))
    if not STRESS:
        assert v.counts.violating, f"control {control} was not caught in {v.counts.states} states"


def _iv_by_guest(self: PayloadCrypto, host: int, guest: int) -> int:
    """The legacy-AES IV rule applied to LUKS: a sector encrypted for its guest offset."""
    return guest >> 9


def _wrong_iv_cases() -> list[tuple[str, str, int]]:
    if not STRESS:
        return [("c4k-luks", "async", 1), ("snap-luks", "sync", 2)]
    return [
        (f"{name}-luks", driver, seed)
        for name in ("c4k", "c512", "snap", "ext_l2")
        for driver in ("sync", "async")
        for seed in (1, 2)
    ]


@pytest.mark.parametrize(("wl_name", "driver", "seed"), _wrong_iv_cases())
def test_wrong_iv_control_is_caught(
    qemu: Qemu,
    templates: Templates,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    wl_name: str,
    driver: str,
    seed: int,
) -> None:
    """Control for "never encrypted for the wrong host offset": the recorded run encrypts
    (and decrypts) LUKS sectors by guest offset, so it reads its own writes back fine;
    the states, read with the right rule (as QEMU reads them), must show garbage (counted
    as lost data where no later request touched the sector, else as bad data)."""
    tpl = templates(wl_name)
    assert tpl.workload.crypt == "luks"
    with monkeypatch.context() as m:
        m.setattr(PayloadCrypto, "sector", _iv_by_guest)
        rec = record(tpl, tmp_path, driver, seed)
    rng = random.Random(seed)
    states = build_states(rec.journal, rng, randoms=8)
    rng.shuffle(states)
    v = Verifier(qemu, rec, tmp_path, qemu_every=1 << 30)
    for st in states[: 300 if STRESS else 200]:
        v.verify(st, stop_early=True)
        if not STRESS and v.counts.violating:
            break
    row: dict[str, object] = {"kind": "control", "control": "luks_iv_by_guest"}
    row.update(name=f"{wl_name}/{driver}/{seed}", **v.counts.as_dict())
    _attach(request, row)
    print(f"control luks_iv_by_guest {wl_name}/{driver}/{seed}: {json.dumps(v.counts.as_dict())}")
    assert v.counts.bad_data + v.counts.lost_ack, f"wrong IVs not caught in {v.counts.states}"


def test_memoized_unlock_is_keyed_by_the_bytes(tmp_path: Path) -> None:
    """The verifiers' unlock cache (sim.memoized_unlock) answers only for an identical
    LUKS area: keyslot material damaged by a stray write is unlocked for real (fails)."""
    path = tmp_path / "m.qcow2"
    qcow2aio.create(path, 1 << 20, cluster_size=4096, **crypt_create("luks"))
    with qcow2aio.open(path, "r+", **crypt_open("luks")) as img:
        img.write_sync(0, b"m" * 512)
        area = img.meta.header.crypto_area
    assert area is not None
    damaged = tmp_path / "d.qcow2"
    raw = bytearray(path.read_bytes())
    raw[area[0] + 4096 + 1000] ^= 0xFF  # inside keyslot 0's material
    damaged.write_bytes(raw)
    with memoized_unlock():
        for _ in range(2):
            with qcow2aio.open(path, **crypt_open("luks")) as img:
                assert img.read_sync(0, 512) == b"m" * 512
        with pytest.raises(qcow2aio.Qcow2PassphraseError):
            qcow2aio.open(damaged, **crypt_open("luks"))


# ------------------------------------------------------- ordering, directly
@pytest.mark.parametrize(
    ("wl_name", "driver"),
    [
        ("c512", "sync"),
        ("c4k", "async"),
        ("c4k", "sync"),
        ("lazy", "sync"),
        ("lazy", "async"),
        ("grow", "sync"),
        ("snap", "async"),
        ("snap-luks", "sync"),
        ("lazy-aes", "async"),
    ],
)
def test_l2_writes_follow_a_flush_of_their_data(
    templates: Templates, tmp_path: Path, wl_name: str, driver: str
) -> None:
    """The write-ordering rules read off the log (crashsim.ordering_violations): an L2
    table write follows a flush of the data/COW (and refcount) writes before it, L1 follows
    a flush of L2, the refcount table a flush of refcount blocks. Regressions: with lazy
    refcounts the flush wrote L2 tables with no fsync after the data once the dirty bit
    was already on disk; a new refcount block and the table entry pointing at it were
    written with no fsync between them (crash: "refcount block is outside image")."""
    tpl = templates(wl_name)
    rec = record(tpl, tmp_path, driver, 5)
    bad = ordering_violations(rec.journal, lazy=tpl.workload.lazy)
    assert not bad, "\n".join(bad[:10])


def _flush_image_only(orig: Callable[..., None]) -> Callable[..., None]:
    def flush(self: RecordingBackend, event: str = "flush") -> None:
        if not self.path.endswith(".data"):
            orig(self, event)

    return flush


def _aflush_image_only(orig: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    async def aflush(self: RecordingBackend, event: str = "flush") -> None:
        if not self.path.endswith(".data"):
            await orig(self, event)

    return aflush


@pytest.mark.parametrize("raw", [False, True], ids=["data_file", "data_file_raw"])
@pytest.mark.parametrize("driver", ["sync", "async"])
def test_l2_writes_follow_a_flush_of_the_external_data_file(
    qemu: Qemu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw: bool, driver: str
) -> None:
    """With an external data file, guest data lives in another file, and an fdatasync of
    the image file does not make it durable: every L2 write must follow an fdatasync of
    the data file that covers the data written before it. Read off the log of both files;
    a driver that forgets the data file's fdatasync must be caught."""
    wl = Workload("dfile", 1 * MiB, 4096, data_file=True, data_file_raw=raw, prefill=True, nops=30)
    tpl = build_template(qemu, tmp_path / "tpl", wl)
    rec = record(tpl, tmp_path, driver, 5)
    data_writes = [op for op in rec.journal.ops if op.event in ("data_write", "cow_write")]
    assert data_writes and all(op.file.endswith(".data") for op in data_writes)
    assert any(op.event.startswith("l2_") and op.file.endswith(".qcow2") for op in rec.journal.ops)
    assert any(f.file.endswith(".data") for f in rec.journal.flushes)
    bad = ordering_violations(rec.journal, lazy=False)
    assert not bad, "\n".join(bad[:10])
    # Control: the data file's fdatasync does nothing (and is not logged).
    monkeypatch.setattr(RecordingBackend, "flush", _flush_image_only(RecordingBackend.flush))
    monkeypatch.setattr(RecordingBackend, "aflush", _aflush_image_only(RecordingBackend.aflush))
    (tmp_path / "control").mkdir()
    rec = record(tpl, tmp_path / "control", driver, 5)
    assert ordering_violations(rec.journal, lazy=False), "a missing data-file flush was not caught"


# ------------------------------------------------------- snapshot operations
# Snapshot create/apply/delete between writes: every crash state must check clean or
# leaks-only (a v3 image is left dirty inside an operation's refcount/COPIED window and
# repaired clean by the next read-write open) and keep the acknowledged writes.
SNAP_PC_CASES = [
    ("c4k", "sync", 11),
    ("c512", "async", 12),
    ("lazy", "sync", 13),
    ("snap", "async", 14),
    ("ext_l2", "sync", 15),
    ("snap-luks", "sync", 16),
]


def _snapshot_script(
    wl: Workload, content: bytes, seed: int
) -> tuple[list[tuple[str, object]], dict[str, bytes]]:
    """Writes and snapshot operations, with the guest content each snapshot holds."""
    rng = random.Random(seed)
    cur = bytearray(content)
    script: list[tuple[str, object]] = []
    states: dict[str, bytes] = {}

    def writes(n: int) -> None:
        for _ in range(n):
            length = rng.choice([512, 4096, wl.cluster_size, 3 * 4096 + 512])
            off = rng.randrange(0, (wl.size - length) // 512) * 512
            data = rng.randbytes(length)
            cur[off : off + length] = data
            script.append(("write", (off, data)))

    writes(5)
    script.append(("create", "a"))
    states["a"] = bytes(cur)
    writes(5)
    script.append(("create", "b"))
    states["b"] = bytes(cur)
    writes(4)
    script.append(("delete", "a"))
    writes(3)
    script.append(("apply", "b"))
    cur[:] = states["b"]
    writes(4)
    script.append(("create", "c"))
    states["c"] = bytes(cur)
    script.append(("delete", "b"))
    writes(2)
    return script, states


def _record_snapshot_ops(
    tpl: Template, folder: Path, driver: str, seed: int
) -> tuple[Recorded, dict[str, bytes]]:
    wl = tpl.workload
    path = folder / "recorded.qcow2"
    shutil.copyfile(tpl.path, path)
    initial = path.read_bytes()
    journal = Journal()
    script, states = _snapshot_script(wl, tpl.content, seed)
    img = wl.open(path, "r+", journal.factory(path))

    def before(kind: str, arg: object) -> list[int]:
        if kind == "write":
            off, data = arg  # type: ignore[misc]
            return [journal.issue("write", off, len(data), data)]
        # Each operation starts with a flush of everything acknowledged before it.
        rids = [journal.issue("flush")]
        if kind == "apply":
            rids.append(journal.issue("write", 0, wl.size, states[str(arg)]))
        return rids

    if driver == "sync":
        for kind, arg in script:
            rids = before(kind, arg)
            if kind == "write":
                img.write_sync(*arg)  # type: ignore[misc]
            else:
                getattr(img, f"{kind}_snapshot_sync")(arg)
            for rid in rids:
                journal.ack(rid)
        rid = journal.issue("flush")
        img.close()
        journal.ack(rid)
    else:

        async def run() -> None:
            for kind, arg in script:
                rids = before(kind, arg)
                if kind == "write":
                    await img.write(*arg)  # type: ignore[misc]
                else:
                    await getattr(img, f"{kind}_snapshot")(arg)
                for rid in rids:
                    journal.ack(rid)
            rid = journal.issue("flush")
            await img.aclose()
            journal.ack(rid)

        asyncio.run(run())
    return Recorded(tpl, initial, journal, [], image_file=str(path)), states


def _snapshots_hold(
    wl: Workload, state_file: Path, copy: Path, states: dict[str, bytes]
) -> list[str]:
    """Every snapshot of ours that a crash state lists holds its content (applied on a
    copy, after the read-write open's repair of a dirty state)."""
    shutil.copyfile(state_file, copy)
    out = []
    with wl.open(copy, "r+") as img:
        for sn in img.snapshots():
            want = states.get(sn["name"])
            if want is None:
                continue
            img.apply_snapshot_sync(sn["id"])
            if img.read_sync(0, wl.size) != want:
                out.append(f"snapshot {sn['name']!r} does not hold its content")
    return out


@pytest.mark.parametrize(("wl_name", "driver", "seed"), SNAP_PC_CASES)
def test_power_cut_states_of_snapshot_operations(
    qemu: Qemu,
    templates: Templates,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    wl_name: str,
    driver: str,
    seed: int,
) -> None:
    tpl = templates(wl_name)
    rec, snap_states = _record_snapshot_ops(tpl, tmp_path, driver, seed)
    rng = random.Random(seed)
    states = build_states(rec.journal, rng, randoms=16 if STRESS else 4)
    total = len(states)
    limit = STRESS_MAX_STATES if STRESS else 150
    if total > limit:
        last = max(states, key=lambda s: (len(s.ops), s.torn is None))
        states = [last, *rng.sample(states, limit)]
    v = Verifier(qemu, rec, tmp_path, qemu_every=20 if STRESS else 10)
    failures: list[str] = []
    held = 0
    for i, st in enumerate(states):
        failures += [f"[{st.label}] {p}" for p in v.verify(st)]
        if i % 5 == 0:
            # v.path holds this state as the crash left it (the reopen wrote a copy).
            v.path.write_bytes(rec.state_files(st)[0])
            problems = _snapshots_hold(
                tpl.workload, v.path, tmp_path / "snapcheck.qcow2", snap_states
            )
            failures += [f"[{st.label}] {p}" for p in problems]
            held += 1
    label = f"snapshot-ops/{wl_name}/{driver}/{seed}"
    _attach(request, {"kind": "crash", "name": label, **v.counts.as_dict()})
    print(f"{label}: {total} states built, {json.dumps(v.counts.as_dict())}")
    assert not failures, f"{len(failures)} problems, e.g.:\n" + "\n".join(failures[:20])
    assert v.counts.corrupt == 0 and held
    assert v.counts.qemu_checked and v.counts.qemu_agree == v.counts.qemu_checked
