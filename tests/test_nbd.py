"""``qcow2aio serve`` against qemu-nbd 7.2, with stock clients as the judges.

The same image is served by both (``-t``, Unix sockets) and asked the same things by
``nbdinfo`` (capabilities, ``--map``, ``--map=qemu:allocation-depth``), ``qemu-img``
and ``qemu-io`` (reads, writes over NBD), ``nbdcopy``; the answers must be the same.
Hostile clients (tests/nbdclient.py) get the protocol's errors, and the server keeps
serving. Every server is stopped with SIGTERM and must exit 0 leaving an image that
``qemu-img check`` accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Qemu
from nbdclient import Client, Closed, chunk_error, meta_request

import qcow2aio
from qcow2aio.nbd import Export, serve
from qcow2aio.nbd import protocol as P

MiB = 1 << 20
START_TIMEOUT = 60.0


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: `make test` installs qemu-utils and libnbd-bin")
    return path


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short folder for Unix sockets (their paths are limited to ~107 bytes)."""
    d = tempfile.mkdtemp(prefix="nbd", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _wait_socket(path: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                s.close()
                return
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"server exited {proc.returncode} before listening: {err}")
        time.sleep(0.05)
    raise AssertionError(f"server did not listen on {path} within {START_TIMEOUT} s")


@contextlib.contextmanager
def server(kind: str, image: Path, sock: str, *args: str) -> Iterator[str]:
    """Serve ``image`` (ours or qemu-nbd, same options, ``-t``); yields the socket.
    SIGTERM at the end; both must exit 0."""
    if kind == "ours":
        argv = [sys.executable, "-m", "qcow2aio", "serve"]
    else:
        argv = [_tool("qemu-nbd")] + ([] if "-f" in args else ["-f", "qcow2"])
    argv += ["-t", "-k", sock, *args, str(image)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_socket(sock, proc)
        yield sock
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{kind} server did not stop on SIGTERM") from None
        assert proc.returncode == 0, (kind, proc.returncode, err.decode())
        if kind == "ours":
            assert out == b"", out


def uri(sock: str, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def _chain(qemu: Qemu, d: Path) -> Path:
    """base (4M) <- top (6M): data, zero, compressed, unallocated, past the base's end."""
    base, top = d / "base.qcow2", d / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", base, "4M")
    qemu.io(base, "write -P 1 0 64k", "write -z 128k 64k", "write -c -P 3 256k 64k")
    qemu.img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "6M")
    qemu.io(top, "write -P 2 32k 64k", "write -z 1M 64k", "write -P 4 5M 4k")
    return top


def _nbdinfo(*args: str) -> str:
    proc = subprocess.run([_tool("nbdinfo"), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _info_json(sock: str, name: str) -> dict[str, object]:
    info = json.loads(_nbdinfo("--json", uri(sock, name)))
    for exp in info["exports"]:
        exp.pop("uri", None)
    return dict(info)


@pytest.mark.parametrize(
    "args",
    [
        ["-x", "exp", "-A", "-D", "a disk"],
        ["-x", "exp", "-r", "-e", "3"],
        ["-e", "2"],
    ],
    ids=["writable-A", "readonly-e3", "noname-e2"],
)
def test_capabilities_and_maps_match_qemu_nbd(
    qemu: Qemu, tmp_path: Path, sockdir: str, args: list[str]
) -> None:
    top = _chain(qemu, tmp_path)
    name = "exp" if "-x" in args else ""
    results = {}
    for kind in ("qemu", "ours"):
        with server(kind, top, f"{sockdir}/{kind}.sock", *args) as sock:
            got = {
                "info": _info_json(sock, name),
                "map": _nbdinfo("--map", uri(sock, name)),
                "list": _nbdinfo("--list", "--json", uri(sock, name)).replace(sock, "S"),
            }
            if "-A" in args:
                got["depth"] = _nbdinfo("--map=qemu:allocation-depth", uri(sock, name))
            got["raw"] = qemu.img("convert", "-f", "raw", "-O", "raw", uri(sock, name),
                                  tmp_path / f"{kind}.raw").stdout  # fmt: skip
            results[kind] = got
    assert results["ours"] == results["qemu"]
    assert (tmp_path / "ours.raw").read_bytes() == qemu.convert_raw(top)
    assert qemu.check(top)[0] == 0


@pytest.mark.parametrize("mode", [[], ["--discard=unmap"]])
def test_writes_over_nbd_land_byte_for_byte(
    qemu: Qemu, tmp_path: Path, sockdir: str, mode: list[str]
) -> None:
    """The same qemu-io writes through our export and through qemu-nbd's export of
    a copy (both with qemu-nbd's default --discard=ignore, and both with unmap):
    equal content and allocation, clean check; nbdcopy reads it back the same."""
    top = _chain(qemu, tmp_path)
    twin = tmp_path / "twin.qcow2"
    shutil.copy(top, twin)
    shutil.copy(tmp_path / "base.qcow2", tmp_path / "base.qcow2.keep")
    cmds = [
        "write -P 9 0 100k",
        "write -P 8 3000 5000",
        "write -z 200k 300k",
        "write -z -u 1M 128k",
        "discard 64k 64k",
        "write -P 7 6143k 1k",
        "flush",
        "aio_write -P 6 2M 64k",
        "aio_write -P 5 2100k 8k",
        "aio_flush",
    ]
    with server("ours", top, f"{sockdir}/o.sock", "-x", "d", "-e", "4", *mode) as sock:
        qemu.io(uri(sock, "d"), *cmds, fmt="raw")
        out = tmp_path / "copy.raw"
        subprocess.run([_tool("nbdcopy"), uri(sock, "d"), str(out)], check=True, timeout=120)
    with server("qemu", twin, f"{sockdir}/q.sock", "-x", "d", "-e", "4", *mode) as sock:
        qemu.io(uri(sock, "d"), *cmds, fmt="raw")
    assert qemu.check(top)[0] == 0
    assert qemu.img("compare", top, twin).returncode == 0
    assert out.read_bytes() == qemu.convert_raw(twin)
    # The same layout (host offsets aside: concurrent writes allocate in any order).
    maps = [
        [{k: v for k, v in r.items() if k != "offset"} for r in json.loads(m)]
        for m in (qemu.img("map", "--output=json", p).stdout for p in (top, twin))
    ]
    assert maps[0] == maps[1]


def test_lifetime_without_t_and_sigterm(qemu: Qemu, tmp_path: Path, sockdir: str) -> None:
    """Without -t: a list-and-abort does not count, the first client that finished the
    handshake does; the server exits 0 after it leaves, flushed."""
    img = tmp_path / "a.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, "1M")
    sock = f"{sockdir}/l.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qcow2aio", "serve", "-k", sock, "-x", "a", str(img)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_socket(sock, proc)
        _nbdinfo("--list", uri(sock))
        time.sleep(0.3)
        assert proc.poll() is None  # a list does not end it
        qemu.io(uri(sock, "a"), "write -P 3 0 64k", fmt="raw")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    qemu.io(img, "read -P 3 0 64k")
    assert qemu.check(img)[0] == 0


# ------------------------------------------------------------ hostile clients
@pytest.fixture
def hostile(qemu: Qemu, tmp_path: Path, sockdir: str) -> Iterator[tuple[str, Path]]:
    img = tmp_path / "h.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, "1M")
    qemu.io(img, "write -P 5 0 64k")
    with server("ours", img, f"{sockdir}/h.sock", "-x", "h", "-e", "0") as sock:
        yield sock, img
    qemu.io(img, "read -P 5 0 64k")
    assert qemu.check(img)[0] == 0


def test_bad_handshakes_lose_only_their_connection(hostile: tuple[str, Path]) -> None:
    sock, _ = hostile
    c = Client(sock)
    c.greet(flags=1 << 7)  # unknown client flag: dropped
    assert c.is_closed()
    c = Client(sock)
    c.greet()
    c.send(struct.pack(">QII", 0xDEAD, P.OPT_GO, 0))  # bad option magic: dropped
    assert c.is_closed()
    c = Client(sock)
    c.greet()
    c.option(99, b"x" * 10)
    assert c.replies() == [(P.REP_ERR_UNSUP, b"")]
    c.option(P.OPT_GO, b"\x00\x00\xff\xff")  # name length past the data
    assert c.replies()[-1][0] == P.REP_ERR_INVALID
    c.option(P.OPT_GO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
    assert c.replies()[-1][0] == P.REP_ERR_UNKNOWN
    c.option(P.OPT_SET_META_CONTEXT, meta_request("h", ("base:allocation",)))
    assert c.replies()[-1][0] == P.REP_ERR_INVALID  # structured replies not negotiated
    c.send(struct.pack(">QII", P.IHAVEOPT, P.OPT_LIST, 1 << 20) + bytes(1 << 20))
    assert c.replies()[-1][0] == P.REP_ERR_TOO_BIG  # drained, never held
    c.option(P.OPT_LIST_META_CONTEXT, meta_request("h", ()))
    listed = c.replies()
    assert [k for k, _ in listed] == [P.REP_META_CONTEXT, P.REP_ACK]
    c.option(P.OPT_ABORT)
    assert c.replies() == [(P.REP_ACK, b"")]
    assert c.is_closed()
    c = Client(sock)
    c.greet()
    c.send(struct.pack(">QII", P.IHAVEOPT, P.OPT_LIST, 1 << 30))  # over 32 MiB: dropped
    assert c.is_closed()


def test_bad_requests_get_einval_and_the_connection_goes_on(hostile: tuple[str, Path]) -> None:
    sock, _ = hostile
    c = Client(sock)
    c.greet()
    flags = c.go("h", contexts=("base:allocation",))
    assert flags & P.TFLAG_SEND_DF and not flags & P.TFLAG_READ_ONLY
    c.request(P.CMD_READ, MiB - 10, 20, cookie=7)  # past the end
    kind, cookie, payload = c.chunks()[-1]
    assert (kind, cookie, chunk_error(payload)) == (P.REPLY_TYPE_ERROR, 7, P.EINVAL)
    c.request(P.CMD_READ, 0, 64 * MiB, cookie=8)  # too long
    assert chunk_error(c.chunks()[-1][2]) == P.EINVAL
    c.request(42, 0, 1, cookie=9)  # unknown command
    assert c.simple()[:2] == (P.EINVAL, 9)
    c.request(P.CMD_WRITE, 0, 4, flags=P.CMD_FLAG_REQ_ONE, cookie=10, payload=b"abcd")
    assert c.simple()[:2] == (P.EINVAL, 10)  # flag not allowed on a write
    c.request(P.CMD_WRITE, MiB - 2, 4, cookie=11, payload=b"abcd")  # payload read, refused
    assert c.simple()[:2] == (P.EINVAL, 11)
    c.request(P.CMD_WRITE_ZEROES, 100, 10, flags=P.CMD_FLAG_FAST_ZERO, cookie=12)
    assert c.simple()[:2] == (P.ENOTSUP, 12)
    c.request(P.CMD_BLOCK_STATUS, 0, MiB, flags=P.CMD_FLAG_REQ_ONE, cookie=13)
    (kind, cookie, payload), = c.chunks()  # fmt: skip
    assert kind == P.REPLY_TYPE_BLOCK_STATUS and cookie == 13
    assert struct.unpack(">III", payload) == (0, 65536, 0)
    c.request(P.CMD_READ, 0, 4, cookie=14)
    (kind, _, payload), = c.chunks()  # fmt: skip
    assert kind == P.REPLY_TYPE_OFFSET_DATA and payload == struct.pack(">Q", 0) + b"\x05" * 4
    c.request(P.CMD_WRITE, 0, 64 * MiB, cookie=15)  # over 32 MiB: EINVAL, dropped
    assert c.simple()[:2] == (P.EINVAL, 15)
    assert c.is_closed()
    d = Client(sock)  # the server still serves everyone else
    d.greet()
    assert d.go("h", structured=False) & P.TFLAG_HAS_FLAGS
    d.request(P.CMD_BLOCK_STATUS, 0, 512, cookie=1)
    assert d.simple()[:2] == (P.EINVAL, 1)  # no context without structured replies
    d.request(P.CMD_READ, 0, 8, cookie=2)
    assert d.simple(8) == (0, 2, b"\x05" * 8)
    d.request(P.CMD_DISC)
    assert d.is_closed()


def test_seeded_garbage_never_crashes_the_server(hostile: tuple[str, Path]) -> None:
    """Random bytes at every stage (greeting, options, requests), then a well-behaved
    client: it is served. The full fuzz run is in the stress set (docs/reliability.md)."""
    sock, _ = hostile
    rng = random.Random(5)
    count = 400 if os.environ.get("QCOW2AIO_STRESS") else 60
    for i in range(count):
        c = Client(sock, timeout=5)
        try:
            stage = i % 3
            c.greet(flags=rng.choice([0, 1, 3]))
            if stage >= 1:
                opt = rng.choice([P.OPT_GO, P.OPT_INFO, P.OPT_LIST_META_CONTEXT, 77])
                body = rng.randbytes(rng.randrange(0, 64))
                c.send(struct.pack(">QII", P.IHAVEOPT, opt, len(body)) + body)
            if stage == 2:
                c.option(P.OPT_ABORT)
            c.send(rng.randbytes(rng.randrange(1, 200)))
        except (Closed, OSError):
            pass
        finally:
            c.close()
    ok = Client(sock)
    ok.greet()
    ok.go("h")
    ok.request(P.CMD_READ, 0, 16, cookie=3)
    assert ok.chunks()[-1][2][8:] == b"\x05" * 16


def test_python_api_many_clients_one_image(qemu: Qemu, tmp_path: Path, sockdir: str) -> None:
    """serve() in-process with two exports of images the service also uses; several
    qemu-io clients write disjoint ranges at once; a multi-conn flush covers them."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for p in (a, b):
        qemu.img("create", "-q", "-f", "qcow2", p, "4M")
    sock = f"{sockdir}/api.sock"

    async def main() -> None:
        img_a = qcow2aio.open(a, "r+")
        img_b = qcow2aio.open(b, "r")
        exports = [Export(img_a, name="a", multi_conn=True), Export(img_b, name="b")]
        async with await serve(exports, unix_path=sock):
            procs = [
                await asyncio.create_subprocess_exec(
                    shutil.which("qemu-io") or "qemu-io",
                    "-f",
                    "raw",
                    "-c",
                    f"write -P {i + 1} {i * 512}k 512k",
                    uri(sock, "a"),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                for i in range(6)
            ]
            await img_a.write(3584 * 1024, b"\x42" * 512 * 1024)  # the service's own write
            for p in procs:
                out, err = await p.communicate()
                assert p.returncode == 0, err
                assert b"error" not in out.lower(), out
            info = await asyncio.to_thread(_info_json, sock, "b")
            assert info["exports"][0]["is_read_only"] is True  # type: ignore[index]
        await img_a.aclose()
        await img_b.aclose()

    asyncio.run(main())
    for i in range(6):
        qemu.io(a, f"read -P {i + 1} {i * 512}k 512k")
    qemu.io(a, "read -P 0x42 3584k 512k")
    assert qemu.check(a)[0] == 0


# ------------------------------------------------------------------ TLS and crashes
def _certtool(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        [_tool("certtool"), *args], input=stdin, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate (QEMU's dir layout) and a client certificate, made
    by certtool as QEMU's docs describe; plus a client folder without a certificate."""
    root = tmp_path_factory.mktemp("tls")
    server, client, bare = root / "server", root / "client", root / "bare"
    for d in (server, client, bare):
        d.mkdir()
    ca_key = root / "ca-key.pem"
    ca_key.write_text(_certtool("--generate-privkey"))
    templates = {
        "ca": "cn = Test CA\nca\ncert_signing_key\nexpiration_days = 3650\n",
        "server": "cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n"
        "tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 3650\n",
        "client": "cn = client\ntls_www_client\nencryption_key\nsigning_key\n"
        "expiration_days = 3650\n",
    }
    for name, text in templates.items():
        (root / f"{name}.info").write_text(text)
    ca = root / "ca-cert.pem"
    ca.write_text(
        _certtool(
            "--generate-self-signed",
            "--load-privkey",
            str(ca_key),
            "--template",
            str(root / "ca.info"),
        )
    )
    for who, folder in (("server", server), ("client", client)):
        key = folder / f"{who}-key.pem"
        key.write_text(_certtool("--generate-privkey"))
        (folder / f"{who}-cert.pem").write_text(
            _certtool(
                "--generate-certificate",
                "--load-privkey",
                str(key),
                "--load-ca-certificate",
                str(ca),
                "--load-ca-privkey",
                str(ca_key),
                "--template",
                str(root / f"{who}.info"),
            )
        )
    for folder in (server, client, bare):
        shutil.copy(ca, folder / "ca-cert.pem")
    return {"server": server, "client": client, "bare": bare}


def test_tls_like_qemu_nbd(
    qemu: Qemu, tmp_path: Path, sockdir: str, certs: dict[str, Path]
) -> None:
    """STARTTLS with x509 credentials laid out as QEMU's: the same answers as
    qemu-nbd with a client certificate; without TLS, or without a client
    certificate (verify-peer is QEMU's default), no export."""
    top = _chain(qemu, tmp_path)
    twin = tmp_path / "twin.qcow2"
    shutil.copy(top, twin)  # qemu-nbd locks its image
    creds = ["--object", f"tls-creds-x509,id=t0,endpoint=server,dir={certs['server']}",
             "--tls-creds", "t0", "-x", "exp"]  # fmt: skip
    results = {}
    for kind, image in (("qemu", twin), ("ours", top)):
        with server(kind, image, f"{sockdir}/{kind}.sock", *creds) as sock:
            tls_uri = f"nbds+unix:///exp?socket={sock}&tls-certificates={certs['client']}"
            info = json.loads(_nbdinfo("--json", tls_uri))
            for exp in info["exports"]:
                exp.pop("uri", None)
            plain = subprocess.run([_tool("nbdinfo"), uri(sock, "exp")], capture_output=True)
            bare = f"nbds+unix:///exp?socket={sock}&tls-certificates={certs['bare']}"
            no_cert = subprocess.run([_tool("nbdinfo"), bare], capture_output=True)
            results[kind] = (info, _nbdinfo("--map", tls_uri), plain.returncode,
                             no_cert.returncode)  # fmt: skip
    assert results["ours"] == results["qemu"]
    assert results["ours"][2:] == (1, 1)
    assert results["ours"][0]["TLS"] is True


def test_sigkill_under_load_keeps_flushed_writes(qemu: Qemu, tmp_path: Path, sockdir: str) -> None:
    """SIGKILL while clients write: the image passes qemu-img check (leaks allowed,
    no corruption) and every write that was flushed before is there."""
    img = tmp_path / "k.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", img, "64M")
    sock = f"{sockdir}/k.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qcow2aio", "serve", "-t", "-e", "4", "-k", sock, str(img)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    writers: list[subprocess.Popen[bytes]] = []
    try:
        _wait_socket(sock, proc)
        qemu.io(uri(sock), "write -P 7 0 4M", "flush", fmt="raw")
        for i in range(3):
            cmds: list[str] = []
            for k in range(400):
                cmds += ["-c", f"aio_write -P {i + 1} {4 + i * 20 + (k % 20)}M 64k"]
            writers.append(
                subprocess.Popen(
                    [_tool("qemu-io"), "-f", "raw", *cmds, uri(sock)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(0.5)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in writers:
            w.wait(timeout=60)
    rc, _ = qemu.check(img)
    assert rc in (0, 3), rc  # clean or leaked clusters only
    qemu.io(img, "read -P 7 0 4M")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_export_with_qemu_img_and_io(qemu: Qemu, tmp_path: Path) -> None:
    """``-b 127.0.0.1 -p PORT``: qemu-img and qemu-io over nbd://, as with qemu-nbd."""
    top = _chain(qemu, tmp_path)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qcow2aio", "serve", "-t", "-b", "127.0.0.1", "-p", str(port),
         "-x", "tcp", "--pid-file", str(tmp_path / "pid"), str(top)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (tmp_path / "pid").exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline, "no pid file"
            time.sleep(0.05)
        assert int((tmp_path / "pid").read_text()) == proc.pid
        url = f"nbd://127.0.0.1:{port}/tcp"
        info = json.loads(qemu.img("info", "--output=json", url).stdout)
        assert info["virtual-size"] == 6 * MiB
        qemu.io(url, "write -P 0x33 2M 128k", "read -P 0x33 2M 128k", fmt="raw")
        raw = tmp_path / "tcp.raw"
        qemu.img("convert", "-f", "raw", "-O", "raw", url, raw)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert not (tmp_path / "pid").exists()
    assert raw.read_bytes() == qemu.convert_raw(top)
    qemu.io(top, "read -P 0x33 2M 128k")
    assert qemu.check(top)[0] == 0
