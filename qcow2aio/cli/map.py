"""``qcow2aio map``: ``qemu-img map``'s options, text, JSON and exit codes.

Like qemu-img, map opens the whole chain as for reading guest data (an encrypted
level needs its secret), then prints what :mod:`qcow2aio.tools.map` formats.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..backing import RAW_FORMATS, RawImage, probe_format
from ..errors import Qcow2UnsupportedError
from ..image import Image
from ..tools.map import display_names, map_image_sync, map_text
from .imageopts import could_not_open, image_spec
from .options import UsageError, parse_size, take_value
from .secrets import Secrets
from .unlock import chain_passphrases, ensure_readable, open_chain

USAGE = (
    "map [--object OBJECTDEF] [--image-opts] [-f FMT] [--start-offset=OFFSET] "
    "[--max-length=LEN] [--output=human|json] [-U] FILE"
)

_SUFFIXES = (
    "You may use k, M, G, T, P or E suffixes for "
    "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
)


def _number(text: str, what: str) -> int:
    try:
        value = parse_size(text)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"Invalid {what} specified. {_SUFFIXES}")
    return value


def cmd_map(argv: Sequence[str]) -> int:
    """``map [--output=human|json] [-f FMT] [--start-offset=N] [--max-length=N] FILE``."""
    output = "human"
    image_opts = False
    secrets = Secrets()
    fmt: str | None = None
    start = 0
    max_length: int | None = None
    files: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--output"):
            output, i = take_value(argv, i, "--output")
        elif arg.startswith("--start-offset"):
            text, i = take_value(argv, i, "--start-offset")
            start = _number(text, "start offset")
        elif arg.startswith("--max-length"):
            text, i = take_value(argv, i, "--max-length")
            max_length = _number(text, "max length")
        elif arg in ("-U", "--force-share"):
            i += 1
        elif arg == "--object" or arg.startswith("--object="):
            text, i = take_value(argv, i, "--object")
            secrets.add_object(text)
        elif arg == "--image-opts":
            image_opts = True
            i += 1
        elif arg.startswith("-f"):
            fmt, i = take_value(argv, i, "-f")
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"invalid option -- '{arg.lstrip('-')}'")
        else:
            files.append(arg)
            i += 1
    if output not in ("human", "json"):
        raise UsageError("--output must be used with human or json as argument.")
    if len(files) != 1:
        raise UsageError("Expecting one image file name")
    spec = image_spec(files[0], fmt, image_opts, backing_allowed=True)
    with could_not_open(spec.name):
        ensure_readable(spec.path)
        kind = spec.fmt if spec.fmt is not None else probe_format(spec.path)
        if kind in RAW_FORMATS:
            layer: Image | RawImage = RawImage(spec.path)
        elif kind != "qcow2":
            raise Qcow2UnsupportedError(f"Unsupported image format: {kind}")
        else:
            open_chain(spec, secrets)
            passphrase, below = chain_passphrases(spec, secrets)
            layer = Image(spec.path, "r", passphrase=passphrase, backing_passphrase=below or None)
    try:
        runs = map_image_sync(layer, start=start, max_length=max_length)
        names = display_names(layer, spec.filename)
        try:
            for piece in map_text(runs, output=output, start=start, names=names):
                sys.stdout.write(piece)
        finally:  # the rows before a MapError go out first, as qemu-img prints them
            sys.stdout.flush()
    finally:
        layer.close()
    sys.stdout.flush()
    return 0
