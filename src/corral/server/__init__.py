"""corral's HTTP gateway: ``corral serve``, or :func:`create_app` in your own ASGI server.

Needs the ``server`` extra (``pip install 'corral[server]'``: Starlette, uvicorn,
prometheus_client); the core library does not import this package, and this package
imports them only when :func:`create_app` is first looked up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.server._app import DEFAULT_FACTORY, create_app, error_response

__all__ = ["DEFAULT_FACTORY", "create_app", "error_response"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from corral.server import _app

        return getattr(_app, name)
    raise AttributeError(f"module 'corral.server' has no attribute {name!r}")
