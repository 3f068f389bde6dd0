"""``corral serve``'s settings from text: flags, ``CORRAL_*`` environment variables and
a TOML config file.

Every setting is declared once, as an :class:`Option`: its name, what kind of value it
takes, its default and its help text. That one declaration gives the flag
(``--max-workers``), the environment variable (``CORRAL_MAX_WORKERS``) and the TOML key
(``max_workers``), parses and checks their text the same way, and writes the line
``--help`` shows. Two groups:

* :data:`OPTIONS`, one per field of :class:`corral.SupervisorOptions` (the Supervisor's
  options whose value can be written down: numbers, sizes, durations, names, the
  sandbox preset, the environment), derived from the field's type, default and help
  text (a new option appears here without a change). Options that take code
  (``on_event``, ``launcher``, ``probe``, ``clock``) are for embedding only. TOML table
  ``[supervisor]``.
* :data:`SERVER`, the gateway's own settings (``host``, ``port``, ``factory``, the Ray
  cluster to serve through: ``ray``, ``ray_namespace``, ``ray_on_exit``, ...). TOML
  table ``[server]``.

Sources win in this order: flag, environment variable, config file, default.
:func:`resolve` applies it; every error is a ``ValueError`` whose message names the
flag, variable or key it came from.

Not here: the HTTP app (``_app``), the command itself (``corral.cli._serve``), and the
range checks of the Supervisor's options (``SupervisorOptions``), which :func:`resolve`
runs on what it found.

Long because every setting of ``corral serve`` is declared here, each with the parsing
and checks of its kind (sizes, durations, fractions, addresses, the sandbox preset), so
that flag, variable and config file cannot disagree.
"""

from __future__ import annotations

import argparse
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from corral.supervisor.options import SupervisorOptions
from corral.supervisor.sandbox import Sandbox

__all__ = [
    "OPTIONS",
    "SERVER",
    "Option",
    "Settings",
    "add_flags",
    "parse_size",
    "resolve",
]

ENV_PREFIX = "CORRAL_"
_SIZES = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 2**20, "mb": 10**6,
          "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12,
          "tib": 2**40}  # fmt: skip
_SANDBOXES: dict[str, Callable[[], Sandbox]] = {
    "none": Sandbox.none,
    "default": Sandbox.default,
    "strict": Sandbox.strict,
}
_NONE_WORDS = ("none", "off")


def parse_size(text: str) -> int:
    """``"256MiB"``, ``"1.5 GiB"``, ``"4096"`` -> bytes (KiB/MiB/GiB/TiB are powers of
    1024, kB/MB/GB/TB powers of 1000, K/M/G/T the same as KiB/MiB/GiB/TiB).

    Raises:
        ValueError: not a size.
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZES:
        raise ValueError(f"not a size: {text!r} (e.g. 4096, 512MiB, 2GiB)")
    return int(float(match.group(1)) * _SIZES[unit])


def show_size(value: int) -> str:
    """Bytes as the shortest exact ``parse_size`` text: 67108864 -> ``64MiB``."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 1024)):
        if value and value % factor == 0:
            return f"{value // factor}{unit}"
    return str(value)


