"""``-l SNAPSHOT_PARAM`` of ``convert`` and ``measure``: a snapshot read as a disk.

Each command line runs through qemu-img 7.2 and through ``qcow2aio``; exit codes and
output must match (our program name swapped for qemu-img's), and what convert writes
must be the same bytes, the snapshot's and not the active disk's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Qemu

import qcow2aio
from qcow2aio.snapshot_ops import SnapshotNotFoundError

MiB = 1 << 20


def _image(qemu: Qemu, d: Path) -> Path:
    """s1 (64 MiB, data at 0), s2 after a grow to 96 MiB (data at 70 MiB), then more
    writes in the active disk."""
    img = d / "m.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, "64M")
    qemu.io(img, "write -P 1 0 1M", "write -z 5M 1M")
    qemu.img("snapshot", "-c", "s1", img)
    qemu.img("resize", "-q", img, "96M")
    qemu.io(img, "write -P 2 70M 2M", "write -P 3 0 64k")
    qemu.img("snapshot", "-c", "s2", img)
    qemu.io(img, "write -P 4 1M 1M", "discard 70M 1M")
    (d / "r.raw").write_bytes(bytes(MiB))
    return img


ROOT = Path(__file__).resolve().parent.parent


def _run(argv: list[str], cwd: Path) -> tuple[int, str]:
    # Runs in the images' folder: this checkout's package first on the path.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=120, env=env)
    return proc.returncode, (proc.stdout + proc.stderr).replace("qcow2aio:", "qemu-img:")


OURS = [sys.executable, "-m", "qcow2aio"]


@pytest.mark.parametrize(
    "args",
    [
        ["-l", "s1"],
        ["-l", "2"],
        ["-l", "s2", "-O", "qcow2"],
        ["--output=json", "-O", "qcow2", "-l", "snapshot.name=s1"],
        ["-l", "snapshot.id=1,snapshot.name=s1"],
        ["-l", "snapshot.id=1,snapshot.name=s2"],
        ["-l", "nope"],
        ["-l", "snapshot.bogus=1"],
    ],
)
def test_measure_snapshot_like_qemu(qemu: Qemu, tmp_path: Path, args: list[str]) -> None:
    _image(qemu, tmp_path)
    want = _run([qemu.qemu_img, "measure", *args, "m.qcow2"], tmp_path)
    got = _run([*OURS, "measure", *args, "m.qcow2"], tmp_path)
    assert got == want


def test_measure_snapshot_of_raw_refused_like_qemu(qemu: Qemu, tmp_path: Path) -> None:
    _image(qemu, tmp_path)
    args = ["measure", "-l", "s1", "-f", "raw", "r.raw"]
    assert _run([*OURS, *args], tmp_path) == _run([qemu.qemu_img, *args], tmp_path)


@pytest.mark.parametrize(
    ("args", "out"),
    [
        (["-l", "s1", "-O", "raw"], "o.raw"),
        (["-l", "snapshot.id=2", "-O", "qcow2"], "o.qcow2"),
        (["-l", "s2", "-O", "qcow2", "-c"], "o.qcow2"),
        (["-l", "nope", "-O", "raw"], "o.raw"),
        (["-l", "snapshot.bogus=1", "-O", "raw"], "o.raw"),
        (["-l", "s1", "-O", "raw", "m.qcow2"], "o.raw"),  # two sources
    ],
)
def test_convert_snapshot_like_qemu(qemu: Qemu, tmp_path: Path, args: list[str], out: str) -> None:
    _image(qemu, tmp_path)
    results = {}
    for who, argv in (("qemu", [qemu.qemu_img]), ("ours", OURS)):
        target = tmp_path / f"{who}-{out}"
        rc, text = _run([*argv, "convert", *args, "m.qcow2", target.name], tmp_path)
        results[who] = (rc, text.replace(target.name, "OUT"), target.exists())
    assert results["ours"] == results["qemu"]
    if results["ours"][0] == 0:
        theirs, ours = tmp_path / f"qemu-{out}", tmp_path / f"ours-{out}"
        assert qemu.convert_raw(ours) == qemu.convert_raw(theirs)
        active = qemu.convert_raw(tmp_path / "m.qcow2")
        assert qemu.convert_raw(ours) != active[: len(qemu.convert_raw(ours))]


def test_load_snapshot_tmp_api(qemu: Qemu, tmp_path: Path) -> None:
    """The image shows the snapshot's bytes at the present disk size; writable images
    and unknown snapshots are refused."""
    path = _image(qemu, tmp_path)
    with qcow2aio.open(path) as img:
        img.load_snapshot_tmp(name="s1")
        assert img.size == 96 * MiB  # the present size, as QEMU keeps it
        assert img.read_sync(0, 4) == b"\x01" * 4
        assert img.read_sync(MiB, 4) == bytes(4)  # written after s1
        snap = tmp_path / "s1.raw"
        qemu.img("convert", "-l", "s1", "-O", "raw", path, snap)
        assert img.read_sync(0, img.size) == snap.read_bytes()
        with pytest.raises(SnapshotNotFoundError):
            img.load_snapshot_tmp("9")
    with qcow2aio.open(path, "r+") as img, pytest.raises(qcow2aio.Qcow2ReadOnlyError):
        img.load_snapshot_tmp(name="s1")
