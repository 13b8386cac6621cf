"""Which image a command names: a file name, or ``--image-opts`` options.

With ``--image-opts`` the image argument is a QemuOpts string of block-layer
options, ``driver=qcow2,file.filename=F,encrypt.key-secret=ID``: the only way
qemu-img accepts the secret of an encrypted image for ``check`` (and of its
backing files, ``backing.encrypt.key-secret=ID``). qemu-img then names the
image three ways, and so does ``qcow2aio``:

* ``Could not open '...'`` errors and check's JSON ``filename``: the option
  string exactly as given;
* info's ``image:``/``filename``: QEMU's ``bs->filename``, the file name, or a
  ``json:{...}`` pseudo-filename when an option that changes how the image
  reads (``encrypt.key-secret``) was given;
* the file actually opened: ``file.filename``.

Only the options that matter for these commands are implemented; other
options qcow2 or file-posix have are refused as unsupported, options neither
has with QEMU's own message.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..info import _quoted, qdict
from .options import UsageError, split_options

__all__ = [
    "ImageSpec",
    "LevelOptions",
    "OpenError",
    "could_not_open",
    "image_spec",
    "parse_image_opts",
    "plain_image",
]

# Runtime options QEMU 7.2's qcow2 driver and block layer accept that qcow2aio does not
# implement (refused as unsupported rather than as unknown).
_QCOW2_RUNTIME = frozenset(
    {
        "lazy-refcounts",
        "pass-discard-request",
        "pass-discard-snapshot",
        "pass-discard-other",
        "overlap-check",
        "cache-size",
        "l2-cache-size",
        "l2-cache-entry-size",
        "refcount-cache-size",
        "cache-clean-interval",
        "data-file",
        "node-name",
        "read-only",
        "auto-read-only",
        "discard",
        "detect-zeroes",
        "force-share",
        "cache",
        "backing",
    }
)
_FILE_POSIX_RUNTIME = frozenset(
    {
        "aio",
        "aio-max-batch",
        "locking",
        "pr-manager",
        "x-check-cache-dropped",
        "drop-cache",
        "discard",
        "node-name",
        "read-only",
        "auto-read-only",
        "force-share",
        "cache",
        "detect-zeroes",
    }
)


class OpenError(Exception):
    """The image cannot be opened: QEMU's message, printed as ``Could not open 'NAME': ...``."""


@dataclass(frozen=True)
class LevelOptions:
    """The ``encrypt.*`` options for one image of the chain (depth 0 is the image itself)."""

    key_secret: str | None = None
    encrypt_format: str | None = None
    # Every encrypt.* key given for this image (without "encrypt."), in the given order:
    # those other than format/key-secret are refused when the image is encrypted.
    encrypt_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageSpec:
    """One image as a command line names it (see the module docstring)."""

    name: str
    path: str
    fmt: str | None
    filename: str
    levels: tuple[LevelOptions, ...] = (LevelOptions(),)

    def level(self, depth: int) -> LevelOptions:
        """The options for the image ``depth`` steps down the backing chain."""
        return self.levels[depth] if depth < len(self.levels) else LevelOptions()


def plain_image(name: str, fmt: str | None) -> ImageSpec:
    """An image named by its file name (``-f FMT`` or probed): no options."""
    return ImageSpec(name=name, path=name, fmt=fmt, filename=name)


def image_spec(name: str, fmt: str | None, image_opts: bool, *, backing_allowed: bool) -> ImageSpec:
    """The image a command's FILE argument names (``img_open``'s two ways)."""
    if not image_opts:
        return plain_image(name, fmt)
    if fmt is not None:
        raise UsageError("--image-opts and --format are mutually exclusive")
    with could_not_open(name):
        return parse_image_opts(name, backing_allowed=backing_allowed)


@contextmanager
def could_not_open(name: str) -> Iterator[None]:
    """Report an OpenError as qemu-img does: ``Could not open 'NAME': why``."""
    try:
        yield
    except OpenError as exc:
        raise UsageError(f"Could not open '{name}': {exc}") from None