class Option:
    """One setting as text: where it comes from (flag, variable, key) and how to parse it.

    Attributes:
        name: the Python and TOML name, e.g. ``"max_workers"``.
        flag: ``"--max-workers"``.
        env: ``"CORRAL_MAX_WORKERS"``.
        kind: ``"int"``, ``"size"``, ``"size_or_fraction"``, ``"seconds"``, ``"port"``,
            ``"choice"``, ``"sandbox"``, ``"str"``, ``"path"``, ``"ray_address"``,
            ``"list"`` or ``"env"``.
        optional: ``none`` (or ``off``) is a value, meaning None.
        default: the value when no source gives one (shown in ``--help``).
        help: what the setting does (for Supervisor options, ``SupervisorOptions.help``).
    """

    def __init__(
        self,
        name: str,
        kind: str,
        default: Any,
        help: str,
        *,
        optional: bool = False,
        choices: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.flag = "--" + name.replace("_", "-")
        self.env = ENV_PREFIX + name.upper()
        self.kind = kind
        self.default = default
        self.help = help
        self.optional = optional
        self.choices = choices

    @classmethod
    def from_annotation(cls, name: str, annotation: Any, default: Any, help: str) -> Option:
        """A Supervisor option, its kind read from its type annotation."""
        kinds = _kinds(annotation)
        optional = type(None) in kinds
        (hint,) = [k for k in kinds if k is not type(None)]
        origin = typing.get_origin(hint)
        choices: tuple[str, ...] = ()
        if origin is typing.Literal:
            kind, choices = "choice", tuple(str(c) for c in typing.get_args(hint))
        elif hint is Sandbox:
            # None means Sandbox.default(); "none" is the preset Sandbox.none().
            kind, choices, optional, default = "sandbox", tuple(_SANDBOXES), False, "default"
        elif hint is int:
            kind = "size" if "memory" in name or "bytes" in name else "int"
        elif hint is float:
            kind = "size_or_fraction" if name.endswith("_memory") else "seconds"
        elif hint is str:
            kind = "str"
        elif origin is tuple:
            kind = "list"
        elif origin in (Mapping, dict):
            kind = "env"
        else:
            raise TypeError(f"no text form for Supervisor option {name}: {annotation!r}")
        return cls(name, kind, default, help, optional=optional, choices=choices)

    # -- parsing -------------------------------------------------------------------------------

    def from_text(self, text: str, source: str | None = None) -> Any:
        """A value written as text (a flag, an environment variable, a TOML string).

        Raises:
            ValueError: naming ``source`` (default: the flag) and what was expected.
        """
        if self.optional and text.strip().lower() in _NONE_WORDS:
            return None
        try:
            return self._parse(text.strip())
        except ValueError as exc:
            raise ValueError(f"{source or self.flag}: {exc}") from None

    def _parse(self, text: str) -> Any:
        if self.choices and text not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}, got {text!r}")
        if self.kind == "sandbox":
            return _SANDBOXES[text]()
        parsers: dict[str, Callable[[str], Any]] = {
            "choice": str,
            "size": parse_size,
            "size_or_fraction": _size_or_fraction,
            "int": _whole_number,
            "seconds": _seconds,
            "port": _port,
            "str": str,
            "secret": _secret,
            "path": Path,
            "ray_address": _ray_address,
            "list": lambda t: tuple(p.strip() for p in t.split(",") if p.strip()),
            "env": _environment,
        }
        return parsers[self.kind](text)

    def from_toml(self, value: object, source: str) -> Any:
        """A config-file value: TOML's own type where it has one, else the text form.

        Raises:
            ValueError: naming ``source`` and what was expected.
        """
        if isinstance(value, str):
            return self.from_text(value, source)
        if isinstance(value, bool):
            pass  # never a number here, although bool is an int
        elif isinstance(value, int):
            if self.kind in ("int", "size", "size_or_fraction", "port"):
                return self.from_text(str(value), source)
            if self.kind == "seconds":
                return float(value)
        elif isinstance(value, float):
            if self.kind == "seconds" and math.isfinite(value):
                return value
            if self.kind == "size_or_fraction" and 0 < value < 1:
                return value
        elif isinstance(value, list):
            if self.kind == "list" and all(isinstance(v, str) for v in value):
                return tuple(value)
        elif isinstance(value, dict) and self.kind == "env":
            return {str(k): str(v) for k, v in value.items()}
        shown = "another type" if self.kind == "secret" else repr(value)  # never a secret
        raise ValueError(f"{source}: expected {self.describe()}, got {shown}")

    # -- text for people -----------------------------------------------------------------------

    def describe(self) -> str:
        """The metavar: what a value looks like."""
        kind = {
            "size": "SIZE",
            "size_or_fraction": "SIZE|FRACTION",
            "seconds": "SECONDS",
            "int": "N",
            "port": "PORT",
            "str": "TEXT",
            "secret": "TOKEN",
            "path": "FILE",
            "ray_address": "auto|HOST:PORT|ray://HOST:PORT",
            "list": "A,B,...",
            "env": "KEY=VALUE,...",
        }.get(self.kind, "")
        kind = "|".join(self.choices) if self.choices else kind
        return f"{kind}|none" if self.optional else kind

    def show_default(self) -> str:
        value = self.default
        if value is None:
            return "none"
        if isinstance(value, tuple):
            return ",".join(value) or '""'
        if self.kind == "size" and isinstance(value, int):
            return show_size(value)
        return str(value)

    def help_text(self) -> str:
        """``--help``'s line: what it does, its default, its variable (``%`` escaped)."""
        text = f"{self.help} [default: {self.show_default()}; env {self.env}]"
        return text.replace("%", "%%")


