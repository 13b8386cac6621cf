"""``qcow2aio rebase``: ``qemu-img rebase [--object OBJ] [--image-opts] [-U] [-q]
[-f FMT] [-t CACHE] [-T SRC_CACHE] [-p] [-u] -b BACKING [-F BFMT] FILE``.

Silent on success (``-p`` prints qemu-img's progress records unless ``-q``);
qemu-img 7.2's messages and exit status 1 otherwise (observed): no ``-b`` without
``-u`` -> ``Must specify backing file (-b) or use unsafe mode (-u)``; not one file
-> ``Expecting one image file name``; the image opened (in safe mode with its old
backing chain: ``Could not open 'FILE': Could not open backing file: ...``); the new
backing file opened relative to the image's folder (``Could not open new backing
file 'NAME': ...``); a new backing file without ``-F`` is refused when the header
is to be changed (``Could not change the backing file to 'NAME': backing format must
be specified``), in safe mode after the copy, as qemu-img does. The work is
:func:`qcow2aio.tools.rebase.rebase_sync`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..backing import RAW_FORMATS, resolve_name
from ..errors import Qcow2Error
from ..tools.progress import QemuProgress
from ..tools.rebase import RebaseError, rebase_sync
from .commit import open_format
from .imageopts import OpenError, could_not_open, image_spec
from .options import (
    FORCE_SHARE,
    HELP,
    IMAGE_OPTS,
    OBJECT,
    CommandLine,
    CommandSpec,
    UsageError,
    usage_error,
)
from .unlock import chain_passphrases, ensure_readable, open_chain

SPEC = CommandSpec("rebase", ":hf:F:b:upt:T:qU", (HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE))


def cmd_rebase(argv: Sequence[str]) -> int:
    """Rebase FILE onto ``-b BACKING``; qemu-img's text and status."""
    p = CommandLine(SPEC, argv).parse()
    backing = p.values.get("b")
    unsafe = "u" in p.flags
    if len(p.files) != 1:
        raise usage_error("Expecting one image file name")
    if backing is None and not unsafe:
        raise usage_error("Must specify backing file (-b) or use unsafe mode (-u)")
    quiet = "q" in p.flags
    bfmt = p.values.get("F")
    spec = image_spec(p.files[0], p.values.get("f"), p.image_opts, backing_allowed=True)
    kind = open_format(spec.name, spec.path, spec.fmt)
    name = backing or None
    if kind in RAW_FORMATS:
        raise UsageError(
            f"Could not change the backing file to '{backing or ''}': Operation not supported"
        )
    if kind != "qcow2":
        raise UsageError(f"Could not open '{spec.name}': Unknown driver '{kind}'")
    if not unsafe:
        with could_not_open(spec.name):
            open_chain(spec, p.secrets)
    passphrase, below = chain_passphrases(spec, p.secrets)
    if name is not None and not unsafe:
        # qemu-img opens the new backing file before any copy (its folder: the image's).
        # qemu-img names it as the image's folder + the name (path_combine).
        shown = name if os.path.isabs(name) else os.path.join(os.path.dirname(spec.path), name)
        try:
            resolve_name(name, spec.path)
            ensure_readable(shown)
            if bfmt is not None and bfmt not in RAW_FORMATS and bfmt != "qcow2":
                raise Qcow2Error(f"Unknown driver '{bfmt}'")
        except (Qcow2Error, OpenError) as exc:
            raise UsageError(f"Could not open new backing file '{name}': {exc}") from None
    meter = QemuProgress(sys.stdout) if "p" in p.flags and not quiet else None
    try:
        rebase_sync(
            os.fspath(spec.path),
            name,
            backing_format=bfmt,
            unsafe=unsafe,
            progress=meter,
            passphrase=passphrase,
            backing_passphrase=below or None,
        )
    except RebaseError as exc:
        if meter is not None:
            sys.stdout.write("\n")
        raise UsageError(str(exc)) from None
    if meter is not None:
        sys.stdout.write("\n")
    return 0
