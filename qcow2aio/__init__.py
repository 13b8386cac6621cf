"""qcow2aio: QEMU's qcow2 disk-image format for asyncio, with a synchronous fast path.

>>> import qcow2aio
>>> with qcow2aio.open("disk.qcow2") as img:          # doctest: +SKIP
...     head = img.read_sync(0, 512)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .bitmaps import BitmapError, BitmapInconsistentError, BitmapNotFoundError
from .create import create
from .errors import (
    ImageBusyError,
    Qcow2CorruptError,
    Qcow2Error,
    Qcow2FormatError,
    Qcow2IOError,
    Qcow2PassphraseError,
    Qcow2RangeError,
    Qcow2ReadOnlyError,
    Qcow2UnsupportedError,
    WaitTimeoutError,
)
from .image import DEFAULT_WAIT_TIMEOUT, Image
from .io import BackendFactory
from .tools.bitmap import BitmapActionError, bitmap, bitmap_sync
from .tools.commit import CommitError, commit, commit_sync
from .tools.compare import CompareResult, compare, compare_sync
from .tools.convert import convert, convert_sync
from .tools.measure import measure, measure_async
from .tools.rebase import RebaseError, rebase, rebase_sync

__all__ = [
    "BitmapActionError",
    "BitmapError",
    "BitmapInconsistentError",
    "BitmapNotFoundError",
    "CommitError",
    "CompareResult",
    "Image",
    "ImageBusyError",
    "Qcow2CorruptError",
    "Qcow2Error",
    "Qcow2FormatError",
    "Qcow2IOError",
    "Qcow2PassphraseError",
    "Qcow2RangeError",
    "Qcow2ReadOnlyError",
    "Qcow2UnsupportedError",
    "RebaseError",
    "WaitTimeoutError",
    "bitmap",
    "bitmap_sync",
    "commit",
    "commit_sync",
    "compare",
    "compare_sync",
    "convert",
    "convert_sync",
    "create",
    "measure",
    "measure_async",
    "open",
    "rebase",
    "rebase_sync",
]

__version__ = "0.1.0"


def open(
    path: str | os.PathLike[str],
    mode: str = "r",
    *,
    passphrase: str | bytes | None = None,
    backing_passphrase: str | bytes | Sequence[str | bytes | None] | None = None,
    metadata_only: bool = False,
    l2_cache_size: int | None = None,
    refcount_cache_size: int | None = None,
    open_backing: bool = True,
    io_backend: BackendFactory | None = None,
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    discard: str = "unmap",
) -> Image:
    """Open a qcow2 image, ``mode`` "r" (read-only) or "r+" (read-write).

    Usable directly, as ``with``, or as ``async with``. An encrypted image (legacy
    AES or LUKS) needs its ``passphrase`` (``str`` as UTF-8, or ``bytes``: QEMU's
    ``encrypt.key-secret``); a missing or wrong one raises
    :class:`Qcow2PassphraseError` and nothing is written. ``backing_passphrase`` is
    for encrypted images down the backing chain: one value for all of them, or a
    sequence with one per depth (QEMU's ``backing.encrypt.key-secret``,
    ``backing.backing.encrypt.key-secret``, ...). ``metadata_only`` (read-only)
    opens an encrypted image without its passphrase for its metadata (info, map,
    check), as ``qemu-img info`` does; its data cannot be read. ``l2_cache_size`` and
    ``refcount_cache_size`` bound the metadata caches in bytes. ``io_backend``
    opens the files, ``(path, writable) -> FileBackend``: recording or
    fault-injecting backends in tests, or another I/O engine. ``wait_timeout``
    bounds how long a synchronous call in a thread without an event loop waits (for
    the metadata lock, an overlapping allocation, a drain) before it raises
    :class:`WaitTimeoutError` (see docs/concurrency.md, "Threads and loops").
    ``discard`` is QEMU's ``discard=`` option: "unmap" (the default, as ``qemu-io``
    and ``qemu-img`` open images) frees discarded clusters and punches the clusters
    freed by discard or write-zeroes with unmap from the file once no request can
    still use them, and cuts free clusters off the end of the file at close;
    "ignore" makes :meth:`Image.discard` a no-op and never punches.
    """
    return Image(
        path,
        mode,
        passphrase=passphrase,
        backing_passphrase=backing_passphrase,
        metadata_only=metadata_only,
        l2_cache_size=l2_cache_size,
        refcount_cache_size=refcount_cache_size,
        open_backing=open_backing,
        io_backend=io_backend,
        wait_timeout=wait_timeout,
        discard=discard,
    )
