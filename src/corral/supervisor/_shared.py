"""What the local :class:`~corral.Supervisor` and the cluster front end
(:mod:`corral.cluster._front`) share so that both refuse a call the same way: the
method-name rule, and the strict decoders of callers' result types.

Not here: the tenant key rule (:mod:`corral.supervisor.tenants`), the events buffer
(:mod:`corral.supervisor.events`), argument encoding (each front end sends its own
frame; the local one keeps it inline on the warm path).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from corral.errors import InvalidCallError

__all__ = ["ResultDecoders", "check_method"]

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


class ResultDecoders:
    r"""Strict msgpack decoders into callers' ``result_type``\ s, made once per type (the
    last :data:`KEPT` types kept)."""

    KEPT = 256

    def __init__(self) -> None:
        self._kept: dict[Any, Callable[[bytes | msgspec.Raw], Any]] = {}

    def get(self, result_type: Any) -> Callable[[bytes | msgspec.Raw], Any]:
        """The decoder into ``result_type``.

        Raises:
            InvalidCallError: with ``kind == "result_type"``: msgspec cannot decode into it.
        """
        try:
            return self._kept[result_type]
        except KeyError:
            pass
        except TypeError:  # an unhashable type: made each time
            return _new_decoder(result_type)
        decode = _new_decoder(result_type)
        if len(self._kept) >= self.KEPT:
            self._kept.pop(next(iter(self._kept)))
        self._kept[result_type] = decode
        return decode


def _new_decoder(result_type: Any) -> Callable[[bytes | msgspec.Raw], Any]:
    try:
        return msgspec.msgpack.Decoder(result_type, strict=True).decode
    except TypeError as exc:
        raise InvalidCallError(
            f"result_type {result_type!r} is not a type msgspec can decode into: {exc}",
            kind="result_type",
        ) from exc
