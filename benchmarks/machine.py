"""What the figures were measured on: CPU, kernel, Python, QEMU, file system."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / (1 << 20):.1f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def _filesystem(path: str) -> str:
    """``fstype device mountpoint`` of the mount holding ``path`` (longest prefix)."""
    real = os.path.realpath(path)
    best = ("", "unknown", "unknown")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev)
    except OSError:
        pass
    return f"{best[1]} on {best[2]} (mounted at {best[0] or '?'})"


def _run(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip()


def qemu_img_version() -> str:
    out = _run(["qemu-img", "--version"])
    return out.splitlines()[0] if out else "unknown"


def describe(workdir: str, io_uring: bool) -> dict[str, str]:
    """The machine description printed above the table and stored in the JSON."""
    repo = Path(__file__).resolve().parent.parent
    commit = _run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"])
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpus": str(os.cpu_count()),
        "memory": _mem_total(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "qemu_img": qemu_img_version(),
        "qemu_io_uring": "yes" if io_uring else "no (threads only)",
        "workdir": f"{workdir}: {_filesystem(workdir)}",
        "loadavg_at_start": " ".join(f"{x:.2f}" for x in load),
        "commit": f"{commit}{' (+ uncommitted changes)' if dirty else ''}",
    }
