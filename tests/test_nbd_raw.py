"""``qcow2aio serve -f raw``: raw files exported as qemu-nbd exports them.

Both servers get twin copies of one sparse raw file on the same file system, the
same options and the same client commands; capabilities, maps and bytes must agree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Qemu
from test_nbd import _info_json, _nbdinfo, _tool, _wait_socket, server, sockdir, uri

__all__ = ["sockdir"]  # the fixture, imported for the tests below

MiB = 1 << 20


def _sparse_raw(path: Path) -> None:
    """8 MiB: a hole, 3 bytes of data at 1 MiB, 128 KiB written as zeros at 2.5 MiB."""
    with path.open("wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"abc")
        f.seek(2560 * 1024)
        f.write(bytes(128 * 1024))


def _maps(sock: str, name: str = "") -> tuple[str, str]:
    u = uri(sock, name)
    return _nbdinfo("--map", u), _nbdinfo("--map=qemu:allocation-depth", u)


@pytest.mark.parametrize("args", [["-f", "raw", "-A"], ["-f", "raw", "-r", "-A", "-x", "e"]])
def test_raw_export_same_as_qemu_nbd(
    qemu: Qemu, tmp_path: Path, sockdir: str, args: list[str]
) -> None:
    seen = {}
    for kind in ("ours", "qemu"):
        img = tmp_path / f"{kind}.raw"
        _sparse_raw(img)
        with server(kind, img, f"{sockdir}/{kind}", *args) as sock:
            name = "e" if "-x" in args else ""
            seen[kind] = (_info_json(sock, name), _maps(sock, name))
    assert seen["ours"] == seen["qemu"]


@pytest.mark.parametrize("mode", [[], ["--discard=unmap"]])
def test_raw_writes_land_as_with_qemu_nbd(
    qemu: Qemu, tmp_path: Path, sockdir: str, mode: list[str]
) -> None:
    cmds = [
        "write -P 9 0 100k",
        "write -P 8 3000 5000",
        "write -z 1M 4k",
        "write -z -u 2560k 64k",
        "discard 64k 32k",
        "write -P 7 8188k 4k",
        "flush",
    ]
    out = {}
    for kind in ("ours", "qemu"):
        img = tmp_path / f"{kind}.raw"
        _sparse_raw(img)
        with server(kind, img, f"{sockdir}/{kind}", "-f", "raw", *mode) as sock:
            qemu.io(uri(sock), *cmds, fmt="raw")
            copy = tmp_path / f"{kind}.copy"
            subprocess.run([_tool("nbdcopy"), uri(sock), str(copy)], check=True, timeout=120)
            out[kind] = (img.read_bytes(), copy.read_bytes(), _nbdinfo("--map", uri(sock)))
    assert out["ours"] == out["qemu"]


def test_probed_raw_warns_and_guards_block_zero(qemu: Qemu, tmp_path: Path, sockdir: str) -> None:
    """Without -f a raw file is probed, served with qemu-nbd's warning, and a write
    that would make it probe as qcow2 is refused (EPERM), as qemu-nbd does."""
    results = {}
    for kind in ("ours", "qemu"):
        img = tmp_path / f"{kind}.raw"
        _sparse_raw(img)
        if kind == "ours":
            argv = [sys.executable, "-m", "qcow2aio", "serve"]
        else:
            argv = [_tool("qemu-nbd")]
        sock = f"{sockdir}/{kind}"
        proc = subprocess.Popen(
            [*argv, "-k", sock, str(img)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            _wait_socket(sock, proc)
            magic = tmp_path / "magic.bin"
            magic.write_bytes(b"QFI\xfb\x00\x00\x00\x03")
            # one client: without -t the server leaves with it
            io = qemu.io(
                uri(sock),
                f"write -s {magic} 0 8",
                "write -P 0x52 0 1",
                "write -P 0x51 1 1",
                fmt="raw",
                check=False,
            )
        finally:
            proc.wait(timeout=60)  # without -t: exits when the last client leaves
        err = proc.stderr.read().decode() if proc.stderr else ""
        results[kind] = (
            proc.returncode,
            # the warning; qemu-nbd may add a broken-pipe line as the client leaves
            [ln for ln in err.replace(str(img), "IMG").splitlines() if "socket" not in ln],
            (io.stdout + io.stderr).count("Operation not permitted"),
            io.stdout.count("wrote 1/1 bytes"),
            img.read_bytes()[:2],
        )
    assert results["ours"] == results["qemu"]
    assert results["ours"][2:] == (1, 2, b"RQ")


def test_fast_zero_on_raw_matches_qemu_nbd(tmp_path: Path, sockdir: str) -> None:
    """NBD_CMD_WRITE_ZEROES with FAST_ZERO (nbdsh): done where the file system zeroes
    ranges, with or without NO_HOLE; the same answers as qemu-nbd."""
    nbdsh = shutil.which("nbdsh")
    if nbdsh is None:
        pytest.fail("nbdsh not found: `make test` installs libnbd-bin")
    script = (
        "import nbd\n"
        "for flags in (nbd.CMD_FLAG_FAST_ZERO, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE):\n"
        "    try:\n"
        "        h.zero(65536, 1048576, flags)\n"
        "        print('ok')\n"
        "    except nbd.Error as e:\n"
        "        print('error', e.errno)\n"
        "print(h.can_fast_zero(), h.pread(16, 1048574))\n"
    )
    out = {}
    for kind in ("ours", "qemu"):
        img = tmp_path / f"{kind}.raw"
        _sparse_raw(img)
        with server(kind, img, f"{sockdir}/{kind}", "-f", "raw") as sock:
            # nbdsh runs "python3 -m nbd": Debian's python3 holds the nbd module
            env = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}
            proc = subprocess.run(
                [nbdsh, "-u", uri(sock), "-c", script],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
            assert proc.returncode == 0, proc.stderr
            out[kind] = proc.stdout
    assert out["ours"] == out["qemu"]
    assert out["ours"].splitlines()[:2] == ["ok", "ok"]
