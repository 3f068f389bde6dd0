"""Tenant plugins that live in directories of their own (for per-tenant policy tests).

``load(directory, tenant)`` imports ``<directory>/plugin.py`` by path (the directory is
not on ``sys.path``) and calls its ``make(tenant)``: what a host does whose tenants
each ship their plugin into a directory of their own. Carried to the worker as
``functools.partial(load, directory)``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

PLUGIN_SOURCE = '''
import os


class Plugin:
    def __init__(self, tenant):
        self.tenant = tenant
        self.home = os.path.dirname(os.path.abspath(__file__))

    def whoami(self):
        return {"tenant": self.tenant, "home": self.home}

    def read(self, path):
        """The file's text, or the errno name of why it cannot be read."""
        try:
            with open(path) as f:
                return f.read()
        except OSError as exc:
            import errno
            return errno.errorcode.get(exc.errno, str(exc.errno))


def make(tenant):
    return Plugin(tenant)
'''


def load(directory: str, tenant: str) -> Any:
    spec = importlib.util.spec_from_file_location(
        f"plugin_{tenant.replace('-', '_')}", f"{directory}/plugin.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make(tenant)
