"""LUKS1 (qcow2aio.crypto.luks) against QEMU 7.2, the judge.

* Areas QEMU writes (``qemu-img create -f qcow2 ... encrypt.format=luks`` with several
  ciphers and hashes, ``qemu-img amend`` adding a key): we parse them, ``info()`` equals
  ``qemu-img info``'s (same key order), we unlock them, and the master key decrypts a
  data cluster QEMU wrote (IV = host sector).
* Areas we write (``format_area``, ``add_keyslot``, ``erase_keyslots``) are put in a raw
  LUKS file (the same header and keyslots, the payload after the area with sectors
  numbered from 0 there), which QEMU must open with the right passphrase only, and
  whose ``qemu-img info`` must show our slots.
* Keyslot refusals: QEMU's ``qemu-img amend`` and ours on the same bytes give the same
  message; an erase by QEMU and by us leave the same header bytes.

A qcow2 LUKS create costs ~2 s of QEMU's PBKDF2 timing, so each QEMU image is built
once per run and shared by every test and every xdist worker (a file lock in the run's
shared temporary directory).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import QemuCommandError

from qcow2aio.crypto.ciphers import make_cipher
from qcow2aio.crypto.luks import (
    LUKS_HEADER_SIZE,
    MAX_PBKDF2_ITERATIONS,
    LuksHeader,
    Qcow2KeyslotError,
    add_keyslot,
    af_merge,
    af_split,
    erase_keyslots,
    format_area,
    unlock,
)
from qcow2aio.errors import Qcow2Error, Qcow2PassphraseError, Qcow2UnsupportedError

PW0 = b"pw-zero-0"
PW1 = b"pw-one-1"
PW2 = b"pw-two-2"
WRONG = b"not-the-passphrase"
PATTERN = 0x5A
EXT_CRYPTO = 0x0537BE77
_PBKDF_FLAKE = "Unable to get accurate CPU usage"

# name -> (qemu-img create -o options, format_area keyword arguments, derived names)
VARIANTS: dict[
    str, tuple[dict[str, str], dict[str, Any], tuple[str, str, str, str | None, str]]
] = {
    "aes-256-xts-plain64": ({}, {}, ("aes-256", "xts", "plain64", None, "sha256")),
    "aes-128-cbc-essiv-sha256": (
        {
            "cipher-alg": "aes-128",
            "cipher-mode": "cbc",
            "ivgen-alg": "essiv",
            "ivgen-hash-alg": "sha256",
        },
        {
            "cipher_alg": "aes-128",
            "cipher_mode": "cbc",
            "ivgen_alg": "essiv",
            "ivgen_hash_alg": "sha256",
        },
        ("aes-128", "cbc", "essiv", "sha256", "sha256"),
    ),
    "aes-256-cbc-plain": (
        {"cipher-alg": "aes-256", "cipher-mode": "cbc", "ivgen-alg": "plain"},
        {"cipher_alg": "aes-256", "cipher_mode": "cbc", "ivgen_alg": "plain"},
        ("aes-256", "cbc", "plain", None, "sha256"),
    ),
    "aes-128-ecb": (
        {"cipher-alg": "aes-128", "cipher-mode": "ecb"},
        {"cipher_alg": "aes-128", "cipher_mode": "ecb"},
        ("aes-128", "ecb", "plain64", None, "sha256"),
    ),
    "sha1": (
        {"hash-alg": "sha1"},
        {"hash_alg": "sha1"},
        ("aes-256", "xts", "plain64", None, "sha1"),
    ),
    "sha512": (
        {"hash-alg": "sha512"},
        {"hash_alg": "sha512"},
        ("aes-256", "xts", "plain64", None, "sha512"),
    ),
}
DEFAULT = "aes-256-xts-plain64"


# -- QEMU helpers ------------------------------------------------------------------


def _secrets(**named: bytes) -> list[str]:
    args: list[str] = []
    for name, value in named.items():
        args += ["--object", f"secret,id={name},data={value.decode()}"]
    return args


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a QEMU tool; retries only QEMU's LUKS PBKDF timing flake. On a busy machine
    it hits most attempts (26 of 30 creates of the essiv image failed so while other
    test runs shared the CPUs), but a failing attempt costs ~30 ms: it gives up in its
    first timing round. Hence many more attempts than conftest's helper makes."""
    for _ in range(100):
        proc = subprocess.run(
            argv, capture_output=True, text=True, errors="replace", timeout=300, check=False
        )
        if proc.returncode == 0 or _PBKDF_FLAKE not in proc.stderr:
            break
    if check and proc.returncode != 0:
        raise QemuCommandError(argv, proc, "QEMU tool failed")
    return proc


