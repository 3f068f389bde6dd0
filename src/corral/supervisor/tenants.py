"""The rule for tenant keys, defined once: :func:`check_tenant`.

Covers: what a tenant key may be, and the error for one that breaks the rule. Every
public entry point that takes a tenant (``call``, ``invoke``, ``get_or_create``,
``evict``, ``in``, and the sync facade's) applies it, and so should anything that
takes keys from outside (the HTTP gateway checks a key before it routes it). Not
here: how text from workers is made safe to log (:mod:`corral._text`).

A key is 1 to 128 characters (so bytes: it is ASCII), each an ASCII letter, digit or
one of ``. _ - : @ +``, the first a letter or digit. That takes UUIDs, slugs, numeric
ids, e-mail addresses (``alice+eu@example.com``) and composite keys
(``org:project``), and keeps every place a key goes safe without escaping: a log line
(no newline, control character, space or quote), a URL path segment (no ``/``, ``%``,
``?`` or ``#``, and never ``.`` or ``..``), a command-line argument (never an
option), a metric label and a dashboard row (bounded, no look-alike letters from other
scripts, no bidirectional controls). Why this rule and not another: ARCHITECTURE.md,
Decisions.
"""

from __future__ import annotations

import re

from corral.errors import InvalidCallError

__all__ = ["TENANT_MAX_BYTES", "TENANT_RULE", "check_tenant"]

TENANT_MAX_BYTES = 128
"""The longest tenant key, in bytes (= characters: keys are ASCII)."""

TENANT_RULE = (
    f"1 to {TENANT_MAX_BYTES} characters, each an ASCII letter, digit or one of . _ - : @ +, "
    "the first a letter or digit"
)
"""The rule in words, as error messages give it."""

_PUNCTUATION = "._-:@+"
_KEY = re.compile(rf"[A-Za-z0-9][A-Za-z0-9{re.escape(_PUNCTUATION)}]{{0,{TENANT_MAX_BYTES - 1}}}")


def check_tenant(tenant: object) -> None:
    """Refuse a tenant key that breaks the rule (:data:`TENANT_RULE`).

    A key a worker is running for has passed it already, so the supervisor checks only
    keys it does not have (a warm call pays nothing). About 0.2 µs otherwise.

    Raises:
        InvalidCallError: with ``kind == "tenant"``; the message says what is wrong and
            shows at most the first 32 characters of the key, escaped.
    """
    if type(tenant) is str or isinstance(tenant, str):
        if _KEY.fullmatch(tenant) is not None:
            return
        raise InvalidCallError(f"invalid tenant key {_describe(tenant)}", kind="tenant")
    raise InvalidCallError(
        f"tenant key must be a str ({TENANT_RULE}), got {type(tenant).__name__}", kind="tenant"
    )


def _describe(tenant: str) -> str:
    """What is wrong with ``tenant`` (which breaks the rule), without echoing it whole."""
    shown = repr(tenant[:32]) + ("..." if len(tenant) > 32 else "")  # repr escapes controls
    if not tenant:
        why = "it is empty"
    elif len(tenant) > TENANT_MAX_BYTES:
        why = f"it is {len(tenant)} characters long"
    elif not (tenant[0].isascii() and tenant[0].isalnum()):
        why = f"it starts with {tenant[0]!r}"
    else:
        bad = next(c for c in tenant if not (c.isascii() and (c.isalnum() or c in _PUNCTUATION)))
        why = f"it contains {bad!r}"
    return f"{shown}: {why}; a key is {TENANT_RULE}"
