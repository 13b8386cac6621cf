"""Option syntax shared by the ``qcow2aio`` commands, as qemu-img parses it.

Sizes (``qemu_strtosz``), booleans and numbers (QemuOpts), ``key=value,...``
option strings (",," escapes a comma) and the table of ``create`` options in
QEMU's order: the ``Formatting ...`` line and error messages depend on these
details, so they are kept in one place that every command uses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from .secrets import Secrets

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


# --------------------------------------------------------------------------- getopt
#
# Every command's options are read by one parser with the behaviour of glibc's
# ``getopt_long`` as qemu-img 7.2 calls it: short options clustered or not ("-qf
# FMT", "-fFMT"), long options with their value after "=" or in the next argument,
# unique prefixes of long options ("--out=json"), operands permuted after the
# options, "--" ending them. qemu-img's error messages name ``argv[optind - 1]``, so
# they inherit getopt's quirks, which are observable and so reproduced: an unknown
# letter inside a cluster names the argument *before* the cluster ("qemu-img info a
# -qZ" -> "unrecognized option 'a'"), in getopt's permuted order.

TRY_HELP = f"\nTry '{PROG} --help' for more information"


class HelpRequested(Exception):
    """``-h``/``--help``: qemu-img prints its help on stdout and exits 0. So does a
    command whose optstring does not start with ":" (``measure``) on any option error,
    after getopt's own complaint, ``message``, on stderr ("" for ``-h``)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class LongOpt:
    """One ``struct option``: its name, whether it takes a value, and the key the
    parser yields for it (a short option's letter, or by default the name itself)."""

    name: str
    has_arg: bool = False
    key: str = ""

    @property
    def code(self) -> str:
        return self.key or self.name


@dataclass(frozen=True)
class CommandSpec:
    """A command's getopt table as qemu-img 7.2 declares it (observed): the optstring
    (a leading ":" makes qemu-img print its own messages, as all commands but
    ``measure`` do) and the long options."""

    command: str
    short: str
    long: tuple[LongOpt, ...] = ()

    def takes_arg(self, ch: str) -> bool | None:
        """None when ``ch`` is no option letter, else whether it takes a value."""
        pos = self.short.find(ch)
        if ch == ":" or pos < 0:
            return None
        return self.short[pos + 1 : pos + 2] == ":"

    def find_long(self, name: str) -> list[LongOpt]:
        """What ``--name`` designates: the exact match, else every option ``name`` is
        a prefix of (several with the same meaning count as one, as in getopt)."""
        exact = [o for o in self.long if o.name == name]
        if exact:
            return exact
        found = [o for o in self.long if o.name.startswith(name)]
        if len({(o.has_arg, o.code) for o in found}) == 1:
            return found[:1]
        return found


# The long options most commands have.
HELP = LongOpt("help", key="h")
OBJECT = LongOpt("object", True)
IMAGE_OPTS = LongOpt("image-opts")
FORCE_SHARE = LongOpt("force-share", key="U")
OUTPUT = LongOpt("output", True)


class _Getopt:
    """getopt_long's state: ``args[first:last]`` are the non-options skipped so far,
    moved after the options (``exchange``) when more options follow them."""

    def __init__(self, spec: CommandSpec, argv: Sequence[str]) -> None:
        self.spec = spec
        self.args = [spec.command, *argv]
        self.optind = 1
        self.first = self.last = 1
        self.nextchar = ""

    def error(self, missing: bool, glibc: str) -> NoReturn:
        if not self.spec.short.startswith(":"):
            raise HelpRequested(f"{self.spec.command}: {glibc}")
        what = "missing argument for" if missing else "unrecognized"
        raise UsageError(f"{what} option '{self.args[self.optind - 1]}'{TRY_HELP}")

    def exchange(self) -> None:
        a, first, last, optind = self.args, self.first, self.last, self.optind
        a[first:optind] = a[last:optind] + a[first:last]
        self.first = first + optind - last
        self.last = optind

    def next(self) -> tuple[str, str] | None:
        """The next ``(key, value)``, or None when the options are over."""
        args = self.args
        argc = len(args)
        if not self.nextchar:
            self.last = min(self.last, self.optind)
            self.first = min(self.first, self.optind)
            if self.first != self.last and self.last != self.optind:
                self.exchange()
            elif self.last != self.optind:
                self.first = self.optind
            while self.optind < argc and (args[self.optind][:1] != "-" or args[self.optind] == "-"):
                self.optind += 1
            self.last = self.optind
            if self.optind != argc and args[self.optind] == "--":
                self.optind += 1
                if self.first != self.last and self.last != self.optind:
                    self.exchange()
                elif self.first == self.last:
                    self.first = self.optind
                self.last = self.optind = argc
            if self.optind == argc:
                return None
            if args[self.optind].startswith("--"):
                return self.long_option()
            self.nextchar = args[self.optind][1:]
        ch, self.nextchar = self.nextchar[0], self.nextchar[1:]
        if not self.nextchar:
            self.optind += 1
        takes = self.spec.takes_arg(ch)
        if takes is None:
            self.error(False, f"invalid option -- '{ch}'")
        if not takes:
            return ch, ""
        if self.nextchar:
            value, self.nextchar = self.nextchar, ""
            self.optind += 1
        elif self.optind == argc:
            self.error(True, f"option requires an argument -- '{ch}'")
        else:
            value = args[self.optind]
            self.optind += 1
        return ch, value

    def long_option(self) -> tuple[str, str]:
        arg = self.args[self.optind]
        name, eq, value = arg[2:].partition("=")
        found = self.spec.find_long(name)
        self.optind += 1
        if not found:
            self.error(False, f"unrecognized option '{arg}'")
        if len(found) > 1:
            names = " ".join(f"'--{o.name}'" for o in found)
            self.error(False, f"option '{arg}' is ambiguous; possibilities: {names}")
        opt = found[0]
        if not opt.has_arg:
            if eq:
                self.error(False, f"option '--{opt.name}' doesn't allow an argument")
            return opt.code, ""
        if not eq:
            if self.optind == len(self.args):
                self.error(True, f"option '--{opt.name}' requires an argument")
            value = self.args[self.optind]
            self.optind += 1
        return opt.code, value

    def operands(self) -> list[str]:
        """After the options: the non-options in order, then all that followed "--"."""
        return self.args[self.first :] if self.first != self.last else []


