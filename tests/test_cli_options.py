"""Option errors of every command against qemu-img 7.2: the shared getopt parser.

Each row runs ``qemu-img CMD ARGS`` and ``qcow2aio CMD ARGS`` (in-process) in an
empty folder and compares exit status, stdout and stderr (program names replaced):
unknown options, missing values (short, long, clustered, after operands, in getopt's
permuted order), long-option prefixes and ``=`` values, ``-h``/``--help`` (qemu-img
prints its own help, qcow2aio its usage: both on stdout, status 0) and the checks
qemu-img makes right after parsing (operand counts). Every option letter any command
knows is tried against every command, so a letter one table lacks or has too many
shows up here.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Qemu

from qcow2aio.cli import COMMANDS, USAGE, main
from qcow2aio.cli.options import CommandSpec

# The qemu-img commands (serve is qemu-nbd's, with options of its own).
QEMU_IMG_COMMANDS = [
    "amend",
    "check",
    "commit",
    "compare",
    "convert",
    "create",
    "info",
    "map",
    "measure",
    "rebase",
    "resize",
    "snapshot",
]
SPECS: dict[str, CommandSpec] = {
    name: importlib.import_module(f"qcow2aio.cli.{name}").SPEC for name in QEMU_IMG_COMMANDS
}
LETTERS = sorted({c for spec in SPECS.values() for c in spec.short if c != ":"} | {"Z", "x"})

GENERIC: list[list[str]] = [
    [],
    ["-Z"],
    ["--bogus"],
    ["--bogus=1"],
    ["--object"],
    ["--image-opts=x"],
    ["-qZ"],
    ["a", "-qZ"],
    ["a", "b", "-UZ"],
    ["a", "-U", "b", "-qZ"],
    ["--help"],
    ["--he"],
    ["--o"],
    ["--output"],
    ["--output=x"],
    ["--out", "json"],
    ["--out=json", "a", "b", "c"],
    ["-Uf"],
    ["a", "-Uf"],
    ["-pq", "-Z"],
]


def _skip(command: str, args: list[str]) -> bool:
    """Documented differences: qcow2aio's snapshot accepts -f (see cli/snapshot.py)."""
    return command == "snapshot" and any(a[:1] == "-" and "f" in a for a in args)


def _rows() -> list[tuple[str, list[str]]]:
    rows: list[tuple[str, list[str]]] = []
    for command in sorted(SPECS):
        for args in GENERIC + [[f"-{c}"] for c in LETTERS]:
            if _skip(command, args):
                continue
            # resize takes its size off the end before getopt: give it one.
            rows.append((command, [*args, "1"] if command == "resize" and args else args))
    return rows


def _theirs(qemu_img: str, folder: Path, command: str, args: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run(
        [qemu_img, command, *args],
        cwd=folder,
        capture_output=True,
        text=True,
        env={**os.environ, "LC_ALL": "C"},
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    err = proc.stderr.replace("qemu-img:", "PROG:").replace("'qemu-img --help'", "'PROG --help'")
    out = "HELP" if proc.stdout.startswith("qemu-img version") else proc.stdout
    return proc.returncode, out, err


def _ours(folder: Path, command: str, args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([command, *args])
    finally:
        os.chdir(cwd)
    text = err.getvalue().replace("qcow2aio:", "PROG:")
    text = text.replace("'qcow2aio --help'", "'PROG --help'")
    return rc, "HELP" if out.getvalue() == USAGE else out.getvalue(), text


def test_specs_name_their_commands() -> None:
    assert set(SPECS) <= set(COMMANDS)
    assert all(spec.command == name for name, spec in SPECS.items())


def test_option_errors_match_qemu_img(qemu: Qemu, tmp_path: Path) -> None:
    rows = _rows()
    with ThreadPoolExecutor(4) as pool:
        theirs = list(pool.map(lambda r: _theirs(qemu.qemu_img, tmp_path, *r), rows))
    mismatches = []
    for (command, args), want in zip(rows, theirs, strict=True):
        got = _ours(tmp_path, command, args)
        if got != want:
            mismatches.append(f"{command} {args}: qemu-img {want!r} qcow2aio {got!r}")
    assert not list(tmp_path.iterdir())  # nothing was created
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize(
    ("command", "args", "want"),
    [
        ("info", ["--output", "json", "-U"], [("output", "json"), ("U", "")]),
        ("info", ["a", "--out=json", "b"], [("output", "json"), ("", "a"), ("", "b")]),
        ("map", ["-s1k", "--max-length", "2", "x"], [("s", "1k"), ("l", "2"), ("", "x")]),
        ("convert", ["a", "-cpO", "qcow2", "--", "-b", "c"], None),
        ("compare", ["-fqcow2", "a", "b"], [("f", "qcow2"), ("", "a"), ("", "b")]),
    ],
)
def test_getopt_values(command: str, args: list[str], want: list[tuple[str, str]] | None) -> None:
    """Values and operand order as getopt gives them (the differential test above
    only sees errors)."""
    from qcow2aio.cli.options import getopt_long

    got = list(getopt_long(SPECS[command], args))
    if want is None:  # convert: a cluster ending in a letter taking a value, then "--"
        want = [("c", ""), ("p", ""), ("O", "qcow2"), ("", "a"), ("", "-b"), ("", "c")]
    assert got == want
