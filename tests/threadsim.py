"""Seeded thread-and-loop stress for one qcow2aio Image (issue 10): harness.

tests/sim.py explores schedules of ONE event loop deterministically. This harness
runs real OS threads instead: sync callers with no event loop, several threads each
running its own event loop, ``asyncio.to_thread`` hops, and closes from another
thread, all on one image at once. The schedule is the kernel's and the GIL's, so a
seed fixes the *workload* (image kind, every request, every jitter sleep, the
switch interval), not the interleaving; running many seeds is what explores.

To make threads interleave inside the driver's metadata code, every seed runs with
``sys.setswitchinterval`` forced to 10-100 us (restored afterwards), callers sleep a
seeded tiny amount (``time.sleep(0)``, up to 200 us, or nothing) between requests,
and the image's files are, a third of the seeds each, the plain backend, a
:class:`SysJitterBackend` (every system call releases the GIL before and after it;
the engine's fast paths are kept), or a :class:`ThreadJitterBackend` (the public
methods jitter too, async ones with loop turns; the fast paths are off).

The oracle is :class:`sim.History` with a lock (:class:`ThreadHistory`): a request's
invocation and response times are ticks of one global counter taken just before the
call and just after it returns, so the logical order agrees with real time, and the
old-or-new rule of tests/sim.py applies unchanged (sequential consistency: an
observed byte may come from any write covering it that no acknowledged write
invoked after it completed, and completed before the observation began,
supersedes).

Per seed (:func:`run_seed`): every thread is joined against one deadline (a thread
that does not finish is a ``hang`` failure, with its stack), every event-loop body
runs under ``asyncio.wait_for`` with the same deadline, and a loop run in the test's
own (main) thread is guarded by a watchdog that interrupts it with a signal. Then the
image is closed, reopened read-only, and checked: every read answered during the run
and the final contents against the oracle, our ``check()`` (no corruption; no leak
unless the scenario may leak), ``qemu-img check``, and ``qemu-img convert -O raw``
compared with our final read and with the oracle.

The contract under test (issue 10): sync calls in a thread with no running loop WAIT
(for the lock, an overlapping allocation, a drain; ``WaitTimeoutError`` after the
image's ``wait_timeout``): an ``ImageBusyError`` there is a failure. Sync calls in a
thread that runs a loop never wait: ``ImageBusyError`` there is retried (with the
loop turning meanwhile). Coroutines work from any loop; ``close()``/``aclose()`` from
any thread drain every thread's requests.

Every scenario also runs on LUKS and legacy-AES encrypted images (``SimEnv.crypt``,
set by the test): the same variants, made by ``qcow2aio.create``, opened and checked
with the passphrase (QEMU's tools with the secret). A third of the requests are then
sub-sector writes (sector read-modify-writes) racing whole-sector ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import random
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sim import (
    NEVER,
    History,
    Op,
    SimEnv,
    crypt_create,
    crypt_open,
    memoized_unlock,
    qemu_image,
    replay_seed,
    tasks_waiting,
)

import qcow2aio
from qcow2aio import testing
from qcow2aio.io import BackendFactory, Buffer, FileBackend

T = TypeVar("T")

DRIVERS = ("serialized", "unserialized")
SIZE = 2 << 20
# Image kinds, picked by the seed: (cluster size, backing file, extra create options).
VARIANTS: dict[str, tuple[int, bool, str]] = {
    "64k": (65536, False, ""),
    "64k-backing": (65536, True, ""),
    "16k-sub512": (16384, False, "extended_l2=on"),  # 512-byte subclusters
    "16k-sub512-backing": (16384, True, "extended_l2=on"),
}
# A sync call in a loop thread must never wait: one that takes this long did.
IN_LOOP_WAIT_LIMIT = 2.0
MAX_FAILURES = 20  # kept per seed (the rest are counted)
SWITCH_INTERVALS = (1e-5, 2e-5, 5e-5, 1e-4)


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def deadline_seconds() -> float:
    """Wall-clock bound of one seed (``QCOW2AIO_THREAD_DEADLINE``, default 30 s)."""
    return env_float("QCOW2AIO_THREAD_DEADLINE", 30.0)


def qemu_every() -> int:
    """``qemu-img check``/``convert`` on every Nth seed (``QCOW2AIO_THREAD_QEMU_EVERY``):
    every seed by default, every 10th under ``QCOW2AIO_STRESS=1``; failing seeds always."""
    value = os.environ.get("QCOW2AIO_THREAD_QEMU_EVERY", "").strip()
    if value:
        return max(1, int(value))
    return 10 if os.environ.get("QCOW2AIO_STRESS", "").strip() not in ("", "0") else 1


# ------------------------------------------------------------------ oracle
class ThreadHistory(History):
    """:class:`sim.History` whose clock and request list are safe to use from threads."""

    def __init__(self, initial: bytes) -> None:
        super().__init__(initial)
        self._mutex = threading.Lock()

    def tick(self) -> int:
        with self._mutex:
            self.clock += 1
            return self.clock

    def begin(self, op: Op) -> Op:
        with self._mutex:
            self.clock += 1
            op.start = self.clock
            self.ops.append(op)
        return op

    def withdraw(self, op: Op) -> None:
        """A refused (busy) request: it never happened."""
        with self._mutex:
            self.ops.remove(op)


# ----------------------------------------------------------------- backend
class SysJitterBackend(FileBackend):
    """A real file whose every system call (the engine's ``_sys_*`` hooks, reached from
    sync calls, inline async calls and I/O threads alike) lets other threads run just
    before and just after it. No public method is overridden, so the image keeps every
    fast path of the plain backend."""

    def __init__(self, path: str, writable: bool = False, *, rng: random.Random) -> None:
        super().__init__(path, writable)
        self.rng = rng

    def _jitter(self) -> None:
        r = self.rng.random()
        if r < 0.5:
            time.sleep(0)
        elif r < 0.6:
            time.sleep(self.rng.random() * 50e-6)

    def _sys_pread(self, length: int, offset: int, event: str) -> bytes:
        self._jitter()
        data = super()._sys_pread(length, offset, event)
        self._jitter()
        return data

    def _sys_preadv(self, buffers: list[Any], offset: int, event: str, flags: int = 0) -> int:
        self._jitter()
        n = super()._sys_preadv(buffers, offset, event, flags)
        self._jitter()
        return n

    def _sys_pwritev(self, buffers: list[memoryview], offset: int, event: str) -> int:
        self._jitter()
        n = super()._sys_pwritev(buffers, offset, event)
        self._jitter()
        return n

    def _sys_fdatasync(self, event: str) -> None:
        self._jitter()
        super()._sys_fdatasync(event)
        self._jitter()


class ThreadJitterBackend(SysJitterBackend):
    """:class:`SysJitterBackend` that also jitters at its public methods, async ones
    with loop turns (other tasks of the loop run mid-request). Overriding them turns
    the image's fast paths off: only some seeds use it."""

    async def _ajitter(self) -> None:
        r = self.rng.random()
        if r < 0.3:
            await asyncio.sleep(0)
        elif r < 0.4:
            time.sleep(0)

    def pread(self, offset: int, length: int, event: str = "read") -> bytes:
        self._jitter()
        data = super().pread(offset, length, event)
        self._jitter()
        return data

    def readinto(self, buf: memoryview, offset: int, event: str = "read") -> None:
        self._jitter()
        super().readinto(buf, offset, event)
        self._jitter()

    def pwritev(self, buffers: Sequence[Buffer], offset: int, event: str = "write") -> None:
        self._jitter()
        super().pwritev(buffers, offset, event)
        self._jitter()

    def flush(self, event: str = "flush") -> None:
        self._jitter()
        super().flush(event)
        self._jitter()

    async def apread(self, offset: int, length: int, event: str = "read") -> bytes:
        await self._ajitter()
        data = await super().apread(offset, length, event)
        await self._ajitter()
        return data

    async def areadinto(self, buf: memoryview, offset: int, event: str = "read") -> None:
        await self._ajitter()
        await super().areadinto(buf, offset, event)
        await self._ajitter()

    async def apwritev(self, buffers: Sequence[Buffer], offset: int, event: str = "write") -> None:
        await self._ajitter()
        await super().apwritev(buffers, offset, event)
        await self._ajitter()

    async def aflush(self, event: str = "flush") -> None:
        await self._ajitter()
        await super().aflush(event)
        await self._ajitter()


