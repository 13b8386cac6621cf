"""``qcow2aio measure``: ``qemu-img measure [--output=human|json] [-O FMT] [-o OPTIONS]
[--object ...] [--image-opts] (--size N | [-f FMT] IMG)``.

Same text, order of checks and exit codes as qemu-img 7.2: ``required size: N``,
``fully allocated size: N`` and, for a qcow2 source measured for a v3 qcow2 target,
``bitmaps size: N`` (JSON: ``bitmaps`` first, then ``required`` and
``fully-allocated``, as QEMU prints its dictionary); every error is status 1. The
figures come from :func:`qcow2aio.tools.measure.measure`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..backing import RawImage
from ..errors import Qcow2Error
from ..image import Image
from ..tools.measure import MeasureError, measure
from .compare import Exit, error, open_image
from .create import encryption_kwargs
from .imageopts import image_spec
from .options import INT64_MAX, PROG, CreateOpts, UsageError, parse_size, split_options
from .secrets import SecretError, Secrets

USAGE = (
    "measure [--output=human|json] [--object OBJ] [--image-opts] [-O FMT] [-o OPTIONS] "
    "[-l SNAPSHOT] (--size N | [-f FMT] FILE)"
)
_TRY = f"\nTry '{PROG} --help' for more information"

# Formats QEMU 7.2 knows but cannot measure ("Block driver 'X' does not support size
# measurement"); qcow2aio measures raw and qcow2 (QEMU also luks, refused below).
_NO_MEASURE = frozenset(
    {
        "file", "host_device", "host_cdrom", "vmdk", "vdi", "vpc", "vhdx", "qed", "qcow",
        "parallels", "bochs", "cloop", "dmg", "vvfat", "blkdebug", "blkverify", "null-co",
        "null-aio", "throttle", "copy-on-read", "compress", "preallocate", "snapshot-access",
        "copy-before-write", "quorum", "replication", "nbd", "ssh", "http", "https", "ftp",
        "ftps", "iscsi", "nfs", "rbd", "gluster",
    }
)  # fmt: skip
_RAW_OPTIONS = ("size", "preallocation", "nocow", "extent_size_hint")


def cmd_measure(argv: Sequence[str]) -> int:
    """Measure; print qemu-img's text; return its exit status."""
    try:
        return _run(argv)
    except Exit as exc:
        return exc.code


def _parse(argv: Sequence[str]) -> tuple[dict[str, object], list[str], Secrets]:
    """getopt ``:hf:O:o:l:U`` with --object, --image-opts, --output, --size."""
    opts: dict[str, object] = {
        "fmt": None,
        "out_fmt": "raw",
        "options": [],
        "snapshot": None,
        "image_opts": False,
        "json": False,
        "size": None,
    }
    secrets = Secrets()
    files: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            files.extend(args[i:])
            break
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            takes = name in ("--object", "--output", "--size")
            if takes and not eq:
                if i >= len(args):
                    raise UsageError(f"option '{name}' requires an argument{_TRY}")
                value, i = args[i], i + 1
            if name == "--object":
                secrets.add_object(value)
            elif name == "--output":
                if value not in ("human", "json"):
                    raise Exit(error("--output must be used with human or json as argument.", 1))
                opts["json"] = value == "json"
            elif name == "--size":
                opts["size"] = _size(value)
            elif name == "--image-opts" and not eq:
                opts["image_opts"] = True
            elif name == "--force-share" and not eq:
                pass
            else:
                raise UsageError(f"unrecognized option '{a}'{_TRY}")
            continue
        if not a.startswith("-") or a == "-":
            files.append(a)
            continue
        j = 1
        while j < len(a):
            c = a[j]
            j += 1
            if c in "fOol":
                if j < len(a):
                    value, j = a[j:], len(a)
                elif i < len(args):
                    value, i = args[i], i + 1
                else:
                    raise UsageError(f"missing argument for option '-{c}'{_TRY}")
                if c == "f":
                    opts["fmt"] = value
                elif c == "O":
                    opts["out_fmt"] = value
                elif c == "o":
                    options = opts["options"]
                    assert isinstance(options, list)
                    options.append(value)
                else:
                    opts["snapshot"] = value
            elif c == "U":
                pass
            else:
                raise UsageError(f"unrecognized option '{a}'{_TRY}")
    return opts, files, secrets


