"""Image operations (snapshot create/apply/delete, resize) in the middle of concurrent I/O.

Two parts:

* Direct tests of the drain (``Image._exclusive``): an operation called under a
  continuous stream of requests completes within a bounded number of them (new
  requests wait at the admission gate until it has finished, requests already in
  flight finish first), from a coroutine and from a thread, and a sub-sector write
  on an encrypted image (which reads while holding its sectors) does not deadlock
  with it.
* The seeded race harness (tests/sim.py) with operations: scenario ``ops_mid_io``
  (see :func:`ops_mid_io`), through the async and sync drivers and a control whose
  operations do not drain, which the snapshot-aware oracle must catch.
"""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import Qemu

import qcow2aio

MiB = 1 << 20


# ------------------------------------------------------------ the drain
def _busy_image(qemu: Qemu, path: Path, cs: int = 4096) -> qcow2aio.Image:
    qemu.img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", str(path), "4M")
    img = qcow2aio.open(path, "r+")
    # Every write step through apwritev, which yields to the loop a few times around
    # the real write: requests stay registered across awaits, so a stream of them
    # overlaps and the image is never idle by itself.
    real = img._data.apwritev
    rng = random.Random(7)

    async def apwritev(*args: Any, **kwargs: Any) -> None:
        for _ in range(rng.randint(1, 4)):
            await asyncio.sleep(0)
        await real(*args, **kwargs)

    img._data.apwritev = apwritev  # type: ignore[method-assign]
    img._data.plain_writes = False
    return img


async def _op(img: qcow2aio.Image, op: str, via_thread: bool) -> None:
    calls = {
        "create": ("create_snapshot", ("s1",)),
        "apply": ("apply_snapshot", ("base",)),
        "delete": ("delete_snapshot", ("base",)),
        "grow": ("resize", (8 * MiB,)),
    }
    if op == "shrink":
        if via_thread:
            await asyncio.to_thread(img.resize_sync, 2 * MiB, shrink=True)
        else:
            await img.resize(2 * MiB, shrink=True)
        return
    name, args = calls[op]
    if via_thread:
        await asyncio.to_thread(getattr(img, f"{name}_sync"), *args)
    else:
        await getattr(img, name)(*args)


@pytest.mark.parametrize("via_thread", [False, True], ids=["coroutine", "thread"])
@pytest.mark.parametrize("op", ["create", "apply", "delete", "grow", "shrink"])
async def test_operation_completes_under_a_continuous_stream_of_requests(
    qemu: Qemu, tmp_path: Path, op: str, via_thread: bool
) -> None:
    """Six tasks write (and read) without pause, always with several requests in
    flight. The operation must finish while they keep going, after a bounded number
    of requests: those in flight when it was called. A request that started after the
    gate closed must not complete before the operation has (it waited at the gate).
    Before the gate, the drain never found the image idle: the operation waited
    until the writers stopped (here: after the cap), and this test failed."""
    img = _busy_image(qemu, tmp_path / "busy.qcow2")
    await img.write(0, b"b" * 8192)
    await img.create_snapshot("base")
    rng = random.Random(op)
    stop = False
    done = 0
    cap = 3000
    after_gate: list[tuple[bool, bool]] = []  # (started gated, op finished when done)
    op_done = False

    async def worker(k: int) -> None:
        nonlocal done
        while not stop and done < cap:
            off = rng.randrange(0, 2 * MiB - 8192, 512)
            gated = img._ops_gated > 0
            if k % 3 == 2:
                await img.read(off, 4096)
            else:
                await img.write(off, rng.randbytes(rng.choice([512, 4096, 6000])))
            done += 1
            await asyncio.sleep(0)
            if gated:
                after_gate.append((gated, op_done))

    workers = [asyncio.ensure_future(worker(k)) for k in range(6)]
    while done < 50:
        await asyncio.sleep(0)
    before = done
    await _op(img, op, via_thread)
    op_done = True
    during = done - before
    stop = True
    await asyncio.gather(*workers)
    assert done < cap, "the operation only finished once the writers had stopped"
    # At most the requests in flight when it was called, one per worker (plus, for a
    # thread, those a worker started before the thread closed the gate).
    bound = 6 if not via_thread else 6 * 40
    assert during <= bound, f"{during} requests completed while the operation waited"
    assert after_gate, "no request ever met the closed gate: the test did not race"
    early = [x for x in after_gate if not x[1]]
    if not via_thread:
        # In one loop, a request that saw the gate closed waited for the operation.
        assert not early, f"{len(early)} requests started after the gate closed finished first"
    await img.aclose()
    rc, report = qemu.check(tmp_path / "busy.qcow2")
    assert rc == 0 and not report.get("leaks") and not report.get("corruptions"), report


