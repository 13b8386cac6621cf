"""The writeback order a flush produces, read off a recording backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from conftest import Qemu

import qcow2aio
from qcow2aio.io import Buffer, FileBackend


class Recorder(FileBackend):
    """Logs (kind, event) for every write and every flush, sync or async."""

    log: ClassVar[list[tuple[str, str]]] = []

    def pwritev(self, buffers: Sequence[Buffer], offset: int, event: str = "write") -> None:
        self.log.append(("write", event))
        super().pwritev(buffers, offset, event)

    async def apwritev(self, buffers: Sequence[Buffer], offset: int, event: str = "write") -> None:
        self.log.append(("write", event))
        await super().apwritev(buffers, offset, event)

    def flush(self, event: str = "flush") -> None:
        self.log.append(("sync-flush", event))
        super().flush(event)

    async def aflush(self, event: str = "flush") -> None:
        self.log.append(("async-flush", event))
        await super().aflush(event)


async def test_async_flush_awaits_the_sync_before_new_reftable_entries(
    qemu: Qemu, tmp_path: Path
) -> None:
    """A new refcount block is durable before the table entry naming it, and the async
    flush awaits that sync instead of blocking the event loop with an fdatasync."""
    path = tmp_path / "r.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path), "4M")
    Recorder.log = []
    async with qcow2aio.open(path, "r+", io_backend=Recorder) as img:
        # 512 B clusters, 16-bit refcounts: one block covers 256 clusters (128 KiB), so
        # 1 MiB of data needs new refcount blocks and new refcount-table entries.
        for off in range(0, 1 << 20, 64 << 10):
            img.write_sync(off, b"\x5a" * (64 << 10))
        assert img.meta.reftable.dirty
        Recorder.log.clear()
        await img.flush()
        log = list(Recorder.log)
    assert ("sync-flush", "reftable_update") not in log, log
    first_table = log.index(("write", "reftable_update"))
    last_block = max(i for i, (k, e) in enumerate(log) if k == "write" and e.startswith("refblock"))
    assert last_block < first_table, "\n".join(map(str, log))
    assert any(k == "async-flush" for k, _ in log[last_block:first_table]), log
    assert qemu.check(path)[0] == 0
