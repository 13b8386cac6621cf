"""Hostile LUKS headers: :meth:`LuksHeader.parse` refuses each one quickly, with a
:class:`Qcow2Error` naming the field and the value, and QEMU's verdict on the very
same bytes (in a raw LUKS file) is recorded beside ours.

QEMU's verdicts, one of:

* ``info``: ``qemu-img info -f luks`` refuses the header (message fragment given);
* ``open``: QEMU accepts the header but cannot open the image (``qemu-io`` fails);
* ``accepts``: QEMU opens the image and reads its data. We refuse on purpose; the
  case says why;
* ``hangs``: ``qemu-io`` is still running PBKDF2 after 2 s (it would take hours);
  we refuse because of :data:`MAX_PBKDF2_ITERATIONS`.
"""

from __future__ import annotations

import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from qcow2aio.crypto.ciphers import make_cipher
from qcow2aio.crypto.luks import (
    MAX_PBKDF2_ITERATIONS,
    LuksHeader,
    format_area,
    unlock,
)
from qcow2aio.errors import Qcow2Error, Qcow2FormatError, Qcow2UnsupportedError

PW = b"hostile-pw"
PAYLOAD = 65536
QEMU_HANG_SECONDS = 2.0

Mutation = Callable[[bytearray], None]


def _at(offset: int, fmt: str, value: object) -> Mutation:
    def mutate(area: bytearray) -> None:
        struct.pack_into(fmt, area, offset, value)

    return mutate


def _bytes(offset: int, data: bytes) -> Mutation:
    def mutate(area: bytearray) -> None:
        area[offset : offset + len(data)] = data

    return mutate


def _name(offset: int, text: bytes) -> Mutation:
    """A 32-byte name field set to ``text``, NUL padded."""
    return _bytes(offset, text.ljust(32, b"\0"))


def _slot(i: int, field: str, value: int) -> Mutation:
    offset = 208 + 48 * i + {"active": 0, "iterations": 4, "key_offset": 40, "stripes": 44}[field]
    return _at(offset, ">I", value)


CIPHER, MODE, HASH, PAYLOAD_OFF, KEY_BYTES, MK_ITER, UUID = 8, 40, 72, 104, 108, 164, 168


@dataclass
class Case:
    name: str
    mutate: Mutation
    error: type[Qcow2Error]
    says: tuple[str, ...]  # fragments of our message (field and value)
    qemu: str  # "info" | "open" | "accepts" | "hangs"
    qemu_says: str = ""
    why: str = ""  # where QEMU accepts or hangs: why we refuse anyway


