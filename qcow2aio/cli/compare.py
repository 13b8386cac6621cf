"""``qcow2aio compare``: ``qemu-img compare [-q] [-f FMT] [-F FMT] [-s] [-p] A B``.

Text, streams and exit codes as qemu-img 7.2: the verdict on stdout
(``Images are identical.`` 0, ``Content mismatch at offset N!`` or a strict-mode
line 1), ``Warning: Image size mismatch!`` between the common part and the tail,
nothing with ``-q``; an image that does not open is ``Could not open ...`` on
stderr with status 2; usage mistakes are status 1. With ``-p`` the progress
records go first, then the verdict, then the newline that ends the progress (a
blank line), exactly as qemu-img (whose compare prints a record whenever the
figure grew by more than 2 points, counting in single-precision floats).
"""

from __future__ import annotations

import asyncio
import struct
import sys
from collections.abc import Sequence

from ..backing import RAW_FORMATS, RawImage, probe_format
from ..errors import Qcow2Error
from ..image import Image
from ..tools.compare import CompareResult, compare
from ..tools.progress import QemuProgress
from .imageopts import ImageSpec, OpenError, image_spec
from .options import (
    FORCE_SHARE,
    HELP,
    IMAGE_OPTS,
    OBJECT,
    PROG,
    CommandLine,
    CommandSpec,
    UsageError,
    usage_error,
)
from .secrets import Secrets
from .unlock import chain_passphrases, ensure_readable, open_chain

USAGE = (
    "compare [--object OBJ] [--image-opts] [-f FMT] [-F FMT] [-T SRC_CACHE] [-p] [-q] [-s] "
    "[-U] FILE1 FILE2"
)
SPEC = CommandSpec("compare", ":hf:F:T:pqsU", (HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE))
_CACHE_MODES = ("writeback", "none", "writethrough", "directsync", "unsafe")


def _f32(x: float) -> float:
    return float(struct.unpack("f", struct.pack("f", x))[0])


class CompareProgress(QemuProgress):
    """qemu-img compare's ``-p`` records: the same record format as
    :class:`QemuProgress`, but compare adds each chunk's share to a single-precision
    total and prints when it grew by *more than* 2 points (or hit 100), and it ends
    with the newline only (no repeated 100 record)."""

    def __init__(self, stream: object = None) -> None:
        super().__init__(stream, min_step=2.0)  # type: ignore[arg-type]
        self._current = 0.0
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        delta = done - self._done
        self._done = done
        if delta <= 0 or total <= 0:
            return
        share = _f32(_f32(_f32(float(delta)) / _f32(float(total))) * 100.0)
        current = min(100.0, _f32(self._current + _f32(share / 100.0 * 100.0)))
        self._current = current
        if current > _f32(self._last + 2.0) or current == 100.0:
            self._last = current
            self._print(current)


class Exit(Exception):
    """The command is over: its message is printed, ``code`` is its exit status."""

    def __init__(self, code: int) -> None:
        self.code = code


def open_image(spec: ImageSpec, secrets: Secrets, status: int = 2) -> Image | RawImage:
    """Open one image and its chain read-only as qemu-img's ``img_open`` would; on
    failure print ``Could not open 'NAME': why`` and exit with ``status``."""
    try:
        if spec.path == "":
            raise OpenError("The 'file' block driver requires a file name")
        open_chain(spec, secrets)
        ensure_readable(spec.path)
        kind = spec.fmt if spec.fmt is not None else probe_format(spec.path)
        if kind in RAW_FORMATS:
            return RawImage(spec.path)
        if kind != "qcow2":
            raise OpenError(f"Unknown driver '{kind}'")
        if probe_format(spec.path) != "qcow2":
            raise OpenError("Image is not in qcow2 format")
        passphrase, below = chain_passphrases(spec, secrets)
        return Image(spec.path, "r", passphrase=passphrase, backing_passphrase=below)
    except (OpenError, Qcow2Error) as exc:
        raise Exit(error(f"Could not open '{spec.name}': {exc}", status)) from None
    except OSError as exc:
        msg = f"Could not open '{spec.name}': {exc.strerror or exc}"
        raise Exit(error(msg, status)) from None


def error(msg: str, status: int = 2) -> int:
    """Print ``qcow2aio: MSG`` on stderr (qemu-img's ``error_report``), after whatever
    stdout holds; returns ``status``."""
    sys.stdout.flush()
    sys.stderr.write(f"{PROG}: {msg}\n")
    sys.stderr.flush()
    return status


def cmd_compare(argv: Sequence[str]) -> int:
    """Compare two images; print qemu-img's text; return its exit status."""
    try:
        return _run(argv)
    except Exit as exc:
        return exc.code


def _run(argv: Sequence[str]) -> int:
    cl = CommandLine(SPEC, argv)
    p = cl.parse()
    quiet = cl.flag("q")
    show = cl.flag("p") and not quiet
    files, secrets = cl.files, cl.secrets
    if len(files) != 2:
        raise usage_error("Expecting two image file names")
    cache = p.values.get("T")
    if cache is not None and cache not in _CACHE_MODES:
        raise Exit(error(f"Invalid source cache option: {cache}"))
    image_opts = cl.image_opts
    fmt1 = p.values.get("f")
    fmt2 = p.values.get("F")
    try:
        a = open_image(_spec(files[0], fmt1, image_opts), secrets)
        try:
            b = open_image(_spec(files[1], fmt2, image_opts), secrets)
            try:
                # The first record (0.00) once both images are open, as qemu-img.
                bar = CompareProgress(sys.stdout) if show else None
                return asyncio.run(_compare(a, b, cl.flag("s"), quiet, bar))
            finally:
                b.close()
        finally:
            a.close()
    finally:
        if show:
            # qemu_progress_end: the newline that ends the records (also after an
            # open error, where no record was printed).
            sys.stdout.write("\n")
            sys.stdout.flush()


def _spec(name: str, fmt: str | None, image_opts: bool) -> ImageSpec:
    try:
        return image_spec(name, fmt, image_opts, backing_allowed=True)
    except UsageError as exc:
        raise Exit(error(str(exc))) from None


async def _compare(
    a: Image | RawImage, b: Image | RawImage, strict: bool, quiet: bool, bar: CompareProgress | None
) -> int:
    def say(line: str) -> None:
        if not quiet:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    result: CompareResult = await compare(a, b, strict=strict, progress=bar, warning=say)
    say(result.message)
    return result.exit_code
