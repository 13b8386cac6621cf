"""``qemu-img rebase``: give an overlay another backing file, keeping (safe mode) what
it reads.

Unsafe mode (``-u``) only rewrites the header's backing name and format.

Safe mode first makes the overlay independent of the difference between the old and
the new backing file: for every range unallocated in the overlay (block status: not
present at depth 0), the old content (read through the overlay itself, which still
has its old backing file) and the new content (the new backing file, zeros past its
end, or zeros when the backing file is removed) are compared in 512-byte sectors, as
qemu-img 7.2 does, and the differing runs of the old content are written into the
overlay as ordinary data writes (old zeros included: a written run of zeros is data,
not a zero cluster; the part of a cluster not written is filled from the old backing
file by the write's copy-on-write). Only then does one cluster-0 write switch the
header (:meth:`Image.set_backing`). A crash or a cancel before the switch leaves the
overlay reading exactly as before (it only holds more of the old content itself);
after it, the new chain reads as the old one did. An image without a backing file
(it reads zeros where unallocated) gets, as from qemu-img 7.2, zero clusters where the
new backing file differs on v3, and nothing at all on v2 (its unallocated ranges then
read from the new backing file).

The work goes in steps of 2 MiB (aligned, so no cluster of up to 2 MiB is shared by
two steps: a step's writes never copy-on-write over a range another step is
reading), up to ``max_inflight`` steps at once: about 4 MiB of buffers per step.
Progress counts guest bytes looked at.
"""

from __future__ import annotations

import os

import numpy as np

from ..backing import RAW_FORMATS, RawImage, probe_format, resolve_name
from ..blockstatus import block_status_async
from ..errors import Qcow2Error
from ..image import Image
from ..io import BackendFactory
from .commit import Passphrase, Piece, pipeline, run_sync
from .progress import Counter, Progress

__all__ = ["RebaseError", "rebase", "rebase_sync"]

STEP = 2 << 20
SECTOR = 512


class RebaseError(Qcow2Error):
    """The rebase asked for cannot be done (qemu-img's messages)."""


def _format_needed(name: str) -> RebaseError:
    return RebaseError(
        f"Could not change the backing file to '{name}': backing format must be specified"
    )


def differing_runs(old: bytes, new: bytes) -> list[tuple[int, int]]:
    """``(offset, length)`` of the runs of 512-byte sectors in which ``old`` and ``new``
    differ (a last partial sector counts as one)."""
    if old == new:
        return []
    n = len(old)
    whole = n - n % SECTOR
    a = np.frombuffer(old, dtype=np.uint8, count=whole).reshape(-1, SECTOR)
    b = np.frombuffer(new, dtype=np.uint8, count=whole).reshape(-1, SECTOR)
    diff = (a != b).any(axis=1).tolist()
    if whole < n:
        diff.append(old[whole:] != new[whole:])
    runs: list[tuple[int, int]] = []
    start: int | None = None
    for i, d in enumerate([*diff, False]):
        if d and start is None:
            start = i
        elif not d and start is not None:
            runs.append((start * SECTOR, min(n, i * SECTOR) - start * SECTOR))
            start = None
    return runs


def _open_new_backing(
    overlay: Image, name: str, fmt: str | None, passphrase: Passphrase
) -> Image | RawImage:
    path = resolve_name(name, overlay.path)
    if fmt is None:
        fmt = probe_format(path)
    if fmt in RAW_FORMATS:
        return RawImage(path)
    if fmt != "qcow2":
        raise RebaseError(f"Unsupported backing file format: '{fmt}'")
    secret = passphrase if isinstance(passphrase, str | bytes) else None
    below = None if passphrase is None or isinstance(passphrase, str | bytes) else passphrase
    return Image(path, "r", passphrase=secret, backing_passphrase=below)


async def _read_new(new: Image | RawImage | None, start: int, n: int) -> bytes:
    """``n`` bytes of the new backing file at ``start``: zeros past its end (or all
    zeros when the backing file is removed)."""
    buf = bytearray(n)
    if new is not None:
        have = max(0, min(n, new.size - start))
        if have:
            await new.readinto(memoryview(buf)[:have], start)
    return bytes(buf)