def thread_jitter_factory(seed: int, cls: type[SysJitterBackend]) -> BackendFactory:
    count = Counter[str]()
    mutex = threading.Lock()

    def factory(path: str, writable: bool) -> FileBackend:
        name = os.path.basename(path)
        with mutex:
            n = count[name]
            count[name] += 1
        return cls(path, writable, rng=random.Random(f"tj:{seed}:{name}:{n}"))

    return factory


# ------------------------------------------------------------------ images
@dataclass
class ThreadSetup:
    path: Path
    initial: bytes
    variant: str
    cs: int
    crypt: str = "plain"


def make_image(env: SimEnv, scenario: str, seed: int, variants: Sequence[str]) -> ThreadSetup:
    """A fresh copy (own file name: a hung thread of an earlier seed may still hold its
    file open) of the template image of the seed's variant."""
    variant = variants[random.Random(f"variant:{seed}").randrange(len(variants))]
    cs, backing, opts = VARIANTS[variant]

    def build(path: Path) -> bytes:
        o = f"cluster_size={cs}" + (f",{opts}" if opts else "")
        args = ["create", "-q", "-f", "qcow2", "-o", o]
        initial = bytes(SIZE)
        name = f"tbase-{SIZE}.raw"
        if backing:
            initial = env.backing(name, SIZE)
            args += ["-b", name, "-F", "raw"]
        if env.crypt == "plain":
            env.qemu.img(*args, str(path), str(SIZE))
        else:
            qcow2aio.create(
                path,
                SIZE,
                cluster_size=cs,
                extended_l2="extended_l2=on" in opts,
                backing_file=name if backing else None,
                backing_fmt="raw" if backing else None,
                **crypt_create(env.crypt),
            )
        return initial

    tpl, initial = env.template(f"thread-{variant}-{env.crypt}", build)
    path = env.dir / f"t-{scenario}-{seed}.qcow2"
    shutil.copyfile(tpl, path)
    return ThreadSetup(path, initial, variant, cs, env.crypt)


