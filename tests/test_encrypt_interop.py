"""Encrypted images (legacy AES, LUKS) against QEMU 7.2, both ways.

QEMU writes, we read byte for byte; we write (aligned, unaligned, COW from backing
files and zero clusters, zeroes, discards; sync and async), QEMU checks and reads
what we wrote and keeps writing; wrong and missing passphrases fail before anything
is written; keyslot changes we make are honoured by QEMU.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import Qemu

import qcow2aio

PW = "correct horse"
PW2 = "battery staple"
MiB = 1 << 20


def _secret_args(path: Path, secrets: dict[str, str], opts: str = "") -> list[str]:
    args: list[str] = []
    for sid, data in secrets.items():
        args += ["--object", f"secret,id={sid},data={data}"]
    spec = f"driver=qcow2,file.filename={path}"
    if "s0" in secrets:
        spec += ",encrypt.key-secret=s0"
    if opts:
        spec += "," + opts
    return [*args, "--image-opts", spec]


def q_raw(qemu: Qemu, path: Path, secrets: dict[str, str], opts: str = "") -> bytes:
    """The guest contents as QEMU decrypts them."""
    out = qemu.tmp_path / f"{path.name}.raw"
    qemu.img("convert", *_secret_args(path, secrets, opts), "-O", "raw", out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def q_io(qemu: Qemu, path: Path, secrets: dict[str, str], *cmds: str, check: bool = True) -> Any:
    args = _secret_args(path, secrets)
    return qemu.io(args[-1], *cmds, fmt=None, extra_args=args[:-1], check=check)


def q_check(qemu: Qemu, path: Path, secrets: dict[str, str], opts: str = "") -> None:
    """``qemu-img check`` with the secret: clean (no corruptions, no leaks)."""
    proc = qemu.img("check", "--output=json", *_secret_args(path, secrets, opts), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert not report.get("corruptions") and not report.get("leaks"), report


def q_create(qemu: Qemu, path: Path, size: int, **opts: Any) -> Path:
    o = {"encrypt.key-secret": "s0", **{k.replace("__", "."): v for k, v in opts.items()}}
    if o.get("encrypt.format", "luks") == "luks":
        o.setdefault("encrypt.iter-time", 10)
    o.setdefault("encrypt.format", "luks")
    spec = ",".join(f"{k}={v}" for k, v in o.items())
    qemu.img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        f"secret,id=s0,data={PW}",
        "-o",
        spec,
        path,
        str(size),
    )
    return path


def ours_create(path: Path, size: int, **kw: Any) -> Path:
    kw.setdefault("encrypt_format", "luks")
    if kw["encrypt_format"] == "luks":
        kw.setdefault("encrypt_iter_time", 10)
    qcow2aio.create(path, size, passphrase=PW, **kw)
    return path


# (name, qemu-img -o options): every cipher/mode/ivgen family QEMU accepts that we do.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("luks-aes256-xts-plain64", {}),
    (
        "luks-aes128-cbc-essiv",
        {
            "encrypt.cipher-alg": "aes-128",
            "encrypt.cipher-mode": "cbc",
            "encrypt.ivgen-alg": "essiv",
            "encrypt.ivgen-hash-alg": "sha256",
        },
    ),
    (
        "luks-aes256-cbc-plain-4k",
        {"encrypt.cipher-mode": "cbc", "encrypt.ivgen-alg": "plain", "cluster_size": 4096},
    ),
    (
        "luks-aes128-ecb-v2",
        {"encrypt.cipher-alg": "aes-128", "encrypt.cipher-mode": "ecb", "compat": "0.10"},
    ),
    (
        "luks-aes128-xts-extl2",
        {"encrypt.cipher-alg": "aes-128", "extended_l2": "on", "encrypt.hash-alg": "sha512"},
    ),
    ("luks-aes256-ctr", {"encrypt.cipher-mode": "ctr"}),
    ("aes-legacy", {"encrypt.format": "aes"}),
    ("aes-legacy-v2-4k", {"encrypt.format": "aes", "compat": "0.10", "cluster_size": 4096}),
]


def _qemu_writes(rng: random.Random, size: int) -> list[str]:
    cmds = []
    for _ in range(24):
        off = rng.randrange(0, size - 70000)
        n = rng.choice([512, 4096, 65536, 3 * 512, 70000])
        off &= ~511
        n = (n + 511) & ~511
        cmds.append(f"write -P {rng.randrange(1, 255)} {off} {n}")
    cmds.append(f"write -z {size // 2} 65536")
    return cmds


@pytest.mark.parametrize("name,opts", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_read_what_qemu_wrote(qemu: Qemu, tmp_path: Path, name: str, opts: dict[str, Any]) -> None:
    size = 4 * MiB
    img = q_create(qemu, tmp_path / "q.qcow2", size, **opts)
    q_io(qemu, img, {"s0": PW}, *_qemu_writes(random.Random(name), size))
    want = q_raw(qemu, img, {"s0": PW})
    with qcow2aio.open(img, passphrase=PW) as im:
        assert im.encrypted
        assert im.read_sync(0, size) == want
        for off, n in ((1, 1000), (513, 511), (65535, 70001), (size - 7, 7)):
            assert im.read_sync(off, n) == want[off : off + n]

    async def areads() -> None:
        async with qcow2aio.open(img, passphrase=PW) as im:
            assert await im.read(0, size) == want
            parts = await asyncio.gather(*(im.read(o, 4096) for o in range(0, size, 4096 * 7)))
            for o, p in zip(range(0, size, 4096 * 7), parts, strict=True):
                assert p == want[o : o + 4096]

    asyncio.run(areads())


def _mix(rng: random.Random, size: int) -> list[tuple[str, int, int]]:
    ops = []
    for _ in range(60):
        kind = rng.choices(["w", "wu", "z", "d"], [6, 4, 1, 1])[0]
        off = rng.randrange(0, size - 1)
        n = min(rng.choice([1, 100, 512, 4096, 65536, 100000, 200000]), size - off)
        if kind == "w":
            off &= ~511
            n = max(512, n & ~511)
            n = min(n, size - off)
        ops.append((kind, off, n))
    return ops


def _apply(oracle: bytearray, kind: str, off: int, n: int, seed: int, cs: int, v3: bool) -> bytes:
    data = random.Random(seed).randbytes(n)
    if kind in ("w", "wu"):
        oracle[off : off + n] = data
    elif kind == "z":
        oracle[off : off + n] = bytes(n)
    return data


def _discarded(oracle: bytearray, off: int, n: int, cs: int, size: int) -> None:
    a = (off + cs - 1) // cs * cs
    b = (off + n) // cs * cs if off + n < size else size
    if b > a:
        oracle[a:b] = bytes(b - a)


@pytest.mark.parametrize(
    "name,opts",
    [VARIANTS[0], VARIANTS[1], VARIANTS[4], VARIANTS[6], VARIANTS[7]],
    ids=lambda v: v if isinstance(v, str) else "",
)
@pytest.mark.parametrize("driver", ["sync", "async"])
def test_we_write_qemu_reads(
    qemu: Qemu, tmp_path: Path, name: str, opts: dict[str, Any], driver: str
) -> None:
    size = 3 * MiB
    img = q_create(qemu, tmp_path / "w.qcow2", size, **opts)
    q_io(qemu, img, {"s0": PW}, "write -P 0x11 0 1M", "write -z 1M 128k")
    oracle = bytearray(q_raw(qemu, img, {"s0": PW}))
    v3 = opts.get("compat") != "0.10"
    ops = _mix(random.Random(name + driver), size)
    with qcow2aio.open(img, passphrase=PW) as probe:
        cs = probe.cluster_size
    if driver == "sync":
        with qcow2aio.open(img, "r+", passphrase=PW) as im:
            for i, (kind, off, n) in enumerate(ops):
                data = _apply(oracle, kind, off, n, i, cs, v3)
                if kind in ("w", "wu"):
                    im.write_sync(off, data)
                elif kind == "z":
                    asyncio.run(im.write_zeroes(off, n))
                else:
                    if not (not v3 and im.backing is not None):
                        _discarded(oracle, off, n, cs, size)
                    asyncio.run(im.discard(off, n))
            assert im.read_sync(0, size) == oracle
    else:

        async def run() -> None:
            async with qcow2aio.open(img, "r+", passphrase=PW) as im:
                for i, (kind, off, n) in enumerate(ops):
                    data = _apply(oracle, kind, off, n, i, cs, v3)
                    if kind in ("w", "wu"):
                        await im.write(off, data)
                    elif kind == "z":
                        await im.write_zeroes(off, n)
                    else:
                        _discarded(oracle, off, n, cs, size)
                        await im.discard(off, n)
                assert await im.read(0, size) == oracle

        asyncio.run(run())
    q_check(qemu, img, {"s0": PW})
    assert q_raw(qemu, img, {"s0": PW}) == oracle
    # QEMU keeps writing what we wrote; we read what it wrote.
    q_io(qemu, img, {"s0": PW}, "write -P 0x77 4096 8192", f"write -P 0x78 {size - 1024} 1024")
    oracle[4096 : 4096 + 8192] = b"\x77" * 8192
    oracle[size - 1024 :] = b"\x78" * 1024
    with qcow2aio.open(img, passphrase=PW) as im:
        assert im.read_sync(0, size) == oracle


def test_concurrent_unaligned_writes_share_sectors(tmp_path: Path, qemu: Qemu) -> None:
    """Many unaligned writes to disjoint bytes of the same sectors, at once: every byte
    lands (the sector read-modify-write is serialized)."""
    size = MiB
    img = ours_create(tmp_path / "u.qcow2", size)
    oracle = bytearray(size)
    rng = random.Random(5)
    writes = []
    for i in range(200):
        off = rng.randrange(0, 8192 // 37) * 37 + rng.choice([0, 65536 - 4096])
        data = bytes([i % 251 + 1]) * 37
        writes.append((off, data))
    # disjoint: drop overlaps
    taken: set[int] = set()
    chosen = []
    for off, data in writes:
        if not taken & set(range(off, off + len(data))):
            taken |= set(range(off, off + len(data)))
            chosen.append((off, data))
            oracle[off : off + len(data)] = data

    async def run() -> None:
        async with qcow2aio.open(img, "r+", passphrase=PW) as im:
            await asyncio.gather(*(im.write(o, d) for o, d in chosen))
            assert await im.read(0, size) == oracle

    asyncio.run(run())
    q_check(qemu, img, {"s0": PW})
    assert q_raw(qemu, img, {"s0": PW}) == oracle


@pytest.mark.parametrize("base_kind", ["plain", "luks", "aes"])
def test_cow_from_backing(qemu: Qemu, tmp_path: Path, base_kind: str) -> None:
    """An encrypted overlay over a plain or encrypted base: partial-cluster writes copy
    the base's data (decrypted with the base's key, encrypted with ours) around them."""
    size = 2 * MiB
    base = tmp_path / "base.qcow2"
    secrets = {"s0": PW}
    if base_kind == "plain":
        qemu.img("create", "-q", "-f", "qcow2", base, str(size))
        qemu.io(base, "write -P 0x42 0 2M")
        bopts = ""
    else:
        qemu.img(
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            f"secret,id=s1,data={PW2}",
            "-o",
            f"encrypt.format={base_kind},encrypt.key-secret=s1"
            + (",encrypt.iter-time=10" if base_kind == "luks" else ""),
            base,
            str(size),
        )
        qemu.io(
            f"driver=qcow2,file.filename={base},encrypt.key-secret=s1",
            "write -P 0x42 0 2M",
            fmt=None,
            extra_args=["--object", f"secret,id=s1,data={PW2}", "--image-opts"],
        )
        secrets["s1"] = PW2
        bopts = "backing.encrypt.key-secret=s1"
    top = ours_create(tmp_path / "top.qcow2", None, backing_file="base.qcow2", backing_fmt="qcow2")
    oracle = bytearray(b"\x42" * size)
    bp = PW2 if base_kind != "plain" else None
    with qcow2aio.open(top, "r+", passphrase=PW, backing_passphrase=bp) as im:
        for off, n in ((100, 10), (65536 + 512, 4096), (3 * 65536 - 1, 2), (size - 513, 513)):
            im.write_sync(off, b"\x99" * n)
            oracle[off : off + n] = b"\x99" * n
        asyncio.run(im.write_zeroes(5 * 65536 + 7, 20))
        oracle[5 * 65536 + 7 : 5 * 65536 + 27] = bytes(20)
        assert im.read_sync(0, size) == oracle
    q_check(qemu, top, secrets, bopts)
    assert q_raw(qemu, top, secrets, bopts) == oracle


def test_cow_from_allocated_zero_clusters(qemu: Qemu, tmp_path: Path) -> None:
    size = MiB
    img = q_create(qemu, tmp_path / "z.qcow2", size)
    q_io(qemu, img, {"s0": PW}, "write -P 0x55 0 256k", "write -z 0 128k")  # zero, allocated
    oracle = bytearray(q_raw(qemu, img, {"s0": PW}))
    with qcow2aio.open(img, "r+", passphrase=PW) as im:
        im.write_sync(1000, b"\x01" * 600)
        oracle[1000:1600] = b"\x01" * 600
        im.write_sync(65536 + 4096, b"\x02" * 4096)
        oracle[65536 + 4096 : 65536 + 8192] = b"\x02" * 4096
        assert im.read_sync(0, size) == oracle
    q_check(qemu, img, {"s0": PW})
    assert q_raw(qemu, img, {"s0": PW}) == oracle


def test_external_data_file(qemu: Qemu, tmp_path: Path) -> None:
    size = MiB
    img = q_create(qemu, tmp_path / "d.qcow2", size, data_file=str(tmp_path / "d.data"))
    q_io(qemu, img, {"s0": PW}, "write -P 0x31 65536 65536")
    oracle = bytearray(q_raw(qemu, img, {"s0": PW}))
    with qcow2aio.open(img, "r+", passphrase=PW) as im:
        assert im.read_sync(0, size) == oracle
        im.write_sync(70000, b"\x32" * 3000)
        oracle[70000:73000] = b"\x32" * 3000
        im.write_sync(300000, b"\x33" * 5000)
        oracle[300000:305000] = b"\x33" * 5000
    q_check(qemu, img, {"s0": PW})
    assert q_raw(qemu, img, {"s0": PW}) == oracle


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {
            "encrypt_cipher_alg": "aes-128",
            "encrypt_cipher_mode": "cbc",
            "encrypt_ivgen_alg": "essiv",
            "encrypt_ivgen_hash_alg": "sha256",
        },
        {
            "encrypt_cipher_mode": "cbc",
            "encrypt_ivgen_alg": "essiv",
            "encrypt_hash_alg": "sha1",
        },
        {"encrypt_format": "aes"},
        {"cluster_size": 512},
        {"preallocation": "metadata", "compat": "0.10"},
    ],
    ids=[
        "luks",
        "luks-cbc-essiv",
        "luks-essiv-default-hash",
        "aes",
        "luks-512",
        "luks-prealloc-v2",
    ],
)
def test_qemu_reads_what_we_create(qemu: Qemu, tmp_path: Path, kw: dict[str, Any]) -> None:
    size = MiB
    ours = ours_create(tmp_path / "ours.qcow2", size, **kw)
    info = qemu.info(ours)
    assert info["encrypted"] is True
    enc = info["format-specific"]["data"]["encrypt"]
    assert enc["format"] == kw.get("encrypt_format", "luks")
    if enc["format"] == "luks":
        assert enc["cipher-alg"] == kw.get("encrypt_cipher_alg", "aes-256")
        assert enc["cipher-mode"] == kw.get("encrypt_cipher_mode", "xts")
        assert enc["ivgen-alg"] == kw.get("encrypt_ivgen_alg", "plain64")
        # Same layout as qemu-img's own image with the same options (sizes, clusters).
        qopts = {
            {
                "encrypt_cipher_alg": "encrypt.cipher-alg",
                "encrypt_cipher_mode": "encrypt.cipher-mode",
                "encrypt_ivgen_alg": "encrypt.ivgen-alg",
                "encrypt_ivgen_hash_alg": "encrypt.ivgen-hash-alg",
                "encrypt_hash_alg": "encrypt.hash-alg",
            }.get(k, k): v
            for k, v in kw.items()
        }
        theirs = q_create(qemu, tmp_path / "theirs.qcow2", size, **qopts)
        assert ours.stat().st_size == theirs.stat().st_size
        tinfo = qemu.info(theirs)["format-specific"]["data"]["encrypt"]
        assert enc["payload-offset"] == tinfo["payload-offset"]
        # essiv without an ivgen hash: QEMU's default (sha256, not the hash-alg).
        assert enc.get("ivgen-hash-alg") == tinfo.get("ivgen-hash-alg")
        assert enc["hash-alg"] == tinfo["hash-alg"]
        assert [s["key-offset"] for s in enc["slots"]] == [s["key-offset"] for s in tinfo["slots"]]
    q_check(qemu, ours, {"s0": PW})
    if kw.get("preallocation") is None:
        assert q_raw(qemu, ours, {"s0": PW}) == bytes(size)
    q_io(qemu, ours, {"s0": PW}, "write -P 0x66 1000 70000")
    with qcow2aio.open(ours, passphrase=PW) as im:
        assert im.read_sync(1000, 70000) == b"\x66" * 70000


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_wrong_and_missing_passphrase(qemu: Qemu, tmp_path: Path) -> None:
    img = ours_create(tmp_path / "p.qcow2", MiB)
    before = _digest(img)
    for mode in ("r", "r+"):
        with pytest.raises(qcow2aio.Qcow2PassphraseError, match=r"(?i)password|passphrase"):
            qcow2aio.open(img, mode, passphrase="wrong")
        with pytest.raises(qcow2aio.Qcow2PassphraseError, match=r"(?i)missing"):
            qcow2aio.open(img, mode)
    assert _digest(img) == before
    with qcow2aio.open(img, metadata_only=True) as im:
        assert im.info()["encrypted"] is True
        with pytest.raises(qcow2aio.Qcow2PassphraseError):
            im.read_sync(0, 512)
    # No passphrase text in the error.
    try:
        qcow2aio.open(img, passphrase="s3cr3t-value")
    except qcow2aio.Qcow2PassphraseError as exc:
        assert "s3cr3t" not in str(exc) and "s3cr3t" not in repr(exc)


def test_no_secret_in_repr_or_info(tmp_path: Path) -> None:
    """Neither the passphrase nor the master key shows in the image's repr, its
    attributes' reprs or info(); close() overwrites the key buffer it owns."""
    img = ours_create(tmp_path / "r.qcow2", MiB)
    im = qcow2aio.open(img, "r+", passphrase=PW)
    crypto = im._crypto
    assert crypto is not None and crypto.master_key is not None
    key_buf = crypto.master_key
    key = bytes(key_buf)
    text = repr(im) + repr(vars(im)) + repr(crypto) + json.dumps(im.info())
    for needle in (PW, key.hex(), repr(key)[2:-1]):
        assert needle not in text
    im.close()
    assert key_buf == bytes(len(key_buf)) and crypto.master_key is None


