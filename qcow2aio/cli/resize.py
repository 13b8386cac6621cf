"""``qcow2aio resize``: ``qemu-img resize [--shrink] [--preallocation=MODE] [-f FMT] IMG SIZE``.

Same arguments, messages, order of checks and exit codes as qemu-img 7.2:
``Image resized.`` on success (nothing with ``-q``), status 1 and QEMU's
message otherwise (a shrink without ``--shrink`` also prints QEMU's warning).
A qcow2 image is resized by :meth:`qcow2aio.Image.resize_sync`; a raw file
(``-f raw``) is truncated or extended like file-posix does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..errors import Qcow2Error
from ..image import Image
from ..resize import PREALLOCATION_MODES
from .imageopts import ImageSpec, could_not_open, image_spec
from .options import (
    HELP,
    IMAGE_OPTS,
    OBJECT,
    PROG,
    CommandLine,
    CommandSpec,
    LongOpt,
    UsageError,
    parse_size,
)
from .secrets import Secrets
from .unlock import chain_passphrases, open_chain

USAGE = (
    "resize [--object OBJ] [--image-opts] [-f FMT] [--preallocation=MODE] [-q] [--shrink] "
    "FILE [+|-]SIZE"
)

SPEC = CommandSpec(
    "resize",
    ":f:hq",
    (HELP, OBJECT, IMAGE_OPTS, LongOpt("preallocation", True), LongOpt("shrink")),
)
_SIZE_ERROR = (
    "Parameter 'size' expects a non-negative number below 2^64\n"
    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
    "and exabytes, respectively."
)
_SHRINK_WARNING = (
    "warning: Shrinking an image will delete all data beyond the shrunken image's end. "
    "Before performing such an operation, make sure there is no important data there."
)


class _Fail(Exception):
    """An error already reported on stderr."""


def _usage(msg: str) -> int:
    sys.stderr.write(f"{PROG}: {msg}\nTry '{PROG} --help' for more information\n")
    return 1


def cmd_resize(argv: Sequence[str]) -> int:
    """Resize; print qemu-img's text; return its exit status."""
    args = list(argv)
    if len(args) < 2:
        return _usage("Not enough arguments")
    # qemu-img takes the size off the end before getopt, so that "-1G" is no option.
    size_text = args.pop()
    prealloc = "off"
    cl = CommandLine(SPEC, args)
    for key, value in cl:
        if key == "preallocation":
            if value not in PREALLOCATION_MODES:
                sys.stderr.write(f"{PROG}: Invalid preallocation mode '{value}'\n")
                return 1
            prealloc = value
    fmt = cl.parsed.values.get("f")
    shrink, quiet = cl.flag("shrink"), cl.flag("q")
    if len(cl.files) != 1:
        return _usage("Expecting image file name and size")
    name = cl.files[0]
    relative = 0
    if size_text[:1] == "+":
        relative, size_text = 1, size_text[1:]
    elif size_text[:1] == "-":
        relative, size_text = -1, size_text[1:]
    try:
        n = parse_size(size_text)
    except ValueError:
        sys.stderr.write(f"{PROG}: {_SIZE_ERROR}\n")
        return 1
    if n > (1 << 63) - 1:
        sys.stderr.write(f"{PROG}: {_SIZE_ERROR}\n")
        return 1
    spec = image_spec(name, fmt, cl.image_opts, backing_allowed=True)
    try:
        if spec.fmt in (None, "qcow2"):
            _resize_qcow2(spec, cl.secrets, n, relative, shrink, prealloc)
        elif spec.fmt == "raw":
            _resize_raw(spec.path, n, relative, shrink, prealloc)
        else:
            raise UsageError(f"Could not open '{spec.name}': Unsupported image format: {spec.fmt}")
    except _Fail:
        return 1
    if not quiet:
        sys.stdout.write("Image resized.\n")
    return 0


def _target(current: int, n: int, relative: int) -> int:
    total = current + n * relative if relative else n
    if total <= 0:
        sys.stderr.write(f"{PROG}: New image size must be positive\n")
        raise _Fail
    return total


def _refuse_shrink(total: int, current: int, shrink: bool, prealloc: str) -> None:
    if total <= current and prealloc != "off":
        sys.stderr.write(f"{PROG}: Preallocation can only be used for growing images\n")
        raise _Fail
    if total < current and not shrink:
        sys.stderr.write(
            f"{PROG}: Use the --shrink option to perform a shrink operation.\n"
            f"{PROG}: {_SHRINK_WARNING}\n"
        )
        raise _Fail


def _resize_qcow2(
    spec: ImageSpec,
    secrets: Secrets,
    n: int,
    relative: int,
    shrink: bool,
    prealloc: str,
) -> None:
    from ..backing import probe_format

    name = spec.name
    if not os.path.exists(spec.path):
        raise UsageError(
            f"Could not open '{name}': Could not open '{spec.path}': No such file or directory"
        )
    if spec.fmt is None:
        try:
            kind = probe_format(spec.path)
        except Qcow2Error as exc:
            raise UsageError(f"Could not open '{name}': {exc}") from None
        if kind != "qcow2":
            raise UsageError(f"Could not open '{name}': Unsupported image format: {kind}")
    with could_not_open(name):
        # As qemu-img opens it for I/O: the whole chain, every encrypted level unlocked.
        open_chain(spec, secrets)
    passphrase, below = chain_passphrases(spec, secrets)
    img = Image(spec.path, "r+", passphrase=passphrase, backing_passphrase=below or None)
    try:
        current = img.size
        total = _target(current, n, relative)
        _refuse_shrink(total, current, shrink, prealloc)
        img.resize_sync(total, shrink=shrink, preallocation=prealloc)
    finally:
        img.close()


def _resize_raw(name: str, n: int, relative: int, shrink: bool, prealloc: str) -> None:
    try:
        current = os.stat(name).st_size
    except OSError as exc:
        raise UsageError(
            f"Could not open '{name}': Could not open '{name}': {exc.strerror or exc}"
        ) from None
    total = _target(current, n, relative)
    _refuse_shrink(total, current, shrink, prealloc)
    if prealloc == "metadata":
        raise UsageError(f"Unsupported preallocation mode: {prealloc}")
    fd = os.open(name, os.O_RDWR)
    try:
        os.ftruncate(fd, total)
        if total > current and prealloc == "falloc":
            os.posix_fallocate(fd, current, total - current)
        elif total > current and prealloc == "full":
            os.pwrite(fd, bytes(total - current), current)
    finally:
        os.close(fd)
