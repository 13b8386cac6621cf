"""The QEMU side: ``qemu-img bench``, ``qemu-img convert``, ``qemu-img create``.

``qemu-img bench`` prints ``Run completed in X seconds``: the time from the
first request to the completion of the last one (opening and closing the image
are outside it). With ``-t writeback`` and no ``--flush-interval`` it never
flushes inside that window, so our side does not flush inside its window either.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence

from .stream import Stream

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
AIO_ENGINES = ("threads", "io_uring")
PATTERN = 0xA5  # the byte qemu-img bench writes (--pattern); our writes use it too
_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")


class QemuError(RuntimeError):
    pass


def run(argv: Sequence[str], timeout: float = 900.0) -> str:
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise QemuError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def create(path: str, size: int, *, backing: str | None = None) -> str:
    """``qemu-img create -f qcow2`` with QEMU's defaults (64 KiB clusters, refcount_bits=16)."""
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-b", backing, "-F", "qcow2"]
    run([*argv, path, str(size)])
    return path


def bench_argv(
    path: str, stream: Stream, *, aio: str, depth: int, cache: str = "writeback"
) -> list[str]:
    argv = [QEMU_IMG, "bench", "-f", "qcow2", "-t", cache, "-i", aio]
    argv += ["-d", str(depth), "-s", str(stream.size), "-c", str(stream.count)]
    argv += ["-S", str(stream.stride)]
    if stream.offset:
        argv += ["-o", str(stream.offset)]
    if stream.write:
        argv += ["-w", f"--pattern={PATTERN}"]
    return [*argv, path]


def _seconds(out: str) -> float:
    m = _COMPLETED.search(out)
    if m is None:
        raise QemuError(f"no 'Run completed' line in qemu-img bench output:\n{out}")
    return float(m.group(1))


def bench(path: str, stream: Stream, *, aio: str, depth: int, cache: str = "writeback") -> float:
    """Run ``qemu-img bench``; returns the seconds it reports for the request loop.

    ``cache="unsafe"`` (no flushes at all) is for building fixtures only.
    """
    return _seconds(run(bench_argv(path, stream, aio=aio, depth=depth, cache=cache)))


def bench_rusage(path: str, stream: Stream, *, aio: str, depth: int) -> tuple[float, int]:
    """``qemu-img bench`` with its peak RSS in KiB: (seconds, ru_maxrss of qemu-img).

    The child is started by ``/usr/bin/time`` when there is one: ``ru_maxrss`` carries
    over ``execve`` the high-water mark of the address space it replaces, so a child
    forked (or vforked) straight from this large Python process would report at least
    our own size. ``time`` is small, so its child reports qemu-img's own peak.
    """
    argv = bench_argv(path, stream, aio=aio, depth=depth)
    time_bin = shutil.which("time", path="/usr/bin:/bin")
    if time_bin is not None:
        proc = subprocess.run(
            [time_bin, "-f", "maxrss_kib=%M", *argv],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if proc.returncode != 0:
            raise QemuError(f"{' '.join(argv)} failed:\n{proc.stdout}{proc.stderr}")
        m = re.search(r"maxrss_kib=(\d+)", proc.stderr)
        if m is None:
            raise QemuError(f"no maxrss from {time_bin}:\n{proc.stderr}")
        return _seconds(proc.stdout), int(m.group(1))
    with tempfile.TemporaryFile() as out:
        pid = os.posix_spawnp(
            argv[0],
            argv,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, out.fileno(), 2),
            ],
        )
        _, status, usage = os.wait4(pid, 0)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise QemuError(f"{' '.join(argv)} failed:\n{text}")
    return _seconds(text), int(usage.ru_maxrss)


def io_uring_works(workdir: str) -> bool:
    """Whether ``qemu-img bench -i io_uring`` runs here (kernel and build support)."""
    path = os.path.join(workdir, "io_uring_probe.qcow2")
    try:
        create(path, 1 << 20)
        bench(path, Stream(4096, 16, 1 << 20), aio="io_uring", depth=1)
        return True
    except QemuError:
        return False
    finally:
        if os.path.exists(path):
            os.unlink(path)


def convert(src: str, dst: str, *, compress: bool = False, cache: str = "writeback") -> float:
    """``qemu-img convert -f raw -O qcow2 -t CACHE [-c] SRC DST``; returns wall seconds."""
    argv = [QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", "-t", cache]
    if compress:
        argv.append("-c")
    t0 = time.perf_counter()
    run([*argv, src, dst])
    return time.perf_counter() - t0
