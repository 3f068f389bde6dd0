"""The ``corral`` command line: the HTTP gateway (``serve``), a guided ``demo`` and a
one-shot ``call``.

Covers argument parsing, turning JSON arguments into a single call and its
result (or error) back into text and an exit status. It drives corral only
through the public API (``import corral``), exactly as an application would.

Not here: anything about workers, pipes or termination (see
:mod:`corral.supervisor`), and the gateway itself (:mod:`corral.server`).

Every option can also be set by a ``CORRAL_*`` environment variable named after it
(``--start-method`` -> ``CORRAL_START_METHOD``; a flag wins over its variable), listed
in ``--help``. A bad option or variable is refused with one line on stderr,
``corral COMMAND: error: ...``, and exit status 2.

Exit status: 0 success; 1 the call or the demo failed (corral's error is
printed); 2 usage errors (bad options, JSON or factory string; for ``serve``, also a
factory that fails its start-up check and a sandbox the host cannot give); 130
interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

import msgspec

import corral
from corral.cli import _demo, _serve

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the ``corral`` command line.

    Args:
        argv: arguments after the program name; None means ``sys.argv[1:]``.
        environ: where ``CORRAL_*`` variables are read; None means ``os.environ``.

    Returns:
        The exit status (see the module docstring). ``--help``, ``--version`` and
        usage errors raise ``SystemExit`` as argparse does.
    """
    environ = os.environ if environ is None else environ
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.env_parser is not None:
        _apply_environment(args.env_parser, args, environ)
    try:
        status: int = args.run(parser, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return status


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: ``PROG: error: MESSAGE``
    (argparse's own prints the usage first), exit status 2. Its subparsers are too."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())}\n")


_UNSET = object()  # the default of an option whose variable is set: not given as a flag


def _environment_options(parser: argparse.ArgumentParser) -> None:
    """Give each option of ``parser`` a ``CORRAL_*`` variable: named in its help, and
    read by :func:`_apply_environment` when the flag is not given. (``serve`` declares
    its own, with its config file, in ``corral.server._options``.)"""
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        env = _env_name(action)
        action.help = f"{action.help or ''} [env {env}]".strip()
        if os.environ.get(env):
            action.default = _UNSET
    parser.set_defaults(env_parser=parser)


def _env_name(action: argparse.Action) -> str:
    return "CORRAL_" + action.dest.upper()


def _apply_environment(
    parser: argparse.ArgumentParser, args: argparse.Namespace, environ: Mapping[str, str]
) -> None:
    """Fill in the options not given as flags from their variables (checked as a flag's
    text would be, the variable named in the error)."""
    for action in parser._actions:
        if getattr(args, action.dest, None) is not _UNSET:
            continue
        env = _env_name(action)
        text = environ.get(env, "").strip()
        try:
            value: Any
            if isinstance(action, argparse._StoreTrueAction):
                value = _boolean(text)
            else:
                value = action.type(text) if callable(action.type) else text
                if action.choices is not None and value not in action.choices:
                    choices = ", ".join(map(str, action.choices))
                    raise ValueError(f"must be one of {choices}, got {text!r}")
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            parser.error(f"{env}: {exc}")
        setattr(args, action.dest, value)


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean (1/0, true/false, yes/no, on/off): {text!r}")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="corral",
        description="Run each tenant's plugin kernel in its own supervised worker process.",
    )
    parser.add_argument("--version", action="version", version=f"corral {corral.__version__}")
    parser.set_defaults(env_parser=None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="a guided tour on the bundled example kernel (doubles as a smoke test)",
        description=_demo.DESCRIPTION,
    )
    _demo.add_arguments(demo)
    _environment_options(demo)
    demo.set_defaults(run=lambda _parser, args: _demo.run(args))

    serve = commands.add_parser(
        "serve",
        help="the HTTP gateway with a live dashboard (needs the 'server' extra)",
        description=_serve.DESCRIPTION,
    )
    _serve.add_arguments(serve)
    serve.set_defaults(run=lambda _parser, args: _serve.run(args))

    call = commands.add_parser(
        "call",
        help="start one worker, make one call, print the result as JSON",
        description=(
            "Start a supervisor on FACTORY, call METHOD in TENANT's worker once with the "
            "JSON_ARGs as positional arguments, print the result as JSON, and stop. "
            "Strings need JSON quotes: corral call corral.examples.demo:create t1 put "
            "'\"k\"' 42"
        ),
    )
    call.add_argument(
        "factory", metavar="FACTORY", help="the kernel factory, 'package.module:callable'"
    )
    call.add_argument("tenant", metavar="TENANT", help="the tenant whose worker makes the call")
    call.add_argument("method", metavar="METHOD", help="a public method of the kernel")
    call.add_argument("json_args", metavar="JSON_ARG", nargs="*", help="one JSON value each")
    call.add_argument(
        "--timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="call timeout; the worker is killed past it (default: 30)",
    )
    call.add_argument(
        "--start-method",
        choices=("forkserver", "spawn"),
        default="forkserver",
        help="forkserver: fork of corral's own preloaded warden; spawn: a fresh interpreter "
        "(default: forkserver)",
    )
    call.add_argument(
        "-v", "--verbose", action="store_true", help="log worker lifecycle and output to stderr"
    )
    _environment_options(call)
    call.set_defaults(run=lambda _parser, args: _run_call(call, args))
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


# -- call ----------------------------------------------------------------------------------------


def _run_call(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``corral call``; ``parser`` is its subparser, for usage errors (which exit 2)."""
    call_args = [_json_arg(parser, i, text) for i, text in enumerate(args.json_args, 1)]
    if not args.tenant:
        parser.error("TENANT must not be empty")
    try:
        sup = corral.Supervisor(
            args.factory,
            max_workers=1,
            idle_ttl=None,
            call_timeout=args.timeout,
            drain_timeout=0,  # on Ctrl-C, stop the worker now rather than await its call
            start_method=args.start_method,
        )
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_demo.InlineLogFormatter())
    try:
        with _demo.corral_logs(handler, logging.INFO if args.verbose else logging.WARNING):
            result = asyncio.run(_call_once(sup, args.tenant, args.method, call_args))
    except corral.CorralError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        remote_tb = getattr(exc, "remote_traceback", None)
        if args.verbose and remote_tb:
            print(remote_tb.rstrip(), file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:  # refused by the API before any worker started
        parser.error(str(exc))
    print(result)
    return EXIT_OK


async def _call_once(sup: corral.Supervisor, tenant: str, method: str, args: list[Any]) -> str:
    async with sup:
        value = await sup.invoke(tenant, method, args)
    # msgspec rather than json: results may hold bytes (base64) that json cannot encode.
    return msgspec.json.encode(value).decode()


def _json_arg(parser: argparse.ArgumentParser, position: int, text: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        hint = " (strings need JSON quotes, e.g. '\"k\"')" if text[:1] not in '"[{' else ""
        parser.error(f"JSON_ARG {position} is not JSON: {text!r}: {exc}{hint}")
