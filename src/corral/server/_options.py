"""Supervisor options from text: command-line flags and a TOML config file.

Every option of :class:`corral.Supervisor` whose value can be written down (numbers,
sizes, durations, names, the sandbox preset, the environment) gets a flag named after
it (``--max-workers``, ``--worker-memory-hard-limit``, ...) and a key of the same name
in the ``[supervisor]`` table of a config file. The table is derived from the
constructor's signature, so a new option appears here without a change. Options that
take code (``on_event``, ``launcher``, ``probe``, ``clock``) are for embedding only.

Not here: the HTTP app (``_app``), the command itself (``corral.cli._serve``).
"""

from __future__ import annotations

import argparse
import inspect
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from corral.supervisor._api import Supervisor
from corral.supervisor.sandbox import Sandbox

__all__ = ["OPTIONS", "Option", "add_flags", "from_flags", "from_toml", "parse_size"]

_CODE_OPTIONS = {"factory", "on_event", "launcher", "probe", "clock"}
_SIZES = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 2**20, "mb": 10**6,
          "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30}  # fmt: skip
_SANDBOXES: dict[str, Callable[[], Sandbox]] = {
    "none": Sandbox.none,
    "default": Sandbox.default,
    "strict": Sandbox.strict,
}


def parse_size(text: str) -> int:
    """``"256MiB"``, ``"1.5 GiB"``, ``"4096"`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZES:
        raise ValueError(f"not a size: {text!r} (e.g. 4096, 512MiB, 2GiB)")
    return int(float(match.group(1)) * _SIZES[unit])


class Option:
    """One Supervisor option as text: its name, its kind, how to parse it."""

    def __init__(self, name: str, annotation: Any, default: Any) -> None:
        self.name = name
        self.flag = "--" + name.replace("_", "-")
        self.default = default
        self.choices: tuple[str, ...] = ()
        kinds = _kinds(annotation)
        self.optional = type(None) in kinds
        (hint,) = [k for k in kinds if k is not type(None)]
        origin = typing.get_origin(hint)
        if origin is typing.Literal:
            self.kind, self.choices = "choice", tuple(str(c) for c in typing.get_args(hint))
        elif hint is Sandbox:
            self.kind, self.choices = "sandbox", tuple(_SANDBOXES)
        elif hint is bool:
            self.kind = "bool"
        elif hint is int:
            self.kind = "size" if "memory" in name or "bytes" in name else "int"
        elif hint is float:
            self.kind = "float"
        elif hint is str:
            self.kind = "str"
        elif origin is tuple:
            self.kind = "list"
        elif origin in (Mapping, dict):
            self.kind = "env"
        else:
            raise TypeError(f"no text form for Supervisor option {name}: {annotation!r}")

    def from_text(self, text: str) -> Any:
        """Parse a command-line value. Raises ValueError naming the flag."""
        if self.optional and text.strip().lower() in ("none", "off", ""):
            return None
        try:
            return self._parse(text)
        except ValueError as exc:
            raise ValueError(f"{self.flag}: {exc}") from None

    def _parse(self, text: str) -> Any:
        if self.choices and text not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}, got {text!r}")
        if self.kind == "sandbox":
            return _SANDBOXES[text]()
        parsers: dict[str, Callable[[str], Any]] = {
            "choice": str,
            "bool": _boolean,
            "size": parse_size,
            "int": int,
            "float": float,
            "str": str,
            "list": lambda t: tuple(p.strip() for p in t.split(",") if p.strip()),
            "env": _environment,
        }
        return parsers[self.kind](text)

    def from_toml(self, value: object) -> Any:
        """A config-file value: TOML's own type where it has one, else the text form."""
        if isinstance(value, str):
            return self.from_text(value)
        if isinstance(value, bool):
            if self.kind == "bool":
                return value
        elif isinstance(value, int | float):
            if self.kind in ("int", "size") and isinstance(value, int):
                return value
            if self.kind == "float":
                return float(value)
        elif isinstance(value, list):
            if self.kind == "list":
                return tuple(str(v) for v in value)
        elif isinstance(value, dict) and self.kind == "env":
            return {str(k): str(v) for k, v in value.items()}
        raise ValueError(f"{self.name}: expected {self.describe()}, got {value!r}")

    def describe(self) -> str:
        kind = "|".join(self.choices) if self.choices else self.kind.upper()
        kind = {"ENV": "KEY=VALUE,...", "LIST": "A,B,..."}.get(kind, kind)
        return f"{kind} or none" if self.optional else kind


def _kinds(annotation: Any) -> list[Any]:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return list(typing.get_args(annotation))
    return [annotation]


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _environment(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _supervisor_options() -> dict[str, Option]:
    hints = typing.get_type_hints(Supervisor.__init__)
    out = {}
    for name, param in inspect.signature(Supervisor.__init__).parameters.items():
        if name == "self" or name in _CODE_OPTIONS:
            continue
        out[name] = Option(name, hints[name], param.default)
    return out


OPTIONS: dict[str, Option] = _supervisor_options()


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Supervisor option; unset flags stay None (the config file or the
    Supervisor's default applies)."""
    group = parser.add_argument_group("supervisor options (see the README; sizes like 256MiB)")
    for option in OPTIONS.values():
        default = option.default
        shown = "none" if default is None else (default if not callable(default) else "")
        group.add_argument(
            option.flag,
            dest=f"opt_{option.name}",
            metavar=option.describe(),
            default=None,
            help=f"default: {shown}" if shown != "" else None,
        )


def from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line. Raises ValueError naming a bad flag."""
    out = {}
    for option in OPTIONS.values():
        text = getattr(args, f"opt_{option.name}", None)
        if text is not None:
            out[option.name] = option.from_text(text)
    return out


def from_toml(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(server settings, supervisor options)`` from a config file's text: tables
    ``[server]`` and ``[supervisor]``. Raises ValueError for unknown keys or bad values."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file: {exc}") from None
    unknown = set(data) - {"server", "supervisor"}
    if unknown:
        raise ValueError(f"config file: unknown table(s) {sorted(unknown)}")
    supervisor: dict[str, Any] = {}
    for key, value in data.get("supervisor", {}).items():
        if key not in OPTIONS:
            raise ValueError(f"config file: unknown supervisor option {key!r}")
        supervisor[key] = OPTIONS[key].from_toml(value)
    return dict(data.get("server", {})), supervisor