def open_kwargs() -> dict[str, Any]:
    """``wait_timeout`` below the seed deadline when the driver takes it (issue 10)."""
    params = inspect.signature(qcow2aio.open).parameters
    if "wait_timeout" in params:
        return {"wait_timeout": max(1.0, deadline_seconds() * 2 / 3)}
    return {}


# ----------------------------------------------------------------- harness
class SeedHang(Exception):
    """The watchdog interrupted the test thread: a seed did not finish in time."""


@dataclass
class Failure:
    kind: str  # hang | exception | error | busy | read | final | check | qemu
    detail: str


@dataclass
class Outcome:
    scenario: str
    driver: str
    seed: int
    variant: str = ""
    failures: list[Failure] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)
    qemu_checked: bool = False
    hung: bool = False  # a thread never finished: the file is not judged
    loop_timeouts: int = 0  # loop bodies cancelled at the deadline

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        if self.ok:
            return f"{self.scenario}/{self.driver} seed {self.seed}: ok"
        first = self.failures[0]
        return (
            f"{self.scenario}/{self.driver} seed {self.seed} ({self.variant}): "
            f"{len(self.failures)} failure(s), first [{first.kind}] {first.detail}"
        )


def in_loop_thread() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Run:
    """One seed in progress: the image, the oracle, the clock, request helpers usable
    from any thread (sync ones) or any loop (async ones)."""

    def __init__(
        self,
        *,
        scenario: str,
        driver: str,
        seed: int,
        img: qcow2aio.Image,
        setup: ThreadSetup,
        out: Outcome,
    ) -> None:
        self.scenario = scenario
        self.driver = driver
        self.seed = seed
        self.img = img
        self.setup = setup
        self.cs = setup.cs
        self.size = img.size
        self.hist = ThreadHistory(setup.initial)
        self.hist.sector_tear = setup.crypt != "plain"
        self.out = out
        self.deadline = time.monotonic() + deadline_seconds()
        self.threads: list[threading.Thread] = []
        self._mutex = threading.Lock()
        # Qcow2Error messages a request may legitimately end with (close scenarios).
        self.allowed_errors: tuple[str, ...] = ()
        self.closed = threading.Event()  # set once a close call returned
        # Workers start together (spawned threads wait for it; run_loop and the end of
        # the scenario body set it), so their requests overlap from the first one.
        self.go = threading.Event()
        self.may_leak = False
        self.notes: dict[str, Any] = {}

    # ------------------------------------------------------------ plumbing
    def rng(self, role: str) -> random.Random:
        return random.Random(f"{self.scenario}:{self.seed}:{role}")

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def fail(self, kind: str, detail: str) -> None:
        with self._mutex:
            if len(self.out.failures) < MAX_FAILURES:
                self.out.failures.append(Failure(kind, detail[:4000]))
            else:
                self.out.stats["failures not kept"] += 1

    def count(self, key: str, n: int = 1) -> None:
        with self._mutex:
            self.out.stats[key] += n

    def spawn(self, name: str, target: Callable[[], None]) -> threading.Thread:
        def body() -> None:
            try:
                if not self.go.wait(self.remaining()):
                    self.fail("hang", f"thread {name}: never released to start")
                    return
                target()
            except BaseException as exc:
                self._crash(name, exc)

        t = threading.Thread(target=body, name=f"{self.scenario}-{self.seed}-{name}", daemon=True)
        self.threads.append(t)
        t.start()
        return t

    def spawn_loop(self, name: str, main: Callable[[], Awaitable[None]]) -> threading.Thread:
        """A thread running its own event loop until ``main()`` finishes."""
        return self.spawn(name, lambda: self.run_loop(name, main))

    def run_loop(self, name: str, main: Callable[[], Awaitable[None]]) -> None:
        """Run ``main()`` on a new event loop in this thread, bounded by the deadline."""
        loop = asyncio.new_event_loop()
        self.go.set()
        try:

            async def bounded() -> None:
                try:
                    await asyncio.wait_for(main(), self.remaining())
                except TimeoutError:
                    self.out.loop_timeouts += 1
                    self.fail(
                        "hang",
                        f"loop {name}: did not finish before the deadline; its tasks were "
                        f"suspended at:\n{waiting}",
                    )

            waiting = ""

            def snapshot() -> None:
                nonlocal waiting
                waiting = tasks_waiting(loop, 20)

            # Take the picture of the stuck tasks just before wait_for cancels them.
            loop.call_later(max(0.0, self.remaining() - 0.05), snapshot)
            loop.run_until_complete(bounded())
            # Whatever the driver left running (shielded write steps): let it finish.
            left = [t for t in asyncio.all_tasks(loop) if not t.done()]
            if left:
                _done, pending = loop.run_until_complete(asyncio.wait(left, timeout=2.0))
                if pending:
                    self.fail("hang", f"loop {name}: {len(pending)} task(s) never finished")
                    for t in pending:
                        t.cancel()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            # Not shutdown_default_executor(): a to_thread job stuck in the driver would
            # block it; stuck executor threads are reported by join_all().
            executor = getattr(loop, "_default_executor", None)
            if executor is not None:
                executor.shutdown(wait=False)
                self.threads.extend(getattr(executor, "_threads", ()))
            loop.close()

    def _crash(self, where: str, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-8))
        self.fail("exception", f"{where}: {type(exc).__name__}: {exc}\n{tb}")

    def join_all(self) -> None:
        """Join every thread against the deadline; one still alive is a hang."""
        i = 0
        while i < len(self.threads):  # run_loop may add executor threads meanwhile
            self.threads[i].join(self.remaining() + 0.5)
            i += 1
        stuck = [t for t in self.threads if t.is_alive()]
        if stuck:
            self.out.hung = True
            frames = sys._current_frames()
            lines = []
            for t in stuck:
                frame = frames.get(t.ident or -1)
                stack = "".join(traceback.format_stack(frame, limit=-10)) if frame else "?"
                lines.append(f"thread {t.name} still running:\n{stack}")
            self.fail("hang", f"{len(stuck)} thread(s) did not finish\n" + "\n".join(lines))

    # --------------------------------------------------------- workload
    def pick_range(self, rng: random.Random, *, hot: int) -> tuple[int, int]:
        """An overlapping-prone range: mostly inside a 3-cluster hot window starting at
        cluster ``hot``, sometimes anywhere; lengths from a byte to two clusters."""
        cs = self.cs
        if rng.random() < 0.85:
            lo = max(0, hot * cs - cs // 2)
            off = rng.randrange(lo, min(self.size - 1, (hot + 3) * cs))
        else:
            off = rng.randrange(self.size - 1)
        r = rng.random()
        if r < 0.15:
            n = rng.randint(1, 600)
        elif r < 0.45:
            n = 512 * rng.randint(1, 8)
            off -= off % 512
        elif r < 0.85:
            n = rng.randint(1, cs)
        else:
            n = rng.randint(cs, 2 * cs)
        return off, max(1, min(n, self.size - off))

    def cluster_range(self, rng: random.Random, *, hot: int) -> tuple[int, int]:
        """Whole clusters around the hot window (for discard)."""
        cs = self.cs
        first = max(0, hot - 1 + rng.randrange(4))
        first = min(first, self.size // cs - 1)
        k = rng.randint(1, 2)
        return first * cs, min(k * cs, self.size - first * cs)

    def sleep_jitter(self, rng: random.Random) -> None:
        r = rng.random()
        if r < 0.4:
            time.sleep(0)
        elif r < 0.55:
            time.sleep(rng.random() * 200e-6)

    async def async_jitter(self, rng: random.Random) -> None:
        r = rng.random()
        if r < 0.4:
            await asyncio.sleep(0)
        elif r < 0.5:
            await asyncio.sleep(rng.random() * 200e-6)
        elif r < 0.6:
            time.sleep(0)  # let other threads run while this loop is busy

    # ------------------------------------------------------- request core
    def _ended(self, op: Op, exc: BaseException, where: str) -> bool:
        """Record a request that raised; False when the exception is a failure."""
        self.hist.failed(op, exc)
        if isinstance(exc, qcow2aio.Qcow2Error) and self.allowed_errors:
            msg = str(exc)
            if any(word in msg for word in self.allowed_errors):
                self.count("requests refused or failed by the close")
                return True
        if isinstance(exc, qcow2aio.ImageBusyError):
            self.fail("busy", f"{where}: {op.label()} raised {type(exc).__name__}: {exc}")
            return False
        if isinstance(exc, qcow2aio.Qcow2Error):
            self.fail("error", f"{where}: {op.label()} raised {type(exc).__name__}: {exc}")
            return False
        self._crash(f"{where}: {op.label()}", exc)
        return False

    def sync_call(self, op: Op, call: Callable[[], T], where: str) -> tuple[bool, T | None]:
        """A sync request from a thread without a running loop: it must wait, never be
        refused as busy."""
        self.hist.begin(op)
        try:
            result = call()
        except Exception as exc:
            self._ended(op, exc, where)
            return False, None
        return True, result

    async def sync_call_in_loop(
        self, op: Op, call: Callable[[], T], where: str
    ) -> tuple[bool, T | None]:
        """A sync request from a loop thread: ImageBusyError is today's rule, retried."""
        while True:
            self.hist.begin(op)
            t0 = time.monotonic()
            try:
                result = call()
                took = time.monotonic() - t0
                if took > IN_LOOP_WAIT_LIMIT:
                    self.fail("waited", f"{where}: {op.label()} took {took:.1f} s in a loop thread")
                return True, result
            except qcow2aio.ImageBusyError as exc:
                if isinstance(exc, _WAIT_TIMEOUT):
                    self._ended(op, exc, where)
                    return False, None
                self.hist.withdraw(op)
                self.count("busy in a loop thread (retried)")
            except Exception as exc:
                self._ended(op, exc, where)
                return False, None
            if self.remaining() <= 0:
                self.fail("hang", f"{where}: {op.label()} busy until the deadline")
                return False, None
            await asyncio.sleep(random.random() * 100e-6)

    async def async_call(
        self, op: Op, call: Callable[[], Awaitable[T]], where: str
    ) -> tuple[bool, T | None]:
        self.hist.begin(op)
        try:
            result = await call()
        except asyncio.CancelledError:
            self.hist.cancelled(op)
            raise
        except Exception as exc:
            self._ended(op, exc, where)
            return False, None
        return True, result

    def finish(self, op: Op, ok: bool, result: bytes | None = None) -> None:
        if ok:
            self.hist.done(op, result)
            self.count(f"ok {op.kind}{'/sync' if op.sync else ''}")

    # ---------------------------------------------------- sync requests
    def sync_request(
        self, rng: random.Random, *, hot: int, where: str, check_p: float = 0.0
    ) -> None:
        """One seeded sync request from a no-loop thread."""
        img = self.img
        r = rng.random()
        if r < check_p:
            op = Op("flush", tag="check")
            op.sync = True
            ok, rep = self.sync_call(op, img.check, where)
            self.finish(op, ok)
            if ok and rep is not None and (rep.get("corruptions") or rep.get("check-errors")):
                self.fail("check", f"{where}: check() during the run found {rep}")
            return
        if r < 0.55:
            off, n = self.pick_range(rng, hot=hot)
            data = rng.randbytes(n)
            op = Op("write", off, n, data, sync=True)
            ok, _ = self.sync_call(op, lambda: img.write_sync(off, data), where)
        elif r < 0.65:
            off, n = self.pick_range(rng, hot=hot)
            data = rng.randbytes(n)
            cut = rng.randint(0, n)
            bufs = [data[:cut], bytearray(data[cut:])]
            op = Op("write", off, n, data, sync=True, tag="v")
            ok, _ = self.sync_call(op, lambda: img.writev_sync(off, bufs), where)
        elif r < 0.8:
            off, n = self.pick_range(rng, hot=hot)
            op = Op("read", off, n, sync=True)
            ok, data_r = self.sync_call(op, lambda: img.read_sync(off, n), where)
            self.finish(op, ok, data_r)
            return
        elif r < 0.88:
            off, n = self.pick_range(rng, hot=hot)
            buf = bytearray(n)
            op = Op("read", off, n, sync=True, tag="into")
            ok, _ = self.sync_call(op, lambda: img.readinto_sync(memoryview(buf), off), where)
            self.finish(op, ok, bytes(buf))
            return
        else:
            op = Op("flush", sync=True)
            ok, _ = self.sync_call(op, img.flush_sync, where)
        self.finish(op, ok)

    def sync_worker(
        self,
        role: str,
        nops: int,
        *,
        hot: int,
        check_p: float = 0.0,
        stop: threading.Event | None = None,
    ) -> Callable[[], None]:
        rng = self.rng(role)

        def work() -> None:
            for _ in range(nops):
                if stop is not None and stop.is_set():
                    return
                self.sync_request(rng, hot=hot, where=role, check_p=check_p)
                self.sleep_jitter(rng)

        return work

    # --------------------------------------------------- async requests
    async def async_request(
        self,
        rng: random.Random,
        *,
        hot: int,
        where: str,
        sync_p: float = 0.08,
        to_thread_p: float = 0.0,
    ) -> None:
        """One seeded request from a task of some loop."""
        img = self.img
        r = rng.random()
        if r < to_thread_p:
            await self.to_thread_request(rng, hot=hot, where=where)
            return
        r = rng.random()
        if r < sync_p:
            # The sync fast path from inside a running loop: never waits.
            off, n = self.pick_range(rng, hot=hot)
            if rng.random() < 0.6:
                data = rng.randbytes(n)
                op = Op("write", off, n, data, sync=True, tag="in-loop")
                ok, _ = await self.sync_call_in_loop(op, lambda: img.write_sync(off, data), where)
                self.finish(op, ok)
            else:
                op = Op("read", off, n, sync=True, tag="in-loop")
                ok, got = await self.sync_call_in_loop(op, lambda: img.read_sync(off, n), where)
                self.finish(op, ok, got)
            return
        r = rng.random()
        if r < 0.5:
            off, n = self.pick_range(rng, hot=hot)
            data = rng.randbytes(n)
            op = Op("write", off, n, data)
            ok, _ = await self.async_call(op, lambda: img.write(off, data), where)
            self.finish(op, ok)
        elif r < 0.68:
            off, n = self.pick_range(rng, hot=hot)
            op = Op("read", off, n)
            ok, got = await self.async_call(op, lambda: img.read(off, n), where)
            self.finish(op, ok, got)
        elif r < 0.74:
            off, n = self.pick_range(rng, hot=hot)
            buf = bytearray(n)
            op = Op("read", off, n, tag="into")
            ok, _ = await self.async_call(op, lambda: img.readinto(memoryview(buf), off), where)
            self.finish(op, ok, bytes(buf))
        elif r < 0.83:
            off, n = self.pick_range(rng, hot=hot)
            unmap = rng.random() < 0.5
            op = Op("zero", off, n, tag="unmap" if unmap else "keep")
            ok, _ = await self.async_call(op, lambda: img.write_zeroes(off, n, unmap=unmap), where)
            self.finish(op, ok)
        elif r < 0.91:
            off, n = self.cluster_range(rng, hot=hot)
            op = Op("discard", off, n)
            ok, _ = await self.async_call(op, lambda: img.discard(off, n), where)
            self.finish(op, ok)
        else:
            op = Op("flush")
            ok, _ = await self.async_call(op, img.flush, where)
            self.finish(op, ok)

    async def to_thread_request(self, rng: random.Random, *, hot: int, where: str) -> None:
        """``asyncio.to_thread(img.read_sync | img.write_sync, ...)``: a sync call in an
        executor thread (no loop there), awaited by this loop."""
        img = self.img
        off, n = self.pick_range(rng, hot=hot)
        if rng.random() < 0.5:
            op = Op("read", off, n, sync=True, tag="to_thread")
            ok, got = await self.async_call(
                op, lambda: asyncio.to_thread(img.read_sync, off, n), where
            )
            self.finish(op, ok, got)
        else:
            data = rng.randbytes(n)
            op = Op("write", off, n, data, sync=True, tag="to_thread")
            ok, _ = await self.async_call(
                op, lambda: asyncio.to_thread(img.write_sync, off, data), where
            )
            self.finish(op, ok)

    def async_tasks(
        self,
        role: str,
        ntasks: int,
        nops: int,
        *,
        hot: int,
        sync_p: float = 0.08,
        to_thread_p: float = 0.0,
        stop: threading.Event | None = None,
    ) -> Callable[[], Awaitable[None]]:
        """A loop body: ``ntasks`` concurrent tasks of ``nops`` seeded requests each."""

        async def task(i: int) -> None:
            rng = self.rng(f"{role}:{i}")
            for _ in range(nops):
                if stop is not None and stop.is_set():
                    return
                await self.async_request(
                    rng, hot=hot, where=f"{role}/task{i}", sync_p=sync_p, to_thread_p=to_thread_p
                )
                await self.async_jitter(rng)

        async def main() -> None:
            await asyncio.gather(*(task(i) for i in range(ntasks)))

        return main


_WAIT_TIMEOUT: type[BaseException] = getattr(
    qcow2aio, "WaitTimeoutError", type("_Never", (Exception,), {})
)


# ---------------------------------------------------------- main-thread guard
@contextlib.contextmanager
def main_thread_watchdog(seconds: float, what: str) -> Iterator[None]:
    """If the calling (main) thread is still inside the block after ``seconds``, raise
    :class:`SeedHang` in it via a signal (lock waits and ``select`` are interruptible).
    Outside the main thread it does nothing (pytest-timeout is the backstop there)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "pthread_kill"
    ):
        yield
        return
    fired: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        raise SeedHang(f"{what}: the test thread did not finish in {seconds:.0f} s")

    def fire() -> None:
        fired.append("x")
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

    old = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, old)


@contextlib.contextmanager
def switch_interval(seconds: float) -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


# ------------------------------------------------------------- scenarios
@dataclass
class ThreadScenario:
    name: str
    body: Callable[[Run], None]  # starts threads (run.spawn...); may run a loop itself
    variants: Sequence[str] = tuple(VARIANTS)
    default_seeds: int = 6
    min_catch: float = 0.2  # the unserialized control must fail in at least this share
    verify: Callable[[Run, Outcome], None] | None = None  # extra checks after the run
    note: str = ""


def _open(setup: ThreadSetup, driver: str, seed: int) -> qcow2aio.Image:
    # A third of the seeds each: the plain backend, jitter at every system call (fast
    # paths kept), jitter at the public methods too (fast paths off, loop turns).
    kind = random.Random(f"backend:{seed}").randrange(3)
    factory = (
        None
        if kind == 0
        else thread_jitter_factory(seed, SysJitterBackend if kind == 1 else ThreadJitterBackend)
    )
    kwargs = {**open_kwargs(), **crypt_open(setup.crypt)}
    if driver == "unserialized":
        with testing.unserialized():
            return qcow2aio.open(setup.path, "r+", io_backend=factory, **kwargs)
    return qcow2aio.open(setup.path, "r+", io_backend=factory, **kwargs)


def run_seed(scn: ThreadScenario, driver: str, seed: int, env: SimEnv) -> Outcome:
    """One seed: image, threads, deadline, then every check."""
    setup = make_image(env, scn.name, seed, scn.variants)
    out = Outcome(scn.name, driver, seed, setup.variant)
    interval = SWITCH_INTERVALS[random.Random(f"switch:{seed}").randrange(len(SWITCH_INTERVALS))]
    with memoized_unlock():
        img = _open(setup, driver, seed)
    run = Run(scenario=scn.name, driver=driver, seed=seed, img=img, setup=setup, out=out)
    try:
        with (
            switch_interval(interval),
            main_thread_watchdog(
                deadline_seconds() + env_float("QCOW2AIO_THREAD_GRACE", 10.0),
                f"{scn.name}/{driver} seed {seed}",
            ),
        ):
            try:
                scn.body(run)
            except SeedHang as exc:
                out.hung = True
                run.fail("hang", str(exc))
            except Exception as exc:
                run._crash("scenario body (test thread)", exc)
            finally:
                run.go.set()
            run.join_all()
            if not out.hung:
                try:
                    img.close()
                except Exception as exc:
                    run._crash("close() after the run", exc)
    except SeedHang as exc:  # fired during join_all / close
        out.hung = True
        run.fail("hang", str(exc))
    if out.hung:
        return out  # threads may still use the file: no verdict on its contents
    with memoized_unlock():
        verify(run, env)
    if scn.verify is not None:
        scn.verify(run, out)
    if replay_seed() is not None:
        print(f"--- {scn.name}/{driver} seed {seed} ({setup.variant}, switch {interval}):")
        for op in sorted(run.hist.ops, key=lambda o: o.start):
            print(f"    {op.label()} {op.error}")
    with contextlib.suppress(OSError):
        setup.path.unlink()
    return out


def verify(run: Run, env: SimEnv) -> None:
    out, hist = run.out, run.hist
    for op in hist.ops:
        if op.status == "pending" and op.end == NEVER:
            # Every thread was joined: each request returned or raised.
            out.failures.append(Failure("final", f"request never answered: {op.label()}"))
        if op.kind == "read" and op.status == "ok" and op.result is not None:
            bad = hist.check(op.result, op.off, start=op.start, end=op.end)
            if bad is not None:
                out.failures.append(Failure("read", f"{op.label()} saw\n{bad}"))
    final = b""
    try:
        with qcow2aio.open(run.setup.path, "r", **crypt_open(run.setup.crypt)) as img:
            # An image an operation grew: its new range is the scenario's to judge.
            final = img.read_sync(0, min(img.size, len(hist.initial)))
            report = img.check()
    except Exception as exc:
        out.failures.append(Failure("final", f"reopen/read/check: {type(exc).__name__}: {exc}"))
        return
    bad = hist.check(final, 0)
    if bad is not None:
        out.failures.append(Failure("final", bad))
    leaks = int(report.get("leaks", 0))
    if report.get("corruptions", 0) or report.get("check-errors", 0):
        out.failures.append(Failure("check", f"check() found {report}"))
    elif leaks and not run.may_leak:
        out.failures.append(Failure("check", f"check() found {leaks} leaked clusters"))
    if leaks:
        out.stats["seeds with leaks"] += 1
    if env.qemu is None:
        return
    wants = run.seed % qemu_every() == 0 or replay_seed() is not None
    if not wants and (out.ok or run.driver == "unserialized"):
        return
    out.qemu_checked = True
    opts, name = qemu_image(run.setup.path, run.setup.crypt)
    proc = env.qemu.img("check", "--output=json", *opts, name, check=False)
    allowed = (0, 3) if run.may_leak else (0,)
    if proc.returncode not in allowed:
        out.failures.append(
            Failure("qemu", f"qemu-img check: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        )
        return
    try:
        if opts:
            raw = env.qemu.convert_raw(name, extra_args=opts)
        else:
            raw = env.qemu.convert_raw(run.setup.path, fmt="qcow2")
    except AssertionError as exc:
        out.failures.append(Failure("qemu", f"qemu-img convert failed: {exc}"))
        return
    raw = raw[: len(final)]
    if raw != final:
        at = next(i for i in range(min(len(raw), len(final))) if raw[i] != final[i])
        out.failures.append(Failure("qemu", f"qemu-img convert differs from our read at {at}"))
    bad = hist.check(raw, 0)
    if bad is not None:
        out.failures.append(Failure("qemu", f"qemu-img convert against the oracle: {bad}"))
