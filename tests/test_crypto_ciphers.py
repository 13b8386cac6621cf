"""The sector-cipher layer (qcow2aio.crypto.ciphers) against slow references and QEMU.

The references here are deliberately naive: one ``cryptography`` call per sector with
the IV computed from its definition (``modes.XTS``/``CBC``/``CTR``, ECB), plus a
pure-Python XTS (tweak doubling on ints) for AES-192-XTS, which ``cryptography`` lacks;
that one is itself checked against ``modes.XTS``. QEMU 7.2 is the oracle for legacy AES
(its key is the passphrase, so ciphertext can be checked without the LUKS code).
"""

from __future__ import annotations

import hashlib
import random
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import Qemu
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qcow2aio.crypto import ciphers
from qcow2aio.crypto.ciphers import (
    SECTOR_SIZE,
    SectorCipher,
    check_supported,
    cipher_key_bytes,
    legacy_aes_cipher,
    make_cipher,
)
from qcow2aio.errors import Qcow2FormatError, Qcow2PassphraseError, Qcow2UnsupportedError

ALGS = ("aes-128", "aes-192", "aes-256")
MODES = ("xts", "cbc", "ecb", "ctr")
IVGENS = (("plain", None), ("plain64", None), ("essiv", "sha256"))
FIRST_SECTORS = (0, 1, 2**32 - 1, 2**32 + 5, 2**64 - 3)
AES_BYTES = {"aes-128": 16, "aes-192": 24, "aes-256": 32}


# -- slow references ------------------------------------------------------------------------


def ref_iv(ivgen: str, hash_alg: str | None, key: bytes, sector: int) -> bytes:
    """The IV of one sector, from the definitions (QEMU's ivgen-*.c semantics)."""
    if ivgen == "plain":
        return (sector % 2**32).to_bytes(16, "little")
    block = (sector % 2**64).to_bytes(16, "little")
    if ivgen == "plain64":
        return block
    assert ivgen == "essiv" and hash_alg is not None
    salt = hashlib.new(hash_alg, key).digest()
    return Cipher(algorithms.AES(salt), modes.ECB()).encryptor().update(block)


