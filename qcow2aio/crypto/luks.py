"""LUKS1 as QEMU 7.2 stores it inside qcow2 (crypt_method 2) and in raw LUKS files.

A qcow2 image encrypted with LUKS keeps a LUKS1 header and its keyslot material in
a refcounted *area* of the image file (header extension ``0x0537BE77`` gives its
offset and length); the image's data clusters are the LUKS payload. This module is
the part that never touches guest data:

* :meth:`LuksHeader.parse` / :meth:`LuksHeader.to_bytes`: the 592-byte header codec,
  with every check QEMU makes when it opens an image (and a few it does not make,
  listed below), so a hostile header fails quickly with a message naming the field;
* :func:`unlock`: passphrase → master key (PBKDF2, keyslot decryption, the
  anti-forensic merge, the master-key digest);
* :func:`format_area`, :func:`add_keyslot`, :func:`erase_keyslots`: a fresh area as
  ``qemu-img create`` lays it out, and keyslot changes as ``qemu-img amend`` makes
  them, with QEMU's rules and messages.

Everything here was written from the LUKS1 on-disk specification and checked against
what QEMU 7.2's tools do (tests/test_luks.py, tests/test_hostile_luks.py):

* **Layout** (``qemu-img create``): keyslot *i*'s material at
  ``4096 + i * round_up(key_bytes * 4000, 4096)`` bytes; the payload offset is the end
  of slot 7's 4096-aligned region, not rounded further: 2068480 for 64-byte keys
  (aes-256-xts), 528384 for 16-byte keys (aes-128-cbc). Inactive slots are
  ``0x0000DEAD`` with iterations 0 and an all-zero salt, but keep their offset and
  4000 stripes; the rest of the area is zeros. A cipher mode without an IV (ecb) is
  still written with one (``ecb-plain64``): QEMU refuses a mode string without
  ``-ivgen``.
* **Iterations**: QEMU times PBKDF2 on the real inputs and output length. A slot gets
  ``max(1000, rate(dklen=key_bytes) * iter_time)``; the master-key digest gets
  ``max(1000, rate(dklen=20) * iter_time / 8)``. Because PBKDF2's cost grows with the
  number of hash-sized output blocks, a 64-byte sha256 slot key costs twice a 20-byte
  digest per iteration, so QEMU's master-key count is about a quarter of the slot's
  (observed 52178 vs 13088 at iter-time 10). We time :func:`hashlib.pbkdf2_hmac`
  (about 1.75x slower than QEMU's nettle here), so our counts are lower for the same
  ``iter_time_ms``: the *time* to unlock matches, as QEMU intends.
* **Placement** (what QEMU checks at open): the header owns the first 4096 bytes
  (a payload or keyslot there is refused, though the header is 592 bytes), each keyslot
  owns its material rounded up to 4096 bytes (spans may not overlap, nor reach the
  payload), and stripes must be 4000. aes-192 outside xts (96000 bytes of material, not
  whole sectors) makes QEMU 7.2 abort both at create and at open: we read such headers
  (padding the material to whole sectors, as cryptsetup does) but do not create them.
* **Keyslot changes** (``qemu-img amend``): adding writes the material first and the
  header last; erasing writes the header first (slot inactive, iterations 0, zero salt)
  and then overwrites the material with random bytes. QEMU overwrites it 40 times; we
  overwrite it once: on files (often copy-on-write or on SSDs) repeated passes over
  the same offsets add nothing, and a caller who wants more can apply the write again.
  Refusals carry QEMU's messages: :class:`Qcow2KeyslotError` for the rules (active slot,
  last slot, no free slot, bad index), :class:`Qcow2PassphraseError` for a wrong (old)
  passphrase.

**Secrets.** Passphrases, master keys and salts never appear in a ``repr`` or an
exception message. Buffers this module owns (decrypted key material, the split key,
merged key candidates) are ``bytearray`` and zeroed after use, and the slot ciphers are
wiped. What Python does not let us clear: the caller's ``bytes`` passphrase, the ``bytes``
that :func:`hashlib.pbkdf2_hmac` returns (slot keys, digests), the ``int`` temporaries of
the anti-forensic XOR, and the master key :func:`unlock` returns (``bytes``, as the API
promises); their memory is freed, not overwritten.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import struct
import time
import uuid as uuid_mod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import Qcow2Error, Qcow2FormatError, Qcow2PassphraseError, Qcow2UnsupportedError
from .ciphers import SECTOR_SIZE, check_supported, cipher_key_bytes, make_cipher

__all__ = [
    "LUKS_HEADER_SIZE",
    "MAX_PBKDF2_ITERATIONS",
    "LuksHeader",
    "LuksSlot",
    "Qcow2KeyslotError",
    "ReadFn",
    "add_keyslot",
    "af_merge",
    "af_split",
    "erase_keyslots",
    "format_area",
    "unlock",
]

ReadFn = Callable[[int, int], bytes]
"""``read(offset_within_area, length) -> bytes`` over the LUKS area."""

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_VERSION = 1
LUKS_HEADER_SIZE = 592
LUKS_NUM_SLOTS = 8
LUKS_STRIPES = 4000  # QEMU refuses any other value ("Keyslot N is corrupted (stripes ...)")
LUKS_SLOT_ACTIVE = 0x00AC71F3
LUKS_SLOT_INACTIVE = 0x0000DEAD
LUKS_DIGEST_SIZE = 20
LUKS_SALT_SIZE = 32
LUKS_UUID_SIZE = 40
LUKS_NAME_SIZE = 32
# Keyslot material and the payload start on 4096-byte boundaries in what QEMU writes.
LUKS_ALIGN = 4096
# cryptsetup's and QEMU's floor for both the slot and the master-key iteration counts.
MIN_ITERATIONS = 1000

MAX_PBKDF2_ITERATIONS = 1 << 26
"""The largest iteration count :meth:`LuksHeader.parse` accepts (slots and digest).

