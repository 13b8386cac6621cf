"""``qcow2aio serve``: the NBD export with qemu-nbd's options and lifetime.

Foreground only (qemu-nbd's ``--fork`` is not offered); silent on success. Without
``-t`` it exits 0 once the last client that finished the handshake has left; with
``-t`` it serves until SIGTERM or SIGINT, which drain the requests in flight, flush
and close the image, and exit 0. Startup problems exit 1 with a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from ..backing import RawImage, probe_format
from ..errors import Qcow2Error
from ..image import Image
from ..nbd.server import DEFAULT_PORT, Disk, Export, serve
from ..tools.raw import RawTarget
from .imageopts import could_not_open, image_spec
from .options import UsageError, take_value
from .secrets import Secrets, parse_keyval
from .unlock import chain_passphrases, open_chain

USAGE = (
    "serve [-f qcow2|raw] [-r] [-k SOCKET | -b ADDR -p PORT] [-x NAME] [-e N] [-t] [-A] "
    "[-B BITMAP]... [-D DESCRIPTION] [--object OBJECTDEF] [--image-opts] [--tls-creds ID] "
    "[--pid-file FILE] [--discard=ignore|unmap] FILE"
)

_TAKES_VALUE = {
    "-f": "fmt",
    "--format": "fmt",
    "-k": "socket",
    "--socket": "socket",
    "-b": "bind",
    "--bind": "bind",
    "-p": "port",
    "--port": "port",
    "-x": "name",
    "--export-name": "name",
    "-e": "shared",
    "--shared": "shared",
    "-D": "description",
    "--description": "description",
    "-B": "bitmap",
    "--bitmap": "bitmap",
    "--tls-creds": "tls",
    "--pid-file": "pid_file",
    "--object": "object",
    "--discard": "discard",
}
# qemu-nbd's --discard values (bdrv_parse_discard_flags); "ignore" is its default.
_DISCARD_MODES = {"ignore": "ignore", "off": "ignore", "unmap": "unmap", "on": "unmap"}
_SWITCHES = {
    "-r": "read_only",
    "--read-only": "read_only",
    "-t": "persistent",
    "--persistent": "persistent",
    "-A": "allocation_depth",
    "--allocation-depth": "allocation_depth",
    "--image-opts": "image_opts",
}


def _tls_context(props: dict[str, str]) -> ssl.SSLContext:
    """An x509 server context laid out as QEMU's ``tls-creds-x509`` (``dir`` holding
    ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``); the client's
    certificate is verified unless ``verify-peer=off``, as QEMU does."""
    if props.get("endpoint", "client") != "server":
        raise UsageError("TLS credentials must be created with endpoint=server")
    folder = props.get("dir")
    if folder is None:
        raise UsageError("tls-creds-x509: Parameter 'dir' is missing")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(
            os.path.join(folder, "server-cert.pem"), os.path.join(folder, "server-key.pem")
        )
        ctx.load_verify_locations(os.path.join(folder, "ca-cert.pem"))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"Unable to load TLS credentials from {folder!r}: {exc}") from None
    verify = props.get("verify-peer", "on") not in ("off", "no", "false")
    ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    return ctx


def cmd_serve(argv: Sequence[str]) -> int:
    """Parse qemu-nbd's options, open the image, serve it; qemu-nbd's exit codes."""
    opts: dict[str, str] = {}
    flags: set[str] = set()
    secrets = Secrets()
    tls_objects: dict[str, dict[str, str]] = {}
    files: list[str] = []
    bitmaps: list[str] = []  # -B may repeat
    i = 0
    while i < len(argv):
        arg = argv[i]
        key = arg.split("=", 1)[0] if arg.startswith("--") else arg[:2]
        if key in _TAKES_VALUE:
            value, i = take_value(argv, i, key)
            if key == "--object":
                props = parse_keyval(value, "qom-type")
                if props.get("qom-type") == "tls-creds-x509":
                    obj_id = props.get("id")
                    if not isinstance(obj_id, str):
                        raise UsageError("Parameter 'id' is missing")
                    tls_objects[obj_id] = {k: v for k, v in props.items() if isinstance(v, str)}
                else:
                    secrets.add_object(value)
            elif key in ("-B", "--bitmap"):
                bitmaps.append(value)
            else:
                opts[_TAKES_VALUE[key]] = value
        elif arg in _SWITCHES:
            flags.add(_SWITCHES[arg])
            i += 1
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"invalid option -- '{arg.lstrip('-')}'; usage: {USAGE}")
        else:
            files.append(arg)
            i += 1
    if len(files) != 1:
        raise UsageError(f"Expected exactly one image file name; usage: {USAGE}")
    if "socket" in opts and ("bind" in opts or "port" in opts):
        raise UsageError("-k and -b/-p are mutually exclusive")
    try:
        shared = int(opts.get("shared", "1"))
    except ValueError:
        shared = -1
    if shared < 0:
        raise UsageError(f"Invalid shared device number '{opts['shared']}'")
    port = DEFAULT_PORT
    if "port" in opts:
        try:
            port = int(opts["port"])
        except ValueError:
            port = -1
        if not 0 <= port <= 65535:
            raise UsageError(f"Invalid port number '{opts['port']}'")
    tls: ssl.SSLContext | None = None
    if "tls" in opts:
        creds = tls_objects.get(opts["tls"])
        if creds is None:
            raise UsageError(f"No TLS credentials with id '{opts['tls']}'")
        tls = _tls_context(creds)
    discard = _DISCARD_MODES.get(opts.get("discard", "ignore"))
    if discard is None:
        raise UsageError(f"Invalid discard mode `{opts['discard']}'")
    fmt = opts.get("fmt")
    if fmt not in (None, "qcow2", "raw"):
        raise UsageError(f"Unknown driver '{fmt}'; only qcow2 and raw are served")
    spec = image_spec(files[0], fmt, "image_opts" in flags, backing_allowed=True)
    read_only = "read_only" in flags
    kind = spec.fmt
    if kind is None:
        with could_not_open(spec.name):
            kind = probe_format(spec.path)
        if kind == "raw":  # qemu-nbd serves a probed raw file, with this warning
            sys.stderr.write(
                f"WARNING: Image format was not specified for '{spec.name}' and probing "
                "guessed raw.\n         Automatically detecting the format is dangerous "
                "for raw images, write operations on block 0 will be restricted.\n"
                "         Specify the 'raw' format explicitly to remove the restrictions.\n"
            )
    img: Disk
    if kind == "raw":
        with could_not_open(spec.name):
            img = RawImage(spec.path) if read_only else RawTarget(spec.path, discard=discard)
        if isinstance(img, RawTarget):
            img.probed = spec.fmt is None
    else:
        with could_not_open(spec.name):
            open_chain(spec, secrets)
        passphrase, below = chain_passphrases(spec, secrets)
        with could_not_open(spec.name):
            img = Image(
                spec.path,
                "r" if read_only else "r+",
                passphrase=passphrase,
                backing_passphrase=below or None,
                discard=discard,
            )
    try:
        export = Export(
            img,
            name=opts.get("name", ""),
            description=opts.get("description", ""),
            read_only=read_only,
            multi_conn=shared != 1,
            allocation_depth="allocation_depth" in flags,
            # qemu-nbd lists the contexts of repeated -B last one first.
            bitmaps=bitmaps[::-1],
        )
        return _event_loop_runner()(
            _run(
                export,
                socket_path=opts.get("socket"),
                host=opts.get("bind", "0.0.0.0"),
                port=port,
                max_clients=shared or None,
                persistent="persistent" in flags,
                tls=tls,
                pid_file=opts.get("pid_file"),
            )
        )
    finally:
        img.close()


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """``asyncio.run``, on uvloop when it is installed (the ``nbd`` extra: its event
    loop and sockets cut the per-request cost; see docs/nbd.md) unless
    ``QCOW2AIO_NBD_LOOP=asyncio`` asks for the standard loop."""
    if os.environ.get("QCOW2AIO_NBD_LOOP", "").strip() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return lambda coro: uvloop.run(coro)
    return asyncio.run


async def _run(
    export: Export,
    *,
    socket_path: str | None,
    host: str,
    port: int,
    max_clients: int | None,
    persistent: bool,
    tls: ssl.SSLContext | None,
    pid_file: str | None,
) -> int:
    try:
        if socket_path is not None:
            server = await serve(
                export, unix_path=socket_path, max_clients=max_clients, persistent=persistent,
                tls=tls,
            )  # fmt: skip
        else:
            server = await serve(
                export, host=host, port=port, max_clients=max_clients, persistent=persistent,
                tls=tls,
            )  # fmt: skip
    except OSError as exc:
        where = socket_path if socket_path is not None else f"{host}:{port}"
        raise Qcow2Error(f"Failed to listen on {where}: {exc.strerror or exc}") from None
    if pid_file is not None:
        with open(pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(stop.wait())]
    if not persistent:
        waiters.append(asyncio.ensure_future(server.wait_idle()))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await server.close()
        await export.image.aclose()
        if socket_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(socket_path)
        if pid_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(pid_file)
    sys.stdout.flush()
    return 0
