"""The ``qcow2aio`` command: a qemu-img work-alike for ``create``, ``info``, ``check``,
``resize``, ``snapshot`` and ``amend``.

Arguments, option syntax and output follow ``qemu-img`` 7.2 so the two can be
swapped in scripts and compared in tests: ``create`` prints the same
``Formatting ...`` line (options in QEMU's table order, sizes as integers,
booleans as typed) and writes the same bytes; ``info`` prints the same JSON
text or human-readable report; ``check`` the same report and exit codes.
Errors go to stderr as ``qcow2aio: <message>`` with exit status 1.

This package only parses arguments and prints: one small module per command
(:mod:`.create`, :mod:`.info`, :mod:`.check`) over the shared option syntax of
:mod:`.options`. Subcommands live in :data:`COMMANDS`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from ..errors import Qcow2Error
from .amend import cmd_amend
from .bitmap import cmd_bitmap
from .check import cmd_check
from .commit import cmd_commit
from .compare import cmd_compare
from .convert import cmd_convert
from .create import cmd_create
from .info import cmd_info
from .map import cmd_map
from .measure import cmd_measure
from .options import (
    CREATE_OPTIONS,
    PROG,
    CreateOpts,
    HelpRequested,
    UsageError,
    parse_bool,
    parse_number,
    parse_size,
    split_options,
)
from .rebase import cmd_rebase
from .resize import cmd_resize
from .serve import cmd_serve
from .snapshot import cmd_snapshot

__all__ = [
    "COMMANDS",
    "CREATE_OPTIONS",
    "PROG",
    "USAGE",
    "CreateOpts",
    "UsageError",
    "cmd_amend",
    "cmd_bitmap",
    "cmd_check",
    "cmd_compare",
    "cmd_convert",
    "cmd_create",
    "cmd_info",
    "cmd_map",
    "cmd_measure",
    "cmd_resize",
    "cmd_serve",
    "cmd_snapshot",
    "main",
    "parse_bool",
    "parse_number",
    "parse_size",
    "split_options",
]

COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "create": cmd_create,
    "info": cmd_info,
    "check": cmd_check,
    "resize": cmd_resize,
    "snapshot": cmd_snapshot,
    "amend": cmd_amend,
    "convert": cmd_convert,
    "map": cmd_map,
    "serve": cmd_serve,
    "compare": cmd_compare,
    "measure": cmd_measure,
    "commit": cmd_commit,
    "rebase": cmd_rebase,
    "bitmap": cmd_bitmap,
}

USAGE = (
    f"usage: {PROG} COMMAND [ARGS]\n"
    "commands:\n"
    "  create [-q] [--object OBJECTDEF] [-f qcow2] [-b BACKING [-F FMT]] [-o OPTIONS]\n"
    "         FILE [SIZE]\n"
    "  info [--object OBJECTDEF] [--image-opts] [-f FMT] [--output=human|json]\n"
    "       [--backing-chain] FILE\n"
    "  check [-q] [--object OBJECTDEF] [--image-opts] [-f qcow2] [-r leaks|all]\n"
    "        [--output=human|json] FILE\n"
    "  resize [-q] [--object OBJECTDEF] [--image-opts] [-f qcow2|raw]\n"
    "         [--preallocation=MODE] [--shrink] FILE [+|-]SIZE\n"
    "  snapshot [--object OBJECTDEF] [--image-opts] [-q] [-U] [-f qcow2]\n"
    "           [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILE\n"
    "  amend [--object OBJECTDEF] [--image-opts] [-q] [-f qcow2] -o OPTIONS FILE\n"
    "  convert [--object OBJECTDEF] [--image-opts] [--target-image-opts] [-f FMT] [-O FMT]\n"
    "          [-c] [-o OPTIONS] [-B BACKING [-F FMT]] [-S SIZE] [-m N] [-W] [-n] [-p] [-q]\n"
    "          SRC... DST\n"
    "  commit [-q] [--object OBJECTDEF] [--image-opts] [-f qcow2] [-b BASE] [-d] [-p] FILE\n"
    "  rebase [-q] [--object OBJECTDEF] [--image-opts] [-f qcow2] [-u] [-b BACKING]\n"
    "         [-F FMT] [-p] FILE\n"
    "  map [--object OBJECTDEF] [--image-opts] [-f FMT] [--start-offset=OFFSET]\n"
    "      [--max-length=LEN] [--output=human|json] [-U] FILE\n"
    "  serve [-r] [-k SOCKET | -b ADDR -p PORT] [-x NAME] [-e N] [-t] [-A] [-D DESC]\n"
    "        [--object OBJECTDEF] [--image-opts] [--tls-creds ID] [--pid-file F] FILE\n"
    "  compare [--object OBJECTDEF] [--image-opts] [-f FMT] [-F FMT] [-p] [-q] [-s]\n"
    "          FILE1 FILE2\n"
    "  measure [--output=human|json] [--object OBJECTDEF] [--image-opts] [-O FMT]\n"
    "          [-o OPTIONS] (--size N | [-f FMT] FILE)\n"
    "  bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...\n"
    "         [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [--object OBJECTDEF]\n"
    "         [--image-opts | -f FMT] FILE BITMAP\n"
    "OBJECTDEF: secret,id=ID,data=STRING|file=PATH[,format=raw|base64][,keyid=ID,iv=IV]\n"
    "--image-opts: FILE is driver=qcow2,file.filename=PATH[,encrypt.key-secret=ID]\n"
    "              [,backing.encrypt.key-secret=ID] (check and resize: backing.*)\n"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qcow2aio`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-V", "--version"):
        from .. import __version__

        sys.stdout.write(f"{PROG} version {__version__}\n")
        return 0
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if args else 1
    command = COMMANDS.get(args[0])
    if command is None:
        sys.stderr.write(f"{PROG}: Command not found: {args[0]}\n{USAGE}")
        return 1
    try:
        return command(args[1:])
    except HelpRequested as exc:
        # qemu-img's help(): the usage on stdout, status 0 (after getopt's complaint
        # for a command that lets getopt print its errors).
        if exc.message:
            sys.stderr.write(exc.message + "\n")
        sys.stdout.write(USAGE)
        return 0
    except (Qcow2Error, UsageError) as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"{PROG}: {exc.strerror or exc}\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
