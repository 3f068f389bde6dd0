"""The ``corral`` command line, run as a real subprocess (``python -m corral.cli``).

The demo doubles as an end-to-end smoke test: it checks every step itself and
exits non-zero on a surprise, so here we assert on its exit status, a few key
lines, its run time, and that no worker it started outlived it.
"""

from __future__ import annotations

import re
import subprocess
import sys

import psutil
import pytest

import corral

FACTORY = "corral.examples.demo:create"
_DEMO_BUDGET = 30.0  # seconds `demo --fast` must stay well under


def corral_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


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
        "corral: worker stopped (lru, ask): exited with code 0  [alice pid",
        "raised KernelError: builtins.KeyError: 'shoe size'",
        "raised WorkerCrashedError:",
        "exitcode=7, signal=None",
        "raised CallTimeoutError:",
        "corral: worker stopped (idle_ttl, ask)",
        "worker output: [bob] notebook for bob closing with 1 notes",
        "corral: worker stopped (evicted, ask)",
        "over worker_memory_limit: replacing it  [alice pid",
        "corral: worker stopped (memory_limit, ask)",
        "stops by reason: crashed=1, evicted=1, idle_ttl=1, lru=1, memory_limit=1, timeout=1",
        "All 9 steps behaved as expected",
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
