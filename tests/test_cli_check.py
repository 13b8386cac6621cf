"""`qcow2aio check` prints what `qemu-img check` prints and exits with its codes."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Qemu

ROOT = Path(__file__).resolve().parent.parent


def _ours(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcow2aio", "check", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def _theirs(qemu: Qemu, *args: str) -> subprocess.CompletedProcess[str]:
    return qemu.img("check", *args, check=False)


def _leaky(qemu: Qemu, tmp: Path) -> Path:
    path = tmp / "leak.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(path), "4M")
    qemu.io(path, "write -P 0x11 0 256k")
    raw = bytearray(path.read_bytes())
    # Refcount of cluster 9 (unused) set to 1: a leak.
    struct.pack_into(">H", raw, 0x20000 + 2 * 9, 1)
    path.write_bytes(raw)
    return path


def _corrupt(qemu: Qemu, tmp: Path) -> Path:
    path = tmp / "bad.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(path), "4M")
    qemu.io(path, "write -P 0x11 0 256k")
    raw = bytearray(path.read_bytes())
    struct.pack_into(">H", raw, 0x20000 + 2 * 5, 0)  # refcount 0 for a used data cluster
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize("kind", ["clean", "leaky", "corrupt"])
@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize("repair", [None, "leaks", "all"])
def test_check_cli_matches_qemu(
    qemu: Qemu, tmp_path: Path, kind: str, output: str, repair: str | None
) -> None:
    if kind == "clean":
        path = tmp_path / "clean.qcow2"
        qemu.img("create", "-q", "-f", "qcow2", str(path), "4M")
        qemu.io(path, "write -P 0x11 0 256k")
    elif kind == "leaky":
        path = _leaky(qemu, tmp_path)
    else:
        path = _corrupt(qemu, tmp_path)
    copy = tmp_path / ("q-" + path.name)
    shutil.copyfile(path, copy)
    args = [f"--output={output}"] + (["-r", repair] if repair else [])
    ours = _ours(*args, str(path))
    theirs = _theirs(qemu, *args, str(copy))
    assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
    assert ours.stdout.replace(str(path), "X") == theirs.stdout.replace(str(copy), "X")
    assert ours.stderr.replace(str(path), "X") == theirs.stderr.replace(str(copy), "X")
    # After a repair both images are judged the same by QEMU.
    after_ours = _theirs(qemu, str(path))
    after_theirs = _theirs(qemu, str(copy))
    assert after_ours.returncode == after_theirs.returncode
    assert after_ours.stdout == after_theirs.stdout


def test_check_cli_errors(tmp_path: Path) -> None:
    missing = _ours(str(tmp_path / "nope.qcow2"))
    assert missing.returncode == 1 and "qcow2aio:" in missing.stderr
    bad = _ours("-r", "some", str(tmp_path / "x"))
    assert bad.returncode == 1 and "-r" in bad.stderr
