"""The open that precedes ``info`` and ``check``: QEMU's checks of the ``encrypt.*``
options and, for ``check``, the passphrase of every encrypted image of the chain.

``qemu-img info`` opens an image without doing I/O on its guest data, so it
needs no secret: only the options are checked against the header.
``qemu-img check`` opens the image and its whole backing chain as a guest would
and so fails, with QEMU's message, when an encrypted image's secret is missing,
unknown or wrong; an error in a backing file is prefixed with "Could not open
backing file: " once per level, as QEMU nests them. The check itself never needs
the key (it reads metadata only), so the images are closed again afterwards.
"""

from __future__ import annotations

import os

from .. import constants as C
from ..backing import RAW_FORMATS, RawImage, probe_format
from ..errors import Qcow2Error, Qcow2PassphraseError, Qcow2UnsupportedError
from ..header import Header
from ..image import Image
from ..info import full_backing_filename
from ..io import FileBackend
from ..metadata import Metadata
from .imageopts import ImageSpec, LevelOptions, OpenError
from .qapi import first_unexpected, visit_order
from .secrets import SecretError, Secrets

__all__ = ["chain_passphrases", "check_encrypt_options", "ensure_readable", "open_chain"]

_METHOD_NAMES = {C.CRYPT_AES: "aes", C.CRYPT_LUKS: "luks"}
_BACKING = "Could not open backing file: "


def ensure_readable(path: str) -> None:
    """file-posix's open: ``Could not open 'PATH': why`` for a file that cannot be read."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise OpenError(f"Could not open '{path}': {exc.strerror}") from None


def read_header(path: str) -> Header:
    """The image's parsed header, with no decision about its encryption made yet."""
    file = FileBackend(path, False)
    try:
        return Metadata(file, writable=False).header
    finally:
        file.close()


def check_encrypt_options(level: LevelOptions, crypt_method: int) -> None:
    """``qcow2_update_options_prepare``: ``encrypt.*`` against the header's method."""
    name = _METHOD_NAMES.get(crypt_method)
    if name is None:
        if level.encrypt_format is not None:
            raise OpenError(
                "No encryption in image header, but options specified format "
                f"'{level.encrypt_format}'"
            )
        return
    if level.encrypt_format is not None and level.encrypt_format != name:
        raise OpenError(
            f"Header reported '{name}' encryption format but options specify "
            f"'{level.encrypt_format}'"
        )
    # block_crypto_open_opts_init: the image's encrypt.* options (in the QDict order of
    # the image's options) plus "format"; its visitor consumes format and key-secret.
    keys = visit_order(level.encrypt_keys, 1)
    members = visit_order([*keys, "format"] if "format" not in keys else keys, 2)
    unexpected = first_unexpected(members, [m for m in ("format", "key-secret") if m in members])
    if unexpected is not None:
        raise OpenError(f"Parameter '{unexpected}' is unexpected")


def _passphrase(level: LevelOptions, secrets: Secrets) -> bytes:
    """``qcrypto_block_open``'s secret: required, known, and UTF-8."""
    if level.key_secret is None:
        raise OpenError("Parameter 'encrypt.key-secret' is required for cipher")
    try:
        return secrets.passphrase(level.key_secret)
    except SecretError as exc:
        raise OpenError(str(exc)) from None


def _open_level(path: str, level: LevelOptions, secrets: Secrets) -> tuple[str | None, str | None]:
    """Open one qcow2 image as QEMU would for I/O; its (backing file, backing format)."""
    hdr = read_header(path)
    check_encrypt_options(level, hdr.crypt_method)
    if hdr.crypt_method:
        passphrase = _passphrase(level, secrets)
        try:
            Image(path, "r", open_backing=False, passphrase=passphrase).close()
        except Qcow2PassphraseError:
            # AES has no key check: only LUKS refuses a wrong passphrase.
            raise OpenError("Invalid password, cannot unlock any keyslot") from None
    return hdr.backing_file, hdr.backing_format


def open_chain(spec: ImageSpec, secrets: Secrets) -> None:
    """Open ``spec`` and its backing chain like ``qemu-img check``; OpenError if QEMU fails.

    An image that does not even open as qcow2 is left to the check's own open,
    which reports on it (a check must see a damaged image as it is); a backing
    file that does not open fails the check, as in QEMU.
    """
    path, fmt = spec.path, spec.fmt
    seen: set[str] = set()
    depth = 0
    while True:
        prefix = _BACKING * depth
        real = os.path.realpath(path)
        if real in seen:
            raise OpenError(f"{prefix}Backing file '{path}' creates an infinite loop.")
        seen.add(real)
        try:
            ensure_readable(path)
            kind = fmt if fmt is not None else probe_format(path)
            if kind in RAW_FORMATS:
                RawImage(path).close()
                return
            if kind != "qcow2":
                raise Qcow2UnsupportedError(f"Unsupported image format: {kind}")
            backing, backing_fmt = _open_level(path, spec.level(depth), secrets)
        except OpenError as exc:
            raise OpenError(f"{prefix}{exc}") from None
        except Qcow2Error as exc:
            if depth == 0:
                return
            raise OpenError(f"{prefix}{exc}") from None
        if not backing:
            return
        path = full_backing_filename(path, backing)
        fmt = backing_fmt or None
        depth += 1


def chain_passphrases(spec: ImageSpec, secrets: Secrets) -> tuple[bytes | None, list[bytes | None]]:
    """The passphrase of the image and of each backing level that names a secret
    (``encrypt.key-secret``, ``backing.encrypt.key-secret``, ...), for ``Image``'s
    ``passphrase`` and ``backing_passphrase``; call after :func:`open_chain`
    accepted the chain, which reports missing or unknown secrets as qemu-img does."""
    found = [
        secrets.passphrase(level.key_secret) if level.key_secret else None for level in spec.levels
    ]
    return (found[0] if found else None), found[1:]
