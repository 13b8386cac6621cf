"""Coverage-guided fuzzing of the NBD server with atheris (libFuzzer for Python).

Each input is the byte stream of one client connection, fed to the real connection
handler (``NbdServer._accept``) through the in-memory transport of
tests/test_nbd_fuzz.py, with a real image behind it. A crash is any exception that
escapes the handler or anything the server logs as an unexpected failure. The
corpus lives in ``tests/nbd_corpus/`` (libFuzzer adds the inputs that reach new
coverage); ``make fuzz`` runs it, e.g. ``-runs=1000000``:

    python tests/fuzz_nbd.py tests/nbd_corpus -runs=1000000

The image is recreated every 10,000 inputs so that writes cannot fill the disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    import qcow2aio
    import qcow2aio.blockstatus
    import qcow2aio.nbd.protocol
    import qcow2aio.nbd.server
    from qcow2aio.nbd.server import Export, NbdServer

sys.path.insert(0, os.path.dirname(__file__))
from test_nbd_fuzz import SIZE, _feed  # noqa: E402


class _Fail(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        raise RuntimeError(f"server logged an error: {record.getMessage()}")


class _Harness:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.mkdtemp(prefix="nbdfuzz")
        self.path = os.path.join(self.dir, "f.qcow2")
        self.count = 0
        self.img: qcow2aio.Image | None = None
        self.server: NbdServer | None = None
        self._fresh()

    def _fresh(self) -> None:
        if self.img is not None:
            self.loop.run_until_complete(self.img.aclose())
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", self.path, str(SIZE)],
                       check=True)  # fmt: skip
        subprocess.run(["qemu-io", "-c", "write -P 1 0 256k", "-c", "write -c -P 2 512k 64k",
                        self.path], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        self.img = qcow2aio.open(self.path, "r+")

        async def make() -> NbdServer:
            assert self.img is not None
            return NbdServer({"f": Export(self.img, name="f", allocation_depth=True)})

        self.server = self.loop.run_until_complete(make())

    def one(self, data: bytes) -> None:
        self.count += 1
        if self.count % 10_000 == 0:
            self._fresh()
        assert self.server is not None
        self.loop.run_until_complete(_feed(self.server, data))


def main() -> None:
    logging.getLogger("qcow2aio.nbd").addHandler(_Fail())
    harness = _Harness()
    atheris.Setup(sys.argv, harness.one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
