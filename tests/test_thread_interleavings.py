"""One Image, many threads and event loops at once (issue 10): seeded thread scenarios.

The harness is tests/threadsim.py (real threads, forced small switch interval, seeded
jitter, the thread-safe old-or-new oracle, deadline and watchdog, our check and
QEMU's). Scenarios:

1. ``sync_threads``: 2-4 threads with no event loop, each a seeded mix of
   ``write_sync``/``writev_sync``/``read_sync``/``readinto_sync``/``flush_sync`` and
   now and then ``check()`` (which must find no corruption mid-run).
2. ``sync_beside_loop``: 2-3 such threads while the test's own thread runs an event
   loop whose tasks await ``write``/``read``/``readinto``/``write_zeroes``/
   ``discard``/``flush`` (and call the sync path from inside the loop: busy allowed).
3. ``loops_in_threads``: 2-3 threads, each running its own event loop with several
   tasks awaiting requests on the one image.
4. ``to_thread``: the test thread's loop awaits async requests and
   ``asyncio.to_thread(img.read_sync | img.write_sync, ...)``.
5. ``close_from_thread``: sync threads and a loop thread busy on the image while
   another thread closes it, with ``close()`` (no loop there) or with ``aclose()`` on
   its own loop: requests complete, or fail with a ``Qcow2Error`` saying closing or
   closed; nothing is acknowledged after the close returned; no corruption, no leak.
6. ``ops_from_threads``: sync threads and a loop thread busy on the image while an
   operator thread's loop creates and deletes snapshots, amends the refcount width
   and lazy refcounts and grows the image, awaited or as the sync twins in
   ``asyncio.to_thread``; each snapshot holds a state the history allows during its
   call, the header holds the amended options.

Drivers: ``serialized`` (the normal image; must pass every seed) and
``unserialized`` (``qcow2aio.testing.unserialized()``: no lock, no in-flight list;
must be caught in at least ``min_catch`` of the seeds when 20 or more run, and in
at least one seed otherwise).

Image kinds (``crypt``): plain, LUKS and legacy AES, as in tests/test_interleavings.py
(``sim.ENCRYPTED_SEEDS`` seeds per encrypted scenario and driver in a quick run).

Environment, as tests/test_interleavings.py: ``QCOW2AIO_STRESS=1`` runs 10,000 seeds
per scenario and driver, ``QCOW2AIO_SEEDS=N``/``QCOW2AIO_SEED_START=S`` choose the
range, ``QCOW2AIO_SEED=N`` replays one seed's workload (threads make the schedule
differ from run to run, so a replay may need a few tries). Also
``QCOW2AIO_THREAD_DEADLINE`` (seconds per seed, default 30) and
``QCOW2AIO_THREAD_QEMU_EVERY`` (QEMU checks on every Nth seed: default every seed,
every 10th under stress; failing seeds of the serialized driver always).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from sim import CRYPTS, ENCRYPTED_SEEDS, Op, SimEnv, publish_seeds, replay_seed, seed_list
from threadsim import (
    DRIVERS,
    Failure,
    Outcome,
    Run,
    ThreadHistory,
    ThreadScenario,
    run_seed,
)

pytest_plugins = ["sim_report"]

# After this many hung seeds a test stops: each leaves stuck daemon threads behind.
MAX_HANGS = 3


def _hot(run: Run) -> int:
    """The seed's hot window (first of three clusters) every worker aims at."""
    return run.rng("hot").randrange(run.size // run.cs - 3)


# -------------------------------------------------------------- scenarios
def sync_threads(run: Run) -> None:
    rng = run.rng("shape")
    hot = _hot(run)
    for i in range(rng.randint(2, 4)):
        run.spawn(f"sync{i}", run.sync_worker(f"sync{i}", 25, hot=hot, check_p=0.03))


def sync_beside_loop(run: Run) -> None:
    rng = run.rng("shape")
    hot = _hot(run)
    for i in range(rng.randint(2, 3)):
        run.spawn(f"sync{i}", run.sync_worker(f"sync{i}", 20, hot=hot, check_p=0.02))
    # The loop in the test's own thread (the main thread of the pytest process).
    run.run_loop("main", run.async_tasks("main", rng.randint(3, 4), 12, hot=hot, sync_p=0.1))


def loops_in_threads(run: Run) -> None:
    rng = run.rng("shape")
    hot = _hot(run)
    for i in range(rng.randint(2, 3)):
        run.spawn_loop(f"loop{i}", run.async_tasks(f"loop{i}", 3, 12, hot=hot, sync_p=0.08))


def to_thread(run: Run) -> None:
    rng = run.rng("shape")
    hot = _hot(run)
    run.run_loop(
        "main",
        run.async_tasks("main", rng.randint(3, 5), 12, hot=hot, sync_p=0.0, to_thread_p=0.4),
    )


def close_from_thread(run: Run) -> None:
    rng = run.rng("shape")
    hot = _hot(run)
    run.allowed_errors = ("closing", "closed")
    for i in range(rng.randint(1, 2)):
        run.spawn(f"sync{i}", run.sync_worker(f"sync{i}", 20, hot=hot))
    run.spawn_loop("loop", run.async_tasks("loop", 3, 12, hot=hot, sync_p=0.05))
    how = "close" if rng.random() < 0.5 else "aclose"
    delay = rng.random() * 0.004
    img = run.img

    def closed_op() -> Op:
        time.sleep(delay)
        return run.hist.begin(Op("close", tag=how))

    def after(op: Op) -> None:
        run.hist.done(op)
        run.notes["close_end"] = op.end
        run.closed.set()

    if how == "close":

        def closer() -> None:
            op = closed_op()
            try:
                img.close()
            except Exception as exc:
                run._ended(op, exc, "closer")
                return
            after(op)

        run.spawn("closer", closer)
    else:

        async def acloser() -> None:
            op = closed_op()
            try:
                await img.aclose()
            except Exception as exc:
                run._ended(op, exc, "acloser")
                return
            after(op)

        run.spawn_loop("acloser", acloser)


def _after_close(run: Run, out: Outcome) -> None:
    end = run.notes.get("close_end")
    if end is None:
        return
    for op in run.hist.ops:
        if op.kind != "close" and op.status == "ok" and op.start > end:
            out.failures.append(
                Failure("after-close", f"{op.label()} succeeded after close returned")
            )


def ops_from_threads(run: Run) -> None:
    """Image operations from threads while sync threads and a loop thread do I/O: an
    operator thread with its own loop creates and deletes snapshots, amends (refcount
    width, lazy refcounts) and grows the image, each call either awaited on its loop
    or run through ``asyncio.to_thread`` as the sync twin (``*_sync``, no loop there).
    The workers stay below the original size; a snapshot's content must be a state
    the history allows during its call (checked by ``_snapshots_hold``)."""
    rng = run.rng("shape")
    hot = _hot(run)
    img = run.img
    for i in range(rng.randint(1, 2)):
        run.spawn(f"sync{i}", run.sync_worker(f"sync{i}", 16, hot=hot))
    run.spawn_loop("loop", run.async_tasks("loop", 3, 10, hot=hot, sync_p=0.05))
    orng = run.rng("operator")
    made: dict[str, Op] = run.notes.setdefault("snapshots", {})

    def plan() -> tuple[str, str, dict[str, object]]:
        """(method, op kind, kwargs) for the next operation, valid on the image now:
        at most two live snapshots, widths from 4 bits (an apply of one of them, as the
        verification does, counts a cluster up to 4)."""
        r = orng.random()
        if (r < 0.3 and len(made) < 2) or (not made and r < 0.45):
            return "create_snapshot", "snapshot-create", {"name": f"s{len(run.hist.ops)}"}
        if r < 0.45:
            return "delete_snapshot", "snapshot-delete", {"name": orng.choice(sorted(made))}
        hdr = img.meta.header
        if r < 0.7:
            bits = orng.choice([b for b in (4, 8, 16, 32, 64) if b != 1 << hdr.refcount_order])
            return "amend", "amend", {"refcount_bits": bits}
        if r < 0.85:
            return "amend", "amend", {"lazy_refcounts": not hdr.lazy_refcounts}
        return "resize", "resize", {"size": img.size + orng.randint(1, 8) * run.cs}

    async def operator() -> None:
        import asyncio

        for _ in range(orng.randint(3, 5)):
            await asyncio.sleep(orng.random() * 0.004)
            method, kind, kwargs = plan()
            name = kwargs.get("name", "")
            args = (kwargs.pop("name"),) if name else ()
            if method == "resize":
                args = (kwargs.pop("size"),)
            tag = f"{name}{kwargs or ''}{args if method == 'resize' else ''}"
            use_thread = orng.random() < 0.5
            op = Op(kind, tag=("to_thread " if use_thread else "") + tag)
            fn = getattr(img, f"{method}_sync" if use_thread else method)

            def call(
                fn: Any = fn, args: Any = args, kwargs: Any = kwargs, thread: bool = use_thread
            ) -> Awaitable[Any]:
                if thread:
                    return asyncio.to_thread(fn, *args, **kwargs)
                return fn(*args, **kwargs)  # type: ignore[no-any-return]

            ok, _ = await run.async_call(op, call, "operator")
            run.finish(op, ok)
            if ok and method == "create_snapshot":
                made[str(name)] = op
            elif ok and method == "delete_snapshot":
                del made[str(name)]
            if ok and method == "amend":
                hdr = img.meta.header
                got = {
                    "refcount_bits": 1 << hdr.refcount_order,
                    "lazy_refcounts": hdr.lazy_refcounts,
                }
                for key, value in kwargs.items():
                    if got[key] != value:
                        run.fail("extra", f"{op.label()}: {key}={got[key]} after the amend")

    run.spawn_loop("operator", operator)


def _snapshots_hold(run: Run, out: Outcome) -> None:
    """Each snapshot made and not deleted holds a state the history allows during the
    call that made it (our apply on a copy), and the grown tail reads zeros."""
    import shutil

    from sim import crypt_open

    import qcow2aio

    if not out.ok or out.hung:
        return
    made: dict[str, Op] = run.notes.get("snapshots", {})
    copy = run.setup.path.with_name(run.setup.path.name + ".snap")
    size = len(run.hist.initial)
    try:
        with qcow2aio.open(run.setup.path, "r", **crypt_open(run.setup.crypt)) as img:
            listed = sorted(s["name"] for s in img.snapshots())
            tail = img.read_sync(size, img.size - size) if img.size > size else b""
        if listed != sorted(made):
            out.failures.append(Failure("snapshots", f"listed {listed}, made {sorted(made)}"))
        if tail.strip(b"\0"):
            out.failures.append(Failure("final", "the grown range does not read as zeros"))
        for name, op in sorted(made.items()):
            shutil.copyfile(run.setup.path, copy)
            with qcow2aio.open(copy, "r+", **crypt_open(run.setup.crypt)) as img:
                img.apply_snapshot_sync(name)
                got = img.read_sync(0, min(size, img.size))
            bad = run.hist.check(got, 0, start=op.start, end=op.end)
            if bad is not None:
                out.failures.append(Failure("snapshots", f"snapshot {name}: {bad}"))
    finally:
        copy.unlink(missing_ok=True)
    out.stats["snapshots checked"] += len(made)


SCENARIOS: dict[str, ThreadScenario] = {
    s.name: s
    for s in [
        ThreadScenario("sync_threads", sync_threads, default_seeds=30),
        ThreadScenario("sync_beside_loop", sync_beside_loop, default_seeds=30),
        ThreadScenario("loops_in_threads", loops_in_threads, default_seeds=30),
        ThreadScenario("to_thread", to_thread, default_seeds=30),
        ThreadScenario(
            "close_from_thread", close_from_thread, default_seeds=30, verify=_after_close
        ),
        ThreadScenario(
            "ops_from_threads", ops_from_threads, default_seeds=12, verify=_snapshots_hold
        ),
    ]
}


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("crypt", CRYPTS)
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_thread_scenario(
    name: str, driver: str, crypt: str, sim_env: SimEnv, request: pytest.FixtureRequest
) -> None:
    scn = SCENARIOS[name]
    sim_env.crypt = crypt
    seeds = seed_list(scn.default_seeds if crypt == "plain" else ENCRYPTED_SEEDS)
    failing: list[Outcome] = []
    kinds: Counter[str] = Counter()
    stats: Counter[str] = Counter()
    qemu_runs = hangs = ran = 0
    t0 = time.monotonic()
    for seed in seeds:
        out = run_seed(scn, driver, seed, sim_env)
        ran += 1
        stats.update(out.stats)
        qemu_runs += out.qemu_checked
        if not out.ok:
            failing.append(out)
            kinds.update({f.kind for f in out.failures})
        if out.hung or out.loop_timeouts:
            hangs += 1
            if hangs >= MAX_HANGS:
                break
    stats["seconds"] = round(time.monotonic() - t0)
    row = {
        "scenario": f"thread:{name}" + ("" if crypt == "plain" else f"/{crypt}"),
        "driver": driver,
        "seeds": ran,
        "failures": len(failing),
        "kinds": dict(kinds),
        "stats": dict(stats),
        "qemu": qemu_runs,
        "catchable": True,
    }
    detail = publish_seeds(request, row, failing)
    if driver == "unserialized":
        if replay_seed() is not None:
            return
        assert failing, (
            f"{name}: the unserialized control passed all {ran} seeds: the scenario cannot "
            "tell the serialized driver from one without lock and in-flight list"
        )
        if ran >= 20:
            rate = len(failing) / ran
            assert rate >= scn.min_catch, (
                f"{name}: the unserialized control was caught in {rate:.1%} of {ran} seeds, "
                f"less than {scn.min_catch:.0%}"
            )
        return
    assert not failing, (
        f"thread scenario {name}/{driver}: {len(failing)} of {ran} seeds failed "
        f"({hangs} hung)\n{detail}"
    )


# --------------------------------------------------------- harness checks
def test_thread_history_is_thread_safe() -> None:
    """Ticks from many threads are unique and every request is kept."""
    hist = ThreadHistory(bytes(16))

    def work() -> None:
        for _ in range(2000):
            op = hist.begin(Op("write", 0, 1, b"x"))
            hist.done(op)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(hist.ops) == 8000
    ticks = [o.start for o in hist.ops] + [o.end for o in hist.ops]
    assert len(set(ticks)) == len(ticks) == 16000


def test_a_stuck_thread_is_a_hang(sim_env: SimEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness fails a seed whose worker thread never finishes (instead of hanging)."""
    monkeypatch.setenv("QCOW2AIO_THREAD_DEADLINE", "1")
    never = threading.Event()

    def body(run: Run) -> None:
        run.spawn("stuck", lambda: never.wait(60) and None)

    t0 = time.monotonic()
    out = run_seed(ThreadScenario("stuck", body, variants=("64k",)), "serialized", 0, sim_env)
    never.set()
    assert out.hung and [f.kind for f in out.failures] == ["hang"], out.failures
    assert "stuck" in out.failures[0].detail
    assert time.monotonic() - t0 < 10


def test_a_stuck_test_thread_is_a_hang(sim_env: SimEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """A blocking wait in the test's own thread (e.g. in its event loop) is interrupted by
    the watchdog and reported as a hang."""
    # pytest (and each xdist worker) runs tests in the main thread, which the signal
    # watchdog guards: never skipped.
    assert threading.current_thread() is threading.main_thread()
    monkeypatch.setenv("QCOW2AIO_THREAD_DEADLINE", "0.5")
    monkeypatch.setenv("QCOW2AIO_THREAD_GRACE", "0.5")
    never = threading.Event()
    body_seconds = 1.0  # the watchdog fires at deadline + grace

    def body(run: Run) -> None:
        never.wait(body_seconds + 5)

    t0 = time.monotonic()
    out = run_seed(ThreadScenario("stuck-main", body, variants=("64k",)), "serialized", 1, sim_env)
    assert out.hung and out.failures[0].kind == "hang", out.failures
    assert time.monotonic() - t0 < body_seconds + 4


def test_sys_jitter_backend_keeps_the_fast_paths(tmp_path: Path) -> None:
    """The system-call jitter backend overrides no public method: the image under it
    takes the same fast paths as under the plain backend."""
    from threadsim import SysJitterBackend, ThreadJitterBackend

    path = tmp_path / "f"
    path.write_bytes(bytes(4096))
    fb = SysJitterBackend(str(path), True, rng=random.Random(0))
    assert fb.plain_reads and fb.plain_writes
    fb.pwritev([memoryview(b"abc")], 10)
    assert fb.pread(10, 3) == b"abc"
    fb.close()
    tb = ThreadJitterBackend(str(path), False, rng=random.Random(0))
    assert not tb.plain_reads
    tb.close()
