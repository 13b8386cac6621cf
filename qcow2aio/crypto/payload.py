"""The encryption of an open image's guest data: which key, which IV, which sectors.

qcow2 encrypts guest data sector by sector (512 bytes, whatever the cluster size)
and nothing else: metadata, compressed clusters and the LUKS area itself are
stored as they are. The two methods differ in what numbers a sector's IV:

* legacy AES (crypt_method 1, QEMU's "qcow" format): the *guest* offset / 512, so
  a cluster can be moved on the host without re-encrypting it;
* LUKS (crypt_method 2): the *host* offset / 512 (in the external data file when
  there is one), so a cluster written at a new host offset (COW, a new allocation)
  is re-encrypted there, which the driver gets for free: it decrypts what it reads
  with the old host offset and encrypts what it writes with the new one.

:class:`PayloadCrypto` keeps that rule in one place; the driver asks it for every
data read and write. Unlocking (the passphrase → key) happens here too, once, at open.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .. import constants as C
from ..errors import Qcow2FormatError, Qcow2PassphraseError, Qcow2UnsupportedError
from .ciphers import SECTOR_SIZE, SectorCipher, legacy_aes_cipher, make_cipher
from .luks import LuksHeader, unlock

ReadFn = Callable[[int, int], bytes]

SECTOR_MASK = SECTOR_SIZE - 1


def passphrase_bytes(passphrase: str | bytes | bytearray) -> bytes:
    """QEMU's secrets are byte strings; a ``str`` passphrase is its UTF-8 bytes."""
    if isinstance(passphrase, str):
        return passphrase.encode()
    if isinstance(passphrase, bytes | bytearray):
        return bytes(passphrase)
    raise TypeError(f"passphrase must be str or bytes, not {type(passphrase).__name__}")


def read_luks_header(read: ReadFn, area: tuple[int, int]) -> LuksHeader:
    """Parse the LUKS header at the start of the image's encryption area."""
    offset, length = area
    if length < 592:
        raise Qcow2FormatError(f"LUKS area too small for its header: crypto_area length={length}")
    return LuksHeader.parse(read(offset, 592), length)


@dataclass(eq=False)
class PayloadCrypto:
    """The cipher of an image's guest data and the rule for its IVs.

    ``cipher`` is None when the image was opened without a passphrase for metadata
    only (``qemu-img info`` works that way): then every data access raises
    :class:`Qcow2PassphraseError` instead of returning ciphertext as if it were data.
    """

    method: int  # C.CRYPT_AES or C.CRYPT_LUKS
    cipher: SectorCipher | None = field(repr=False)
    luks: LuksHeader | None = field(default=None, repr=False)
    master_key: bytearray | None = field(default=None, repr=False)
    path: str = ""

    @property
    def by_guest(self) -> bool:
        """Legacy AES numbers IVs by guest offset, LUKS by host offset."""
        return self.method == C.CRYPT_AES

    def _need(self) -> SectorCipher:
        if self.cipher is None:
            raise Qcow2PassphraseError(
                f"image {self.path!r} is encrypted and was opened without its passphrase "
                "(a passphrase is missing): its data cannot be read or written"
            )
        return self.cipher

    def sector(self, host: int, guest: int) -> int:
        """The IV sector number of the sector at ``host`` (guest offset ``guest``)."""
        return (guest if self.method == C.CRYPT_AES else host) >> 9

    def decrypt(self, buf: bytearray | memoryview, host: int, guest: int) -> None:
        """Decrypt whole sectors in place; ``host``/``guest`` of the first byte."""
        self._need().decrypt(buf, self.sector(host, guest))

    def encrypt(self, buf: bytearray | memoryview, host: int, guest: int) -> None:
        """Encrypt whole sectors in place; ``host``/``guest`` of the first byte."""
        self._need().encrypt(buf, self.sector(host, guest))

    def check_usable(self) -> None:
        self._need()

    def forget(self) -> None:
        """Drop the key material this object owns (best effort: see docs/architecture.md)."""
        if self.master_key is not None:
            self.master_key[:] = bytes(len(self.master_key))
            self.master_key = None
        self.cipher = None


def open_crypto(
    method: int,
    area: tuple[int, int] | None,
    read: ReadFn,
    passphrase: str | bytes | None,
    *,
    path: str,
    metadata_only: bool = False,
) -> PayloadCrypto:
    """Unlock an image's encryption at open.

    A missing passphrase is an error unless the image is opened for its metadata
    only; a wrong LUKS passphrase is detected (the master-key digest) and refused
    before anything is written. Legacy AES has no way to tell a wrong passphrase:
    it decrypts to garbage, exactly as in QEMU.
    """
    if method not in (C.CRYPT_AES, C.CRYPT_LUKS):
        raise Qcow2UnsupportedError(f"Unsupported encryption method: crypt_method={method}")
    luks: LuksHeader | None = None
    if method == C.CRYPT_LUKS:
        if area is None:
            raise Qcow2FormatError("Missing CRYPTO header extension for crypt_method=2 (LUKS)")
        luks = read_luks_header(read, area)
    if passphrase is None:
        if metadata_only:
            return PayloadCrypto(method, None, luks, None, path)
        raise Qcow2PassphraseError(
            f"image {path!r} is encrypted ({'AES' if method == C.CRYPT_AES else 'LUKS'}): "
            "a passphrase is missing (Parameter 'encrypt.key-secret' is required for cipher)"
        )
    secret = passphrase_bytes(passphrase)
    if method == C.CRYPT_AES:
        return PayloadCrypto(method, legacy_aes_cipher(secret), None, None, path)
    assert luks is not None and area is not None
    base = area[0]
    key, _slot = unlock(luks, lambda off, n: read(base + off, n), secret)
    master = bytearray(key)
    cipher = make_cipher(
        luks.cipher_alg, luks.cipher_mode, luks.ivgen_alg, luks.ivgen_hash_alg, bytes(master)
    )
    return PayloadCrypto(method, cipher, luks, master, path)
