"""``qcow2aio serve -B``: persistent dirty bitmaps over NBD, judged by qemu-nbd 7.2.

The incremental-backup round trip a backup service runs across both tools: QEMU
writes and we export the dirty ranges (``qemu:dirty-bitmap:NAME``) exactly as
qemu-nbd does; we take writes through our export and qemu-nbd then exports exactly
those ranges from the bitmap we stored.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Qemu
from test_nbd import _info_json, _nbdinfo, _tool, _wait_socket, server, sockdir, uri

import qcow2aio
from qcow2aio.nbd import Export

__all__ = ["sockdir"]  # the fixture, imported for the tests below

MiB = 1 << 20


def _dirty_map(sock: str, name: str) -> list[tuple[int, int, int]]:
    """``nbdinfo --map=qemu:dirty-bitmap:NAME`` as (offset, length, flags) rows."""
    rows = []
    for line in _nbdinfo(f"--map=qemu:dirty-bitmap:{name}", uri(sock)).splitlines():
        off, n, flags = line.split()[:3]
        rows.append((int(off), int(n), int(flags)))
    return rows


def _qemu_view(image: Path, sockdir: str, bitmap: str) -> list[tuple[int, int, int]]:
    with server("qemu", image, f"{sockdir}/q", "-r", "-B", bitmap) as sock:
        return _dirty_map(sock, bitmap)


def _made_by_qemu(qemu: Qemu, path: Path) -> None:
    """b0 (64 KiB), b1 (1 MiB granularity), b2 disabled; qemu-io dirties b0 and b1."""
    qemu.img("create", "-q", "-f", "qcow2", path, "64M")
    qemu.img("bitmap", "--add", path, "b0")
    qemu.img("bitmap", "--add", "-g", "1M", path, "b1")
    qemu.img("bitmap", "--add", "--disable", path, "b2")
    qemu.io(path, "write 100k 8k", "write 10M 1", "write -z 40M 3M", "discard 62M 64k")


def test_qemu_bitmaps_exported_as_qemu_nbd_does(qemu: Qemu, tmp_path: Path, sockdir: str) -> None:
    img = tmp_path / "a.qcow2"
    _made_by_qemu(qemu, img)
    args = ["-r", "-A", "-B", "b0", "-B", "b1", "-B", "b2"]
    views = {}
    for kind in ("ours", "qemu"):
        with server(kind, img, f"{sockdir}/{kind}", *args) as sock:
            views[kind] = (
                _info_json(sock, ""),
                [_dirty_map(sock, b) for b in ("b0", "b1", "b2")],
            )
    assert views["ours"] == views["qemu"]
    assert any(flags for _, _, flags in views["ours"][1][0])  # b0 is dirty somewhere
    assert views["ours"][1][2] == [(0, 64 * MiB, 0)]  # disabled: clean


@pytest.mark.parametrize("mode", [[], ["--discard=unmap"]])
def test_round_trip_we_write_qemu_nbd_exports_the_ranges(
    qemu: Qemu, tmp_path: Path, sockdir: str, mode: list[str]
) -> None:
    """Writes through our writable export dirty the enabled bitmaps live; after the
    server stops, qemu-nbd reads exactly those ranges from the stored bitmaps."""
    img, twin = tmp_path / "a.qcow2", tmp_path / "twin.qcow2"
    _made_by_qemu(qemu, img)
    shutil.copy(img, twin)
    before = {b: _qemu_view(img, sockdir, b) for b in ("b0", "b1", "b2")}
    cmds = ["write -P 7 20M 4k", "write -z 30M 200k", "discard 50M 1M", "write 63M 1M"]
    with server("ours", img, f"{sockdir}/o", "-B", "b0", "-B", "b2", *mode) as sock:
        qemu.io(uri(sock), *cmds, fmt="raw")
        live = _dirty_map(sock, "b0")
        assert _dirty_map(sock, "b2") == before["b2"]
    with server("qemu", twin, f"{sockdir}/q", "-B", "b0", "-B", "b2", *mode) as sock:
        qemu.io(uri(sock), *cmds, fmt="raw")  # the same writes through qemu-nbd
    after = {b: _qemu_view(img, sockdir, b) for b in ("b0", "b1", "b2")}
    assert after == {b: _qemu_view(twin, sockdir, b) for b in ("b0", "b1", "b2")}
    assert after["b0"] == live != before["b0"]
    assert after["b2"] == before["b2"]  # disabled: untouched
    with qcow2aio.open(img) as ours:
        for b in ("b0", "b1"):
            assert ours.dirty_extents(b) == [(o, n) for o, n, f in after[b] if f]
        assert (20 * MiB, 64 * 1024) in ours.dirty_extents("b0")
    rc, report = qemu.check(img)
    assert rc == 0 and not report.get("leaks") and not report.get("corruptions"), report


@pytest.mark.parametrize(
    ("setup", "bitmap", "message"),
    [
        ("plain", "nope", "Bitmap 'nope' is not found"),
        ("in-use", "b0", "Bitmap 'b0' is inconsistent and cannot be used"),
    ],
)
def test_bad_bitmap_refused_as_qemu_nbd(
    qemu: Qemu, tmp_path: Path, sockdir: str, setup: str, bitmap: str, message: str
) -> None:
    img = tmp_path / "a.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, "1M")
    qemu.img("bitmap", "--add", img, "b0")
    if setup == "in-use":  # a writer that died: its bitmaps stay marked in use
        sock = f"{sockdir}/w"
        proc = subprocess.Popen(
            [sys.executable, "-m", "qcow2aio", "serve", "-t", "-k", sock, str(img)],
            stderr=subprocess.PIPE,
        )
        try:
            _wait_socket(sock, proc)
            qemu.io(uri(sock), "write 0 4k", "flush", fmt="raw")
        finally:
            proc.kill()
            proc.wait()
        assert "in-use" in qemu.info(img)["format-specific"]["data"]["bitmaps"][0]["flags"]
    results = []
    for argv in (
        [sys.executable, "-m", "qcow2aio", "serve"],
        [_tool("qemu-nbd"), "-f", "qcow2"],
    ):
        proc = subprocess.run(
            [*argv, "-r", "-k", f"{sockdir}/x", "-B", bitmap, str(img)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        results.append((proc.returncode, proc.stderr.split(": ", 1)[-1].strip()))
    assert results[0] == results[1] == (1, message)


def test_export_api_names_and_checks_bitmaps(qemu: Qemu, tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    _made_by_qemu(qemu, img)
    with qcow2aio.open(img) as ours:
        exp = Export(ours, bitmaps=["b1", "b0"], allocation_depth=True)
        assert exp.contexts() == [
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:b1",
            "qemu:dirty-bitmap:b0",
        ]
        with pytest.raises(qcow2aio.Qcow2Error, match="'zz' is not found"):
            Export(ours, bitmaps=["zz"])
