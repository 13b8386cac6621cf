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
from .options import (
    FORCE_SHARE,
    HELP,
    IMAGE_OPTS,
    OBJECT,
    OUTPUT,
    CommandLine,
    CommandSpec,
    CreateOpts,
    LongOpt,
    UsageError,
    cvtnum,
    split_options,
)
from .secrets import SecretError, Secrets
from .snapshot_param import load_snapshot_param

USAGE = (
    "measure [--output=human|json] [--object OBJ] [--image-opts] [-O FMT] [-o OPTIONS] "
    "[-l SNAPSHOT] (--size N | [-f FMT] FILE)"
)
# The one optstring without a leading ":": getopt prints its own message, then
# qemu-img its help (status 0).
SPEC = CommandSpec(
    "measure",
    "hf:O:o:l:U",
    (HELP, IMAGE_OPTS, OBJECT, OUTPUT, LongOpt("size", True), FORCE_SHARE),
)

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
    """The options, with the checks qemu-img makes while reading them (``--output``,
    ``--size``); measure lets getopt print its own errors (see :data:`SPEC`)."""
    opts: dict[str, object] = {"json": False, "size": None}
    cl = CommandLine(SPEC, argv)
    for key, value in cl:
        if key == "output":
            if value not in ("human", "json"):
                raise Exit(error("--output must be used with human or json as argument.", 1))
            opts["json"] = value == "json"
        elif key == "size":
            opts["size"] = cvtnum("image size", value)
    p = cl.parsed
    opts.update(
        fmt=p.values.get("f"),
        out_fmt=p.values.get("O", "raw"),
        options=p.lists.get("o", []),
        snapshot=p.values.get("l"),
        image_opts=cl.image_opts,
    )
    return opts, cl.files, cl.secrets


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
            assert src is not None and isinstance(opts["snapshot"], str)
            try:
                load_snapshot_param(src, opts["snapshot"])
            except UsageError as exc:
                raise Exit(error(str(exc), 1)) from None
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