@pytest.mark.parametrize("crypt", ["luks", "aes"])
async def test_sub_sector_write_reads_pass_the_closed_gate(tmp_path: Path, crypt: str) -> None:
    """An unaligned write to an encrypted image holds its sectors while it reads them.
    If those reads waited at the gate of an operation whose drain waits for a
    write-zeroes blocked on the same sectors, nothing would ever move. Here: the
    sub-sector write reads while an operation is draining (gate closed) and a
    registered write-zeroes waits for its sectors; all three must finish."""
    from sim import crypt_create, crypt_open

    path = tmp_path / "e.qcow2"
    qcow2aio.create(path, 1 * MiB, cluster_size=4096, **crypt_create(crypt))
    img = qcow2aio.open(path, "r+", **crypt_open(crypt))
    await img.write(0, b"a" * 8192)
    # Hold the first data write in flight so the operation has something to drain.
    gate = asyncio.Event()
    real = img._data.apwritev
    held = 0

    async def slow(*args: Any, **kwargs: Any) -> None:
        nonlocal held
        if held == 0:
            held += 1
            await gate.wait()
        await real(*args, **kwargs)

    img._data.plain_writes = False
    img._data.apwritev = slow  # type: ignore[method-assign]
    w0 = asyncio.ensure_future(img.write(65536, b"w" * 4096))  # registered, held
    for _ in range(5):
        await asyncio.sleep(0)
    real_readinto = img.readinto
    in_read = asyncio.Event()
    go_on = asyncio.Event()

    async def readinto(buf: memoryview, off: int) -> None:
        in_read.set()
        await go_on.wait()
        await real_readinto(buf, off)

    img.readinto = readinto  # type: ignore[method-assign]
    rmw = asyncio.ensure_future(img.write(100, b"x" * 10))  # holds sector 0, then reads
    await in_read.wait()
    zero = asyncio.ensure_future(img.write_zeroes(0, 4096))  # registered, blocked on sector 0
    for _ in range(5):
        await asyncio.sleep(0)
    op = asyncio.ensure_future(img.create_snapshot("s"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert img._ops_gated and not op.done()
    go_on.set()
    for _ in range(20):
        await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(asyncio.gather(w0, rmw, zero, op), 10)
    img.readinto = real_readinto  # type: ignore[method-assign]
    assert await img.read(0, 4096) == bytes(4096)
    await img.aclose()


async def test_sync_request_in_a_loop_thread_is_busy_while_the_gate_is_closed(
    qemu: Qemu, tmp_path: Path
) -> None:
    """A synchronous call in a thread that runs a loop never waits: while an
    operation drains it raises ImageBusyError, having done nothing; a thread with no
    loop waits for the operation and then runs."""
    img = _busy_image(qemu, tmp_path / "b.qcow2")
    gate = asyncio.Event()
    real = img._data.apwritev

    async def slow(*args: Any, **kwargs: Any) -> None:
        await gate.wait()
        await real(*args, **kwargs)

    img._data.apwritev = slow  # type: ignore[method-assign]
    w = asyncio.ensure_future(img.write(0, b"w" * 4096))
    await asyncio.sleep(0)
    op = asyncio.ensure_future(img.create_snapshot("s"))
    await asyncio.sleep(0)
    assert img._ops_gated
    with pytest.raises(qcow2aio.ImageBusyError):
        img.write_sync(8192, b"s" * 512)
    with pytest.raises(qcow2aio.ImageBusyError):
        img.read_sync(0, 512)
    result: list[bytes] = []
    t = threading.Thread(target=lambda: result.append(img.read_sync(0, 4096)))
    t.start()
    await asyncio.sleep(0.05)
    assert not result, "a thread without a loop read while the gate was closed"
    img._data.apwritev = real  # type: ignore[method-assign]
    gate.set()
    await asyncio.gather(w, op)
    await asyncio.to_thread(t.join, 10)
    assert result == [b"w" * 4096]
    snaps = [s["name"] for s in img.snapshots()]
    assert snaps == ["s"]
    await img.aclose()
