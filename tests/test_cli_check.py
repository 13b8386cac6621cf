"""`qcow2aio check` prints what `qemu-img check` prints and exits with its codes."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Qemu
from sim import stress

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


# ------------------------------------------------------------- snapshot table damage
_SNAP_HDR = struct.Struct(">QIHHIIQII")


def _snap_image(qemu: Qemu, tmp: Path) -> Path:
    """Three snapshots of a 4 MiB image (one data cluster changed between them)."""
    path = tmp / "snaps.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(path), "4M")
    qemu.io(path, "write -P 1 0 64k")
    qemu.img("snapshot", "-c", "s1", str(path))
    qemu.io(path, "write -P 2 64k 64k")
    qemu.img("snapshot", "-c", "s2", str(path))
    qemu.img("snapshot", "-c", "s3", str(path))
    return path


def _entries(raw: bytes | bytearray) -> list[int]:
    """File offsets of the snapshot table's entries."""
    nb, pos = struct.unpack_from(">IQ", raw, 60)
    out = []
    for _ in range(nb):
        pos = (pos + 7) & ~7
        out.append(pos)
        h = _SNAP_HDR.unpack_from(raw, pos)
        pos += _SNAP_HDR.size + h[8] + h[2] + h[3]
    return out


def _short_extra(raw: bytearray) -> None:
    """Entries rewritten in place with 0, 8 and 16 bytes of extra data (v3 wants 16)."""
    start = struct.unpack_from(">Q", raw, 64)[0]
    out = bytearray()
    for i, pos in enumerate(_entries(raw)):
        h = list(_SNAP_HDR.unpack_from(raw, pos))
        extra = raw[pos + 40 : pos + 40 + h[8]]
        names = raw[pos + 40 + h[8] : pos + 40 + h[8] + h[2] + h[3]]
        h[8] = 8 * i
        out += bytes(-len(out) % 8) + _SNAP_HDR.pack(*h) + extra[: 8 * i] + names
    raw[start : start + len(out) + 64] = out + bytes(64)


def _damage(kind: str, raw: bytearray) -> None:
    ents = _entries(raw)
    table = struct.unpack_from(">Q", raw, 64)[0]
    if kind == "count-past-entries":  # two empty (incomplete) entries read past the table
        struct.pack_into(">I", raw, 60, 5)
    elif kind == "short-extra":
        _short_extra(raw)
    elif kind == "extra-too-big":  # cut to 1024 bytes; the next entry is read elsewhere
        struct.pack_into(">I", raw, ents[1] + 36, 1 << 20)
    elif kind == "table-unaligned":
        struct.pack_into(">Q", raw, 64, table + 8)
    elif kind == "table-past-eof":
        struct.pack_into(">Q", raw, 64, 1 << 40)
    elif kind == "table-at-max-offset":  # reads past BDRV_MAX_LENGTH: EIO
        struct.pack_into(">Q", raw, 64, (1 << 63) - 65536)
    elif kind == "too-many":
        struct.pack_into(">I", raw, 60, 0xFFFFFFFF)
    elif kind == "l1-unaligned":
        off = struct.unpack_from(">Q", raw, ents[1])[0]
        struct.pack_into(">Q", raw, ents[1], off + 512)
    elif kind == "l1-too-large":
        struct.pack_into(">I", raw, ents[1] + 8, (32 << 20) // 8 + 1)
    elif kind == "duplicate-names":  # legal in qcow2
        name_at = ents[1] + 40 + _SNAP_HDR.unpack_from(raw, ents[1])[8] + 1
        raw[name_at : name_at + 2] = b"s1"
    else:
        raise AssertionError(kind)


_DAMAGE = [
    "count-past-entries",
    "short-extra",
    "extra-too-big",
    "table-unaligned",
    "table-past-eof",
    "table-at-max-offset",
    "too-many",
    "l1-unaligned",
    "l1-too-large",
    "duplicate-names",
]


_JSON_TOO = {"short-extra", "extra-too-big"}


@pytest.mark.parametrize("kind", _DAMAGE)
def test_check_cli_snapshot_table_matches_qemu(qemu: Qemu, tmp_path: Path, kind: str) -> None:
    """``check`` and ``check -r all`` of a damaged snapshot table: the same text, JSON and
    exit code as qemu-img, and after the repair the same snapshot list; both repaired
    images then get the same verdict from ``qemu-img check``."""
    base = _snap_image(qemu, tmp_path)
    raw = bytearray(base.read_bytes())
    _damage(kind, raw)
    # The repair of 65536 empty entries takes qemu-img seconds: the long run only.
    repairs = (None,) if kind == "too-many" and not stress() else (None, "all")
    for repair in repairs:
        json_too = repair and kind in _JSON_TOO
        for output in ("human", "json") if json_too else ("human",):
            ours_path = tmp_path / f"ours-{output}.qcow2"
            theirs_path = tmp_path / f"theirs-{output}.qcow2"
            ours_path.write_bytes(raw)
            theirs_path.write_bytes(raw)
            args = [f"--output={output}"] + (["-r", repair] if repair else [])
            ours = _ours(*args, str(ours_path))
            theirs = _theirs(qemu, *args, str(theirs_path))
            where = (kind, repair, output, ours.stderr[-2000:], theirs.stderr[-2000:])
            assert ours.returncode == theirs.returncode, where
            assert ours.stdout.replace(str(ours_path), "X") == theirs.stdout.replace(
                str(theirs_path), "X"
            ), where
            assert ours.stderr.replace(str(ours_path), "X") == theirs.stderr.replace(
                str(theirs_path), "X"
            ), where
            if not repair:
                assert ours_path.read_bytes() == raw  # a check without -r writes nothing
                continue
            if kind == "too-many":
                # QEMU's repair fails here (its new table overlaps the old one, which
                # claims 65536 entries past the end of the file: "Marking image as
                # corrupt"), and its leak repair punches a hole over the freed old table
                # (discard), which qcow2aio does not do: only the output is compared.
                continue
            listed = [
                qemu.img("snapshot", "-l", str(p), check=False) for p in (ours_path, theirs_path)
            ]
            assert listed[0].returncode == listed[1].returncode
            assert listed[0].stdout == listed[1].stdout
            assert listed[0].stderr.replace(str(ours_path), "X") == listed[1].stderr.replace(
                str(theirs_path), "X"
            )
            after = [_theirs(qemu, str(p)) for p in (ours_path, theirs_path)]
            assert after[0].returncode == after[1].returncode
            assert after[0].stdout == after[1].stdout
