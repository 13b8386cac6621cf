"""qcow2aio against QEMU, workload by workload, in one run.

``python -m benchmarks`` (or ``make bench``) runs every workload through QEMU's
own tools (``qemu-img bench`` with the threads and io_uring AIO engines,
``qemu-img convert``) and through qcow2aio (``read_sync``/``write_sync`` and
``await read/write`` with the same number of requests in flight), on the same
image layout, a few repetitions each. It prints one table (QEMU's figure,
ours, the ratio ours/QEMU: higher is better) and writes it as JSON to
``benchmarks/results/latest.json``. See ``docs/performance.md``.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from .runner import main as _main

    return _main(argv)
