"""``qcow2aio create``: ``qemu-img create -f qcow2`` with the same options and output."""

from __future__ import annotations

from collections.abc import Sequence

from ..backing import probe_format, resolve_name
from ..create import backing_size, create
from ..errors import Qcow2FormatError, Qcow2UnsupportedError
from .options import (
    INT64_MAX,
    CreateOpts,
    UsageError,
    opt_int,
    opt_str,
    parse_size,
    split_options,
    take_value,
)


def cmd_create(argv: Sequence[str]) -> int:
    """``create [-q] [-f qcow2] [-b BACKING [-F FMT]] [-o OPTS] FILE [SIZE]``."""
    fmt = "raw"
    options: list[str] = []
    backing: str | None = None
    backing_fmt: str | None = None
    quiet = False
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            positional.extend(argv[i + 1 :])
            break
        if arg.startswith("-f"):
            fmt, i = take_value(argv, i, "-f")
        elif arg.startswith("-o"):
            opt, i = take_value(argv, i, "-o")
            options.append(opt)
        elif arg.startswith("-b"):
            backing, i = take_value(argv, i, "-b")
        elif arg.startswith("-F"):
            backing_fmt, i = take_value(argv, i, "-F")
        elif arg == "-q":
            quiet = True
            i += 1
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"invalid option -- '{arg.lstrip('-')}'")
        else:
            positional.append(arg)
            i += 1
    if fmt != "qcow2":
        raise Qcow2UnsupportedError(f"Unsupported format: -f {fmt} (only qcow2 is supported)")
    if not positional:
        raise UsageError("Expecting image file name")
    if len(positional) > 2:
        raise UsageError(f"Unexpected argument: {positional[2]}")
    filename = positional[0]
    size: int | None = None
    if len(positional) == 2:
        try:
            size = parse_size(positional[1])
        except ValueError:
            raise UsageError(
                "Invalid image size specified. You may use k, M, G, T, P or E suffixes for "
                "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
            ) from None
        if size > INT64_MAX:
            raise UsageError(f"Invalid image size specified. Must be between 0 and {INT64_MAX}.")

    opts = CreateOpts()
    if options:
        for name, value in split_options(",".join(options)):
            opts.set(name, value)
    if opts.get("size") is not None and size is not None:
        raise UsageError("The image size must be specified only once")
    if size is not None:
        opts.raw["size"] = str(size)
        opts.value["size"] = size
    if backing is not None:
        opts.set("backing_file", backing)
    if backing_fmt is not None:
        opts.set("backing_fmt", backing_fmt)

    for name in ("encrypt", "encrypt.format"):
        if name in opts.raw and (name != "encrypt" or opts.value[name]):
            raise Qcow2UnsupportedError(
                f"Encrypted images are not supported: {name}={opts.raw[name]}"
            )
    if any(k.startswith("encrypt.") and k != "encrypt.format" for k in opts.raw):
        raise Qcow2UnsupportedError("Encrypted images are not supported")

    bfile = opt_str(opts, "backing_file")
    bfmt = opt_str(opts, "backing_fmt")
    image_size = opts.get("size")
    if bfile is not None:
        # bdrv_img_create checks and opens the backing file before printing anything.
        if bfile == filename:
            raise Qcow2FormatError(
                "Error: Trying to create an image with the same filename as the backing file"
            )
        if bfile == "":
            raise Qcow2FormatError("Expected backing file name, got empty string")
        if bfmt is None:
            detected = probe_format(resolve_name(bfile, filename))
            raise Qcow2FormatError(
                f"Backing file specified without backing format (detected format of {detected})"
            )
        probed = backing_size(filename, bfile, bfmt)
        if image_size is None:
            opts.raw["size"] = str(probed)
            opts.value["size"] = probed
            image_size = probed
    if not isinstance(image_size, int):
        raise UsageError("Image creation needs a size parameter")

    if not quiet:
        print(opts.formatting_line(filename, fmt), flush=True)

    create(
        filename,
        image_size,
        compat=opt_str(opts, "compat") or "1.1",
        cluster_size=opt_int(opts, "cluster_size", 65536),
        refcount_bits=opt_int(opts, "refcount_bits", 16),
        lazy_refcounts=bool(opts.get("lazy_refcounts")),
        compression_type=opt_str(opts, "compression_type") or "zlib",
        extended_l2=bool(opts.get("extended_l2")),
        backing_file=bfile,
        backing_fmt=bfmt,
        data_file=opt_str(opts, "data_file"),
        data_file_raw=bool(opts.get("data_file_raw")),
        preallocation=opt_str(opts, "preallocation") or "off",
    )
    return 0
