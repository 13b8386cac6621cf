"""``qcow2aio.open(..., discard="unmap" | "ignore")``: hole punching, as QEMU 7.2.

Observed with QEMU's tools (the oracle): ``qemu-io`` and ``qemu-img`` open images with
discard=unmap, so a guest discard (or ``write -z -u``) frees the clusters and punches
them from the file (``stat -c %b`` drops); with ``--image-opts ...,discard=ignore`` a
discard changes nothing at all (the data stays readable) and ``write -z -u`` still
unmaps in the metadata but punches nothing. Our default is "unmap" like the tools.

Punching happens only when the free is applied (the unlink durable, no older request
in flight), never earlier: a reader still holding the old mapping reads the old
bytes; a punch that fails leaves a consistent image.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import Qemu
from faults import Fault, FaultState

import qcow2aio
from qcow2aio.io import FileBackend

CS = 65536
MiB = 1 << 20


def _blocks(path: Path) -> int:
    """Allocated 512-byte blocks of the file (what `stat -c %b` shows)."""
    return os.stat(path).st_blocks


def _data_map(path: Path) -> list[tuple[int, int]]:
    """The file's data extents by SEEK_DATA/SEEK_HOLE, as (start, end) pairs.

    Comparing two files' maps rather than their ``st_blocks`` says the same thing
    (which bytes the file system still holds) without counting the file system's
    own metadata: ext4 charges an extent-index block to a file whose extents a punch
    split, so two files with equal holes may differ by 8 blocks (seen in CI).
    """
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    finally:
        os.close(fd)
    return out


def _filled(qemu: Qemu, tmp_path: Path, mib: int = 4, name: str = "d") -> Path:
    path = tmp_path / f"{name}.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", path, "8M")
    qemu.io(path, f"write -P 1 0 {mib}M")
    return path


def _clean(qemu: Qemu, path: Path) -> dict[str, Any]:
    rc, report = qemu.check(path)
    assert rc == 0 and not report.get("leaks") and not report.get("corruptions"), report
    return report


def _can_punch(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.write_bytes(os.urandom(1 << 20))
    f = FileBackend(str(probe), True)
    try:
        return f.punch_hole(0, 1 << 20) and _blocks(probe) < 1024
    finally:
        f.close()


def test_default_is_unmap_like_qemu_io(qemu: Qemu, tmp_path: Path) -> None:
    """Default open: a discard gives the space back, as `qemu-io -c discard` does."""
    if not _can_punch(tmp_path):
        pytest.fail("the test file system cannot punch holes")
    ours, theirs = _filled(qemu, tmp_path, name="ours"), _filled(qemu, tmp_path, name="theirs")
    before = _blocks(ours)
    qemu.io(theirs, "discard 0 2M")

    async def main() -> None:
        async with qcow2aio.open(ours, "r+") as img:
            await img.discard(0, 2 * MiB)
            await img.flush()
            assert _blocks(ours) <= before - 2 * MiB // 512

    asyncio.run(main())
    assert _data_map(ours) == _data_map(theirs)
    _clean(qemu, ours)
    qemu.io(ours, "read -P 0 0 2M", "read -P 1 2M 2M")


@pytest.mark.parametrize("mode", ["unmap", "ignore"])
def test_discard_modes(qemu: Qemu, tmp_path: Path, mode: str) -> None:
    """unmap: blocks drop; ignore: the discard is a no-op (data still there, nothing
    freed), exactly what qemu-io with --image-opts discard=<mode> does."""
    ours, theirs = _filled(qemu, tmp_path, name="ours"), _filled(qemu, tmp_path, name="theirs")
    before = _blocks(ours)
    qemu.io(
        f"driver=qcow2,file.filename={theirs},discard={mode}",
        "discard 64k 1M",
        fmt=None,
        extra_args=["--image-opts"],
    )
    with qcow2aio.open(ours, "r+", discard=mode) as img:
        asyncio.run(img.discard(CS, MiB))
        img.flush_sync()
        if mode == "ignore":
            assert img.read_sync(CS, MiB) == b"\x01" * MiB
            assert _blocks(ours) == before
        else:
            assert img.read_sync(CS, MiB) == bytes(MiB)
            assert _blocks(ours) < before
    # QEMU's ignore run ends a few blocks apart (metadata it writes at close, not the
    # 1 MiB discarded): equal up to 16 KiB.
    if mode == "unmap":
        assert _data_map(ours) == _data_map(theirs)
    else:
        assert abs(_blocks(ours) - _blocks(theirs)) <= 32
    assert qemu.convert_raw(ours) == qemu.convert_raw(theirs)
    _clean(qemu, ours)


@pytest.mark.parametrize("mode", ["unmap", "ignore"])
def test_write_zeroes_unmap(qemu: Qemu, tmp_path: Path, mode: str) -> None:
    """write_zeroes(unmap=True) frees the clusters in both modes (as `write -z -u`) but
    punches them only with unmap; without unmap nothing is freed."""
    ours, theirs = _filled(qemu, tmp_path, name="ours"), _filled(qemu, tmp_path, name="theirs")
    qemu.io(
        f"driver=qcow2,file.filename={theirs},discard={mode}",
        "write -z -u 0 2M",
        "write -z 2M 1M",
        fmt=None,
        extra_args=["--image-opts"],
    )

    async def main() -> None:
        async with qcow2aio.open(ours, "r+", discard=mode) as img:
            await img.write_zeroes(0, 2 * MiB, unmap=True)
            await img.write_zeroes(2 * MiB, MiB, unmap=False)

    asyncio.run(main())
    assert _data_map(ours) == _data_map(theirs)
    assert qemu.convert_raw(ours) == qemu.convert_raw(theirs)
    _clean(qemu, ours)


class _HeldReads(FileBackend):
    """Blocks the first data read at ``hold_at`` (host offset) until released, and
    records every hole punch."""

    hold_at = -1
    started = threading.Event()
    release = threading.Event()
    punches: ClassVar[list[tuple[int, int]]] = []

    def _hold(self, offset: int, length: int, nowait: bool) -> None:
        cls = type(self)
        if cls.hold_at >= 0 and offset <= cls.hold_at < offset + length:
            if nowait:
                raise BlockingIOError(errno.EAGAIN, "held: take the blocking path")
            cls.hold_at = -1
            cls.started.set()
            assert cls.release.wait(30)

    def _sys_pread(self, length: int, offset: int, event: str) -> bytes:
        self._hold(offset, length, False)
        return super()._sys_pread(length, offset, event)

    def _sys_preadv(self, buffers: list[Any], offset: int, event: str, flags: int = 0) -> int:
        self._hold(offset, sum(len(b) for b in buffers), bool(flags))
        return super()._sys_preadv(buffers, offset, event, flags)

    def _sys_fallocate(self, mode: int, offset: int, length: int, event: str) -> None:
        type(self).punches.append((offset, length))
        super()._sys_fallocate(mode, offset, length, event)


def test_no_punch_while_reader_in_flight(qemu: Qemu, tmp_path: Path) -> None:
    """A read that mapped a cluster before it was discarded reads its old bytes: the
    punch waits until that read has finished (the epoch rule), then happens."""
    path = _filled(qemu, tmp_path, mib=1)
    _HeldReads.punches = []
    _HeldReads.started.clear()
    _HeldReads.release.clear()
    img = qcow2aio.open(path, "r+", io_backend=_HeldReads)
    try:
        host = img.plan(CS, CS)[0].host
        before = _blocks(path)
        _HeldReads.hold_at = host
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(img.read_sync(0, 4 * CS)))
        reader.start()
        assert _HeldReads.started.wait(30)
        # The reader has mapped cluster 1 and is reading it: discard it, make it durable.
        asyncio.run(img.discard(CS, CS))
        img.flush_sync()
        img.flush_sync()
        assert _HeldReads.punches == []
        assert _blocks(path) == before
        assert img.meta.get_refcount(host // CS) == 1  # the free waits for the reader
        _HeldReads.release.set()
        reader.join(30)
        assert got == [b"\x01" * 4 * CS]
        img.flush_sync()
        assert _HeldReads.punches == [(host, CS)]
        assert img.meta.get_refcount(host // CS) == 0
        assert _blocks(path) < before
    finally:
        _HeldReads.release.set()
        img.close()
    _clean(qemu, path)
    qemu.io(path, "read -P 1 0 64k", "read -P 0 64k 64k", "read -P 1 128k 896k")


@pytest.mark.parametrize("kind", ["eio", "enospc"])
def test_punch_failure_is_harmless(qemu: Qemu, tmp_path: Path, kind: str) -> None:
    """An error injected at the punch ("punch_hole" event): the flush still succeeds,
    the clusters are free (they keep their bytes), the image is consistent."""
    path = _filled(qemu, tmp_path, mib=2)
    state = FaultState(Fault("punch_hole", kind, persistent=True))
    before = _blocks(path)

    async def main() -> None:
        async with qcow2aio.open(path, "r+", io_backend=state.factory()) as img:
            await img.discard(0, MiB)
            await img.flush()
            assert img.meta.allocator is not None
            assert img.meta.allocator.punch_error is not None
            await img.write(MiB + 4096, b"\x02" * 4096)

    asyncio.run(main())
    assert state.fired
    assert _blocks(path) >= before
    _clean(qemu, path)
    qemu.io(path, "read -P 0 0 1M", "read -P 1 1M 4k", "read -P 2 1028k 4k")


def test_unsupported_punch_does_nothing(qemu: Qemu, tmp_path: Path) -> None:
    """A file system without hole punching (EOPNOTSUPP): punch_hole says so, nothing
    else happens (no error recorded, the image is fine)."""

    class NoPunch(FileBackend):
        def _sys_fallocate(self, mode: int, offset: int, length: int, event: str) -> None:
            raise OSError(errno.EOPNOTSUPP, "not supported")

    path = _filled(qemu, tmp_path, mib=1)
    with qcow2aio.open(path, "r+", io_backend=NoPunch) as img:
        assert not img._file.punch_hole(0, CS)
        asyncio.run(img.discard(0, 2 * CS))
        img.flush_sync()
        assert img.meta.allocator is not None and img.meta.allocator.punch_error is None
    _clean(qemu, path)
    qemu.io(path, "read -P 0 0 128k", "read -P 1 128k 896k")


def test_close_cuts_discarded_tail(qemu: Qemu, tmp_path: Path) -> None:
    """With unmap, clusters at the end of the file freed by a discard are cut off at
    close; the file then ends where `qemu-img check` says the image ends."""
    path = _filled(qemu, tmp_path, mib=4)
    size_before = os.path.getsize(path)
    with qcow2aio.open(path, "r+") as img:
        asyncio.run(img.discard(2 * MiB, 2 * MiB))
    report = _clean(qemu, path)
    assert os.path.getsize(path) == report["image-end-offset"] < size_before - 2 * MiB + CS
    qemu.io(path, "read -P 1 0 2M", "read -P 0 2M 2M")
    # With ignore (and without any discard) the file keeps its size, as with QEMU.
    path2 = _filled(qemu, tmp_path, mib=4, name="ign")
    with qcow2aio.open(path2, "r+", discard="ignore") as img:
        asyncio.run(img.write_zeroes(2 * MiB, 2 * MiB))
    assert os.path.getsize(path2) == size_before
    _clean(qemu, path2)


def test_compressed_host_cluster_punched_when_all_gone(qemu: Qemu, tmp_path: Path) -> None:
    """Compressed clusters share host clusters: discarding some of them punches
    nothing; discarding the last one punches the host cluster."""
    path = tmp_path / "c.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", path, "8M")
    _HeldReads.punches = []
    _HeldReads.hold_at = -1
    with qcow2aio.open(path, "r+", io_backend=_HeldReads) as img:
        for c in range(3):
            img.write_compressed_sync(c * CS, bytes([c + 1]) * CS)
        host = img.plan(0, CS)[0].host & ~(CS - 1)
        asyncio.run(img.discard(0, 2 * CS))
        img.flush_sync()
        assert _HeldReads.punches == []
        asyncio.run(img.discard(2 * CS, CS))
        img.flush_sync()
        assert _HeldReads.punches == [(host, CS)]
    _clean(qemu, path)
    qemu.io(path, "read -P 0 0 192k")


def test_bad_discard_option() -> None:
    with pytest.raises(ValueError, match="discard"):
        qcow2aio.open("/nonexistent.qcow2", "r+", discard="punch")


@pytest.mark.parametrize("mode", ["unmap", "ignore"])
def test_snapshot_delete_gives_space_back(qemu: Qemu, tmp_path: Path, mode: str) -> None:
    """Deleting a snapshot punches the clusters only it held, whatever the discard
    option (`qemu-img snapshot -d` does so even with discard=ignore)."""
    ours, theirs = _filled(qemu, tmp_path, name="ours"), _filled(qemu, tmp_path, name="theirs")
    for p in (ours, theirs):
        qemu.img("snapshot", "-c", "s", p)
        qemu.io(p, "write -P 2 0 4M")
    before = _blocks(ours)
    qemu.img(
        "snapshot",
        "--image-opts",
        "-d",
        "s",
        f"driver=qcow2,file.filename={theirs},discard={mode}",
    )
    with qcow2aio.open(ours, "r+", discard=mode) as img:
        img.delete_snapshot_sync("s")
    assert _blocks(ours) <= before - 4 * MiB // 512
    assert abs(_blocks(ours) - _blocks(theirs)) <= 32
    _clean(qemu, ours)
    qemu.io(ours, "read -P 2 0 4M")
