"""Shared fixtures for interop tests against QEMU's own tools (qemu-img, qemu-io).

QEMU 7.2 is the test oracle. If its tools are missing, every test that uses these
fixtures FAILS with a clear message: interop tests are never skipped (``make test`` and
``.ci/run`` install Debian's ``qemu-utils`` first).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

StrPath = str | os.PathLike[str]

QEMU_TOOLS = ("qemu-img", "qemu-io")
# Generous bound so a hung QEMU process fails the test instead of stalling the suite.
QEMU_TIMEOUT = 300.0
# Exit codes of `qemu-img check` that are normal outcomes (clean, corruptions, leaks).
CHECK_NORMAL_EXIT_CODES = (0, 2, 3)


class QemuCommandError(AssertionError):
    """A qemu-img/qemu-io command failed (or printed an error); carries its output."""

    def __init__(self, argv: Sequence[str], proc: subprocess.CompletedProcess[str], why: str):
        self.argv = list(argv)
        self.proc = proc
        super().__init__(
            f"{why}: {' '.join(self.argv)}\n"
            f"exit code: {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout}"
            f"--- stderr ---\n{proc.stderr}"
        )


# Creating a LUKS image, QEMU 7.2 sizes its PBKDF2 iterations by timing rounds in whole
# milliseconds of thread CPU time, and gives up with this message when a round measured
# 0 ms: 2-5% of `qemu-img create ... encrypt.format=luks` runs on this machine fail so.
# A flake of the tool (nothing to do with the image), so such a run is simply retried.
_PBKDF_FLAKE = "Unable to get accurate CPU usage"


def run_tool(
    argv: Sequence[str], *, cwd: StrPath | None = None, timeout: float = QEMU_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run one of QEMU's tools, text output captured, no stdin; retries the PBKDF flake.

    Never raises on a nonzero exit code: callers decide what a failure means.
    """
    for _ in range(100):  # under load the flake hits most LUKS creates (each fails in ~30 ms)
        proc = subprocess.run(
            list(argv),
            cwd=cwd,
            capture_output=True,
            text=True,
            errors="replace",
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
        if proc.returncode == 0 or _PBKDF_FLAKE not in proc.stderr:
            break
    return proc


class Qemu:
    """Runs QEMU's tools on test images; temporary files go under ``tmp_path``."""

    def __init__(self, qemu_img: str, qemu_io: str, tmp_path: Path) -> None:
        self.qemu_img = qemu_img
        self.qemu_io = qemu_io
        self.tmp_path = tmp_path
        self._counter = itertools.count()

    def _run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return run_tool(argv)

    def img(self, *args: StrPath, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``qemu-img ARGS...``; with ``check``, raise on a nonzero exit code."""
        argv = [self.qemu_img, *(os.fspath(a) for a in args)]
        proc = self._run(argv)
        if check and proc.returncode != 0:
            raise QemuCommandError(argv, proc, "qemu-img failed")
        return proc

    def io(
        self,
        path: StrPath,
        *commands: str,
        fmt: str | None = "qcow2",
        check: bool = True,
        extra_args: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run ``qemu-io -f FMT EXTRA_ARGS -c CMD... PATH``.

        qemu-io reports most errors on stdout and may still exit 0, so with ``check`` a
        run also fails when its output mentions "error" or "failed" (case-insensitive).
        Pass ``check=False`` when that could be a false positive (e.g. ``read -v`` of data
        containing those words) or when a failure is the expected result. ``fmt=None``
        leaves out ``-f`` (needed with ``--image-opts`` in ``extra_args``).
        """
        argv = [self.qemu_io]
        if fmt is not None:
            argv += ["-f", fmt]
        argv += list(extra_args)
        for command in commands:
            argv += ["-c", command]
        argv.append(os.fspath(path))
        proc = self._run(argv)
        if check:
            if proc.returncode != 0:
                raise QemuCommandError(argv, proc, "qemu-io failed")
            output = (proc.stdout + proc.stderr).lower()
            if "error" in output or "failed" in output:
                raise QemuCommandError(argv, proc, "qemu-io reported an error")
        return proc

    def _tmp_file(self, suffix: str) -> Path:
        while True:
            candidate = self.tmp_path / f"qemu-{next(self._counter)}{suffix}"
            if not candidate.exists():
                return candidate

    def convert_raw(
        self, path: StrPath, *, fmt: str | None = None, extra_args: Sequence[str] = ()
    ) -> bytes:
        """Guest-visible contents of the image, via ``qemu-img convert -O raw``."""
        out = self._tmp_file(".raw")
        args: list[StrPath] = ["convert"]
        if fmt is not None:
            args += ["-f", fmt]
        args += [*extra_args, "-O", "raw", path, out]
        self.img(*args)
        try:
            return out.read_bytes()
        finally:
            out.unlink(missing_ok=True)

    def info(self, path: StrPath, *, extra_args: Sequence[str] = ()) -> dict[str, Any]:
        """Parsed ``qemu-img info --output=json``."""
        args = ["info", "--output=json", *extra_args, os.fspath(path)]
        proc = self.img(*args)
        return _parse_json_object([self.qemu_img, *args], proc)

    def check(self, path: StrPath, *, extra_args: Sequence[str] = ()) -> tuple[int, dict[str, Any]]:
        """Run ``qemu-img check --output=json``; return (exit code, parsed report).

        Exit codes 0 (clean), 2 (corruptions) and 3 (leaks) are normal outcomes; any
        exit code is returned as long as stdout holds the JSON report. If it does not
        (e.g. qemu-img could not open the image), the command's output is raised.
        """
        args = ["check", "--output=json", *extra_args, os.fspath(path)]
        proc = self.img(*args, check=False)
        full_argv = [self.qemu_img, *args]
        if proc.returncode not in CHECK_NORMAL_EXIT_CODES and not proc.stdout.strip():
            raise QemuCommandError(full_argv, proc, "qemu-img check failed")
        return proc.returncode, _parse_json_object(full_argv, proc)


def _parse_json_object(
    argv: Sequence[str], proc: subprocess.CompletedProcess[str]
) -> dict[str, Any]:
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise QemuCommandError(argv, proc, f"output is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise QemuCommandError(argv, proc, "output is not a JSON object")
    return data


@pytest.fixture(scope="session")
def qemu_tools() -> dict[str, str]:
    """Paths of qemu-img and qemu-io; fails (never skips) when either is missing."""
    found = {tool: shutil.which(tool) for tool in QEMU_TOOLS}
    missing = [tool for tool, where in found.items() if where is None]
    if missing:
        pytest.fail(
            f"QEMU tools not found on PATH: {', '.join(missing)}. The interop tests need "
            "QEMU 7.2's qemu-img and qemu-io and are never skipped; install Debian's "
            "qemu-utils (`apt-get install -y qemu-utils`) or run `make test`, which does.",
            pytrace=False,
        )
    return {tool: where for tool, where in found.items() if where is not None}


@pytest.fixture
def qemu(qemu_tools: dict[str, str], tmp_path: Path) -> Qemu:
    """Helper running qemu-img / qemu-io; see :class:`Qemu`."""
    return Qemu(qemu_tools["qemu-img"], qemu_tools["qemu-io"], tmp_path)


@pytest.fixture
def sim_env(qemu: Qemu, tmp_path: Path) -> Any:
    """A folder and QEMU's tools for the seeded race harnesses (tests/sim.py, threadsim.py)."""
    from sim import SimEnv

    env = SimEnv(tmp_path, qemu)
    yield env
    env.cleanup()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "stress_only: run only with QCOW2AIO_STRESS=1 (make stress); not collected else"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of the long sets are left out of `make test` (deselected, not skipped:
    a skip in the interop suite would read as a tool missing)."""
    if os.environ.get("QCOW2AIO_STRESS", "").strip() not in ("", "0"):
        return
    keep = [item for item in items if item.get_closest_marker("stress_only") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
