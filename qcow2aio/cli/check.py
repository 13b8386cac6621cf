"""``qcow2aio check``: the same report, text and exit codes as ``qemu-img check``.

Like ``qemu-img check`` it opens the metadata directly, without the
read-write open's automatic repair of a dirty (lazy refcounts) image and
without refusing a corrupt one: a check must see the image as it is. With
``-r leaks`` or ``-r all`` the file is opened writable and repaired.

Before that it opens the image and its backing chain as qemu-img does (see
:mod:`.unlock`), so an encrypted image needs its secret (``--object secret,...``
and ``--image-opts ...,encrypt.key-secret=ID``) and fails with QEMU's message
without it, although the check itself reads no guest data.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..check import check_image
from ..errors import Qcow2Error
from ..io import FileBackend
from ..metadata import Metadata
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
    usage_error,
)
from .unlock import open_chain

USAGE = (
    "check [-q] [--object OBJ] [--image-opts] [-f qcow2] [-r leaks|all] "
    "[--output=human|json] [-U] FILE"
)


SPEC = CommandSpec(
    "check",
    ":hf:r:T:qU",
    (
        HELP,
        LongOpt("format", True, "f"),
        LongOpt("repair", True, "r"),
        OUTPUT,
        OBJECT,
        FORCE_SHARE,
        IMAGE_OPTS,
    ),
)


class CheckUsageError(Qcow2Error):
    """Bad command-line arguments for ``check``."""


def cmd_check(argv: Sequence[str]) -> int:
    """Run the check; print QEMU's stdout/stderr text; return qemu-img's exit code."""
    repair: str | None = None
    output = "human"
    fmt: str | None = None
    cl = CommandLine(SPEC, argv)
    for key, value in cl:
        if key == "r":
            if value not in ("leaks", "all"):
                raise usage_error(
                    f"Unknown option value for -r (expecting 'leaks' or 'all'): {value}"
                )
            repair = value
        elif key == "f":
            fmt = value
        elif key == "output":
            output = value
    quiet = cl.flag("q")
    files, secrets = cl.files, cl.secrets
    if len(files) != 1:
        raise usage_error("Expecting one image file name")
    if output not in ("human", "json"):
        raise CheckUsageError("--output must be used with human or json as argument.")
    if fmt is not None and fmt != "qcow2":
        raise CheckUsageError(f"check: only the qcow2 format is supported, not {fmt!r}")
    spec = image_spec(files[0], fmt, cl.image_opts, backing_allowed=True)
    with could_not_open(spec.name):
        open_chain(spec, secrets)
    path = spec.path
    file = FileBackend(path, repair is not None)
    try:
        meta = Metadata(file, writable=repair is not None, check=True)
        result = check_image(meta, repair=repair)
    finally:
        file.close()
    for line in result.messages:
        sys.stderr.write(line if line.endswith("\n") else line + "\n")
    if result.error is not None:
        if not any("Check failed" in line for line in result.messages):
            sys.stderr.write(f"qemu-img: Check failed: {result.error}\n")
        return 1
    if not quiet:
        text = result.json_text(spec.name) if output == "json" else result.human_text(spec.name)
        sys.stdout.write(text)
    sys.stdout.flush()
    return result.exit_code()
