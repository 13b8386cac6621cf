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
from .options import (
    FORCE_SHARE,
    HELP,
    IMAGE_OPTS,
    OBJECT,
    OUTPUT,
    CommandLine,
    CommandSpec,
    LongOpt,
    UsageError,
    cvtnum,
    usage_error,
)
from .unlock import chain_passphrases, ensure_readable, open_chain

USAGE = (
    "map [--object OBJECTDEF] [--image-opts] [-f FMT] [--start-offset=OFFSET] "
    "[--max-length=LEN] [--output=human|json] [-U] FILE"
)

SPEC = CommandSpec(
    "map",
    ":f:s:l:hU",
    (
        HELP,
        LongOpt("format", True, "f"),
        OUTPUT,
        OBJECT,
        IMAGE_OPTS,
        FORCE_SHARE,
        LongOpt("start-offset", True, "s"),
        LongOpt("max-length", True, "l"),
    ),
)


def cmd_map(argv: Sequence[str]) -> int:
    """``map [--output=human|json] [-f FMT] [--start-offset=N] [--max-length=N] FILE``."""
    output = "human"
    fmt: str | None = None
    start = 0
    max_length: int | None = None
    cl = CommandLine(SPEC, argv)
    for key, value in cl:
        if key == "output":
            output = value
        elif key == "s":
            start = cvtnum("start offset", value)
        elif key == "l":
            max_length = cvtnum("max length", value)
        elif key == "f":
            fmt = value
    files, secrets = cl.files, cl.secrets
    if len(files) != 1:
        raise usage_error("Expecting one image file name")
    if output not in ("human", "json"):
        raise UsageError("--output must be used with human or json as argument.")
    spec = image_spec(files[0], fmt, cl.image_opts, backing_allowed=True)
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
