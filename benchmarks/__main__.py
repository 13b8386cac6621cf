"""``python -m benchmarks [-k PATTERN] [--quick] [--reps N] [--json PATH]``."""

from __future__ import annotations

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
