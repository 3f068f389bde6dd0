"""``SupervisorOptions`` (``corral.supervisor.options``): defaults, every check with its
message, immutability, checked replacement and a help text per field. Pure: nothing
starts."""

from __future__ import annotations

import inspect
from types import MappingProxyType
from typing import Any

import msgspec
import pytest

import corral
from corral.ipc import DEFAULT_MAX_FRAME_BYTES
from corral.supervisor import DEFAULT_ENV_ALLOWLIST, Sandbox, SupervisorOptions

MiB = 2**20

DEFAULTS = {
    "max_workers": 32,
    "idle_ttl": 900.0,
    "call_timeout": 30.0,
    "start_method": "forkserver",
    "start_timeout": 30.0,
    "shutdown_timeout": 5.0,
    "term_timeout": 2.0,
    "kill_timeout": 5.0,
    "drain_timeout": 30.0,
    "pool_timeout": 30.0,
    "spare_workers": 0,
    "max_frame_bytes": DEFAULT_MAX_FRAME_BYTES,
    "restart_intensity": 5,
    "restart_period": 60.0,
    "backoff_base": 1.0,
    "backoff_max": 60.0,
    "env": None,
    "env_allowlist": DEFAULT_ENV_ALLOWLIST,
    "worker_memory_limit": None,
    "worker_memory_hard_limit": None,
    "min_available_memory": None,
    "max_total_memory": None,
    "memory_method": "auto",
    "memory_check_interval": 1.0,
    "sandbox": None,
}
CODE = ("factory", "on_event", "policy", "launcher", "probe", "clock")  # arguments, not options


def test_the_defaults() -> None:
    assert msgspec.structs.asdict(SupervisorOptions()) == DEFAULTS
    assert corral.SupervisorOptions is SupervisorOptions
    assert "SupervisorOptions" in corral.__all__


def test_the_fields_are_the_data_options_of_the_supervisor() -> None:
    """Same names, in the same order, with the same defaults as the constructor's
    keyword parameters that are not code (while it still has them)."""
    params = inspect.signature(corral.Supervisor.__init__).parameters
    data = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    for name in CODE:
        data.pop(name, None)
    if data:  # the constructor still declares each option itself
        assert data == DEFAULTS


