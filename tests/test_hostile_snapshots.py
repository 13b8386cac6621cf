"""Hostile snapshot tables: a clean ``Qcow2Error`` naming the field and value, where QEMU
refuses too at open; and snapshot operations that refuse before writing anything.

The images are one qemu-img-made image with three snapshots (s1, s2, s3) whose table
or entries are poked with ``struct``. For each damage, each operation (create, apply,
delete of a healthy snapshot, delete of the damaged one) either succeeds (where the
damage is legal qcow2: duplicate ids or names) or raises a ``Qcow2Error`` subclass and
leaves the file byte for byte as it was (its SHA-256 before and after).
"""

from __future__ import annotations

import hashlib
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Qemu

import qcow2aio
from qcow2aio.check import check_image
from qcow2aio.errors import Qcow2CorruptError, Qcow2Error, Qcow2FormatError
from qcow2aio.io import FileBackend
from qcow2aio.metadata import Metadata
from qcow2aio.snapshot import SnapshotTableError, read_snapshot_table_for_check

_SNAP_HDR = struct.Struct(">QIHHIIQII")


@pytest.fixture(scope="module")
def base(qemu_tools: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """4 MiB, 64 KiB clusters, data written between three snapshots s1, s2, s3."""
    qemu = Qemu(qemu_tools["qemu-img"], qemu_tools["qemu-io"], tmp_path_factory.mktemp("b"))
    path = qemu.tmp_path / "snaps.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(path), "4M")
    qemu.io(path, "write -P 1 0 64k")
    qemu.img("snapshot", "-c", "s1", str(path))
    qemu.io(path, "write -P 2 64k 64k")
    qemu.img("snapshot", "-c", "s2", str(path))
    qemu.img("snapshot", "-c", "s3", str(path))
    return path.read_bytes()


def _entries(raw: bytes | bytearray) -> list[int]:
    nb, pos = struct.unpack_from(">IQ", raw, 60)
    out = []
    for _ in range(nb):
        pos = (pos + 7) & ~7
        out.append(pos)
        h = _SNAP_HDR.unpack_from(raw, pos)
        pos += _SNAP_HDR.size + h[8] + h[2] + h[3]
    return out


def _u64(raw: bytearray, off: int) -> int:
    return int(struct.unpack_from(">Q", raw, off)[0])


# Each damage pokes the image; snapshot 1 (id "2", "s2") is the damaged entry.
def _table_on_l1(raw: bytearray) -> None:
    struct.pack_into(">IQ", raw, 60, 1, _u64(raw, 40))


def _table_on_reftable(raw: bytearray) -> None:
    struct.pack_into(">IQ", raw, 60, 1, _u64(raw, 48))


def _table_on_header(raw: bytearray) -> None:
    struct.pack_into(">IQ", raw, 60, 1, 0)


def _l1_on(target: Callable[[bytearray], int]) -> Callable[[bytearray], None]:
    def poke(raw: bytearray) -> None:
        struct.pack_into(">Q", raw, _entries(raw)[1], target(raw))

    return poke


def _l1_size(value: int) -> Callable[[bytearray], None]:
    def poke(raw: bytearray) -> None:
        struct.pack_into(">I", raw, _entries(raw)[1] + 8, value)

    return poke


def _dup_id(raw: bytearray) -> None:
    e = _entries(raw)[1]
    raw[e + 40 + 24 : e + 40 + 25] = b"1"


def _dup_name(raw: bytearray) -> None:
    e = _entries(raw)[1]
    raw[e + 40 + 25 : e + 40 + 27] = b"s1"


REFUSED: dict[str, tuple[Callable[[bytearray], None], type[Qcow2Error], str]] = {
    # The snapshot table on other metadata: freeing it (every operation rewrites the
    # table) would free that metadata. QEMU does it; we refuse.
    "table-on-active-l1": (_table_on_l1, Qcow2CorruptError, "snapshots_offset=0x30000"),
    "table-on-reftable": (_table_on_reftable, Qcow2CorruptError, "snapshots_offset=0x10000"),
    # QEMU parses the header as an entry: a bogus L1 offset (refused when used).
    "table-on-header": (_table_on_header, Qcow2FormatError, "l1_table_offset=0x514649fb"),
    "l1-on-active-l1": (
        _l1_on(lambda r: _u64(r, 40)),
        Qcow2CorruptError,
        "l1_table_offset=0x30000",
    ),
    "l1-on-header": (_l1_on(lambda r: 0), Qcow2CorruptError, "l1_table_offset=0x0"),
    "l1-on-reftable": (_l1_on(lambda r: _u64(r, 48)), Qcow2CorruptError, "l1_table_offset=0x10000"),
    "l1-on-table": (_l1_on(lambda r: _u64(r, 64)), Qcow2CorruptError, "l1_table_offset=0xc0000"),
    "l1-on-other-snapshot-l1": (
        _l1_on(lambda r: _u64(r, _entries(r)[0])),
        Qcow2CorruptError,
        "l1_table_offset=0x60000",
    ),
    "l1-unaligned": (_l1_on(lambda r: _u64(r, _entries(r)[1]) + 512), Qcow2FormatError, "0xa0200"),
    "l1-size-too-large": (_l1_size((32 << 20) // 8 + 1), Qcow2FormatError, "l1_size=4194305"),
    "l1-size-u32-max": (_l1_size(0xFFFFFFFF), Qcow2FormatError, "l1_size=4294967295"),
}

OPS: dict[str, Callable[[qcow2aio.Image], None]] = {
    "create": lambda img: img.create_snapshot_sync("new"),
    "apply-healthy": lambda img: img.apply_snapshot_sync("s1"),
    "delete-healthy": lambda img: img.delete_snapshot_sync("s3"),
    "delete-damaged": lambda img: img.delete_snapshot_sync("2"),
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("damage", list(REFUSED))
def test_snapshot_operation_refused_before_writing(
    base: bytes, tmp_path: Path, damage: str, op: str
) -> None:
    poke, exc, match = REFUSED[damage]
    raw = bytearray(base)
    poke(raw)
    path = tmp_path / "hostile.qcow2"
    path.write_bytes(raw)
    before = _sha(path)
    with pytest.raises(Qcow2Error) as info:
        img = qcow2aio.Image(str(path), "r+")
        try:
            OPS[op](img)
        finally:
            img.close()
    assert isinstance(info.value, exc), info.value
    assert match in str(info.value)
    assert _sha(path) == before


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("damage", ["duplicate-id", "duplicate-name"])
def test_duplicates_are_legal(
    qemu: Qemu, base: bytes, tmp_path: Path, damage: str, op: str
) -> None:
    """qcow2 does not require unique ids or names: QEMU opens, lists and changes such
    an image, and so do we, with QEMU's resolution (apply: id first, then name; delete:
    a name, the first that matches). Both copies are then listed alike by qemu-img and
    pass its check."""
    raw = bytearray(base)
    (_dup_id if damage == "duplicate-id" else _dup_name)(raw)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    ours.write_bytes(raw)
    theirs.write_bytes(raw)
    damaged_name = "s2" if damage == "duplicate-id" else "s1"
    qemu_args, run = {
        "create": (["-c", "new"], OPS["create"]),
        "apply-healthy": (["-a", "s1"], OPS["apply-healthy"]),
        "delete-healthy": (["-d", "s3"], OPS["delete-healthy"]),
        "delete-damaged": (
            ["-d", damaged_name],
            lambda img: img.delete_snapshot_sync(damaged_name),
        ),
    }[op]
    listed = qemu.info(theirs)["snapshots"]
    qemu.img("snapshot", *qemu_args, str(theirs))
    with qcow2aio.Image(str(ours), "r+") as img:
        assert img.snapshots() == listed
        run(img)
    rows = [qemu.img("snapshot", "-l", str(p)).stdout.splitlines() for p in (ours, theirs)]
    # A new snapshot's date differs: compare ids and names.
    assert [r.split()[:2] for r in rows[0]] == [r.split()[:2] for r in rows[1]]
    assert qemu.check(ours)[0] == 0
    assert qemu.check(theirs)[0] == 0


# --------------------------------------------------------------------- open refusals
def _nb(value: int) -> Callable[[bytearray], None]:
    return lambda raw: struct.pack_into(">I", raw, 60, value)


def _extra(value: int) -> Callable[[bytearray], None]:
    return lambda raw: struct.pack_into(">I", raw, _entries(raw)[1] + 36, value)


OPEN_REFUSED = {
    "nb_snapshots-65537": _nb(65537),
    "nb_snapshots-u32-max": _nb(0xFFFFFFFF),
    "snapshots_offset-unaligned": lambda raw: struct.pack_into(">Q", raw, 64, _u64(raw, 64) + 8),
    "snapshots_offset-near-2^63": lambda raw: struct.pack_into(">Q", raw, 64, (1 << 63) - 65536),
    "extra_data_size-1025": _extra(1025),
    "extra_data_size-u32-max": _extra(0xFFFFFFFF),
}
OUR_WORDS = {
    "nb_snapshots-65537": "nb_snapshots=65537",
    "nb_snapshots-u32-max": "nb_snapshots=4294967295",
    "snapshots_offset-unaligned": "snapshots_offset=0xc0008",
    "snapshots_offset-near-2^63": "0x7fffffffffff0000",
    "extra_data_size-1025": "extra_data_size=1025",
    "extra_data_size-u32-max": "extra_data_size=4294967295",
}


@pytest.mark.parametrize("damage", list(OPEN_REFUSED))
def test_open_refusals_match_qemu(qemu: Qemu, base: bytes, tmp_path: Path, damage: str) -> None:
    """Where QEMU refuses to open the image, we refuse with its reason (and name the
    field and value), in bounded memory and before any write."""
    raw = bytearray(base)
    OPEN_REFUSED[damage](raw)
    path = tmp_path / "hostile.qcow2"
    path.write_bytes(raw)
    theirs = qemu.img("info", str(path), check=False)
    assert theirs.returncode == 1
    reason = theirs.stderr.strip().split(f"'{path}': ", 1)[1].splitlines()[0]
    before = _sha(path)
    for mode in ("r", "r+"):
        tracemalloc.start()
        try:
            with pytest.raises(Qcow2FormatError) as info:
                qcow2aio.Image(str(path), mode).close()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20, peak
        text = str(info.value)
        assert OUR_WORDS[damage] in text
        ours = info.value.qemu_message if isinstance(info.value, SnapshotTableError) else text
        assert reason.lower() in ours.lower(), (reason, ours)
    assert _sha(path) == before


def test_repair_read_of_huge_extra_data_is_bounded(base: bytes, tmp_path: Path) -> None:
    """``check -r all`` reading entries that claim 4 GiB of extra data each keeps 1024
    bytes of each (QEMU's cut) and drops what lies past 2 GiB: memory stays small."""
    raw = bytearray(base)
    for e in _entries(raw):
        struct.pack_into(">I", raw, e + 36, 0xFFFFFFFF)
    path = tmp_path / "huge-extra.qcow2"
    path.write_bytes(raw)
    file = FileBackend(str(path), False)
    try:
        nb, offset = struct.unpack_from(">IQ", raw, 60)
        tracemalloc.start()
        try:
            read = read_snapshot_table_for_check(file, offset, 65536, repair=True)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        file.close()
    assert peak < 4 << 20, peak
    # The first entry already ends past 2 GiB: every entry is dropped, and reported.
    assert read.snapshots == [] and read.nb_reduced == 65536
    assert read.extra_data_dropped == 1
    assert read.messages == [
        "Discarding too much extra metadata in snapshot table entry 0 (4294967295 > 1024)",
        "Discarding 65536 overhanging snapshots (snapshot table is too big)",
    ]
    with pytest.raises(SnapshotTableError) as info:
        file = FileBackend(str(path), False)
        try:
            read_snapshot_table_for_check(file, offset, nb, repair=False)
        finally:
            file.close()
    assert info.value.qemu_message == "Too much extra metadata in snapshot table entry 0"


def test_check_of_copy_leaves_hostile_original(base: bytes, tmp_path: Path) -> None:
    """A read-only check of a hostile table reports without writing."""
    raw = bytearray(base)
    _extra(0xFFFFFFFF)(raw)
    path = tmp_path / "x.qcow2"
    path.write_bytes(raw)
    before = _sha(path)
    file = FileBackend(str(path), False)
    try:
        meta = Metadata(file, writable=False, check=True)
        result = check_image(meta)
    finally:
        file.close()
    assert result.error == "File too large"
    assert result.messages[0] == (
        "qemu-img: ERROR failed to read the snapshot table: Too much extra metadata in "
        "snapshot table entry 1"
    )
    assert _sha(path) == before


def _l1_past_eof(raw: bytearray) -> None:
    struct.pack_into(">Q", raw, _entries(raw)[1], 1 << 30)


@pytest.mark.parametrize("op", ["apply-damaged", "delete-damaged"])
def test_l1_past_eof_refused_when_used(base: bytes, tmp_path: Path, op: str) -> None:
    """A snapshot whose L1 table lies past the end of the file: loading or deleting it
    is refused before anything is written (QEMU's delete frees half and fails:
    ``qcow2_free_clusters failed: Invalid argument``)."""
    raw = bytearray(base)
    _l1_past_eof(raw)
    path = tmp_path / "eof.qcow2"
    path.write_bytes(raw)
    before = _sha(path)
    with qcow2aio.Image(str(path), "r+") as img, pytest.raises(Qcow2CorruptError) as info:
        if op == "apply-damaged":
            img.apply_snapshot_sync("s2")
        else:
            img.delete_snapshot_sync("s2")
    assert "0x40000000" in str(info.value)
    assert _sha(path) == before


@pytest.mark.parametrize("op", ["create", "apply-healthy", "delete-healthy"])
def test_l1_past_eof_other_snapshots_usable(
    qemu: Qemu, base: bytes, tmp_path: Path, op: str
) -> None:
    """The other snapshots stay usable, as in QEMU: the same snapshot list afterwards."""
    raw = bytearray(base)
    _l1_past_eof(raw)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    ours.write_bytes(raw)
    theirs.write_bytes(raw)
    args = {"create": ["-c", "new"], "apply-healthy": ["-a", "s1"], "delete-healthy": ["-d", "s3"]}
    qemu.img("snapshot", *args[op], str(theirs))
    with qcow2aio.Image(str(ours), "r+") as img:
        OPS[op](img)
    rows = [qemu.img("snapshot", "-l", str(p)).stdout.splitlines() for p in (ours, theirs)]
    assert [r.split()[:2] for r in rows[0]] == [r.split()[:2] for r in rows[1]]
    assert qemu.convert_raw(ours) == qemu.convert_raw(theirs)
