"""``python -m corral``: the same command line as ``corral``."""

from __future__ import annotations

import sys

from corral.cli import main

sys.exit(main())
