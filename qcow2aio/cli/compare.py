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
from .options import PROG, UsageError
from .secrets import Secrets
from .unlock import chain_passphrases, ensure_readable, open_chain

USAGE = (
    "compare [--object OBJ] [--image-opts] [-f FMT] [-F FMT] [-T SRC_CACHE] [-p] [-q] [-s] "
    "[-U] FILE1 FILE2"
)
_TRY = f"\nTry '{PROG} --help' for more information"


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


def _parse(argv: Sequence[str]) -> tuple[dict[str, object], list[str], Secrets]:
    """getopt ``:hf:F:T:pqsU`` plus --object and --image-opts, as qemu-img."""
    opts: dict[str, object] = {
        "fmt1": None,
        "fmt2": None,
        "progress": False,
        "quiet": False,
        "strict": False,
        "image_opts": False,
    }
    secrets = Secrets()
    files: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            files.extend(args[i:])
            break
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            if name == "--object":
                if not eq:
                    if i >= len(args):
                        raise UsageError(f"option '--object' requires an argument{_TRY}")
                    value, i = args[i], i + 1
                secrets.add_object(value)
            elif name == "--image-opts" and not eq:
                opts["image_opts"] = True
            elif name in ("--force-share", "--help") and not eq:
                pass
            else:
                raise UsageError(f"unrecognized option '{a}'{_TRY}")
            continue
        if not a.startswith("-") or a == "-":
            files.append(a)
            continue
        j = 1
        while j < len(a):
            c = a[j]
            j += 1
            if c in "fFT":
                if j < len(a):
                    value, j = a[j:], len(a)
                elif i < len(args):
                    value, i = args[i], i + 1
                else:
                    raise UsageError(f"missing argument for option '-{c}'{_TRY}")
                if c == "f":
                    opts["fmt1"] = value
                elif c == "F":
                    opts["fmt2"] = value
                elif value not in ("writeback", "none", "writethrough", "directsync", "unsafe"):
                    raise Exit(error(f"Invalid source cache option: {value}"))
            elif c == "p":
                opts["progress"] = True
            elif c == "q":
                opts["quiet"] = True
            elif c == "s":
                opts["strict"] = True
            elif c in "Uh":
                pass
            else:
                # getopt's ':' mode: qemu-img names the whole argument.
                raise UsageError(f"unrecognized option '{a}'{_TRY}")
    return opts, files, secrets


def cmd_compare(argv: Sequence[str]) -> int:
    """Compare two images; print qemu-img's text; return its exit status."""
    try:
        return _run(argv)
    except Exit as exc:
        return exc.code


def _run(argv: Sequence[str]) -> int:
    opts, files, secrets = _parse(argv)
    quiet = bool(opts["quiet"])
    show = bool(opts["progress"]) and not quiet
    if len(files) != 2:
        raise UsageError(f"Expecting two image file names{_TRY}")
    image_opts = bool(opts["image_opts"])
    fmt1 = opts["fmt1"]
    fmt2 = opts["fmt2"]
    assert fmt1 is None or isinstance(fmt1, str)
    assert fmt2 is None or isinstance(fmt2, str)
    try:
        a = open_image(_spec(files[0], fmt1, image_opts), secrets)
        try:
            b = open_image(_spec(files[1], fmt2, image_opts), secrets)
            try:
                # The first record (0.00) once both images are open, as qemu-img.
                bar = CompareProgress(sys.stdout) if show else None
                return asyncio.run(_compare(a, b, bool(opts["strict"]), quiet, bar))
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