def parse_image_opts(text: str, *, backing_allowed: bool) -> ImageSpec:
    """``img_open_opts``: the QemuOpts string of ``--image-opts`` as a spec.

    ``backing_allowed`` is False for ``info``, which (like QEMU) opens images
    without their backing chain and so has no use for ``backing.*`` options.
    Raises OpenError with QEMU's message for what QEMU refuses.
    """
    opts: dict[str, str] = {}
    for i, (key, value) in enumerate(split_options(text)):
        if i == 0 and value == "on" and "=" not in text.split(",", 1)[0]:
            key, value = "file", key  # the implied option of qemu-img's "source" list
        opts[key] = value  # qemu_opts_to_qdict: the last of a repeated option wins
    driver = opts.pop("driver", None)
    file_driver = opts.pop("file.driver", None)
    path = opts.pop("file.filename", None)
    if "file" in opts:
        node = opts.pop("file")
        raise OpenError(f"Cannot find device='{node}' nor node-name='{node}'")
    if driver is None and path is None and file_driver is None:
        raise OpenError("Must specify either driver or file")
    if driver not in (None, "qcow2", "raw"):
        raise UsageError(f"--image-opts: driver '{driver}' is not supported")
    if file_driver not in (None, "file"):
        raise UsageError(f"--image-opts: file.driver '{file_driver}' is not supported")
    if path is None:
        if file_driver is None:
            raise OpenError('A block device must be specified for "file"')
        raise OpenError("The 'file' block driver requires a file name")
    file_opts = {k[5:]: k for k in opts if k.startswith("file.")}
    if file_opts:
        first = next(iter(qdict((k, None) for k in file_opts)))
        if first in _FILE_POSIX_RUNTIME:
            raise UsageError(f"--image-opts: option '{file_opts[first]}' is not supported")
        raise OpenError(f"Block protocol 'file' doesn't support the option '{first}'")
    levels = _encrypt_levels(opts, backing_allowed)
    if opts:
        first = next(iter(qdict((k, None) for k in opts)))
        head = first.split(".", 1)[0]
        if head in _QCOW2_RUNTIME and (head != "backing" or backing_allowed):
            raise UsageError(f"--image-opts: option '{first}' is not supported")
        raise OpenError(f"Block format '{driver or 'qcow2'}' does not support the option '{first}'")
    key_secret = levels[0].key_secret
    filename = path if key_secret is None else _json_filename(key_secret, path)
    return ImageSpec(name=text, path=path, fmt=driver, filename=filename, levels=levels)


def _encrypt_levels(opts: dict[str, str], backing_allowed: bool) -> tuple[LevelOptions, ...]:
    """Take ``[backing.]*encrypt.*`` out of ``opts``: the options of each depth."""
    found: dict[int, dict[str, str]] = {}
    for key in list(opts):
        prefix = ""
        depth = 0
        while key.startswith(prefix + "backing."):
            prefix += "backing."
            depth += 1
        rest = key[len(prefix) :]
        if not rest.startswith("encrypt.") or (depth and not backing_allowed):
            continue
        found.setdefault(depth, {})[rest[len("encrypt.") :]] = opts.pop(key)
    levels = []
    for depth in range(max(found, default=0) + 1):
        values = found.get(depth, {})
        levels.append(LevelOptions(values.get("key-secret"), values.get("format"), tuple(values)))
    return tuple(levels)


def _json_filename(key_secret: str, path: str) -> str:
    """``bdrv_refresh_filename``: ``json:`` and the image's strong options, compact."""
    file_node = qdict([("driver", "file"), ("filename", path)])
    return "json:" + _compact_json(
        qdict([("encrypt.key-secret", key_secret), ("driver", "qcow2"), ("file", file_node)])
    )


def _compact_json(value: object) -> str:
    """``qobject_to_json``: one line, ``", "`` and ``": "`` separators, QEMU's escapes."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_quoted(k)}: {_compact_json(v)}" for k, v in value.items()) + "}"
    return _quoted(str(value))
