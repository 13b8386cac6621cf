"""`make demo`: the mission in one run.

Creates a raw base disk and a qcow2 overlay on it, then lets many async
writers hammer overlapping clusters of the overlay (copy-on-write from the
backing file, allocation races resolved by the in-flight list) while the
synchronous fast path reads in between their steps, and worker threads with no
event loop write the same clusters through ``write_sync`` (which waits for the
lock there instead of raising). It flushes, checks every
byte against an oracle, and prints what ``qemu-img info`` and ``qemu-img
check`` would. When QEMU's tools are installed it asks them too. Then the same on
a LUKS-encrypted image, with sub-sector writes sharing every sector. In between,
the overlay is served over NBD while the demo keeps writing to it, and stock NBD
clients (``nbdinfo``, ``qemu-io``) use the export at the same time.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import qcow2aio

SIZE = 64 << 20
WRITERS = 64
WRITES_PER_WRITER = 40
THREADS = 4  # worker threads without an event loop, writing through write_sync
SLOTS = WRITERS + THREADS


async def _run(folder: Path) -> int:
    base = folder / "base.raw"
    rng = random.Random(2009)
    base_data = rng.randbytes(SIZE // 2)
    base.write_bytes(base_data)
    overlay = folder / "overlay.qcow2"
    qcow2aio.create(overlay, SIZE, backing_file="base.raw", backing_fmt="raw")
    print(
        f"created {overlay.name}: {SIZE >> 20} MiB qcow2 over {base.name} "
        f"({len(base_data) >> 20} MiB raw)"
    )

    oracle = bytearray(SIZE)
    oracle[: len(base_data)] = base_data
    busy = sync_reads = sync_writes = 0
    async with qcow2aio.open(overlay, "r+") as img:
        # Each writer owns interleaved 4 KiB slots, so writers share clusters (and race
        # to allocate them) but never the same bytes: the oracle stays exact.
        async def writer(w: int, phase: int) -> None:
            nonlocal busy, sync_reads, sync_writes
            wr = random.Random(w * 1000 + phase)
            for i in range(WRITES_PER_WRITER):
                slot = wr.randrange(0, SIZE // 4096 // SLOTS) * SLOTS + w
                off = slot * 4096 + wr.randrange(0, 2048)
                data = bytes([w + 1]) * wr.randrange(1, 2048)
                oracle[off : off + len(data)] = data
                if i % 2 and phase == 1:
                    # The synchronous fast path, between other requests' steps: it
                    # runs to completion or says at once that it would have to wait.
                    try:
                        img.write_sync(off, data)
                        sync_writes += 1
                    except qcow2aio.ImageBusyError:
                        busy += 1
                        await img.write(off, data)
                else:
                    await img.write(off, data)
                if phase == 1:
                    got = img.read_sync(off, len(data))
                    sync_reads += 1
                else:
                    got = await img.read(off, len(data))
                assert got == data, "read saw stale data"

        thread_writes = [0] * THREADS
        errors: list[BaseException] = []

        def worker(t: int) -> None:
            # No event loop in this thread: write_sync waits for the lock and for
            # in-flight allocations of the loop's writers instead of raising.
            w = WRITERS + t
            wr = random.Random(w)
            try:
                for _ in range(WRITES_PER_WRITER * 4):
                    slot = wr.randrange(0, SIZE // 4096 // SLOTS) * SLOTS + w
                    off = slot * 4096 + wr.randrange(0, 2048)
                    data = bytes([w + 1]) * wr.randrange(1, 2048)
                    oracle[off : off + len(data)] = data
                    img.write_sync(off, data)
                    thread_writes[t] += 1
            except BaseException as exc:
                errors.append(exc)

        t0 = time.perf_counter()
        await asyncio.gather(*(writer(w, 1) for w in range(WRITERS)))
        await img.flush()
        elapsed = time.perf_counter() - t0
        print(
            f"{WRITERS} writers x {WRITES_PER_WRITER} writes in {elapsed:.2f} s: "
            f"{sync_writes} through write_sync ({busy} more found an in-flight allocation, "
            f"ImageBusyError, and went async), {sync_reads} read_sync checks in between"
        )
        # Then threads too: write_sync in threads with no event loop (they wait for the
        # lock and for the loop's allocations in flight) beside the loop's writers.
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        await asyncio.gather(*(writer(w, 2) for w in range(WRITERS)))
        for th in threads:
            await asyncio.to_thread(th.join)
        if errors:
            raise errors[0]
        await img.flush()
        elapsed = time.perf_counter() - t0
        print(
            f"{WRITERS} writers x {WRITES_PER_WRITER} writes on the loop beside {THREADS} "
            f"threads x {WRITES_PER_WRITER * 4} write_sync in {elapsed:.2f} s: "
            f"{sum(thread_writes)} write_sync in the threads, each waiting its turn "
            "instead of raising ImageBusyError"
        )
        ok = await img.read(0, SIZE) == bytes(oracle)
        print("every byte matches the oracle:", "yes" if ok else "NO")
        print("\n$ qcow2aio info --output=json overlay.qcow2")
        print(json.dumps(img.info(), indent=4))
        report = img.check()
    print("\n$ qcow2aio check --output=json overlay.qcow2")
    print(json.dumps(report, indent=4))
    if shutil.which("qemu-img"):
        print("\n$ qemu-img check overlay.qcow2")
        proc = subprocess.run(["qemu-img", "check", str(overlay)], capture_output=True, text=True)
        print(proc.stdout.strip())
        if proc.returncode != 0:
            ok = False
        (folder / "oracle.raw").write_bytes(oracle)
        cmp = subprocess.run(
            [
                "qemu-img",
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                str(overlay),
                str(folder / "oracle.raw"),
            ],
            capture_output=True,
            text=True,
        )
        print("$ qemu-img compare overlay.qcow2 oracle.raw\n" + cmp.stdout.strip())
        ok = ok and cmp.returncode == 0
    return 0 if ok and report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0 else 1


ENC_SIZE = 16 << 20
ENC_WRITERS = 32
PASSPHRASE = "demo passphrase"


async def _encrypted(folder: Path) -> int:
    """A LUKS image (aes-256-xts, IVs from the host sector) written by many async
    writers whose writes share 512-byte sectors but never bytes: each sub-sector write
    reads, merges and re-encrypts whole sectors, serialized against every other write
    of those sectors, so the oracle stays exact. QEMU then checks and compares it."""
    path = folder / "secret.qcow2"
    qcow2aio.create(
        path, ENC_SIZE, encrypt_format="luks", passphrase=PASSPHRASE, encrypt_iter_time=200
    )
    print(f"\ncreated {path.name}: {ENC_SIZE >> 20} MiB qcow2, LUKS aes-256-xts")
    oracle = bytearray(ENC_SIZE)
    async with qcow2aio.open(path, "r+", passphrase=PASSPHRASE) as img:

        async def writer(w: int) -> None:
            wr = random.Random(7000 + w)
            for _ in range(WRITES_PER_WRITER):
                # Byte slots of 16 interleaved by writer: every sector has 32 owners.
                slot = wr.randrange(0, ENC_SIZE // 16 // ENC_WRITERS) * ENC_WRITERS + w
                off = slot * 16
                data = bytes([0x80 + w]) * 16
                oracle[off : off + 16] = data
                await img.write(off, data)

        t0 = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(ENC_WRITERS)))
        await img.flush()
        elapsed = time.perf_counter() - t0
        ok = await img.read(0, ENC_SIZE) == bytes(oracle)
        print(
            f"{ENC_WRITERS} writers x {WRITES_PER_WRITER} sub-sector writes in {elapsed:.2f} s; "
            f"every byte matches the oracle: {'yes' if ok else 'NO'}"
        )
        enc = img.info()["format-specific"]["data"]["encrypt"]
        print(
            f"encrypt: {enc['format']} {enc['cipher-alg']}-{enc['cipher-mode']}-{enc['ivgen-alg']}"
        )
        report = img.check()
    ok = ok and report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0
    if shutil.which("qemu-img"):
        (folder / "secret-oracle.raw").write_bytes(oracle)
        secret = ["--object", f"secret,id=s0,data={PASSPHRASE}", "--image-opts"]
        opts = f"driver=qcow2,file.filename={path},encrypt.key-secret=s0"
        for argv, label in (
            (["check", *secret, opts], "qemu-img check --object secret,... secret.qcow2"),
            (
                [
                    "compare",
                    *secret,
                    opts,
                    f"driver=raw,file.filename={folder / 'secret-oracle.raw'}",
                ],
                "qemu-img compare --object secret,... secret.qcow2 secret-oracle.raw",
            ),
        ):
            proc = subprocess.run(["qemu-img", *argv], capture_output=True, text=True)
            print(f"$ {label}\n{proc.stdout.strip()}")
            ok = ok and proc.returncode == 0
    return 0 if ok else 1


async def _exported(folder: Path) -> int:
    """The overlay served over NBD (``qcow2aio.nbd.serve``) while the service keeps
    writing to it itself; stock clients (nbdinfo, qemu-io) use it at the same time.
    A persistent dirty bitmap added first records every write, as an incremental
    backup needs: the export shows it (``qemu:dirty-bitmap:backup``), and QEMU reads
    the stored bitmap afterwards."""
    from .nbd import Export, serve

    path = folder / "overlay.qcow2"
    sock = str(folder / "nbd.sock")
    uri = f"nbd+unix:///disk?socket={sock}"
    print(f"\nserving {path.name} as NBD export 'disk' on {sock}")
    ok = True
    async with qcow2aio.open(path, "r+") as img:
        await img.add_bitmap("backup")
        export = Export(
            img,
            name="disk",
            description="demo overlay",
            multi_conn=True,
            allocation_depth=True,
            bitmaps=["backup"],
        )
        async with await serve(export, unix_path=sock, max_clients=4):

            async def service() -> None:  # the service's own writes, meanwhile
                for i in range(64):
                    await img.write(SIZE - (i + 1) * 65536, bytes([i + 1]) * 4096)

            async def tool(*argv: str) -> subprocess.CompletedProcess[str]:
                return await asyncio.to_thread(
                    subprocess.run, list(argv), capture_output=True, text=True
                )

            calls = [tool("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", uri)]
            if shutil.which("nbdinfo"):
                calls += [tool("nbdinfo", "--json", uri), tool("nbdinfo", "--map", uri)]
            done = await asyncio.gather(service(), *calls)
            if shutil.which("nbdinfo"):  # what changed since the bitmap was added
                done.append(await tool("nbdinfo", "--map=qemu:dirty-bitmap:backup", uri))
            for proc in done[1:]:
                assert isinstance(proc, subprocess.CompletedProcess)
                ok = ok and proc.returncode == 0
                print(f"$ {' '.join(proc.args[:-1])} URI\n{proc.stdout.rstrip()[:1500]}")
        written = [(SIZE - (i + 1) * 65536, 65536) for i in reversed(range(64))]
        want = [(1 << 20, 65536), *written]  # qemu-io's write, then the service's
        merged: list[tuple[int, int]] = []
        for off, n in want:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((off, n))
        dirty = img.dirty_extents("backup")
        print(f"dirty ranges for the next incremental backup: {dirty}")
        ok = ok and dirty == merged
        got = await img.read(1 << 20, 65536)
        ok = ok and got == b"\x5a" * 65536
    proc = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    print(f"$ qemu-img check overlay.qcow2 (after the export)\n{proc.stdout.strip()}")
    info = subprocess.run(["qemu-img", "info", str(path)], capture_output=True, text=True)
    shown = info.stdout[info.stdout.find("    bitmaps:") :].split("    refcount bits")[0]
    print(f"$ qemu-img info overlay.qcow2 (the bitmap as QEMU reads it)\n{shown.rstrip()}")
    ok = ok and info.returncode == 0 and "name: backup" in shown and "in-use" not in shown
    return 0 if ok and proc.returncode == 0 else 1


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="qcow2aio-demo-") as tmp:
        rc = asyncio.run(_run(Path(tmp)))
        if shutil.which("qemu-io"):
            rc = asyncio.run(_exported(Path(tmp))) or rc
        return asyncio.run(_encrypted(Path(tmp))) or rc


if __name__ == "__main__":
    sys.exit(main())
