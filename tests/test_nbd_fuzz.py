"""Seeded fuzzing of the NBD server's handshake and transmission state machine.

Each input is a byte stream a client could send: built from well-formed messages
(greeting flags, options, a GO, requests with payloads) and then mutated (bytes
flipped, cut, duplicated, lengths replaced by extreme values). It is fed to the real
connection handler (``NbdServer._accept``) through an in-memory transport, with the
real image behind it. The server must never log an unexpected exception, never
allocate from an unchecked length (the transport would need gigabytes), and leave an
image ``qemu-img check`` accepts. These inputs are seeded and structured, which
reaches deep states quickly;
the coverage-guided run is tests/fuzz_nbd.py (atheris, ``make fuzz``). Both share
the corpus in ``tests/nbd_corpus/``. ``QCOW2AIO_STRESS=1`` runs 10^6 inputs here.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import struct
from pathlib import Path
from typing import Any

from conftest import Qemu
from nbdclient import meta_request

import qcow2aio
from qcow2aio.nbd import protocol as P
from qcow2aio.nbd.server import Export, NbdServer

CORPUS = Path(__file__).parent / "nbd_corpus"
SIZE = 1 << 20
_OPTIONS = [
    P.OPT_STRUCTURED_REPLY,
    P.OPT_LIST,
    P.OPT_INFO,
    P.OPT_LIST_META_CONTEXT,
    P.OPT_SET_META_CONTEXT,
    P.OPT_STARTTLS,
    55,
]
_EXTREMES = [0, 1, 511, 4096, 65536, SIZE - 1, SIZE, SIZE + 1, 1 << 25, (1 << 32) - 1]


class _Writer:
    """The server's side of an in-memory connection: collects what it sends."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.out += data

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def close(self) -> None:
        self.closed = True

    async def start_tls(self, ctx: Any) -> None:  # pragma: no cover - no TLS here
        raise ConnectionError("no TLS in the fuzz transport")


def _request(rng: random.Random) -> bytes:
    kind = rng.choice([P.CMD_READ, P.CMD_WRITE, P.CMD_FLUSH, P.CMD_TRIM, P.CMD_CACHE,
                       P.CMD_WRITE_ZEROES, P.CMD_BLOCK_STATUS, P.CMD_DISC, 9])  # fmt: skip
    flags = rng.choice([0, 0, 0, P.CMD_FLAG_FUA, P.CMD_FLAG_DF, P.CMD_FLAG_REQ_ONE,
                        P.CMD_FLAG_NO_HOLE, P.CMD_FLAG_FAST_ZERO, 0xFFFF])  # fmt: skip
    if rng.random() < 0.2:
        offset, length = rng.choice(_EXTREMES), rng.choice(_EXTREMES)
    else:
        offset = rng.randrange(SIZE)
        length = rng.randrange(1, min(SIZE - offset, 9000) + 1)
    head = P.REQUEST.pack(P.REQUEST_MAGIC, flags, kind, rng.getrandbits(64), offset, length)
    if kind == P.CMD_WRITE and length <= 9000:
        return head + rng.randbytes(length)
    return head