Unlocking runs PBKDF2 once per active slot tried plus once per candidate master key,
and the header alone decides how long that takes. QEMU has no cap: a header with
``mk_digest_iter = 0xFFFFFFFF`` makes ``qemu-io`` spin for hours. 2**26 iterations
take about 11 s of :func:`hashlib.pbkdf2_hmac` with sha256 for the 20-byte digest and
about 22 s for a 64-byte slot key on this machine (sha1 with 64-byte keys: ~45 s),
so with this cap a hostile header costs at most minutes, never hours, while real
images stay far below it (QEMU's default 2 s iter-time gives ~10M slot iterations
here). Larger counts are refused with :class:`Qcow2UnsupportedError`.
"""

# PBKDF2 timing for new keyslots: run until this much thread CPU time was measured.
_BENCH_NS = 40_000_000

# The hash names QEMU 7.2 accepts in a LUKS header (its QCryptoHashAlgorithm names);
# each is usable only if hashlib has it (ripemd160 depends on the OpenSSL build).
_HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")
_MODES = ("xts", "cbc", "ecb", "ctr")
_IVGENS = ("plain", "plain64", "essiv")
_AES_KEY_SIZES = (16, 24, 32)

_HEADER = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
assert _HEADER.size + LUKS_NUM_SLOTS * _SLOT.size == LUKS_HEADER_SIZE


class Qcow2KeyslotError(Qcow2Error):
    """A keyslot change was refused (QEMU's rule and message); nothing was changed.

    A wrong *old* passphrase raises :class:`Qcow2PassphraseError` instead.
    """


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def _wipe(buf: bytearray) -> None:
    """Overwrite a secret we own. Same-length slice assignment works in place."""
    buf[0 : len(buf)] = bytes(len(buf))


@dataclass
class LuksSlot:
    """One of the header's eight keyslots.

    ``key_offset`` is in 512-byte sectors from the start of the LUKS area; an inactive
    slot keeps its offset and stripes (QEMU checks them too) with iterations 0 and an
    all-zero salt.
    """

    active: bool
    iterations: int
    salt: bytes = field(repr=False)
    key_offset: int
    stripes: int

    def material_range(self, key_bytes: int) -> tuple[int, int]:
        """(area offset, length) of the slot's key material, whole sectors."""
        return self.key_offset * SECTOR_SIZE, _material_length(key_bytes, self.stripes)


def area_length(key_bytes: int) -> int:
    """Bytes of a LUKS area laid out as QEMU creates it for a ``key_bytes`` master key:
    the header's 4 KiB, then every keyslot's material rounded up to 4 KiB (the payload
    offset; ``qemu-img measure`` counts it in whole clusters)."""
    return LUKS_ALIGN + LUKS_NUM_SLOTS * _slot_span(key_bytes, LUKS_STRIPES)


def _material_length(key_bytes: int, stripes: int) -> int:
    # The split key is key_bytes * stripes bytes, stored (and encrypted) in whole
    # sectors. For every layout QEMU can create this is exact; for 24-byte non-XTS keys
    # (which QEMU 7.2 cannot create) it pads the last sector, as cryptsetup does.
    return _round_up(key_bytes * stripes, SECTOR_SIZE)


def _slot_span(key_bytes: int, stripes: int) -> int:
    """The room QEMU reserves for a keyslot: its material rounded up to 4096 bytes."""
    return _round_up(key_bytes * stripes, LUKS_ALIGN)


@dataclass(frozen=True)
class _Suite:
    """The algorithms a header names, in QEMU's terms."""

    cipher_alg: str
    cipher_mode: str
    ivgen_alg: str
    ivgen_hash_alg: str | None
    hash_alg: str


def _check_hash(name: str, where: str) -> None:
    if name not in _HASHES:
        raise Qcow2UnsupportedError(f"Hash algorithm {name!r} not supported ({where}={name!r})")
    try:
        hashlib.new(name)
    except ValueError:
        raise Qcow2UnsupportedError(
            f"Hash algorithm {name!r} not available in this Python's hashlib ({where}={name!r})"
        ) from None


@functools.lru_cache(maxsize=64)
def _suite(cipher_name: str, cipher_mode_spec: str, hash_spec: str, key_bytes: int) -> _Suite:
    """Split the header's names into QEMU's algorithm names, refusing what QEMU refuses
    and what we cannot do. Cached: properties of :class:`LuksHeader` ask it often."""
    mode, dash, ivgen_spec = cipher_mode_spec.partition("-")
    if not dash:
        raise Qcow2FormatError(
            f"Unexpected cipher mode string format (cipher_mode={cipher_mode_spec!r}): "
            "expected MODE-IVGEN[:HASH]"
        )
    if mode not in _MODES:
        raise Qcow2UnsupportedError(
            f"Cipher mode {mode!r} not supported (cipher_mode={cipher_mode_spec!r})"
        )
    ivgen, colon, ivgen_hash = ivgen_spec.partition(":")
    if ivgen not in _IVGENS:
        raise Qcow2UnsupportedError(
            f"IV generator {ivgen!r} not supported (cipher_mode={cipher_mode_spec!r})"
        )
    if colon:
        _check_hash(ivgen_hash, "cipher_mode")
    elif ivgen == "essiv":
        raise Qcow2FormatError(
            f"Missing IV generator hash specification (cipher_mode={cipher_mode_spec!r})"
        )
    # QEMU parses a hash after plain/plain64 but ignores it (its info shows none).
    ivgen_hash_alg = ivgen_hash if ivgen == "essiv" else None
    _check_hash(hash_spec, "hash_spec")
    if cipher_name != "aes":
        raise Qcow2UnsupportedError(
            f"Unsupported cipher {cipher_name!r} (cipher_name={cipher_name!r}, "
            f"key_bytes={key_bytes}): only aes is implemented"
        )
    aes_key = key_bytes // 2 if mode == "xts" else key_bytes
    if aes_key not in _AES_KEY_SIZES or (mode == "xts" and key_bytes % 2):
        raise Qcow2FormatError(
            f"key_bytes={key_bytes} does not fit cipher {cipher_name!r} in mode {mode!r} "
            f"(AES keys are 16, 24 or 32 bytes{', doubled for xts' if mode == 'xts' else ''})"
        )
    cipher_alg = f"aes-{aes_key * 8}"
    try:
        check_supported(cipher_alg, mode, ivgen, ivgen_hash_alg)
    except Qcow2UnsupportedError as exc:
        raise Qcow2UnsupportedError(
            f"{exc} (cipher_name={cipher_name!r}, cipher_mode={cipher_mode_spec!r}, "
            f"key_bytes={key_bytes})"
        ) from None
    return _Suite(cipher_alg, mode, ivgen, ivgen_hash_alg, hash_spec)


def _name(raw: bytes, field_name: str) -> str:
    """A NUL-terminated ASCII field; QEMU refuses unterminated cipher/mode/hash names."""
    end = raw.find(b"\0")
    if end < 0:
        raise Qcow2FormatError(f"LUKS header {field_name} is not NUL terminated: {raw[:48]!r}")
    try:
        return raw[:end].decode("ascii")
    except UnicodeDecodeError:
        raise Qcow2FormatError(f"LUKS header {field_name} is not ASCII: {raw[:end]!r}") from None


def _encode_name(value: str, size: int, field_name: str) -> bytes:
    data = value.encode("ascii")
    if len(data) >= size or b"\0" in data:
        raise ValueError(f"{field_name}={value!r} does not fit {size - 1} bytes NUL terminated")
    return data.ljust(size, b"\0")


@dataclass
class LuksHeader:
    """The LUKS1 partition header (592 bytes at the start of the area).

    The fields are the on-disk ones (``payload_offset`` and slot offsets in 512-byte
    sectors); the algorithms in QEMU's terms (``cipher_alg`` "aes-256",
    ``cipher_mode`` "xts", ...) are derived properties, so the header stays the single
    source of truth and ``to_bytes`` writes back exactly the names it read.
    """

    cipher_name: str
    cipher_mode_spec: str
    hash_spec: str
    payload_offset: int
    key_bytes: int
    mk_digest: bytes = field(repr=False)
    mk_digest_salt: bytes = field(repr=False)
    mk_digest_iter: int
    uuid: str
    slots: list[LuksSlot]

    # -- derived, in QEMU's names -------------------------------------------------

    @property
    def _suite(self) -> _Suite:
        return _suite(self.cipher_name, self.cipher_mode_spec, self.hash_spec, self.key_bytes)

    @property
    def cipher_alg(self) -> str:
        return self._suite.cipher_alg

    @property
    def cipher_mode(self) -> str:
        return self._suite.cipher_mode

    @property
    def ivgen_alg(self) -> str:
        return self._suite.ivgen_alg

    @property
    def ivgen_hash_alg(self) -> str | None:
        return self._suite.ivgen_hash_alg

    @property
    def hash_alg(self) -> str:
        return self._suite.hash_alg

    @property
    def payload_offset_bytes(self) -> int:
        return self.payload_offset * SECTOR_SIZE

    # -- codec ----------------------------------------------------------------------

    @classmethod
    def parse(cls, data: bytes, area_length: int) -> LuksHeader:
        """Parse and validate the header at the start of a LUKS area of ``area_length``
        bytes (the qcow2 extension's length; for a raw LUKS file, its payload offset).

        Runs no PBKDF2, so it is fast whatever the header says. Refuses, with
        :class:`Qcow2FormatError` or :class:`Qcow2UnsupportedError` naming the field
        and value, everything QEMU refuses when it opens an image, and on purpose also:
        an unterminated or non-ASCII uuid (QEMU reads on past the field), a payload
        offset or keyslot material beyond ``area_length`` (QEMU would read other
        clusters of the qcow2 file as key material), iteration counts above
        :data:`MAX_PBKDF2_ITERATIONS` (QEMU would hang), a zero master-key iteration
        count, and ciphers QEMU knows but we do not implement (twofish, serpent).
        """
        if len(data) < LUKS_HEADER_SIZE:
            raise Qcow2FormatError(
                f"LUKS header truncated: {len(data)} bytes (needs {LUKS_HEADER_SIZE})"
            )
        (
            magic,
            version,
            raw_cipher,
            raw_mode,
            raw_hash,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_salt,
            mk_iter,
            raw_uuid,
        ) = _HEADER.unpack_from(data, 0)
        if magic != LUKS_MAGIC:
            raise Qcow2FormatError(f"Volume is not in LUKS format: magic={magic!r}")
        if version != LUKS_VERSION:
            raise Qcow2UnsupportedError(f"LUKS version {version} is not supported (version=1 is)")
        cipher_name = _name(raw_cipher, "cipher name (cipher_name)")
        cipher_mode_spec = _name(raw_mode, "cipher mode (cipher_mode)")
        hash_spec = _name(raw_hash, "hash spec (hash_spec)")
        uuid = _name(raw_uuid, "uuid")
        _suite(cipher_name, cipher_mode_spec, hash_spec, key_bytes)

        payload_bytes = payload_offset * SECTOR_SIZE
        # QEMU reserves the first 4096 bytes for the header and gives each keyslot a
        # 4096-aligned span (what it, and cryptsetup, write); it refuses a payload or a
        # keyslot inside the former and keyslot spans that overlap.
        header_end = LUKS_ALIGN
        if payload_bytes < header_end:
            raise Qcow2FormatError(
                f"LUKS payload is overlapping with the header: payload_offset={payload_offset} "
                f"sectors ({payload_bytes} bytes; the header takes the first {LUKS_ALIGN})"
            )
        if payload_bytes > area_length:
            raise Qcow2FormatError(
                f"LUKS payload_offset={payload_offset} sectors ({payload_bytes} bytes) lies "
                f"beyond the LUKS area (length {area_length})"
            )
        if mk_iter == 0:
            raise Qcow2FormatError("LUKS key iteration count is zero: mk_digest_iter=0")
        _check_iterations(mk_iter, "mk_digest_iter")

        slots: list[LuksSlot] = []
        for i in range(LUKS_NUM_SLOTS):
            state, iterations, salt, key_offset, stripes = _SLOT.unpack_from(
                data, _HEADER.size + i * _SLOT.size
            )
            if state not in (LUKS_SLOT_ACTIVE, LUKS_SLOT_INACTIVE):
                raise Qcow2FormatError(
                    f"Keyslot {i} state (active/disable) is corrupted: slots[{i}].active="
                    f"{state:#010x} (neither {LUKS_SLOT_ACTIVE:#010x} nor "
                    f"{LUKS_SLOT_INACTIVE:#010x})"
                )
            if stripes != LUKS_STRIPES:
                raise Qcow2FormatError(
                    f"Keyslot {i} is corrupted: slots[{i}].stripes={stripes} (QEMU requires "
                    f"{LUKS_STRIPES})"
                )
            active = state == LUKS_SLOT_ACTIVE
            if active:
                if iterations == 0:
                    raise Qcow2FormatError(
                        f"Keyslot {i} iteration count is zero: slots[{i}].iterations=0"
                    )
                _check_iterations(iterations, f"slots[{i}].iterations")
            slot = LuksSlot(active, iterations, salt, key_offset, stripes)
            start, length = key_offset * SECTOR_SIZE, _slot_span(key_bytes, stripes)
            if start < header_end:
                raise Qcow2FormatError(
                    f"Keyslot {i} is overlapping with the LUKS header: "
                    f"slots[{i}].key_offset={key_offset} sectors"
                )
            if start + length > payload_bytes:
                raise Qcow2FormatError(
                    f"Keyslot {i} is overlapping with the encrypted payload: "
                    f"slots[{i}].key_offset={key_offset} sectors, span {length} bytes "
                    f"(material rounded up to {LUKS_ALIGN}), payload_offset={payload_offset} "
                    "sectors"
                )
            for j, other in enumerate(slots):
                o_start = other.key_offset * SECTOR_SIZE
                o_length = _slot_span(key_bytes, other.stripes)
                if start < o_start + o_length and o_start < start + length:
                    raise Qcow2FormatError(
                        f"Keyslots {j} and {i} are overlapping in the header: "
                        f"slots[{j}].key_offset={other.key_offset}, "
                        f"slots[{i}].key_offset={key_offset} sectors, span {length} bytes"
                    )
            slots.append(slot)
        return cls(
            cipher_name=cipher_name,
            cipher_mode_spec=cipher_mode_spec,
            hash_spec=hash_spec,
            payload_offset=payload_offset,
            key_bytes=key_bytes,
            mk_digest=mk_digest,
            mk_digest_salt=mk_salt,
            mk_digest_iter=mk_iter,
            uuid=uuid,
            slots=slots,
        )

    def to_bytes(self) -> bytes:
        """The 592 on-disk bytes (names NUL-padded, inactive slots as 0x0000DEAD)."""
        if len(self.slots) != LUKS_NUM_SLOTS:
            raise ValueError(f"a LUKS1 header has {LUKS_NUM_SLOTS} slots, not {len(self.slots)}")
        out = bytearray(
            _HEADER.pack(
                LUKS_MAGIC,
                LUKS_VERSION,
                _encode_name(self.cipher_name, LUKS_NAME_SIZE, "cipher_name"),
                _encode_name(self.cipher_mode_spec, LUKS_NAME_SIZE, "cipher_mode_spec"),
                _encode_name(self.hash_spec, LUKS_NAME_SIZE, "hash_spec"),
                self.payload_offset,
                self.key_bytes,
                self.mk_digest,
                self.mk_digest_salt,
                self.mk_digest_iter,
                _encode_name(self.uuid, LUKS_UUID_SIZE, "uuid"),
            )
        )
        for slot in self.slots:
            out += _SLOT.pack(
                LUKS_SLOT_ACTIVE if slot.active else LUKS_SLOT_INACTIVE,
                slot.iterations,
                slot.salt,
                slot.key_offset,
                slot.stripes,
            )
        return bytes(out)

    def info(self, *, format_name: str | None = None) -> dict[str, Any]:
        """``qemu-img info --output=json``'s ``format-specific.data.encrypt``, in QEMU's
        key order (its JSON comes from a hash table, so the order looks arbitrary).

        Without ``format_name`` the ``"format"`` member is left out; with it, it is put
        where QEMU puts it: after ``uuid`` (and ``ivgen-hash-alg``), before
        ``cipher-mode``. Offsets are in bytes here, sectors on disk.
        """
        suite = self._suite
        out: dict[str, Any] = {
            "ivgen-alg": suite.ivgen_alg,
            "hash-alg": suite.hash_alg,
            "cipher-alg": suite.cipher_alg,
            "uuid": self.uuid,
        }
        if suite.ivgen_hash_alg is not None:
            out["ivgen-hash-alg"] = suite.ivgen_hash_alg
        if format_name is not None:
            out["format"] = format_name
        out["cipher-mode"] = suite.cipher_mode
        slots: list[dict[str, Any]] = []
        for slot in self.slots:
            if slot.active:
                slots.append(
                    {
                        "active": True,
                        "iters": slot.iterations,
                        "key-offset": slot.key_offset * SECTOR_SIZE,
                        "stripes": slot.stripes,
                    }
                )
            else:
                slots.append({"active": False, "key-offset": slot.key_offset * SECTOR_SIZE})
        out["slots"] = slots
        out["payload-offset"] = self.payload_offset_bytes
        out["master-key-iters"] = self.mk_digest_iter
        return out


def _check_iterations(count: int, field_name: str) -> None:
    if count > MAX_PBKDF2_ITERATIONS:
        raise Qcow2UnsupportedError(
            f"LUKS {field_name}={count} exceeds MAX_PBKDF2_ITERATIONS={MAX_PBKDF2_ITERATIONS}: "
            "PBKDF2 would run for minutes (QEMU would hang on it)"
        )


# -- key derivation and the anti-forensic splitter ----------------------------------


def _pbkdf2(
    hash_alg: str, password: bytes | bytearray, salt: bytes, iterations: int, length: int
) -> bytes:
    return hashlib.pbkdf2_hmac(hash_alg, password, salt, iterations, length)


def _diffuse(buf: bytearray, hash_alg: str) -> None:
    """LUKS1's diffuser, in place: each hash-sized block i becomes
    ``H(be32(i) || block)``, the last partial block truncated to its size."""
    proto = hashlib.new(hash_alg)
    size = proto.digest_size
    for index, start in enumerate(range(0, len(buf), size)):
        end = min(start + size, len(buf))
        h = proto.copy()
        h.update(index.to_bytes(4, "big"))
        h.update(buf[start:end])
        buf[start:end] = h.digest()[: end - start]


def _xor_into(acc: bytearray, block: bytes | bytearray | memoryview) -> None:
    n = len(acc)
    x = int.from_bytes(acc, "little") ^ int.from_bytes(block, "little")
    acc[0:n] = x.to_bytes(n, "little")


def af_merge(
    material: bytes | bytearray | memoryview, key_bytes: int, stripes: int, hash_alg: str
) -> bytearray:
    """Recover a key from its anti-forensic split (``stripes`` blocks of ``key_bytes``)."""
    view = memoryview(material)
    acc = bytearray(key_bytes)
    for i in range(stripes - 1):
        _xor_into(acc, view[i * key_bytes : (i + 1) * key_bytes])
        _diffuse(acc, hash_alg)
    _xor_into(acc, view[(stripes - 1) * key_bytes : stripes * key_bytes])
    return acc


def af_split(key: bytes | bytearray, stripes: int, hash_alg: str) -> bytearray:
    """Split ``key`` into ``stripes`` blocks: ``stripes - 1`` random ones and a last one
    that merges back to the key. Losing any part of the material loses the key."""
    key_bytes = len(key)
    out = bytearray(secrets.token_bytes(key_bytes * stripes))
    acc = bytearray(key_bytes)
    for i in range(stripes - 1):
        _xor_into(acc, out[i * key_bytes : (i + 1) * key_bytes])
        _diffuse(acc, hash_alg)
    _xor_into(acc, key)
    out[(stripes - 1) * key_bytes : stripes * key_bytes] = acc
    _wipe(acc)
    return out


def _pbkdf2_rate(hash_alg: str, password: bytes, salt: bytes, length: int) -> float:
    """PBKDF2 iterations per millisecond of this thread's CPU time, for this output
    length (the cost grows with the number of hash-sized output blocks, which is why
    QEMU, and we, time the real length)."""
    iterations = 1000
    while True:
        start = time.thread_time_ns()
        _pbkdf2(hash_alg, password, salt, iterations, length)
        elapsed = time.thread_time_ns() - start
        if elapsed >= _BENCH_NS:
            return iterations * 1_000_000 / elapsed
        if elapsed < 1_000_000:  # too short to extrapolate from
            iterations *= 10
        else:  # aim a little past the target so the next run is the last
            iterations = int(iterations * 1.25 * _BENCH_NS / elapsed) + 1


def _iterations(rate_per_ms: float, iter_time_ms: int, divisor: int, what: str) -> int:
    count = max(MIN_ITERATIONS, int(rate_per_ms * iter_time_ms) // divisor)
    if count > MAX_PBKDF2_ITERATIONS:
        raise ValueError(
            f"iter_time_ms={iter_time_ms} needs {count} {what} iterations, above "
            f"MAX_PBKDF2_ITERATIONS={MAX_PBKDF2_ITERATIONS} (an image we could not open)"
        )
    return count


def _check_iter_time(iter_time_ms: int) -> None:
    if not isinstance(iter_time_ms, int) or iter_time_ms < 1:
        raise ValueError(f"iter_time_ms must be a positive integer, not {iter_time_ms!r}")


# -- keyslots -----------------------------------------------------------------------


def _slot_crypt(header: LuksHeader, slot_key: bytes, buf: bytearray, *, decrypt: bool) -> None:
    """Keyslot material is encrypted like the payload (same cipher, mode and IV
    generator; ESSIV keyed from the slot key) with sector 0 at the material's start."""
    cipher = make_cipher(
        header.cipher_alg, header.cipher_mode, header.ivgen_alg, header.ivgen_hash_alg, slot_key
    )
    try:
        if decrypt:
            cipher.decrypt(buf, 0)
        else:
            cipher.encrypt(buf, 0)
    finally:
        cipher.wipe()


def _open_slot(header: LuksHeader, read: ReadFn, index: int, passphrase: bytes) -> bytearray | None:
    """The master key if ``passphrase`` opens slot ``index`` (a bytearray the caller
    wipes), else None."""
    slot = header.slots[index]
    offset, length = slot.material_range(header.key_bytes)
    slot_key = _pbkdf2(header.hash_alg, passphrase, slot.salt, slot.iterations, header.key_bytes)
    data = read(offset, length)
    if len(data) != length:
        raise Qcow2FormatError(
            f"LUKS keyslot {index} material truncated: read {len(data)} of {length} bytes "
            f"at area offset {offset}"
        )
    material = bytearray(data)
    try:
        _slot_crypt(header, slot_key, material, decrypt=True)
        candidate = af_merge(material, header.key_bytes, slot.stripes, header.hash_alg)
    finally:
        _wipe(material)
    if _digest_matches(header, candidate):
        return candidate
    _wipe(candidate)
    return None


def _digest_matches(header: LuksHeader, master_key: bytes | bytearray) -> bool:
    digest = _pbkdf2(
        header.hash_alg,
        master_key,
        header.mk_digest_salt,
        header.mk_digest_iter,
        LUKS_DIGEST_SIZE,
    )
    return hmac.compare_digest(digest, header.mk_digest)


def unlock(header: LuksHeader, read: ReadFn, passphrase: bytes) -> tuple[bytes, int]:
    """The master key and the index of the first active keyslot ``passphrase`` opens.

    Tries the active slots in order (one PBKDF2 each, plus one per candidate key for
    the digest). A wrong passphrase raises :class:`Qcow2PassphraseError` with QEMU's
    message, which never contains the passphrase. The returned key is immutable
    ``bytes``: Python cannot wipe it, nor the copies hashlib and the ciphers make; the
    intermediate buffers we own are zeroed.
    """
    for index, slot in enumerate(header.slots):
        if not slot.active:
            continue
        key = _open_slot(header, read, index, passphrase)
        if key is not None:
            try:
                return bytes(key), index
            finally:
                _wipe(key)
    raise Qcow2PassphraseError("Invalid password, cannot unlock any keyslot")


def _slot_material(
    header: LuksHeader, slot: LuksSlot, master_key: bytes, passphrase: bytes
) -> bytes:
    """Split and encrypt ``master_key`` for ``slot`` (whole sectors, sector 0 at the
    material's start, the payload's cipher keyed with the slot's PBKDF2 key)."""
    split = af_split(master_key, slot.stripes, header.hash_alg)
    length = _material_length(header.key_bytes, slot.stripes)
    split.extend(bytes(length - len(split)))
    try:
        slot_key = _pbkdf2(
            header.hash_alg, passphrase, slot.salt, slot.iterations, header.key_bytes
        )
        _slot_crypt(header, slot_key, split, decrypt=False)
        return bytes(split)
    finally:
        _wipe(split)


def _check_slot_index(slot: int) -> None:
    if not 0 <= slot < LUKS_NUM_SLOTS:
        raise Qcow2KeyslotError(
            f"Invalid keyslot {slot} specified, must be between 0 and {LUKS_NUM_SLOTS - 1}"
        )


def _new_slot(
    header: LuksHeader, master_key: bytes, passphrase: bytes, index: int, iter_time_ms: int
) -> tuple[LuksHeader, list[tuple[int, bytes]]]:
    old = header.slots[index]
    salt = secrets.token_bytes(LUKS_SALT_SIZE)
    rate = _pbkdf2_rate(header.hash_alg, passphrase, salt, header.key_bytes)
    iterations = _iterations(rate, iter_time_ms, 1, "keyslot")
    slot = LuksSlot(True, iterations, salt, old.key_offset, LUKS_STRIPES)
    material = _slot_material(header, slot, master_key, passphrase)
    slots = list(header.slots)
    slots[index] = slot
    new = replace(header, slots=slots)
    return new, [(old.key_offset * SECTOR_SIZE, material), (0, new.to_bytes())]


def add_keyslot(
    header: LuksHeader,
    master_key: bytes,
    new_passphrase: bytes,
    *,
    slot: int | None = None,
    iter_time_ms: int = 2000,
) -> tuple[LuksHeader, list[tuple[int, bytes]]]:
    """Put ``new_passphrase`` in a keyslot, as ``qemu-img amend ... encrypt.state=active``.

    ``slot`` None takes the first inactive slot. Returns the new header and the writes
    (area offset, bytes) to apply in order: the key material first, the header last,
    so a crash in between leaves the old header, which does not use that material.
    ``master_key`` is checked against the header's digest first (a wrong one would
    write a slot that can never open the image): that costs one master-key PBKDF2.
    """
    _check_iter_time(iter_time_ms)
    if slot is None:
        free = [i for i, s in enumerate(header.slots) if not s.active]
        if not free:
            raise Qcow2KeyslotError("Can't add a keyslot - all keyslots are in use")
        slot = free[0]
    else:
        _check_slot_index(slot)
        if header.slots[slot].active:
            raise Qcow2KeyslotError(
                f"Refusing to overwrite active keyslot {slot} - please erase it first"
            )
    if len(master_key) != header.key_bytes or not _digest_matches(header, master_key):
        raise ValueError("master_key does not match the LUKS header's master-key digest")
    return _new_slot(header, bytes(master_key), new_passphrase, slot, iter_time_ms)


def erase_keyslots(
    header: LuksHeader,
    read: ReadFn,
    *,
    old_passphrase: bytes | None = None,
    slot: int | None = None,
    force: bool = False,
) -> tuple[LuksHeader, list[tuple[int, bytes]]]:
    """Erase keyslots, as ``qemu-img amend ... encrypt.state=inactive``.

    By ``slot`` (with ``old_passphrase`` too, the slot must open with it), or every
    active slot ``old_passphrase`` opens. Erasing the last active slot would lose the
    image's data for good: refused unless ``force``, with QEMU's messages. Returns the
    new header and the writes to apply in order: the header first (the slots become
    0x0000DEAD with iterations 0 and a zero salt, as QEMU writes them), then one pass
    of random bytes over each erased slot's material (QEMU makes 40 passes; see the
    module docstring).
    """
    if slot is None and old_passphrase is None:
        raise Qcow2KeyslotError(
            "To erase keyslot(s), either explicit keyslot index or the password currently "
            "contained in them must be given"
        )
    active = [i for i, s in enumerate(header.slots) if s.active]
    if slot is not None:
        _check_slot_index(slot)
        if old_passphrase is not None:
            key = _open_slot(header, read, slot, old_passphrase) if slot in active else None
            if key is None:
                raise Qcow2PassphraseError(
                    f"Given keyslot {slot} doesn't contain the given old password for erase "
                    "operation"
                )
            _wipe(key)
        elif slot not in active:
            raise Qcow2KeyslotError(f"Given keyslot {slot} is already erased (inactive)")
        if active == [slot] and not force:
            raise Qcow2KeyslotError(
                f"Attempt to erase the only active keyslot {slot} which will erase all the "
                "data in the image irreversibly - refusing operation"
            )
        erase = [slot]
    else:
        assert old_passphrase is not None
        erase = []
        for i in active:
            key = _open_slot(header, read, i, old_passphrase)
            if key is not None:
                _wipe(key)
                erase.append(i)
        if not erase:
            raise Qcow2PassphraseError("No keyslots match given (old) password for erase operation")
        if erase == active and not force:
            raise Qcow2KeyslotError(
                "All the active keyslots match the (old) password that was given and erasing "
                "them will erase all the data in the image irreversibly - refusing operation"
            )
    slots = list(header.slots)
    for i in erase:
        slots[i] = LuksSlot(False, 0, bytes(LUKS_SALT_SIZE), slots[i].key_offset, slots[i].stripes)
    new = replace(header, slots=slots)
    writes: list[tuple[int, bytes]] = [(0, new.to_bytes())]
    for i in erase:
        offset, length = header.slots[i].material_range(header.key_bytes)
        writes.append((offset, secrets.token_bytes(length)))
    return new, writes


# -- a fresh area -------------------------------------------------------------------


def format_area(
    passphrase: bytes,
    *,
    cipher_alg: str = "aes-256",
    cipher_mode: str = "xts",
    ivgen_alg: str = "plain64",
    ivgen_hash_alg: str | None = None,
    hash_alg: str = "sha256",
    iter_time_ms: int = 2000,
) -> tuple[bytes, bytes]:
    """A fresh LUKS area as ``qemu-img create ... encrypt.format=luks`` writes it:
    the header, slot 0 holding ``passphrase``, zeros elsewhere.

    Returns (area bytes, master key); the area's length is the payload offset, which
    is the length of the qcow2 crypto header extension (2068480 for 64-byte keys).
    ``ivgen_hash_alg`` is written into the mode string whenever given (QEMU does so
    even for plain64, and then ignores it); with essiv it defaults to sha256, as
    QEMU's (not to ``hash_alg``).
    """
    _check_iter_time(iter_time_ms)
    if ivgen_alg == "essiv" and ivgen_hash_alg is None:
        ivgen_hash_alg = "sha256"
    if ivgen_hash_alg is not None:
        _check_hash(ivgen_hash_alg, "ivgen_hash_alg")
    _check_hash(hash_alg, "hash_alg")
    check_supported(
        cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg if ivgen_alg == "essiv" else None
    )
    key_bytes = cipher_key_bytes(cipher_alg, cipher_mode)
    if (key_bytes * LUKS_STRIPES) % SECTOR_SIZE:
        # aes-192 outside xts: 96000 bytes of split key. We would pad it to whole
        # sectors (as cryptsetup does), but QEMU 7.2 aborts on an assertion both when
        # creating such an image and when opening one, so we do not make them.
        raise Qcow2UnsupportedError(
            f"cipher-alg={cipher_alg} with cipher-mode={cipher_mode}: its keyslot material "
            f"({key_bytes} x {LUKS_STRIPES} bytes) is not a whole number of sectors, which "
            "QEMU 7.2 cannot create or open"
        )
    mode_spec = f"{cipher_mode}-{ivgen_alg}" + (f":{ivgen_hash_alg}" if ivgen_hash_alg else "")
    slot_span = _slot_span(key_bytes, LUKS_STRIPES)
    payload_bytes = area_length(key_bytes)

    master_key = secrets.token_bytes(key_bytes)
    mk_salt = secrets.token_bytes(LUKS_SALT_SIZE)
    rate = _pbkdf2_rate(hash_alg, master_key, mk_salt, LUKS_DIGEST_SIZE)
    mk_iter = _iterations(rate, iter_time_ms, 8, "master-key digest")
    header = LuksHeader(
        cipher_name=cipher_alg.partition("-")[0],
        cipher_mode_spec=mode_spec,
        hash_spec=hash_alg,
        payload_offset=payload_bytes // SECTOR_SIZE,
        key_bytes=key_bytes,
        mk_digest=_pbkdf2(hash_alg, master_key, mk_salt, mk_iter, LUKS_DIGEST_SIZE),
        mk_digest_salt=mk_salt,
        mk_digest_iter=mk_iter,
        uuid=str(uuid_mod.uuid4()),
        slots=[
            LuksSlot(
                False,
                0,
                bytes(LUKS_SALT_SIZE),
                (LUKS_ALIGN + i * slot_span) // SECTOR_SIZE,
                LUKS_STRIPES,
            )
            for i in range(LUKS_NUM_SLOTS)
        ],
    )
    # Validate what we are about to write with the reader's rules.
    _suite(header.cipher_name, header.cipher_mode_spec, header.hash_spec, key_bytes)
    header, writes = _new_slot(header, master_key, passphrase, 0, iter_time_ms)
    area = bytearray(payload_bytes)
    for offset, data in writes:
        area[offset : offset + len(data)] = data
    return bytes(area), master_key
