"""``qcow2aio amend``: ``qemu-img amend [--object OBJ] [--image-opts] [-p] [-q] [-f FMT]
[-t CACHE] [--force] -o OPTIONS FILE``.

Silent on success; qemu-img 7.2's messages and exit status 1 otherwise, in its
order (observed): no ``-o`` -> ``Must specify options (-o)``; not exactly one file;
the image opened (missing file, ``-f raw`` -> no amendment); ``-o help`` lists the
qcow2 amend options; then option names and values (``Invalid parameter``, with
QEMU's second line for creation-only ones) and the refusals of
:mod:`qcow2aio.amend`. The work is :meth:`qcow2aio.Image.amend_sync`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..amend import AMEND_OPTIONS, AmendError, _invalid
from ..backing import probe_format
from ..image import Image
from .imageopts import could_not_open, image_spec
from .options import PROG, CreateOpts, UsageError, split_options, take_value
from .secrets import Secrets
from .unlock import _passphrase, check_encrypt_options, ensure_readable, read_header

_TRY = f"\nTry '{PROG} --help' for more information"
_SHORT_WITH_ARG = "oft"
_SHORT_FLAGS = "hpqU"

AMEND_HELP = """Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
"""


def _usage(msg: str) -> UsageError:
    return UsageError(msg + _TRY)


def _parse(argv: Sequence[str]) -> tuple[list[str], list[str], str | None, bool, Secrets]:
    """getopt_long("ho:f:t:pqU", object, image-opts, force), permuting."""
    options: list[str] = []
    files: list[str] = []
    fmt: str | None = None
    image_opts = False
    secrets = Secrets()
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            files += args[i + 1 :]
            break
        if a.startswith("--"):
            if a == "--object" or a.startswith("--object="):
                text, i = take_value(args, i, "--object")
                secrets.add_object(text)
                continue
            if a == "--image-opts":
                image_opts = True
            elif a == "--help":
                raise _usage("amend [-f FMT] -o OPTIONS FILE")
            elif a != "--force":
                raise _usage(f"unrecognized option '{a}'")
            i += 1
            continue
        if not a.startswith("-") or a == "-":
            files.append(a)
            i += 1
            continue
        j = 1
        i += 1
        while j < len(a):
            ch = a[j]
            if ch in _SHORT_WITH_ARG:
                if j + 1 < len(a):
                    value = a[j + 1 :]
                elif i < len(args):
                    value = args[i]
                    i += 1
                else:
                    raise _usage(f"option requires an argument -- '{ch}'")
                if ch == "o":
                    options.append(value)
                elif ch == "f":
                    fmt = value
                break
            if ch not in _SHORT_FLAGS:
                raise _usage(f"unrecognized option '-{ch}'")
            if ch == "h":
                raise _usage("amend [-f FMT] -o OPTIONS FILE")
            j += 1
    return options, files, fmt, image_opts, secrets


def amend_options(text: str) -> dict[str, object]:
    """``-o`` text -> typed options for :meth:`Image.amend` (QEMU's parse errors)."""
    typed = CreateOpts()
    out: dict[str, object] = {}
    for name, value in split_options(text):
        if name not in AMEND_OPTIONS:
            raise _invalid(name)
        if name in ("compat", "data_file", "backing_file", "backing_fmt") or name.startswith(
            "encrypt."
        ):
            out[name] = value
            continue
        typed.set(name, value)
        out[name] = typed.get(name)
    return out


def cmd_amend(argv: Sequence[str]) -> int:
    """Amend the image's format options; qemu-img's messages and exit status."""
    options, files, fmt, image_opts, secrets = _parse(argv)
    if not options:
        raise _usage("Must specify options (-o)")
    if len(files) != 1:
        raise UsageError("Expecting one image file name")
    text = ",".join(options)
    if not text:
        raise UsageError("Invalid option list: ")
    spec = image_spec(files[0], fmt, image_opts, backing_allowed=False)
    with could_not_open(spec.name):
        ensure_readable(spec.path)
    kind = spec.fmt if spec.fmt is not None else probe_format(spec.path)
    if kind == "raw":
        raise UsageError("Format driver 'raw' does not support option amendment")
    if kind != "qcow2":
        raise UsageError(f"Unknown driver '{kind}'")
    with could_not_open(spec.name):
        hdr = read_header(spec.path)
        check_encrypt_options(spec.level(0), hdr.crypt_method)
        passphrase = _passphrase(spec.level(0), secrets) if hdr.crypt_method else None
    if any(name == "help" for name, _ in split_options(text)):
        sys.stdout.write(AMEND_HELP)
        return 0
    opts = amend_options(text)
    with Image(os.fspath(spec.path), "r+", passphrase=passphrase) as img:
        try:
            img.amend_sync(**opts)
        except AmendError as exc:
            raise UsageError(str(exc)) from None
    return 0