def _stream(rng: random.Random) -> bytes:
    """A plausible client stream, then mutated."""
    parts = [struct.pack(">I", rng.choice([3, 3, 3, 1, 0, 7]))]
    for _ in range(rng.randrange(0, 4)):
        opt = rng.choice(_OPTIONS)
        if opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            queries = rng.choice([(), ("base:allocation",), ("qemu:",), ("base:", "x")])
            body = meta_request(rng.choice(["f", ""]), queries)
        elif opt == P.OPT_INFO:
            body = struct.pack(">I", 1) + b"f" + struct.pack(">HH", 1, rng.randrange(5))
        else:
            body = b""
        parts.append(struct.pack(">QII", P.IHAVEOPT, opt, len(body)) + body)
    if rng.random() < 0.1:
        parts.append(struct.pack(">QII", P.IHAVEOPT, P.OPT_EXPORT_NAME, 1) + b"f")
    else:
        body = struct.pack(">I", 1) + b"f" + struct.pack(">H", 0)
        parts.append(struct.pack(">QII", P.IHAVEOPT, P.OPT_GO, len(body)) + body)
    parts += [_request(rng) for _ in range(rng.randrange(0, 8))]
    data = bytearray(b"".join(parts))
    for _ in range(rng.choice([0, 0, 1, 2, 5])):
        what = rng.randrange(4)
        if not data:
            break
        pos = rng.randrange(len(data))
        if what == 0:
            data[pos] ^= 1 << rng.randrange(8)
        elif what == 1:
            del data[pos:]
        elif what == 2 and pos + 4 <= len(data):
            data[pos : pos + 4] = struct.pack(">I", rng.choice(_EXTREMES) & 0xFFFFFFFF)
        else:
            data[pos:pos] = data[pos : pos + rng.randrange(1, 40)]
    return bytes(data)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _feed(server: NbdServer, data: bytes) -> bytes:
    reader = asyncio.StreamReader(limit=1 << 20)
    reader.feed_data(data)
    reader.feed_eof()
    writer = _Writer()
    await asyncio.wait_for(server._accept(reader, writer), 30)  # type: ignore[arg-type]
    assert writer.closed
    return bytes(writer.out)


def _count() -> int:
    if os.environ.get("QCOW2AIO_STRESS", "").strip() not in ("", "0"):
        return int(os.environ.get("QCOW2AIO_NBD_FUZZ", str(10**6)))
    return 1500


def test_fuzz_server_state_machine(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "f.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", path, str(SIZE))
    qemu.io(path, "write -P 1 0 256k", "write -c -P 2 512k 64k")
    errors = _Errors()
    log = logging.getLogger("qcow2aio.nbd")
    log.addHandler(errors)
    seen: dict[str, int] = {}
    count = _count()
    seed0 = int(os.environ.get("QCOW2AIO_SEED_START", "0") or 0)

    async def main() -> None:
        img = qcow2aio.open(path, "r+")
        server = NbdServer({"f": Export(img, name="f", allocation_depth=True)})
        try:
            for i in range(count):
                seed = seed0 + i
                out = await _feed(server, _stream(random.Random(seed)))
                assert not errors.records, (seed, errors.records[0].getMessage())
                # A rough shape of the answer: the first option reply's header and
                # how many transmission replies of each kind followed.
                simple = out.count(struct.pack(">I", P.SIMPLE_REPLY_MAGIC))
                chunks = out.count(struct.pack(">I", P.STRUCTURED_REPLY_MAGIC))
                shape = out[18:38] + struct.pack(">II", min(simple, 9), min(chunks, 9))
                seen.setdefault(hashlib.sha1(shape).hexdigest(), seed)
        finally:
            await img.aclose()

    try:
        asyncio.run(main())
    finally:
        log.removeHandler(errors)
    assert qemu.check(path)[0] == 0
    if os.environ.get("QCOW2AIO_NBD_KEEP_CORPUS"):
        CORPUS.mkdir(exist_ok=True)
        for seed in seen.values():
            data = _stream(random.Random(seed))
            (CORPUS / hashlib.sha1(data).hexdigest()).write_bytes(data)
    assert len(seen) > 3


def test_corpus_replays(qemu: Qemu, tmp_path: Path) -> None:
    """The corpus (one stream per answer shape the structured run met, and what
    atheris added for new coverage, tests/fuzz_nbd.py) replays cleanly."""
    inputs = [p.read_bytes() for p in sorted(CORPUS.iterdir()) if p.is_file()]
    assert len(inputs) > 100
    path = tmp_path / "c.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", path, str(SIZE))

    async def main() -> None:
        img = qcow2aio.open(path, "r+")
        server = NbdServer({"f": Export(img, name="f", allocation_depth=True)})
        try:
            for data in inputs:
                await _feed(server, data)
        finally:
            await img.aclose()

    asyncio.run(main())
    assert qemu.check(path)[0] == 0
