"""``qcow2aio resize --object secret,... --image-opts ...``: encrypted images and
encrypted backing files resized as qemu-img resizes them, with its messages.

Both tools start from copies of one encrypted chain (same keys, same salts), so
after the same command the files must be byte-identical.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Qemu

SECRET = "secret,id=s0,data=pw"
BSECRET = "secret,id=b0,data=bpw"


def _chain(qemu: Qemu, folder: Path) -> None:
    qemu.img(
        "create", "-q", "-f", "qcow2", "--object", BSECRET,
        "-o", "encrypt.format=luks,encrypt.key-secret=b0,encrypt.iter-time=10",
        folder / "base.qcow2", "4M",
    )  # fmt: skip
    qemu.img(
        "create", "-q", "-f", "qcow2", "--object", SECRET,
        "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "-b", "base.qcow2", "-F", "qcow2", folder / "top.qcow2", "1M",
    )  # fmt: skip


_TOP = "driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=s0"
_BACK = _TOP + ",backing.encrypt.key-secret=b0"
CASES = [
    "top.qcow2 2M",
    f"--object {SECRET} --image-opts {_TOP} 2M",
    f"--object {SECRET} --object {BSECRET} --image-opts {_BACK} 2M",
    f"--object {SECRET} --object {BSECRET} --image-opts {_BACK} +6M",
    f"--object {SECRET} --object {BSECRET} --image-opts {_BACK} --shrink 512K",
    f"--object {SECRET} --object {BSECRET} --image-opts {_BACK} 512K",
    f"--object {SECRET} --image-opts {_TOP.replace('s0', 's9')} 2M",
    f"--object {SECRET} --image-opts driver=qcow2,file.filename=nosuch.qcow2 2M",
    f"--object {SECRET} -f qcow2 --image-opts {_TOP} 2M",
    "--object secret,id=s0 top.qcow2 2M",
    "--object bogus,id=x top.qcow2 2M",
    f"--object {SECRET} --object {BSECRET} --image-opts {_BACK} --preallocation=full 3M",
]


@pytest.mark.parametrize("args", CASES)
def test_resize_encrypted_like_qemu_img(qemu: Qemu, tmp_path: Path, args: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _chain(qemu, src)
    results = []
    for tool in ("q", "p"):
        folder = tmp_path / tool
        shutil.copytree(src, folder)
        if tool == "q":
            cmd = [qemu.qemu_img, "resize", *args.split()]
            env = {**os.environ, "LC_ALL": "C"}
        else:
            cmd = [sys.executable, "-m", "qcow2aio", "resize", *args.split()]
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
        proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, env=env)
        err = proc.stderr.replace("qemu-img:", "PROG:").replace("qcow2aio:", "PROG:")
        results.append((proc.returncode, proc.stdout, err))
        results.append(((folder / "top.qcow2").read_bytes(), (folder / "base.qcow2").read_bytes()))
    assert results[0] == results[2]
    assert results[1] == results[3]
    check = subprocess.run(
        [qemu.qemu_img, "check", "--object", SECRET, "--object", BSECRET, "--image-opts", _BACK],
        cwd=tmp_path / "p",
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0 and "No errors were found" in check.stdout, check


@pytest.mark.parametrize(
    ("prealloc", "new"),
    [(mode, "3M") for mode in ("off", "metadata", "falloc", "full")] + [("off", "--shrink 512K")],
)
def test_backing_longer_than_image_like_qemu_img(
    qemu: Qemu, tmp_path: Path, prealloc: str, new: str
) -> None:
    """Growing over a longer backing file: off/metadata mark the new range zero,
    falloc/full leave it as (zero) data; shrinking an image without L2 tables
    allocates the empty table QEMU's discard makes. Byte-identical files.
    (Preallocation applies to growing only: no shrink with it.)"""
    files = []
    for tool in ("q", "p"):
        folder = tmp_path / tool
        folder.mkdir()
        qemu.img("create", "-q", "-f", "qcow2", folder / "b.qcow2", "4M")
        qemu.io(folder / "b.qcow2", "write -P 7 0 4M")
        qemu.img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", folder / "t", "1M")
        argv = ["resize", "-q", f"--preallocation={prealloc}", "t", *new.split()]
        if tool == "q":
            subprocess.run([qemu.qemu_img, *argv], cwd=folder, check=True)
        else:
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
            subprocess.run(
                [sys.executable, "-m", "qcow2aio", *argv], cwd=folder, check=True, env=env
            )
        files.append((folder / "t").read_bytes())
    assert files[0] == files[1]
    code, rep = qemu.check(tmp_path / "p" / "t")
    assert code == 0 and not rep.get("leaks"), rep