def qcow2_luks_area(path: Path) -> tuple[int, bytes]:
    """(area offset, area bytes) from the qcow2 v3 header's crypto extension."""
    data = path.read_bytes()
    (header_length,) = struct.unpack_from(">I", data, 100)
    pos = header_length
    while pos + 8 <= 65536:
        ext_type, ext_len = struct.unpack_from(">II", data, pos)
        if ext_type == 0:
            break
        if ext_type == EXT_CRYPTO:
            offset, length = struct.unpack_from(">QQ", data, pos + 8)
            return offset, data[offset : offset + length]
        pos += 8 + (ext_len + 7) // 8 * 8
    raise AssertionError(f"no crypto header extension in {path}")


def luks_opts(path: Path) -> str:
    return f"driver=luks,key-secret=s,file.filename={path}"


def qemu_io_luks(path: Path, passphrase: bytes, *cmds: str) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", *_secrets(s=passphrase), "--image-opts"]
    for cmd in cmds:
        argv += ["-c", cmd]
    return _run([*argv, luks_opts(path)], check=False)


def qemu_info(path: Path, fmt: str) -> dict[str, Any]:
    proc = _run(["qemu-img", "info", "-f", fmt, "--output=json", str(path)])
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def qemu_amend_luks(
    path: Path, passphrase: bytes, options: str, *, force: bool = False, **named: bytes
) -> subprocess.CompletedProcess[str]:
    """``qemu-img amend`` of a raw LUKS file unlocked with ``passphrase``."""
    argv = ["qemu-img", "amend", *_secrets(s=passphrase, **named), "--image-opts"]
    if force:
        argv.append("--force")
    return _run([*argv, luks_opts(path), "-o", options], check=False)


def qemu_message(proc: subprocess.CompletedProcess[str]) -> str:
    """QEMU's error message without the ``qemu-img: `` prefix (and the trailing space
    QEMU leaves after ``... already erased (inactive)``)."""
    assert proc.returncode != 0, proc.stdout
    line = proc.stderr.strip().splitlines()[-1]
    return line.removeprefix("qemu-img: ").strip()


# -- images QEMU makes, built once per run -----------------------------------------


@dataclass
class QemuImage:
    path: Path
    area_offset: int
    area: bytes
    info: dict[str, Any]  # format-specific.data.encrypt

    def read(self, offset: int, length: int) -> bytes:
        return self.area[offset : offset + length]

    @property
    def header(self) -> LuksHeader:
        return LuksHeader.parse(self.area, len(self.area))


