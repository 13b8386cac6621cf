"""``qcow2aio check``: the same report, text and exit codes as ``qemu-img check``.

Like ``qemu-img check`` it opens the metadata directly, without the
read-write open's automatic repair of a dirty (lazy refcounts) image and
without refusing a corrupt one: a check must see the image as it is. With
``-r leaks`` or ``-r all`` the file is opened writable and repaired.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..check import check_image
from ..errors import Qcow2Error
from ..io import FileBackend
from ..metadata import Metadata

USAGE = "check [-q] [-f qcow2] [-r leaks|all] [--output=human|json] [-U] FILE"


class CheckUsageError(Qcow2Error):
    """Bad command-line arguments for ``check``."""


def cmd_check(argv: Sequence[str]) -> int:
    """Run the check; print QEMU's stdout/stderr text; return qemu-img's exit code."""
    repair: str | None = None
    output = "human"
    quiet = False
    files: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-r", "-f", "--output", "-T") and i + 1 < len(args):
            value = args[i + 1]
            i += 2
        elif a.startswith("--output="):
            value, a = a.split("=", 1)[1], "--output"
            i += 1
        elif a in ("-q", "-U", "--force-share"):
            quiet = quiet or a == "-q"
            i += 1
            continue
        elif a.startswith("-") and a != "-":
            raise CheckUsageError(f"check: unknown option {a!r}; usage: {USAGE}")
        else:
            files.append(a)
            i += 1
            continue
        if a == "-r":
            if value not in ("leaks", "all"):
                raise CheckUsageError(
                    f"Unknown option value for -r (expecting 'leaks' or 'all'): {value}"
                )
            repair = value
        elif a == "-f" and value != "qcow2":
            raise CheckUsageError(f"check: only the qcow2 format is supported, not {value!r}")
        elif a == "--output":
            if value not in ("human", "json"):
                raise CheckUsageError("--output must be used with human or json as argument.")
            output = value
    if len(files) != 1:
        raise CheckUsageError(f"Expecting one image file name; usage: {USAGE}")
    path = files[0]
    file = FileBackend(path, repair is not None)
    try:
        meta = Metadata(file, writable=repair is not None)
        result = check_image(meta, repair=repair)
    finally:
        file.close()
    for line in result.messages:
        sys.stderr.write(line if line.endswith("\n") else line + "\n")
    if result.error is not None:
        if not any("Check failed" in line for line in result.messages):
            sys.stderr.write(f"qemu-img: Check failed: {result.error}\n")
        return 1
    if not quiet:
        sys.stdout.write(result.json_text(path) if output == "json" else result.human_text(path))
    sys.stdout.flush()
    return result.exit_code()