# fmt: off
CASES = [
    Case("magic", _bytes(0, b"LUKX"), Qcow2FormatError, ("magic", "LUKX"), "info",
         "Volume is not in LUKS format"),
    Case("version", _at(6, ">H", 2), Qcow2UnsupportedError, ("version", "2"), "info",
         "LUKS version 2 is not supported"),
    Case("cipher-unterminated", _bytes(CIPHER, b"a" * 32), Qcow2FormatError,
         ("cipher_name", "not NUL terminated"), "info",
         "LUKS header cipher name is not NUL terminated"),
    Case("mode-unterminated", _bytes(MODE, b"x" * 32), Qcow2FormatError,
         ("cipher_mode", "not NUL terminated"), "info",
         "LUKS header cipher mode is not NUL terminated"),
    Case("hash-unterminated", _bytes(HASH, b"s" * 32), Qcow2FormatError,
         ("hash_spec", "not NUL terminated"), "info",
         "LUKS header hash spec is not NUL terminated"),
    Case("cipher-non-ascii", _name(CIPHER, b"a\xe9s"), Qcow2FormatError,
         ("cipher_name", "not ASCII", "\\xe9"), "info", "with key size 32 bytes not supported"),
    Case("uuid-unterminated", _bytes(UUID, b"u" * 40), Qcow2FormatError,
         ("uuid", "not NUL terminated"), "accepts",
         why="QEMU reads the uuid on into slot 0's fields; no tool writes such a header"),
    Case("uuid-non-ascii", _bytes(UUID, b"\xff\xfe\0"), Qcow2FormatError,
         ("uuid", "not ASCII", "\\xff"), "accepts",
         why="QEMU would put the raw bytes in its JSON; a LUKS uuid is ASCII by definition"),
    Case("twofish", _name(CIPHER, b"twofish"), Qcow2UnsupportedError,
         ("Unsupported cipher", "twofish", "cipher_name"), "open", "Invalid password",
         why="QEMU knows twofish (here it only fails because the material is AES)"),
    Case("serpent", _name(CIPHER, b"serpent"), Qcow2UnsupportedError,
         ("Unsupported cipher", "serpent", "cipher_name"), "open", "Invalid password",
         why="QEMU knows serpent (here it only fails because the material is AES)"),
    Case("cast5", _name(CIPHER, b"cast5"), Qcow2UnsupportedError,
         ("Unsupported cipher", "cast5", "cipher_name"), "info",
         "Algorithm 'cast5' with key size 32 bytes not supported"),
    Case("unknown-cipher", _name(CIPHER, b"foo"), Qcow2UnsupportedError,
         ("Unsupported cipher", "'foo'"), "info", "Algorithm 'foo'"),
    Case("cipher-upper-case", _name(CIPHER, b"AES"), Qcow2UnsupportedError,
         ("Unsupported cipher", "'AES'"), "info", "Algorithm 'AES'"),
    Case("mode-without-ivgen", _name(MODE, b"ecb"), Qcow2FormatError,
         ("cipher_mode", "'ecb'"), "info", "Unexpected cipher mode string format 'ecb'"),
    Case("mode-gcm", _name(MODE, b"gcm-plain64"), Qcow2UnsupportedError,
         ("Cipher mode 'gcm'", "cipher_mode"), "info", "Cipher mode 'gcm' not supported"),
    Case("ivgen-benbi", _name(MODE, b"xts-benbi"), Qcow2UnsupportedError,
         ("IV generator 'benbi'", "cipher_mode"), "info", "IV generator 'benbi' not supported"),
    Case("ivgen-empty", _name(MODE, b"xts-"), Qcow2UnsupportedError,
         ("IV generator ''", "cipher_mode"), "info", "IV generator '' not supported"),
    Case("essiv-without-hash", _name(MODE, b"xts-essiv"), Qcow2FormatError,
         ("Missing IV generator hash", "cipher_mode"), "info",
         "Missing IV generator hash specification"),
    Case("essiv-sha1", _name(MODE, b"xts-essiv:sha1"), Qcow2UnsupportedError,
         ("key size 20", "cipher_mode", "xts-essiv:sha1"), "info",
         "No AES cipher with key size 20 available"),
    Case("ivgen-hash-unknown", _name(MODE, b"xts-plain64:whirlpool"), Qcow2UnsupportedError,
         ("Hash algorithm 'whirlpool'", "cipher_mode"), "info",
         "Hash algorithm 'whirlpool' not supported"),
    Case("hash-unknown", _name(HASH, b"whirlpool"), Qcow2UnsupportedError,
         ("Hash algorithm 'whirlpool'", "hash_spec"), "info",
         "Hash algorithm 'whirlpool' not supported"),
    Case("hash-upper-case", _name(HASH, b"SHA256"), Qcow2UnsupportedError,
         ("Hash algorithm 'SHA256'", "hash_spec"), "info", "Hash algorithm 'SHA256' not supported"),
    Case("key-bytes-20", _at(KEY_BYTES, ">I", 20), Qcow2FormatError, ("key_bytes=20",), "info",
         "Algorithm 'aes' with key size 10 bytes not supported"),
    Case("key-bytes-0", _at(KEY_BYTES, ">I", 0), Qcow2FormatError, ("key_bytes=0",), "info",
         "Algorithm 'aes' with key size 0 bytes not supported"),
    Case("key-bytes-huge", _at(KEY_BYTES, ">I", 1 << 28), Qcow2FormatError,
         (f"key_bytes={1 << 28}",), "info", "with key size 134217728 bytes not supported"),
    Case("payload-zero", _at(PAYLOAD_OFF, ">I", 0), Qcow2FormatError, ("payload_offset=0",),
         "info", "LUKS payload is overlapping with the header"),
    Case("payload-in-header", _at(PAYLOAD_OFF, ">I", 7), Qcow2FormatError, ("payload_offset=7",),
         "info", "LUKS payload is overlapping with the header"),
    Case("payload-over-slot-0", _at(PAYLOAD_OFF, ">I", 8), Qcow2FormatError,
         ("Keyslot 0", "payload_offset=8"), "info",
         "Keyslot 0 is overlapping with the encrypted payload"),
    Case("payload-over-slot-7", _at(PAYLOAD_OFF, ">I", 4039), Qcow2FormatError,
         ("Keyslot 7", "payload_offset=4039"), "info",
         "Keyslot 7 is overlapping with the encrypted payload"),
    Case("payload-beyond-area", _at(PAYLOAD_OFF, ">I", 4040 + 8), Qcow2FormatError,
         ("payload_offset=4048", "beyond the LUKS area"), "accepts",
         why="in qcow2 the area's length is the extension's; QEMU 7.2 accepts a larger payload "
         "offset there too (checked by hand), which lets slots reach clusters outside the area"),
    Case("payload-huge", _at(PAYLOAD_OFF, ">I", 0xFFFFFFFF), Qcow2FormatError,
         ("payload_offset=4294967295",), "info", "Could not refresh total sector count"),
    Case("mk-iter-zero", _at(MK_ITER, ">I", 0), Qcow2FormatError, ("mk_digest_iter=0",), "info",
         "LUKS key iteration count is zero"),
    Case("mk-iter-huge", _at(MK_ITER, ">I", 0xFFFFFFFF), Qcow2UnsupportedError,
         ("mk_digest_iter=4294967295", "MAX_PBKDF2_ITERATIONS"), "hangs",
         why="2^32 iterations of the digest: hours of PBKDF2 after the right passphrase"),
    Case("slot-iter-zero", _slot(0, "iterations", 0), Qcow2FormatError,
         ("slots[0].iterations=0",), "info", "Keyslot 0 iteration count is zero"),
    Case("slot-iter-huge", _slot(0, "iterations", 0xFFFFFFFF), Qcow2UnsupportedError,
         ("slots[0].iterations=4294967295", "MAX_PBKDF2_ITERATIONS"), "hangs",
         why="any passphrase, right or wrong, costs 2^32 PBKDF2 iterations"),
    Case("slot-stripes", _slot(3, "stripes", 3999), Qcow2FormatError,
         ("slots[3].stripes=3999",), "info", "Keyslot 3 is corrupted (stripes 3999 != 4000)"),
    Case("slot-stripes-one", _slot(0, "stripes", 1), Qcow2FormatError, ("slots[0].stripes=1",),
         "info", "Keyslot 0 is corrupted (stripes 1 != 4000)"),
    Case("slot-state", _slot(3, "active", 0x12345678), Qcow2FormatError,
         ("slots[3].active=0x12345678",), "info", "Keyslot 3 state (active/disable) is corrupted"),
    Case("slot-state-zero", _slot(5, "active", 0), Qcow2FormatError,
         ("slots[5].active=0x00000000",), "info", "Keyslot 5 state (active/disable) is corrupted"),
    Case("slots-overlap", _slot(3, "key_offset", 8 + 100), Qcow2FormatError,
         ("Keyslots 0 and 3", "slots[3].key_offset=108"), "info",
         "Keyslots 0 and 3 are overlapping in the header"),
    Case("slot-at-zero", _slot(0, "key_offset", 0), Qcow2FormatError,
         ("Keyslot 0", "LUKS header", "slots[0].key_offset=0"), "info",
         "Keyslot 0 is overlapping with the LUKS header"),
    Case("slot-inside-header", _slot(0, "key_offset", 1), Qcow2FormatError,
         ("Keyslot 0", "LUKS header", "slots[0].key_offset=1"), "info",
         "Keyslot 0 is overlapping with the LUKS header"),
    # QEMU keeps the first 4096 bytes for the header, though it is 592 bytes long.
    Case("slot-in-header-padding", _slot(0, "key_offset", 7), Qcow2FormatError,
         ("Keyslot 0", "LUKS header", "slots[0].key_offset=7"), "info",
         "Keyslot 0 is overlapping with the LUKS header"),
    # Slot spans are the material rounded up to 4096: 256000 bytes take 258048 (504 sectors).
    Case("slots-overlap-in-padding", _slot(1, "key_offset", 8 + 500), Qcow2FormatError,
         ("Keyslots 0 and 1", "slots[1].key_offset=508"), "info",
         "Keyslots 0 and 1 are overlapping in the header"),
    Case("slot-beyond-payload", _slot(7, "key_offset", 4040), Qcow2FormatError,
         ("Keyslot 7", "slots[7].key_offset=4040"), "info",
         "Keyslot 7 is overlapping with the encrypted payload"),
    Case("inactive-slot-far-away", _slot(6, "key_offset", 1 << 30), Qcow2FormatError,
         ("Keyslot 6", f"slots[6].key_offset={1 << 30}"), "info",
         "Keyslot 6 is overlapping with the encrypted payload"),
]
# fmt: on


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """(area, encrypted payload) of a valid aes-256-xts-plain64 image of ours."""
    area, master_key = format_area(PW, iter_time_ms=10)
    header = LuksHeader.parse(area, len(area))
    payload = bytearray(PAYLOAD)
    make_cipher(
        header.cipher_alg, header.cipher_mode, header.ivgen_alg, header.ivgen_hash_alg, master_key
    ).encrypt(payload, 0)
    return area, bytes(payload)


