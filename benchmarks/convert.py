"""A ``qemu-img convert -O qcow2``-like copy loop on qcow2aio, for the convert workload.

Reads the raw source in large chunks, skips holes (``SEEK_DATA``/``SEEK_HOLE``)
and all-zero clusters (one ``memcmp`` per cluster, like QEMU's
``is_allocated_sectors`` at cluster granularity), and writes each run of
non-zero clusters with one ``write_sync``. The qcow2 target is made by
``qcow2aio.create`` with QEMU's defaults; ``close`` flushes it (one fdatasync
per writeback step), as ``qemu-img convert -t writeback`` does on close.
"""

from __future__ import annotations

import errno
import os

import qcow2aio

CHUNK = 4 << 20


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of ``fd`` that may hold data (all of it if SEEK_DATA fails)."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
            out.append((start, end))
            pos = end
    except OSError:
        return [(0, size)]
    return out


def convert_raw_to_qcow2(src: str, dst: str) -> int:
    """Copy raw ``src`` into a new qcow2 image ``dst``; returns the bytes written."""
    fd = os.open(src, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        qcow2aio.create(dst, size)
        written = 0
        with qcow2aio.open(dst, "r+") as img:
            cs = img.cluster_size
            zero = bytes(cs)
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            write = img.write_sync
            for start, end in _data_ranges(fd, size):
                # Cluster-align the range so every write covers whole clusters.
                pos = start & ~(cs - 1)
                end = min(size, (end + cs - 1) & ~(cs - 1))
                while pos < end:
                    n = min(CHUNK, end - pos)
                    got = os.preadv(fd, [view[:n]], pos)
                    if got < n:
                        view[got:n] = bytes(n - got)
                    run_start = -1
                    for c in range(0, n, cs):
                        # bytearray.startswith is one memcmp (a memoryview == is per item).
                        if buf.startswith(zero if n - c >= cs else zero[: n - c], c):
                            if run_start >= 0:
                                write(pos + run_start, view[run_start:c])
                                written += c - run_start
                                run_start = -1
                        elif run_start < 0:
                            run_start = c
                    if run_start >= 0:
                        write(pos + run_start, view[run_start:n])
                        written += n - run_start
                    pos += n
        return written
    finally:
        os.close(fd)
