"""Per-tenant policy (``Supervisor(..., policy=fn)``): what each tenant's workers get —
factory, call timeout, memory limits, sandbox and read paths, a version — with the
supervisor's options where the policy is silent; and, hostile, a tenant cannot read
another tenant's plugin files under ``default()``."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Iterator

import msgspec
import pytest

import corral
from corral import Supervisor, TenantPolicy
from tests import plugins
from tests.helpers import FAST, K, start_strict

pytestmark = pytest.mark.timeout(120)

ROOT = os.geteuid() == 0


async def test_unset_fields_fall_back_to_the_supervisors_options() -> None:
    policies = {
        "silent": TenantPolicy(version="2024-06"),  # the supervisor's call_timeout: 0.5 s
        "patient": TenantPolicy(call_timeout=None),  # its own: no limit
    }
    async with Supervisor(K, call_timeout=0.5, policy=policies.__getitem__, **FAST) as sup:
        with pytest.raises(corral.CallTimeoutError):
            await sup.call("silent", "spin", 30.0)
        assert await sup.invoke("patient", "async_echo", (1, 1.5)) == 1  # past 0.5 s
        with pytest.raises(corral.CallTimeoutError):  # a call's own timeout still wins
            await sup.invoke("patient", "spin", (30.0,), timeout=0.5)
        assert await sup.call("silent", "echo", 3) == 3
        versions = {w.tenant: w.version for w in sup.stats().workers}
        assert versions == {"silent": "2024-06"}  # "patient"'s was killed by its timeout


async def test_a_tenant_gets_its_own_factory() -> None:
    def policy(tenant: str) -> TenantPolicy:
        return TenantPolicy(factory="corral.examples.demo:create" if tenant == "demo" else None)

    async with Supervisor(K, policy=policy, **FAST) as sup:
        assert "notes" in await sup.call("demo", "whoami")  # the demo's kernel
        assert "ppid" in await sup.call("other", "whoami")  # the supervisor's


async def test_the_policy_is_asked_once_per_activation() -> None:
    asked: list[str] = []

    def policy(tenant: str) -> TenantPolicy:
        asked.append(tenant)
        return TenantPolicy()

    async with Supervisor(K, policy=policy, **FAST) as sup:
        for _ in range(3):
            await sup.call("t", "echo", 1)
        assert asked == ["t"]
        await sup.evict("t")
        await sup.call("t", "echo", 1)
        assert asked == ["t", "t"]


async def test_a_policy_that_raises_or_returns_garbage_is_a_start_error() -> None:
    def policy(tenant: str) -> TenantPolicy:
        if tenant == "boom":
            raise LookupError("no such tenant in the catalogue")
        return "not a policy"  # type: ignore[return-value]

    async with Supervisor(K, policy=policy, **FAST) as sup:
        with pytest.raises(corral.StartError, match="LookupError: no such tenant"):
            await sup.call("boom", "echo", 1)
        with pytest.raises(corral.StartError, match="not a TenantPolicy"):
            await sup.call("other", "echo", 1)
        assert sup.keys() == [] and sup.stats().starts == 0


def test_a_policy_is_checked_when_it_is_made() -> None:
    with pytest.raises(ValueError, match="call_timeout"):
        TenantPolicy(call_timeout=-1)
    with pytest.raises(ValueError, match="must be below worker_memory_hard_limit"):
        TenantPolicy(worker_memory_limit=512 << 20, worker_memory_hard_limit=256 << 20)
    with pytest.raises(ValueError, match="absolute paths"):
        TenantPolicy(extra_read_paths=("relative/dir",))
    with pytest.raises(ValueError, match="factory"):
        TenantPolicy(factory="not an import string")
    assert TenantPolicy(call_timeout=None).call_timeout is None  # None is a value: no limit
    assert TenantPolicy().call_timeout is msgspec.UNSET


# -- hostile: one tenant's plugin directory is not another's ------------------------------------


@pytest.fixture
def plugin_dirs() -> Iterator[dict[str, str]]:
    """Two tenants' plugin directories, each with its code and a secret, readable by any
    uid (so that only the sandbox stands between a worker and the other's files), in a
    place no worker may read by default."""
    base = tempfile.mkdtemp(prefix="corral-plugins-", dir="/var/tmp")
    try:
        os.chmod(base, 0o755)
        dirs = {}
        for tenant in ("tenant-a", "tenant-b"):
            path = os.path.join(base, tenant)
            os.mkdir(path, 0o755)
            for name, text in (("plugin.py", plugins.PLUGIN_SOURCE), ("secret.txt", tenant)):
                with open(os.path.join(path, name), "w") as f:
                    f.write(text)
                os.chmod(os.path.join(path, name), 0o644)
            dirs[tenant] = path
        yield dirs
    finally:
        shutil.rmtree(base)


def plugin_policy(dirs: dict[str, str]) -> corral.supervisor.policy.Policy:
    def policy(tenant: str) -> TenantPolicy:
        return TenantPolicy(
            factory=functools.partial(plugins.load, dirs[tenant]),
            extra_read_paths=(dirs[tenant],),
            version="1",
        )

    return policy


PRESETS = {
    "default": corral.Sandbox.default,
    "strict": corral.Sandbox.strict,
    "none": corral.Sandbox.none,
}


@pytest.mark.parametrize("sandbox", list(PRESETS))
async def test_a_tenant_cannot_read_another_tenants_plugin_files(
    plugin_dirs: dict[str, str], sandbox: str
) -> None:
    sup = Supervisor(K, sandbox=PRESETS[sandbox](), policy=plugin_policy(plugin_dirs), **FAST)
    await (start_strict(sup) if sandbox == "strict" else sup.start())
    async with sup:
        if sandbox != "none" and not sup.stats().sandbox["landlock"].on:
            pytest.skip(f"no Landlock here: {sup.stats().sandbox['landlock']}")
        for me, other in (("tenant-a", "tenant-b"), ("tenant-b", "tenant-a")):
            mine = os.path.join(plugin_dirs[me], "secret.txt")
            theirs = os.path.join(plugin_dirs[other], "secret.txt")
            assert (await sup.call(me, "whoami"))["home"] == plugin_dirs[me]
            assert await sup.call(me, "read", mine) == me  # its own directory: readable
            if sandbox != "none":
                assert await sup.call(me, "read", theirs) == "EACCES"
                assert await sup.call(me, "read", plugin_dirs[other] + "/plugin.py") == "EACCES"
            else:  # the control: without the sandbox, nothing stops it
                assert await sup.call(me, "read", theirs) == other
        assert {w.version for w in sup.stats().workers} == {"1"}


async def test_a_tenants_memory_limit_below_a_fresh_workers_weight_is_refused() -> None:
    """As the supervisor's own limits are at start: a limit every worker would exceed as
    soon as it started is a StartError for that tenant, naming the baseline."""

    def policy(tenant: str) -> TenantPolicy:
        if tenant == "tiny":
            return TenantPolicy(worker_memory_limit=2 << 20)
        return TenantPolicy(worker_memory_limit=1 << 30)

    async with Supervisor(K, policy=policy, **FAST) as sup:
        assert sup.stats().memory_baseline is not None  # measured at start for the policies
        with pytest.raises(corral.StartError, match="baseline"):
            await sup.call("tiny", "echo", 1)
        assert await sup.call("roomy", "echo", 1) == 1
        assert sup.keys() == ["roomy"]
