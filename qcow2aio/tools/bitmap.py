"""``qemu-img bitmap``: add, remove, clear, enable, disable and merge persistent bitmaps.

:func:`bitmap` runs a list of actions on one bitmap of one image, in order, and
stops at the first that fails, as ``qemu-img bitmap`` 7.2 does (observed): the
actions that ran before stay done (the image is closed normally, which stores
the bitmaps). A failure is :class:`BitmapActionError`, worded as qemu-img words
it (``Operation OP on bitmap NAME failed: REASON``).

The image may be a path (opened read-write, closed at the end) or an
:class:`~qcow2aio.image.Image` the caller has open read-write (a service changing
the bitmaps of an image it serves: its requests go on around each action, which
is an exclusive image operation). ``--merge`` sources come from the image itself,
or from ``source`` (a path, opened read-only, or an open image), like ``-b``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from ..backing import RAW_FORMATS, probe_format
from ..bitmaps import BitmapError, BitmapNotFoundError, default_granularity
from ..errors import Qcow2Error
from ..image import Image

__all__ = ["ACTIONS", "Action", "BitmapActionError", "bitmap", "bitmap_sync"]

ACTIONS = ("add", "remove", "clear", "enable", "disable", "merge")


@dataclass(frozen=True)
class Action:
    """One action; ``source`` is the bitmap a ``merge`` reads."""

    op: str
    source: str | None = None


class BitmapActionError(Qcow2Error):
    """An action failed: ``Operation OP on bitmap NAME failed: REASON``."""

    def __init__(self, op: str, name: str, reason: str) -> None:
        super().__init__(f"Operation {op} on bitmap {name} failed: {reason}")
        self.op = op
        self.name = name
        self.reason = reason


def _actions(actions: Sequence[Action | str | tuple[str, str]]) -> list[Action]:
    out = []
    for a in actions:
        if isinstance(a, str):
            a = Action(a)
        elif isinstance(a, tuple):
            a = Action(a[0], a[1])
        if a.op not in ACTIONS:
            raise ValueError(f"unknown bitmap action {a.op!r} (one of {', '.join(ACTIONS)})")
        if (a.op == "merge") != (a.source is not None):
            raise ValueError("a merge action needs a source bitmap, and only a merge")
        out.append(a)
    return out


async def _run(
    img: Image, name: str, act: Action, granularity: int | None, source: Image | None
) -> None:
    if act.op == "add":
        g = default_granularity(img.cluster_size) if granularity is None else granularity
        await img.add_bitmap(name, granularity=g)
    elif act.op == "remove":
        await img.remove_bitmap(name)
    elif act.op == "clear":
        await img.clear_bitmap(name)
    elif act.op == "enable":
        await img.enable_bitmap(name)
    elif act.op == "disable":
        await img.disable_bitmap(name)
    else:
        assert act.source is not None
        await img.merge_bitmaps(act.source, name, source=source)


def _raw_reason(act: Action, name: str, node: str) -> str:
    """What a raw image answers: no bitmaps at all, and none can be stored."""
    if act.op == "add":
        return f"Can't store persistent bitmaps to {node}: Operation not supported"
    return str(BitmapNotFoundError(name))


async def bitmap(
    image: str | Image,
    name: str,
    actions: Sequence[Action | str | tuple[str, str]],
    *,
    granularity: int | None = None,
    source: str | Image | None = None,
    source_format: str | None = None,
    image_format: str | None = None,
    passphrase: str | bytes | None = None,
    source_passphrase: str | bytes | None = None,
) -> None:
    """Run ``actions`` (``"add"``, ``"remove"``, ``"clear"``, ``"enable"``,
    ``"disable"``, ``("merge", SOURCE_BITMAP)``) on bitmap ``name`` of ``image``.

    ``granularity`` applies to ``add`` (default: the cluster size clamped to
    4 KiB .. 64 KiB, as qemu-img); ``--add --disable`` is ``["add", "disable"]``.
    ``image_format``/``source_format`` ("qcow2" or "raw"; probed when None): a raw
    image has no bitmaps (``add`` is refused, other actions find no bitmap).
    """
    acts = _actions(actions)
    own: list[Image] = []
    try:
        if isinstance(image, Image):
            img: Image | None = image
        else:
            fmt = image_format or probe_format(image)
            if fmt in RAW_FORMATS:
                img = None
            elif fmt != "qcow2":
                raise Qcow2Error(f"Unknown driver '{fmt}'")
            else:
                img = Image(image, "r+", open_backing=False, passphrase=passphrase)
                own.append(img)
        src: Image | None = None
        src_raw = False
        if isinstance(source, Image):
            src = source
        elif source is not None:
            sfmt = source_format or probe_format(source)
            if sfmt in RAW_FORMATS:
                src_raw = True
            elif sfmt != "qcow2":
                raise Qcow2Error(f"Unknown driver '{sfmt}'")
            else:
                src = Image(source, "r", open_backing=False, passphrase=source_passphrase)
                own.append(src)
        for act in acts:
            if img is None:
                node = image if isinstance(image, str) else image.path
                raise BitmapActionError(act.op, name, _raw_reason(act, name, node))
            try:
                if act.op == "merge" and src_raw:
                    await img._exclusive(lambda: img._bitmap_set().get(name))
                    assert act.source is not None
                    raise BitmapNotFoundError(act.source)
                else:
                    await _run(img, name, act, granularity, src)
            except BitmapError as exc:
                raise BitmapActionError(act.op, name, str(exc)) from None
    finally:
        for i in reversed(own):
            await i.aclose()


def bitmap_sync(
    image: str | Image,
    name: str,
    actions: Sequence[Action | str | tuple[str, str]],
    **kw: object,
) -> None:
    """:func:`bitmap` run on a new event loop (for synchronous callers)."""
    asyncio.run(bitmap(image, name, actions, **kw))  # type: ignore[arg-type]
