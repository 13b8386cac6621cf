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
from .options import (
    HELP,
    IMAGE_OPTS,
    OBJECT,
    CommandLine,
    CommandSpec,
    CreateOpts,
    LongOpt,
    UsageError,
    split_options,
    usage_error,
)
from .secrets import Secrets
from .unlock import _passphrase, check_encrypt_options, ensure_readable, read_header

SPEC = CommandSpec("amend", ":ho:f:t:pq", (HELP, OBJECT, IMAGE_OPTS, LongOpt("force")))

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


def _parse(argv: Sequence[str]) -> tuple[list[str], list[str], str | None, bool, Secrets]:
    """The ``-o`` options (all of them, joined later), files, format, --image-opts
    and secrets."""
    p = CommandLine(SPEC, argv).parse()
    return p.lists.get("o", []), p.files, p.values.get("f"), p.image_opts, p.secrets


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
        raise usage_error("Must specify options (-o)")
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
