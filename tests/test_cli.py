"""The ``corral`` command line, run as a real subprocess (``python -m corral.cli``).

The demo doubles as an end-to-end smoke test: it checks every step itself and
exits non-zero on a surprise, so here we assert on its exit status, a few key
lines, its run time, and that no worker it started outlived it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

import corral
from corral.server._options import OPTIONS, SERVER
from tests.helpers import Served

pytestmark = pytest.mark.timeout(120)

FACTORY = "corral.examples.demo:create"
_DEMO_BUDGET = 30.0  # seconds `demo --fast` must stay well under


def corral_cli(
    *args: str,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    user: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """The real command line in a subprocess; ``env`` is added to this environment."""
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
        user=user,
        group=user,
        extra_groups=[] if user is not None else None,
    )


def assert_refused(result: subprocess.CompletedProcess[str], prog: str, message: str) -> None:
    """Exit status 2, nothing on stdout, and one line on stderr: ``PROG: error: ...``."""
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"{prog}: error: "), result.stderr
    assert message in result.stderr, result.stderr


def is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_demo_passed(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for line in (
        "[1] Four tenants, three worker slots",
        "keys() -> ['bob', 'carol', 'dave']",
        "corral: worker stopped (lru, ask) tenant=alice pid=",
        "raised KernelError: builtins.KeyError: 'shoe size'",
        "raised WorkerCrashedError:",
        "exitcode=7, signal=None",
        "raised CallTimeoutError:",
        "corral: worker stopped (idle_ttl, ask)",
        "worker output: [bob] notebook for bob closing with 1 notes",
        "corral: worker stopped (evicted, ask)",
        "worker over worker_memory_limit tenant=alice pid=",
        "corral: worker stopped (memory_limit, ask)",
        "corral: worker stopped (memory_limit, ask)",
        "result_type=Identity) -> Identity(tenant='alice', pid=",
        "raised ResultTypeError: 'alice'.whoami: the reply is not a WrongIdentity:",
        "corral: worker stopped (reloaded, ask)",
        "stops by reason: crashed=1, evicted=1, idle_ttl=1, lru=1, memory_limit=1, reloaded=1, "
        "timeout=1",
        "All 11 steps behaved as expected",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "FAILED" not in out + result.stderr
    # The demo closed its supervisor: no worker it reported may still be running.
    pids = {int(pid) for pid in re.findall(r"\bpid (\d+)\b", out)}
    assert len(pids) >= 6
    assert not [pid for pid in pids if is_running(pid)]


def test_demo_fast_passes_every_step() -> None:
    assert_demo_passed(corral_cli("demo", "--fast", timeout=2 * _DEMO_BUDGET))


@pytest.mark.slow
def test_demo_with_spawn_start_method() -> None:
    result = corral_cli("demo", "--fast", "--start-method", "spawn", timeout=2 * _DEMO_BUDGET)
    assert_demo_passed(result)
    assert "start_method='spawn'" in result.stdout


def test_call_prints_the_json_result() -> None:
    result = corral_cli("call", FACTORY, "t1", "put", '"k"', "42")
    assert (result.returncode, result.stdout, result.stderr) == (0, "1\n", "")


def test_call_result_is_json() -> None:
    result = corral_cli("call", FACTORY, "t1", "slow_echo", '{"a": [1, null, "é"]}', "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == '{"a":[1,null,"é"]}\n'


def test_call_kernel_error_exits_1_with_type_and_message() -> None:
    result = corral_cli("call", FACTORY, "t1", "get", '"missing"')
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("KernelError: builtins.KeyError: 'missing'")


def test_call_crash_exits_1_with_exit_status() -> None:
    result = corral_cli("call", FACTORY, "t1", "crash", "5")
    assert result.returncode == 1
    assert "WorkerCrashedError: " in result.stderr
    assert "exited with code 5" in result.stderr


def test_call_timeout_kills_the_worker() -> None:
    result = corral_cli("call", FACTORY, "t1", "spin", "30", "--timeout", "0.3")
    assert result.returncode == 1
    assert "CallTimeoutError: 't1'.spin did not finish within 0.3s" in result.stderr


def test_call_factory_that_fails_to_import_is_a_start_error() -> None:
    result = corral_cli("call", "no_such_module_xyz:create", "t1", "whoami")
    assert result.returncode == 1
    assert result.stderr.startswith("StartError: ")
    assert "No module named 'no_such_module_xyz'" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["not-a-factory", "t1", "whoami"], "factory must look like 'package.module:callable'"),
        ([FACTORY, "", "whoami"], "TENANT must not be empty"),
        ([FACTORY, "t1", "put", "k", "42"], "JSON_ARG 1 is not JSON: 'k'"),
        ([FACTORY, "t1", "whoami", "--timeout", "0"], "must be > 0"),
    ],
)
def test_call_usage_errors_exit_2(args: list[str], message: str) -> None:
    result = corral_cli("call", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "corral call: error: " in result.stderr
    assert message in result.stderr


def test_version() -> None:
    result = corral_cli("--version")
    assert (result.returncode, result.stdout) == (0, f"corral {corral.__version__}\n")


def test_a_command_is_required() -> None:
    result = corral_cli()
    assert result.returncode == 2
    assert "COMMAND" in result.stderr


# -- bad options: one line, exit status 2, for every command ------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("--port", "80000"), {}, "--port: a port is 0..65535 (0: any free port), got 80000"),
        ((), {"CORRAL_PORT": "http"}, "CORRAL_PORT: not a whole number: 'http'"),
        (("--max-workers", "many"), {}, "--max-workers: not a whole number: 'many'"),
        (("--max-workers", "0"), {}, "max_workers must be an int >= 1, got 0"),
        ((), {"CORRAL_MAX_WORKERS": "0"}, "max_workers must be an int >= 1, got 0"),
        (("--idle-ttl", "-1"), {}, "idle_ttl must be >= 0, got -1.0"),
        (("--call-timeout", "soon"), {}, "--call-timeout: not a number of seconds: 'soon'"),
        (("--sandbox", "paranoid"), {}, "--sandbox: must be one of none, default, strict"),
        (("--worker-memory-limit", "12 parsecs"), {}, "not a size: '12 parsecs'"),
        (("--min-available-memory", "512KiB"), {}, "min_available_memory"),
        (
            ("--worker-memory-limit", "2GiB", "--worker-memory-hard-limit", "1GiB"),
            {},
            "worker_memory_limit (2147483648) must be below worker_memory_hard_limit",
        ),
        (("--memory-method", "magic"), {}, "--memory-method: must be one of auto, cgroup, rlimit"),
        (("--env", "NOEQUALS"), {}, "--env: expected KEY=VALUE, got 'NOEQUALS'"),
        (("--max-body-bytes", "0"), {}, "max_body_bytes must be >= 1, got 0"),
        (("--grace", "x"), {}, "--grace: not a number of seconds: 'x'"),
        (("--log-level", "loud"), {}, "--log-level: must be one of debug, info, warning, error"),
        (("--config", "/nonexistent.toml"), {}, "--config: cannot read '/nonexistent.toml'"),
        ((), {"CORRAL_CONFIG": "/nonexistent.toml"}, "CORRAL_CONFIG: cannot read"),
        (("not-a-factory",), {}, "factory must look like 'package.module:callable'"),
        (("--ray", "nowhere"), {}, "--ray: expected auto, HOST:PORT or ray://HOST:PORT"),
        ((), {"CORRAL_RAY_ON_EXIT": "linger"}, "CORRAL_RAY_ON_EXIT: must be one of shutdown"),
        # Found bad only once the supervisor starts: below what a fresh worker weighs.
        (("--worker-memory-limit", "10MiB"), {}, "at or below a fresh worker's baseline"),
    ],
)
def test_serve_refuses_bad_options_in_one_line(
    args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    port = () if "CORRAL_PORT" in env else ("--port", "0")  # a flag would win over it
    assert_refused(corral_cli("serve", *port, *args, env=env), "corral serve", message)


def test_serve_refuses_a_bad_config_file_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "corral.toml"
    config.write_text('[supervisor]\nworker_memory_limit = "lots"\n')
    result = corral_cli("serve", "--port", "0", "--config", str(config))
    assert_refused(result, "corral serve", "config file [supervisor] worker_memory_limit")
    config.write_text("[server]\nport = 80000\n")
    result = corral_cli("serve", "--config", str(config))
    assert_refused(result, "corral serve", "config file [server] port: a port is 0..65535")


def test_serve_refuses_a_factory_that_fails_to_load() -> None:
    """The factory is loaded once at start-up: a broken one ends the command, naming the
    import error, instead of leaving a healthy-looking gateway that fails every call."""
    result = corral_cli("serve", "--port", "0", "--start-timeout", "20", "no_such_module_xyz:c")
    assert result.returncode == 2, result
    assert result.stdout == "" and "Traceback" not in result.stderr
    # Before it, the log lines of the worker that tried (at most a few).
    *_log, error = result.stderr.splitlines()
    assert error.startswith("corral serve: error: the factory no_such_module_xyz:c failed its")
    assert "ModuleNotFoundError: No module named 'no_such_module_xyz'" in error


def test_serve_without_ray_never_imports_it() -> None:
    """Ray is optional: a gateway without --ray (its options, app, factory check) does not
    import it, and with --ray but no Ray installed the command says how to get it."""
    code = (
        "import sys; from corral.cli import main; "
        "status = main(['serve', '--port', '0', '--start-timeout', '20', 'no_such_module_xyz:c']); "
        "print(status, 'ray' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.split() == ["2", "False"], result
    code = "import sys; sys.modules['ray'] = None; from corral.cli import main; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", code, "serve", "--port", "0", "--ray", "auto"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert_refused(result, "corral serve", "--ray needs Ray: pip install 'corral[ray]'")


def _can_run_as_nobody() -> bool:
    if os.getuid() != 0:
        return False
    probe = subprocess.run(
        [sys.executable, "-c", "import corral.server._options"],
        capture_output=True, user=65534, group=65534, extra_groups=[], check=False,
        cwd="/", env={**os.environ, "PYTHONPATH": str(Path(corral.__file__).parents[1])},
    )  # fmt: skip
    return probe.returncode == 0


def test_serve_refuses_a_sandbox_the_host_cannot_give() -> None:
    """strict() needs root; as root, the command is run as uid 65534 to lack it."""
    user = None
    if os.getuid() == 0:
        if not _can_run_as_nobody():
            pytest.skip("uid 65534 cannot run this interpreter and checkout")
        user = 65534
    env = {"PYTHONPATH": str(Path(corral.__file__).parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "corral.cli", "serve", "--port", "0", "--sandbox", "strict"],
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
        env={**os.environ, **env}, user=user, group=user,
        extra_groups=[] if user is not None else None,
    )  # fmt: skip
    assert_refused(result, "corral serve", "the sandbox requires layers this host cannot provide")


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("demo", "--start-method", "fork"), {}, "argument --start-method: invalid choice"),
        (("demo",), {"CORRAL_START_METHOD": "fork"}, "CORRAL_START_METHOD: must be one of"),
        (("demo",), {"CORRAL_FAST": "maybe"}, "CORRAL_FAST: not a boolean"),
        (("call", FACTORY, "t1", "whoami", "--timeout", "x"), {}, "not a number of seconds"),
        (
            ("call", FACTORY, "t1", "whoami"),
            {"CORRAL_TIMEOUT": "-3"},
            "CORRAL_TIMEOUT: must be > 0",
        ),
        (("call", FACTORY, "t1", "whoami", "--start-method", "fork"), {}, "invalid choice"),
    ],
)
def test_demo_and_call_refuse_bad_options_in_one_line(
    args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    assert_refused(corral_cli(*args, env=env), f"corral {args[0]}", message)


def test_unknown_options_are_refused_in_one_line() -> None:
    assert_refused(corral_cli("serve", "--max-wrokers", "3"), "corral", "--max-wrokers")


def test_a_flag_wins_over_its_variable() -> None:
    result = corral_cli(
        "call", FACTORY, "t1", "spin", "30", "--timeout", "0.3", env={"CORRAL_TIMEOUT": "-3"}
    )
    assert result.returncode == 1
    assert "CallTimeoutError: 't1'.spin did not finish within 0.3s" in result.stderr


def test_every_option_is_in_help_with_its_variable() -> None:
    serve = corral_cli("serve", "--help").stdout
    for option in [*OPTIONS.values(), *SERVER.values()]:
        assert option.env in serve and option.flag.removeprefix("--") in serve, option.name
    assert "CORRAL_CONFIG" in serve
    assert "--sandbox none|default|strict" in serve
    demo = corral_cli("demo", "--help").stdout
    call = corral_cli("call", "--help").stdout
    assert "CORRAL_FAST" in demo and "CORRAL_START_METHOD" in demo
    for env in ("CORRAL_TIMEOUT", "CORRAL_START_METHOD", "CORRAL_VERBOSE"):
        assert env in call


def test_serve_takes_options_from_flags_variables_and_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--sandbox none`` is the none() preset (it was the default one); sizes take units
    everywhere; flag > variable > config file."""
    config = tmp_path / "corral.toml"
    config.write_text(
        '[supervisor]\nmax_workers = 3\nidle_ttl = 60\nworker_memory_limit = "1GiB"\n'
    )
    monkeypatch.setenv("CORRAL_MAX_WORKERS", "6")
    monkeypatch.setenv("CORRAL_IDLE_TTL", "none")
    gateway = Served(
        "--config", str(config), "--sandbox", "none", "--min-available-memory", "64MiB",
        "--idle-ttl", "30", "--start-timeout", "20", log=tmp_path / "log",
    )  # fmt: skip
    try:
        stats = httpx.get(f"{gateway.url}/v1/workers", timeout=30).json()
    finally:
        assert gateway.stop() == 0
    assert stats["max_workers"] == 6  # the variable wins over the file
    assert stats["limits"] == {"soft": 1 << 30, "hard": None}
    assert {s["state"] for s in stats["sandbox"].values()} == {"off"}, stats["sandbox"]
