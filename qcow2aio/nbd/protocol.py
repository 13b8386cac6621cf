"""The NBD protocol's numbers and wire layouts (fixed newstyle, structured replies).

Facts from the protocol specification (``NetworkBlockDevice/nbd``, ``doc/proto.md``);
every multi-byte field is big-endian. This module only encodes and decodes: it has
no sockets and no policy, so the server (:mod:`.server`) and the fuzz tests drive the
same parsers. A parser never trusts a length it was sent: each one checks the length
against what the message can hold before slicing, and reports a bad message as
:class:`ProtocolError` (the server answers it with the protocol's error, or drops
the connection where the protocol leaves no way to answer).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import Qcow2Error

# ------------------------------------------------------------------ handshake
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9  # option replies

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# Option replies.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_PLATFORM = REP_ERR | 4
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_UNKNOWN = REP_ERR | 6
REP_ERR_SHUTDOWN = REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR | 8
REP_ERR_TOO_BIG = REP_ERR | 9

# NBD_REP_INFO types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# ------------------------------------------------------------ transmission
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_RESIZE = 1 << 9
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Which command flags each command may carry (anything else is EINVAL).
CMD_FLAGS_ALLOWED = {
    CMD_READ: CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# base:allocation
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0  # qemu:dirty-bitmap:*: the range is dirty

# Errors (the protocol's errno values).
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# Limits: the largest request payload (qemu-nbd's maximum block size), the longest
# string the protocol allows (export names, queries), and how much option data the
# server reads into memory at all (larger options are drained, then refused).
MAX_REQUEST = 32 << 20
MAX_STRING = 4096
MAX_OPTION_READ = 64 << 10
MAX_OPTION = 32 << 20

# ------------------------------------------------------------------ layouts
_OPT_HEADER = struct.Struct(">QII")  # magic, option, length
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE = struct.Struct(">IIQ")  # magic, error, cookie
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

OPT_HEADER_SIZE = _OPT_HEADER.size
REQUEST_SIZE = REQUEST.size


class ProtocolError(Qcow2Error):
    """A peer's message that breaks the protocol; ``field`` names what was wrong."""

    def __init__(self, field: str, value: object, why: str = "") -> None:
        self.field = field
        self.value = value
        super().__init__(f"NBD {field} {value!r} is invalid{': ' + why if why else ''}")


def greeting() -> bytes:
    """The server's first bytes: magics and the fixed-newstyle handshake flags."""
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def parse_client_flags(data: bytes) -> int:
    (flags,) = _U32.unpack(data)
    if flags & ~CLIENT_FLAGS_KNOWN:
        raise ProtocolError("client flags", flags, "unknown bits set")
    return int(flags)


def parse_option_header(data: bytes) -> tuple[int, int]:
    """``(option, length)`` of an option request header (16 bytes)."""
    magic, option, length = _OPT_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError("option magic", magic)
    if length > MAX_OPTION:
        raise ProtocolError("option length", length, f"more than {MAX_OPTION}")
    return int(option), int(length)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPT_REPLY.pack(REPLY_MAGIC, option, reply, len(data)) + data


class _Reader:
    """Bounds-checked reads from one option's payload."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError(f"{self.what} {field}", n, "longer than the option data")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, field: str) -> int:
        return int(_U16.unpack(self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(_U32.unpack(self.take(4, field))[0])

    def string(self, field: str) -> str:
        n = self.u32(f"{field} length")
        if n > MAX_STRING:
            raise ProtocolError(f"{self.what} {field} length", n, f"more than {MAX_STRING}")
        raw = self.take(n, field)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.what} {field}", raw[:64], "not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(f"{self.what} length", len(self.data), "trailing bytes")


def parse_info_request(data: bytes, what: str) -> tuple[str, list[int]]:
    """NBD_OPT_INFO / NBD_OPT_GO: the export name and the information types asked."""
    r = _Reader(data, what)
    name = r.string("export name")
    count = r.u16("information request count")
    items = [r.u16("information request") for _ in range(count)]
    r.end()
    return name, items


def parse_meta_request(data: bytes, what: str) -> tuple[str, list[str]]:
    """NBD_OPT_LIST/SET_META_CONTEXT: the export name and the queries."""
    r = _Reader(data, what)
    name = r.string("export name")
    count = r.u32("query count")
    if count > len(data) // 4:
        raise ProtocolError(f"{what} query count", count, "more than the data can hold")
    queries = [r.string("query") for _ in range(count)]
    r.end()
    return name, queries


def parse_export_name(data: bytes) -> str:
    if len(data) > MAX_STRING:
        raise ProtocolError("export name length", len(data), f"more than {MAX_STRING}")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ProtocolError("export name", data[:64], "not UTF-8") from None


def info_export(size: int, flags: int) -> bytes:
    return _U16.pack(INFO_EXPORT) + _U64.pack(size) + _U16.pack(flags)


def info_name(name: str) -> bytes:
    return _U16.pack(INFO_NAME) + name.encode()


def info_description(text: str) -> bytes:
    return _U16.pack(INFO_DESCRIPTION) + text.encode()


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return _U16.pack(INFO_BLOCK_SIZE) + struct.pack(">III", minimum, preferred, maximum)


def server_entry(name: str, description: str) -> bytes:
    raw = name.encode()
    return _U32.pack(len(raw)) + raw + description.encode()


def meta_context_entry(context_id: int, name: str) -> bytes:
    return _U32.pack(context_id) + name.encode()


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The answer to NBD_OPT_EXPORT_NAME: size, flags and (old clients) 124 zeros."""
    return _U64.pack(size) + _U16.pack(flags) + (b"" if no_zeroes else bytes(124))


# ------------------------------------------------------------ transmission
@dataclass(slots=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def parse_request(data: bytes) -> Request:
    magic, flags, kind, cookie, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError("request magic", magic)
    return Request(flags, kind, cookie, offset, length)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, kind: int, length: int, done: bool) -> bytes:
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, kind, cookie, length)


def data_chunk_header(cookie: int, offset: int, length: int, done: bool) -> bytes:
    return chunk_header(cookie, REPLY_TYPE_OFFSET_DATA, 8 + length, done) + _U64.pack(offset)


def hole_chunk(cookie: int, offset: int, length: int, done: bool) -> bytes:
    return chunk_header(cookie, REPLY_TYPE_OFFSET_HOLE, 12, done) + struct.pack(
        ">QI", offset, length
    )


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    raw = message.encode()[:MAX_STRING]
    body = struct.pack(">IH", error, len(raw)) + raw
    return chunk_header(cookie, REPLY_TYPE_ERROR, len(body), True) + body


def done_chunk(cookie: int) -> bytes:
    return chunk_header(cookie, REPLY_TYPE_NONE, 0, True)


def block_status_chunk(
    cookie: int, context_id: int, extents: list[tuple[int, int]], done: bool
) -> bytes:
    body = _U32.pack(context_id) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return chunk_header(cookie, REPLY_TYPE_BLOCK_STATUS, len(body), done) + body
