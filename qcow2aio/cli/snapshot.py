"""``qcow2aio snapshot``: ``qemu-img snapshot -l | -a NAME | -c NAME | -d NAME FILE``.

Options, output and messages follow qemu-img 7.2 (observed): ``-l`` prints nothing
for an image without snapshots, else ``Snapshot list:``, the header and one row a
snapshot (dates in local time); one action at most (``Cannot mix ...``), none is
a no-op; ``-a`` takes an id or a name, ``-d`` a name only. Failures print
qemu-img's message and exit 1. Unlike qemu-img 7.2, ``-f qcow2`` is accepted.
Encrypted images need their secret (``--object secret,...`` with
``--image-opts ...,encrypt.key-secret=ID``), as qemu-img opens them for I/O.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence

from ..bitmaps import BitmapsBusyError
from ..errors import Qcow2Error, Qcow2UnsupportedError
from ..image import Image
from ..info import _snapshot_line
from ..snapshot_ops import SnapshotNotFoundError, SnapshotResizeError, find_by_name
from .imageopts import could_not_open, image_spec
from .options import (
    FORCE_SHARE,
    HELP,
    IMAGE_OPTS,
    OBJECT,
    PROG,
    CommandLine,
    CommandSpec,
    usage_error,
)
from .secrets import Secrets
from .unlock import _passphrase, check_encrypt_options, ensure_readable, read_header

# qemu-img's table plus "f:" (-f qcow2 is accepted here, see above).
SPEC = CommandSpec("snapshot", ":la:c:d:f:hqU", (HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE))


def _parse(argv: Sequence[str]) -> tuple[str | None, str, list[str], str | None, bool, Secrets]:
    """The action (one at most, checked as each is read, as qemu-img does), its
    snapshot name, files, format, --image-opts and secrets."""
    action: str | None = None
    name = ""
    cl = CommandLine(SPEC, argv)
    for key, value in cl:
        if key in ("l", "a", "c", "d"):
            if action is not None:
                raise usage_error("Cannot mix '-l', '-a', '-c', '-d'")
            action, name = key, value
    p = cl.parsed
    return action, name, p.files, p.values.get("f"), p.image_opts, p.secrets


def snapshot_list(snaps: list[dict[str, object]]) -> str:
    """``qemu-img snapshot -l``'s text (``bdrv_snapshot_dump`` rows)."""
    head = "%-10s%-17s%8s%20s%13s%11s" % (  # noqa: UP031 - mirrors QEMU's printf
        "ID",
        "TAG",
        "VM SIZE",
        "DATE",
        "VM CLOCK",
        "ICOUNT",
    )
    return "Snapshot list:\n" + head + "\n" + "".join(_snapshot_line(s) + "\n" for s in snaps)


def cmd_snapshot(argv: Sequence[str]) -> int:
    """Run one snapshot action; qemu-img's output, messages and exit codes."""
    action, name, files, fmt, image_opts, secrets = _parse(argv)
    if len(files) != 1:
        raise usage_error("Expecting one image file name")
    spec = image_spec(files[0], fmt, image_opts, backing_allowed=False)
    if spec.fmt is not None and spec.fmt != "qcow2":
        raise Qcow2UnsupportedError(f"Unknown file format '{spec.fmt}'")
    with could_not_open(spec.name):
        ensure_readable(spec.path)
        hdr = read_header(spec.path)
        check_encrypt_options(spec.level(0), hdr.crypt_method)
        passphrase = _passphrase(spec.level(0), secrets) if hdr.crypt_method else None
    if action is None:
        return 0
    mode = "r" if action == "l" else "r+"
    with Image(spec.path, mode, open_backing=False, passphrase=passphrase) as img:
        if action == "l":
            snaps = img.snapshots()
            if snaps:
                sys.stdout.write(snapshot_list(snaps))
            sys.stdout.flush()
            return 0
        try:
            if action == "c":
                img.create_snapshot_sync(name)
            elif action == "a":
                img.apply_snapshot_sync(name)
            else:
                find_by_name(img.meta.snapshots, name)  # qemu-img -d: names only
                img.delete_snapshot_sync(name)  # resolves that same name
        except SnapshotNotFoundError:
            if action == "a":
                raise Qcow2Error(
                    f"Could not apply snapshot '{name}': Failed to load snapshot: "
                    f"{os.strerror(errno.ENOENT)}"
                ) from None
            raise Qcow2Error(f"Could not delete snapshot '{name}': snapshot not found") from None
        except BitmapsBusyError as exc:  # bdrv_snapshot_goto's own refusal: no prefix
            raise Qcow2Error(f"Could not apply snapshot '{name}': {exc}") from None
        except Qcow2Error as exc:
            err = getattr(exc, "errno", None)
            if isinstance(exc, SnapshotResizeError):
                sys.stderr.write(f"{PROG}: {exc}\n")
            if action == "c":
                code = err or errno.EINVAL
                raise Qcow2Error(
                    f"Could not create snapshot '{name}': -{code} ({os.strerror(code)})"
                ) from None
            what = "apply" if action == "a" else "delete"
            why = os.strerror(err) if err else str(exc)
            prefix = "Failed to load snapshot: " if action == "a" else ""
            raise Qcow2Error(f"Could not {what} snapshot '{name}': {prefix}{why}") from None
    return 0
