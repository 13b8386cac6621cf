"""Option syntax shared by the ``qcow2aio`` commands, as qemu-img parses it.

Sizes (``qemu_strtosz``), booleans and numbers (QemuOpts), ``key=value,...``
option strings (",," escapes a comma) and the table of ``create`` options in
QEMU's order: the ``Formatting ...`` line and error messages depend on these
details, so they are kept in one place that every command uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PROG = "qcow2aio"


class UsageError(Exception):
    """A command-line mistake (reported like a Qcow2Error, exit status 1)."""


_SUFFIXES = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SUFFIXES["E"] = 1 << 60
INT64_MAX = (1 << 63) - 1


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
class OptDesc:
    name: str
    kind: str  # "str", "size", "number", "bool"
    default: str | None = None


# qcow2's create options followed by file-posix's (qemu_opts_append order); the
# Formatting line lists them in exactly this order.
CREATE_OPTIONS: tuple[OptDesc, ...] = (
    OptDesc("encryption", "bool"),
    OptDesc("encrypt.format", "str"),
    OptDesc("encrypt.key-secret", "str"),
    OptDesc("encrypt.cipher-alg", "str"),
    OptDesc("encrypt.cipher-mode", "str"),
    OptDesc("encrypt.ivgen-alg", "str"),
    OptDesc("encrypt.ivgen-hash-alg", "str"),
    OptDesc("encrypt.hash-alg", "str"),
    OptDesc("encrypt.iter-time", "number"),
    OptDesc("cluster_size", "size", "65536"),
    OptDesc("extended_l2", "bool", "off"),
    OptDesc("preallocation", "str"),
    OptDesc("compression_type", "str", "zlib"),
    OptDesc("size", "size"),
    OptDesc("compat", "str"),
    OptDesc("backing_file", "str"),
    OptDesc("backing_fmt", "str"),
    OptDesc("data_file", "str"),
    OptDesc("data_file_raw", "bool"),
    OptDesc("lazy_refcounts", "bool", "off"),
    OptDesc("refcount_bits", "number", "16"),
    OptDesc("nocow", "bool"),
    OptDesc("extent_size_hint", "size"),
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


def take_value(argv: Sequence[str], i: int, flag: str) -> tuple[str, int]:
    arg = argv[i]
    if len(arg) > len(flag) and arg.startswith(flag) and not flag.startswith("--"):
        return arg[len(flag) :], i + 1
    if flag.startswith("--") and arg.startswith(flag + "="):
        return arg[len(flag) + 1 :], i + 1
    if i + 1 >= len(argv):
        raise UsageError(f"option requires an argument -- '{flag.lstrip('-')}'")
    return argv[i + 1], i + 2


def opt_str(opts: CreateOpts, name: str) -> str | None:
    value = opts.get(name)
    return value if isinstance(value, str) else None


def opt_int(opts: CreateOpts, name: str, default: int) -> int:
    value = opts.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else default
