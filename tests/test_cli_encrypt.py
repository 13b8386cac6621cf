"""``qcow2aio`` against ``qemu-img`` for secrets, ``--image-opts`` and encrypted images.

Every case runs the same arguments through QEMU 7.2's ``qemu-img`` and through
``qcow2aio.cli.main`` in the same folder (relative names, so both print the same
text) and wants the same exit status, stdout and stderr, the program name
``qemu-img:``/``qcow2aio:`` aside: ``--object secret,...`` parsing and its
errors, ``create -o encrypt.*`` (Formatting line, errors in QEMU's order, the
images QEMU then opens), ``info`` of AES and LUKS images (no secret needed, as in
QEMU), and ``check``, which needs the secret of every encrypted image of the
chain. The images QEMU makes are shared by the module (LUKS costs seconds);
``iter-time`` is 10 ms.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from conftest import run_tool
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qcow2aio.cli import main

PW = "pw"
SECRET = f"secret,id=s,data={PW}"
LUKS = "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10"
LUKS_OPTS = (
    LUKS + ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,"
    "encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1"
)
# The key and IV of a secret given encrypted (keyid=k,iv=...): AES-256-CBC, PKCS#7.
KEY = bytes(range(32))
IV = bytes(range(16, 32))


@dataclass(frozen=True)
class Outcome:
    """What a command did: exit status, stdout, stderr (program name normalised)."""

    rc: int
    out: str
    err: str


def _norm(text: str) -> str:
    return text.replace("qemu-img: ", "PROG: ").replace("qcow2aio: ", "PROG: ")


# QEMU 7.2's LUKS create gives up ("Unable to get accurate CPU usage") when a PBKDF2
# timing round measured 0 ms: most attempts on a loaded machine, ~30 ms each. Retried.
_PBKDF_FLAKE = "Unable to get accurate CPU usage"


def tool(argv: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """One of QEMU's tools in ``cwd``, retried while it fails with the PBKDF2 flake."""
    for _ in range(100):
        proc = run_tool(argv, cwd=cwd)
        if _PBKDF_FLAKE not in proc.stderr:
            break
    return proc


def qemu_img(argv: Sequence[str], cwd: Path) -> Outcome:
    proc = tool(["qemu-img", *argv], cwd)
    return Outcome(proc.returncode, proc.stdout, _norm(proc.stderr))


def ours(argv: Sequence[str], cwd: Path) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(list(argv))
    finally:
        os.chdir(old)
    return Outcome(rc, out.getvalue(), _norm(err.getvalue()))


def same(argv: Sequence[str], cwd: Path) -> Outcome:
    """Run both in ``cwd``; assert they agree; QEMU's outcome."""
    theirs = qemu_img(argv, cwd)
    assert ours(argv, cwd) == theirs
    return theirs


def _encrypted_secret(plain: bytes) -> str:
    """``data=`` of a secret encrypted with KEY/IV as QEMU's docs describe (base64)."""
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plain) + padder.finalize()
    enc = Cipher(algorithms.AES(KEY), modes.CBC(IV)).encryptor()
    return base64.b64encode(enc.update(padded) + enc.finalize()).decode()


def _mk(cwd: Path, *argv: str) -> None:
    proc = tool(["qemu-img", *argv], cwd)
    assert proc.returncode == 0, proc.stderr


def _build_images(d: Path) -> None:
    """QEMU-made images: n plain, l LUKS, x LUKS (cbc/essiv/sha1), a AES; p (plain) and
    t (AES) over l; secret files."""
    obj = ["--object", SECRET]
    aes = ["-o", "encrypt.format=aes,encrypt.key-secret=s"]
    _mk(d, "create", "-q", "-f", "qcow2", "n.qcow2", "1M")
    _mk(d, "create", "-q", "-f", "qcow2", *obj, "-o", LUKS, "l.qcow2", "1M")
    _mk(d, "create", "-q", "-f", "qcow2", *obj, "-o", LUKS_OPTS, "x.qcow2", "1M")
    _mk(d, "create", "-q", "-f", "qcow2", *obj, *aes, "a.qcow2", "1M")
    _mk(d, "create", "-q", "-f", "qcow2", "-b", "l.qcow2", "-F", "qcow2", "p.qcow2")
    _mk(d, "create", "-q", "-f", "qcow2", *obj, *aes, "-b", "l.qcow2", "-F", "qcow2", "t.qcow2")
    write = ["-c", "write -P 0x5a 0 192k"]
    proc = tool(["qemu-io", *obj, "--image-opts", image_opts("l.qcow2", "s"), *write], d)
    assert proc.returncode == 0, proc.stderr
    (d / "pw.txt").write_text(PW)
    (d / "pw-nl.txt").write_text(PW + "\n")
    (d / "b64.txt").write_text(base64.b64encode(PW.encode()).decode())
    (d / "key.bin").write_bytes(KEY)


