"""A small NBD client for the tests: handshakes step by step, sends well-formed or
deliberately broken messages, and reads replies, so hostile-client and fuzz tests
can say exactly what they sent. Stock clients (qemu-io, nbdinfo, nbdcopy) cover the
well-behaved paths; this one covers the rest."""

from __future__ import annotations

import socket
import struct

from qcow2aio.nbd import protocol as P


class Closed(Exception):
    """The server closed the connection."""


class Client:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.structured = False

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise Closed(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def is_closed(self) -> bool:
        """True when the server has closed (reads EOF within the timeout)."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, TimeoutError, OSError):
            return True

    # ------------------------------------------------------------ handshake
    def greet(self, flags: int = P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES) -> int:
        magic, opt_magic, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt_magic) == (P.NBDMAGIC, P.IHAVEOPT)
        self.send(struct.pack(">I", flags))
        return int(hflags)

    def option(self, opt: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data)

    def reply(self) -> tuple[int, int, bytes]:
        magic, opt, kind, length = struct.unpack(">QIII", self.recv(20))
        assert magic == P.REPLY_MAGIC, hex(magic)
        return int(opt), int(kind), self.recv(length)

    def replies(self) -> list[tuple[int, bytes]]:
        """Replies up to the ACK or an error (included)."""
        out: list[tuple[int, bytes]] = []
        while True:
            _, kind, data = self.reply()
            out.append((kind, data))
            if kind == P.REP_ACK or kind & P.REP_ERR:
                return out

    def go(self, name: str = "", *, structured: bool = True, contexts: tuple[str, ...] = ()) -> int:
        """Negotiate and enter transmission; returns the transmission flags."""
        if structured:
            self.option(P.OPT_STRUCTURED_REPLY)
            assert self.replies()[-1][0] == P.REP_ACK
            self.structured = True
        if contexts:
            self.option(P.OPT_SET_META_CONTEXT, meta_request(name, contexts))
            assert self.replies()[-1][0] == P.REP_ACK
        raw = name.encode()
        self.option(P.OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        flags = 0
        for kind, data in self.replies():
            assert not kind & P.REP_ERR, hex(kind)
            if kind == P.REP_INFO and struct.unpack(">H", data[:2])[0] == P.INFO_EXPORT:
                flags = struct.unpack(">QH", data[2:12])[1]
        return int(flags)

    # --------------------------------------------------------- transmission
    def request(self, kind: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                cookie: int = 1, payload: bytes = b"") -> None:  # fmt: skip
        self.send(P.REQUEST.pack(P.REQUEST_MAGIC, flags, kind, cookie, offset, length) + payload)

    def simple(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """A simple reply: (error, cookie, data)."""
        magic, error, cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == P.SIMPLE_REPLY_MAGIC, hex(magic)
        return int(error), int(cookie), self.recv(read_length) if not error else b""

    def chunks(self) -> list[tuple[int, int, bytes]]:
        """The chunks of one structured reply: (type, cookie, payload), to DONE."""
        out: list[tuple[int, int, bytes]] = []
        while True:
            magic = struct.unpack(">I", self.recv(4))[0]
            if magic == P.SIMPLE_REPLY_MAGIC:
                error, cookie = struct.unpack(">IQ", self.recv(12))
                out.append((-1, int(cookie), struct.pack(">I", error)))
                return out
            assert magic == P.STRUCTURED_REPLY_MAGIC, hex(magic)
            flags, kind, cookie, length = struct.unpack(">HHQI", self.recv(16))
            out.append((int(kind), int(cookie), self.recv(length)))
            if flags & P.REPLY_FLAG_DONE:
                return out


def meta_request(name: str, queries: tuple[str, ...]) -> bytes:
    raw = name.encode()
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        body += struct.pack(">I", len(q.encode())) + q.encode()
    return body


def chunk_error(payload: bytes) -> int:
    return int(struct.unpack(">I", payload[:4])[0])
