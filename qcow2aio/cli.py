"""The ``qcow2aio`` command: a qemu-img work-alike for ``create`` and ``info``.

Arguments, option syntax and output follow ``qemu-img`` 7.2 so the two can be
swapped in scripts and compared in tests: ``create`` prints the same
``Formatting ...`` line (options in QEMU's table order, sizes as integers,
booleans as typed) and writes the same bytes; ``info`` prints the same JSON
text or human-readable report. Errors go to stderr as ``qcow2aio: <message>``
with exit status 1.

Subcommands live in :data:`COMMANDS`; another one (``check``) can be added by
registering a function there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .backing import RAW_FORMATS, RawImage, probe_format, resolve_name
from .cli_check import cmd_check
from .create import backing_size, create
from .errors import Qcow2Error, Qcow2FormatError, Qcow2UnsupportedError
from .image import Image
from .info import format_human, format_json, full_backing_filename, image_info, raw_image_info

PROG = "qcow2aio"


class UsageError(Exception):
    """A command-line mistake (reported like a Qcow2Error, exit status 1)."""


# ------------------------------------------------------------------ parsing
_SUFFIXES = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SUFFIXES["E"] = 1 << 60
_INT64_MAX = (1 << 63) - 1


def parse_size(text: str) -> int:
    """``qemu_strtosz``: bytes by default, k/M/G/T/P/E suffixes (1024-based), "1.5G".

    Raises ValueError for malformed text or values of 2^64 and more.
    """
    s = text.lstrip(" \t\n\r\f\v")
    i = 1 if s[:1] == "+" else 0
    j = i
    while j < len(s) and s[j].isdigit():
        j += 1
    if j == i:
        raise ValueError(text)
    val = int(s[i:j])
    rest = s[j:]
    valf = 0
    if val == 0 and rest[:1] in ("x", "X"):
        k = 1
        while k < len(rest) and rest[k] in "0123456789abcdefABCDEF":
            k += 1
        if k == 1:
            raise ValueError(text)
        val = int(rest[1:k], 16)
        rest = rest[k:]
        if rest[:1] == ".":
            raise ValueError(text)
    elif rest[:1] == ".":
        k = 1
        while k < len(rest) and rest[k].isdigit():
            k += 1
        if rest[k : k + 1] in ("e", "E"):
            raise ValueError(text)
        fraction = float("0" + rest[:k]) if k > 1 else 0.0
        valf = int(fraction * 2.0**64)
        rest = rest[k:]
    mul = _SUFFIXES.get(rest[:1].upper()) if rest else None
    if mul is not None:
        rest = rest[1:]
    else:
        mul = 1
    if rest:
        raise ValueError(text)
    if mul == 1:
        if valf:
            raise ValueError(text)
        result = val
    else:
        low = valf * mul
        result = val * mul + (low >> 64) + ((low & ((1 << 64) - 1)) >> 63)
    if result >= 1 << 64:
        raise ValueError(text)
    return result


def parse_bool(name: str, text: str) -> bool:
    """``qapi_bool_parse``."""
    if text in ("on", "yes", "true", "y"):
        return True
    if text in ("off", "no", "false", "n"):
        return False
    raise UsageError(f"Parameter '{name}' expects 'on' or 'off'")


def parse_number(name: str, text: str) -> int:
    """``parse_option_number``: strtoull with base 0 (decimal, 0x hex, 0 octal)."""
    s = text.strip()
    try:
        if s.lower().startswith("0x"):
            value = int(s[2:], 16)
        elif len(s) > 1 and s.startswith("0"):
            value = int(s[1:], 8)
        else:
            value = int(s, 10)
        if value < 0 or value >= 1 << 64 or s.startswith(("+", "-")):
            raise ValueError(s)
    except ValueError:
        raise UsageError(f"Parameter '{name}' expects a number") from None
    return value


@dataclass(frozen=True)
class _OptDesc:
    name: str
    kind: str  # "str", "size", "number", "bool"
    default: str | None = None


# qcow2's create options followed by file-posix's (qemu_opts_append order); the
# Formatting line lists them in exactly this order.
CREATE_OPTIONS: tuple[_OptDesc, ...] = (
    _OptDesc("encrypt", "bool"),
    _OptDesc("encrypt.format", "str"),
    _OptDesc("encrypt.key-secret", "str"),
    _OptDesc("encrypt.cipher-alg", "str"),
    _OptDesc("encrypt.cipher-mode", "str"),
    _OptDesc("encrypt.ivgen-alg", "str"),
    _OptDesc("encrypt.ivgen-hash-alg", "str"),
    _OptDesc("encrypt.hash-alg", "str"),
    _OptDesc("encrypt.iter-time", "number"),
    _OptDesc("cluster_size", "size", "65536"),
    _OptDesc("extended_l2", "bool", "off"),
    _OptDesc("preallocation", "str"),
    _OptDesc("compression_type", "str", "zlib"),
    _OptDesc("size", "size"),
    _OptDesc("compat", "str"),
    _OptDesc("backing_file", "str"),
    _OptDesc("backing_fmt", "str"),
    _OptDesc("data_file", "str"),
    _OptDesc("data_file_raw", "bool"),
    _OptDesc("lazy_refcounts", "bool", "off"),
    _OptDesc("refcount_bits", "number", "16"),
    _OptDesc("nocow", "bool"),
    _OptDesc("extent_size_hint", "size"),
)
_DESC = {d.name: d for d in CREATE_OPTIONS}


def split_options(text: str) -> list[tuple[str, str]]:
    """QemuOpts ``key=value,key=value`` (",," is a literal comma in a value)."""
    out: list[tuple[str, str]] = []
    i = 0
    n = len(text)
    while i < n:
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        name = text[i:j]
        if j >= n or text[j] == ",":
            # "flag" alone means flag=on; "noflag" would mean off (not used by qcow2).
            out.append((name, "on"))
            i = j + 1
            continue
        j += 1
        value = []
        while j < n:
            if text[j] == ",":
                if j + 1 < n and text[j + 1] == ",":
                    value.append(",")
                    j += 2
                    continue
                break
            value.append(text[j])
            j += 1
        out.append((name, "".join(value)))
        i = j + 1
    return out


class CreateOpts:
    """The parsed ``-o`` options: raw strings (as printed) and typed values."""

    def __init__(self) -> None:
        self.raw: dict[str, str] = {}
        self.value: dict[str, object] = {}

    def set(self, name: str, text: str) -> None:
        desc = _DESC.get(name)
        if desc is None:
            raise UsageError(f"Invalid parameter '{name}'")
        if desc.kind == "size":
            try:
                value: object = parse_size(text)
            except ValueError:
                raise UsageError(
                    f"Parameter '{name}' expects a non-negative number below 2^64\n"
                    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
                    "peta-\nand exabytes, respectively."
                ) from None
        elif desc.kind == "number":
            value = parse_number(name, text)
        elif desc.kind == "bool":
            value = parse_bool(name, text)
        else:
            value = text
        self.raw[name] = text
        self.value[name] = value

    def get(self, name: str) -> object:
        return self.value.get(name)

    def formatting_line(self, filename: str, fmt: str) -> str:
        """``Formatting 'FILE', fmt=qcow2 key=value ...`` as ``bdrv_img_create`` prints it."""
        parts: list[str] = []
        for desc in CREATE_OPTIONS:
            if desc.name in self.raw:
                if desc.kind in ("size", "number"):
                    text = str(self.value[desc.name])
                else:
                    text = self.raw[desc.name]
            elif desc.default is not None:
                text = desc.default
            else:
                continue
            if desc.kind == "str":
                text = text.replace(",", ",,")
            parts.append(f"{desc.name}={text}")
        return f"Formatting '{filename}', fmt={fmt} " + " ".join(parts)


def _take_value(argv: Sequence[str], i: int, flag: str) -> tuple[str, int]:
    arg = argv[i]
    if len(arg) > len(flag) and arg.startswith(flag) and not flag.startswith("--"):
        return arg[len(flag) :], i + 1
    if flag.startswith("--") and arg.startswith(flag + "="):
        return arg[len(flag) + 1 :], i + 1
    if i + 1 >= len(argv):
        raise UsageError(f"option requires an argument -- '{flag.lstrip('-')}'")
    return argv[i + 1], i + 2


def _opt_str(opts: CreateOpts, name: str) -> str | None:
    value = opts.get(name)
    return value if isinstance(value, str) else None


def _opt_int(opts: CreateOpts, name: str, default: int) -> int:
    value = opts.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


# ------------------------------------------------------------------- create
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
            fmt, i = _take_value(argv, i, "-f")
        elif arg.startswith("-o"):
            opt, i = _take_value(argv, i, "-o")
            options.append(opt)
        elif arg.startswith("-b"):
            backing, i = _take_value(argv, i, "-b")
        elif arg.startswith("-F"):
            backing_fmt, i = _take_value(argv, i, "-F")
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
        if size > _INT64_MAX:
            raise UsageError(f"Invalid image size specified. Must be between 0 and {_INT64_MAX}.")

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

    bfile = _opt_str(opts, "backing_file")
    bfmt = _opt_str(opts, "backing_fmt")
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
        compat=_opt_str(opts, "compat") or "1.1",
        cluster_size=_opt_int(opts, "cluster_size", 65536),
        refcount_bits=_opt_int(opts, "refcount_bits", 16),
        lazy_refcounts=bool(opts.get("lazy_refcounts")),
        compression_type=_opt_str(opts, "compression_type") or "zlib",
        extended_l2=bool(opts.get("extended_l2")),
        backing_file=bfile,
        backing_fmt=bfmt,
        data_file=_opt_str(opts, "data_file"),
        data_file_raw=bool(opts.get("data_file_raw")),
        preallocation=_opt_str(opts, "preallocation") or "off",
    )
    return 0


# --------------------------------------------------------------------- info
def _chain_infos(filename: str, fmt: str | None, chain: bool) -> list[dict[str, object]]:
    infos: list[dict[str, object]] = []
    seen: set[str] = set()
    path = filename
    while True:
        real = os.path.realpath(path)
        if real in seen:
            raise Qcow2FormatError(f"Backing file '{path}' creates an infinite loop.")
        seen.add(real)
        kind = fmt if fmt is not None else probe_format(path)
        if kind in RAW_FORMATS:
            raw = RawImage(path)
            try:
                infos.append(raw_image_info(raw, path))
            finally:
                raw.close()
            return infos
        if kind != "qcow2":
            raise Qcow2UnsupportedError(f"Unsupported image format: {kind}")
        with Image(path, "r", open_backing=False) as img:
            info = image_info(img)
            hdr = img.meta.header
        infos.append(info)
        if not chain or not hdr.backing_file:
            return infos
        path = full_backing_filename(path, hdr.backing_file)
        fmt = hdr.backing_format or None


def cmd_info(argv: Sequence[str]) -> int:
    """``info [-f qcow2] [--output=human|json] [--backing-chain] [-U] FILE``."""
    output = "human"
    chain = False
    fmt: str | None = None
    files: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--output"):
            output, i = _take_value(argv, i, "--output")
        elif arg == "--backing-chain":
            chain = True
            i += 1
        elif arg in ("-U", "--force-share"):
            i += 1  # reading never takes QEMU's locks
        elif arg.startswith("-f"):
            fmt, i = _take_value(argv, i, "-f")
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"invalid option -- '{arg.lstrip('-')}'")
        else:
            files.append(arg)
            i += 1
    if output not in ("human", "json"):
        raise UsageError(f"--output must be used with human or json as argument: {output}")
    if len(files) != 1:
        raise UsageError("Expecting one image file name")
    infos = _chain_infos(files[0], fmt, chain)
    if output == "json":
        text = format_json(infos if chain else infos[0]) + "\n"
    else:
        text = "\n".join(format_human(info) for info in infos)
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "create": cmd_create,
    "info": cmd_info,
    "check": cmd_check,
}

USAGE = (
    f"usage: {PROG} COMMAND [ARGS]\n"
    "commands:\n"
    "  create [-q] [-f qcow2] [-b BACKING [-F FMT]] [-o OPTIONS] FILE [SIZE]\n"
    "  info [-f FMT] [--output=human|json] [--backing-chain] FILE\n"
    "  check [-q] [-f qcow2] [-r leaks|all] [--output=human|json] FILE\n"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qcow2aio`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if args else 1
    command = COMMANDS.get(args[0])
    if command is None:
        sys.stderr.write(f"{PROG}: Command not found: {args[0]}\n{USAGE}")
        return 1
    try:
        return command(args[1:])
    except (Qcow2Error, UsageError) as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"{PROG}: {exc.strerror or exc}\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
