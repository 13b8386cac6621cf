"""Packaging: one version, a license, a wheel whose ``qcow2aio`` command has every
subcommand."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import qcow2aio
from qcow2aio.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent


def test_version_in_one_place() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    out = subprocess.run(
        [sys.executable, "-m", "qcow2aio", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout == f"qcow2aio version {qcow2aio.__version__}\n"


def test_wheel_has_license_and_every_command(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("qcow2aio-*.whl")
    assert wheel.name.startswith(f"qcow2aio-{qcow2aio.__version__}-")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
        lic = [n for n in names if n.endswith("LICENSE")]
        assert lic and b"MIT License" in zf.read(lic[0])
    assert "License: MIT" in meta
    assert b"qcow2aio = qcow2aio.cli:main" in entry
    for name in COMMANDS:
        assert f"qcow2aio/cli/{name}.py" in names, name
