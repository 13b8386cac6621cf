"""Test-only switches. Nothing here is for production use.

:func:`unserialized` exists so that race tests can prove they are able to
catch races: inside it, newly opened images run **without** the metadata lock
and **without** the in-flight allocation list (everything else unchanged).
A race harness that passes on images opened here proves nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_unserialized_depth = 0


@contextlib.contextmanager
def unserialized() -> Iterator[None]:
    """FOR TESTS ONLY: images opened inside this block skip the metadata lock and the
    in-flight allocation list, so concurrent requests can corrupt them."""
    global _unserialized_depth
    _unserialized_depth += 1
    try:
        yield
    finally:
        _unserialized_depth -= 1


def serialized() -> bool:
    """Whether images opened now use the lock and the in-flight list (the default)."""
    return _unserialized_depth == 0
