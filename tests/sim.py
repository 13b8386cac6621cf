"""Seeded interleaving exploration for qcow2aio (issue 4): loop, I/O jitter, oracle, harness.

Three pieces, each deterministic for a given seed:

* :class:`SeededEventLoop` — an ``asyncio.SelectorEventLoop`` whose ``_call_soon``
  puts every newly ready callback (task steps, future callbacks, ``sleep(0)``
  wake-ups) at a position of the ready queue drawn from a seeded RNG, instead
  of at the end. It also turns a would-block ``select()`` with nothing ready and
  no timers into :class:`SimDeadlock` (the simulation does no real async I/O,
  so nothing could ever wake the loop up), and bounds the number of turns.
* :class:`JitterBackend` — a :class:`qcow2aio.io.FileBackend` whose async
  methods do the I/O inline (no threads) at a seeded point: they yield to the
  loop ``k`` times before and ``k'`` times after the synchronous call (mostly
  0-3, sometimes up to 8, and 3% "stragglers" up to 40, so that whole requests
  can overtake one I/O). No wall-clock delays, so runs are fast and
  reproducible. Sync methods are not changed. :func:`jitter_factory` gives the
  ``io_backend=`` factory. The driver's own I/O threads (``qcow2aio.io.to_thread``,
  used for decompression) are made inline too while a simulation runs
  (:func:`inline_io_threads`).
* :class:`History` — the oracle. Every request is recorded with the logical
  times it was invoked and answered. A byte observed by a read (or in the final
  image) may hold the value of any write covering it that is not *superseded*:
  a write ``v`` is superseded when an acknowledged write ``d`` covering the
  byte was invoked after ``v`` completed and completed before the observation
  started. Writes that were cancelled are never superseded (their shielded data
  phase may land at any later time); failed writes end when they failed.

:func:`cancel_at_suspension` cancels a task exactly at its k-th suspension.

:func:`run_seed` runs one scenario body for one seed and one driver, closes
the image, reopens it read-only with plain I/O and checks the oracle, our own
``check()``, and (on sampled seeds) ``qemu-img check`` and ``qemu-img compare``.

Every harness (this one, tests/threadsim.py, tests/faults.py, tests/test_powercut.py)
also runs on encrypted images: :data:`CRYPTS` names the image kinds, and
:func:`crypt_create`, :func:`crypt_open` and :func:`qemu_image` give what creating,
opening and QEMU's tools need for each (the passphrase, QEMU's secret object).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import os
import random
import shlex
import shutil
import subprocess
import tempfile
import traceback
import types
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import qcow2aio
import qcow2aio.io
from qcow2aio import testing
from qcow2aio.io import BackendFactory, Buffer, FileBackend

T = TypeVar("T")

DRIVERS = ("async", "sync", "unserialized")
# Drivers that must be caught (tests/test_ops_races.py adds "nodrain": image operations
# that neither close the admission gate nor drain).
CONTROL_DRIVERS = frozenset({"unserialized", "nodrain"})
NEVER = 1 << 62  # "end" of a request whose effect may still land (cancelled, pending)
WRITE_KINDS = frozenset({"write", "zero", "discard"})


# ---------------------------------------------------------------- seeds, env
def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def stress() -> bool:
    """``QCOW2AIO_STRESS=1``: the long run (``make stress``)."""
    return os.environ.get("QCOW2AIO_STRESS", "").strip() not in ("", "0")


def replay_seed() -> int | None:
    """``QCOW2AIO_SEED=N``: replay one seed (every selected scenario and driver)."""
    return _env_int("QCOW2AIO_SEED")


def seed_list(default_count: int) -> list[int]:
    """Seeds for one scenario: the replayed one, or ``QCOW2AIO_SEEDS`` (default: 10,000
    with ``QCOW2AIO_STRESS=1``, else ``default_count``) from ``QCOW2AIO_SEED_START``."""
    one = replay_seed()
    if one is not None:
        return [one]
    count = _env_int("QCOW2AIO_SEEDS")
    if count is None:
        count = 10_000 if stress() else default_count
    start = _env_int("QCOW2AIO_SEED_START") or 0
    return list(range(start, start + count))


def qemu_sampled(seed: int) -> bool:
    """Whether this seed also gets ``qemu-img check``/``compare`` (failing seeds always do)."""
    if replay_seed() is not None:
        return True
    every = _env_int("QCOW2AIO_QEMU_EVERY") or (50 if stress() else 10)
    return seed % every == 0


def replay_command(nodeid: str, seed: int) -> str:
    """One line that replays ``seed`` of the test ``nodeid``."""
    return (
        f"QCOW2AIO_SEED={seed} .venv/bin/python -m pytest -p no:cacheprovider {shlex.quote(nodeid)}"
    )


# ------------------------------------------------------- encrypted images
# Image kinds every harness runs on: plain, LUKS (IV = host sector: a cluster written
# at a new host offset is re-encrypted there) and legacy AES (IV = guest sector).
CRYPTS = ("plain", "luks", "aes")
PASSPHRASE = "pw"
# Seeds per scenario and driver for an encrypted kind in a quick run (``make test``);
# ``QCOW2AIO_STRESS=1`` runs the full count for every kind.
ENCRYPTED_SEEDS = 10


def crypt_create(crypt: str) -> dict[str, Any]:
    """``qcow2aio.create`` keywords making an image of kind ``crypt`` (LUKS with a
    10 ms PBKDF2: fast, and without QEMU's iteration-timing flake)."""
    if crypt == "plain":
        return {}
    assert crypt in CRYPTS, crypt
    extra = {"encrypt_iter_time": 10} if crypt == "luks" else {}
    return {"encrypt_format": crypt, "passphrase": PASSPHRASE, **extra}


def crypt_open(crypt: str) -> dict[str, Any]:
    """``qcow2aio.open`` keywords for an image of kind ``crypt``."""
    return {} if crypt == "plain" else {"passphrase": PASSPHRASE}


def image_opts(path: str | os.PathLike[str], driver: str = "qcow2") -> str:
    """``path`` as a QEMU ``--image-opts`` string (a comma in a file name is doubled)."""
    name = os.fspath(path).replace(",", ",,")
    secret = ",encrypt.key-secret=sec0" if driver == "qcow2" else ""
    return f"driver={driver},file.filename={name}{secret}"


def qemu_image(path: str | os.PathLike[str], crypt: str) -> tuple[list[str], str]:
    """(options, image name) for qemu-img/qemu-io: the path as it is for a plain image;
    for an encrypted one the passphrase as a secret object, ``--image-opts``, and an
    option string naming the secret. The backing file is opened from the header (the
    harnesses' backing files are plain)."""
    if crypt == "plain":
        return [], os.fspath(path)
    return ["--object", f"secret,id=sec0,data={PASSPHRASE}", "--image-opts"], image_opts(path)


def qemu_compare_argv(
    qemu_img: str, path: str | os.PathLike[str], raw: str | os.PathLike[str], crypt: str
) -> list[str]:
    """``qemu-img compare`` of a qcow2 image of kind ``crypt`` with a raw file."""
    if crypt == "plain":
        return [qemu_img, "compare", "-q", "-f", "qcow2", "-F", "raw", str(path), str(raw)]
    opts, name = qemu_image(path, crypt)
    return [qemu_img, "compare", "-q", *opts, name, image_opts(raw, "raw")]


# (passphrase, header, bytes read, result) of recent unlocks, newest last.
_UNLOCKS: list[tuple[bytes, Any, list[tuple[int, int, bytes]], tuple[bytes, int]]] = []


@contextlib.contextmanager
def memoized_unlock() -> Iterator[None]:
    """Unlock each distinct LUKS area once (PBKDF2 and the anti-forensic merge take
    20-30 ms, and a crash state's image is opened three times).

    Sound: unlocking is a function of the passphrase, the parsed header and the bytes
    it reads, so an entry is reused only when the header is equal and every byte it
    read reads the same again (re-read and compared at each use): a state whose
    keyslots a stray write reached is unlocked for real.
    """
    from qcow2aio.crypto import payload

    real = payload.unlock

    def unlock(header: Any, read: Callable[[int, int], bytes], secret: bytes) -> tuple[bytes, int]:
        for sec, hdr, reads, result in reversed(_UNLOCKS):
            if sec == secret and hdr == header and all(read(o, n) == b for o, n, b in reads):
                return result
        seen: list[tuple[int, int, bytes]] = []

        def recording_read(offset: int, length: int) -> bytes:
            data = read(offset, length)
            seen.append((offset, length, data))
            return data

        result = real(header, recording_read, secret)
        _UNLOCKS.append((secret, header, seen, result))
        del _UNLOCKS[:-4]
        return result

    payload.unlock = unlock  # type: ignore[assignment]
    try:
        yield
    finally:
        payload.unlock = real


class FailingSeed(Protocol):
    """What :func:`publish_seeds` needs of a failing seed's outcome."""

    seed: int

    def summary(self) -> str: ...

    @property
    def failures(self) -> Sequence[Any]: ...


def publish_seeds(request: Any, row: dict[str, Any], failing: Sequence[FailingSeed]) -> str:
    """Record a scenario's row for the report (tests/sim_report.py) and print it; when
    replaying one seed, print every failure in full. Returns the summary and replay
    line of the first failing seeds, for the test's assertion message."""
    request.node.user_properties.append(("qcow2aio_sim", json.dumps(row)))
    print(json.dumps(row))
    if replay_seed() is not None:
        for out in failing:
            for f in out.failures:
                print(f"--- [{f.kind}] {f.detail}")
    lines = []
    for out in failing[:5]:
        lines.append(out.summary())
        lines.append(f"  replay: {replay_command(request.node.nodeid, out.seed)}")
    return "\n".join(lines)


def tasks_waiting(loop: asyncio.AbstractEventLoop, limit: int | None = None) -> str:
    """Where every unfinished task of ``loop`` is suspended (innermost frames)."""
    lines = []
    for task in asyncio.all_tasks(loop):
        chain: list[str] = []
        obj: Any = task.get_coro()
        while obj is not None and len(chain) < 12:
            frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None)
            if frame is None:
                chain.append(type(obj).__name__)
                break
            chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
            obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
        lines.append(f"  {task.get_name()}: {' -> '.join(chain)}")
    return "\n".join(sorted(lines)[:limit])


