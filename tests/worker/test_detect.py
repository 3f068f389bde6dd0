"""What the warden finds each sandbox layer would be on this host (``_sandbox.detect``,
``_privileged.detect``): a ``LayerCheck`` per layer, available with how, or not with why.

Not here: the scratch quota (``test_scratch``), cgroups (``test_cgroup``), and how the
supervisor reports these (``tests/supervisor/test_sandbox.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.ipc import LayerCheck
from corral.worker import _privileged, _sandbox

pytestmark = pytest.mark.timeout(60)

ROOT = os.geteuid() == 0


def test_the_unprivileged_layers_each_say_how_or_why_not() -> None:
    found = _sandbox.detect()
    assert set(found) == {"landlock", "seccomp", "no_new_privs", "rlimits", "capabilities"}
    abi = _sandbox.landlock_abi()
    assert found["landlock"] == (
        LayerCheck(True, f"ABI {abi}") if abi else LayerCheck(False, "kernel without Landlock")
    )
    no_seccomp = _sandbox.seccomp_supported()
    assert found["seccomp"] == LayerCheck(no_seccomp is None, no_seccomp or "")
    assert found["no_new_privs"] == found["rlimits"] == LayerCheck(True, "")
    held = _sandbox.capability_sets()["CapPrm"]
    if held and found["capabilities"].available:
        detail = "all dropped: effective, permitted, inheritable, ambient, bounding"
        assert found["capabilities"] == LayerCheck(True, detail)
    elif not held:
        detail = "none held: the host runs without capabilities"
        assert found["capabilities"] == LayerCheck(True, detail)


def test_the_root_layers_say_why_not_without_trying_when_they_cannot_work() -> None:
    assert _privileged.detect(200_000_000, [], user_namespace=True, namespaces=False) == {
        "dedicated_uid": LayerCheck(False, "needs root (a user namespace maps only our uid)"),
        "namespaces": LayerCheck(False, "not requested"),
    }


@pytest.mark.skipif(not ROOT, reason="a uid of its own per worker needs root")
def test_a_dedicated_uid_is_tried_for_real(tmp_path: Path) -> None:
    found = _privileged.detect(200_000_000, [], user_namespace=False, namespaces=False)
    assert found["dedicated_uid"] == LayerCheck(True, "uids from 200000000")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    blocked = _privileged.detect(200_000_000, [str(private)], False, False)["dedicated_uid"]
    assert not blocked.available
    assert blocked.detail.startswith(f"a worker's uid cannot read {private} ("), blocked