def test_keyslots_honoured_by_qemu(qemu: Qemu, tmp_path: Path) -> None:
    img = ours_create(tmp_path / "k.qcow2", MiB)
    with qcow2aio.open(img, "r+", passphrase=PW) as im:
        im.write_sync(0, b"\x5a" * 4096)
        im.add_passphrase_sync(PW2, iter_time=10)
        with pytest.raises(qcow2aio.Qcow2Error, match="Refusing to overwrite active keyslot 0"):
            im.add_passphrase_sync("third", slot=0, iter_time=10)
    q_io(qemu, img, {"s0": PW2}, "read -P 0x5a 0 4096")
    info = qemu.info(img)["format-specific"]["data"]["encrypt"]
    assert [s["active"] for s in info["slots"]][:3] == [True, True, False]

    async def remove() -> None:
        async with qcow2aio.open(img, "r+", passphrase=PW2) as im:
            await im.remove_passphrase(PW)
            with pytest.raises(qcow2aio.Qcow2Error, match="refusing operation"):
                await im.remove_passphrase(PW2)

    asyncio.run(remove())
    proc = q_io(qemu, img, {"s0": PW}, "read 0 512", check=False)
    assert "Invalid password" in proc.stdout + proc.stderr
    q_io(qemu, img, {"s0": PW2}, "read -P 0x5a 0 4096")
    with pytest.raises(qcow2aio.Qcow2PassphraseError):
        qcow2aio.open(img, passphrase=PW)
    q_check(qemu, img, {"s0": PW2})


def test_create_validation() -> None:
    with pytest.raises(qcow2aio.Qcow2PassphraseError, match="key-secret' is required"):
        qcow2aio.create("/nonexistent/x.qcow2", MiB, encrypt_format="luks")
    with pytest.raises(qcow2aio.Qcow2FormatError, match=r"encrypt\.iter-time' is unexpected"):
        qcow2aio.create(
            "/nonexistent/x.qcow2", MiB, encrypt_format="aes", passphrase="x", encrypt_iter_time=10
        )
    with pytest.raises(qcow2aio.Qcow2FormatError, match=r"'encrypt\.format' is missing"):
        qcow2aio.create("/nonexistent/x.qcow2", MiB, passphrase="x")
    with pytest.raises(qcow2aio.Qcow2UnsupportedError, match="twofish"):
        qcow2aio.create(
            "/nonexistent/x.qcow2",
            MiB,
            encrypt_format="luks",
            passphrase="x",
            encrypt_cipher_alg="twofish-256",
            encrypt_iter_time=10,
        )
