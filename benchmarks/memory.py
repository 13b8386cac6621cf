"""Peak RSS of reading a huge sparse image, measured in a child process.

Run as ``python -m benchmarks.memory PATH COUNT STEP MODE``: the child imports
qcow2aio (and asyncio), records its peak RSS as the baseline, opens the image,
reads ``COUNT`` 4 KiB blocks along the stride ``STEP`` (``sync`` or ``async``,
one request at a time) and prints the baseline and the new peak as JSON. The
offsets are generated on the fly so the list itself does not count.

The peak is ``VmHWM`` from ``/proc/self/status`` where there is one: it is
``ru_maxrss`` of this address space alone. ``ru_maxrss`` itself also carries the
high-water mark of the process that ran ``execve`` (here the benchmark runner,
vforked), which would hide the child's own baseline.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path


def peak_rss_kib() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _child(path: str, count: int, step: int, mode: str) -> dict[str, int]:
    import asyncio

    import qcow2aio

    base = peak_rss_kib()
    img = qcow2aio.open(path)
    size = img.size

    if mode == "sync":
        read = img.read_sync
        off = 0
        for _ in range(count):
            read(off, 4096)
            off = (off + step) % size
        img.close()
    else:

        async def go() -> None:
            off = 0
            for _ in range(count):
                await img.read(off, 4096)
                off = (off + step) % size
            await img.aclose()

        asyncio.run(go())
    peak = peak_rss_kib()
    return {"baseline_kib": base, "peak_kib": peak}


def measure(path: str, count: int, step: int, mode: str) -> dict[str, int]:
    """Run the child; returns its baseline and peak RSS in KiB."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", path, str(count), str(step), mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    p, c, s, m = sys.argv[1:5]
    print(json.dumps(_child(p, int(c), int(s), m)))
