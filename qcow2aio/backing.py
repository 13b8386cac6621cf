"""Backing files: resolving names, probing formats, and the raw backing reader.

Names are resolved the way QEMU does: a relative name is relative to the folder
of the image that names it, not to the working directory. Only local files are
followed (no ``json:`` or protocol names, see CVE-2024-4467), a loop or a chain
deeper than ``MAX_BACKING_DEPTH`` is refused, and reads beyond the end of a
shorter backing file return zeros.
"""

from __future__ import annotations

import os
import re
import stat
import struct

from . import constants as C
from .errors import Qcow2FormatError, Qcow2RangeError, Qcow2UnsupportedError
from .io import FileBackend

RAW_FORMATS = {"raw", "file", "host_device", "host_cdrom"}
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def resolve_name(name: str, image_path: str) -> str:
    """The path a backing (or data file) name refers to, relative to ``image_path``."""
    if name.startswith("json:") or (_PROTOCOL.match(name) and not os.path.exists(name)):
        raise Qcow2UnsupportedError(
            f"Only local backing files are supported: backing_file={name!r}"
        )
    path = (
        name
        if os.path.isabs(name)
        else os.path.join(os.path.dirname(os.path.abspath(image_path)), name)
    )
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return path  # opening it reports the problem (as a Qcow2IOError)
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        # A directory is refused by QEMU too; open() of a FIFO blocks until a writer
        # appears (QEMU 7.2 hangs there) and a terminal's reads block: refuse them all.
        raise Qcow2UnsupportedError(
            f"Backing or data file is not a regular file or block device: {name!r} "
            f"(mode {stat.filemode(mode)})"
        )
    return path


def probe_format(path: str) -> str:
    """qcow2 when the file starts with the qcow2 magic, raw otherwise (QEMU's probe)."""
    fb = FileBackend(path, writable=False)
    try:
        head = fb.pread(0, 4, "probe")
    finally:
        fb.close()
    return "qcow2" if struct.unpack(">I", head)[0] == C.QCOW_MAGIC else "raw"


class RawImage:
    """A raw file read as a disk (a backing file, a mover's source, a read-only
    export): guest offset == file offset. :class:`qcow2aio.tools.raw.RawTarget`
    adds the writes."""

    writable = False

    def __init__(self, path: str, file: FileBackend | None = None) -> None:
        self.path = path
        self._file = file if file is not None else FileBackend(path, writable=False)
        self.size = self._file.size()
        self.format = "raw"

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (within the file)."""
        buf = bytearray(length)
        await self.readinto(memoryview(buf), offset)
        return bytes(buf)

    def readinto_sync(self, buf: memoryview, offset: int) -> None:
        if offset < 0 or offset + len(buf) > self.size:
            raise Qcow2RangeError(
                f"read of {len(buf)} bytes at {offset} is outside the raw file ({self.size} bytes)"
            )
        self._file.readinto(buf, offset, "read_backing")

    async def readinto(self, buf: memoryview, offset: int) -> None:
        if offset < 0 or offset + len(buf) > self.size:
            raise Qcow2RangeError(
                f"read of {len(buf)} bytes at {offset} is outside the raw file ({self.size} bytes)"
            )
        await self._file.areadinto(buf, offset, "read_backing")

    def locate(self, offset: int, length: int) -> tuple[FileBackend | None, int]:
        """Where ``[offset, offset+length)`` lies: here, at the same offset (see
        ``Image.locate``); ``(None, -1)`` past the end or when reads are not plain."""
        if offset + length <= self.size and self._file.plain_reads:
            return self._file, offset
        return None, -1

    def data_runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Where the file holds data and where holes (see ``FileBackend.data_runs``)."""
        return self._file.data_runs(offset, length)

    async def flush(self) -> None:
        await self._file.aflush("flush")

    def flush_sync(self) -> None:
        self._file.flush("flush")

    def close(self) -> None:
        self._file.close()

    async def aclose(self) -> None:
        self.close()


def check_chain(path: str, chain: tuple[str, ...]) -> tuple[str, ...]:
    """Add ``path`` to the chain of real paths opened so far, refusing loops and depth."""
    real = os.path.realpath(path)
    if real in chain:
        raise Qcow2FormatError(f"Backing chain loops: {path!r} is already in the chain")
    if len(chain) >= C.MAX_BACKING_DEPTH:
        raise Qcow2FormatError(
            f"Backing chain too deep: more than {C.MAX_BACKING_DEPTH} images at {path!r}"
        )
    return (*chain, real)
