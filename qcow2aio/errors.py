"""Exceptions raised by qcow2aio.

Every problem that comes from an image (bad header, corrupt table, unsupported
feature, I/O failure on the image file) is a :class:`Qcow2Error` subclass, so a
caller that serves untrusted images (an NBD export, a converter) can catch one
type and never see ``IndexError``/``struct.error`` leaking out of the parser.
Messages name the field and the value that was refused.
"""

from __future__ import annotations


class Qcow2Error(Exception):
    """Base class of every error about a qcow2 image."""


class Qcow2FormatError(Qcow2Error):
    """The image violates the qcow2 format (a field is out of range, misaligned, ...)."""


class Qcow2CorruptError(Qcow2FormatError):
    """Metadata is inconsistent (an L2 entry points into metadata, refcounts disagree ...).

    Raised when QEMU would mark the image corrupt.
    """


class Qcow2UnsupportedError(Qcow2Error):
    """The image uses a feature this version does not implement (e.g. encryption)."""


class Qcow2PassphraseError(Qcow2Error):
    """An encrypted image was opened (or a keyslot changed) with a wrong or missing
    passphrase. Nothing was written. The message never contains the passphrase."""


class Qcow2ReadOnlyError(Qcow2Error):
    """A write was attempted on an image opened read-only, or on one that refuses writes."""


class Qcow2RangeError(Qcow2Error):
    """A guest request lies (partly) outside the virtual disk."""


class Qcow2IOError(Qcow2Error):
    """The underlying file failed (EIO, ENOSPC, short read/write)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class ImageBusyError(Qcow2Error):
    """The synchronous fast path would have had to wait.

    Raised *before* anything is changed, when the metadata lock is held by a
    suspended request or the request overlaps an in-flight allocation. The
    caller can retry later or use the async API, which waits instead.
    """


class WaitTimeoutError(ImageBusyError):
    """A synchronous call in a thread without an event loop waited too long.

    Such calls wait (for the metadata lock, an overlapping in-flight allocation, a
    drain) instead of raising :class:`ImageBusyError`, but never forever: a wait that
    could never end (the holder is a suspended coroutine of an event loop that is no
    longer running) ends with this error after the image's ``wait_timeout``.
    Nothing was changed by the call that raised it.
    """