def _kinds(annotation: Any) -> list[Any]:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return list(typing.get_args(annotation))
    return [annotation]


def _whole_number(text: str) -> int:
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ValueError(f"not a whole number: {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"not a finite number of seconds: {text!r}")
    return value


def _port(text: str) -> int:
    port = _whole_number(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"a port is 0..65535 (0: any free port), got {port}")
    return port


def _ray_address(text: str) -> str:
    """``auto``, ``HOST:PORT`` (a GCS) or ``ray://HOST:PORT`` (Ray Client)."""
    if text == "auto":
        return text
    rest = text.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"expected auto, HOST:PORT or ray://HOST:PORT, got {text!r}")
    return text


def _secret(text: str) -> str:
    """A token: checked, never echoed in the error."""
    from corral.server._http import check_auth_token

    check_auth_token(text)
    return text


def _size_or_fraction(text: str) -> int | float:
    """``"0.1"`` (a fraction of RAM, 0 < x < 1) or a size (``"512MiB"``, ``"4096"``)."""
    try:
        fraction = float(text)
    except ValueError:
        return parse_size(text)
    if 0 < fraction < 1:
        return fraction
    return parse_size(text)


def _environment(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


# -- the declarations --------------------------------------------------------------------------


def _supervisor_options() -> dict[str, Option]:
    hints = typing.get_type_hints(SupervisorOptions)  # Annotated help texts stripped
    return {
        field.name: Option.from_annotation(
            field.name, hints[field.name], field.default, SupervisorOptions.help(field.name)
        )
        for field in msgspec.structs.fields(SupervisorOptions)
    }


OPTIONS: dict[str, Option] = _supervisor_options()
"""The Supervisor's options, by name (TOML table ``[supervisor]``)."""

DEFAULT_FACTORY = "corral.examples.demo:create"

SERVER: dict[str, Option] = {
    option.name: option
    for option in (
        Option(
            "factory",
            "str",
            DEFAULT_FACTORY,
            "the kernel factory, 'package.module:callable'; checked at start-up by loading "
            "it in one worker, which is then stopped",
        ),
        Option(
            "host",
            "str",
            "127.0.0.1",
            "address to listen on; beyond loopback, set --auth-token (see the README's "
            "'Exposing the gateway')",
        ),
        Option("port", "port", 8000, "TCP port to listen on; 0: any free port"),
        Option(
            "max_body_bytes",
            "size",
            2**20,
            "largest request body; a larger one gets 413 before it is read in full",
        ),
        Option(
            "grace",
            "seconds",
            30.0,
            "seconds calls in flight get to finish at shutdown (SIGTERM, Ctrl-C) before "
            "they are cancelled",
        ),
        Option(
            "auth_token",
            "secret",
            None,
            "a bearer token every request must carry (Authorization: Bearer TOKEN; 401 "
            "without it) but GET /, /healthz and /readyz; prefer the variable or the "
            "config file to the flag, which other users can read in the process list",
            optional=True,
        ),
        Option(
            "ray",
            "ray_address",
            None,
            "serve through a Ray cluster (a corral.ClusterSupervisor; needs corral[ray]): "
            "auto (the cluster RAY_ADDRESS names, else the one started last on this host), "
            "HOST:PORT (its GCS) or ray://HOST:PORT (Ray Client); none: one local "
            "Supervisor. Supervisor options then apply on every node (max_workers is per "
            "node)",
            optional=True,
        ),
        Option(
            "ray_namespace",
            "str",
            "corral",
            "with --ray: the deployment's Ray namespace; gateway replicas (and other front "
            "ends) in one namespace share its tenants and must pass the same factory and "
            "options",
        ),
        Option(
            "ray_on_exit",
            "choice",
            "shutdown",
            "with --ray, what this gateway does to the deployment when it exits: shutdown: "
            "if it is the last front end attached, stop every node's agent and workers "
            "(tenants' state is lost); detach: leave them running for the next gateway "
            "(a single replica restarted in place)",
            choices=("shutdown", "detach"),
        ),
        Option(
            "log_level",
            "choice",
            "info",
            "the least severe log records shown",
            choices=("debug", "info", "warning", "error"),
        ),
        Option(
            "log_format",
            "choice",
            "text",
            "text: one line per record with corral's fields appended as key=value; "
            "json: one JSON object per line",
            choices=("text", "json"),
        ),
    )
}
"""The gateway's own settings, by name (TOML table ``[server]``)."""

CONFIG = Option(
    "config",
    "path",
    None,
    "a TOML config file with tables [server] and [supervisor] (keys named as the flags, "
    "with underscores)",
)


# -- sources -----------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser) -> None:
    """``--config``, the server settings (but ``factory``, an argument of its own) and one
    flag per Supervisor option. Flags are kept as text (or None: not given) until
    :func:`resolve`, so that every source is parsed by the same code."""
    parser.add_argument(
        "opt_factory", metavar="FACTORY", nargs="?", help=SERVER["factory"].help_text()
    )
    for option in (CONFIG, *(o for o in SERVER.values() if o.name != "factory")):
        parser.add_argument(
            option.flag, dest=f"opt_{option.name}", metavar=option.describe(),
            default=None, help=option.help_text(),
        )  # fmt: skip
    group = parser.add_argument_group(
        "supervisor options",
        "Each also comes from its variable or the config file's [supervisor] table; sizes "
        "take units (4096, 64KiB, 512MiB, 2GiB); see the README's Options table.",
    )
    for option in OPTIONS.values():
        group.add_argument(
            option.flag, dest=f"opt_{option.name}", metavar=option.describe(),
            default=None, help=option.help_text(),
        )  # fmt: skip


class Settings(typing.NamedTuple):
    """What :func:`resolve` found: the server settings (every key of :data:`SERVER`,
    defaults filled in) and the Supervisor options that some source gave (the rest
    keep the Supervisor's defaults)."""

    server: dict[str, Any]
    supervisor: dict[str, Any]


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Every setting from its sources: flag, then ``CORRAL_*`` variable, then config file,
    then default.

    Args:
        args: parsed by a parser that :func:`add_flags` set up.
        environ: the environment (``os.environ``); empty variables count as unset.

    Raises:
        ValueError: a bad value, unknown key or unreadable config file, the source named;
            or Supervisor options that :class:`SupervisorOptions` refuses (out of range,
            a soft memory limit not below the hard one), in its words.
    """
    config_text = _given(CONFIG, args, environ)
    server: dict[str, Any] = {name: option.default for name, option in SERVER.items()}
    supervisor: dict[str, Any] = {}
    if config_text is not None:
        path = CONFIG.from_text(*config_text)
        try:
            text = path.read_text()
        except OSError as exc:
            source = config_text[1]
            raise ValueError(f"{source}: cannot read {str(path)!r}: {exc.strerror}") from None
        toml_server, toml_supervisor = _from_toml(text, path)
        server.update(toml_server)
        supervisor.update(toml_supervisor)
    for table, options in ((server, SERVER), (supervisor, OPTIONS)):
        for option in options.values():
            given = _given(option, args, environ)
            if given is not None:
                table[option.name] = option.from_text(*given)
    SupervisorOptions(**supervisor)  # checked now, before anything starts
    return Settings(server, supervisor)


def _given(
    option: Option, args: argparse.Namespace, environ: Mapping[str, str]
) -> tuple[str, str] | None:
    """``(text, source)`` from the flag, else the variable; None if neither is set."""
    flag = getattr(args, f"opt_{option.name}", None)
    if flag is not None:
        return str(flag), option.flag if option.name != "factory" else "FACTORY"
    env = environ.get(option.env)
    if env:
        return env, option.env
    return None


def _from_toml(text: str, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {str(path)!r}: {exc}") from None
    unknown = set(data) - {"server", "supervisor"}
    if unknown:
        raise ValueError(f"config file {str(path)!r}: unknown table(s) {sorted(unknown)}")
    out: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
    for (table, options), found in zip(
        (("server", SERVER), ("supervisor", OPTIONS)), out, strict=True
    ):
        section = data.get(table, {})
        if not isinstance(section, dict):
            raise ValueError(f"config file {str(path)!r}: [{table}] must be a table")
        for key, value in section.items():
            if key not in options:
                raise ValueError(f"config file {str(path)!r}: unknown {table} setting {key!r}")
            found[key] = options[key].from_toml(value, f"config file [{table}] {key}")
    return out