def getopt_long(spec: CommandSpec, argv: Sequence[str]) -> Iterator[tuple[str, str]]:
    """Yield ``(key, value)`` for each option of ``argv`` (the command's arguments,
    without its name) as it is read, ``value`` "" for a flag; then each operand as
    ``("", operand)``. ``-h``/``--help`` raises :class:`HelpRequested`; errors raise
    :class:`UsageError` with qemu-img's text. Options are yielded as they are read so
    that a command reports a bad value (``-m 99``) before a later getopt error, as
    qemu-img does, checking values in its getopt loop."""
    state = _Getopt(spec, argv)
    while (item := state.next()) is not None:
        if item[0] == "h":
            raise HelpRequested()
        yield item
    for operand in state.operands():
        yield "", operand


class ParsedArgs:
    """A command line read by :class:`CommandLine`: the last value of each option
    (``values``), every value in order (``lists``, for ``-o`` that accumulates), the
    options given (``flags``, with or without a value), the operands, and the shared
    ``--object``/``--image-opts``."""

    def __init__(self, secrets: Secrets) -> None:
        self.values: dict[str, str] = {}
        self.lists: dict[str, list[str]] = {}
        self.flags: set[str] = set()
        self.files: list[str] = []
        self.image_opts = False
        self.secrets = secrets


class CommandLine:
    """One command's arguments read with :func:`getopt_long`, the options every command
    shares handled here once: ``--object`` (defined as soon as it is read, so its
    errors come in qemu-img's order), ``--image-opts``, and ``-U``/``--force-share``
    (qcow2aio takes no image locks, so sharing them is always granted).

    Iterate to handle the remaining options in order (a command that checks values
    while parsing, as qemu-img does, raises from its loop), or call :meth:`parse`."""

    def __init__(self, spec: CommandSpec, argv: Sequence[str]) -> None:
        from .secrets import Secrets  # secrets.py imports this module

        self.parsed = ParsedArgs(Secrets())
        self._items = getopt_long(spec, argv)

    @property
    def files(self) -> list[str]:
        return self.parsed.files

    @property
    def secrets(self) -> Secrets:
        return self.parsed.secrets

    @property
    def image_opts(self) -> bool:
        return self.parsed.image_opts

    def __iter__(self) -> Iterator[tuple[str, str]]:
        p = self.parsed
        for key, value in self._items:
            if not key:
                p.files.append(value)
            elif key == "object":
                p.secrets.add_object(value)
            elif key == "image-opts":
                p.image_opts = True
            elif key != "U":
                p.values[key] = value
                p.lists.setdefault(key, []).append(value)
                p.flags.add(key)
                yield key, value

    def parse(self) -> ParsedArgs:
        """Read all the options: values (the last one wins), lists and flags."""
        for _ in self:
            pass
        return self.parsed

    def flag(self, key: str) -> bool:
        """Whether option ``key`` was given (once iterated)."""
        return key in self.parsed.flags


def parse_args(
    argv: Sequence[str], with_arg: str, flags: str, help_text: str = "", *, command: str = ""
) -> ParsedArgs:
    """Short options taking a value (``with_arg``) or not (``flags``) plus ``--help``,
    ``--object`` and ``--image-opts``, as qemu-img's simpler commands declare them
    (``help_text`` is no longer used: ``-h`` prints the usage, see
    :class:`HelpRequested`). ``command`` is getopt's ``argv[0]``, which an error
    inside the first cluster of options names."""
    del help_text
    short = ":" + "".join(c + ":" for c in with_arg) + flags
    spec = CommandSpec(command, short, (HELP, OBJECT, IMAGE_OPTS))
    return CommandLine(spec, argv).parse()


def usage_error(msg: str) -> UsageError:
    """A usage error as qemu-img words it (with the ``--help`` hint line)."""
    return UsageError(msg + TRY_HELP)


_SUFFIX_HELP = (
    "You may use k, M, G, T, P or E suffixes for\n"
    f"{PROG}: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
)


def cvtnum(what: str, text: str, limit: int = INT64_MAX) -> int:
    """qemu-img's ``cvtnum``: a size for option ``what`` ("start offset", "image
    size", ...) with its two messages (the second line of the first one is printed
    with its own ``qemu-img:`` prefix, as qemu-img's two error_report calls do)."""
    try:
        value = parse_size(text)
    except ValueError:
        raise UsageError(f"Invalid {what} specified. {_SUFFIX_HELP}") from None
    if value > limit:
        raise UsageError(f"Invalid {what} specified. Must be between 0 and {limit}.")
    return value
