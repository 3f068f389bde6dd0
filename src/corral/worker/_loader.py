"""Turn the factory reference of a ``Start`` message into a kernel object."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from corral.ipc import Start


def load_factory(start: Start) -> Callable[[str], Any]:
    """Resolve ``"pkg.module:attr.path"`` or unpickle the dill blob (trusted: it comes
    from the supervisor). ``start.sys_path`` entries missing here are appended."""
    for entry in start.sys_path:
        if entry not in sys.path:
            sys.path.append(entry)
    if start.factory_blob is not None:
        import dill  # only needed for callable factories

        factory = dill.loads(start.factory_blob)
    else:
        assert start.factory is not None
        module_name, _, attr_path = start.factory.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in attr_path.split("."):
            obj = getattr(obj, part)
        factory = obj
    if not callable(factory):
        raise TypeError(f"factory {start.factory!r} is not callable")
    return factory  # type: ignore[no-any-return]
