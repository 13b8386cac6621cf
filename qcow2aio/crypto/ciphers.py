"""Sector ciphers of qcow2 encryption: AES in XTS, CBC, ECB and CTR with QEMU's IV generators.

Both encrypted formats QEMU 7.2 writes into qcow2 (legacy AES, ``crypt_method`` 1, and
LUKS, ``crypt_method`` 2) encrypt data in independent 512-byte sectors: sector ``s`` is
encrypted with an IV derived from the number ``s`` only, so any sector can be read or
rewritten alone. LUKS also encrypts its keyslot material that way (sector 0 at the start
of the material). This module is that layer and nothing else: which sector number a
buffer starts at (guest or host offset) is the caller's business.

The modes are written here from their definitions (IEEE P1619 for XTS, NIST SP 800-38A
for CBC/CTR/ECB, ESSIV as in dm-crypt) on top of one primitive, AES-ECB from
``cryptography``, because per-sector calls into ``cryptography`` are slow in Python
(a ``Cipher``, a context and a key schedule per 512 bytes: ~160 MiB/s for XTS), and its
XTS takes only 256/512-bit keys (no AES-192-XTS). Instead every transform is *batched*
over the whole buffer: the IVs of all its sectors are computed at once, and the AES work
is one ECB call over the whole buffer wherever the mode allows it:

* XTS: tweaks ``T_s = AES_K2(iv_s)`` in one ECB call; ``T_s * alpha^j`` for the 32
  blocks of a sector by a few vector operations (:func:`_xts_tweaks`); then
  ``C = AES_K1(P ^ T) ^ T`` in one ECB call.
* CBC decryption: one ECB-decrypt call, then one contiguous XOR with the ciphertext
  shifted by a block, and a fix-up of each sector's first block (its IV instead).
* CBC encryption is sequential *within* a sector, but sectors are independent: block
  ``j`` of every sector is encrypted in one ECB call, 32 calls per buffer whatever its
  size (:meth:`SectorCipher._cbc_encrypt_columns`). A few sectors go through one CBC
  context instead (:meth:`SectorCipher._cbc_encrypt_chained`).
* CTR: the counter blocks of every sector are built with numpy and encrypted in one
  ECB call (the keystream).
* ECB: one call.

numpy costs 0.3-2 µs per operation whatever the size, so buffers of a few sectors take
leaner paths: XTS up to :data:`_FEW_XTS_SECTORS` gathers its tweaks by precomputed tables
into per-thread scratch arrays (:meth:`SectorCipher._xts_few`, ~8 µs for 4 KiB against
~20 on the batched path), CBC decryption of up to :data:`_SMALL_CBC_SECTORS` computes on
Python integers. Big buffers are cut into batches of :data:`_CHUNK_SECTORS` to keep the
temporaries in the CPU cache.

Not used: ``cryptography``'s own XTS per sector (a ``Cipher`` and context per sector,
~3.1 µs each, 25 µs per 4 KiB).

**Threads.** A :class:`SectorCipher` is immutable once built. The only state kept
between calls is cached *per thread* (``threading.local``): ``cryptography``'s ECB
contexts, which keep no state between whole-block updates, the CBC context of
:meth:`SectorCipher._cbc_encrypt_chained` together with its chaining value, and the
scratch arrays of the few-sector paths (:class:`_Scratch`). So one cipher may be used
from several threads at once.

**Keys.** A :class:`SectorCipher` copies its key into a ``bytearray`` it owns (the AES
objects hold views of it), and :meth:`SectorCipher.wipe` zeroes that copy and the ESSIV
key and drops the cached contexts (OpenSSL clears a context's key schedule when it
frees it; contexts cached by threads other than the caller's are freed when those
threads' entries go, which CPython does as the ``threading.local`` object dies). What
Python does not let us zero: the caller's own ``bytes`` key; the ``bytes`` digest
``hashlib`` returns for the ESSIV key (copied and dropped at once, but its memory is
freed, not cleared); the passphrase ``bytes`` given to :func:`legacy_aes_cipher`. Keys
never appear in a ``repr`` or an exception message.

The arithmetic treats 16-byte blocks as two little-endian 64-bit words with explicit
``<u8`` dtypes (and ``int.from_bytes(..., "little")``), so it means the same on either
byte order; it has been tested on little-endian hosts only.

``python -m qcow2aio.crypto.ciphers`` runs :func:`bench` (runpy warns that the module
was already imported by its package; harmless).
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from collections.abc import Callable
from typing import Final

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from ..errors import Qcow2FormatError, Qcow2PassphraseError, Qcow2UnsupportedError

__all__ = [
    "SECTOR_SIZE",
    "SectorCipher",
    "bench",
    "check_supported",
    "cipher_key_bytes",
    "legacy_aes_cipher",
    "make_cipher",
]

SECTOR_SIZE: Final = 512
_BLOCK: Final = 16
_BLOCKS_PER_SECTOR: Final = SECTOR_SIZE // _BLOCK  # 32
_WORDS_PER_SECTOR: Final = SECTOR_SIZE // 8  # 64 little-endian u64 words
_MASK64: Final = (1 << 64) - 1
_MASK32: Final = (1 << 32) - 1

# Sectors per numpy batch (512 KiB), so that its temporaries (XTS: tweaks and ECB output)
# stay in the CPU cache. Measured on 1 MiB: 256 → 1.6, 1024 → 1.9-2.0 GiB/s; at 2048
# (1 MiB arrays) malloc hands out fresh pages every call, and speed varies 0.3-2 GiB/s.
_CHUNK_SECTORS: Final = 1024
# Up to this many sectors XTS takes the few-sector path (:meth:`SectorCipher._xts_few`):
# tweaks gathered and shifted by precomputed per-size tables into per-thread scratch
# arrays, ~10 numpy/OpenSSL calls in all, none allocating. The batched path's ~35 calls
# (broadcasting over inner axes of 1-2 elements, which numpy iterates slowly, and fresh
# temporaries) cost ~20 µs whatever the size; the gather costs ~0.5 µs per sector more
# than the broadcasting, so it loses beyond a few dozen sectors (measured: 8 sectors
# 20 → 8 µs, 16 sectors 22 → 11 µs, 48 sectors 28 → 23 µs, crossover ~64). Its scratch
# arrays take ~130 KiB per thread and cipher.
_FEW_XTS_SECTORS: Final = 48
# Up to this many sectors CBC decryption computes on Python integers instead of numpy
# (measured crossover: 1 sector 3.0 µs against 5.5, 4 sectors ~6.5 against 7).
_SMALL_CBC_SECTORS: Final = 4
# Up to this many sectors CBC decryption decrypts into the per-thread scratch buffer
# instead of a fresh array (same arithmetic as the batched path otherwise).
_FEW_CBC_SECTORS: Final = 32
# From this many sectors on, CBC encryption encrypts block j of all sectors per ECB call
# (32 calls per batch); below it it chains one CBC context through the sectors (Python
# work per sector, ~2 µs each). Measured crossover: 16-24 sectors.
_CBC_COLUMNS_MIN_SECTORS: Final = 20

_LE64: Final = np.dtype("<u8")
_BE64: Final = np.dtype(">u8")

Words = npt.NDArray[np.uint64]
KeyBytes = bytes | bytearray | memoryview

# Key sizes (bytes) of the cipher algorithms QEMU's LUKS driver knows by name. Only AES is
# implemented; the others are listed so that cipher_key_bytes can still validate and
# describe a header that uses them, and so that refusing them says "unsupported", not
# "unknown".
_AES_KEY_BYTES: Final[dict[str, int]] = {"aes-128": 16, "aes-192": 24, "aes-256": 32}
_OTHER_KEY_BYTES: Final[dict[str, int]] = {
    "twofish-128": 16,
    "twofish-192": 24,
    "twofish-256": 32,
    "serpent-128": 16,
    "serpent-192": 24,
    "serpent-256": 32,
    "cast5-128": 16,
}
_MODES: Final = ("xts", "cbc", "ecb", "ctr")
_IVGENS: Final = ("plain", "plain64", "essiv")
# QEMU's hash names (QCryptoHashAlgorithm) and their digest sizes. ESSIV keys AES with
# the digest, so only digests of an AES key size (md5, sha256) work there.
_HASH_BYTES: Final[dict[str, int]] = {
    "md5": 16,
    "sha1": 20,
    "sha224": 28,
    "sha256": 32,
    "sha384": 48,
    "sha512": 64,
    "ripemd160": 20,
}
_AES_SIZES: Final = (16, 24, 32)


def _show(value: object) -> str:
    """A field value for an error message: as is when it is plain text, else its repr.

    Values come from untrusted headers; control characters must not reach a log as is.
    """
    if isinstance(value, str) and value and value.isascii() and value.isprintable():
        return value
    return repr(value)


def cipher_key_bytes(cipher_alg: str, cipher_mode: str) -> int:
    """The master-key length LUKS stores for ``cipher_alg`` in ``cipher_mode``.

    XTS uses two keys of the algorithm's size (data key then tweak key), so its key is
    twice as long: aes-256-xts has a 64-byte key. Known for every cipher QEMU's LUKS
    driver names (twofish, serpent, cast5 too, although :func:`make_cipher` refuses
    them), so a header of an unsupported cipher can still be checked and described;
    an unknown name raises :class:`Qcow2UnsupportedError`.
    """
    size = _AES_KEY_BYTES.get(cipher_alg) or _OTHER_KEY_BYTES.get(cipher_alg)
    if size is None:
        raise Qcow2UnsupportedError(f"Unsupported cipher algorithm: cipher-alg={_show(cipher_alg)}")
    if cipher_mode not in _MODES:
        raise Qcow2UnsupportedError(f"Unsupported cipher mode: cipher-mode={_show(cipher_mode)}")
    return 2 * size if cipher_mode == "xts" else size


def _check_essiv_hash(ivgen_hash_alg: str | None) -> None:
    """ESSIV keys an AES of the digest's size, which must be an AES key size (QEMU:
    ``No AES cipher with key size 20`` for sha1)."""
    if ivgen_hash_alg is None:
        raise Qcow2UnsupportedError(
            "Missing IV generator hash: ivgen-hash-alg is required with ivgen-alg=essiv"
        )
    size = _HASH_BYTES.get(ivgen_hash_alg)
    if size is None:
        raise Qcow2UnsupportedError(
            f"Unsupported hash algorithm: ivgen-hash-alg={_show(ivgen_hash_alg)}"
        )
    if size not in _AES_SIZES:
        raise Qcow2UnsupportedError(
            f"Unsupported ESSIV hash: ivgen-hash-alg={ivgen_hash_alg} "
            f"(No AES cipher with key size {size})"
        )
    try:
        hashlib.new(ivgen_hash_alg)
    except ValueError:  # e.g. md5 on a FIPS-only OpenSSL
        raise Qcow2UnsupportedError(
            f"Unsupported hash algorithm: ivgen-hash-alg={ivgen_hash_alg} "
            "(not available in this Python's hashlib)"
        ) from None


def check_supported(
    cipher_alg: str, cipher_mode: str, ivgen_alg: str, ivgen_hash_alg: str | None
) -> None:
    """Raise :class:`Qcow2UnsupportedError` unless this module implements the combination.

    Supported: aes-128/192/256 x xts/cbc/ecb/ctr x plain/plain64/essiv, where essiv needs
    a hash whose digest is an AES key size (md5, sha256). With plain and plain64 a hash
    name is ignored, as QEMU (and dm-crypt) ignore it, but it must still be a hash QEMU
    knows, since QEMU refuses the header otherwise. The message names the field and the
    value, e.g. ``Unsupported cipher algorithm: cipher-alg=twofish-256``.
    """
    if cipher_alg not in _AES_KEY_BYTES:
        if cipher_alg in _OTHER_KEY_BYTES:
            raise Qcow2UnsupportedError(
                f"Unsupported cipher algorithm: cipher-alg={cipher_alg} (only AES is implemented)"
            )
        raise Qcow2UnsupportedError(f"Unsupported cipher algorithm: cipher-alg={_show(cipher_alg)}")
    if cipher_mode not in _MODES:
        raise Qcow2UnsupportedError(f"Unsupported cipher mode: cipher-mode={_show(cipher_mode)}")
    if ivgen_alg not in _IVGENS:
        raise Qcow2UnsupportedError(f"Unsupported IV generator: ivgen-alg={_show(ivgen_alg)}")
    if ivgen_alg == "essiv":
        _check_essiv_hash(ivgen_hash_alg)
    elif ivgen_hash_alg is not None and ivgen_hash_alg not in _HASH_BYTES:
        raise Qcow2UnsupportedError(
            f"Unsupported hash algorithm: ivgen-hash-alg={_show(ivgen_hash_alg)}"
        )


# -- XTS tweak arithmetic ------------------------------------------------------------------
#
# XTS reads a 16-byte block as a little-endian polynomial of degree < 128 over GF(2);
# alpha = x, and x^128 = x^7 + x^2 + x + 1 (0x87). For j < 64, t * x^j is the 128-bit
# shift t << j plus the j bits that fell off the top, o = t >> (128 - j), times 0x87
# carry-less: o ^ o<<1 ^ o<<2 ^ o<<7, which for j < 32 has under 40 bits.

# j = 0..31 and 63 - j, as (1, 32) columns broadcast against (n, 1) tweak words.
_J: Final[Words] = np.arange(_BLOCKS_PER_SECTOR, dtype=np.uint64).reshape(1, -1)
_63_MINUS_J: Final[Words] = np.uint64(63) - _J
_ONE: Final = np.uint64(1)
_TWO: Final = np.uint64(2)
_SEVEN: Final = np.uint64(7)


def _xts_tweaks(t: Words, out: Words) -> None:
    """``out[s, j] = t[s] * x^j`` for j = 0..31, vectorised over sectors and j.

    ``t`` is (n, 2) words (lo, hi) of the encrypted sector tweaks, ``out`` (n, 32, 2).
    A dozen vector operations for all sectors and all j at once, instead of 31 doublings
    each. Shifts by 64 are undefined, hence ``(x >> 1) >> (63 - j)`` for ``x >> (64 - j)``.
    """
    lo = t[:, 0:1]
    hi = t[:, 1:2]
    out_lo = out[:, :, 0]
    out_hi = out[:, :, 1]
    np.left_shift(hi, _J, out=out_hi)
    out_hi |= np.right_shift(lo >> _ONE, _63_MINUS_J)
    np.left_shift(lo, _J, out=out_lo)
    over = np.right_shift(hi >> _ONE, _63_MINUS_J)
    out_lo ^= over
    out_lo ^= over << _ONE
    out_lo ^= over << _TWO
    out_lo ^= over << _SEVEN


# The few-sector version (:meth:`SectorCipher._xts_few`). numpy's per-call cost (~0.3 µs)
# dominates there, and broadcasting a (n, 1, 2) against a (1, 32, 1) array costs ~2.4 µs
# (numpy iterates inner axes of 1-2 elements slowly), so the same terms are produced by
# flat, contiguous operations over five rows, one per term of out[s, j] (word w = 0 lo,
# 1 hi):
#
#   row 0: t[s, w] << j                   the 128-bit shift, per word
#   row 1: t[s, 1 - w] >> (64 - j)        lo → hi carry (w = 1) and o = hi >> (64 - j) (w = 0)
#   rows 2-4: (t[s, 1] >> (64 - j)) << k  o << 1, o << 2, o << 7 (w = 0 only)
#
# i.e. out = XOR over rows of (gathered >> right) << left: one gather (``take``) by an
# index table, two shifts by shift-count tables, one XOR reduction. Where a term is absent
# (j = 0, whose shift by 64 would be undefined; rows 2-4 at w = 1) the index points at a
# zero word kept after the encrypted tweaks, and both counts are 0.
_TERM_ROWS: Final = 5
# Word index of that zero word in the scratch tweak buffer: after room for the tweaks of
# _FEW_XTS_SECTORS sectors and the spare block update_into wants, so never written.
_ZERO_WORD: Final = 2 * _FEW_XTS_SECTORS + 2


@functools.lru_cache(maxsize=8)
def _xts_gather_tables(count: int) -> tuple[npt.NDArray[np.intp], Words, Words]:
    """(index, right, left) tables of :meth:`SectorCipher._xts_few` for ``count`` sectors,
    each (5, 64 count), read-only (shared by all threads and ciphers).

    Their own contiguous arrays per size: columns sliced out of bigger tables cost
    ~1 µs a call (``take`` copies a strided index, the shifts iterate per row). 7.5 KiB
    per sector, so only the 8 sizes used last are kept (~45 µs to rebuild one).
    """
    s = np.arange(count, dtype=np.intp).reshape(-1, 1, 1)
    j = np.arange(_BLOCKS_PER_SECTOR, dtype=np.intp).reshape(1, -1, 1)
    w = np.arange(2, dtype=np.intp).reshape(1, 1, -1)
    shape = (_TERM_ROWS, count, _BLOCKS_PER_SECTOR, 2)
    index = np.full(shape, _ZERO_WORD, dtype=np.intp)
    right = np.zeros(shape, dtype=np.intp)
    left = np.zeros(shape, dtype=np.intp)
    index[0] = 2 * s + w
    left[0] = j
    later = j > 0
    index[1] = np.where(later, 2 * s + 1 - w, _ZERO_WORD)
    right[1] = np.where(later, 64 - j, 0)
    overflow = later & (w == 0)
    for row, k in ((2, 1), (3, 2), (4, 7)):
        index[row] = np.where(overflow, 2 * s + 1, _ZERO_WORD)
        right[row] = np.where(overflow, 64 - j, 0)
        left[row] = np.where(overflow, k, 0)
    tables = (
        index.reshape(_TERM_ROWS, -1),
        right.astype(_LE64).reshape(_TERM_ROWS, -1),
        left.astype(_LE64).reshape(_TERM_ROWS, -1),
    )
    for table in tables:
        table.flags.writeable = False
    return tables


@functools.cache
def _iv_series(count: int) -> tuple[int, int]:
    """(sum of 1 << 128 i, sum of i << 128 i) for i < count: the IV blocks of sectors
    ``base .. base+count-1`` packed little-endian are ``base * ones + steps`` (as long as
    no sector number wraps), one multiplication instead of ``count`` conversions."""
    ones = sum(1 << (8 * _BLOCK * i) for i in range(count))
    steps = sum(i << (8 * _BLOCK * i) for i in range(count))
    return ones, steps


# -- buffers -------------------------------------------------------------------------------


def _sector_view(buf: bytearray | memoryview) -> memoryview:
    """The caller's buffer as a flat writable byte view (no copy).

    Raises :class:`Qcow2FormatError` unless the length is whole sectors; ``TypeError``
    for a buffer that cannot be transformed in place (read-only or not contiguous),
    which is a programming error, not bad input.
    """
    try:
        view = memoryview(buf)
    except TypeError:
        raise TypeError(
            f"sector cipher needs a writable buffer, not {type(buf).__name__}"
        ) from None
    if view.readonly:
        raise TypeError("sector cipher needs a writable buffer, got a read-only one")
    if not view.c_contiguous:
        raise TypeError("sector cipher needs a contiguous buffer")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    if view.nbytes % SECTOR_SIZE:
        raise Qcow2FormatError(
            f"encrypted data must be whole {SECTOR_SIZE}-byte sectors: buffer length={view.nbytes}"
        )
    return view


def _ecb_into(ctx: CipherContext, data: Words, out: Words) -> None:
    """``out[:data.size] = AES(data)``; ``out`` has 2 spare words (``update_into`` wants
    one block of room beyond the data, although ECB on whole blocks never uses it)."""
    done = ctx.update_into(data.reshape(-1).view(np.uint8).data, out.view(np.uint8).data)
    if done != data.nbytes:  # cannot happen with whole blocks; never return garbage
        raise Qcow2FormatError(f"AES-ECB returned {done} bytes for {data.nbytes}")


def _ecb_words(ctx: CipherContext, data: Words) -> Words:
    """``AES(data)`` as a new word array of the same shape."""
    out = np.empty(data.size + 2, dtype=_LE64)
    _ecb_into(ctx, data, out)
    return out[: data.size].reshape(data.shape)


def _int(data: bytes | memoryview) -> int:
    return int.from_bytes(data, "little")


# Per-size views into a _Scratch for :meth:`SectorCipher._xts_few`: the (5, 64 n) gathered
# terms, the 64 n tweak words, the ECB output words.
_FewViews = tuple[Words, Words, Words]


class _Scratch:
    """One thread's reusable work arrays for the few-sector paths (one per cipher and
    thread, in the cipher's ``threading.local``, so no two calls ever share one).

    Fresh numpy temporaries cost an allocation each (~0.2 µs, and for big ones page
    faults); at a few sectors the work itself is a few µs, so they matter. The arrays
    hold the last call's tweaks and data; :meth:`SectorCipher.wipe` drops them with the
    contexts.
    """

    __slots__ = ("few", "gathered", "out", "out_bytes", "tweak_bytes", "tweak_words", "tweaks")

    def __init__(self) -> None:
        capacity = _FEW_XTS_SECTORS if _FEW_XTS_SECTORS > _FEW_CBC_SECTORS else _FEW_CBC_SECTORS
        # The encrypted tweaks, the spare block update_into wants, then _ZERO_WORD.
        self.tweak_bytes = bytearray(_BLOCK * (_FEW_XTS_SECTORS + 2))
        self.tweak_words: Words = np.frombuffer(self.tweak_bytes, dtype=_LE64)
        self.gathered: Words = np.empty(_TERM_ROWS * _WORDS_PER_SECTOR * _FEW_XTS_SECTORS, _LE64)
        self.tweaks: Words = np.empty(_WORDS_PER_SECTOR * _FEW_XTS_SECTORS, _LE64)
        # ECB output (update_into wants a spare block).
        self.out_bytes = bytearray(SECTOR_SIZE * capacity + _BLOCK)
        self.out: Words = np.frombuffer(self.out_bytes, dtype=_LE64)
        self.few: dict[int, _FewViews] = {}

    def xts_views(self, count: int) -> _FewViews:
        """The views :meth:`SectorCipher._xts_few` uses for ``count`` sectors (cached)."""
        views = self.few.get(count)
        if views is None:
            size = count * _WORDS_PER_SECTOR
            gathered = self.gathered[: _TERM_ROWS * size].reshape(_TERM_ROWS, size)
            views = (gathered, self.tweaks[:size], self.out[:size])
            self.few[count] = views
        return views


class SectorCipher:
    """Encrypts/decrypts whole 512-byte sectors in place; IV of sector i = ivgen(first_sector + i).

    Build one with :func:`make_cipher` or :func:`legacy_aes_cipher`. Immutable after
    construction (until :meth:`wipe`), hence safe to share between threads.

    IV generators (16-byte IV of sector ``s``):

    * ``plain``: ``s mod 2^32`` little-endian, zero-padded;
    * ``plain64``: ``s mod 2^64`` little-endian, zero-padded;
    * ``essiv``: AES-ECB of the plain64 block keyed with ``hash(key)`` (the whole key,
      both XTS halves), an AES of the digest's size (sha256 → AES-256 whatever the data
      cipher).

    XTS uses the IV as the tweak (encrypted with the key's second half), CTR as a
    big-endian 128-bit counter incremented per block within the sector, ECB not at all.
    XTS keys whose halves are equal are accepted (as QEMU's own XTS does), unlike
    ``cryptography``'s XTS.
    """

    __slots__ = (
        "_ciphers",
        "_essiv_key",
        "_key",
        "_local",
        "_wiped",
        "cipher_alg",
        "cipher_mode",
        "ivgen_alg",
        "ivgen_hash_alg",
        "key_bytes",
    )

    cipher_alg: str
    cipher_mode: str
    ivgen_alg: str
    ivgen_hash_alg: str | None
    key_bytes: int

    def __init__(
        self,
        cipher_alg: str,
        cipher_mode: str,
        ivgen_alg: str,
        ivgen_hash_alg: str | None,
        key: KeyBytes,
    ) -> None:
        check_supported(cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg)
        want = cipher_key_bytes(cipher_alg, cipher_mode)
        have = memoryview(key).nbytes
        if have != want:
            raise Qcow2FormatError(
                f"Wrong key length for cipher-alg={cipher_alg} cipher-mode={cipher_mode}: "
                f"{have} bytes, expected {want}"
            )
        self.cipher_alg = cipher_alg
        self.cipher_mode = cipher_mode
        self.ivgen_alg = ivgen_alg
        self.ivgen_hash_alg = ivgen_hash_alg
        self.key_bytes = want
        self._wiped = False
        self._local = threading.local()
        # Our own copy, so wipe() can clear it; the AES objects hold views of it.
        self._key = bytearray(key)
        whole = memoryview(self._key)
        data_key = whole[: want // 2] if cipher_mode == "xts" else whole
        self._ciphers: dict[str, Cipher[modes.ECB]] = {
            "data": Cipher(algorithms.AES(data_key), modes.ECB())
        }
        if cipher_mode == "xts":
            self._ciphers["tweak"] = Cipher(algorithms.AES(whole[want // 2 :]), modes.ECB())
        self._essiv_key = bytearray()
        if ivgen_alg == "essiv":
            assert ivgen_hash_alg is not None  # check_supported
            self._essiv_key = bytearray(hashlib.new(ivgen_hash_alg, self._key).digest())
            self._ciphers["essiv"] = Cipher(
                algorithms.AES(memoryview(self._essiv_key)), modes.ECB()
            )

    def __repr__(self) -> str:
        hash_part = f":{self.ivgen_hash_alg}" if self.ivgen_hash_alg else ""
        return (
            f"<SectorCipher {self.cipher_alg}-{self.cipher_mode}-{self.ivgen_alg}{hash_part}"
            f" key_bytes={self.key_bytes}{' wiped' if self._wiped else ''}>"
        )

    def wipe(self) -> None:
        """Zero the key copies this object owns and drop the cached contexts; every later
        call raises :class:`Qcow2PassphraseError`.

        Not to be called while another thread is inside :meth:`encrypt`/:meth:`decrypt`.
        See the module docstring for the copies Python does not let us clear.
        """
        self._wiped = True
        self._local = threading.local()
        self._ciphers = {}
        self._key[:] = bytes(len(self._key))
        self._essiv_key[:] = bytes(len(self._essiv_key))

    # -- public transforms -------------------------------------------------------------

    def encrypt(self, buf: bytearray | memoryview, first_sector: int) -> None:
        """Encrypt ``buf`` (whole sectors) in place; its first sector is ``first_sector``."""
        self._run(buf, first_sector, decrypt=False)

    def decrypt(self, buf: bytearray | memoryview, first_sector: int) -> None:
        """Decrypt ``buf`` (whole sectors) in place; its first sector is ``first_sector``."""
        self._run(buf, first_sector, decrypt=True)

    def _run(self, buf: bytearray | memoryview, first_sector: int, decrypt: bool) -> None:
        if self._wiped:
            raise Qcow2PassphraseError("the key of this sector cipher was wiped")
        if first_sector < 0:
            raise Qcow2FormatError(f"negative sector number: first_sector={first_sector}")
        view = _sector_view(buf)
        total = view.nbytes // SECTOR_SIZE
        if not total:
            return
        mode = self.cipher_mode
        if mode == "ecb":
            self._ecb_mode(view, decrypt)
        elif total <= _FEW_XTS_SECTORS and mode == "xts":
            self._xts_few(view, first_sector, decrypt)
        elif total <= _SMALL_CBC_SECTORS and mode == "cbc" and decrypt:
            self._cbc_decrypt_small(view, first_sector)
        elif total < _CBC_COLUMNS_MIN_SECTORS and mode == "cbc" and not decrypt:
            self._cbc_encrypt_chained(view, first_sector)
        else:
            step = self._batch_step(decrypt)
            words: Words = np.frombuffer(view, dtype=_LE64)
            for start in range(0, total, _CHUNK_SECTORS):
                lo = start * _WORDS_PER_SECTOR
                hi = min(total, start + _CHUNK_SECTORS) * _WORDS_PER_SECTOR
                step(words[lo:hi], first_sector + start)

    def _batch_step(self, decrypt: bool) -> Callable[[Words, int], None]:
        """The numpy transform of one batch of sectors."""
        if self.cipher_mode == "xts":
            return self._xts_decrypt if decrypt else self._xts_encrypt
        if self.cipher_mode == "cbc":
            return self._cbc_decrypt if decrypt else self._cbc_encrypt_columns
        return self._ctr

    # -- per-thread contexts -------------------------------------------------------------

    def _ctx(self, name: str, decrypt: bool = False) -> CipherContext:
        """This thread's ECB context of cipher ``name`` ("data", "tweak", "essiv").

        ECB contexts keep nothing between updates of whole blocks, so one per thread
        can serve every call; creating one costs a key schedule (~1.5 µs).
        """
        attr = f"{name}_{'dec' if decrypt else 'enc'}"
        local = self._local
        ctx: CipherContext | None = getattr(local, attr, None)
        if ctx is None:
            cipher = self._ciphers[name]
            ctx = cipher.decryptor() if decrypt else cipher.encryptor()
            setattr(local, attr, ctx)
        return ctx

    def _scratch(self) -> _Scratch:
        """This thread's work arrays (see :class:`_Scratch`)."""
        scratch: _Scratch | None = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = _Scratch()
        return scratch

    # -- IVs -----------------------------------------------------------------------------

    def _iv_words(self, first: int, count: int) -> Words:
        """The IVs of sectors ``first .. first+count-1`` as (count, 2) little-endian words."""
        iv = np.zeros((count, 2), dtype=_LE64)
        sectors = np.arange(count, dtype=np.uint64)
        sectors += np.uint64(first & _MASK64)  # wraps mod 2^64 like QEMU's uint64_t
        if self.ivgen_alg == "plain":
            sectors &= np.uint64(_MASK32)
        iv[:, 0] = sectors
        if self.ivgen_alg == "essiv":
            iv = _ecb_words(self._ctx("essiv"), iv)
        return iv

    def _iv_bytes(self, first: int, count: int) -> bytes:
        """The same IVs as bytes, for the few-sector paths."""
        mask = _MASK32 if self.ivgen_alg == "plain" else _MASK64
        base = first & mask
        if base + count - 1 <= mask:
            ones, steps = _iv_series(count)
            raw = (base * ones + steps).to_bytes(_BLOCK * count, "little")
        else:  # the sector numbers wrap inside the run
            raw = b"".join(((first + i) & mask).to_bytes(_BLOCK, "little") for i in range(count))
        if self.ivgen_alg == "essiv":
            raw = self._ctx("essiv").update(raw)
        return raw

    # -- ECB -----------------------------------------------------------------------------

    def _ecb_mode(self, view: memoryview, decrypt: bool) -> None:
        """ECB: every block alone, no IV; one call for the whole buffer."""
        out = bytearray(view.nbytes + _BLOCK)
        self._ctx("data", decrypt).update_into(view, out)
        view[:] = memoryview(out)[: view.nbytes]

    # -- XTS -----------------------------------------------------------------------------

    def _xts_tweak_words(self, count: int, first: int) -> Words:
        """The tweak of every block of ``count`` sectors, flat little-endian words."""
        tweak = _ecb_words(self._ctx("tweak"), self._iv_words(first, count))
        tweaks = np.empty((count, _BLOCKS_PER_SECTOR, 2), dtype=_LE64)
        _xts_tweaks(tweak, tweaks)
        return tweaks.reshape(-1)

    def _xts_encrypt(self, words: Words, first: int) -> None:
        self._xts(words, first, decrypt=False)

    def _xts_decrypt(self, words: Words, first: int) -> None:
        self._xts(words, first, decrypt=True)

    def _xts(self, words: Words, first: int, decrypt: bool) -> None:
        """XTS: ``C = AES_K1(P ^ T) ^ T``, ``T = AES_K2(iv) * x^j``; decryption only turns
        AES_K1 around (the tweak is always encrypted)."""
        tweaks = self._xts_tweak_words(words.size // _WORDS_PER_SECTOR, first)
        words ^= tweaks  # the caller's buffer is ours to scribble on: one temporary less
        out = np.empty(words.size + 2, dtype=_LE64)
        _ecb_into(self._ctx("data", decrypt), words, out)
        np.bitwise_xor(out[: words.size], tweaks, out=words)

    def _xts_few(self, view: memoryview, first: int, decrypt: bool) -> None:
        """XTS of up to :data:`_FEW_XTS_SECTORS` sectors: the same math as :meth:`_xts`,
        the tweaks by the gather tables (see :func:`_xts_gather_tables`), every array a
        view of this thread's :class:`_Scratch`: ~10 calls, none allocating."""
        count = view.nbytes // SECTOR_SIZE
        scratch = self._scratch()
        index, right, left = _xts_gather_tables(count)
        gathered, tweaks, out = scratch.xts_views(count)
        self._ctx("tweak").update_into(self._iv_bytes(first, count), scratch.tweak_bytes)
        scratch.tweak_words.take(index, out=gathered, mode="clip")
        np.right_shift(gathered, right, out=gathered)
        np.left_shift(gathered, left, out=gathered)
        np.bitwise_xor.reduce(gathered, axis=0, out=tweaks)
        words: Words = np.frombuffer(view, dtype=_LE64)
        np.bitwise_xor(words, tweaks, out=words)
        self._ctx("data", decrypt).update_into(view, scratch.out_bytes)
        np.bitwise_xor(out, tweaks, out=words)

    # -- CBC -----------------------------------------------------------------------------

    def _cbc_decrypt(self, words: Words, first: int) -> None:
        """CBC decryption is parallel: ``P_j = AES^-1(C_j) ^ C_{j-1}``, ``C_{-1} = iv``.

        The XOR with the previous block runs over the whole batch at once, contiguous
        (the ciphertext shifted by one block), which also XORs each sector's first block
        with the previous sector's last; a small strided fix-up then swaps that for the
        sector's IV. Cheaper than a (sectors, 62 blocks) strided XOR: 199 → ~150 µs/MiB.
        Few sectors decrypt into this thread's scratch and take their IVs from bytes
        (no allocation at all).
        """
        count = words.size // _WORDS_PER_SECTOR
        if count <= _FEW_CBC_SECTORS:
            ivs: Words = np.frombuffer(self._iv_bytes(first, count), dtype=_LE64)
            out = self._scratch().out
        else:
            ivs = self._iv_words(first, count)
            out = np.empty(words.size + 2, dtype=_LE64)
        _ecb_into(self._ctx("data", decrypt=True), words, out)
        plain = out[: words.size]
        np.bitwise_xor(plain[2:], words[:-2], out=plain[2:])
        heads = plain.reshape(count, _WORDS_PER_SECTOR)[:, :2]
        np.bitwise_xor(heads[1:], words.reshape(count, _WORDS_PER_SECTOR)[:-1, -2:], out=heads[1:])
        np.bitwise_xor(heads, ivs.reshape(count, 2), out=heads)
        words[:] = plain

    def _cbc_decrypt_small(self, view: memoryview, first: int) -> None:
        """:meth:`_cbc_decrypt` of a few sectors on Python ints."""
        count = view.nbytes // SECTOR_SIZE
        ivs = self._iv_bytes(first, count)
        last = SECTOR_SIZE - _BLOCK
        chain = b"".join(
            ivs[s * _BLOCK : (s + 1) * _BLOCK] + view[s * SECTOR_SIZE : s * SECTOR_SIZE + last]
            for s in range(count)
        )
        done = self._ctx("data", decrypt=True).update(view)
        view[:] = (_int(done) ^ _int(chain)).to_bytes(view.nbytes, "little")

    def _cbc_encrypt_columns(self, words: Words, first: int) -> None:
        """CBC encryption of many sectors: block j of *all* sectors per ECB call.

        Within a sector CBC is sequential (``C_j = AES(P_j ^ C_{j-1})``) but sectors are
        independent, so the buffer is transposed to (block, sector) order and each of the
        32 steps encrypts a whole row: 32 ECB calls per batch whatever its size, and
        OpenSSL pipelines the blocks of a row as it does for ECB.
        """
        count = words.size // _WORDS_PER_SECTOR
        prev: Words = self._iv_words(first, count)
        rows = np.ascontiguousarray(
            words.reshape(count, _BLOCKS_PER_SECTOR, 2).transpose(1, 0, 2)
        )  # (32, count, 2)
        out = np.empty(words.size + 2, dtype=_LE64)
        # The loop runs 32 times per batch: byte views sliced per row, one numpy call
        # and one OpenSSL call per row, nothing else.
        row_bytes = count * _BLOCK
        src = rows.reshape(-1).view(np.uint8).data
        dst = out.view(np.uint8).data
        outs = out[: words.size].reshape(_BLOCKS_PER_SECTOR, count, 2)
        update_into = self._ctx("data").update_into
        for j in range(_BLOCKS_PER_SECTOR):
            row = rows[j]
            np.bitwise_xor(row, prev, out=row)
            at = j * row_bytes
            done = update_into(src[at : at + row_bytes], dst[at : at + row_bytes + _BLOCK])
            if done != row_bytes:  # cannot happen with whole blocks; never return garbage
                raise Qcow2FormatError(f"AES-ECB returned {done} bytes for {row_bytes}")
            prev = outs[j]
        columns = out[: words.size].reshape(_BLOCKS_PER_SECTOR, count, 2)
        words.reshape(count, _BLOCKS_PER_SECTOR, 2)[:] = columns.transpose(1, 0, 2)

    def _cbc_encrypt_chained(self, view: memoryview, first: int) -> None:
        """CBC encryption of a few sectors through this thread's ONE CBC context.

        The context chains each sector's last ciphertext block (and, across calls, the
        previous call's) into the next sector's first block, where the sector's own IV
        belongs. So before feeding sector s its first plaintext block gets
        ``IV_s ^ C_prev`` XORed in: the context XORs ``C_prev`` again, which leaves
        ``P ^ IV_s``. Much cheaper than a ``Cipher`` (and key schedule) per sector. The
        chaining value is kept next to the context; should anything fail half-way, the
        context is dropped rather than trusted.
        """
        count = view.nbytes // SECTOR_SIZE
        ivs = self._iv_bytes(first, count)
        local = self._local
        cached: tuple[CipherContext, int] | None = getattr(local, "cbc_chain", None)
        local.cbc_chain = None
        if cached is None:
            ctx = Cipher(
                algorithms.AES(memoryview(self._key)), modes.CBC(bytes(_BLOCK))
            ).encryptor()
            prev = 0  # the IV it was made with
        else:
            ctx, prev = cached
        out = bytearray(view.nbytes + _BLOCK)
        result = memoryview(out)
        for s in range(count):
            lo = s * SECTOR_SIZE
            head = view[lo : lo + _BLOCK]
            mixed = _int(head) ^ _int(ivs[s * _BLOCK : (s + 1) * _BLOCK]) ^ prev
            head[:] = mixed.to_bytes(_BLOCK, "little")
            ctx.update_into(view[lo : lo + SECTOR_SIZE], result[lo:])
            prev = _int(result[lo + SECTOR_SIZE - _BLOCK : lo + SECTOR_SIZE])
        view[:] = result[: view.nbytes]
        local.cbc_chain = (ctx, prev)

    # -- CTR -----------------------------------------------------------------------------

    def _ctr(self, words: Words, first: int) -> None:
        """CTR: XOR with AES(counter), the counter being the IV read as a big-endian
        128-bit number plus the block's index in the sector (mod 2^128); the same both
        ways."""
        count = words.size // _WORDS_PER_SECTOR
        iv = self._iv_words(first, count).view(np.uint8).view(_BE64)  # (count, 2): hi, lo
        hi = iv[:, 0:1].astype(np.uint64)
        lo = iv[:, 1:2].astype(np.uint64)
        counters = np.empty((count, _BLOCKS_PER_SECTOR, 2), dtype=_BE64)
        low = lo + _J
        counters[:, :, 1] = low
        counters[:, :, 0] = hi + (low < lo).astype(np.uint64)  # carry out of the low word
        stream = np.empty(words.size + 2, dtype=_LE64)
        _ecb_into(self._ctx("data"), counters.view(_LE64), stream)
        words ^= stream[: words.size]


def make_cipher(
    cipher_alg: str,
    cipher_mode: str,
    ivgen_alg: str,
    ivgen_hash_alg: str | None,
    key: KeyBytes,
) -> SectorCipher:
    """The sector cipher of a LUKS header's fields (names as QEMU spells them).

    ``key`` is the master key (XTS: data key then tweak key), copied. Raises
    :class:`Qcow2UnsupportedError` for what this module does not implement and
    :class:`Qcow2FormatError` for a key of the wrong length.
    """
    return SectorCipher(cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg, key)


def legacy_aes_cipher(passphrase: bytes) -> SectorCipher:
    """The cipher of QEMU's legacy qcow/qcow2 AES encryption (``crypt_method`` 1).

    AES-128-CBC, IV plain64 (of the *guest* sector), key = the passphrase's first 16
    bytes zero-padded. QEMU takes the secret as a C string (``strlen``), so a NUL byte
    ends the passphrase there, too. There is no key check: a wrong passphrase decrypts
    to garbage, exactly as in QEMU.
    """
    end = passphrase.find(b"\0")
    usable = memoryview(passphrase)[: end if end >= 0 else 16][:16]
    key = bytearray(16)
    key[: usable.nbytes] = usable
    try:
        return SectorCipher("aes-128", "cbc", "plain64", None, key)
    finally:
        key[:] = bytes(16)


def bench(seconds: float = 0.3) -> dict[str, float]:
    """Print and return MiB/s of the batched ciphers against ``cryptography``'s per-sector
    XTS. A measurement, not a test: ``python -m qcow2aio.crypto.ciphers``."""
    rng = np.random.default_rng(1)
    results: dict[str, float] = {}

    def rate(fn: Callable[[], None], nbytes: int) -> float:
        fn()
        runs = 0
        start = time.perf_counter()
        while True:
            fn()
            runs += 1
            spent = time.perf_counter() - start
            if spent >= seconds:
                return runs * nbytes / spent / (1 << 20)

    def report(label: str, value: float) -> None:
        results[label] = value
        print(f"{label:<48} {value:8.0f} MiB/s", flush=True)

    def per_sector_xts(key: bytes, buf: bytearray, first: int, decrypt: bool) -> None:
        view = memoryview(buf)
        algorithm = algorithms.AES(key)
        for s in range(len(buf) // SECTOR_SIZE):
            cipher = Cipher(algorithm, modes.XTS((first + s).to_bytes(16, "little")))
            ctx = cipher.decryptor() if decrypt else cipher.encryptor()
            part = view[s * SECTOR_SIZE : (s + 1) * SECTOR_SIZE]
            part[:] = ctx.update(part)

    sizes = (4 << 10, 64 << 10, 1 << 20)
    for alg, mode, key_len in (("aes-256", "xts", 64), ("aes-128", "cbc", 16)):
        cipher = make_cipher(alg, mode, "plain64", None, rng.bytes(key_len))
        for size in sizes:
            buf = bytearray(rng.bytes(size))
            for name, fn in (("encrypt", cipher.encrypt), ("decrypt", cipher.decrypt)):
                report(
                    f"{alg}-{mode} {name} {size >> 10} KiB",
                    rate(functools.partial(fn, buf, 1000), size),
                )
    key = rng.bytes(64)
    for size in sizes:
        buf = bytearray(rng.bytes(size))
        for decrypt in (False, True):
            report(
                f"cryptography per-sector aes-256-xts {'decrypt' if decrypt else 'encrypt'} "
                f"{size >> 10} KiB",
                rate(functools.partial(per_sector_xts, key, buf, 1000, decrypt), size),
            )
    return results


if __name__ == "__main__":
    bench()
