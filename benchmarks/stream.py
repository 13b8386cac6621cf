"""A request stream, described the way ``qemu-img bench`` describes one.

Both sides replay exactly the same offsets: QEMU 7.2's ``bench_cb`` issues
request ``k`` at ``(offset + k * step) % image_size``. There is no random mode;
an odd multiple of the request size as the step visits every block once per
pass (``-S 163876864`` = 40009 x 4 KiB walks every 4 KiB block of 1 GiB).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

# 40009 x 4 KiB: odd, so it visits every 4 KiB block of any power-of-two image once.
RANDOM_STEP_4K = 163876864


@dataclass(frozen=True)
class Stream:
    size: int  # bytes per request (-s)
    count: int  # requests (-c)
    image_size: int  # virtual size; offsets wrap modulo it
    step: int = 0  # bytes between consecutive requests (-S); 0 means ``size`` (sequential)
    write: bool = False  # (-w)
    offset: int = 0  # first request (-o)

    @property
    def stride(self) -> int:
        return self.step or self.size

    @property
    def total_bytes(self) -> int:
        return self.size * self.count

    def offsets(self) -> Iterator[int]:
        off = self.offset
        stride = self.stride
        size = self.image_size
        for _ in range(self.count):
            yield off
            off = (off + stride) % size if size else 0

    def offset_list(self) -> list[int]:
        return list(self.offsets())