async def _rebase_step(overlay: Image, new: Image | RawImage | None, start: int, n: int) -> None:
    cs = overlay.cluster_size
    for st in await block_status_async(overlay, start, n):
        if st.depth == 0 and st.present:
            continue  # allocated in the overlay: it reads the same over any backing file
        old = await overlay.read(st.start, st.length)
        cur = await _read_new(new, st.start, st.length)
        for off, length in differing_runs(old, cur):
            if overlay.backing is None:
                # No old backing file: what differs is zeros here; qemu-img 7.2 makes
                # the clusters zero clusters (the rest of such a cluster reads zeros
                # too, being unallocated with nothing below).
                a = max(st.start, (st.start + off) // cs * cs)
                b = min(st.start + st.length, -(-(st.start + off + length) // cs) * cs)
                await overlay.write_zeroes(a, b - a, unmap=False)
            else:
                await overlay.write(st.start + off, memoryview(old)[off : off + length])


async def rebase(
    path: str | os.PathLike[str] | Image,
    backing: str | None,
    *,
    backing_format: str | None = None,
    unsafe: bool = False,
    progress: Progress | None = None,
    passphrase: str | bytes | None = None,
    backing_passphrase: Passphrase = None,
    new_backing_passphrase: Passphrase = None,
    max_inflight: int = 4,
    io_backend: BackendFactory | None = None,
) -> None:
    """Make ``backing`` (a name as ``-b`` takes it, resolved from the image's folder;
    ``None`` or ``""`` removes the backing file) the image's backing file, as
    ``qemu-img rebase [-u] -b BACKING [-F FMT]``.

    Safe mode copies what differs first (see the module), then switches the header;
    a new backing file without ``backing_format`` is refused *after* the copy, as
    qemu-img 7.2 does (the image then reads as before, over its old backing file).
    An :class:`Image` passed in must be writable; it reads through the new backing
    file afterwards. ``io_backend``: as :func:`qcow2aio.open`. Raises
    :class:`RebaseError` with qemu-img's messages.
    """
    name = backing or None
    own = not isinstance(path, Image)
    if isinstance(path, Image):
        img = path
    else:
        img = Image(
            os.fspath(path),
            "r+",
            passphrase=passphrase,
            backing_passphrase=backing_passphrase,
            open_backing=not unsafe,
            io_backend=io_backend,
        )
    try:
        if unsafe:
            if name is not None and backing_format is None:
                raise _format_needed(name)
            counter = Counter(img.size, progress)
            await img.set_backing(name, backing_format, open_new=not own)
            counter.complete()
            return
        new = (
            _open_new_backing(img, name, backing_format, new_backing_passphrase)
            if name is not None
            else None
        )
        try:
            counter = Counter(img.size, progress)
            # Without an old backing file, qemu-img 7.2 zeroes what differs on a v3
            # image (zero clusters) and writes nothing on a v2 one (where its
            # write-zeroes leaves the clusters unallocated, so they show the new
            # backing file afterwards): so do we.
            steps = (
                [Piece(0, s, min(STEP, img.size - s)) for s in range(0, img.size, STEP)]
                if img.backing is not None or img.meta.version >= 3
                else []
            )

            async def step(p: Piece) -> int:
                await _rebase_step(img, new, p.start, p.length)
                return p.length

            await pipeline(steps, step, counter, max_inflight)
            await img.flush()
        finally:
            if new is not None:
                new.close()
        if name is not None and backing_format is None:
            raise _format_needed(name)
        await img.set_backing(name, backing_format, open_new=True)
        counter.complete()
    finally:
        if own:
            await img.aclose()


def rebase_sync(
    path: str | os.PathLike[str] | Image, backing: str | None, **kwargs: object
) -> None:
    """:func:`rebase` from synchronous code (see :func:`qcow2aio.tools.commit.run_sync`)."""
    run_sync(lambda: rebase(path, backing, **kwargs))  # type: ignore[arg-type]