class SharedImages:
    """QEMU images shared by all tests and xdist workers of a run (built under a lock)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, QemuImage] = {}

    def _file(self, name: str, build: Callable[[Path], None]) -> Path:
        target = self.root / name
        with open(self.root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                tmp = self.root / f"{name}.building"
                tmp.unlink(missing_ok=True)
                build(tmp)
                tmp.rename(target)
        return target

    def image(self, variant: str) -> QemuImage:
        if variant not in self._cache:
            path = self._file(f"{variant}.qcow2", lambda p: _build_qcow2(p, variant))
            offset, area = qcow2_luks_area(path)
            info = qemu_info(path, "qcow2")["format-specific"]["data"]["encrypt"]
            self._cache[variant] = QemuImage(path, offset, area, info)
        return self._cache[variant]


def _build_qcow2(path: Path, variant: str) -> None:
    options = {"encrypt.format": "luks", "encrypt.key-secret": "s", "encrypt.iter-time": "10"}
    options |= {f"encrypt.{k}": v for k, v in VARIANTS[variant][0].items()}
    opt = ",".join(f"{k}={v}" for k, v in options.items())
    _run(["qemu-img", "create", "-q", "-f", "qcow2", *_secrets(s=PW0), "-o", opt, str(path), "1M"])
    image_opts = f"driver=qcow2,file.filename={path},encrypt.key-secret=s"
    _run(
        [
            "qemu-io",
            *_secrets(s=PW0),
            "--image-opts",
            "-c",
            f"write -P {PATTERN:#x} 0 64k",
            image_opts,
        ]
    )
    if variant == DEFAULT:
        _run(
            [
                "qemu-img",
                "amend",
                *_secrets(s=PW0, s1=PW1),
                "--image-opts",
                image_opts,
                "-o",
                "encrypt.keyslot=1,encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10",
            ]
        )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, qemu_tools: dict[str, str]) -> SharedImages:
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's directory, common to its workers
    root = base / "luks-shared"
    root.mkdir(exist_ok=True)
    return SharedImages(root)


def data_host_offset(image: QemuImage) -> int:
    """Host offset of guest offset 0 (QEMU wrote the pattern there), from L1[0] and
    L2[0] (``qemu-img map`` does not show offsets of encrypted images)."""
    data = image.path.read_bytes()
    (l1_offset,) = struct.unpack_from(">Q", data, 40)
    mask = 0x00FFFFFFFFFFFE00
    (l1_entry,) = struct.unpack_from(">Q", data, l1_offset)
    (l2_entry,) = struct.unpack_from(">Q", data, l1_entry & mask)
    offset: int = l2_entry & mask
    assert offset and not l2_entry & (1 << 62), hex(l2_entry)  # allocated, not compressed
    return offset


# -- raw LUKS files we make --------------------------------------------------------


def write_raw_luks(path: Path, area: bytes, master_key: bytes, size: int = 65536) -> LuksHeader:
    """A raw LUKS file: ``area``, then ``size`` bytes of PATTERN encrypted with sectors
    numbered from 0 at the payload start (how QEMU's raw luks driver numbers them)."""
    header = LuksHeader.parse(area, len(area))
    payload = bytearray([PATTERN]) * size
    make_cipher(
        header.cipher_alg, header.cipher_mode, header.ivgen_alg, header.ivgen_hash_alg, master_key
    ).encrypt(payload, 0)
    path.write_bytes(area + bytes(payload))
    return header


def apply_writes(path: Path, writes: list[tuple[int, bytes]]) -> None:
    with open(path, "r+b") as f:
        for offset, data in writes:
            f.seek(offset)
            f.write(data)


def read_file(path: Path) -> Callable[[int, int], bytes]:
    data = path.read_bytes()
    return lambda offset, length: data[offset : offset + length]


def assert_qemu_opens(path: Path, passphrase: bytes) -> None:
    proc = qemu_io_luks(path, passphrase, f"read -P {PATTERN:#x} 0 64k")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "read 65536/65536" in out and "fail" not in out.lower(), out


def assert_qemu_refuses(path: Path, passphrase: bytes) -> None:
    proc = qemu_io_luks(path, passphrase, "read 0 512")
    assert proc.returncode != 0
    assert "Invalid password, cannot unlock any keyslot" in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def two_slot_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, bytes]]:
    """A raw LUKS file of ours: PW0 in slot 0, PW1 in slot 1 (path, master key)."""
    path = tmp_path_factory.mktemp("luks2") / "two.luks"
    area, master_key = format_area(PW0, iter_time_ms=10)
    header = write_raw_luks(path, area, master_key)
    _, writes = add_keyslot(header, master_key, PW1, iter_time_ms=10)
    apply_writes(path, writes)
    yield path, master_key


def copy(src: Path, dst_dir: Path, name: str) -> Path:
    dst = dst_dir / name
    shutil.copyfile(src, dst)
    return dst


def header_of(path: Path) -> LuksHeader:
    data = path.read_bytes()
    header = LuksHeader.parse(data, len(data))
    return header