@pytest.fixture(scope="module")
def imgs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of :func:`_build_images`, built once per run (LUKS creates take
    seconds of QEMU's PBKDF2 benchmark) and shared by the xdist workers under a lock.
    Tests only read these images (``check`` without ``-r``)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's directory, common to its workers
    root = base / "cli-encrypt-images"
    with open(base / "cli-encrypt-images.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not root.exists():
            building = base / "cli-encrypt-images.building"
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir()
            _build_images(building)
            building.rename(root)
    return root


@pytest.fixture(autouse=True)
def _qemu_present(qemu_tools: dict[str, str]) -> None:
    """Every test runs qemu-img: fail clearly (never skip) when it is missing."""


def image_opts(name: str, secret: str | None = None, extra: str = "") -> str:
    """``--image-opts`` text for ``name`` (and ``encrypt.key-secret``, more options)."""
    text = f"driver=qcow2,file.filename={name}"
    if secret is not None:
        text += f",encrypt.key-secret={secret}"
    return text + (f",{extra}" if extra else "")


def test_console_script_entry_point() -> None:
    """pyproject's ``qcow2aio = "qcow2aio.cli:main"`` still names the entry point."""
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "qcow2aio"]
    assert script.value == "qcow2aio.cli:main"
    assert script.load() is main


# ------------------------------------------------------------------- --object
OBJECT_ERRORS = [
    "secret,data=pw",
    "secret,id=s",
    "secret,id=s,data=pw,file=pw.txt",
    "secret,id=s,file=nonexist.txt",
    "secret,id=s,file=/",
    "secret,id=s,data=!!,format=base64",
    "secret,id=s,data=pw,format=foo",
    "secret,id=s,data=pw,bogus=1",
    "foo,id=s",
    "id=s,data=pw",
    "",
    "secret,id=1s,data=pw",
    "secret,id=,data=pw",
    "secret,id=s,data",
    "secret,id=s,=x",
    "secret,id=s,data.x=1",
    "secret,id=s,data=pw,loaded=on",
    "secret,id=s,data=pw,loaded=maybe",
    "secret,id=s,data=pw,keyid=k",
    "secret,id=s,data=pw,iv=aa,keyid=s",
    "secret,id=s,data=x,format=base64,loaded=x,keyid=x,iv=x,bogus=x",
    "secret,data=pw,sync=1,foo=2,bar=3,baz=4,q=5,id=s",  # which one QEMU names
]


@pytest.mark.parametrize("obj", OBJECT_ERRORS)
@pytest.mark.parametrize("command", ["info", "check"])
def test_object_errors(imgs: Path, command: str, obj: str) -> None:
    assert same([command, "--object", obj, "n.qcow2"], imgs).rc == 1


@pytest.mark.parametrize(
    "objs",
    [
        ["secret,id=s,data=pw", "secret,id=s,data=other"],  # duplicate id
        ["secret,id=k,data=short", "secret,id=s,data=pw,keyid=k"],  # key of 5 bytes
        ["secret,id=k,file=key.bin", "secret,id=s,data=pw,keyid=k"],  # no iv
        ["secret,id=k,file=key.bin", "secret,id=s,data=pw,keyid=k,iv=AAAA"],  # short iv
        [
            "secret,id=k,file=key.bin",
            "secret,id=s,data=abc,keyid=k,iv=" + base64.b64encode(IV).decode(),
        ],
    ],
)
def test_object_sequence_errors(imgs: Path, objs: list[str]) -> None:
    argv = ["info"]
    for obj in objs:
        argv += ["--object", obj]
    same([*argv, "n.qcow2"], imgs)


def test_object_after_file_and_equals_form(imgs: Path) -> None:
    same(["info", "--object=secret,id=s,data=pw", "n.qcow2", "--object", "secret,id=t"], imgs)
    same(["info", "--object=secret,id=s,data=a,,b,id=t", "--output=json", "n.qcow2"], imgs)


# The secret "pw" given every way QEMU takes it, and ways that give another passphrase.
IV64 = base64.b64encode(IV).decode()
SECRET_SOURCES = {
    "data": ["secret,id=s,data=pw"],
    "file": ["secret,id=s,file=pw.txt"],
    "file-newline": ["secret,id=s,file=pw-nl.txt"],  # the newline is part of it: wrong
    "base64": ["secret,id=s,data=cHc=,format=base64"],
    "base64-file": ["secret,id=s,file=b64.txt,format=base64"],
    "base64-partial": ["secret,id=s,data=cHc,format=base64"],  # GLib drops the tail: ""
    "raw": ["secret,id=s,data=pw,format=raw"],
    "not-utf8": ["secret,id=s,data=/w==,format=base64"],
    "wrong": ["secret,id=s,data=px"],
    "empty": ["secret,id=s,data="],
    "encrypted": [
        "secret,id=k,file=key.bin",
        f"secret,id=s,data={_encrypted_secret(PW.encode())},format=base64,keyid=k,iv={IV64}",
    ],
}


@pytest.mark.parametrize("source", sorted(SECRET_SOURCES))
def test_secret_sources_unlock_luks(imgs: Path, source: str) -> None:
    argv = ["check"]
    for obj in SECRET_SOURCES[source]:
        argv += ["--object", obj]
    outcome = same([*argv, "--image-opts", image_opts("l.qcow2", "s")], imgs)
    assert (outcome.rc == 0) == (
        source in ("data", "file", "base64", "base64-file", "raw", "encrypted")
    )


# -------------------------------------------------------------------- create
def _twins(tmp_path: Path) -> Iterator[Path]:
    """Two empty folders, QEMU's first, with the secret files."""
    for who in ("q", "p"):
        folder = tmp_path / who
        folder.mkdir()
        (folder / "pw.txt").write_text(PW)
        yield folder


CREATE_ERRORS = [
    "encryption=on",
    "encrypt.format=aes",
    "encrypt.format=luks",
    "encrypt.format=luks,encrypt.key-secret=t",
    "encrypt.format=aes,encrypt.key-secret=",
    "encrypt=on,encrypt.key-secret=s",
    "encryption=maybe",
    "encryption=yes,encrypt.key-secret=s",
    "encryption=on,encrypt.format=luks,encrypt.key-secret=s",
    "encryption=no,encrypt.format=aes,encrypt.key-secret=s",
    "encrypt.key-secret=s",
    "encryption=off,encrypt.cipher-alg=aes-128",
    "encrypt.format=foo,encrypt.key-secret=s",
    "encrypt.format=LUKS",
    "encrypt.format=",
    "encrypt.format=aes,encrypt.key-secret=s,encrypt.iter-time=10",
    "encryption=on,encrypt.key-secret=s,encrypt.cipher-alg=aes-128",
    "encrypt.format=qcow,encrypt.key-secret=s,encrypt.hash-alg=sha1",
    # Several unexpected: QEMU names the first of its visitor's hash table.
    "encrypt.format=aes,encrypt.hash-alg=sha1,encrypt.ivgen-hash-alg=sha1",
    "encrypt.format=aes,encrypt.iter-time=1,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain",
    "encryption=on,encrypt.hash-alg=md5,encrypt.cipher-alg=aes-128,encrypt.key-secret=s",
    "encrypt.format=luks,encrypt.key-secret=s,encrypt.cipher-alg=aes-100",
    "encrypt.format=luks,encrypt.key-secret=s,encrypt.cipher-mode=gcm",
    "encrypt.format=luks,encrypt.key-secret=s,encrypt.ivgen-alg=plain32",
    "encrypt.format=luks,encrypt.key-secret=s,encrypt.ivgen-hash-alg=sha3",
    "encrypt.format=luks,encrypt.key-secret=s,encrypt.hash-alg=md4,encrypt.cipher-mode=x",
    "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=ten",
    # The QAPI visit (version, encrypt, preallocation) before the driver's checks.
    "encrypt.format=foo,compat=2.0",
    "encrypt.format=foo,preallocation=foo,cluster_size=3000",
    "encrypt.format=luks,encrypt.key-secret=t,preallocation=foo",
    "encrypt.format=luks,compression_type=lz4",
]


@pytest.mark.parametrize("opts", CREATE_ERRORS)
def test_create_errors(tmp_path: Path, opts: str) -> None:
    argv = ["create", "-f", "qcow2", "--object", SECRET, "-o", opts, "e.qcow2", "1M"]
    q, p = _twins(tmp_path)
    theirs = qemu_img(argv, q)
    assert theirs.rc == 1
    assert ours(argv, p) == theirs
    assert not (p / "e.qcow2").exists() and not (q / "e.qcow2").exists()


@pytest.mark.parametrize(
    "objs,opts",
    [
        (["secret,id=s,data=/w==,format=base64"], "encrypt.format=luks,encrypt.key-secret=s"),
        (["secret,id=s,file=pw.txt"], "encrypt.format=aes,encrypt.key-secret=t"),
        ([], "encryption=on,encrypt.key-secret=s"),
    ],
)
def test_create_secret_errors(tmp_path: Path, objs: list[str], opts: str) -> None:
    argv = ["create", "-f", "qcow2"]
    for obj in objs:
        argv += ["--object", obj]
    argv += ["-o", opts, "e.qcow2", "1M"]
    q, p = _twins(tmp_path)
    assert ours(argv, p) == qemu_img(argv, q)


@pytest.mark.parametrize(
    "opts",
    [
        "encrypt.format=luks,cluster_size=3000",
        "encrypt.format=aes,encrypt.key-secret=t,lazy_refcounts=on,compat=0.10",
        "encryption=on,refcount_bits=3",
    ],
)
def test_create_secret_checked_last(tmp_path: Path, opts: str) -> None:
    """The image options fail before the (missing) secret, as in QEMU. The wording of
    those errors is qcow2aio.create's: QEMU's message followed by the values."""
    argv = ["create", "-f", "qcow2", "--object", SECRET, "-o", opts, "e.qcow2", "1M"]
    q, p = _twins(tmp_path)
    theirs, mine = qemu_img(argv, q), ours(argv, p)
    assert (mine.rc, mine.out) == (theirs.rc, theirs.out)
    assert "secret" not in theirs.err
    assert mine.err.startswith(theirs.err.rstrip("\n").split(" (use ")[0])


def _info_masked(cwd: Path, name: str) -> dict[str, Any]:
    """qemu-img info of an image without what is random or timed (uuid, iterations)."""
    proc = tool(["qemu-img", "info", "--output=json", name], cwd)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    info.pop("actual-size")
    enc = info["format-specific"]["data"].get("encrypt", {})
    for key in ("uuid", "master-key-iters"):
        enc.pop(key, None)
    for slot in enc.get("slots", []):
        slot.pop("iters", None)
    return info


@pytest.mark.parametrize(
    "opts",
    [
        "encrypt.format=aes,encrypt.key-secret=s",
        "encryption=on,encrypt.key-secret=s",
        "encryption,encrypt.key-secret=s,compat=0.10",
        "encrypt.format=qcow,encrypt.key-secret=s,encryption=off",
        LUKS_OPTS + ",cluster_size=4k",  # one LUKS create: QEMU's takes seconds
    ],
)
def test_create_encrypted(tmp_path: Path, opts: str) -> None:
    """Same Formatting line and an image QEMU reads as its own (unlocked with the secret)."""
    argv = ["create", "-f", "qcow2", "--object", "secret,id=s,file=pw.txt", "-o", opts]
    argv += ["e.qcow2", "1M"]
    q, p = _twins(tmp_path)
    theirs = qemu_img(argv, q)
    assert theirs.rc == 0, theirs.err
    assert ours(argv, p) == theirs
    assert _info_masked(p, "e.qcow2") == _info_masked(q, "e.qcow2")
    if "luks" not in opts:  # nothing random in an AES image
        assert (p / "e.qcow2").read_bytes() == (q / "e.qcow2").read_bytes()
    check = ["check", "--object", SECRET, "--image-opts", image_opts("e.qcow2", "s")]
    assert qemu_img(check, p) == qemu_img(check, q)
    read = ["-c", "read -P 0 0 1M"]
    proc = run_tool(
        ["qemu-io", "--object", SECRET, "--image-opts", image_opts("e.qcow2", "s"), *read], cwd=p
    )
    assert proc.returncode == 0 and "error" not in proc.stdout.lower() + proc.stderr.lower()


@pytest.mark.parametrize("opts", [[], ["-o", "encrypt.format=aes,encrypt.key-secret=s"]])
def test_create_over_encrypted_backing(imgs: Path, tmp_path: Path, opts: list[str]) -> None:
    """The backing file's size is read without its secret, as QEMU does."""
    argv = ["create", "-f", "qcow2", "--object", SECRET, *opts, "-b", "l.qcow2", "-F", "qcow2"]
    argv.append("top.qcow2")
    q, p = _twins(tmp_path)
    for folder in (q, p):
        shutil.copyfile(imgs / "l.qcow2", folder / "l.qcow2")
    theirs = qemu_img(argv, q)
    assert theirs.rc == 0
    assert ours(argv, p) == theirs
    assert (p / "top.qcow2").read_bytes() == (q / "top.qcow2").read_bytes()


# ---------------------------------------------------------------------- info
@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize("name", ["l.qcow2", "x.qcow2", "a.qcow2", "t.qcow2"])
def test_info_encrypted(imgs: Path, name: str, output: str) -> None:
    """``encrypted: yes`` and the encrypt block (LUKS keyslots), with no secret at all."""
    outcome = same(["info", f"--output={output}", name], imgs)
    assert outcome.rc == 0 and ("encrypt" in outcome.out)


@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize("name", ["p.qcow2", "t.qcow2"])
def test_info_backing_chain_encrypted(imgs: Path, name: str, output: str) -> None:
    assert same(["info", "--backing-chain", f"--output={output}", name], imgs).rc == 0


IMAGE_OPTS_INFO = [
    image_opts("n.qcow2"),
    "driver=qcow2,file.driver=file,file.filename=./n.qcow2",
    "file.filename=l.qcow2",
    image_opts("l.qcow2", "s"),  # a json: filename, secret never looked up
    image_opts("l.qcow2", "a,,b\u00e9"),
    image_opts("n.qcow2", "s"),
    image_opts("t.qcow2", "s"),
    image_opts("l.qcow2", None, "encrypt.format=luks"),
    image_opts("l.qcow2", None, "encrypt.format=aes"),
    image_opts("a.qcow2", None, "encrypt.format=qcow"),
    image_opts("n.qcow2", None, "encrypt.format=luks"),
    image_opts("l.qcow2", None, "encrypt.cipher-alg=aes-128"),
    image_opts("a.qcow2", "s", "encrypt.hash-alg=sha1,encrypt.iter-time=1,encrypt.slots=8"),
    image_opts("l.qcow2", "s", "backing.encrypt.key-secret=s"),
    image_opts("n.qcow2", None, "zz=1,aa=2"),
    image_opts("n.qcow2", None, "file.bogus=1"),
    image_opts("missing.qcow2"),
    "driver=qcow2",
    "driver=qcow2,file.driver=file",
    "",
    "n.qcow2",
    "driver=qcow2,file=n.qcow2",
]


@pytest.mark.parametrize("spec", IMAGE_OPTS_INFO)
@pytest.mark.parametrize("output", ["human", "json"])
def test_info_image_opts(imgs: Path, spec: str, output: str) -> None:
    same(["info", "--object", SECRET, f"--output={output}", "--image-opts", spec], imgs)


def test_info_image_opts_backing_chain(imgs: Path) -> None:
    same(["info", "--backing-chain", "--image-opts", image_opts("t.qcow2", "s")], imgs)


@pytest.mark.parametrize(
    "argv",
    [
        ["info", "-f", "qcow2", "--image-opts", image_opts("n.qcow2")],
        ["check", "-f", "qcow2", "--image-opts", image_opts("n.qcow2")],
        ["info", "missing.qcow2"],
        ["check", "missing.qcow2"],
        ["check", "--image-opts", image_opts("missing.qcow2", "s")],
    ],
)
def test_open_errors(imgs: Path, argv: list[str]) -> None:
    assert same(argv, imgs).rc == 1


# --------------------------------------------------------------------- check
def _secret_objects(*pairs: str) -> list[str]:
    argv: list[str] = []
    for pair in pairs:
        sid, data = pair.split("=", 1)
        argv += ["--object", f"secret,id={sid},data={data}"]
    return argv


CHECKS: list[tuple[list[str], str]] = [
    # (secret objects id=data, --image-opts text or a plain name)
    ([], "l.qcow2"),
    ([], "a.qcow2"),
    (["s=pw"], "x.qcow2"),
    ([], image_opts("l.qcow2")),
    ([], image_opts("l.qcow2", "s")),
    (["s=wrong"], image_opts("l.qcow2", "s")),
    (["s=wrong"], image_opts("a.qcow2", "s")),  # AES cannot tell: the check runs
    (["s=pw"], image_opts("x.qcow2", "s")),
    (["s=pw"], image_opts("a.qcow2", "s")),
    (["s=pw"], image_opts("l.qcow2", "s", "encrypt.format=luks")),
    (["s=pw"], image_opts("l.qcow2", "s", "encrypt.format=aes")),
    (["s=pw"], image_opts("n.qcow2", "s")),
    # Backing chains: the backing file's secret is its own (never the top's).
    (["s=pw"], "p.qcow2"),
    (["s=pw"], image_opts("p.qcow2", None, "backing.encrypt.key-secret=s")),
    (["s=pw", "b=bad"], image_opts("p.qcow2", None, "backing.encrypt.key-secret=b")),
    (["s=pw"], image_opts("p.qcow2", None, "backing.encrypt.key-secret=b")),
    (["s=pw"], image_opts("t.qcow2", "s")),
    (["s=pw"], image_opts("t.qcow2", "s", "backing.encrypt.key-secret=s")),
    (["s=pw", "b=bad"], image_opts("t.qcow2", "b", "backing.encrypt.key-secret=s")),
    (["s=pw"], image_opts("t.qcow2", "s", "backing.encrypt.format=aes")),
    (["s=pw"], image_opts("t.qcow2", "s", "backing.encrypt.cipher-alg=aes-128")),
]


@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize(
    "secrets,spec", CHECKS, ids=[f"{'+'.join(sec) or 'none'}:{spec}" for sec, spec in CHECKS]
)
def test_check_encrypted(imgs: Path, secrets: list[str], spec: str, output: str) -> None:
    argv = ["check", f"--output={output}", *_secret_objects(*secrets)]
    argv += ["--image-opts", spec] if "=" in spec else [spec]
    same(argv, imgs)


def test_check_repair_encrypted(imgs: Path, tmp_path: Path) -> None:
    """``-r all`` of an encrypted image: opened with its secret, repaired like QEMU."""
    for who in ("q", "p"):
        (tmp_path / who).mkdir()
        shutil.copyfile(imgs / "l.qcow2", tmp_path / who / "l.qcow2")
    argv = ["check", "-r", "all", "--object", SECRET, "--image-opts", image_opts("l.qcow2", "s")]
    theirs = qemu_img(argv, tmp_path / "q")
    assert theirs.rc == 0
    assert ours(argv, tmp_path / "p") == theirs
    assert (tmp_path / "p" / "l.qcow2").read_bytes() == (tmp_path / "q" / "l.qcow2").read_bytes()
