"""``qcow2aio create``: ``qemu-img create -f qcow2`` with the same options and output.

Errors come in qemu-img's order and words: argument errors first (an
``--object`` as soon as it is read), then, prefixed with the image's name,
``bdrv_img_create``'s (option syntax, backing file; then the Formatting line),
then the qcow2 driver's: the ``encrypt.*`` options as QEMU's QAPI visitor
checks them (:func:`encryption_kwargs`), the image options, and last the
secret, which QEMU looks up only when it sets the encryption up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..backing import probe_format, resolve_name
from ..create import backing_size, create
from ..errors import Qcow2Error, Qcow2FormatError, Qcow2PassphraseError, Qcow2UnsupportedError
from .options import (
    HELP,
    OBJECT,
    CommandLine,
    CommandSpec,
    CreateOpts,
    UsageError,
    cvtnum,
    opt_int,
    opt_str,
    split_options,
    usage_error,
)
from .qapi import first_unexpected, visit_order
from .secrets import SecretError, Secrets

SPEC = CommandSpec("create", ":F:b:f:ho:qu", (HELP, OBJECT))
_KEY_SECRET_REQUIRED = "Parameter 'encrypt.key-secret' is required for cipher"
# QAPI enums of QCryptoBlockCreateOptionsLUKS's members (QEMU 7.2), in the order the
# visitor checks them.
_LUKS_ENUMS: dict[str, tuple[str, ...]] = {
    "cipher-alg": (
        "aes-128",
        "aes-192",
        "aes-256",
        "des",
        "3des",
        "cast5-128",
        "serpent-128",
        "serpent-192",
        "serpent-256",
        "twofish-128",
        "twofish-192",
        "twofish-256",
    ),
    "cipher-mode": ("ecb", "cbc", "xts", "ctr"),
    "ivgen-alg": ("plain", "plain64", "essiv"),
    "ivgen-hash-alg": ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160"),
    "hash-alg": ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160"),
}


def cmd_create(argv: Sequence[str]) -> int:
    """``create [-q] [--object OBJ] [-f qcow2] [-b BACKING [-F FMT]] [-o OPTS] FILE [SIZE]``."""
    p = CommandLine(SPEC, argv).parse()
    fmt = p.values.get("f", "raw")
    options = p.lists.get("o", [])
    backing, backing_fmt = p.values.get("b"), p.values.get("F")
    quiet, unsafe, secrets, positional = "q" in p.flags, "u" in p.flags, p.secrets, p.files
    if not positional:
        raise usage_error("Expecting image file name")
    filename = positional[0]
    size: int | None = None
    if len(positional) >= 2:
        size = cvtnum("image size", positional[1])
    if len(positional) > 2:
        raise usage_error(f"Unexpected argument: {positional[2]}")
    if fmt != "qcow2":
        raise Qcow2UnsupportedError(f"Unsupported format: -f {fmt} (only qcow2 is supported)")

    try:
        _img_create(filename, fmt, size, options, backing, backing_fmt, quiet, secrets, unsafe)
    except (Qcow2Error, UsageError) as exc:
        # bdrv_img_create's errors: qemu-img prefixes them with the image's name.
        raise UsageError(f"{filename}: {exc}") from None
    return 0


def _img_create(
    filename: str,
    fmt: str,
    size: int | None,
    options: list[str],
    backing: str | None,
    backing_fmt: str | None,
    quiet: bool,
    secrets: Secrets,
    unsafe: bool = False,
) -> None:
    """``bdrv_img_create``: options, backing file, the Formatting line, then the driver.

    ``unsafe`` (``-u``) leaves the backing file unopened: no probe of its format or
    size, so both ``-F`` and the size are then required."""
    opts = CreateOpts()
    if options:
        for name, value in split_options(",".join(options)):
            opts.set(name, value)
    if opts.get("size") is not None and size is not None:
        raise UsageError("The image size must be specified only once")
    if size is not None:
        opts.raw["size"] = str(size)
        opts.value["size"] = size
    if backing is not None:
        opts.set("backing_file", backing)
    if backing_fmt is not None:
        opts.set("backing_fmt", backing_fmt)

    bfile = opt_str(opts, "backing_file")
    bfmt = opt_str(opts, "backing_fmt")
    image_size = opts.get("size")
    if bfile is not None:
        # bdrv_img_create checks and opens the backing file before printing anything.
        if bfile == filename:
            raise Qcow2FormatError(
                "Error: Trying to create an image with the same filename as the backing file"
            )
        if bfile == "":
            raise Qcow2FormatError("Expected backing file name, got empty string")
        if bfmt is None:
            if unsafe:
                raise Qcow2FormatError("Backing file specified without backing format")
            detected = probe_format(resolve_name(bfile, filename))
            raise Qcow2FormatError(
                f"Backing file specified without backing format (detected format of {detected})"
            )
        probed = None if unsafe else backing_size(filename, bfile, bfmt)
        if image_size is None and probed is not None:
            opts.raw["size"] = str(probed)
            opts.value["size"] = probed
            image_size = probed
    if not isinstance(image_size, int):
        raise UsageError("Image creation needs a size parameter")

    if not quiet:
        print(opts.formatting_line(filename, fmt), flush=True)

    encryption = qapi_visit(opts)
    passphrase, secret_error = _passphrase(opts, secrets)
    if encryption:
        encryption["passphrase"] = passphrase
    try:
        _create(opts, filename, image_size, bfile, bfmt, encryption)
    except Qcow2PassphraseError:
        # Raised (before anything is written) when the secret is missing, after every
        # other check: the place qemu-img looks the secret up and reports on it.
        raise UsageError(secret_error or _KEY_SECRET_REQUIRED) from None


def _create(
    opts: CreateOpts,
    filename: str,
    image_size: int,
    bfile: str | None,
    bfmt: str | None,
    encryption: dict[str, Any],
) -> None:
    """``qcow2aio.create`` with the parsed options."""
    create(
        filename,
        image_size,
        backing_file=bfile,
        backing_fmt=bfmt,
        **create_kwargs(opts),
        **encryption,
    )


def create_kwargs(opts: CreateOpts) -> dict[str, Any]:
    """The :func:`qcow2aio.create` keywords of parsed ``-o`` options (but the backing
    file and encryption, which need the checks of :func:`_img_create`)."""
    return dict(
        compat=opt_str(opts, "compat") or "1.1",
        cluster_size=opt_int(opts, "cluster_size", 65536),
        refcount_bits=opt_int(opts, "refcount_bits", 16),
        lazy_refcounts=bool(opts.get("lazy_refcounts")),
        compression_type=opt_str(opts, "compression_type") or "zlib",
        extended_l2=bool(opts.get("extended_l2")),
        data_file=opt_str(opts, "data_file"),
        data_file_raw=bool(opts.get("data_file_raw")),
        preallocation=opt_str(opts, "preallocation") or "off",
    )


def qapi_visit(opts: CreateOpts) -> dict[str, Any]:
    """The checks of QEMU's QAPI visit of ``BlockdevCreateOptionsQcow2``, in schema order.

    They come before the qcow2 driver's own checks (those of
    :func:`qcow2aio.create`): the ``version`` enum, the ``encrypt`` options, the
    ``preallocation`` and ``compression-type`` enums. Returns the encryption
    keywords of :func:`qcow2aio.create` (see :func:`encryption_kwargs`).
    """
    compat = opts.raw.get("compat")
    if compat is not None and compat not in ("0.10", "1.1", "v2", "v3"):
        raise UsageError(f"Parameter 'version' does not accept value '{compat}'")
    kwargs = encryption_kwargs(opts)
    for option, member, allowed in (
        ("preallocation", "preallocation", ("off", "metadata", "falloc", "full")),
        ("compression_type", "compression-type", ("zlib", "zstd")),
    ):
        value = opts.raw.get(option)
        if value is not None and value not in allowed:
            raise UsageError(f"Parameter '{member}' does not accept value '{value}'")
    return kwargs


def encryption_kwargs(opts: CreateOpts) -> dict[str, Any]:
    """The ``encrypt_*`` keywords of :func:`qcow2aio.create` for ``-o`` options.

    Follows ``qcow2_co_create_opts``: the legacy ``encryption`` option is an
    alias of ``encrypt.format`` (literally ``on`` means the AES format, ``off``
    nothing; any other boolean spelling is kept as a format name and refused),
    ``aes`` is QEMU's ``qcow`` format, and the QAPI visitor then wants a format
    for any ``encrypt.*`` option, accepts only ``key-secret`` for AES and checks
    LUKS's enums in schema order.
    """
    legacy = opts.raw.get("encryption")
    if legacy == "on":
        legacy = "qcow"
    elif legacy == "off":
        legacy = None
    fmt = opts.raw.get("encrypt.format")
    if legacy is not None and fmt is not None:
        raise UsageError(
            "'encrypt.format' and its alias 'encryption' can't be used at the same time"
        )
    fmt = "qcow" if fmt == "aes" else fmt if fmt is not None else legacy
    members = [k for k in opts.raw if k.startswith("encrypt.") and k != "encrypt.format"]
    if fmt is None:
        if members:
            raise UsageError("Parameter 'encrypt.format' is missing")
        return {}
    if fmt not in ("qcow", "luks"):
        raise UsageError(f"Parameter 'format' does not accept value '{fmt}'")
    if fmt == "qcow":
        _refuse_unexpected(opts, legacy is not None)
        return {"encrypt_format": "aes"}
    kwargs: dict[str, Any] = {"encrypt_format": "luks"}
    for name, allowed in _LUKS_ENUMS.items():
        value = opts.raw.get("encrypt." + name)
        if value is None:
            continue
        if value not in allowed:
            raise UsageError(f"Parameter '{name}' does not accept value '{value}'")
        kwargs["encrypt_" + name.replace("-", "_")] = value
    iter_time = opts.get("encrypt.iter-time")
    if isinstance(iter_time, int):
        kwargs["encrypt_iter_time"] = iter_time
    return kwargs


def _refuse_unexpected(opts: CreateOpts, alias: bool) -> None:
    """AES takes no ``encrypt.*`` but ``key-secret``: name the one QEMU names.

    The flat options QDict (``encrypt.format`` added last when it comes from the
    ``encryption`` alias), crumpled twice into the ``encrypt`` dict, then the
    visitor's hash table less the members it visited.
    """
    flat = [k for k in opts.raw if k.startswith("encrypt.")]
    if alias:
        flat.append("encrypt.format")
    members = visit_order((k.removeprefix("encrypt.") for k in visit_order(flat, 1)), 2)
    unexpected = first_unexpected(members, [m for m in ("format", "key-secret") if m in members])
    if unexpected is not None:
        raise UsageError(f"Parameter 'encrypt.{unexpected}' is unexpected")


def _passphrase(opts: CreateOpts, secrets: Secrets) -> tuple[bytes | None, str | None]:
    """The passphrase ``encrypt.key-secret`` names, or why there is none.

    The error is not raised here: qemu-img reports it only after the image
    options passed their checks, so it waits for :func:`qcow2aio.create` to ask.
    """
    secret_id = opts.raw.get("encrypt.key-secret")
    if secret_id is None:
        return None, None
    try:
        return secrets.passphrase(secret_id), None
    except SecretError as exc:
        return None, str(exc)
