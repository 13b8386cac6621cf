"""Applying a snapshot taken at another disk size (``qemu-img snapshot -a`` resizes).

QEMU 7.2 first resizes the disk to the snapshot's size (growing the active L1
table when it must, never shrinking it), then loads the snapshot's L1 table. We
do the same; the files must come out identical to QEMU's (the same clusters in
the same places), and both tools must read the snapshot's content afterwards.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Qemu
from images import create
from test_snapshots import _normalized

import qcow2aio
from qcow2aio.snapshot_ops import SnapshotResizeError

MiB = 1 << 20
GiB = 1 << 30


def _clean(qemu: Qemu, path: Path) -> None:
    code, rep = qemu.check(path)
    assert code == 0, rep
    assert not rep.get("leaks") and not rep.get("corruptions"), rep


def _two_sizes(qemu: Qemu, path: Path, **opts: str) -> Path:
    """s1 at 1 MiB, s2 at 3 GiB (data at 2 GiB), active changed after both."""
    create(qemu, path, MiB, **opts)
    qemu.io(path, "write -P 1 0 64k")
    qemu.img("snapshot", "-c", "s1", path)
    qemu.img("resize", "-q", path, "3G")
    qemu.io(path, "write -P 2 2G 64k", "write -P 3 0 4k")
    qemu.img("snapshot", "-c", "s2", path)
    qemu.io(path, "write -P 4 2G 4k", "write -P 5 1G 64k")
    return path


@pytest.mark.parametrize("opts", [{}, {"cluster_size": "4096"}, {"extended_l2": "on"}])
def test_apply_at_other_sizes_matches_qemu(
    qemu: Qemu, tmp_path: Path, opts: dict[str, str]
) -> None:
    ours = _two_sizes(qemu, tmp_path / "ours.qcow2", **opts)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copyfile(ours, theirs)
    for name, size in (("s1", MiB), ("s2", 3 * GiB), ("s1", MiB)):
        qemu.img("snapshot", "-a", name, theirs)
        with qcow2aio.open(ours, "r+") as img:
            img.apply_snapshot_sync(name)
            assert img.size == size
            if name == "s1":
                assert img.read_sync(0, 64 << 10) == b"\1" * (64 << 10)
            else:
                assert img.read_sync(0, 4096) == b"\3" * 4096
                assert img.read_sync(2 * GiB, 64 << 10) == b"\2" * (64 << 10)
                assert img.read_sync(GiB, 64 << 10) == bytes(64 << 10)
        _clean(qemu, ours)
        assert qemu.info(ours)["virtual-size"] == size
        # Same clusters in the same places (free clusters' stale bytes aside).
        assert _normalized(ours) == _normalized(theirs), name
    qemu.img("compare", ours, theirs)
    # Deleting the larger snapshot frees its tables; what stays shared gets QEMU's flags.
    qemu.img("snapshot", "-d", "s2", theirs)
    with qcow2aio.open(ours, "r+") as img:
        img.delete_snapshot_sync("s2")
    _clean(qemu, ours)
    assert _normalized(ours) == _normalized(theirs)


def test_apply_grows_back_through_async_api(qemu: Qemu, tmp_path: Path) -> None:
    import asyncio

    path = _two_sizes(qemu, tmp_path / "a.qcow2")

    async def run() -> None:
        async with qcow2aio.open(path, "r+") as img:
            await img.apply_snapshot("s1")
            assert img.size == MiB
            await img.write(0, b"\7" * 512)
            await img.apply_snapshot("s2")
            assert img.size == 3 * GiB
            assert await img.read(2 * GiB, 512) == b"\2" * 512

    asyncio.run(run())
    _clean(qemu, path)
    qemu.io(path, "read -P 2 2G 64k", "read -P 3 0 4k")


def test_v2_snapshot_of_other_size_refused_like_qemu(qemu: Qemu, tmp_path: Path) -> None:
    """A v2 image cannot be resized while it has snapshots, so QEMU cannot load a
    snapshot of another size into it; nothing changes."""
    path = create(qemu, tmp_path / "v2.qcow2", MiB, compat="0.10")
    qemu.img("snapshot", "-c", "s1", path)
    # The snapshot's recorded disk size differs (as if the image had been resized
    # before v2 forbade it): patch the extra data's disk_size field.
    data = bytearray(path.read_bytes())
    table = int.from_bytes(data[64:72], "big")
    extra_len = int.from_bytes(data[table + 36 : table + 40], "big")
    assert extra_len >= 16
    data[table + 40 + 8 : table + 40 + 16] = (2 * MiB).to_bytes(8, "big")
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    out = qemu.img("snapshot", "-a", "s1", path, check=False)
    assert out.returncode == 1
    assert "Can't resize a v2 image which has snapshots" in out.stderr
    with qcow2aio.open(path, "r+") as img, pytest.raises(SnapshotResizeError, match="v2"):
        img.apply_snapshot_sync("s1")
    assert path.read_bytes() == before
    ours = subprocess.run(
        [sys.executable, "-m", "qcow2aio", "snapshot", "-a", "s1", str(path)],
        capture_output=True,
        text=True,
    )
    assert (ours.returncode, ours.stdout) == (out.returncode, out.stdout)
    assert ours.stderr.replace("qcow2aio:", "qemu-img:") == out.stderr
    assert path.read_bytes() == before
