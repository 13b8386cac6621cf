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
from .options import PROG, UsageError, take_value
from .secrets import Secrets
from .unlock import chain_passphrases, ensure_readable, open_chain

_TRY = f"\nTry '{PROG} --help' for more information"


def usage_error(msg: str) -> UsageError:
    """A usage error as qemu-img words it (with the ``--help`` hint line)."""
    return UsageError(msg + _TRY)


class ParsedArgs:
    """Options of a qemu-img command line, as ``getopt_long`` sees them (permuted)."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.flags: set[str] = set()
        self.files: list[str] = []
        self.image_opts = False
        self.secrets = Secrets()


def parse_args(argv: Sequence[str], with_arg: str, flags: str, help_text: str) -> ParsedArgs:
    """``getopt_long`` over ``argv``: short options taking a value (``with_arg``) or
    not (``flags``), ``--object`` and ``--image-opts``; the last value of an option
    repeated wins, as in qemu-img."""
    out = ParsedArgs()
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            out.files += args[i + 1 :]
            break
        if a.startswith("--"):
            if a == "--object" or a.startswith("--object="):
                text, i = take_value(args, i, "--object")
                out.secrets.add_object(text)
                continue
            if a == "--image-opts":
                out.image_opts = True
            elif a == "--help":
                raise usage_error(help_text)
            else:
                raise usage_error(f"unrecognized option '{a}'")
            i += 1
            continue
        if not a.startswith("-") or a == "-":
            out.files.append(a)
            i += 1
            continue
        j = 1
        i += 1
        while j < len(a):
            ch = a[j]
            if ch in with_arg:
                if j + 1 < len(a):
                    value = a[j + 1 :]
                elif i < len(args):
                    value = args[i]
                    i += 1
                else:
                    raise usage_error(f"option requires an argument -- '{ch}'")
                out.values[ch] = value
                break
            if ch not in flags:
                raise usage_error(f"invalid option -- '{ch}'")
            if ch == "h":
                raise usage_error(help_text)
            out.flags.add(ch)
            j += 1
    return out


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
    p = parse_args(argv, "fbtr", "hdpqU", "commit [-b BASE] [-d] [-p] [-f FMT] FILE")
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