def _qemu_io(path: Path, command: str) -> list[str]:
    return [
        "qemu-io",
        "--object",
        f"secret,id=s,data={PW.decode()}",
        "--image-opts",
        "-c",
        command,
        f"driver=luks,key-secret=s,file.filename={path}",
    ]


def qemu_verdict(path: Path, command: str = "read 0 4k") -> tuple[str, str]:
    """What QEMU makes of the raw LUKS file: (verdict, message). ``accepts`` means
    qemu-io unlocked it and ran ``command`` (a read) without an error."""
    info = subprocess.run(
        ["qemu-img", "info", "-f", "luks", "--output=json", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        check=False,
    )
    if info.returncode != 0:
        return "info", info.stderr.strip()
    with subprocess.Popen(
        _qemu_io(path, command),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    ) as proc:
        try:
            out, err = proc.communicate(timeout=QEMU_HANG_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return "hangs", ""
    if proc.returncode != 0:
        return "open", (out + err).strip()
    assert "read " in out and not any(w in (out + err).lower() for w in ("error", "fail")), (
        out + err
    )
    return "accepts", ""


def test_valid_base_is_opened_by_qemu(valid: tuple[bytes, bytes], tmp_path: Path) -> None:
    area, payload = valid
    path = tmp_path / "valid.luks"
    path.write_bytes(area + payload)
    assert qemu_verdict(path, "read -P 0 0 64k") == ("accepts", "")
    header = LuksHeader.parse(area, len(area))
    assert unlock(header, lambda o, n: area[o : o + n], PW)[1] == 0


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_header(valid: tuple[bytes, bytes], tmp_path: Path, case: Case) -> None:
    area, payload = valid
    bad = bytearray(area)
    case.mutate(bad)
    start = time.perf_counter()
    with pytest.raises(Qcow2Error) as err:
        LuksHeader.parse(bytes(bad), len(area))
    assert time.perf_counter() - start < 1.0
    assert type(err.value) is case.error, repr(err.value)
    for fragment in case.says:
        assert fragment in str(err.value), (fragment, str(err.value))

    path = tmp_path / f"{case.name}.luks"
    path.write_bytes(bytes(bad) + payload)
    verdict, message = qemu_verdict(path)
    assert verdict == case.qemu, (verdict, message)
    assert case.qemu_says in message, message
    if verdict in ("accepts", "hangs"):
        assert case.why  # every deliberate divergence from QEMU says why


def test_truncated_header(valid: tuple[bytes, bytes], tmp_path: Path) -> None:
    area, _ = valid
    with pytest.raises(Qcow2FormatError, match="truncated: 591 bytes"):
        LuksHeader.parse(area[:591], len(area))
    path = tmp_path / "short.luks"
    path.write_bytes(area[:591])  # QEMU reads zeros past the end of the file
    verdict, message = qemu_verdict(path)
    assert verdict == "info" and "Keyslot 7 is corrupted" in message


def test_limits_are_inclusive(valid: tuple[bytes, bytes]) -> None:
    """MAX_PBKDF2_ITERATIONS itself is accepted (parse runs no PBKDF2)."""
    area, _ = valid
    bad = bytearray(area)
    _at(MK_ITER, ">I", MAX_PBKDF2_ITERATIONS)(bad)
    _slot(0, "iterations", MAX_PBKDF2_ITERATIONS)(bad)
    header = LuksHeader.parse(bytes(bad), len(area))
    assert header.mk_digest_iter == header.slots[0].iterations == MAX_PBKDF2_ITERATIONS
    _at(MK_ITER, ">I", MAX_PBKDF2_ITERATIONS + 1)(bad)
    with pytest.raises(Qcow2UnsupportedError, match=f"mk_digest_iter={MAX_PBKDF2_ITERATIONS + 1}"):
        LuksHeader.parse(bytes(bad), len(area))


# Oddities QEMU accepts and so do we.
ACCEPTED = [
    ("inactive-slot-huge-iterations", _slot(5, "iterations", 0xFFFFFFFF)),
    ("inactive-slot-garbage-salt", _bytes(208 + 48 * 5 + 8, b"\x01" * 32)),
    ("plain64-with-ignored-hash", _name(MODE, b"xts-plain64:sha256")),
    ("md5-hash", _name(HASH, b"md5")),
    ("bytes-after-nul", _bytes(CIPHER, b"aes\0junk")),
]


@pytest.mark.parametrize(("name", "mutate"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_oddities_qemu_accepts(
    valid: tuple[bytes, bytes], tmp_path: Path, name: str, mutate: Mutation
) -> None:
    area, payload = valid
    bad = bytearray(area)
    mutate(bad)
    header = LuksHeader.parse(bytes(bad), len(area))
    path = tmp_path / f"{name}.luks"
    path.write_bytes(bytes(bad) + payload)
    info = subprocess.run(
        ["qemu-img", "info", "-f", "luks", "--output=json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert '"ivgen-hash-alg"' not in info.stdout
    assert header.ivgen_hash_alg is None
    if name in ("inactive-slot-huge-iterations", "inactive-slot-garbage-salt", "bytes-after-nul"):
        # The key material is still valid: both open it.
        assert qemu_verdict(path) == ("accepts", "")
        assert unlock(header, lambda o, n: bytes(bad[o : o + n]), PW)[1] == 0
