"""``Image.write_zeroes`` against QEMU 7.2's ``write -z``, with and without extended L2.

QEMU sets the zero bits of the subclusters a write-zeroes covers, also in a cluster
it covers only in part; the unaligned ends become zero subclusters too where the
whole subcluster already reads as zeros, and are written as data otherwise. Each
case below (a request, over a cluster prepared one way, with and without unmap)
gets a slot of two clusters of one image; the same commands run through ``qemu-io
-c 'write -z [-u] OFF LEN'`` on a copy, then both images must read the same
(``qemu-img compare``), have the same ``qemu-img map --output=json`` layout (host
offsets left out: they depend on allocation order) and check clean.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import Qemu

import qcow2aio

CS = 65536
SLOT = 2 * CS
# (offset in the slot, length): subcluster-aligned or not, inside one subcluster, across
# subclusters, to the cluster's end, into the next cluster, a whole cluster.
REQUESTS = [
    (4096, 4096),
    (2048, 2048),
    (0, 61440),
    (2048, CS - 2048),
    (61440, 8192),
    (1000, 3000),
    (1000, 9000),
    (512, 1024),
    (3000, 100),
    (1000, CS),
    (0, CS),
]
# What the slot's first cluster holds before (qemu-io commands, {c}: its offset).
PREPS = [
    [],  # unallocated
    ["write -P 1 {c} 64k"],  # allocated data
    ["write -P 1 {c} 4k"],  # two data subclusters, the rest unallocated
    ["write -P 1 {c}+8k 2k"],  # one data subcluster in the middle
    ["write -z {c} 64k"],  # zero subclusters
    ["write -c -P 2 {c} 64k"],  # compressed
]


def _cases() -> list[tuple[int, int, bool, list[str]]]:
    cases = []
    for unmap in (False, True):
        for prep in PREPS:
            for off, n in REQUESTS:
                cases.append((off, n, unmap, prep))
    return cases


def _layout(qemu: Qemu, path: Path) -> list[tuple[Any, ...]]:
    out: list[list[Any]] = []
    for r in json.loads(qemu.img("map", "--output=json", path).stdout):
        key = (r["depth"], r["present"], r["zero"], r["data"])
        if out and tuple(out[-1][2:]) == key and out[-1][0] + out[-1][1] == r["start"]:
            out[-1][1] += r["length"]
        else:
            out.append([r["start"], r["length"], *key])
    return [tuple(x) for x in out]


@pytest.mark.parametrize("extended", [True, False], ids=["ext_l2", "plain"])
@pytest.mark.parametrize("backing", ["alone", "data", "zeros"])
def test_write_zeroes_like_qemu(qemu: Qemu, tmp_path: Path, backing: str, extended: bool) -> None:
    """Also on images without extended L2 (the granule is then the cluster), and over
    a backing file that holds data or reads as zeros (QEMU looks down the chain to
    decide whether the rest of a granule reads as zeros)."""
    cases = _cases()
    size = len(cases) * SLOT
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    opts = ["-o", f"extended_l2={'on' if extended else 'off'}"]
    if backing != "alone":
        base = tmp_path / "base.qcow2"
        qemu.img("create", "-q", "-f", "qcow2", base, str(size))
        if backing == "data":
            qemu.io(base, f"write -P 7 0 {size}")
        opts += ["-b", base.name, "-F", "qcow2"]
    qemu.img("create", "-q", "-f", "qcow2", *opts, theirs, str(size))
    prep = [
        cmd.format(c=i * SLOT).replace(f"{i * SLOT}+8k", str(i * SLOT + 8192))
        for i, (_, _, _, cmds) in enumerate(cases)
        for cmd in cmds
    ]
    qemu.io(theirs, *prep)
    shutil.copy(theirs, ours)
    qemu.io(
        theirs,
        *(
            f"write -z {'-u ' if unmap else ''}{i * SLOT + off} {n}"
            for i, (off, n, unmap, _) in enumerate(cases)
        ),
    )

    async def run() -> None:
        async with qcow2aio.open(ours, "r+") as img:
            assert img.meta.extended_l2 == extended
            for i, (off, n, unmap, _) in enumerate(cases):
                await img.write_zeroes(i * SLOT + off, n, unmap=unmap)

    asyncio.run(run())
    cmp = qemu.img("compare", theirs, ours, check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    want, got = _layout(qemu, theirs), _layout(qemu, ours)
    if want != got:
        slots = sorted({r[0] // SLOT for r in set(want) ^ set(got)})
        pytest.fail(
            "map differs in cases " + ", ".join(f"{cases[s][:3]} prep {cases[s][3]}" for s in slots)
        )
    rc, report = qemu.check(ours)
    assert rc == 0 and not report.get("corruptions") and not report.get("leaks"), report


@pytest.mark.parametrize(
    ("prep", "off", "n"),
    [
        ("", 65536, 1024),
        ("", 60000, 6560),
        ("write -P 1 0 66560", 65536, 1024),
        ("write -P 1 0 66560", 61440, 5120),
        ("write -c -P 2 0 64k", 61440, 5120),
    ],
)
def test_write_zeroes_to_the_end(qemu: Qemu, tmp_path: Path, prep: str, off: int, n: int) -> None:
    """A request that runs to the end of an image whose size is not a whole number of
    subclusters: the last subcluster counts as whole, as for QEMU."""
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", theirs, "66560")
    if prep:
        qemu.io(theirs, prep)
    shutil.copy(theirs, ours)
    qemu.io(theirs, f"write -z {off} {n}")

    async def run() -> None:
        async with qcow2aio.open(ours, "r+") as img:
            await img.write_zeroes(off, n, unmap=False)

    asyncio.run(run())
    assert qemu.img("compare", theirs, ours, check=False).returncode == 0
    assert _layout(qemu, theirs) == _layout(qemu, ours)
    rc, report = qemu.check(ours)
    assert rc == 0 and not report.get("corruptions") and not report.get("leaks"), report


def test_zero_clusters_rechecks_the_version_under_the_lock(qemu: Qemu, tmp_path: Path) -> None:
    """An amend to compat=0.10 may run between a write-zeroes' split and its locked
    step (race seeds 10400009/13): on a v2 image ``zero_clusters`` then changes no
    entry and hands the range back to be written as data (v2 has no zero flag); a
    discard over a backing file does nothing."""
    from qcow2aio.mapping import map_read
    from qcow2aio.writes import zero_clusters

    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", base, "1M")
    qemu.io(base, "write -P 7 0 1M", fmt="qcow2")
    qemu.img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        base.name,
        "-F",
        "qcow2",
        top,
        "1M",
    )
    qemu.io(top, "write -P 1 0 128k")
    with qcow2aio.open(top, "r+") as img:
        assert img.meta.version == 2

        def step() -> list[tuple[int, int]]:
            before = map_read(img.meta, 0, 2 * CS, True)
            left = zero_clusters(img, 0, 2 * CS, unmap=False, discard=False)
            assert zero_clusters(img, 0, 2 * CS, unmap=True, discard=True) == []
            assert map_read(img.meta, 0, 2 * CS, True) == before
            return left

        assert img._exclusive_sync(step) == [(0, 2 * CS)]
    assert qemu.check(top)[0] == 0
    qemu.io(top, "read -P 1 0 128k")
