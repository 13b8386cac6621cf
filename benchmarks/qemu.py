"""The QEMU side: ``qemu-img bench``, ``qemu-img convert``, ``qemu-img create``, ``qemu-io``.

``qemu-img bench`` prints ``Run completed in X seconds``: the time from the
first request to the completion of the last one (opening and closing the image
are outside it). With ``-t writeback`` and no ``--flush-interval`` it never
flushes inside that window, so our side does not flush inside its window either.

Encrypted images need a secret (``--object secret,...``), which ``qemu-img bench``
of QEMU 7.2 does not take (its options are ``-c -d -f -i -n -o -q -s -S -t -w -U``,
``--flush-interval``, ``--image-opts``, ``--no-drain``, ``--pattern``: an
``--object`` is refused as an unrecognized option). Those streams run through
``qemu-io`` instead (:func:`io_bench`), which takes ``--object`` and the same
``-t``/``-i`` options, and times each request itself.
"""

from __future__ import annotations

import os
import pty
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .stream import Stream

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"
AIO_ENGINES = ("threads", "io_uring")
PATTERN = 0xA5  # the byte qemu-img bench writes (--pattern); our writes use it too
_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")


class QemuError(RuntimeError):
    pass


def run(argv: Sequence[str], timeout: float = 900.0, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        raise QemuError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


SECRET_ID = "sec0"
# QEMU's LUKS create times PBKDF2 from the CPU time of its own thread, and on a busy VM
# that measurement sometimes fails with this message; the create is simply retried.
_PBKDF_FLAKE = "Unable to get accurate CPU usage"
_CREATE_TRIES = 100


def _opt(value: str) -> str:
    """A value inside a QEMU option string: commas doubled."""
    return value.replace(",", ",,")


@dataclass(frozen=True)
class Encryption:
    """An encrypted image kind: QEMU's ``encrypt.format`` and the secret both sides use.

    ``"luks"`` is QEMU's default LUKS (aes-256-xts, plain64, sha256), with
    ``iter_time_ms`` of PBKDF2 per keyslot (10 ms: opening is outside the timed window
    anyway, and create stays short). ``"aes"`` is legacy qcow2 AES (aes-128-cbc,
    plain64 of the guest sector), which QEMU 7.2's ``qemu-img`` still creates.
    """

    format: str
    passphrase: str = "qcow2aio-bench"
    iter_time_ms: int = 10

    def __post_init__(self) -> None:
        if self.format not in ("luks", "aes"):
            raise ValueError(f"encryption format must be 'luks' or 'aes', not {self.format!r}")

    def secret_object(self) -> str:
        """``--object`` value holding the passphrase."""
        return f"secret,id={SECRET_ID},data={_opt(self.passphrase)}"

    def create_options(self) -> str:
        """``qemu-img create -o`` options."""
        opts = f"encrypt.format={self.format},encrypt.key-secret={SECRET_ID}"
        if self.format == "luks":
            opts += f",encrypt.iter-time={self.iter_time_ms}"
        return opts

    def image_opts(self, path: str) -> str:
        """``--image-opts`` string opening ``path`` with the secret."""
        return f"driver=qcow2,file.filename={_opt(path)},encrypt.key-secret={SECRET_ID}"


def create(
    path: str, size: int, *, backing: str | None = None, encryption: Encryption | None = None
) -> str:
    """``qemu-img create -f qcow2`` with QEMU's defaults (64 KiB clusters, refcount_bits=16).

    With ``encryption``, an encrypted image (``--object secret`` and ``-o encrypt.*``);
    a LUKS create that fails only because QEMU could not time its PBKDF2 is retried.
    """
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-b", backing, "-F", "qcow2"]
    if encryption is None:
        run([*argv, path, str(size)])
        return path
    argv += ["--object", encryption.secret_object(), "-o", encryption.create_options()]
    for attempt in range(_CREATE_TRIES):
        try:
            run([*argv, path, str(size)])
            return path
        except QemuError as e:
            if _PBKDF_FLAKE not in str(e) or attempt == _CREATE_TRIES - 1:
                raise
    raise AssertionError("unreachable")


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


def bench(
    path: str,
    stream: Stream,
    *,
    aio: str,
    depth: int,
    cache: str = "writeback",
    encryption: Encryption | None = None,
) -> float:
    """Run ``qemu-img bench``; returns the seconds it reports for the request loop.

    ``cache="unsafe"`` (no flushes at all) is for building fixtures only. An encrypted
    image (``encryption``) runs through :func:`io_bench` (``qemu-img bench`` takes no
    secret).
    """
    if encryption is not None:
        return io_bench(path, stream, aio=aio, depth=depth, cache=cache, encryption=encryption)
    return _seconds(run(bench_argv(path, stream, aio=aio, depth=depth, cache=cache)))


# ------------------------------------------------------------------ qemu-io
# ``-C`` report of one request: bytes,ops,time,bytes/sec,ops/sec.
_IO_REPORT = re.compile(r"^(\d+),(\d+),[0-9:.]+,([0-9.]+),([0-9.]+)$")
# Requests per qemu-io process: keeps the argument list far below ARG_MAX (each ``-c``
# is about 40 bytes with its pointer). Streams with more requests run in several
# processes; the figures add up.
IO_MAX_COMMANDS = 8192
# The marker request around a timed window (depth > 1): 512 bytes at offset 0.
_MARKER = "read -C 0 512"
# glibc malloc settings for qemu-io at depth > 1: blocks up to 32 MiB come from the heap,
# which is not trimmed. qemu-io allocates (and fills) a new buffer per command, by default
# a fresh mapping, 256 page faults and an munmap per 1 MiB request (about 0.4 ms here),
# which the depth > 1 window would count; qemu-img bench allocates its buffers once. The
# same settings also spare QEMU's encrypted path the fresh mapping of its own per-request
# bounce buffer (the other munmap per request under ``strace``), which it pays in
# ``qemu-img bench`` and at depth 1 here: so QEMU's depth > 1 figure is flattered (for
# 1 MiB LUKS reads at depth 1 the settings give +30%, for legacy AES reads +180%).
_IO_MALLOC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"


def _io_env() -> dict[str, str]:
    env = dict(os.environ)
    old = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{old}:{_IO_MALLOC}" if old else _IO_MALLOC
    return env


def _io_commands(stream: Stream, depth: int, offsets: Sequence[int]) -> list[str]:
    """qemu-io commands for ``offsets``: depth 1 one timed request each (``read -C`` /
    ``write -C``); deeper, ``depth`` ``aio_read``/``aio_write`` then ``aio_flush``
    (which waits for them: it is a drain, not a disk flush)."""
    size = stream.size
    verb = f"write -P {PATTERN}" if stream.write else "read"
    if depth == 1:
        return [f"{verb} -C {off} {size}" for off in offsets]
    cmds: list[str] = []
    for k, off in enumerate(offsets):
        cmds.append(f"aio_{verb} -q {off} {size}")
        if k % depth == depth - 1 or k == len(offsets) - 1:
            cmds.append("aio_flush")
    return cmds


def _io_reports(text: str) -> list[tuple[int, float]]:
    """(ops, seconds) of every ``-C`` report line; any other output is an error."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        m = _IO_REPORT.match(line)
        if m is None:
            raise QemuError(f"unexpected qemu-io output: {line!r}\n{text[-2000:]}")
        ops, per_sec = int(m.group(2)), float(m.group(4))
        out.append((ops, ops / per_sec))
    return out


def _io_marked_window(argv: list[str]) -> float:
    """Run qemu-io whose first and last commands are the marker read and whose other
    commands print nothing; seconds between the two markers' report lines.

    stdout is a pseudo-terminal, so qemu-io's stdio flushes each line as it is printed
    and the lines arrive here when they are written (the reader wakes twice per run).
    """
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=_io_env()
        )
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    stamps: list[float] = []
    lines = 0
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            now = time.perf_counter()
            chunks.append(chunk)
            for _ in range(chunk.count(b"\n")):
                lines += 1
                stamps.append(now)
    finally:
        os.close(master)
        rc = proc.wait()
    text = b"".join(chunks).decode(errors="replace")
    if rc != 0:
        raise QemuError(f"{' '.join(argv[:8])} ... failed ({rc}):\n{text[-2000:]}")
    reports = _io_reports(text)
    if len(reports) != 2 or len(stamps) != 2:
        raise QemuError(f"qemu-io printed {len(reports)} reports, expected the 2 markers")
    return stamps[1] - stamps[0]


def io_bench(
    path: str,
    stream: Stream,
    *,
    aio: str,
    depth: int,
    encryption: Encryption,
    cache: str = "writeback",
) -> float:
    """The stream through ``qemu-io`` on an encrypted image; seconds of its requests.

    Same options as :func:`bench` (``-t CACHE -i AIO``, the image opened with its
    secret through ``--image-opts``); the requests are ``-c`` commands, run back to
    back without the main loop in between.

    * Depth 1: ``read -C``/``write -C`` per request. qemu-io times each request alone
      (``clock_gettime`` around the block call, as ``qemu-img bench`` around its loop)
      and the figure is the sum. Left out: qemu-io's work between requests (parsing
      the command, allocating and filling its buffer, printing the report), which
      ``qemu-img bench`` does not have; so QEMU's figure is, if anything, flattered.
    * Depth ``d`` > 1: ``aio_read``/``aio_write`` ``d`` at a time, each group waited
      for with ``aio_flush`` (a drain, no disk flush). The window runs from the report
      of a 512-byte marker read before the first request to the one after the last:
      wall time, including qemu-io's per-command work (mostly the fill of each
      request's buffer: about 75 us per 1 MiB request here, measured on a plain image
      against ``qemu-img bench``). In-flight requests fall from ``d`` to 0 at the end of
      each group, where ``qemu-img bench`` refills at once.

    At depth > 1 qemu-io runs with the glibc malloc settings of :data:`_IO_MALLOC`,
    which take its per-command buffer mapping out of the window and flatter QEMU (see
    there); at depth 1 it runs as installed, so its figure is QEMU's own costs only.

    Closing (and its flush) is outside the figure, as with ``qemu-img bench``.
    """
    base = [QEMU_IO, "--object", encryption.secret_object(), "-t", cache, "-i", aio]
    base += ["--image-opts", encryption.image_opts(path)]
    offsets = stream.offset_list()
    per_run = IO_MAX_COMMANDS if depth == 1 else IO_MAX_COMMANDS // depth * depth
    total = 0.0
    for lo in range(0, len(offsets), per_run):
        cmds = _io_commands(stream, depth, offsets[lo : lo + per_run])
        if depth == 1:
            argv = list(base)
            for c in cmds:
                argv += ["-c", c]
            reports = _io_reports(run(argv))
            if len(reports) != len(cmds):
                raise QemuError(f"qemu-io printed {len(reports)} reports for {len(cmds)} requests")
            total += sum(secs for _, secs in reports)
        else:
            argv = list(base)
            for c in [_MARKER, *cmds, _MARKER]:
                argv += ["-c", c]
            total += _io_marked_window(argv)
    return total


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
