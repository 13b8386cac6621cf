"""``python -m qcow2aio``: the same command line as the ``qcow2aio`` console script."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
