"""``--object secret,...``: the passphrases of a command line, as QEMU loads them.

qemu-img never takes a passphrase as an argument: an encrypted image names a
*secret object* (``encrypt.key-secret=ID``) given with ``--object
secret,id=ID,data=...`` or ``file=PATH``, optionally base64 (``format=base64``)
and optionally itself encrypted with another secret (``keyid=``, ``iv=``).
Scripts written for qemu-img pass secrets this way, so ``qcow2aio`` accepts
the same syntax and reports a mistake with the same words, in the same order
as QEMU 7.2 checks them (keyval syntax, then the QAPI visit of the object's
properties, then the object's ``complete``). Other object types are refused:
they configure parts of QEMU this tool does not have.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .options import UsageError
from .qapi import first_unexpected, visit_order

__all__ = ["SecretError", "Secrets", "b64decode_glib", "parse_keyval"]

# qapi ObjectType (QEMU 7.2, a Linux build without system-emulator objects): the
# types `qemu-img --object help` lists. Only "secret" is implemented.
_OBJECT_TYPES = frozenset(
    {
        "authz-list",
        "authz-list-file",
        "authz-pam",
        "authz-simple",
        "can-bus",
        "can-host-socketcan",
        "colo-compare",
        "cryptodev-backend",
        "cryptodev-backend-builtin",
        "cryptodev-vhost-user",
        "dbus-vmstate",
        "filter-buffer",
        "filter-dump",
        "filter-mirror",
        "filter-redirector",
        "filter-replay",
        "filter-rewriter",
        "input-barrier",
        "input-linux",
        "iothread",
        "main-loop",
        "memory-backend-epc",
        "memory-backend-file",
        "memory-backend-memfd",
        "memory-backend-ram",
        "pef-guest",
        "pr-manager-helper",
        "qtest",
        "rng-builtin",
        "rng-egd",
        "rng-random",
        "secret",
        "secret_keyring",
        "sev-guest",
        "thread-context",
        "s390-pv-guest",
        "throttle-group",
        "tls-creds-anon",
        "tls-creds-psk",
        "tls-creds-x509",
        "tls-cipher-suites",
        "x-remote-object",
        "x-vfio-user-server",
    }
)
# SecretCommonProperties then SecretProperties: the order QAPI visits them in.
_SECRET_PROPERTIES = ("loaded", "format", "keyid", "iv", "data", "file")
_QAPI_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
_BASE64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n")
_BASE64_RANK = {
    c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
}
_BASE64_RANK[ord("=")] = 0


class SecretError(Exception):
    """A secret an image names cannot be used (QEMU's message, without any prefix).

    Raised when the secret is looked up, which QEMU does late (when it sets up
    or opens the encryption), so the commands decide what prefix it gets.
    """


KeyvalValue = str | dict[str, "KeyvalValue"]


def parse_keyval(text: str, implied_key: str | None) -> dict[str, KeyvalValue]:
    """util/keyval.c ``keyval_parse``: ``a=1,b.c=2`` to nested dicts; the last of a
    repeated key wins, ``,,`` is a comma in a value, and a first element without
    ``=`` is the value of ``implied_key``.
    """
    out: dict[str, KeyvalValue] = {}
    pos = 0
    while pos < len(text):
        pos = _keyval_one(out, text, pos, implied_key)
        implied_key = None
    return out


def _keyval_one(out: dict[str, KeyvalValue], text: str, pos: int, implied: str | None) -> int:
    """``keyval_parse_one``: one ``key=value`` at ``pos``; where the next one starts."""
    end = pos
    while end < len(text) and text[end] not in "=,":
        end += 1
    if end > pos and (end == len(text) or text[end] != "=") and implied is not None:
        _keyval_put(out, [implied], text[pos:end], implied)
        return end + 1
    key = text[pos:end]
    fragments = key.split(".")
    for i, fragment in enumerate(fragments):
        match = _QAPI_NAME.match(fragment)
        is_index = i > 0 and fragment.isdigit()
        if not is_index and (match is None or match.end() != len(fragment)):
            raise UsageError(f"Invalid parameter '{key}'")
    if end >= len(text) or text[end] != "=":
        raise UsageError(f"Expected '=' after parameter '{key}'")
    value: list[str] = []
    i = end + 1
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] != ",":
                break
            i += 1
        value.append(text[i])
        i += 1
    _keyval_put(out, fragments, "".join(value), key)
    return i + 1


def _keyval_put(out: dict[str, KeyvalValue], fragments: list[str], value: str, key: str) -> None:
    """``keyval_parse_put``: a dotted key makes nested dicts; a key is a value or a dict."""
    cur = out
    for depth, fragment in enumerate(fragments[:-1]):
        nxt = cur.setdefault(fragment, {})
        if not isinstance(nxt, dict):
            raise UsageError(
                f"Parameters '{'.'.join(fragments[: depth + 1])}.*' used inconsistently"
            )
        cur = nxt
    if isinstance(cur.get(fragments[-1]), dict):
        raise UsageError(f"Parameters '{key}' used inconsistently")
    cur[fragments[-1]] = value


def b64decode_glib(text: bytes) -> bytes:
    """util/base64.c ``qbase64_decode``: QEMU's checks, then GLib's lenient decoder.

    GLib skips newlines, decodes each complete group of four characters
    (``=`` counts as zero bits and drops output bytes) and ignores a
    trailing partial group, so ``"cH"`` decodes to nothing rather than
    failing; the passphrase must come out the same as in QEMU.
    """
    if b"\0" in text:
        raise SecretError("Base64 data contains embedded NUL characters")
    if any(c not in _BASE64_CHARS for c in text):
        raise SecretError("Base64 data contains invalid characters")
    out = bytearray()
    value = 0
    count = 0
    last = [0, 0]
    for c in text:
        rank = _BASE64_RANK.get(c)
        if rank is None:
            continue
        last[1], last[0] = last[0], c
        value = (value << 6 | rank) & 0xFFFFFFFF
        count += 1
        if count == 4:
            out.append(value >> 16 & 0xFF)
            if last[1] != ord("="):
                out.append(value >> 8 & 0xFF)
            if last[0] != ord("="):
                out.append(value & 0xFF)
            count = 0
    return bytes(out)


@dataclass
class _Secret:
    """One ``secret`` object: its raw bytes once ``complete`` has loaded them."""

    id: str
    props: dict[str, str] = field(default_factory=dict)
    data: bytes | None = None


class Secrets:
    """The secret objects of one command line, by id, in the order they were given."""

    def __init__(self) -> None:
        self._objects: dict[str, _Secret] = {}

    def add_object(self, text: str) -> None:
        """Create the object ``--object TEXT`` describes; UsageError like qemu-img's."""
        props = parse_keyval(text, "qom-type")
        qom_type = props.pop("qom-type", None)
        if qom_type is None:
            raise UsageError("Parameter 'qom-type' is missing")
        if not isinstance(qom_type, str):
            raise UsageError("Parameters 'qom-type.*' are unexpected")
        if qom_type not in _OBJECT_TYPES:
            raise UsageError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
        if qom_type != "secret":
            raise UsageError(f"Object type '{qom_type}' is not supported (only 'secret' is)")
        obj_id = props.pop("id", None)
        if obj_id is None:
            raise UsageError("Parameter 'id' is missing")
        if not isinstance(obj_id, str):
            raise UsageError("Parameters 'id.*' are unexpected")
        strings = self._visit_properties(props)
        if not _ID.match(obj_id):
            raise UsageError(
                "Parameter 'id' expects an identifier\n"
                "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."
            )
        if "loaded" in strings:
            raise UsageError("Property 'secret.loaded' is not writable")
        if obj_id in self._objects:
            raise UsageError(
                f"attempt to add duplicate property '{obj_id}' to object (type 'container')"
            )
        secret = _Secret(obj_id, strings)
        # QEMU adds the object before completing it (and removes it on failure),
        # so a secret whose keyid names itself finds itself, without data.
        self._objects[obj_id] = secret
        try:
            secret.data = self._load(secret)
        except SecretError as exc:
            del self._objects[obj_id]
            raise UsageError(str(exc)) from None

    @staticmethod
    def _visit_properties(props: dict[str, KeyvalValue]) -> dict[str, str]:
        """The QAPI visit of SecretProperties: types and enums in schema order, then
        the first key the schema does not have."""
        strings: dict[str, str] = {}
        for name in _SECRET_PROPERTIES:
            if name not in props:
                continue
            value = props[name]
            if not isinstance(value, str):
                raise UsageError(f"Parameters '{name}.*' are unexpected")
            if name == "loaded" and value not in (
                "on",
                "yes",
                "true",
                "y",
                "off",
                "no",
                "false",
                "n",
            ):
                raise UsageError("Parameter 'loaded' expects 'on' or 'off'")
            if name == "format" and value not in ("raw", "base64"):
                raise UsageError(f"Parameter 'format' does not accept value '{value}'")
            strings[name] = value
        # The visitor's hash table of the keyval QDict's keys, less those visited.
        members = visit_order(["qom-type", "id", *props], 1)
        unexpected = first_unexpected(members, ["qom-type", "id", *strings])
        if unexpected is not None:
            raise UsageError(f"Parameter '{unexpected}' is unexpected")
        return strings

    def _load(self, secret: _Secret) -> bytes:
        """``qcrypto_secret_complete``: read data or file, then decrypt or decode."""
        props = secret.props
        if "file" in props:
            if "data" in props:
                raise SecretError("'file' and 'data' are mutually exclusive")
            raw = _read_secret_file(props["file"])
        elif "data" in props:
            raw = props["data"].encode("utf-8", errors="surrogateescape")
        else:
            raise SecretError("Either 'file' or 'data' must be provided")
        base64 = props.get("format") == "base64"
        if "keyid" in props:
            return self._decrypt(props, raw, base64)
        return b64decode_glib(raw) if base64 else raw

    def _decrypt(self, props: dict[str, str], raw: bytes, base64: bool) -> bytes:
        """``qcrypto_secret_decrypt``: AES-256-CBC with the key secret ``keyid``."""
        key = self.lookup(props["keyid"])
        if len(key) != 32:
            raise SecretError("Key should be 32 bytes in length")
        if "iv" not in props:
            raise SecretError("IV is required to decrypt secret")
        iv = b64decode_glib(props["iv"].encode("utf-8", errors="surrogateescape"))
        if len(iv) != 16:
            raise SecretError(f"IV should be 16 bytes in length not {len(iv)}")
        ciphertext = b64decode_glib(raw) if base64 else raw
        if len(ciphertext) % 16:
            raise SecretError(f"Length {len(ciphertext)} must be a multiple of block size 16")
        if not ciphertext:
            return b""
        decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        plain = decryptor.update(ciphertext) + decryptor.finalize()
        pad = plain[-1]
        if pad > 16:
            raise SecretError(f"Incorrect number of padding bytes ({pad}) found on decrypted data")
        return plain[: len(plain) - pad]

    def lookup(self, secret_id: str) -> bytes:
        """``qcrypto_secret_lookup``: the secret's bytes, or QEMU's SecretError."""
        secret = self._objects.get(secret_id)
        if secret is None:
            raise SecretError(f"No secret with id '{secret_id}'")
        if secret.data is None:
            raise SecretError(f"Secret with id '{secret_id}' has no data")
        return secret.data

    def passphrase(self, secret_id: str) -> bytes:
        """``qcrypto_secret_lookup_as_utf8``: what LUKS and AES use as the passphrase.

        GLib's UTF-8 check also refuses NUL bytes (the passphrase is a C string).
        """
        data = self.lookup(secret_id)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            ok = False
        else:
            ok = b"\0" not in data
        if not ok:
            raise SecretError(f"Data from secret {secret_id} is not valid UTF-8")
        return data


def _read_secret_file(path: str) -> bytes:
    """``g_file_get_contents`` with QEMU's "Unable to read" message around GLib's."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except IsADirectoryError as exc:
        reason = f"Error reading file \u201c{path}\u201d: {exc.strerror}"
    except OSError as exc:
        reason = f"Failed to open file \u201c{path}\u201d: {exc.strerror}"
    raise SecretError(f"Unable to read {path}: {reason}")
