"""``python -m corral.cli``: the same as the ``corral`` console script."""

import sys

from corral.cli import main

sys.exit(main())