# ----------------------------------------------------------- seeded loop
class SimDeadlock(RuntimeError):
    """Every task waits and nothing can wake any of them."""


class SimLivelock(RuntimeError):
    """The run took more loop turns than any scenario needs."""


class SeededEventLoop(asyncio.SelectorEventLoop):
    """An event loop that runs ready callbacks in a seeded random order.

    asyncio runs ready callbacks FIFO; here each one is inserted into the ready
    queue at a position drawn from ``random.Random(f"loop:{seed}")``. Atomicity
    between awaits is unchanged (a callback still runs to its next await), only
    which ready step runs next is explored. Same seed and same program, same
    schedule.
    """

    def __init__(self, seed: int, *, max_turns: int = 2_000_000) -> None:
        super().__init__()
        self.seed = seed
        self.turns = 0
        self.max_turns = max_turns
        self._sim_rng = random.Random(f"loop:{seed}")

    def _call_soon(self, callback: Any, args: Any, context: Any) -> Any:
        handle = super()._call_soon(callback, args, context)  # type: ignore[misc]
        ready: deque[Any] = self._ready  # type: ignore[attr-defined]
        n = len(ready)
        if n > 1:
            pos = self._sim_rng.randrange(n)
            if pos != n - 1:
                ready.pop()
                ready.insert(pos, handle)
        return handle

    def waiting(self) -> str:
        """Where every unfinished task is suspended (innermost frames)."""
        return tasks_waiting(self)

    def _run_once(self) -> None:
        self.turns += 1
        if self.turns > self.max_turns:
            raise SimLivelock(f"more than {self.max_turns} loop turns (seed {self.seed})")
        if not self._ready and not self._scheduled:  # type: ignore[attr-defined]
            raise SimDeadlock(
                f"no ready callback and no timer: deadlock (seed {self.seed}); waiting:\n"
                + self.waiting()
            )
        super()._run_once()  # type: ignore[misc]