# -- QEMU's areas ------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parse_matches_qemu_info(shared: SharedImages, variant: str) -> None:
    image = shared.image(variant)
    header = image.header
    want = {k: v for k, v in image.info.items() if k != "format"}
    got = header.info()
    assert got == want
    assert list(got) == list(want)
    assert list(got["slots"][0]) == list(want["slots"][0])
    # With the format member, in the place QEMU's JSON has it.
    assert list(header.info(format_name="luks")) == list(image.info)
    assert header.info(format_name="luks") == image.info
    cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg, hash_alg = VARIANTS[variant][2]
    assert (
        header.cipher_alg,
        header.cipher_mode,
        header.ivgen_alg,
        header.ivgen_hash_alg,
        header.hash_alg,
    ) == (cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg, hash_alg)
    # The codec round trip, byte for byte.
    assert header.to_bytes() == image.area[:LUKS_HEADER_SIZE]
    assert LuksHeader.parse(header.to_bytes(), len(image.area)) == header
    assert header.payload_offset * 512 == len(image.area)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_unlock_decrypts_qemu_data(shared: SharedImages, variant: str) -> None:
    image = shared.image(variant)
    header = image.header
    master_key, slot = unlock(header, image.read, PW0)
    assert slot == 0 and len(master_key) == header.key_bytes
    host = data_host_offset(image)
    data = bytearray(image.path.read_bytes()[host : host + 65536])
    make_cipher(
        header.cipher_alg, header.cipher_mode, header.ivgen_alg, header.ivgen_hash_alg, master_key
    ).decrypt(data, host // 512)
    assert data == bytes([PATTERN]) * 65536
    with pytest.raises(Qcow2PassphraseError) as err:
        unlock(header, image.read, WRONG)
    assert str(err.value) == "Invalid password, cannot unlock any keyslot"
    assert WRONG.decode() not in repr(err.value)


def test_unlock_slot_added_by_qemu_amend(shared: SharedImages) -> None:
    image = shared.image(DEFAULT)
    header = image.header
    assert [s.active for s in header.slots] == [True, True] + [False] * 6
    key0, slot0 = unlock(header, image.read, PW0)
    key1, slot1 = unlock(header, image.read, PW1)
    assert (slot0, slot1) == (0, 1) and key0 == key1


def test_qemu_iteration_rule(shared: SharedImages) -> None:
    """QEMU times PBKDF2 with the real output length: a 64-byte sha256 slot key is two
    blocks, the 20-byte digest one, and the digest gets an eighth of the time, so its
    count is about a quarter of the slot's. Ours follows the same rule with our rate."""
    qemu = shared.image("sha1").header  # sha1: 64-byte key = 4 blocks, so about 1/2
    assert 1.2 < qemu.slots[0].iterations / qemu.mk_digest_iter < 3.5
    qemu = shared.image(DEFAULT).header
    assert 2.5 < qemu.slots[0].iterations / qemu.mk_digest_iter < 6
    area, _ = format_area(PW0, iter_time_ms=40)
    ours = LuksHeader.parse(area, len(area))
    assert 2.5 < ours.slots[0].iterations / ours.mk_digest_iter < 6
    # Floors: 1000 for both (sha512 is slow enough that 1 ms / 8 is below it).
    area, _ = format_area(PW0, hash_alg="sha512", iter_time_ms=1)
    ours = LuksHeader.parse(area, len(area))
    assert ours.mk_digest_iter == 1000 and ours.slots[0].iterations >= 1000


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_format_area_layout_matches_qemu(shared: SharedImages, variant: str) -> None:
    qemu_area = shared.image(variant).area
    qemu = LuksHeader.parse(qemu_area, len(qemu_area))
    area, master_key = format_area(PW0, iter_time_ms=10, **VARIANTS[variant][1])
    ours = LuksHeader.parse(area, len(area))
    assert len(area) == len(qemu_area)  # 2068480 for 64-byte keys, 528384 for 16
    assert len(area) == {16: 528384, 32: 1052672, 64: 2068480}[ours.key_bytes]
    assert len(master_key) == ours.key_bytes == qemu.key_bytes
    same = ("cipher_name", "cipher_mode_spec", "hash_spec", "payload_offset", "key_bytes")
    assert {f: getattr(ours, f) for f in same} == {f: getattr(qemu, f) for f in same}
    for mine, theirs in zip(ours.slots, qemu.slots, strict=True):
        assert (mine.key_offset, mine.stripes) == (theirs.key_offset, theirs.stripes)
    # Slot 0 active; the others exactly as QEMU writes inactive slots (0xDEAD, 0, 0).
    assert [s.active for s in ours.slots] == [True] + [False] * 7
    assert area[208 + 2 * 48 : LUKS_HEADER_SIZE] == qemu_area[208 + 2 * 48 : LUKS_HEADER_SIZE]
    # Zeros everywhere but the header and the active slots' material, as in QEMU's area.
    for header, data in ((ours, area), (qemu, qemu_area)):
        assert _zeros_outside_material(header, data)


def _zeros_outside_material(header: LuksHeader, data: bytes) -> bool:
    used = [(0, LUKS_HEADER_SIZE)] + [
        (s.key_offset * 512, s.key_offset * 512 + header.key_bytes * s.stripes)
        for s in header.slots
        if s.active
    ]
    buf = bytearray(data)
    for start, end in used:
        buf[start:end] = bytes(end - start)
    return buf.count(0) == len(buf)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_format_area_opened_by_qemu(tmp_path: Path, variant: str) -> None:
    area, master_key = format_area(PW0, iter_time_ms=10, **VARIANTS[variant][1])
    path = tmp_path / "ours.luks"
    header = write_raw_luks(path, area, master_key)
    assert_qemu_opens(path, PW0)
    assert_qemu_refuses(path, WRONG)
    assert qemu_info(path, "luks")["format-specific"]["data"] == header.info()
    assert unlock(header, read_file(path), PW0) == (master_key, 0)


# -- keyslot changes ---------------------------------------------------------------


def test_add_keyslot_opened_by_qemu(tmp_path: Path) -> None:
    area, master_key = format_area(PW0, iter_time_ms=10)
    path = tmp_path / "add.luks"
    header = write_raw_luks(path, area, master_key)
    new, writes = add_keyslot(header, master_key, PW1, iter_time_ms=10)
    # Key material first, the header last.
    assert [offset for offset, _ in writes] == [header.slots[1].key_offset * 512, 0]
    assert len(writes[0][1]) == 64 * 4000
    apply_writes(path, writes)
    new, writes = add_keyslot(new, master_key, PW2, slot=5, iter_time_ms=10)
    apply_writes(path, writes)
    assert [s.active for s in new.slots] == [True, True, False, False, False, True, False, False]
    assert header_of(path) == new
    for passphrase in (PW0, PW1, PW2):
        assert_qemu_opens(path, passphrase)
    assert_qemu_refuses(path, WRONG)
    assert qemu_info(path, "luks")["format-specific"]["data"] == new.info()
    assert unlock(new, read_file(path), PW2) == (master_key, 5)
    with pytest.raises(ValueError, match="master-key digest"):
        add_keyslot(new, bytes(64), PW1, iter_time_ms=10)


def test_add_keyslot_like_qemu(two_slot_file: tuple[Path, bytes], tmp_path: Path) -> None:
    """QEMU's amend and our add_keyslot change the same header fields in the same way."""
    src, master_key = two_slot_file
    theirs = copy(src, tmp_path, "theirs.luks")
    proc = qemu_amend_luks(theirs, PW0, "state=active,new-secret=s2,iter-time=10", s2=PW2)
    assert proc.returncode == 0, proc.stderr
    before = header_of(src)
    mine, _ = add_keyslot(before, master_key, PW2, iter_time_ms=10)
    qemu = header_of(theirs)
    for a, b in zip(mine.slots, qemu.slots, strict=True):
        assert (a.active, a.key_offset, a.stripes) == (b.active, b.key_offset, b.stripes)
    assert mine.slots[2].salt != before.slots[2].salt
    assert (mine.mk_digest, mine.uuid) == (qemu.mk_digest, qemu.uuid)


def test_erase_like_qemu(two_slot_file: tuple[Path, bytes], tmp_path: Path) -> None:
    """Erasing by passphrase and by index: the same header bytes as QEMU's amend, the
    material overwritten, the header written first, QEMU then refuses the passphrase."""
    src, _ = two_slot_file
    original = src.read_bytes()
    header = header_of(src)
    slot1 = header.slots[1].key_offset * 512
    material = slice(slot1, slot1 + 64 * 4000)

    theirs = copy(src, tmp_path, "theirs.luks")
    proc = qemu_amend_luks(theirs, PW0, "state=inactive,old-secret=s1", s1=PW1)
    assert proc.returncode == 0, proc.stderr
    ours = copy(src, tmp_path, "ours.luks")
    new, writes = erase_keyslots(header, read_file(src), old_passphrase=PW1)
    assert [offset for offset, _ in writes] == [0, slot1]
    apply_writes(ours, writes)
    assert ours.read_bytes()[:LUKS_HEADER_SIZE] == theirs.read_bytes()[:LUKS_HEADER_SIZE]
    assert not new.slots[1].active and new.slots[1].iterations == 0
    assert new.slots[1].salt == bytes(32)
    for path in (ours, theirs):
        assert path.read_bytes()[material] != original[material]
    assert_qemu_refuses(ours, PW1)
    assert_qemu_opens(ours, PW0)

    # By index: slot 0, leaving PW1.
    theirs = copy(src, tmp_path, "theirs0.luks")
    proc = qemu_amend_luks(theirs, PW0, "state=inactive,keyslot=0")
    assert proc.returncode == 0, proc.stderr
    ours = copy(src, tmp_path, "ours0.luks")
    _, writes = erase_keyslots(header, read_file(src), slot=0)
    apply_writes(ours, writes)
    assert ours.read_bytes()[:LUKS_HEADER_SIZE] == theirs.read_bytes()[:LUKS_HEADER_SIZE]
    assert_qemu_refuses(ours, PW0)
    assert_qemu_opens(ours, PW1)

    # Forced: erasing both slots by index; the last one needs force, as in QEMU.
    theirs = copy(src, tmp_path, "theirsf.luks")
    ours = copy(src, tmp_path, "oursf.luks")
    for slot in (0, 1):
        proc = qemu_amend_luks(theirs, PW1, f"state=inactive,keyslot={slot}", force=True)
        assert proc.returncode == 0, proc.stderr
    cur = header
    for slot in (0, 1):
        cur, writes = erase_keyslots(cur, read_file(ours), slot=slot, force=True)
        apply_writes(ours, writes)
    assert ours.read_bytes()[:LUKS_HEADER_SIZE] == theirs.read_bytes()[:LUKS_HEADER_SIZE]
    assert not any(s.active for s in cur.slots)


def _full_file(src: Path, dst: Path) -> None:
    """All eight slots marked active (slots 2..7 hold no valid key; QEMU unlocks with
    slot 0 before it looks at them)."""
    data = bytearray(src.read_bytes())
    for i in range(2, 8):
        struct.pack_into(">II32s", data, 208 + 48 * i, 0x00AC71F3, 1000, bytes(range(32)))
    dst.write_bytes(bytes(data))


def _only_slot0_file(src: Path, dst: Path) -> None:
    data = bytearray(src.read_bytes())
    struct.pack_into(">II32s", data, 208 + 48, 0x0000DEAD, 0, bytes(32))
    dst.write_bytes(bytes(data))


Scenario = tuple[str, Callable[[Path, Path], None] | None, str, dict[str, bytes], bool]

# (name, file transform, QEMU amend options, extra secrets, force)
REFUSALS: list[Scenario] = [
    ("add-over-active", None, "state=active,new-secret=s2,keyslot=1", {"s2": PW2}, False),
    ("add-bad-index", None, "state=active,new-secret=s2,keyslot=8", {"s2": PW2}, False),
    ("add-full", _full_file, "state=active,new-secret=s2", {"s2": PW2}, False),
    ("erase-inactive", None, "state=inactive,keyslot=3", {}, False),
    ("erase-no-match", None, "state=inactive,old-secret=s2", {"s2": PW2}, False),
    ("erase-slot-wrong-pw", None, "state=inactive,keyslot=0,old-secret=s1", {"s1": PW1}, False),
    ("erase-inactive-with-pw", None, "state=inactive,keyslot=2,old-secret=s1", {"s1": PW1}, False),
    ("erase-nothing-given", None, "state=inactive", {}, False),
    ("erase-only-slot", _only_slot0_file, "state=inactive,keyslot=0", {}, False),
    ("erase-all-match", _only_slot0_file, "state=inactive,old-secret=s0", {"s0": PW0}, False),
]


def _ours(name: str, header: LuksHeader, read: Callable[[int, int], bytes], key: bytes) -> None:
    if name == "add-over-active":
        add_keyslot(header, key, PW2, slot=1, iter_time_ms=10)
    elif name == "add-bad-index":
        add_keyslot(header, key, PW2, slot=8, iter_time_ms=10)
    elif name == "add-full":
        add_keyslot(header, key, PW2, iter_time_ms=10)
    elif name == "erase-inactive":
        erase_keyslots(header, read, slot=3)
    elif name == "erase-no-match":
        erase_keyslots(header, read, old_passphrase=PW2)
    elif name == "erase-slot-wrong-pw":
        erase_keyslots(header, read, slot=0, old_passphrase=PW1)
    elif name == "erase-inactive-with-pw":
        erase_keyslots(header, read, slot=2, old_passphrase=PW1)
    elif name == "erase-nothing-given":
        erase_keyslots(header, read)
    elif name == "erase-only-slot":
        erase_keyslots(header, read, slot=0)
    elif name == "erase-all-match":
        erase_keyslots(header, read, old_passphrase=PW0)
    else:
        raise AssertionError(name)


@pytest.mark.parametrize("scenario", REFUSALS, ids=[s[0] for s in REFUSALS])
def test_keyslot_refusals_match_qemu(
    two_slot_file: tuple[Path, bytes], tmp_path: Path, scenario: Scenario
) -> None:
    name, transform, options, named, force = scenario
    src, master_key = two_slot_file
    path = tmp_path / "f.luks"
    if transform is None:
        shutil.copyfile(src, path)
    else:
        transform(src, path)
    before = path.read_bytes()
    proc = qemu_amend_luks(path, PW0, options, force=force, **named)
    expected = qemu_message(proc)
    assert path.read_bytes() == before
    with pytest.raises(Qcow2Error) as err:
        _ours(name, header_of(path), read_file(path), master_key)
    assert str(err.value) == expected
    wrong_pw = name in ("erase-no-match", "erase-slot-wrong-pw", "erase-inactive-with-pw")
    assert isinstance(err.value, Qcow2PassphraseError if wrong_pw else Qcow2KeyslotError)
    for secret in (PW0, PW1, PW2):
        assert secret.decode() not in str(err.value)


def test_erase_by_passphrase_takes_every_slot_it_opens(two_slot_file: tuple[Path, bytes]) -> None:
    src, master_key = two_slot_file
    header = header_of(src)
    both, writes = add_keyslot(header, master_key, PW0, iter_time_ms=10)  # PW0 twice
    data = bytearray(src.read_bytes())
    for offset, chunk in writes:
        data[offset : offset + len(chunk)] = chunk
    new, writes = erase_keyslots(
        both, lambda o, n: bytes(data[o : o + n]), old_passphrase=PW0, force=False
    )
    assert [s.active for s in new.slots][:3] == [False, True, False]
    assert [o for o, _ in writes] == [
        0,
        both.slots[0].key_offset * 512,
        both.slots[2].key_offset * 512,
    ]


# -- units -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_bytes", "hash_alg"),
    [(64, "sha256"), (24, "sha256"), (16, "md5"), (32, "sha1"), (48, "sha512")],
)
def test_af_split_merge_round_trip(key_bytes: int, hash_alg: str) -> None:
    key = os.urandom(key_bytes)
    split = af_split(key, 4000, hash_alg)
    assert len(split) == key_bytes * 4000
    assert bytes(af_merge(split, key_bytes, 4000, hash_alg)) == key
    split[17] ^= 1  # any bit of any stripe changes the key
    assert bytes(af_merge(split, key_bytes, 4000, hash_alg)) != key


def test_aes_192_outside_xts_is_refused_at_create() -> None:
    with pytest.raises(Qcow2UnsupportedError, match="cipher-alg=aes-192"):
        format_area(PW0, cipher_alg="aes-192", cipher_mode="cbc", iter_time_ms=1)


def test_repr_and_messages_hold_no_secrets(shared: SharedImages) -> None:
    image = shared.image(DEFAULT)
    header = image.header
    text = repr(header)
    assert header.mk_digest.hex() not in text and repr(header.mk_digest) not in text
    assert header.slots[0].salt.hex() not in text and repr(header.slots[0].salt) not in text
    assert MAX_PBKDF2_ITERATIONS == 1 << 26
