"""Encryption of qcow2 images as QEMU 7.2 lays it out (legacy AES and LUKS).

:mod:`.ciphers` is the sector-cipher layer (AES in XTS/CBC/ECB/CTR with the plain,
plain64 and essiv IV generators), shared by the payload and by LUKS keyslot material.
"""

from .ciphers import (
    SECTOR_SIZE,
    SectorCipher,
    check_supported,
    cipher_key_bytes,
    legacy_aes_cipher,
    make_cipher,
)

__all__ = [
    "SECTOR_SIZE",
    "SectorCipher",
    "check_supported",
    "cipher_key_bytes",
    "legacy_aes_cipher",
    "make_cipher",
]
