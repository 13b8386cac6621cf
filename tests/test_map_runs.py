"""Runs of plain data that continue on the host: ``map_read`` counts them at C speed
(``mapping._continued``), and must stop exactly where the per-cluster walk would.

Each image is laid out by qemu-io so that long host-contiguous runs are broken at
known places: a cluster allocated out of order (host jump), a zero cluster (flag
change), a compressed cluster, the end of an L2 table, a partial last cluster. Our
``Image.map`` records must equal ``qemu-img map --output=json``'s, and every read
plan must read back what ``qemu-io`` wrote (``read -P``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Qemu

import qcow2aio
from qcow2aio.mapping import DATA, map_read


def _layout(qemu: Qemu, name: str, opts: str, size: str) -> None:
    qemu.img("create", "-q", "-f", "qcow2", "-o", opts, name, size)
    qemu.io(
        name,
        "write -P 1 1M 1M",  # allocated first: lies before [0, 1M) on the host
        "write -P 2 0 1M",
        "write -P 3 2M 2M",
        "write -z 3M 64k",  # a zero cluster inside the run: it splits there
        "write -c -P 4 4M 64k",  # a compressed cluster after it
        "write -P 3 4160k 960k",  # and the run going on past it
        "write -P 5 6M 9000",  # a partial last cluster of a run
    )


@pytest.mark.parametrize(
    "opts,size",
    [
        ("cluster_size=65536", "8M"),
        ("cluster_size=4096", "8M"),  # 2 MiB per L2 table: runs cross tables
        ("cluster_size=512", "7M"),  # 32 KiB per L2 table
        ("cluster_size=65536,compat=0.10", "8M"),
    ],
)
def test_map_runs_match_qemu(qemu: Qemu, tmp_path: Path, opts: str, size: str) -> None:
    name = str(tmp_path / "img.qcow2")
    if "compat=0.10" in opts:
        # v2 has no zero flag: the run is split by a discard (unallocated) instead.
        qemu.img("create", "-q", "-f", "qcow2", "-o", opts, name, size)
        qemu.io(name, "write -P 1 1M 1M", "write -P 2 0 1M", "write -P 3 2M 2M")
        qemu.io(name, "discard 3M 64k", "write -c -P 4 4M 64k", "write -P 3 4160k 960k")
        qemu.io(name, "write -P 5 6M 9000")
    else:
        _layout(qemu, name, opts, size)
    want = json.loads(qemu.img("map", "--output=json", name).stdout)
    with qcow2aio.open(name, "r") as img:
        assert img.map_sync() == want
        # Every data extent of a plan of the whole disk lies where qemu-img map says.
        plan = map_read(img.meta, 0, img.size, False)
        data = [(e.guest, e.length, e.host) for e in plan if e.kind == DATA]
        qemu_data = [
            (r["start"], r["length"], r["offset"]) for r in want if r["data"] and "offset" in r
        ]
        assert data == qemu_data
        # Plans of ranges starting and ending inside runs read back what was written.
        for start, length, pattern in (
            (512, (1 << 20) - 1024, 2),
            ((1 << 20) + 4096, 100_000, 1),
            ((2 << 20) + 512, (1 << 20) - 1024, 3),
            (6 << 20, 9000, 5),
        ):
            assert img.read_sync(start, length) == bytes([pattern]) * length
