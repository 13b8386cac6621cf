"""The test helper that runs QEMU's tools: it retries exactly QEMU 7.2's LUKS PBKDF
benchmark flake, and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Qemu, QemuCommandError


def _fake_tool(tmp_path: Path, fail_times: int, message: str) -> Path:
    """A stand-in for qemu-img: fails ``fail_times`` times with ``message``, then works."""
    count = tmp_path / "count"
    script = tmp_path / "fake-qemu-img"
    script.write_text(
        "#!/bin/sh\n"
        f'n=$(cat "{count}" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "{count}"\n'
        f'if [ $n -le {fail_times} ]; then echo "qemu-img: x: {message}" >&2; exit 1; fi\n'
        "echo done\n"
    )
    script.chmod(0o755)
    return script


def test_pbkdf_flake_is_retried(tmp_path: Path) -> None:
    tool = _fake_tool(tmp_path, 2, "Unable to get accurate CPU usage")
    q = Qemu(str(tool), "/bin/false", tmp_path)
    assert q.img("create").stdout.strip() == "done"
    assert (tmp_path / "count").read_text().strip() == "3"


def test_other_failures_are_not_retried(tmp_path: Path) -> None:
    tool = _fake_tool(tmp_path, 1, "Could not open 'x': No such file or directory")
    q = Qemu(str(tool), "/bin/false", tmp_path)
    with pytest.raises(QemuCommandError, match="No such file"):
        q.img("info", "x")
    assert (tmp_path / "count").read_text().strip() == "1"
