"""Power-cut simulation: record an image file's writes and flushes, rebuild every crash state.

:class:`RecordingBackend` logs, in completion order, every write (offset, bytes)
and truncate of the image file and the start and end of every fdatasync; the test
logs request issues and acknowledgements in the same :class:`Journal`.

The model is dm-log-writes': *a flush makes durable only the writes that completed
before it started*. :func:`build_states` enumerates

* every prefix of the write log (crash right before write k+1 completes), and
* for each completed flush F (and a virtual one at the start): every write that
  completed before F started, plus subsets of the writes after it up to the end of
  the next flush (all subsets up to 6 writes, else seeded random ones plus every
  "only one" and "all but one"), the crash assumed just before that next flush ends;

each whole and with its last write torn at a 512-byte boundary of the file.

:func:`expected_content` gives, for a state, which guest bytes must be exact: every
write acknowledged before the call of the last flush *request* that completed before
the crash; a sector touched by a later (unacknowledged or unflushed) request may hold
the flushed version with any subset of those later requests applied, nothing else.

Run under ``-p tests.crashsim`` to get the summary table at the end of a session
(test_powercut.py and test_faults.py attach their counts to their reports).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qcow2aio.io import BackendFactory, FileBackend

SECTOR = 512
EXHAUSTIVE_MAX = 6


# ------------------------------------------------------------------ journal
@dataclass
class Request:
    """A guest request as the test issued it."""

    rid: int
    kind: str  # "write" | "discard" | "zero" | "flush"
    offset: int
    length: int
    data: bytes | None  # None for flush; zeros are implied for discard/zero
    issued: int  # journal position of the issue
    acked: int | None = None  # journal position of the acknowledgement

    def payload(self) -> bytes:
        return self.data if self.data is not None else bytes(self.length)


@dataclass(frozen=True, slots=True)
class FileOp:
    """One completed write (``data``) or truncate (``size``) of a recorded file."""

    pos: int  # journal position (completion)
    offset: int
    data: bytes | None = None
    size: int | None = None
    event: str = ""
    file: str = ""  # the file's path


@dataclass(frozen=True, slots=True)
class FlushRec:
    start: int
    end: int | None = None
    event: str = ""
    file: str = ""  # the file this fdatasync made durable


class Journal:
    """Everything that happened to the recorded files, in order.

    Crash states (:func:`build_states`, :func:`materialize`) model one file, the
    image; :func:`ordering_violations` also reads logs of an image with an external
    data file, whose writes and fdatasyncs are recorded with their file's path.
    """

    def __init__(self) -> None:
        self.pos = 0
        # Files are recorded from the event loop thread and from I/O threads.
        self._lock = threading.Lock()
        self.ops: list[FileOp] = []
        self.flushes: list[FlushRec] = []
        self.requests: list[Request] = []

    def _tick(self) -> int:
        self.pos += 1
        return self.pos

    # file side (RecordingBackend)
    def write(self, offset: int, data: bytes, event: str = "", file: str = "") -> None:
        with self._lock:
            self.ops.append(FileOp(self._tick(), offset, data=data, event=event, file=file))

    def truncate(self, size: int, file: str = "") -> None:
        with self._lock:
            self.ops.append(FileOp(self._tick(), 0, size=size, event="truncate", file=file))

    def flush_start(self, event: str = "", file: str = "") -> int:
        with self._lock:
            self.flushes.append(FlushRec(self._tick(), event=event, file=file))
            return len(self.flushes) - 1

    def flush_end(self, index: int) -> None:
        with self._lock:
            f = self.flushes[index]
            self.flushes[index] = FlushRec(f.start, self._tick(), f.event, f.file)

    # request side (the test)
    def issue(self, kind: str, offset: int = 0, length: int = 0, data: bytes | None = None) -> int:
        with self._lock:
            rid = len(self.requests)
            self.requests.append(Request(rid, kind, offset, length, data, self._tick()))
            return rid

    def ack(self, rid: int) -> None:
        with self._lock:
            self.requests[rid].acked = self._tick()

    def factory(self, image_path: str | Path, *, data_file: bool = False) -> BackendFactory:
        """Opens the image file with a RecordingBackend, any other file plainly; with
        ``data_file``, the image's external data file (the other file opened writable)
        is recorded too."""
        target = str(image_path)

        def make(path: str, writable: bool) -> FileBackend:
            if path == target or (data_file and writable):
                return RecordingBackend(path, writable, self)
            return FileBackend(path, writable)

        return make


class RecordingBackend(FileBackend):
    """Logs completed writes, truncates and flush start/end of one file into a Journal.

    It records at the engine's ``_sys_*`` hooks, the system calls themselves (on the
    event loop thread or an I/O thread, as they run), and overrides no public method:
    the image keeps every fast path of the plain backend (in-place writes, inline
    async writes, zero COW past the end of the file left out), so the power-cut
    states are those of the code production runs.
    """

    def __init__(self, path: str, writable: bool, journal: Journal) -> None:
        super().__init__(path, writable)
        self.journal = journal

    def _sys_pwritev(self, buffers: list[memoryview], offset: int, event: str) -> int:
        n = super()._sys_pwritev(buffers, offset, event)
        if n > 0:
            # What reached the file: a short write's retry is recorded as its own write.
            self.journal.write(offset, b"".join(buffers)[:n], event, self.path)
        return n

    def _sys_fdatasync(self, event: str) -> None:
        i = self.journal.flush_start(event, self.path)
        super()._sys_fdatasync(event)
        self.journal.flush_end(i)

    def _sys_ftruncate(self, size: int, event: str) -> None:
        super()._sys_ftruncate(size, event)
        self.journal.truncate(size, self.path)

    def _sys_fallocate(self, mode: int, offset: int, length: int, event: str) -> None:
        # A hole punch (size kept): the range reads as zeros from now on, like a write
        # of zeros that may be lost or land at a power cut (up to the end of the file).
        end = min(offset + length, os.fstat(self.fd).st_size)
        super()._sys_fallocate(mode, offset, length, event)
        if end > offset:
            self.journal.write(offset, bytes(end - offset), event, self.path)


# ----------------------------------------------------------------- states
@dataclass(frozen=True)
class CrashState:
    """Which logged file operations reached the disk, and when the crash happened."""

    ops: tuple[int, ...]  # indices into Journal.ops, ascending
    torn: int | None  # bytes kept of the last op in ``ops`` (None: all of it)
    crash: int  # journal position the crash happened just before
    label: str

    @property
    def key(self) -> tuple[tuple[int, ...], int | None]:
        return self.ops, self.torn


def _tear(journal: Journal, state: CrashState, rng: random.Random) -> CrashState | None:
    """The same state with its last write cut at a random 512-byte boundary of the file."""
    if not state.ops:
        return None
    op = journal.ops[state.ops[-1]]
    if op.data is None:
        return None
    first = (op.offset // SECTOR + 1) * SECTOR
    cuts = range(first, op.offset + len(op.data), SECTOR)
    if not cuts:
        return None
    keep = rng.choice(cuts) - op.offset
    # A write is torn only by a crash before any flush of its file that started after
    # it completed.
    crash = min(
        [state.crash]
        + [
            f.end
            for f in journal.flushes
            if f.end is not None and f.start > op.pos and f.file == op.file
        ]
    )
    return CrashState(state.ops, keep, crash, state.label + f" torn@{keep}")


def _subsets(window: list[int], rng: random.Random, randoms: int) -> Iterator[tuple[int, ...]]:
    m = len(window)
    if m <= EXHAUSTIVE_MAX:
        for r in range(m + 1):
            yield from itertools.combinations(window, r)
        return
    yield ()
    yield tuple(window)
    for i in range(m):
        yield (window[i],)
        yield tuple(window[:i] + window[i + 1 :])
    for _ in range(randoms):
        yield tuple(w for w in window if rng.random() < 0.5)


def build_states(journal: Journal, rng: random.Random, *, randoms: int = 16) -> list[CrashState]:
    """Every crash state of the model (deduplicated; the latest valid crash time kept).

    An fdatasync makes durable the writes *of its own file* that completed before it
    started: with one file (the image) that is the model above; with an image and its
    external data file, the durable part at a crash is, per file, what that file's
    last completed flush covered, and the writes of both files after that are the
    window whose subsets are tried.
    """
    ops = journal.ops
    n = len(ops)
    end = journal.pos + 1
    states: dict[tuple[tuple[int, ...], int | None], CrashState] = {}

    def add(st: CrashState) -> None:
        old = states.get(st.key)
        if old is None or old.crash < st.crash:
            states[st.key] = st
        torn = _tear(journal, st, rng)
        if torn is not None:
            old = states.get(torn.key)
            if old is None or old.crash < torn.crash:
                states[torn.key] = torn

    for k in range(n + 1):
        add(CrashState(tuple(range(k)), None, ops[k].pos if k < n else end, f"prefix {k}"))
    done = [f for f in journal.flushes if f.end is not None]
    # Crash just before a flush completes (it covers nothing yet), or after the last op.
    for i, crash in enumerate([*(f.end for f in done if f.end is not None), end]):
        covered: dict[str, int] = {}  # per file: the start of its last completed flush
        for f in done:
            if f.end is not None and f.end < crash:
                covered[f.file] = max(covered.get(f.file, 0), f.start)
        base = [j for j, op in enumerate(ops) if op.pos < covered.get(op.file, 0)]
        window = [j for j, op in enumerate(ops) if covered.get(op.file, 0) < op.pos < crash]
        for sub in _subsets(window, rng, randoms):
            ids = tuple(sorted(base + list(sub)))
            add(CrashState(ids, None, crash, f"flush {i} +{len(sub)}/{len(window)}"))
    return list(states.values())


def materialize(initial: bytes, journal: Journal, state: CrashState) -> bytes:
    """The (one) recorded file as the crash left it."""
    buf = bytearray(initial)
    last = state.ops[-1] if state.ops else -1
    for j in state.ops:
        op = journal.ops[j]
        if op.data is None:
            assert op.size is not None
            del buf[op.size :]
            buf.extend(bytes(op.size - len(buf)))
            continue
        data = op.data if (j != last or state.torn is None) else op.data[: state.torn]
        endpos = op.offset + len(data)
        if endpos > len(buf):
            buf.extend(bytes(endpos - len(buf)))
        buf[op.offset : endpos] = data
    return bytes(buf)


def materialize_files(
    initial: dict[str, bytes], journal: Journal, state: CrashState
) -> dict[str, bytes]:
    """Every recorded file (path -> its content before the run) as the crash left it."""
    last = state.ops[-1] if state.ops else -1
    out = {}
    for path, before in initial.items():
        mine = tuple(j for j in state.ops if journal.ops[j].file == path)
        torn = state.torn if mine and mine[-1] == last else None
        out[path] = materialize(before, journal, CrashState(mine, torn, state.crash, state.label))
    return out


# --------------------------------------------------------------- expectations
@dataclass
class Expected:
    """What a reader must see after the crash."""

    content: bytes  # the guest disk with every required request applied
    required: list[Request]
    optional: list[Request]  # later requests that may or may not have landed
    flushed_upto: int  # issue position of the last flush request that covers ``required``

    def problems(self, got: bytes, limit: int = 5) -> tuple[list[str], bool]:
        """Sectors holding neither the required data nor a later request's; (problems, lost).

        ``lost`` is True when a sector no later request touched lost its required data.
        """
        want = self.content
        if got == want:
            return [], False
        touched: dict[int, list[Request]] = {}
        for r in self.optional:
            if r.length == 0:
                continue
            for s in range(r.offset // SECTOR, (r.offset + r.length - 1) // SECTOR + 1):
                touched.setdefault(s, []).append(r)
        out: list[str] = []
        lost = False
        chunk = 1 << 16
        for base in range(0, len(want), chunk):
            if got[base : base + chunk] == want[base : base + chunk]:
                continue
            for s in range(base // SECTOR, min(len(want), base + chunk) // SECTOR):
                lo = s * SECTOR
                g = got[lo : lo + SECTOR]
                w = want[lo : lo + SECTOR]
                if g == w:
                    continue
                reqs = touched.get(s)
                if not reqs:
                    lost = True
                    out.append(f"guest sector {s} ({lo:#x}): acknowledged+flushed data lost")
                elif not _some_combination(g, w, lo, reqs):
                    out.append(
                        f"guest sector {s} ({lo:#x}): neither the flushed data nor any mix of "
                        f"{len(reqs)} later request(s)"
                    )
                if len(out) >= limit:
                    return out, lost
        return out, lost


def _some_combination(got: bytes, old: bytes, lo: int, reqs: list[Request]) -> bool:
    """``got`` = ``old`` with some subset of ``reqs`` applied in issue order."""
    if len(reqs) > 8:
        # Too many to enumerate: per byte, the old value or one of the requests'.
        return all(
            got[i] == old[i]
            or any(
                r.offset <= lo + i < r.offset + r.length
                and r.payload()[lo + i - r.offset] == got[i]
                for r in reqs
            )
            for i in range(len(got))
        )
    for n in range(1, len(reqs) + 1):
        for sub in itertools.combinations(reqs, n):
            cur = bytearray(old)
            for r in sub:
                a = max(lo, r.offset)
                b = min(lo + len(old), r.offset + r.length)
                cur[a - lo : b - lo] = r.payload()[a - r.offset : b - r.offset]
            if cur == got:
                return True
    return False


def expected_content(base: bytes, journal: Journal, crash: int) -> Expected:
    """The guarantee at a crash just before journal position ``crash``."""
    reqs = journal.requests
    flushes = [r for r in reqs if r.kind == "flush" and r.acked is not None and r.acked < crash]
    upto = max((r.issued for r in flushes), default=0)
    required = sorted(
        (r for r in reqs if r.kind != "flush" and r.acked is not None and r.acked < upto),
        key=lambda r: r.acked or 0,
    )
    optional = sorted(
        (r for r in reqs if r.kind != "flush" and r.issued < crash and r not in required),
        key=lambda r: r.issued,
    )
    buf = bytearray(base)
    for r in required:
        buf[r.offset : r.offset + r.length] = r.payload()
    return Expected(bytes(buf), required, optional, upto)


# ------------------------------------------------------------------ counts
@dataclass
class Counts:
    """What the states of one run came to."""

    states: int = 0
    clean: int = 0
    leaks: int = 0
    corrupt: int = 0
    dirty: int = 0  # lazy refcounts: dirty bit set (repaired by a read-write open)
    repaired_clean: int = 0
    lost_ack: int = 0  # states that lost acknowledged, flushed data
    bad_data: int = 0  # states with data that is neither old nor new
    reopen_failed: int = 0
    qemu_checked: int = 0
    qemu_agree: int = 0
    qemu_convert: int = 0
    qemu_repair_failed: int = 0  # lazy: `qemu-img check -r all` could not repair
    violating: int = 0  # states with any problem
    examples: list[str] = field(default_factory=list)

    def add(self, other: Counts) -> None:
        for name in self.__dataclass_fields__:
            if name == "examples":
                self.examples += other.examples[: max(0, 10 - len(self.examples))]
            else:
                setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "examples"}


# ------------------------------------------------------------- the summary
KEY = "qcow2aio_crash"
_rows: list[dict[str, Any]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":
        return
    for name, value in report.user_properties:
        if name == KEY:
            _rows.append(json.loads(str(value)))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _rows or getattr(config, "_qcow2aio_crash_printed", False):
        return
    config._qcow2aio_crash_printed = True  # type: ignore[attr-defined]
    tr = terminalreporter
    crash = [r for r in _rows if r["kind"] == "crash"]
    control = [r for r in _rows if r["kind"] == "control"]
    faults = [r for r in _rows if r["kind"] == "faults"]
    if crash:
        tr.section("qcow2aio power-cut states")
        cols = [
            "states",
            "clean",
            "leaks",
            "corrupt",
            "dirty",
            "repaired_clean",
            "lost_ack",
            "bad_data",
            "reopen_failed",
            "qemu_checked",
            "qemu_agree",
            "qemu_convert",
            "qemu_repair_failed",
        ]
        tr.write_line(f"{'workload':<24} " + " ".join(f"{c[:9]:>9}" for c in cols))
        total = dict.fromkeys(cols, 0)
        for r in sorted(crash, key=lambda r: str(r["name"])):
            tr.write_line(f"{r['name']:<24} " + " ".join(f"{r[c]:>9}" for c in cols))
            for c in cols:
                total[c] += r[c]
        tr.write_line(f"{'TOTAL':<24} " + " ".join(f"{total[c]:>9}" for c in cols))
    if control:
        tr.section("qcow2aio power-cut controls (driver with a flush removed / reordered)")
        for name in sorted({r["control"] for r in control}):
            rows = [r for r in control if r["control"] == name]
            runs = len(rows)
            caught = sum(1 for r in rows if r["violating"])
            states = sum(r["states"] for r in rows)
            bad = sum(r["violating"] for r in rows)
            tr.write_line(
                f"{name:<22} runs {runs:>4}  caught {caught:>4} ({caught / max(1, runs):.0%})  "
                f"violating states {bad}/{states} ({bad / max(1, states):.1%})  "
                f"corrupt {sum(r['corrupt'] for r in rows)}  "
                f"lost {sum(r['lost_ack'] for r in rows)}"
            )
    if faults:
        tr.section("qcow2aio fault injection")
        cases = sum(r["cases"] for r in faults)
        fired = sum(r["fired"] for r in faults)
        failed = sum(r["failed_requests"] for r in faults)
        tr.write_line(
            f"cases {cases}, cases where the fault fired {fired}, failed requests {failed}, "
            f"problems {sum(r['problems'] for r in faults)}"
        )


# ------------------------------------------------------------ direct ordering
DATA_EVENTS = ("data_write", "cow_write")
L2_EVENTS = ("l2_update", "l2_alloc")
REFBLOCK_EVENTS = ("refblock_update", "refblock_alloc", "reftable_update", "reftable_grow")


def ordering_violations(journal: Journal, *, lazy: bool) -> list[str]:
    """Write-ordering rules read off the log: a write of each kind listed here must come
    after a completed flush that covers every earlier write of the kinds it depends on.

    * an L2 table: data and COW (rule 2) and, without lazy refcounts, refcount blocks and
      the refcount table (rule 1);
    * the L1 table: L2 tables (rule 3);
    * the refcount table: refcount blocks (a new block is durable before its entry).
    """
    needs = {
        "l2_update": DATA_EVENTS if lazy else DATA_EVENTS + REFBLOCK_EVENTS,
        "l2_alloc": DATA_EVENTS if lazy else DATA_EVENTS + REFBLOCK_EVENTS,
        "l1_update": L2_EVENTS,
        "reftable_update": ("refblock_update", "refblock_alloc"),
    }
    out: list[str] = []
    done = [f for f in journal.flushes if f.end is not None]
    for op in journal.ops:
        must = needs.get(op.event)
        if must is None:
            continue
        # Per file, the last of its flushes that completed before this write covers that
        # file's writes before the flush started (an fdatasync covers its own file only).
        covered: dict[str, int] = {}
        for f in done:
            if f.end is not None and f.end < op.pos:
                covered[f.file] = max(covered.get(f.file, 0), f.start)
        for prev in journal.ops:
            if prev.pos >= op.pos:
                break
            if prev.event in must and prev.pos > covered.get(prev.file, 0):
                out.append(
                    f"{op.event} at {op.offset:#x} (log {op.pos}) reached the file before "
                    f"{prev.event} at {prev.offset:#x} (log {prev.pos}) was flushed"
                )
    return out
