"""The metadata map behind the overlap checks."""

from __future__ import annotations

from qcow2aio.overlap import MetaMap


def test_single_clusters_and_ranges() -> None:
    m = MetaMap(16)
    m.add(0, 65536, "header")
    m.add(0x30000, 16, "l1")  # one cluster
    m.add(0x100000, 5 * 65536, "reftable")  # a range
    m.add(0x40000, 65536, "l2")
    assert list(m.kinds_in(0x50000, 65536)) == []
    assert list(m.kinds_in(0x3FFFF, 2)) == ["l1", "l2"]
    assert list(m.kinds_in(0x120000, 1)) == ["reftable"]
    assert list(m.kinds_in(0xF0000, 0x20000)) == ["reftable"]
    assert m.only(0x40000, 65536, "l2") is None
    assert m.only(0x40000, 65536, "refblock") == "l2"
    assert m.only(0x110000, 4096, "reftable") is None
    assert m.only(0x140000, 0x20000, "reftable") == "data"  # runs past the table
    assert m.only(0x50000, 10, "l2") == "data"
    m.remove(0x100000, 5 * 65536)
    m.remove(0x40000, 65536)
    assert list(m.kinds_in(0x100000, 5 * 65536)) == []
    assert m.only(0x40000, 65536, "l2") == "data"


def test_add_many_equals_add() -> None:
    items = [(i * 0x200000, 0x30000, "inactive_l1") for i in range(100, 0, -1)]
    a, b = MetaMap(9), MetaMap(9)
    for it in items:
        a.add(*it)
    b.add_many(items)
    for off in range(0, 101 * 0x200000, 0x10000):
        assert list(a.kinds_in(off, 0x200)) == list(b.kinds_in(off, 0x200))


def test_large_write_over_many_single_clusters() -> None:
    m = MetaMap(9)
    for c in range(0, 10000, 7):
        m.add(c * 512, 512, "l2")
    kinds = list(m.kinds_in(0, 10000 * 512))
    assert len(kinds) == len(range(0, 10000, 7))
