"""What the local :class:`~corral.Supervisor` and the cluster front end
(:mod:`corral.cluster._front`) share so that both refuse a call the same way: the
method-name rule.

Not here: the tenant key rule (:mod:`corral.supervisor.tenants`), the events buffer
(:mod:`corral.supervisor.events`), argument encoding (each front end sends its own
frame; the local one keeps it inline on the warm path).
"""

from __future__ import annotations

from corral.errors import InvalidCallError

__all__ = ["check_method"]

_METHOD_NAMES_KEPT = 4096  # names remembered as checked; beyond, each is checked again


def check_method(method: object, checked: set[str]) -> None:
    """Refuse a method name that is not a public identifier; remember a good one in
    ``checked`` (a caller tests ``method in checked`` first, so a known name costs a set
    lookup only).

    Raises:
        InvalidCallError: with ``kind == "method"``.
    """
    if not isinstance(method, str) or not method.isidentifier() or method.startswith("_"):
        raise InvalidCallError(f"method must be a public identifier, got {method!r}", kind="method")
    if len(checked) < _METHOD_NAMES_KEPT:
        checked.add(method)
