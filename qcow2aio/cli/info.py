"""``qcow2aio info``: the text ``qemu-img info`` prints, human or JSON, chain or not.

Like qemu-img, info opens images without doing I/O on guest data, so an
encrypted image needs no secret: ``--object`` and ``encrypt.key-secret`` are
accepted (and checked for syntax) but never looked up. With ``--image-opts``
the top image is reported under QEMU's ``bs->filename`` for those options.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..backing import RAW_FORMATS, RawImage, probe_format
from ..errors import Qcow2FormatError, Qcow2UnsupportedError
from ..image import Image
from ..info import format_human, format_json, full_backing_filename, image_info, raw_image_info
from .imageopts import ImageSpec, could_not_open, image_spec
from .options import (
    FORCE_SHARE,
    HELP,
    IMAGE_OPTS,
    OBJECT,
    OUTPUT,
    CommandLine,
    CommandSpec,
    LongOpt,
    UsageError,
    usage_error,
)
from .unlock import check_encrypt_options, ensure_readable

SPEC = CommandSpec(
    "info",
    ":f:hU",
    (
        HELP,
        LongOpt("format", True, "f"),
        OUTPUT,
        LongOpt("backing-chain"),
        OBJECT,
        IMAGE_OPTS,
        FORCE_SHARE,
    ),
)


def _chain_infos(spec: ImageSpec, chain: bool) -> list[dict[str, object]]:
    """The info of the image (and with ``chain`` of its backing files), QEMU's order."""
    infos: list[dict[str, object]] = []
    seen: set[str] = set()
    path, fmt = spec.path, spec.fmt
    while True:
        real = os.path.realpath(path)
        if real in seen:
            raise Qcow2FormatError(f"Backing file '{path}' creates an infinite loop.")
        seen.add(real)
        ensure_readable(path)
        kind = fmt if fmt is not None else probe_format(path)
        if kind in RAW_FORMATS:
            raw = RawImage(path)
            try:
                infos.append(raw_image_info(raw, path if infos else spec.filename))
            finally:
                raw.close()
            return infos
        if kind != "qcow2":
            raise Qcow2UnsupportedError(f"Unsupported image format: {kind}")
        with Image(path, "r", open_backing=False, metadata_only=True) as img:
            hdr = img.meta.header
            if not infos:
                check_encrypt_options(spec.level(0), hdr.crypt_method)
            info = image_info(img)
        if not infos:
            info["filename"] = spec.filename
        infos.append(info)
        if not chain or not hdr.backing_file:
            return infos
        path = full_backing_filename(path, hdr.backing_file)
        fmt = hdr.backing_format or None


def cmd_info(argv: Sequence[str]) -> int:
    """``info [--object OBJ] [--image-opts] [-f FMT] [--output=human|json] [--backing-chain]
    [-U] FILE``."""
    output = "human"
    chain = False
    fmt: str | None = None
    cl = CommandLine(SPEC, argv)
    for key, value in cl:
        if key == "output":
            output = value
        elif key == "backing-chain":
            chain = True
        elif key == "f":
            fmt = value
    files = cl.files
    if len(files) != 1:
        raise usage_error("Expecting one image file name")
    if output not in ("human", "json"):
        raise UsageError("--output must be used with human or json as argument.")
    spec = image_spec(files[0], fmt, cl.image_opts, backing_allowed=False)
    with could_not_open(spec.name):
        infos = _chain_infos(spec, chain)
    if output == "json":
        text = format_json(infos if chain else infos[0]) + "\n"
    else:
        text = "\n".join(format_human(info) for info in infos)
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0
