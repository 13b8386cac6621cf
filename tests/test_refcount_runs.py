"""Refcount runs: the slice fast paths agree with entry-by-entry access, and the
allocator's shortcut gives the same first fit as its search."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import Qemu

import qcow2aio
from qcow2aio.refcount import RefcountBlock


@pytest.mark.parametrize("order", range(7))
def test_runs_match_entry_access(order: int) -> None:
    rng = random.Random(order)
    size = 512
    nentries = size * 8 >> order
    top = (1 << (1 << order)) - 1
    for _ in range(200):
        data = bytearray(size)
        blk = RefcountBlock(0, data, order)
        # Mostly zero entries with a few set ones, so free runs of every length occur.
        for i in rng.sample(range(nentries), rng.randrange(0, 8)):
            blk.set(i, rng.randint(1, top))
        index = rng.randrange(nentries)
        n = rng.randint(1, nentries - index)
        assert blk.is_free_run(index, n) == all(blk.get(i) == 0 for i in range(index, index + n))
        before = [blk.get(i) for i in range(nentries)]
        value = rng.randint(0, top)
        blk.dirty = False
        blk.set_run(index, n, value)
        assert blk.dirty
        expect = before[:index] + [value] * n + before[index + n :]
        assert [blk.get(i) for i in range(nentries)] == expect


@pytest.mark.parametrize("cache", ["default", "one-block"])
@pytest.mark.parametrize("refcount_bits", [1, 16])
def test_allocation_is_first_fit(
    qemu: Qemu, tmp_path: Path, refcount_bits: int, cache: str
) -> None:
    """Allocations over a refcount landscape with holes, across refcount-block edges
    (512-byte clusters: 256 or 4096 entries per block) are first fit from the
    search start, counted once, and never hand out a used cluster; also with a
    refcount cache of one block, where a run over two blocks evicts the first."""
    path = tmp_path / "a.qcow2"
    qemu.img(
        "create", "-q", "-f", "qcow2", "-o",
        f"cluster_size=512,refcount_bits={refcount_bits}", str(path), "64M",
    )  # fmt: skip
    rng = random.Random(refcount_bits)
    rc_cache = 512 if cache == "one-block" else None
    with qcow2aio.open(path, "r+", refcount_cache_size=rc_cache) as img:
        alloc = img.meta.allocator
        assert alloc is not None
        cs = img.meta.cluster_size
        live: list[tuple[int, int]] = []
        for _ in range(400):
            if live and rng.random() < 0.4:
                off, n = live.pop(rng.randrange(len(live)))
                alloc.update_refcount(off, n * cs, -1)
                continue
            n = rng.choice([1, 1, 2, 3, 16, 40])
            start = alloc.free_cluster_index
            reftable_before = list(img.meta.reftable.entries)
            # Past the file's end and every live run, clusters are free (the margin
            # covers refcount blocks created in memory since the file was written).
            end = max([path.stat().st_size // cs] + [o // cs + k for o, k in live]) + 64
            used_before = [alloc.refcount(c) for c in range(start, end)]
            off = alloc.alloc_clusters(n)
            first = off // cs
            used_before += [0] * (first + n - start - len(used_before))
            assert all(alloc.refcount(c) == 1 for c in range(first, first + n))
            if list(img.meta.reftable.entries) == reftable_before:
                # No refcount block was created: the run is the first free one.
                assert first >= start
                rel = first - start
                assert all(u == 0 for u in used_before[rel : rel + n])
                for s in range(rel):
                    assert any(used_before[s : s + n]), f"earlier free run at {start + s}"
            live.append((off, n))
        for off, n in live:
            alloc.update_refcount(off, n * cs, -1)
    # What is left allocated is exactly QEMU's view: no leaks, no overlaps.
    qemu.img("check", str(path))