@contextlib.contextmanager
def inline_io_threads() -> Iterator[None]:
    """Run the driver's I/O-thread jobs (``qcow2aio.io.to_thread``: decompression, and
    plain FileBackend I/O) inline, completing their futures after a seeded number of
    loop hops: a worker thread would decide timing outside the seeded loop, and its
    ``call_soon_threadsafe`` wake-up is invisible to the deadlock check."""
    threads = getattr(qcow2aio.io, "_THREADS", None)
    if threads is None:
        # No private pool any more: fine if nothing can hop to a thread either.
        assert not hasattr(qcow2aio.io, "to_thread"), "update sim.inline_io_threads"
        yield
        return

    def submit(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        try:
            result, error = fn(*args), None
        except BaseException as exc:
            result, error = None, exc
        rng: random.Random = getattr(loop, "_sim_rng", random.Random(0))
        hops = rng.choice((0, 0, 1, 2, 3))

        def finish(k: int) -> None:
            if k:
                loop.call_soon(finish, k - 1)
            elif not fut.cancelled():
                if error is None:
                    fut.set_result(result)
                else:
                    fut.set_exception(error)

        loop.call_soon(finish, hops)
        return fut

    threads.submit = submit
    try:
        yield
    finally:
        del threads.submit  # back to the class's method


def run_sim(seed: int, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` to completion on a fresh :class:`SeededEventLoop`; tidy up after."""
    loop = SeededEventLoop(seed)
    try:
        with inline_io_threads():
            return loop.run_until_complete(main())
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                with contextlib.suppress(SimDeadlock, SimLivelock):
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            loop.close()


@types.coroutine
def cancel_at_suspension(
    coro: Coroutine[Any, Any, T], k: int, log: list[int]
) -> Generator[Any, Any, T]:
    """Run ``coro`` and cancel the task running it at its ``k``-th suspension (0-based).

    Every await that really suspends the task (a future, a ``sleep(0)``, a lock
    wait, I/O jitter) counts, however deeply nested in the driver. The cancel is
    requested just before the task suspends, so ``CancelledError`` is raised at
    exactly that await. ``log`` receives the number of suspensions seen.
    """
    gen = coro.__await__()
    n = 0
    value: Any = None
    error: BaseException | None = None
    try:
        while True:
            try:
                if error is not None:
                    err, error = error, None
                    yielded = gen.throw(err)
                else:
                    yielded = gen.send(value)
            except StopIteration as stop:
                result: T = stop.value
                return result
            if n == k:
                task = asyncio.current_task()
                assert task is not None
                task.cancel()
            n += 1
            try:
                value = yield yielded
            except GeneratorExit:
                gen.close()
                raise
            except BaseException as exc:  # delivered into the wrapped coroutine
                error, value = exc, None
    finally:
        log.append(n)


async def cancelled_at(coro: Coroutine[Any, Any, T], k: int, log: list[int]) -> T:
    """``await`` form of :func:`cancel_at_suspension`, usable as a task's coroutine."""
    return await cancel_at_suspension(coro, k, log)


async def turns(k: int) -> None:
    """Yield to the loop ``k`` times (no wall-clock time)."""
    for _ in range(k):
        await asyncio.sleep(0)


# ------------------------------------------------------------ I/O jitter
class JitterBackend(FileBackend):
    """A file whose async I/O completes after a seeded number of loop turns.

    The synchronous I/O is done inline, between ``before`` and ``after`` yields,
    so the moment its effect becomes visible is part of the explored schedule.
    Each side yields 0 times (35%), 1-3 times (50%), 4-``max_turns`` times (12%)
    or, for a straggler, up to ``straggler_turns`` times (3%).
    No thread pool is used, so nothing outside the seeded loop decides timing.
    """

    def __init__(
        self,
        path: str,
        writable: bool = False,
        *,
        rng: random.Random,
        max_turns: int = 8,
        straggler_turns: int = 40,
        trace: list[tuple[str, str, int, int]] | None = None,
    ) -> None:
        super().__init__(path, writable)
        self.rng = rng
        self.max_turns = max_turns
        self.straggler_turns = straggler_turns
        self.trace = trace
        self.name = os.path.basename(path)

    def _turns(self) -> int:
        r = self.rng.random()
        if r < 0.35:
            return 0
        if r < 0.85:
            return self.rng.randint(1, 3)
        if r < 0.97:
            return self.rng.randint(4, self.max_turns)
        # A straggler (an I/O stuck behind others): whole requests may overtake it.
        return self.rng.randint(self.max_turns + 1, self.straggler_turns)

    async def _jitter(self) -> None:
        for _ in range(self._turns()):
            await asyncio.sleep(0)

    def _log(self, op: str, event: str, offset: int, length: int) -> None:
        if self.trace is not None:
            self.trace.append((f"{self.name}:{op}", event, offset, length))

    async def apread(self, offset: int, length: int, event: str = "read") -> bytes:
        await self._jitter()
        data = self.pread(offset, length, event)
        self._log("read", event, offset, length)
        await self._jitter()
        return data

    async def areadinto(self, buf: memoryview, offset: int, event: str = "read") -> None:
        await self._jitter()
        self.readinto(buf, offset, event)
        self._log("read", event, offset, len(buf))
        await self._jitter()

    async def apwritev(self, buffers: Sequence[Buffer], offset: int, event: str = "write") -> None:
        await self._jitter()
        self.pwritev(buffers, offset, event)
        self._log("write", event, offset, sum(len(b) for b in buffers))
        await self._jitter()

    async def aflush(self, event: str = "flush") -> None:
        await self._jitter()
        self.flush(event)
        self._log("flush", event, 0, 0)
        await self._jitter()

    async def atruncate(self, size: int, event: str = "truncate") -> None:
        await self._jitter()
        self.truncate(size, event)
        self._log("truncate", event, size, 0)
        await self._jitter()


def jitter_factory(
    seed: int, *, max_turns: int = 8, trace: list[tuple[str, str, int, int]] | None = None
) -> BackendFactory:
    """``io_backend=`` factory: each opened file gets an RNG keyed by seed, name, and count."""
    opened: Counter[str] = Counter()

    def factory(path: str, writable: bool) -> FileBackend:
        name = os.path.basename(path)
        n = opened[name]
        opened[name] += 1
        rng = random.Random(f"jitter:{seed}:{name}:{n}")
        return JitterBackend(path, writable, rng=rng, max_turns=max_turns, trace=trace)

    return factory


# ---------------------------------------------------------------- oracle
@dataclass(eq=False)
class Op:
    """One request as the oracle sees it."""

    kind: str  # write | zero | discard | read | flush | close
    off: int = 0
    length: int = 0
    data: bytes = b""
    sync: bool = False
    start: int = -1
    end: int = NEVER
    status: str = "pending"  # ok | error | cancelled | pending
    result: bytes | None = None
    error: str = ""
    tag: str = ""
    # A discard that may have been a no-op: on a v2 image with a backing file QEMU
    # (and we) discard nothing, having no zero flag to hide the backing file with.
    # It may show zeros but supersedes nothing.
    maybe_noop: bool = False

    def label(self) -> str:
        via = "sync " if self.sync else ""
        return (
            f"{via}{self.kind}{'/' + self.tag if self.tag else ''} [{self.off}, "
            f"{self.off + self.length}) t={self.start}..{self.end if self.end < NEVER else '?'} "
            f"{self.status}"
        )

    def bytes_at(self, a: int, b: int) -> bytes:
        if self.kind == "write":
            return self.data[a - self.off : b - self.off]
        return bytes(b - a)


class History:
    """Requests with logical invocation/response times, and the old-or-new oracle."""

    def __init__(self, initial: bytes) -> None:
        self.initial = initial
        self.clock = 0
        self.ops: list[Op] = []
        # An encrypted image: see check() (a concurrently written sector may read torn).
        self.sector_tear = False

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def begin(self, op: Op) -> Op:
        op.start = self.tick()
        self.ops.append(op)
        return op

    def done(self, op: Op, result: bytes | None = None) -> None:
        op.end = self.tick()
        op.status = "ok"
        op.result = result

    def failed(self, op: Op, exc: BaseException) -> None:
        op.end = self.tick()
        op.status = "error"
        op.error = f"{type(exc).__name__}: {exc}"

    def cancelled(self, op: Op) -> None:
        op.end = NEVER
        op.status = "cancelled"

    def writes(self) -> list[Op]:
        return [o for o in self.ops if o.kind in WRITE_KINDS]

    def check(
        self,
        actual: bytes,
        lo: int,
        *,
        start: int = NEVER,
        end: int = NEVER,
        done_before: frozenset[int] = frozenset(),
    ) -> str | None:
        """Check bytes observed at guest ``[lo, lo+len)`` during ``[start, end]``.

        ``start=end=NEVER`` checks a final state (everything finished). Returns
        None, or a description of the first byte no allowed write explains.
        ``done_before`` names (by ``id``) writes that the driver guarantees had
        finished before the observation although their callers had not yet been
        answered (an image operation drains the requests in flight when it is
        called, and its state is observed after that): they supersede as if they had
        been acknowledged before ``start``.

        With ``sector_tear`` (an encrypted image), a read's 512-byte sectors that a
        write running at the same time also writes are not judged: neither QEMU nor
        the kernel's page cache makes a sector's copy atomic against a concurrent
        read, and a sector read half old, half new ciphertext decrypts to noise (on
        a plain image such a read is a per-byte mix of old and new, which is judged).
        """
        if self.sector_tear and start != NEVER:
            hi = lo + len(actual)
            for a, b in self._untorn_runs(lo, hi, start, end):
                bad = self._check(
                    actual[a - lo : b - lo], a, start=start, end=end, done_before=done_before
                )
                if bad is not None:
                    return bad
            return None
        return self._check(actual, lo, start=start, end=end, done_before=done_before)

    def _untorn_runs(self, lo: int, hi: int, start: int, end: int) -> list[tuple[int, int]]:
        """``[lo, hi)`` less the sectors a write concurrent with ``[start, end]`` touches."""
        torn: set[int] = set()
        for w in self.ops:
            if w.kind not in ("write", "zero") or not w.length:
                continue
            if w.start >= end or w.end <= start:
                continue  # not running during the read
            a, b = max(lo, w.off), min(hi, w.off + w.length)
            if a < b:
                torn.update(range(a >> 9, ((b - 1) >> 9) + 1))
        runs: list[tuple[int, int]] = []
        pos = lo
        while pos < hi:
            nxt = min(hi, ((pos >> 9) + 1) << 9)
            if (pos >> 9) not in torn:
                if runs and runs[-1][1] == pos:
                    runs[-1] = (runs[-1][0], nxt)
                else:
                    runs.append((pos, nxt))
            pos = nxt
        return runs

    def _check(
        self,
        actual: bytes,
        lo: int,
        *,
        start: int,
        end: int,
        done_before: frozenset[int] = frozenset(),
    ) -> str | None:
        hi = lo + len(actual)
        writes = [w for w in self.writes() if w.off < hi and lo < w.off + w.length and w.length]
        cuts = {lo, hi}
        for w in writes:
            cuts.add(max(lo, w.off))
            cuts.add(min(hi, w.off + w.length))
        points = sorted(cuts)
        for a, b in itertools.pairwise(points):
            cover = [w for w in writes if w.off <= a and b <= w.off + w.length]
            got = actual[a - lo : b - lo]
            if not cover:
                if got != self.initial[a:b]:
                    return self._mismatch(got, a, [("initial", self.initial[a:b])])
                continue
            dom = [
                d
                for d in cover
                if not d.maybe_noop
                and ((d.status == "ok" and d.end < start) or (done_before and id(d) in done_before))
            ]
            cands: list[tuple[str, bytes]] = []
            if not dom:
                cands.append(("initial", self.initial[a:b]))
            for w in cover:
                if w.start >= end:
                    continue
                if any(d.start > w.end for d in dom):
                    continue
                cands.append((w.label(), w.bytes_at(a, b)))
            if any(got == c for _, c in cands):
                continue
            for i in range(b - a):
                if not any(c[i] == got[i] for _, c in cands):
                    return self._mismatch(got[i:], a + i, [(n, c[i:]) for n, c in cands])
        return None

    @staticmethod
    def _mismatch(got: bytes, at: int, cands: list[tuple[str, bytes]]) -> str:
        lines = [f"guest byte {at}: got {got[:8].hex()}"]
        if not cands:
            lines.append("  no write may show here")
        for name, c in cands:
            lines.append(f"  allowed {c[:8].hex()} from {name}")
        return "\n".join(lines)

    def apply_acked(self) -> bytearray:
        """The initial contents with every acknowledged write applied in completion order
        (exact when acknowledged writes do not overlap)."""
        out = bytearray(self.initial)
        for w in sorted((w for w in self.writes() if w.status == "ok"), key=lambda o: o.end):
            out[w.off : w.off + w.length] = w.bytes_at(w.off, w.off + w.length)
        return out


# ------------------------------------------------------- sync-path guard
def fingerprint(img: qcow2aio.Image) -> tuple[Any, ...]:
    """Everything a busy (refused) synchronous call must leave unchanged, file included."""
    m = img.meta
    alloc = m.allocator
    with open(img.path, "rb") as f:
        file_bytes = f.read()
    return (
        file_bytes,
        m.l1.entries.tobytes(),
        m.l1.dirty,
        sorted((t.offset, t.entries.tobytes(), t.dirty) for t in m.l2_cache.values()),
        sorted((b.offset, bytes(b.data), b.dirty) for b in m.refblock_cache.values()),
        m.reftable.offset,
        m.reftable.entries.tobytes(),
        m.reftable.dirty,
        None
        if alloc is None
        else tuple((p.offset, p.length, p.epoch, p.durable) for p in alloc.pending),
        len(img.inflight),
        img.lock.locked(),
        img._epoch,
        tuple(sorted(img._active.items())),
        m.header.incompatible_features,
        img._poisoned,
    )


# --------------------------------------------------------------- harness
@dataclass
class Failure:
    kind: str  # exception | read | final | check | qemu | busy | extra | deadlock | flushcopy
    detail: str


@dataclass
class Outcome:
    scenario: str
    driver: str
    seed: int
    failures: list[Failure] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)
    leaks: int = 0
    qemu_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        if self.ok:
            return f"{self.scenario}/{self.driver} seed {self.seed}: ok"
        first = self.failures[0]
        return (
            f"{self.scenario}/{self.driver} seed {self.seed}: {len(self.failures)} failure(s), "
            f"first [{first.kind}] {first.detail}"
        )


@dataclass
class ImageSetup:
    """What a scenario's seed starts from."""

    path: Path  # the qcow2 image the seed works on (a fresh copy of a template)
    initial: bytes  # guest contents at the start
    open_kwargs: dict[str, Any] = field(default_factory=dict)  # passphrase included
    info: dict[str, Any] = field(default_factory=dict)  # scenario-specific facts
    crypt: str = "plain"  # image kind (CRYPTS)


class Ctx:
    """What a scenario body uses: the image, the oracle, seeded RNGs, request helpers."""

    def __init__(
        self,
        *,
        img: qcow2aio.Image,
        hist: History,
        setup: ImageSetup,
        driver: str,
        seed: int,
        scenario: str,
        outcome: Outcome,
    ) -> None:
        self.img = img
        self.hist = hist
        self.setup = setup
        self.path = setup.path
        self.driver = driver
        self.seed = seed
        self.crypt = setup.crypt
        self.cs = img.cluster_size
        self.size = img.size
        self.outcome = outcome
        # Workload RNG: the same requests for every driver of one seed.
        self.wrng = random.Random(f"{scenario}:{seed}:workload")
        # Which requests take the synchronous path (sync driver only).
        self.srng = random.Random(f"{scenario}:{seed}:sync")
        # Encrypted images: which writes are trimmed to whole sectors (see sectors()).
        self.sector_mode = (
            None
            if self.crypt == "plain"
            else random.Random(f"{scenario}:{seed}:crypt").randrange(3)
        )
        self.expect_errors = False  # Qcow2Error from requests is a normal outcome (close)
        self.tasks: list[asyncio.Task[Any]] = []
        self.flush_copies: list[tuple[Path, int, int]] = []  # (copy, flush start, copy time)
        self.copy_after_flush = False
        self.notes: dict[str, Any] = {}

    # ------------------------------------------------------------ plumbing
    def sectors(self, off: int, data: bytes) -> tuple[int, bytes]:
        """A write as an encrypted image's seed sends it. Scenarios draw most writes at
        any byte offset, which on an encrypted image makes every one of them a sector
        read-modify-write (serialized among themselves). So a third of the seeds each
        send every write as drawn, every write trimmed to the whole sectors inside it
        (no read-modify-write: the writes race in allocation and COW), or each write
        one way or the other (both kinds race in one cluster, and on shared sectors).
        Trimmed, a write stays inside its drawn range: scenarios keep their invariants.
        The choice depends on the seed and the write only (the same for every driver)."""
        mode = self.sector_mode
        if not mode:
            return off, data
        if mode == 2 and random.Random(f"sectors:{self.seed}:{off}:{len(data)}").random() < 0.5:
            return off, data
        a = (off + 511) & ~511
        b = (off + len(data)) & ~511
        if a >= b:
            return off, data
        return a, data[a - off : b - off]

    def fit(self, off: int, n: int) -> int:
        """``n`` shortened so that ``[off, off+n)`` stays inside the virtual disk."""
        return min(n, self.size - off)

    def fail(self, kind: str, detail: str) -> None:
        self.outcome.failures.append(Failure(kind, detail))

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(coro)
        self.tasks.append(task)
        return task

    async def join(self) -> None:
        """Wait for every spawned request (cancelled ones included)."""
        while True:
            pending = [t for t in self.tasks if not t.done()]
            if not pending:
                return
            await asyncio.gather(*pending, return_exceptions=True)

    def use_sync(self, p: float) -> bool:
        """Whether the next eligible request goes through the synchronous fast path."""
        if self.driver != "sync":
            self.srng.random()  # keep the stream aligned across drivers
            return False
        return self.srng.random() < p

    def _unexpected(self, op: Op, exc: BaseException) -> None:
        self.hist.failed(op, exc)
        if isinstance(exc, qcow2aio.Qcow2Error) and self.expect_errors:
            self.outcome.stats["request errors (expected)"] += 1
            return
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-4))
        self.fail("exception", f"{op.label()} raised {op.error}\n{tb}")

    async def _sync(self, op: Op, call: Callable[[], T]) -> T:
        """Call the synchronous fast path, retrying while busy; a busy call must change
        nothing (file bytes and in-memory metadata are compared)."""
        for _ in range(100_000):
            before = fingerprint(self.img)
            try:
                self.hist.begin(op)
                return call()
            except qcow2aio.ImageBusyError:
                self.hist.ops.remove(op)
                self.outcome.stats["sync busy"] += 1
                if fingerprint(self.img) != before:
                    self.fail("busy", f"{op.label()} raised ImageBusyError after changing state")
            await asyncio.sleep(0)
        raise AssertionError(f"{op.label()}: busy forever")

    async def _request(
        self,
        op: Op,
        call: Callable[[], Awaitable[T]],
        sync_call: Callable[[], T] | None = None,
    ) -> tuple[bool, T | None]:
        """Run one request (through the sync path when ``op.sync``), recording it in the
        history; ``(True, result)`` when it returned, ``(False, None)`` when it raised
        (recorded as failed). Cancellation is recorded and propagates."""
        try:
            if op.sync:
                assert sync_call is not None
                return True, await self._sync(op, sync_call)
            self.hist.begin(op)
            return True, await call()
        except asyncio.CancelledError:
            self.hist.cancelled(op)
            raise
        except Exception as exc:
            self._unexpected(op, exc)
            return False, None

    # ------------------------------------------------------------ requests
    async def write(
        self,
        off: int,
        data: bytes,
        *,
        delay: int = 0,
        sync_p: float = 0.5,
        sync: bool | None = None,
        tag: str = "",
    ) -> Op:
        await turns(delay)
        off, data = self.sectors(off, data)
        op = Op("write", off, len(data), data, tag=tag)
        op.sync = self.use_sync(sync_p) if sync is None else sync
        ok, _ = await self._request(
            op, lambda: self.img.write(off, data), lambda: self.img.write_sync(off, data)
        )
        if ok:
            self.hist.done(op)
        return op

    async def read(
        self, off: int, n: int, *, delay: int = 0, sync_p: float = 0.5, sync: bool | None = None
    ) -> Op:
        await turns(delay)
        op = Op("read", off, n)
        op.sync = self.use_sync(sync_p) if sync is None else sync
        ok, data = await self._request(
            op, lambda: self.img.read(off, n), lambda: self.img.read_sync(off, n)
        )
        if ok:
            self.hist.done(op, data)
        return op

    async def zeroes(
        self, off: int, n: int, *, unmap: bool = True, delay: int = 0, tag: str = ""
    ) -> Op:
        await turns(delay)
        op = Op("zero", off, n, tag=tag or ("unmap" if unmap else "keep"))
        if (await self._request(op, lambda: self.img.write_zeroes(off, n, unmap=unmap)))[0]:
            self.hist.done(op)
        return op

    async def discard(self, off: int, n: int, *, delay: int = 0, tag: str = "") -> Op:
        """Discard whole clusters (callers pass a cluster-aligned range: v3 reads zeros;
        on v2 over a backing file the discard does nothing: ``Op.maybe_noop``, also
        when ``notes["may_downgrade"]`` says an amend may make the image v2 while this
        discard waits for it)."""
        assert off % self.cs == 0 and (n % self.cs == 0 or off + n == self.size)
        await turns(delay)
        op = Op("discard", off, n, tag=tag)
        op.maybe_noop = self.img.backing is not None and (
            self.img.meta.version < 3 or bool(self.notes.get("may_downgrade"))
        )
        if (await self._request(op, lambda: self.img.discard(off, n)))[0]:
            self.hist.done(op)
        return op

    async def flush(
        self, *, delay: int = 0, sync_p: float = 0.5, sync: bool | None = None, tag: str = ""
    ) -> Op:
        await turns(delay)
        op = Op("flush", tag=tag)
        op.sync = self.use_sync(sync_p) if sync is None else sync
        if not (await self._request(op, self.img.flush, self.img.flush_sync))[0]:
            return op
        self.hist.done(op)
        if self.copy_after_flush:
            # Right after the flush returned, before any other task runs.
            copy = self.path.with_name(f"flushcopy-{len(self.flush_copies)}.qcow2")
            shutil.copyfile(self.path, copy)
            self.flush_copies.append((copy, op.start, self.hist.tick()))
        return op

    async def close(self, *, delay: int = 0) -> Op:
        await turns(delay)
        op = Op("close")
        if (await self._request(op, self.img.aclose))[0]:
            self.hist.done(op)
        return op


@dataclass
class Scenario:
    """One race scenario: how to make its image, its body, and its extra checks."""

    name: str
    setup: Callable[[SimEnv, int], ImageSetup]
    body: Callable[[Ctx], Awaitable[None]]
    verify: Callable[[Ctx, qcow2aio.Image, bytes, dict[str, Any]], None] | None = None
    unserialized_catchable: bool = True
    # On encrypted images (sub-sector writes serialized by their own lock, which the
    # unserialized control keeps, may be all that races).
    catchable_encrypted: bool = True
    default_seeds: int = 30
    note: str = ""


class SimEnv:
    """Per-test working state: a scratch folder (tmpfs when there is one), templates,
    and the QEMU helper for sampled checks."""

    def __init__(self, tmp_path: Path, qemu: Any) -> None:
        self.qemu = qemu
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
        # fdatasync on tmpfs is free; on a disk it would dominate every seed.
        self.dir = Path(tempfile.mkdtemp(prefix="qcow2aio-sim-", dir=base))
        # The kind of image (CRYPTS) the setups make: a test sets it before its seeds.
        self.crypt = "plain"
        self.templates: dict[str, tuple[Path, bytes]] = {}
        self.templates_info: dict[str, dict[str, Any]] = {}
        # Files a template's image refers to by name (an external data file): restored
        # from a pristine copy for every seed.
        self.restore: dict[str, list[Path]] = {}

    def keep_pristine(self, key: str, live: Path) -> None:
        """Restore ``live`` to its present contents whenever template ``key`` is used."""
        shutil.copyfile(live, live.with_name(live.name + ".pristine"))
        self.restore.setdefault(key, []).append(live)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def backing(self, name: str, size: int) -> bytes:
        """A raw backing file of seeded random bytes in the scratch folder."""
        path = self.dir / name
        if not path.exists():
            path.write_bytes(random.Random(f"backing:{name}").randbytes(size))
        return path.read_bytes()

    def template(self, key: str, build: Callable[[Path], bytes]) -> tuple[Path, bytes]:
        """A template image built once by ``build(path) -> initial guest contents``."""
        if key not in self.templates:
            path = self.dir / f"template-{key}.qcow2"
            initial = build(path)
            self.templates[key] = (path, initial)
        return self.templates[key]

    def fresh(self, key: str, build: Callable[[Path], bytes]) -> tuple[Path, bytes]:
        """A fresh working copy of a template image."""
        tpl, initial = self.template(key, build)
        path = self.dir / "img.qcow2"
        shutil.copyfile(tpl, path)
        for live in self.restore.get(key, ()):
            shutil.copyfile(live.with_name(live.name + ".pristine"), live)
        for old in self.dir.glob("flushcopy-*.qcow2"):
            old.unlink()
        return path, initial


def _open(path: Path, driver: str, factory: BackendFactory, kwargs: dict[str, Any]) -> Any:
    if driver == "unserialized":
        with testing.unserialized():
            return qcow2aio.open(path, "r+", io_backend=factory, **kwargs)
    return qcow2aio.open(path, "r+", io_backend=factory, **kwargs)


def run_seed(scn: Scenario, driver: str, seed: int, env: SimEnv) -> Outcome:
    """Run ``scn`` once: seeded schedule, seeded jitter, then every check."""
    out = Outcome(scn.name, driver, seed)
    setup = scn.setup(env, seed)
    hist = History(setup.initial)
    hist.sector_tear = setup.crypt != "plain"
    with memoized_unlock():
        img = _open(setup.path, driver, jitter_factory(seed), setup.open_kwargs)
    if scn.name not in NO_BITMAP_SCENARIOS:
        _add_sim_bitmap(img, seed)
    ctx = Ctx(
        img=img, hist=hist, setup=setup, driver=driver, seed=seed, scenario=scn.name, outcome=out
    )

    async def main() -> None:
        try:
            await scn.body(ctx)
            await ctx.join()
        finally:
            await img.aclose()

    try:
        run_sim(seed, main)
    except (SimDeadlock, SimLivelock) as exc:
        ctx.fail("deadlock", str(exc))
    except Exception as exc:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-6))
        ctx.fail("exception", f"scenario body raised {type(exc).__name__}: {exc}\n{tb}")
    finally:
        try:
            img.close()
        except Exception as exc:
            ctx.fail("exception", f"close() after the run raised {type(exc).__name__}: {exc}")
    with memoized_unlock():
        _verify(scn, ctx, out, env)
    if replay_seed() is not None:
        print(f"--- {scn.name}/{driver} seed {seed}: requests (t = logical invoke..answer)")
        for op in hist.ops:
            print(f"    {op.label()} {op.error}")
    return out


def _verify(scn: Scenario, ctx: Ctx, out: Outcome, env: SimEnv) -> None:
    hist = ctx.hist
    # Reads answered during the run.
    for op in hist.ops:
        if op.kind == "read" and op.status == "ok" and op.result is not None:
            bad = hist.check(op.result, op.off, start=op.start, end=op.end)
            if bad is not None:
                out.failures.append(Failure("read", f"{op.label()} saw\n{bad}"))
    report: dict[str, Any] = {}
    final = b""
    try:
        with qcow2aio.open(ctx.path, "r", **crypt_open(ctx.crypt)) as img:
            final = img.read_sync(0, img.size)
            report = img.check()
            bad = hist.check(final, 0)
            if bad is not None:
                out.failures.append(Failure("final", bad))
            if scn.verify is not None:
                scn.verify(ctx, img, final, report)
            _verify_bitmap(ctx, out, img, final)
    except Exception as exc:
        out.failures.append(
            Failure("final", f"reopen/read/check raised {type(exc).__name__}: {exc}")
        )
    if report:
        out.leaks = int(report.get("leaks", 0))
        if report.get("corruptions", 0) or report.get("check-errors", 0):
            out.failures.append(Failure("check", f"check() found {report}"))
        elif out.leaks:
            out.failures.append(Failure("check", f"check() found {out.leaks} leaked clusters"))
    if out.leaks:
        out.stats["seeds with leaks"] += 1
    for copy, start, at in ctx.flush_copies:
        _verify_flush_copy(ctx, out, copy, start, at, env)
    if final and _wants_qemu(ctx, out):
        out.qemu_checked = True
        _qemu_checks(ctx, out, env, final)


SIM_BITMAP = "sim"
# Scenarios (tests/test_ops_races.py) whose operations QEMU refuses while bitmaps exist
# (snapshot apply: "Device has active dirty bitmaps") or that change what a bitmap
# covers (resize, as QEMU: a shrink drops the bits past the new end, a grow adds
# clean ones, so bytes a shrink cut and a grow brought back as zeros are not dirty).
NO_BITMAP_SCENARIOS = frozenset({"snapshots_mid_io", "resize_mid_io"})


def _add_sim_bitmap(img: qcow2aio.Image, seed: int) -> None:
    """Every v3 image of the harness maintains a persistent dirty bitmap (issue 15),
    at a seeded granularity, so the oracle can ask it what was written."""
    from qcow2aio.bitmaps import BitmapError

    gran = random.Random(f"bitmap:{seed}").choice([512, 4096, 65536])
    with contextlib.suppress(BitmapError):  # v2: no persistent bitmaps
        img.add_bitmap_sync(SIM_BITMAP, granularity=gran)


def _verify_bitmap(ctx: Ctx, out: Outcome, img: qcow2aio.Image, final: bytes) -> None:
    """Every range written is dirty: each write, write-zeroes and discard that
    completed, and every byte that differs from the initial disk (a cancelled or
    failed write that landed). A bitmap left IN_USE (a close that could not store)
    is allowed: readers will not trust it."""
    from qcow2aio.bitmaps import BitmapInconsistentError, BitmapNotFoundError

    try:
        dirty = img.dirty_extents(SIM_BITMAP)
    except BitmapNotFoundError:
        return
    except BitmapInconsistentError:
        out.stats["bitmap left in use"] += 1
        return
    starts = [s for s, _ in dirty]

    def covered(lo: int, hi: int) -> bool:
        i = bisect.bisect_right(starts, lo) - 1
        return i >= 0 and dirty[i][0] <= lo and hi <= dirty[i][0] + dirty[i][1]

    for op in ctx.hist.writes():
        if op.status == "ok" and op.length and not covered(op.off, op.off + op.length):
            out.failures.append(Failure("bitmap", f"{op.label()} not dirty in {dirty}"))
            return
    initial = ctx.hist.initial
    n = min(len(initial), len(final))
    for lo in range(0, n, 65536):
        hi = min(n, lo + 65536)
        if initial[lo:hi] == final[lo:hi]:
            continue
        for sec in range(lo, hi, 512):
            if initial[sec : sec + 512] != final[sec : sec + 512] and not covered(sec, sec + 1):
                out.failures.append(Failure("bitmap", f"sector at {sec} changed, not dirty"))
                return


def _wants_qemu(ctx: Ctx, out: Outcome) -> bool:
    """Sampled seeds, and failing ones (except with the unserialized driver, where
    failing is the expected outcome and QEMU would only add run time)."""
    return qemu_sampled(ctx.seed) or (not out.ok and ctx.driver not in CONTROL_DRIVERS)


def _verify_flush_copy(
    ctx: Ctx, out: Outcome, copy: Path, start: int, at: int, env: SimEnv
) -> None:
    """A copy of the file taken right after a flush returned: consistent (leaks at most),
    and every write acknowledged before that flush started is in it."""
    try:
        with qcow2aio.open(copy, "r", **crypt_open(ctx.crypt)) as img:
            rep = img.check()
            data = img.read_sync(0, img.size)
    except Exception as exc:
        out.failures.append(Failure("flushcopy", f"{copy.name}: {type(exc).__name__}: {exc}"))
        return
    if rep.get("corruptions", 0) or rep.get("check-errors", 0):
        out.failures.append(Failure("flushcopy", f"{copy.name} (flush t={start}): {rep}"))
    bad = ctx.hist.check(data, 0, start=start, end=at)
    if bad is not None:
        out.failures.append(Failure("flushcopy", f"{copy.name} (flush t={start}):\n{bad}"))
    if env.qemu is not None and _wants_qemu(ctx, out):
        opts, name = qemu_image(copy, ctx.crypt)
        proc = env.qemu.img("check", "--output=json", *opts, name, check=False)
        if proc.returncode not in (0, 3):
            out.failures.append(
                Failure(
                    "qemu", f"qemu-img check {copy.name}: exit {proc.returncode}\n{proc.stdout}"
                )
            )


def _qemu_checks(ctx: Ctx, out: Outcome, env: SimEnv, final: bytes) -> None:
    if env.qemu is None:
        return
    opts, name = qemu_image(ctx.path, ctx.crypt)
    proc = env.qemu.img("check", "--output=json", *opts, name, check=False)
    if proc.returncode != 0:
        out.failures.append(
            Failure("qemu", f"qemu-img check: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        )
    raw = ctx.path.with_name("oracle.raw")
    raw.write_bytes(final)
    try:
        cmp = subprocess.run(
            qemu_compare_argv(env.qemu.qemu_img, ctx.path, raw, ctx.crypt),
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
    finally:
        raw.unlink(missing_ok=True)
    if cmp.returncode != 0:
        out.failures.append(
            Failure("qemu", f"qemu-img compare with the oracle: exit {cmp.returncode} {cmp.stderr}")
        )


def iter_chunks(total: int, parts: int, rng: random.Random) -> Iterator[tuple[int, int]]:
    """``parts`` disjoint, non-empty, sorted sub-ranges ``(a, b)`` of ``[0, total)``."""
    cuts = sorted(rng.sample(range(total + 1), 2 * parts))
    for i in range(parts):
        yield cuts[2 * i], cuts[2 * i + 1]
