"""``qcow2aio convert``: ``qemu-img convert`` with its options, messages and exit codes.

Only arguments and printing live here; the copy is :func:`qcow2aio.tools.convert.convert`.
Checks come in qemu-img 7.2's order (observed): argument errors while parsing (``-m``,
``-S``), then the file names, ``-n`` with ``-o``, the sources' opens (``Could not open
'SRC': ...``), the output format, ``-c`` and ``-B`` against it, then the target's
creation, whose errors are prefixed ``DST: error while converting qcow2:``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from ..backing import RAW_FORMATS, RawImage, probe_format
from ..errors import Qcow2Error
from ..image import Image
from ..tools.convert import MAX_MIN_SPARSE, convert
from ..tools.progress import QemuProgress
from .create import create_kwargs, qapi_visit
from .imageopts import ImageSpec, OpenError, could_not_open, image_spec, parse_image_opts
from .options import (
    FORCE_SHARE,
    HELP,
    IMAGE_OPTS,
    OBJECT,
    CommandLine,
    CommandSpec,
    CreateOpts,
    LongOpt,
    UsageError,
    cvtnum,
    split_options,
)
from .secrets import SecretError
from .snapshot_param import load_snapshot_param
from .unlock import chain_passphrases, ensure_readable, open_chain

_SPARSE_SIZE = (
    "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up "
    "to 16777216. Select 0 to disable sparse detection (fully allocates output)."
)
SPEC = CommandSpec(
    "convert",
    ":hf:O:B:Cco:l:S:pt:T:qnm:WUr:F:",
    (
        HELP,
        OBJECT,
        IMAGE_OPTS,
        LongOpt("target-image-opts"),
        LongOpt("salvage"),
        LongOpt("target-is-zero"),
        LongOpt("bitmaps"),
        LongOpt("skip-broken-bitmaps"),
        FORCE_SHARE,
    ),
)
_COROUTINES = "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"


def create_kwargs_from_text(text: str) -> dict[str, Any]:
    """``qcow2aio.create`` keywords for an ``-o`` string (QEMU's syntax and checks)."""
    opts = CreateOpts()
    for name, value in split_options(text):
        opts.set(name, value)
    return _kwargs(opts)


def _kwargs(opts: CreateOpts) -> dict[str, Any]:
    kwargs = create_kwargs(opts)
    kwargs.update(qapi_visit(opts))
    for name in ("backing_file", "backing_fmt"):
        value = opts.get(name)
        if isinstance(value, str):
            kwargs[name] = value
    return kwargs


def cmd_convert(argv: Sequence[str]) -> int:
    """``convert [-f FMT] [-O FMT] [-c] [-o OPTS] [-B BACKING [-F BFMT]] [-S SIZE] [-m N]
    [-W] [-n] [-p] [-q] [--object OBJ] [--image-opts] [--target-image-opts] SRC... DST``."""
    min_sparse = 4096
    parallel = 8
    cl = CommandLine(SPEC, argv)
    for key, value in cl:
        if key == "S":
            min_sparse = cvtnum("buffer size for sparse output", value)
            if min_sparse % 512 or min_sparse > MAX_MIN_SPARSE:
                raise UsageError(_SPARSE_SIZE)
        elif key == "m":
            try:
                parallel = int(value, 0)
            except ValueError:
                parallel = 0
            if not 1 <= parallel <= 16:
                raise UsageError(_COROUTINES)
        elif key in ("r", "target-is-zero", "bitmaps", "skip-broken-bitmaps"):
            flag = f"-{key}" if len(key) == 1 else f"--{key}"
            raise UsageError(f"convert: option {flag} is not supported")
    p = cl.parsed
    fmt, out_fmt, backing, backing_fmt = (p.values.get(k) for k in "fOBF")
    options = p.lists.get("o", [])
    compress, unordered, skip_create = cl.flag("c"), cl.flag("W"), cl.flag("n")
    progress, quiet = cl.flag("p"), cl.flag("q")
    target_image_opts = cl.flag("target-image-opts")
    secrets, positional = cl.secrets, cl.files
    image_opts = cl.image_opts
    if quiet:
        progress = False
    if len(positional) < 2:
        raise UsageError("Must specify image file name")
    if skip_create and options:
        raise UsageError("-o has no effect when skipping image creation")
    if target_image_opts and not skip_create:
        raise UsageError("--target-image-opts requires use of -n flag")
    *srcs, dst = positional
    out_fmt = out_fmt or "raw"
    snapshot_param = p.values.get("l")
    if snapshot_param is not None and len(srcs) > 1:
        raise UsageError("No support for concatenating multiple snapshot")

    # The sources: opened (and their secrets looked up) as qemu-img opens them.
    specs: list[ImageSpec] = []
    for name in srcs:
        spec = image_spec(name, fmt, image_opts, backing_allowed=True)
        kind = spec.fmt
        if kind is not None and kind != "qcow2" and kind not in RAW_FORMATS:
            raise UsageError(f"Could not open '{name}': Unknown driver '{kind}'")
        with could_not_open(spec.name):
            open_chain(spec, secrets)
        specs.append(spec)
    passes = [chain_passphrases(spec, secrets) for spec in specs]
    sources: list[str | Image | RawImage] = [spec.path for spec in specs]
    if snapshot_param is not None:  # -l: the one source, open read-only, shows it
        sources = [_snapshot_source(specs[0], passes[0], snapshot_param)]

    if out_fmt != "qcow2" and out_fmt not in RAW_FORMATS:
        raise UsageError(f"Unknown file format '{out_fmt}'")
    target_path = dst
    target_pass: bytes | None = None
    create_opts: dict[str, Any] | None = None
    if target_image_opts:
        with could_not_open(dst):
            tspec = parse_image_opts(dst, backing_allowed=False)
        target_path = tspec.path
        out_fmt = tspec.fmt or out_fmt
        if tspec.levels[0].key_secret:
            target_pass = secrets.passphrase(tspec.levels[0].key_secret)
    elif not skip_create:
        copts = CreateOpts()
        if options:
            for name, value in split_options(",".join(options)):
                if out_fmt != "qcow2" and name not in ("size", "preallocation"):
                    raise UsageError(f"Invalid parameter '{name}'")
                copts.set(name, value)
        if compress and out_fmt != "qcow2":
            raise UsageError("Compression not supported for this file format")
        if backing is not None and out_fmt != "qcow2":
            raise UsageError(f"Backing file not supported for file format '{out_fmt}'")
        if backing is not None and backing_fmt is None:
            raise UsageError("Use of backing file requires explicit backing format")
        if out_fmt == "qcow2":
            if backing is not None:
                copts.set("backing_file", backing)
                copts.set("backing_fmt", backing_fmt or "")
            elif backing_fmt is not None and copts.get("backing_file") is None:
                raise UsageError(
                    f"{dst}: error while converting qcow2: "
                    "Backing format cannot be used without backing file"
                )
            try:
                create_opts = _kwargs(copts)
            except UsageError as exc:
                raise UsageError(f"{dst}: error while converting qcow2: {exc}") from None
            secret_id = copts.raw.get("encrypt.key-secret")
            if secret_id is not None:
                try:
                    target_pass = secrets.passphrase(secret_id)
                except SecretError as exc:
                    raise UsageError(f"{dst}: error while converting qcow2: {exc}") from None
        else:
            create_opts = {k: v for k, v in copts.raw.items() if k == "preallocation"}
    elif compress and out_fmt != "qcow2":
        raise UsageError("Compression not supported for this file format")

    if skip_create:
        with could_not_open(target_path):
            ensure_readable(target_path)
    meter = QemuProgress(sys.stdout) if progress else None
    try:
        asyncio.run(
            convert(
                sources,
                target_path,
                source_format=[spec.fmt for spec in specs],
                target_format="qcow2" if out_fmt == "qcow2" else "raw",
                compress=compress,
                options=create_opts or None,
                backing=None,  # already in create_opts (-B is a create option)
                backing_format=None,
                min_sparse=min_sparse,
                parallel=parallel,
                unordered=unordered,
                target_exists=skip_create,
                source_passphrase=[p for p, _ in passes],
                source_backing_passphrase=[b or None for _, b in passes],
                target_passphrase=target_pass,
                progress=meter,
            )
        )
    except OpenError as exc:
        raise UsageError(f"Could not open '{dst}': {exc}") from None
    except Qcow2Error:
        if meter is not None:
            sys.stdout.write("\n")
        raise
    finally:
        for src in sources:
            if not isinstance(src, str):
                src.close()
    if meter is not None:
        meter.finish()
    return 0


def _snapshot_source(
    spec: ImageSpec, passes: tuple[bytes | None, list[bytes | None]], param: str
) -> Image | RawImage:
    """The source of ``convert -l``: opened read-only, the snapshot loaded."""
    kind = spec.fmt or probe_format(spec.path)
    src: Image | RawImage
    with could_not_open(spec.name):
        if kind in RAW_FORMATS:
            src = RawImage(spec.path)
        else:
            src = Image(spec.path, "r", passphrase=passes[0], backing_passphrase=passes[1] or None)
    try:
        load_snapshot_param(src, param)
    except BaseException:
        src.close()
        raise
    return src
