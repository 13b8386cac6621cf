"""The ``-l SNAPSHOT_PARAM`` of ``qemu-img convert`` and ``measure``: read a snapshot.

``-l snapshot.id=ID,snapshot.name=NAME`` names it by either or both (QemuOpts: an
unknown key is refused); any other text is an id, else a name
(``bdrv_snapshot_load_tmp_by_id_or_name``). The image, open read-only, then shows
that snapshot (:meth:`qcow2aio.Image.load_snapshot_tmp`).
"""

from __future__ import annotations

from ..backing import RawImage
from ..image import Image
from ..snapshot_ops import SnapshotNotFoundError
from .options import UsageError, split_options

_BASE = "snapshot."


def load_snapshot_param(img: Image | RawImage, param: str) -> None:
    """Load ``param``'s snapshot into ``img``, or raise UsageError with qemu-img's
    message (printed as ``qemu-img: MESSAGE``, exit 1)."""
    snapshot_id: str | None = None
    name: str | None = None
    if param.startswith(_BASE):
        for key, value in split_options(param):
            if key == "snapshot.id":
                snapshot_id = value
            elif key == "snapshot.name":
                name = value
            else:
                raise UsageError(
                    f"Invalid parameter '{key}'\nqemu-img: Failed in parsing snapshot "
                    f"param '{param}'"
                )
    if isinstance(img, RawImage):
        raise UsageError(
            "Failed to load snapshot: Block format 'raw' used by device '' does not "
            "support temporarily loading internal snapshots"
        )
    try:
        if param.startswith(_BASE):
            img.load_snapshot_tmp(snapshot_id, name)
        else:
            try:
                img.load_snapshot_tmp(param, None)
            except SnapshotNotFoundError:
                img.load_snapshot_tmp(None, param)
    except SnapshotNotFoundError as exc:
        raise UsageError(f"Failed to load snapshot: {exc}") from None