def xts_python(key: bytes, tweak: bytes, data: bytes, decrypt: bool) -> bytes:
    """IEEE P1619 XTS of one sector by the book: T_0 = AES_K2(tweak), T_{j+1} = T_j * x."""
    half = len(key) // 2
    encrypted = Cipher(algorithms.AES(key[half:]), modes.ECB()).encryptor().update(tweak)
    t = int.from_bytes(encrypted, "little")
    data_cipher = Cipher(algorithms.AES(key[:half]), modes.ECB())
    out = bytearray()
    for j in range(len(data) // 16):
        mask = t.to_bytes(16, "little")
        block = bytes(a ^ b for a, b in zip(data[16 * j : 16 * j + 16], mask, strict=True))
        ctx = data_cipher.decryptor() if decrypt else data_cipher.encryptor()
        done = ctx.update(block)
        out += bytes(a ^ b for a, b in zip(done, mask, strict=True))
        t <<= 1
        if t >> 128:
            t = (t ^ (1 << 128)) ^ 0x87
    return bytes(out)


def ref_transform(
    alg: str,
    mode: str,
    ivgen: str,
    hash_alg: str | None,
    key: bytes,
    data: bytes,
    first: int,
    decrypt: bool = False,
) -> bytes:
    """One ``cryptography`` call per sector (ECB: per buffer)."""
    if mode == "ecb":
        cipher = Cipher(algorithms.AES(key), modes.ECB())
        ctx = cipher.decryptor() if decrypt else cipher.encryptor()
        return ctx.update(data)
    out = bytearray()
    for s in range(len(data) // SECTOR_SIZE):
        iv = ref_iv(ivgen, hash_alg, key, first + s)
        sector = data[s * SECTOR_SIZE : (s + 1) * SECTOR_SIZE]
        if mode == "xts" and alg == "aes-192":
            out += xts_python(key, iv, sector, decrypt)
            continue
        mode_obj = {"xts": modes.XTS, "cbc": modes.CBC, "ctr": modes.CTR}[mode](iv)
        cipher = Cipher(algorithms.AES(key), mode_obj)
        ctx = cipher.decryptor() if decrypt else cipher.encryptor()
        out += ctx.update(sector)
    return bytes(out)


def random_key(rng: random.Random, alg: str, mode: str) -> bytes:
    return rng.randbytes(cipher_key_bytes(alg, mode))


# -- bit-exactness ----------------------------------------------------------------------------


@pytest.mark.parametrize("ivgen,hash_alg", IVGENS, ids=[i for i, _ in IVGENS])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alg", ALGS)
def test_matches_per_sector_reference(
    alg: str, mode: str, ivgen: str, hash_alg: str | None
) -> None:
    """Every alg x mode x ivgen, 1..300 sectors (each of the size paths), sector numbers
    around 2^32 and 2^64 (plain wraps at 2^32, plain64 and essiv at 2^64)."""
    rng = random.Random(f"{alg}-{mode}-{ivgen}")
    key = random_key(rng, alg, mode)
    cipher = make_cipher(alg, mode, ivgen, hash_alg, key)
    # 1, 4, 5, 6, 7 and 19, 20 straddle the few-sector and CBC-chaining thresholds.
    counts = [1, 4, 5, 6, 7, 19, 20, rng.randint(2, 300)]
    if alg == "aes-192" and mode == "xts":
        counts = [1, 6, 7]  # (slow reference; more in test_aes192_xts_more_sectors)
    for first in FIRST_SECTORS:
        for count in counts:
            data = rng.randbytes(count * SECTOR_SIZE)
            buf = bytearray(data)
            cipher.encrypt(buf, first)
            want = ref_transform(alg, mode, ivgen, hash_alg, key, data, first)
            assert buf == want, (first, count)
            cipher.decrypt(buf, first)
            assert buf == data, (first, count)
            # decrypting someone else's ciphertext, not just undoing our own
            enc = bytearray(want)
            cipher.decrypt(enc, first)
            assert enc == data


def test_aes192_xts_more_sectors() -> None:
    """AES-192-XTS (not in ``cryptography``) on the batched path too, near 2^64."""
    rng = random.Random(192)
    key = random_key(rng, "aes-192", "xts")
    cipher = make_cipher("aes-192", "xts", "plain64", None, key)
    for first, count in ((2**64 - 3, 40), (2**32 - 1, 33)):
        data = rng.randbytes(count * SECTOR_SIZE)
        buf = bytearray(data)
        cipher.encrypt(buf, first)
        assert buf == ref_transform("aes-192", "xts", "plain64", None, key, data, first)


@pytest.mark.parametrize("key_len", [32, 64])
def test_python_xts_reference_matches_cryptography(key_len: int) -> None:
    """The by-the-book XTS used as AES-192-XTS reference agrees with ``modes.XTS``."""
    rng = random.Random(key_len)
    key = rng.randbytes(key_len)
    for sector in (0, 1, 2**32 + 5, 2**64 - 1):
        tweak = sector.to_bytes(16, "little")
        data = rng.randbytes(SECTOR_SIZE)
        want = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor().update(data)
        assert xts_python(key, tweak, data, False) == want
        assert xts_python(key, tweak, want, True) == data


@pytest.mark.parametrize("alg", ["aes-128", "aes-256"])
def test_xts_random_sector_numbers(alg: str) -> None:
    """Batched XTS equals ``modes.XTS`` for many random sector numbers (any tweak bits)."""
    rng = random.Random(alg)
    key = random_key(rng, alg, "xts")
    cipher = make_cipher(alg, "xts", "plain64", None, key)
    for _ in range(40):
        first = rng.choice([rng.getrandbits(64), rng.getrandbits(33), rng.getrandbits(12)])
        count = rng.choice([1, 3, 12, 70])
        data = rng.randbytes(count * SECTOR_SIZE)
        buf = bytearray(data)
        cipher.encrypt(buf, first)
        assert buf == ref_transform(alg, "xts", "plain64", None, key, data, first)
        cipher.decrypt(buf, first)
        assert buf == data


@pytest.mark.parametrize("mode", ["xts", "cbc", "ctr", "ecb"])
def test_batches_and_partial_last_batch(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A buffer cut into numpy batches (here of 7 sectors) gives the same bytes."""
    monkeypatch.setattr(ciphers, "_CHUNK_SECTORS", 7)
    rng = random.Random(mode)
    key = random_key(rng, "aes-256", mode)
    cipher = make_cipher("aes-256", mode, "essiv", "sha256", key)
    data = rng.randbytes(80 * SECTOR_SIZE)
    buf = bytearray(data)
    cipher.encrypt(buf, 2**64 - 40)
    assert buf == ref_transform("aes-256", mode, "essiv", "sha256", key, data, 2**64 - 40)
    cipher.decrypt(buf, 2**64 - 40)
    assert buf == data


@pytest.mark.parametrize("few", [True, False], ids=["few-sector", "batched"])
@pytest.mark.parametrize("mode", ["xts", "cbc"])
def test_every_size_path_is_exact(mode: str, few: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the size thresholds, each path (gather tables / batched numpy for XTS,
    Python ints / scratch / batched numpy for CBC decryption, chained CBC context /
    columns for CBC encryption) is bit-exact. The few-sector thresholds can only be
    lowered (their scratch arrays are sized by them), so "few" runs at their maximum."""
    if not few:
        monkeypatch.setattr(ciphers, "_FEW_XTS_SECTORS", 0)
        monkeypatch.setattr(ciphers, "_SMALL_CBC_SECTORS", 0)
        monkeypatch.setattr(ciphers, "_FEW_CBC_SECTORS", 0)
        monkeypatch.setattr(ciphers, "_CBC_COLUMNS_MIN_SECTORS", 1)
    else:
        monkeypatch.setattr(ciphers, "_SMALL_CBC_SECTORS", ciphers._FEW_CBC_SECTORS)
        monkeypatch.setattr(ciphers, "_CBC_COLUMNS_MIN_SECTORS", 10**9)
    rng = random.Random(f"{mode}{few}")
    for alg in ("aes-128", "aes-256"):
        for ivgen, hash_alg in IVGENS:
            key = random_key(rng, alg, mode)
            cipher = make_cipher(alg, mode, ivgen, hash_alg, key)
            for first in (0, 2**32 - 2, 2**64 - 2):
                for count in (1, 3, 32 if few else 70):
                    data = rng.randbytes(count * SECTOR_SIZE)
                    buf = bytearray(data)
                    cipher.encrypt(buf, first)
                    want = ref_transform(alg, mode, ivgen, hash_alg, key, data, first)
                    assert buf == want, (alg, ivgen, first, count)
                    cipher.decrypt(buf, first)
                    assert buf == data, (alg, ivgen, first, count)


# Sector counts on each side of every size threshold (few-sector XTS, Python-int and
# scratch CBC decryption, chained CBC encryption), and first sectors: unaligned, just
# below the 2^32 wrap of plain, just below 2^64 (plain64 and essiv wrap), above 2^64.
BOUNDARY_COUNTS = sorted(
    {1, 2, 4, 5, 6, 7, 8, 15, 16, 17, 19, 20, 31, 32, 33, 47, 48, 49}
    | {ciphers._FEW_XTS_SECTORS + d for d in (-1, 0, 1)}
    | {ciphers._SMALL_CBC_SECTORS + d for d in (0, 1)}
    | {ciphers._FEW_CBC_SECTORS + d for d in (0, 1)}
    | {ciphers._CBC_COLUMNS_MIN_SECTORS + d for d in (-1, 0)}
)
BOUNDARY_FIRSTS = (0, 7, 12345, 2**32 - 9, 2**32 - 1, 2**64 - 17, 2**64 - 1, 2**64 + 3)


@pytest.mark.parametrize("ivgen,hash_alg", IVGENS, ids=[i for i, _ in IVGENS])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alg", ["aes-128", "aes-256"])
def test_size_threshold_boundaries(alg: str, mode: str, ivgen: str, hash_alg: str | None) -> None:
    """Both directions at every threshold boundary, against the per-sector reference;
    runs crossing the 2^32 (plain) and 2^64 wraps take the IV generators' slow branch."""
    rng = random.Random(f"bounds-{alg}-{mode}-{ivgen}")
    key = random_key(rng, alg, mode)
    cipher = make_cipher(alg, mode, ivgen, hash_alg, key)
    for count in BOUNDARY_COUNTS:
        data = rng.randbytes(count * SECTOR_SIZE)
        for first in BOUNDARY_FIRSTS:
            want = ref_transform(alg, mode, ivgen, hash_alg, key, data, first)
            buf = bytearray(data)
            cipher.encrypt(buf, first)
            assert buf == want, (count, first)
            enc = bytearray(want)
            cipher.decrypt(enc, first)
            assert enc == data, (count, first)


def test_few_sector_xts_sizes_interleaved() -> None:
    """The few-sector XTS path keeps per-size views of one scratch and per-size tables in
    a bounded cache: every size, in an order that evicts and rebuilds tables and reuses
    the scratch across sizes, stays exact."""
    rng = random.Random("interleaved")
    key = random_key(rng, "aes-256", "xts")
    cipher = make_cipher("aes-256", "xts", "plain64", None, key)
    sizes = list(range(1, ciphers._FEW_XTS_SECTORS + 1)) * 2
    rng.shuffle(sizes)
    for count in sizes:
        first = rng.getrandbits(64)
        data = rng.randbytes(count * SECTOR_SIZE)
        buf = bytearray(data)
        cipher.encrypt(buf, first)
        assert buf == ref_transform("aes-256", "xts", "plain64", None, key, data, first)
        cipher.decrypt(buf, first)
        assert buf == data


def test_big_buffer_more_than_one_batch() -> None:
    """2050 sectors (full default batches and a partial one) via XTS and CBC."""
    rng = random.Random(2050)
    data = rng.randbytes(2050 * SECTOR_SIZE)
    for alg, mode in (("aes-256", "xts"), ("aes-128", "cbc")):
        key = random_key(rng, alg, mode)
        cipher = make_cipher(alg, mode, "plain64", None, key)
        buf = bytearray(data)
        cipher.encrypt(buf, 123456789)
        assert buf == ref_transform(alg, mode, "plain64", None, key, data, 123456789)
        cipher.decrypt(buf, 123456789)
        assert buf == data


def test_essiv_md5_keys_aes128_and_hashes_the_whole_xts_key() -> None:
    """ESSIV's AES size follows the digest (md5 → AES-128 even for aes-256 data) and the
    hash covers the whole key, both XTS halves."""
    rng = random.Random(5)
    for alg, mode in (("aes-256", "cbc"), ("aes-256", "xts"), ("aes-128", "xts")):
        key = random_key(rng, alg, mode)
        cipher = make_cipher(alg, mode, "essiv", "md5", key)
        data = rng.randbytes(10 * SECTOR_SIZE)
        buf = bytearray(data)
        cipher.encrypt(buf, 77)
        assert buf == ref_transform(alg, mode, "essiv", "md5", key, data, 77)


def test_ctr_counter_carries(monkeypatch: pytest.MonkeyPatch) -> None:
    """CTR's counter is one big-endian 128-bit number: a carry out of the low 64 bits and
    the wrap at 2^128 inside a sector (IVs no ivgen produces in practice, so forced)."""
    rng = random.Random(7)
    key = rng.randbytes(32)
    ivs = [
        (2**64 - 5).to_bytes(16, "big"),  # low word carries into the high word
        (2**128 - 3).to_bytes(16, "big"),  # wraps to 0
        ((2**63) << 64 | (2**64 - 1)).to_bytes(16, "big"),
    ]

    def forced(self: SectorCipher, first: int, count: int) -> np.ndarray:
        del first
        return np.frombuffer(b"".join(ivs[:count]), dtype="<u8").reshape(count, 2).copy()

    monkeypatch.setattr(SectorCipher, "_iv_words", forced)
    cipher = make_cipher("aes-256", "ctr", "plain64", None, key)
    data = rng.randbytes(3 * SECTOR_SIZE)
    buf = bytearray(data)
    cipher.encrypt(buf, 0)
    want = b"".join(
        Cipher(algorithms.AES(key), modes.CTR(iv))
        .encryptor()
        .update(data[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE])
        for i, iv in enumerate(ivs)
    )
    assert buf == want


def test_xts_equal_halves_accepted() -> None:
    """QEMU's XTS does not refuse K1 == K2 (``cryptography``'s does); neither do we."""
    key = bytes(range(16)) * 2
    cipher = make_cipher("aes-128", "xts", "plain64", None, key)
    data = bytes(range(256)) * 2 * 3
    for count in (1, 3):
        buf = bytearray(data[: count * SECTOR_SIZE])
        cipher.encrypt(buf, 9)
        want = b"".join(
            xts_python(key, (9 + s).to_bytes(16, "little"), data[s * 512 : (s + 1) * 512], False)
            for s in range(count)
        )
        assert buf == want


# -- buffers --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_in_place_on_memoryview_slices(mode: str) -> None:
    """Transforms only the slice it is given, at odd offsets of a bigger buffer."""
    rng = random.Random(mode)
    key = random_key(rng, "aes-128", mode)
    cipher = make_cipher("aes-128", mode, "plain64", None, key)
    for count in (1, 5, 60):
        backing = bytearray(rng.randbytes(3 + count * SECTOR_SIZE + 11))
        original = bytes(backing)
        view = memoryview(backing)[3 : 3 + count * SECTOR_SIZE]
        cipher.encrypt(view, 1000)
        assert backing[:3] == original[:3] and backing[-11:] == original[-11:]
        want = ref_transform(
            "aes-128", mode, "plain64", None, key, original[3 : 3 + count * SECTOR_SIZE], 1000
        )
        assert view == want
        cipher.decrypt(view, 1000)
        assert backing == original


def test_other_buffer_shapes() -> None:
    cipher = make_cipher("aes-256", "xts", "plain64", None, bytes(range(64)))
    plain = bytearray(b"\x11" * 1024)
    want = bytearray(plain)
    cipher.encrypt(want, 3)
    # a memoryview of another format, and a numpy array, are the same bytes
    words = memoryview(bytearray(plain)).cast("Q")
    cipher.encrypt(words, 3)
    assert words.tobytes() == want
    array = np.frombuffer(bytearray(plain), dtype=np.uint8)
    cipher.encrypt(memoryview(array), 3)
    assert array.tobytes() == want
    empty = bytearray()
    cipher.encrypt(empty, 0)
    assert empty == b""


@pytest.mark.parametrize("length", [1, 511, 513, 1000, 4095])
def test_partial_sector_length_refused(length: int) -> None:
    cipher = make_cipher("aes-128", "cbc", "plain64", None, bytes(16))
    buf = bytearray(length)
    with pytest.raises(Qcow2FormatError, match=f"length={length}"):
        cipher.encrypt(buf, 0)
    with pytest.raises(Qcow2FormatError, match=f"length={length}"):
        cipher.decrypt(buf, 0)
    assert buf == bytes(length)


def test_unusable_buffers_refused() -> None:
    cipher = make_cipher("aes-128", "cbc", "plain64", None, bytes(16))
    with pytest.raises(TypeError, match="writable"):
        cipher.encrypt(bytes(512), 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="contiguous"):
        cipher.encrypt(memoryview(bytearray(2048))[::2], 0)
    with pytest.raises(Qcow2FormatError, match="first_sector=-1"):
        cipher.encrypt(bytearray(512), -1)


# -- threads ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_threads_share_one_cipher(mode: str) -> None:
    """Several threads on one cipher (its per-thread contexts, CBC's chained context
    included) give exactly the single-threaded results."""
    rng = random.Random(mode)
    key = random_key(rng, "aes-256", mode)
    cipher = make_cipher("aes-256", mode, "essiv", "sha256", key)
    jobs = [
        (rng.randbytes(rng.choice([1, 2, 8, 9, 16, 40, 130]) * SECTOR_SIZE), rng.getrandbits(40))
        for _ in range(48)
    ]
    expected = []
    for data, first in jobs:
        buf = bytearray(data)
        cipher.encrypt(buf, first)
        expected.append(bytes(buf))
    failures: list[str] = []
    start = threading.Barrier(4)

    def worker(offset: int) -> None:
        start.wait()
        for rounds in range(3):
            for i in range(offset, len(jobs), 2):
                data, first = jobs[i]
                buf = bytearray(data)
                cipher.encrypt(buf, first)
                if buf != expected[i]:
                    failures.append(f"encrypt job {i} round {rounds}")
                cipher.decrypt(buf, first)
                if buf != data:
                    failures.append(f"decrypt job {i} round {rounds}")

    threads = [threading.Thread(target=worker, args=(i % 2,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


# -- algorithms, keys and their errors ------------------------------------------------------


def test_cipher_key_bytes() -> None:
    assert cipher_key_bytes("aes-128", "cbc") == 16
    assert cipher_key_bytes("aes-192", "ctr") == 24
    assert cipher_key_bytes("aes-256", "ecb") == 32
    assert cipher_key_bytes("aes-128", "xts") == 32
    assert cipher_key_bytes("aes-192", "xts") == 48
    assert cipher_key_bytes("aes-256", "xts") == 64
    # sizes of ciphers QEMU names but we do not implement are still known
    assert cipher_key_bytes("twofish-256", "xts") == 64
    assert cipher_key_bytes("cast5-128", "cbc") == 16
    with pytest.raises(Qcow2UnsupportedError, match="cipher-alg=sm4"):
        cipher_key_bytes("sm4", "xts")
    with pytest.raises(Qcow2UnsupportedError, match="cipher-mode=ofb"):
        cipher_key_bytes("aes-128", "ofb")


@pytest.mark.parametrize(
    "args,match",
    [
        (("twofish-256", "xts", "plain64", None), "cipher-alg=twofish-256"),
        (("serpent-128", "cbc", "plain64", None), "cipher-alg=serpent-128"),
        (("cast5-128", "cbc", "plain64", None), "cipher-alg=cast5-128"),
        (("sm4", "xts", "plain64", None), "cipher-alg=sm4"),
        (("aes-512", "xts", "plain64", None), "cipher-alg=aes-512"),
        (("AES-256", "xts", "plain64", None), "cipher-alg=AES-256"),
        (("aes-256", "cfb", "plain64", None), "cipher-mode=cfb"),
        (("aes-256", "xts", "benbi", None), "ivgen-alg=benbi"),
        (("aes-256", "cbc", "essiv", "sha1"), "No AES cipher with key size 20"),
        (("aes-256", "cbc", "essiv", "sha512"), "No AES cipher with key size 64"),
        (("aes-256", "cbc", "essiv", "ripemd160"), "ivgen-hash-alg=ripemd160"),
        (("aes-256", "cbc", "essiv", None), "ivgen-hash-alg is required"),
        (("aes-256", "cbc", "essiv", "sha3"), "ivgen-hash-alg=sha3"),
        (("aes-256", "cbc", "plain64", "whirlpool"), "ivgen-hash-alg=whirlpool"),
        (("aes-256\n", "xts", "plain64", None), r"cipher-alg='aes-256\\n'"),
    ],
)
def test_unsupported_refused(args: tuple[str, str, str, str | None], match: str) -> None:
    with pytest.raises(Qcow2UnsupportedError, match=match):
        check_supported(*args)
    with pytest.raises(Qcow2UnsupportedError, match=match):
        make_cipher(*args, bytes(64))


def test_supported_combinations_pass_check() -> None:
    for alg in ALGS:
        for mode in MODES:
            for ivgen, hash_alg in (*IVGENS, ("essiv", "md5"), ("plain64", "sha1")):
                check_supported(alg, mode, ivgen, hash_alg)


@pytest.mark.parametrize("alg,mode,bad_len", [("aes-256", "xts", 32), ("aes-128", "cbc", 15)])
def test_wrong_key_length_refused_without_the_key(alg: str, mode: str, bad_len: int) -> None:
    key = bytes([0xA7]) * bad_len
    with pytest.raises(Qcow2FormatError, match=f"{bad_len} bytes, expected") as info:
        make_cipher(alg, mode, "plain64", None, key)
    assert "a7" not in str(info.value).lower()


def test_repr_and_wipe() -> None:
    key = bytes([0xC3]) * 64
    cipher = make_cipher("aes-256", "xts", "essiv", "sha256", key)
    text = repr(cipher)
    assert "aes-256-xts-essiv:sha256" in text and "c3" not in text.lower()
    assert "\\xc3" not in text
    assert (cipher.cipher_alg, cipher.cipher_mode, cipher.ivgen_alg) == (
        "aes-256",
        "xts",
        "essiv",
    )
    assert cipher.ivgen_hash_alg == "sha256" and cipher.key_bytes == 64
    cipher.encrypt(bytearray(1024), 0)
    cipher.wipe()
    assert cipher._key == bytes(64) and cipher._essiv_key == bytes(32)
    with pytest.raises(Qcow2PassphraseError, match="wiped"):
        cipher.decrypt(bytearray(512), 0)
    assert "wiped" in repr(cipher)


def test_legacy_aes_key() -> None:
    """AES-128-CBC, plain64, key = the first 16 passphrase bytes zero-padded (up to a NUL,
    QEMU reading the secret as a C string)."""
    data = random.Random(1).randbytes(4 * SECTOR_SIZE)
    for passphrase, key in (
        (b"pw", b"pw" + bytes(14)),
        (b"0123456789abcdefXYZ", b"0123456789abcdef"),
        (b"", bytes(16)),
        (b"ab\0cd", b"ab" + bytes(14)),
    ):
        cipher = legacy_aes_cipher(passphrase)
        assert (cipher.cipher_alg, cipher.cipher_mode, cipher.ivgen_alg) == (
            "aes-128",
            "cbc",
            "plain64",
        )
        buf = bytearray(data)
        cipher.encrypt(buf, 2**33)
        assert buf == ref_transform("aes-128", "cbc", "plain64", None, key, data, 2**33)


# -- QEMU as the oracle (legacy AES, whose key is the passphrase) --------------------------


def _host_offsets(path: Path, guest_offsets: list[int]) -> dict[int, int]:
    """Host offset of the cluster holding each guest offset, from the L1/L2 tables."""
    with path.open("rb") as f:
        header = f.read(72)
        cluster_bits = struct.unpack(">I", header[20:24])[0]
        l1_size = struct.unpack(">I", header[36:40])[0]
        l1_offset = struct.unpack(">Q", header[40:48])[0]
        assert struct.unpack(">I", header[32:36])[0] == 1  # crypt_method AES
        cluster = 1 << cluster_bits
        l2_entries = cluster // 8
        f.seek(l1_offset)
        l1 = struct.unpack(f">{l1_size}Q", f.read(8 * l1_size))
        found = {}
        for guest in guest_offsets:
            index = guest >> cluster_bits
            l2_offset = l1[index // l2_entries] & 0x00FFFFFFFFFFFE00
            assert l2_offset, f"guest {guest}: no L2 table"
            f.seek(l2_offset + 8 * (index % l2_entries))
            entry = struct.unpack(">Q", f.read(8))[0]
            assert not entry >> 62 & 1, "compressed cluster"
            host = entry & 0x00FFFFFFFFFFFE00
            assert host, f"guest {guest}: unallocated"
            found[guest] = host + (guest & (cluster - 1))
    return found


def test_legacy_aes_against_qemu(qemu: Qemu, tmp_path: Path) -> None:
    """qemu-io writes patterns into a legacy-AES qcow2; we decrypt its ciphertext with the
    GUEST sector numbers, and our encryption of the patterns is the file's bytes."""
    image = tmp_path / "a.qcow2"
    secret = ["--object", "secret,id=s,data=pw"]
    qemu.img(
        "create",
        "-f",
        "qcow2",
        *secret,
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s",
        image,
        "3T",
    )
    high = 2**41 + 3 * 65536  # guest sector 2^32 + 384: plain64, not plain (mod 2^32)
    writes = [
        (0, 128 * 1024, 0x5A),
        (300 * 1024, 4096, 0x33),
        (high + 1024, 8192, 0xC7),
    ]
    opts = f"driver=qcow2,file.filename={image},encrypt.key-secret=s"
    qemu.io(
        opts,
        *(f"write -P {pattern:#x} {offset} {length}" for offset, length, pattern in writes),
        fmt=None,
        extra_args=[*secret, "--image-opts"],
    )
    cipher = legacy_aes_cipher(b"pw")
    raw = image.read_bytes()
    checks = [(offset, length, bytes([p]) * length) for offset, length, p in writes]
    # the rest of a partly written cluster is QEMU's encrypted zeros (COW of nothing)
    checks += [(256 * 1024, 44 * 1024, bytes(44 * 1024)), (high, 1024, bytes(1024))]
    hosts = _host_offsets(image, [offset for offset, _, _ in checks])
    for guest, length, plain in checks:
        host = hosts[guest]
        stored = raw[host : host + length]
        assert len(stored) == length
        buf = bytearray(stored)
        cipher.decrypt(buf, guest // SECTOR_SIZE)
        assert buf == plain, f"guest {guest:#x}"
        mine = bytearray(plain)
        cipher.encrypt(mine, guest // SECTOR_SIZE)
        assert mine == stored, f"guest {guest:#x}"
    # and a wrong passphrase decrypts to garbage without any error, as in QEMU
    wrong = bytearray(raw[hosts[0] : hosts[0] + 512])
    legacy_aes_cipher(b"pW").decrypt(wrong, 0)
    assert wrong != bytes([0x5A]) * 512


def test_bench_function_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """bench() is a measurement, not a test; only check it runs and reports."""
    results = ciphers.bench(seconds=0.001)
    assert results and all(value > 0 for value in results.values())
    assert "aes-256-xts encrypt 1024 KiB" in capsys.readouterr().out
