"""``corral serve``'s settings (``corral.server._options``): one declaration per setting
gives its flag, variable and TOML key; flag > variable > config file > default."""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec
import pytest

from corral.server._options import OPTIONS, SERVER, add_flags, parse_size, resolve
from corral.supervisor import SupervisorOptions
from corral.supervisor.sandbox import Sandbox

pytestmark = pytest.mark.timeout(30)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return parser.parse_args(argv)


def test_every_supervisor_option_has_help_from_its_field_a_flag_and_a_variable() -> None:
    assert "max_workers" in OPTIONS and "on_event" not in OPTIONS and "clock" not in OPTIONS
    for option in [*OPTIONS.values(), *SERVER.values()]:
        assert option.help and "``" not in option.help and ":class:" not in option.help
        assert option.flag == "--" + option.name.replace("_", "-")
        assert option.env == "CORRAL_" + option.name.upper()
        assert option.env in option.help_text()
    assert OPTIONS["max_workers"].help.startswith("live worker processes never exceed this")


def test_the_supervisor_options_are_the_fields_of_supervisor_options() -> None:
    """Name, order, default and help text, each from its field (the sandbox's default
    is shown as the preset None stands for)."""
    fields = msgspec.structs.fields(SupervisorOptions)
    assert list(OPTIONS) == [field.name for field in fields]
    for field in fields:
        option = OPTIONS[field.name]
        assert option.help == SupervisorOptions.help(field.name)
        assert option.default == (field.default if field.name != "sandbox" else "default")
    kinds = {name: option.kind for name, option in OPTIONS.items()}
    assert (kinds["max_workers"], kinds["idle_ttl"], kinds["max_frame_bytes"]) == (
        "int",
        "seconds",
        "size",
    )
    assert (kinds["min_available_memory"], kinds["env"], kinds["env_allowlist"]) == (
        "size_or_fraction",
        "env",
        "list",
    )
    assert OPTIONS["memory_method"].choices == ("auto", "cgroup", "rlimit")
    assert (OPTIONS["idle_ttl"].optional, OPTIONS["start_timeout"].optional) == (True, False)


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("64KiB", 65536), ("512MiB", 512 << 20), ("1.5 GiB", 3 << 29),
     ("2G", 2 << 30), ("1MB", 10**6)],
)  # fmt: skip
def test_sizes_take_units(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_every_size_option_takes_units_from_every_source(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[supervisor]\nmax_total_memory = "2GiB"\nmax_frame_bytes = 1048576\n')
    args = parse(
        "--config", str(config), "--worker-memory-limit", "256MiB",
        "--min-available-memory", "512MiB", "--max-body-bytes", "64KiB",
    )  # fmt: skip
    server, options = resolve(args, {"CORRAL_WORKER_MEMORY_HARD_LIMIT": "1GiB"})
    assert options == {
        "max_total_memory": 2 << 30,
        "max_frame_bytes": 1 << 20,
        "worker_memory_limit": 256 << 20,
        "worker_memory_hard_limit": 1 << 30,
        "min_available_memory": 512 << 20,
    }
    assert server["max_body_bytes"] == 64 << 10
    _, options = resolve(parse("--min-available-memory", "0.1"), {})
    assert options == {"min_available_memory": 0.1}  # a fraction of RAM


def test_flag_beats_variable_beats_config_file_beats_default(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        "[server]\nport = 9001\ngrace = 5\n\n[supervisor]\nmax_workers = 3\nidle_ttl = 60\n"
        "call_timeout = 10\n"
    )
    environ = {"CORRAL_CONFIG": str(config), "CORRAL_PORT": "9002", "CORRAL_MAX_WORKERS": "4"}
    server, options = resolve(parse("--max-workers", "5", "--idle-ttl", "none"), environ)
    assert options == {"max_workers": 5, "idle_ttl": None, "call_timeout": 10.0}
    assert (server["port"], server["grace"], server["host"]) == (9002, 5.0, "127.0.0.1")
    server, options = resolve(parse(), environ)
    assert options["max_workers"] == 4
    server, options = resolve(parse(), {"CORRAL_MAX_WORKERS": ""})  # empty: unset
    assert options == {} and server == {name: o.default for name, o in SERVER.items()}


def test_sandbox_none_is_the_none_preset_from_every_source(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[supervisor]\nsandbox = "none"\n')
    assert resolve(parse("--sandbox", "none"), {})[1]["sandbox"] == Sandbox.none()
    assert resolve(parse(), {"CORRAL_SANDBOX": "none"})[1]["sandbox"] == Sandbox.none()
    assert resolve(parse("--config", str(config)), {})[1]["sandbox"] == Sandbox.none()
    assert resolve(parse("--sandbox", "strict"), {})[1]["sandbox"] == Sandbox.strict()
    assert "[default: default;" in OPTIONS["sandbox"].help_text()


@pytest.mark.parametrize(
    ("argv", "environ", "toml", "message"),
    [
        (("--port", "80000"), {}, "", "--port: a port is 0..65535"),
        ((), {"CORRAL_PORT": "-1"}, "", "CORRAL_PORT: a port is 0..65535"),
        ((), {}, "[server]\nport = 70000\n", "config file [server] port: a port is 0..65535"),
        (("--max-workers", "many"), {}, "", "--max-workers: not a whole number"),
        (("--idle-ttl", "nan"), {}, "", "--idle-ttl: not a finite number of seconds"),
        (("--worker-memory-limit", "12 parsecs"), {}, "", "not a size"),
        (("--min-available-memory", "lots"), {}, "", "--min-available-memory: not a size"),
        ((), {"CORRAL_SANDBOX": "paranoid"}, "", "CORRAL_SANDBOX: must be one of none, default"),
        ((), {}, "[supervisor]\nmax_workers = true\n", "max_workers: expected N"),
        ((), {}, "[supervisor]\nmax_wrokers = 3\n", "unknown supervisor setting 'max_wrokers'"),
        ((), {}, "[srever]\n", "unknown table(s) ['srever']"),
        ((), {}, "[server]\nlog_level = 'loud'\n", "log_level: must be one of debug"),
        ((), {}, "not toml", "config file"),
        # Parsed, then refused by SupervisorOptions, in its words.
        (("--max-workers", "0"), {}, "", "max_workers must be an int >= 1, got 0"),
        ((), {"CORRAL_IDLE_TTL": "-1"}, "", "idle_ttl must be >= 0, got -1.0"),
        (
            ("--worker-memory-limit", "2GiB"),
            {"CORRAL_WORKER_MEMORY_HARD_LIMIT": "1GiB"},
            "",
            "worker_memory_limit (2147483648) must be below worker_memory_hard_limit",
        ),
        ((), {}, "[supervisor]\nenv = {'A=B' = '1'}\n", "env: 'A=B' is not a valid"),
    ],
)
def test_bad_values_name_their_source(
    argv: tuple[str, ...], environ: dict[str, str], toml: str, message: str, tmp_path: Path
) -> None:
    if toml:
        config = tmp_path / "c.toml"
        config.write_text(toml)
        argv = (*argv, "--config", str(config))
    with pytest.raises(ValueError) as caught:
        resolve(parse(*argv), environ)
    assert message in str(caught.value)


def test_the_auth_token_from_every_source_never_shown(tmp_path: Path) -> None:
    token = "opt-Token-0123456789"
    assert resolve(parse(), {}).server["auth_token"] is None
    assert resolve(parse(), {"CORRAL_AUTH_TOKEN": token}).server["auth_token"] == token
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nauth_token = "{token}"\n')
    assert resolve(parse("--config", str(config)), {}).server["auth_token"] == token
    config.write_text("[server]\nauth_token = 123456789\n")
    with pytest.raises(ValueError, match="auth_token: expected TOKEN") as caught:
        resolve(parse("--config", str(config)), {})
    assert "123456789" not in str(caught.value)
    assert SERVER["auth_token"].show_default() == "none"


def test_the_ray_settings_from_every_source(tmp_path: Path) -> None:
    server = resolve(parse(), {}).server
    assert (server["ray"], server["ray_namespace"], server["ray_on_exit"]) == (
        None,
        "corral",
        "shutdown",
    )
    config = tmp_path / "c.toml"
    config.write_text('[server]\nray = "ray://head:10001"\nray_namespace = "prod"\n')
    server = resolve(parse("--config", str(config)), {"CORRAL_RAY_ON_EXIT": "detach"}).server
    assert (server["ray"], server["ray_namespace"], server["ray_on_exit"]) == (
        "ray://head:10001",
        "prod",
        "detach",
    )
    for address in ("auto", "127.0.0.1:6379", "[::1]:6379", "head.example:6379"):
        assert resolve(parse("--ray", address), {}).server["ray"] == address
    assert resolve(parse("--ray", "none"), {"CORRAL_RAY": "auto"}).server["ray"] is None
    for bad in ("head", "head:port", ":6379", "ray://head", "head:0", "head:70000"):
        with pytest.raises(ValueError, match="--ray: expected auto, HOST:PORT"):
            resolve(parse("--ray", bad), {})
