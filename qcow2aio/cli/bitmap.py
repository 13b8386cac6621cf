"""``qcow2aio bitmap``: ``qemu-img bitmap (--merge SOURCE | --add | --remove | --clear |
--enable | --disable)... [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY]
[--object OBJ] [--image-opts | -f FMT] FILE BITMAP``.

Parsing and printing only; the work is :func:`qcow2aio.tools.bitmap.bitmap_sync`.
qemu-img 7.2's checks, in its order, and its messages (observed): actions run in
command-line order and stop at the first failure (``Operation OP on bitmap NAME
failed: REASON``, exit 1); ``-g`` is a size (suffixes allowed), 0 meaning "not
given", and is passed on as QEMU's 32-bit value; nothing is printed on success.
Where qemu-img names its block node (``#blockNNN``, an internal counter), the
file name is printed instead.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..backing import probe_format
from ..errors import Qcow2Error
from ..tools.bitmap import Action, BitmapActionError, bitmap_sync
from .imageopts import could_not_open, image_spec
from .options import INT64_MAX, PROG, UsageError, parse_size, take_value
from .secrets import Secrets
from .unlock import _passphrase, check_encrypt_options, ensure_readable, read_header

_TRY = f"\nTry '{PROG} --help' for more information"
_HELP = (
    "bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... "
    "[-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] "
    "[--image-opts | -f fmt] filename bitmap"
)
_FLAG_ACTIONS = {
    "--add": "add",
    "--remove": "remove",
    "--clear": "clear",
    "--enable": "enable",
    "--disable": "disable",
}
_LONG_WITH_ARG = {
    "--merge": "merge",
    "--granularity": "g",
    "--source-file": "b",
    "--source-format": "F",
    "--object": "object",
}
_RAW_WARNING = (
    "WARNING: Image format was not specified for '{0}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write "
    "operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n"
)


class _Args:
    def __init__(self) -> None:
        self.actions: list[Action] = []
        self.values: dict[str, str] = {}
        self.files: list[str] = []
        self.image_opts = False
        self.secrets = Secrets()


def _usage(msg: str) -> UsageError:
    return UsageError(msg + _TRY)


def _parse(argv: Sequence[str]) -> _Args:
    """getopt_long(":b:f:F:g:h", ...), permuting; the last of a repeated option wins."""
    out = _Args()
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            out.files += args[i + 1 :]
            break
        if a.startswith("--"):
            key = a.split("=", 1)[0]
            if key in _LONG_WITH_ARG:
                if "=" not in a and i + 1 >= len(args):
                    raise _usage(f"missing argument for option '{a}'")
                value, i = take_value(args, i, key)
                what = _LONG_WITH_ARG[key]
                if what == "object":
                    out.secrets.add_object(value)
                elif what == "merge":
                    out.actions.append(Action("merge", value))
                else:
                    out.values[what] = value
                continue
            if a in _FLAG_ACTIONS:
                out.actions.append(Action(_FLAG_ACTIONS[a]))
            elif a == "--image-opts":
                out.image_opts = True
            elif a == "--help":
                raise _usage(_HELP)
            else:
                raise _usage(f"unrecognized option '{a}'")
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
            if ch in "bfFg":
                if j + 1 < len(a):
                    out.values[ch] = a[j + 1 :]
                elif i < len(args):
                    out.values[ch] = args[i]
                    i += 1
                else:
                    raise _usage(f"missing argument for option '{a}'")
                break
            if ch == "h":
                raise _usage(_HELP)
            raise _usage(f"unrecognized option '{a}'")
    return out


def _granularity(text: str) -> int:
    """cvtnum("granularity", ...): a size, at most INT64_MAX."""
    try:
        value = parse_size(text)
    except ValueError:
        raise UsageError(
            "Invalid granularity specified. You may use k, M, G, T, P or E suffixes for\n"
            f"{PROG}: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        ) from None
    if value > INT64_MAX:
        raise UsageError(f"Invalid granularity specified. Must be between 0 and {INT64_MAX}.")
    return value


def cmd_bitmap(argv: Sequence[str]) -> int:
    """Run the actions on one bitmap; qemu-img's messages and exit status."""
    p = _parse(argv)
    granularity = _granularity(p.values["g"]) if "g" in p.values else 0
    ops = {a.op for a in p.actions}
    if not p.actions:
        raise UsageError(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"
        )
    if granularity and "add" not in ops:
        raise UsageError("granularity only supported with --add")
    if "F" in p.values and "b" not in p.values:
        raise UsageError("-F only supported with -b")
    if "b" in p.values and "merge" not in ops:
        raise UsageError("Merge bitmap source file only supported with --merge")
    if len(p.files) != 2:
        raise UsageError("Expecting filename and bitmap name")
    filename, name = p.files
    spec = image_spec(filename, p.values.get("f"), p.image_opts, backing_allowed=False)
    fmt = _format(spec.name, spec.path, spec.fmt)
    passphrase = None
    if fmt == "qcow2":
        with could_not_open(spec.name):
            hdr = read_header(spec.path)
            check_encrypt_options(spec.level(0), hdr.crypt_method)
            if hdr.crypt_method:
                passphrase = _passphrase(spec.level(0), p.secrets)
    source = p.values.get("b")
    source_fmt = None
    if source is not None:
        source_fmt = _format(source, source, p.values.get("F"))
    try:
        bitmap_sync(
            spec.path,
            name,
            p.actions,
            # QEMU passes the granularity as a 32-bit value; 0 means "not given".
            granularity=(granularity & 0xFFFFFFFF) if granularity else None,
            source=source,
            source_format=source_fmt,
            image_format=fmt,
            passphrase=passphrase,
        )
    except BitmapActionError as exc:
        raise UsageError(str(exc).replace(f"'{spec.path}'", f"'{spec.name}'")) from None
    except Qcow2Error as exc:
        raise UsageError(f"Could not open '{spec.name}': {exc}") from None
    return 0


def _format(name: str, path: str, fmt: str | None) -> str:
    """The format as qemu-img's open finds it: ``-f``, or probed (a raw guess warns)."""
    with could_not_open(name):
        ensure_readable(path)
    if fmt is not None:
        if fmt not in ("qcow2", "raw"):
            raise UsageError(f"Could not open '{name}': Unknown driver '{fmt}'")
        return fmt
    try:
        found = probe_format(path)
    except Qcow2Error as exc:
        raise UsageError(f"Could not open '{name}': {exc}") from None
    if found == "raw":
        sys.stderr.write(_RAW_WARNING.format(name))
    return found
