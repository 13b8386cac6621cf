"""Progress reporting shared by the long jobs (convert, commit, rebase, compare).

A job takes ``progress=`` — any callable ``(done, total)`` in bytes of *work* (not
necessarily guest bytes: a job counts what it has to look at) — and calls it from the
event loop as work completes; ``done`` never decreases and the last call has
``done == total``. :class:`QemuProgress` turns those calls into the records
``qemu-img -p`` prints, so scripts that scrape qemu-img's progress read ours too:
``"    (NN.NN/100%)\\r"`` at 0, then whenever the figure has grown by at least one
percentage point, a forced final ``100.00`` record and a newline.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

Progress = Callable[[int, int], None]
"""``progress(done, total)``: bytes of work done so far out of ``total``."""


def _percent(done: int, total: int) -> float:
    if total <= 0:
        return 100.0
    return min(100.0, 100.0 * done / total)


class QemuProgress:
    """A :data:`Progress` callback printing qemu-img's ``-p`` records to ``stream``.

    ``min_step`` is qemu-img's: a record is printed once the percentage grew by at
    least that much since the last one (and always at 100), so a copy of a million
    clusters prints about a hundred records, not a million.
    """

    def __init__(self, stream: TextIO | None = None, *, min_step: float = 1.0) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._min_step = min_step
        self._last = 0.0
        self._print(0.0)

    def _print(self, pct: float) -> None:
        self._stream.write(f"    ({pct:.2f}/100%)\r")
        self._stream.flush()

    def __call__(self, done: int, total: int) -> None:
        pct = _percent(done, total)
        if pct >= self._last + self._min_step or (pct >= 100.0 > self._last):
            self._last = pct
            self._print(pct)

    def finish(self) -> None:
        """The closing records: 100.00 (again, as qemu-img) and the newline."""
        self._last = 100.0
        self._print(100.0)
        self._stream.write("\n")
        self._stream.flush()


class Counter:
    """Adds up completed work and forwards it to a :data:`Progress` callback.

    Jobs run many requests at once; each calls :meth:`add` when its piece is done,
    on the event loop thread, so the running total needs no lock and never goes
    backwards.
    """

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.done = 0
        self._progress = progress
        if progress is not None:
            progress(0, total)

    def add(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        if self._progress is not None:
            self._progress(self.done, self.total)

    def complete(self) -> None:
        """Report the whole job done (work skipped as unallocated counts too)."""
        self.add(self.total - self.done)