def _size(text: str) -> int:
    """``cvtnum("image size", ...)``: qemu-img's two messages."""
    try:
        value = parse_size(text)
    except ValueError:
        error("Invalid image size specified. You may use k, M, G, T, P or E suffixes for", 1)
        raise Exit(
            error("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.", 1)
        ) from None
    if value > INT64_MAX:
        raise Exit(error(f"Invalid image size specified. Must be between 0 and {INT64_MAX}.", 1))
    return value


def _run(argv: Sequence[str]) -> int:
    opts, files, secrets = _parse(argv)
    if len(files) > 1:
        raise Exit(error("At most one filename argument is allowed.", 1))
    filename = files[0] if files else None
    fmt = opts["fmt"]
    assert fmt is None or isinstance(fmt, str)
    size = opts["size"]
    assert size is None or isinstance(size, int)
    if filename is None and (opts["image_opts"] or fmt is not None or opts["snapshot"]):
        raise Exit(error("--image-opts, -f, and -l require a filename argument.", 1))
    if filename is not None and size is not None:
        raise Exit(error("--size N cannot be used together with a filename.", 1))
    if filename is None and size is None:
        raise Exit(error("Either --size N or one filename must be specified.", 1))
    src: Image | RawImage | None = None
    if filename is not None:
        try:
            spec = image_spec(filename, fmt, bool(opts["image_opts"]), backing_allowed=True)
        except UsageError as exc:
            raise Exit(error(str(exc), 1)) from None
        src = open_image(spec, secrets, 1)
    try:
        if opts["snapshot"] is not None:
            raise Exit(
                error("Failed to load snapshot: measuring a snapshot (-l) is not supported", 1)
            )
        out_fmt = str(opts["out_fmt"])
        options = _target_options(out_fmt, opts["options"], secrets)
        try:
            info = measure(size=size, source=src, target_format=out_fmt, options=options)
        except MeasureError as exc:
            raise Exit(error(exc.qemu, 1)) from None
        except Qcow2Error as exc:
            raise Exit(error(str(exc), 1)) from None
    finally:
        if src is not None:
            src.close()
    if opts["json"]:
        lines = [
            f'    "{k}": {info[k]}' for k in ("bitmaps", "required", "fully-allocated") if k in info
        ]
        text = "{\n" + ",\n".join(lines) + "\n}\n"
    else:
        text = (
            f"required size: {info['required']}\nfully allocated size: {info['fully-allocated']}\n"
        )
        if "bitmaps" in info:
            text += f"bitmaps size: {info['bitmaps']}\n"
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0


def _target_options(out_fmt: str, texts: object, secrets: Secrets) -> dict[str, object]:
    """The ``-o`` options, parsed against the target format's creation options, as
    :func:`qcow2aio.tools.measure.measure` takes them (QEMU's messages on failure)."""
    if out_fmt in _NO_MEASURE:
        raise Exit(error(f"Block driver '{out_fmt}' does not support size measurement", 1))
    if out_fmt not in ("raw", "qcow2"):
        if out_fmt == "luks":
            raise Exit(error("qcow2aio measures raw and qcow2 targets only, not luks", 1))
        raise Exit(error(f"Unknown file format '{out_fmt}'", 1))
    assert isinstance(texts, list)
    parsed = CreateOpts()
    try:
        for text in texts:
            for name, value in split_options(str(text)):
                if out_fmt == "raw" and name not in _RAW_OPTIONS:
                    raise UsageError(f"Invalid parameter '{name}'")
                parsed.set(name, value)
    except UsageError as exc:
        error(str(exc), 1)
        raise Exit(error(f"Invalid options for file format '{out_fmt}'", 1)) from None
    options: dict[str, object] = dict(parsed.value)
    if out_fmt == "qcow2":
        # The raw text of the options the qcow2 driver reads as strings.
        for name in ("compat", "preallocation", "backing_file"):
            if name in parsed.raw:
                options[name] = parsed.raw[name]
        if parsed.raw.get("encrypt.format") == "luks":
            _luks_checks(parsed, secrets)
    return options


def _luks_checks(parsed: CreateOpts, secrets: Secrets) -> None:
    """What QEMU's LUKS option visit refuses before it can size the LUKS area: enum
    values, then a missing or unknown secret (measure needs no passphrase, QEMU does)."""
    try:
        encryption_kwargs(parsed)
    except UsageError as exc:
        raise Exit(error(str(exc), 1)) from None
    secret_id = parsed.raw.get("encrypt.key-secret")
    if secret_id is None:
        raise Exit(error("Parameter 'encrypt.key-secret' is required for cipher", 1))
    try:
        secrets.passphrase(secret_id)
    except SecretError as exc:
        raise Exit(error(str(exc), 1)) from None
