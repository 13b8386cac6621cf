"""``qemu-img map``: the block status of an image and its backing chain, as text.

The records come from :mod:`qcow2aio.blockstatus` (also behind ``Image.map``); this
module prints them as qemu-img 7.2 does, so scripts that parse one parse the other:

* JSON: one ``{ "start": ...}`` record per line inside ``[`` ... ``]``; a start
  offset at or past the end of the disk gives one zero-length record, as QEMU does.
* human: ``Offset / Length / Mapped to / File`` rows for data that lies in place
  in a file, the file named as QEMU names the layer (the backing name joined to the
  folder of the name the image was reached by, e.g. ``nest/../base.qcow2``).
  Data that cannot be named that way (compressed, encrypted) stops the listing
  with :class:`MapError` after the rows before it, as qemu-img exits 1 there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..blockstatus import Status, block_status, block_status_async
from ..errors import Qcow2Error

if TYPE_CHECKING:
    from ..blockstatus import Layer


class MapError(Qcow2Error):
    """The human-readable map met clusters it cannot show as file offsets."""


def display_names(img: Layer, name: str) -> dict[str, str]:
    """Each layer's file (and data file) path -> the name qemu-img prints for it:
    the name a layer was reached by, joined textually down the chain."""
    from ..image import Image

    names: dict[str, str] = {}
    layer: Layer | None = img
    shown = name
    while layer is not None:
        names.setdefault(layer.path, shown)
        if not isinstance(layer, Image):
            break
        hdr = layer.meta.header
        if layer.data_file_path is not None and hdr.data_file is not None:
            names.setdefault(layer.data_file_path, _joined(shown, hdr.data_file))
        if layer.backing is None or hdr.backing_file is None:
            break
        shown = _joined(shown, hdr.backing_file)
        layer = layer.backing
    return names


def _joined(base: str, name: str) -> str:
    if os.path.isabs(name):
        return name
    folder = os.path.dirname(base)
    return f"{folder}/{name}" if folder else name


def _span(img: Layer, start: int, max_length: int | None) -> tuple[int, int]:
    end = img.size if max_length is None else min(img.size, start + max_length)
    return start, max(0, end - start)


def _json_lines(runs: list[Status], start: int) -> str:
    if not runs:
        runs = [Status(start, 0, 0, False, False, False)]
    lines = []
    for st in runs:
        text = (
            f'{{ "start": {st.start}, "length": {st.length}, "depth": {st.depth}, '
            f'"present": {_b(st.present)}, "zero": {_b(st.zero)}, "data": {_b(st.data)}'
        )
        if st.offset is not None:
            text += f', "offset": {st.offset}'
        lines.append(text + "}")
    return "[" + ",\n".join(lines) + "]\n"


def _b(v: bool) -> str:
    return "true" if v else "false"


def _hex(v: int) -> str:
    return f"{v:#x}" if v else "0"


def _human_lines(runs: list[Status], names: dict[str, str]) -> Iterator[str]:
    yield f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n"
    for st in runs:
        if st.data and st.offset is None:
            raise MapError("File contains external, encrypted or compressed clusters.")
        if st.data and not st.zero and st.offset is not None:
            name = names.get(st.filename or "", st.filename or "")
            yield f"{_hex(st.start):<16}{_hex(st.length):<16}{_hex(st.offset):<16}{name}\n"


def map_text(
    runs: list[Status], *, output: str = "human", start: int = 0, names: dict[str, str]
) -> Iterator[str]:
    """The text of ``qemu-img map`` for ``runs``, piece by piece (so that a human
    listing prints its rows before a :class:`MapError`)."""
    if output == "json":
        yield _json_lines(runs, start)
    else:
        yield from _human_lines(runs, names)


def map_image_sync(img: Layer, *, start: int = 0, max_length: int | None = None) -> list[Status]:
    """The runs ``qemu-img map --start-offset --max-length`` reports."""
    off, n = _span(img, start, max_length)
    return block_status(img, off, n) if off < img.size else []


async def map_image(img: Layer, *, start: int = 0, max_length: int | None = None) -> list[Status]:
    """:func:`map_image_sync` for a coroutine."""
    off, n = _span(img, start, max_length)
    return await block_status_async(img, off, n) if off < img.size else []
