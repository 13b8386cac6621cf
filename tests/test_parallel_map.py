"""``io.parallel_map``: the helper threads of a synchronous read never outlive the call.

``read_sync`` inflates the compressed clusters of one request on the calling thread
and a helper thread. That keeps the synchronous contract only if, when the call
returns or raises (an inflate error, a signal handler's exception), no helper is
still running. These tests hold helpers inside ``fn`` and check exactly that.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

import pytest

from qcow2aio.io import parallel_map


class Interrupted(BaseException):
    """Raised by the test's signal handler (not an Exception, like KeyboardInterrupt)."""


class Tracker:
    """Counts the calls of ``fn`` running right now, and the most that ever ran at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.threads: set[int] = set()

    def enter(self) -> None:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.threads.add(threading.get_ident())

    def leave(self) -> None:
        with self.lock:
            self.running -= 1


def test_results_in_order_and_helpers_share_the_work() -> None:
    tr = Tracker()

    def fn(x: int) -> int:
        tr.enter()
        try:
            time.sleep(0.02)  # releases the GIL, as zlib and zstd do
            return x * x
        finally:
            tr.leave()

    assert parallel_map(fn, list(range(12)), 1) == [x * x for x in range(12)]
    assert tr.running == 0
    assert tr.peak == 2 and len(tr.threads) == 2
    # No helpers asked for, or one item: the caller alone.
    tr2 = Tracker()

    def fn2(x: int) -> int:
        tr2.enter()
        tr2.leave()
        return -x

    assert parallel_map(fn2, [1, 2, 3], 0) == [-1, -2, -3]
    assert parallel_map(fn2, [5], 4) == [-5]
    assert tr2.threads == {threading.get_ident()}


def test_an_error_is_raised_after_every_helper_stopped() -> None:
    tr = Tracker()
    caller = threading.get_ident()

    def fn(x: int) -> int:
        tr.enter()
        try:
            if threading.get_ident() == caller:
                deadline = time.monotonic() + 5
                while tr.running < 2 and time.monotonic() < deadline:
                    time.sleep(0.001)  # fail only once a helper holds an item
                raise ValueError(f"bad item {x}")
            time.sleep(0.2)  # the helper is mid-item when the caller fails
            return x
        finally:
            tr.leave()

    with pytest.raises(ValueError, match="bad item"):
        parallel_map(fn, list(range(8)), 1)
    assert tr.running == 0  # the helper finished its item before the raise
    # ... and took no new item after the error: at most the one it held, plus the caller's.
    assert tr.peak <= 2


def test_a_signal_in_the_caller_waits_for_the_helper_then_raises() -> None:
    tr = Tracker()
    finished_after: list[float] = []

    def fn(x: int) -> int:
        tr.enter()
        try:
            time.sleep(0.3)
            finished_after.append(time.monotonic())
            return x
        finally:
            tr.leave()

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Interrupted

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.1)  # lands while both threads sleep in fn
    try:
        with pytest.raises(Interrupted):
            parallel_map(fn, list(range(4)), 1)
        raised_at = time.monotonic()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert tr.running == 0
    assert finished_after and max(finished_after) <= raised_at
    assert len(finished_after) < 4  # the work stopped: not every item was done
