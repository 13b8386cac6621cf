"""``qcow2aio commit``: ``qemu-img commit [--object OBJ] [--image-opts] [-q] [-f FMT]
[-t CACHE] [-b BASE] [-r RATE] [-d] [-p] FILE``.

``Image committed.`` on success (nothing with ``-q``, which also silences ``-p``);
qemu-img 7.2's messages and exit status 1 otherwise (observed): no file ->
``Expecting one image file name``; the image and its chain opened as qemu-img
opens them (``Could not open ...``); a raw image or one without a backing file ->
``Image does not have a backing file``; ``-b`` not in the chain -> ``Did not find
'BASE' in the backing chain of 'FILE'``. The work is
:func:`qcow2aio.tools.commit.commit_sync`; ``-p`` prints qemu-img's progress records.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..backing import probe_format
from ..errors import Qcow2Error
from ..tools.commit import CommitError, commit_sync
from ..tools.progress import QemuProgress
from .imageopts import could_not_open, image_spec
from .options import (
    HELP,
    IMAGE_OPTS,
    OBJECT,
    CommandLine,
    CommandSpec,
    ParsedArgs,
    UsageError,
    cvtnum,
    parse_args,
    usage_error,
)
from .unlock import chain_passphrases, ensure_readable, open_chain

SPEC = CommandSpec("commit", ":f:ht:b:dpqr:", (HELP, OBJECT, IMAGE_OPTS))
# ParsedArgs, parse_args and usage_error moved to .options (re-exported here).
__all__ = ["SPEC", "ParsedArgs", "cmd_commit", "open_format", "parse_args", "usage_error"]


def open_format(name: str, path: str, fmt: str | None) -> str:
    """The image's format: ``-f`` or probed, after qemu-img's open errors."""
    with could_not_open(name):
        ensure_readable(path)
    try:
        return fmt if fmt is not None else probe_format(path)
    except Qcow2Error as exc:
        raise UsageError(f"Could not open '{name}': {exc}") from None


def cmd_commit(argv: Sequence[str]) -> int:
    """Commit FILE into its backing file (or ``-b BASE``); qemu-img's text and status."""
    cl = CommandLine(SPEC, argv)
    for key, value in cl:
        if key == "r":
            cvtnum("rate limit", value)  # checked as qemu-img does; no rate limit here
    p = cl.parsed
    if len(p.files) != 1:
        raise usage_error("Expecting one image file name")
    quiet = "q" in p.flags
    spec = image_spec(p.files[0], p.values.get("f"), p.image_opts, backing_allowed=True)
    kind = open_format(spec.name, spec.path, spec.fmt)
    if kind == "raw":
        raise UsageError("Image does not have a backing file")
    if kind != "qcow2":
        raise UsageError(f"Could not open '{spec.name}': Unknown driver '{kind}'")
    with could_not_open(spec.name):
        open_chain(spec, p.secrets)
    passphrase, below = chain_passphrases(spec, p.secrets)
    meter = QemuProgress(sys.stdout) if "p" in p.flags and not quiet else None
    try:
        commit_sync(
            os.fspath(spec.path),
            base=p.values.get("b"),
            drop="d" in p.flags,
            progress=meter,
            passphrase=passphrase,
            backing_passphrase=below or None,
        )
    except CommitError as exc:
        if meter is not None:
            sys.stdout.write("\n")
        msg = str(exc).replace(f"chain of '{spec.path}'", f"chain of '{spec.name}'")
        raise UsageError(msg) from None
    if meter is not None:
        meter.finish()
    if not quiet:
        sys.stdout.write("Image committed.\n")
    return 0