def test_good_values_are_kept_as_given() -> None:
    options = SupervisorOptions(
        max_workers=1, idle_ttl=0, call_timeout=None, drain_timeout=0, pool_timeout=0,
        start_method="spawn", max_frame_bytes=1024, restart_intensity=0,
        env=MappingProxyType({"A": "1"}), env_allowlist=(), worker_memory_limit=MiB,
        worker_memory_hard_limit=2 * MiB, min_available_memory=0.5, max_total_memory=MiB,
        memory_method="rlimit", sandbox=Sandbox.none(),
    )  # fmt: skip
    assert (options.idle_ttl, options.call_timeout, options.sandbox) == (0, None, Sandbox.none())
    assert SupervisorOptions(max_frame_bytes=2**32 - 1, min_available_memory=MiB)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # counts
        ({"max_workers": 0}, r"max_workers must be an int >= 1, got 0"),
        ({"max_workers": 2.0}, r"max_workers must be an int >= 1, got 2\.0"),
        ({"max_workers": True}, r"max_workers must be an int >= 1, got True"),
        ({"max_frame_bytes": 10}, r"max_frame_bytes must be in 1024\.\.4294967295, got 10"),
        ({"spare_workers": -1}, r"spare_workers must be an int >= 0, got -1"),
        (
            {"spare_workers": 4, "max_workers": 3},
            r"spare_workers \(4\) must be at most max_workers",
        ),
        ({"max_frame_bytes": 2**32}, r"max_frame_bytes must be in 1024\.\.4294967295"),
        ({"max_frame_bytes": 4096.0}, r"max_frame_bytes must be in 1024\.\.4294967295"),
        # seconds
        ({"idle_ttl": -1}, r"idle_ttl must be >= 0, got -1"),
        ({"idle_ttl": "soon"}, r"idle_ttl must be a number of seconds, got 'soon'"),
        ({"call_timeout": 0}, r"call_timeout must be > 0, got 0"),
        ({"call_timeout": float("nan")}, r"call_timeout must be a number of seconds, got nan"),
        ({"start_timeout": None}, r"start_timeout must be a number of seconds, got None"),
        ({"shutdown_timeout": 0}, r"shutdown_timeout must be > 0, got 0"),
        ({"term_timeout": -2.0}, r"term_timeout must be > 0, got -2\.0"),
        ({"kill_timeout": True}, r"kill_timeout must be a number of seconds, got True"),
        ({"drain_timeout": -1}, r"drain_timeout must be >= 0, got -1"),
        ({"pool_timeout": -0.5}, r"pool_timeout must be >= 0, got -0\.5"),
        ({"memory_check_interval": 0}, r"memory_check_interval must be > 0, got 0"),
        # names
        ({"start_method": "fork"}, r"got 'fork' \(workers are never forked from the host\)"),
        ({"memory_method": "bogus"}, r"memory_method must be 'auto', 'cgroup' or 'rlimit'"),
        # restarts and backoff
        ({"restart_intensity": -1}, r"restart_intensity must be >= 0"),
        ({"restart_intensity": 1.5}, r"restart_intensity must be an int >= 0, got 1\.5"),
        ({"restart_period": 0}, r"restart_period and backoff times must be positive"),
        ({"restart_period": "1m"}, r"restart_period must be a number of seconds, got '1m'"),
        ({"backoff_base": -1}, r"restart_period and backoff times must be positive"),
        ({"backoff_base": 2, "backoff_max": 1}, r"cap >= base"),
        ({"backoff_max": None}, r"backoff_max must be a number of seconds, got None"),
        # memory
        (
            {"worker_memory_limit": 200 * MiB, "worker_memory_hard_limit": 100 * MiB},
            r"worker_memory_limit \(209715200\) must be below worker_memory_hard_limit "
            r"\(104857600\)",
        ),
        ({"worker_memory_limit": MiB, "worker_memory_hard_limit": MiB}, r"must be below"),
        ({"worker_memory_limit": MiB - 1}, r"worker_memory_limit must be an int >= 1048576"),
        ({"worker_memory_limit": True}, r"worker_memory_limit must be an int >= 1048576"),
        ({"worker_memory_hard_limit": MiB - 1}, r"worker_memory_hard_limit must be an int"),
        ({"max_total_memory": 0}, r"max_total_memory must be an int >= 1048576, got 0"),
        ({"min_available_memory": 0}, r"min_available_memory \(bytes, or a fraction"),
        ({"min_available_memory": 1.0}, r"min_available_memory \(bytes, or a fraction"),
        ({"min_available_memory": -5}, r"min_available_memory \(bytes, or a fraction"),
        ({"min_available_memory": MiB - 1}, r"min_available_memory \(bytes, or a fraction"),
        # environment
        ({"env": {"A=B": "1"}}, r"env: 'A=B' is not a valid environment variable"),
        ({"env": {"": "1"}}, r"env: '' is not a valid environment variable"),
        ({"env": {"A": "\0"}}, r"env: 'A' is not a valid environment variable"),
        ({"env": {"A": 1}}, r"env: names and values must be str, got 'A'=1"),
        # the sandbox's own checks
        (
            {"sandbox": msgspec.structs.replace(Sandbox.default(), rlimits={"stack": 1})},
            r"Sandbox\.rlimits: unknown limit 'stack'",
        ),
        (
            {"sandbox": msgspec.structs.replace(Sandbox.none(), max_processes=2)},
            r"Sandbox\.max_processes must be an int >= 8, got 2",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_option(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SupervisorOptions(**changes)
    with pytest.raises(ValueError, match=message):
        SupervisorOptions().with_(**changes)


def test_msgspec_replace_checks_too() -> None:
    """True of the msgspec this project is tested with (older ones skip ``__post_init__``
    in ``replace``; ``with_`` checks whatever the version)."""
    options = SupervisorOptions(worker_memory_hard_limit=512 * MiB)
    assert msgspec.structs.replace(options, max_workers=2).max_workers == 2
    with pytest.raises(ValueError, match="max_workers must be an int >= 1, got 0"):
        msgspec.structs.replace(options, max_workers=0)
    with pytest.raises(ValueError, match="must be below worker_memory_hard_limit"):
        msgspec.structs.replace(options, worker_memory_limit=512 * MiB)
    with pytest.raises(TypeError, match="max_wrokers"):
        msgspec.structs.replace(options, max_wrokers=2)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_wrokers": 3}, r"'max_wrokers'"),
        ({"clock": lambda: 0.0}, r"'clock'"),  # code is the Supervisor's argument
        ({"env": [("A", "1")]}, r"env must be a mapping of names to values, got list"),
        ({"env_allowlist": ["PATH"]}, r"env_allowlist must be a tuple of variable names"),
        ({"env_allowlist": ("PATH", 1)}, r"env_allowlist must be a tuple of variable names"),
        ({"sandbox": "strict"}, r"sandbox must be a Sandbox or None, got str"),
    ],
)
def test_unknown_names_and_wrong_types_are_type_errors(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        SupervisorOptions(**changes)
    with pytest.raises(TypeError, match=message):
        SupervisorOptions().with_(**changes)


def test_options_are_frozen_and_compare_by_value() -> None:
    options = SupervisorOptions(max_workers=4)
    with pytest.raises(AttributeError):
        options.max_workers = 5  # type: ignore[misc]
    assert options == SupervisorOptions(max_workers=4) != SupervisorOptions()
    assert hash(options) == hash(SupervisorOptions(max_workers=4))


def test_with_returns_new_checked_options_and_leaves_the_old_alone() -> None:
    options = SupervisorOptions(max_workers=4, worker_memory_hard_limit=512 * MiB)
    tighter = options.with_(call_timeout=5.0, worker_memory_limit=256 * MiB)
    assert (tighter.max_workers, tighter.call_timeout, tighter.worker_memory_limit) == (
        4,
        5.0,
        256 * MiB,
    )
    assert options.call_timeout == 30.0 and options.worker_memory_limit is None
    with pytest.raises(ValueError, match="must be below"):
        tighter.with_(worker_memory_hard_limit=128 * MiB)  # checked against the kept soft one


def test_decoding_checks_as_well() -> None:
    assert msgspec.json.decode(b'{"max_workers": 2}', type=SupervisorOptions).max_workers == 2
    with pytest.raises(msgspec.ValidationError, match="max_workers must be an int >= 1"):
        msgspec.json.decode(b'{"max_workers": 0}', type=SupervisorOptions)
    with pytest.raises(msgspec.ValidationError, match="max_wrokers"):
        msgspec.json.decode(b'{"max_wrokers": 2}', type=SupervisorOptions)
    options = SupervisorOptions(env={"A": "1"}, sandbox=Sandbox.strict())
    encoded = msgspec.json.encode(options)
    assert msgspec.json.decode(encoded, type=SupervisorOptions) == options


def test_every_field_has_a_plain_help_text() -> None:
    for field in msgspec.structs.fields(SupervisorOptions):
        text = SupervisorOptions.help(field.name)
        assert text and text == text.strip() and "\n" not in text, field.name
        assert "``" not in text and ":class:" not in text, field.name
    assert SupervisorOptions.help("max_workers").startswith(
        "live worker processes never exceed this"
    )
    with pytest.raises(KeyError, match="no option 'factory'"):
        SupervisorOptions.help("factory")
