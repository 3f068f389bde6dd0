"""The command line that starts corral's child-side code in a fresh interpreter.

Shared by the supervisor (starting the warden) and the warden (exec'ing a fresh
worker), so neither imports the other. ``-I`` keeps the interpreter isolated
from ``PYTHON*`` variables, the user site and the current directory; the
directory holding the ``corral`` package is put on ``sys.path`` explicitly.
"""

from __future__ import annotations

__all__ = ["boot_argv"]

_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from corral.worker.__main__ import main; main(sys.argv[2:])"
)


def boot_argv(python: str, corral_root: str, *args: str) -> list[str]:
    """``[python, -I, -c, <boot>, corral_root, *args]``."""
    return [python, "-I", "-c", _BOOT, corral_root, *args]
