"""Project rules for the tests themselves that ruff cannot state.

A sleep is never synchronisation here: a test waits on an event, a pidfd or a
condition under a deadline. The few legitimate sleeps (a kernel's workload, one loop
turn, a process that must stay alive) carry ``# ok-sleep: <why>`` on their line.
"""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# A sleep called (asyncio's, time's, an imported bare one), or a module's sleep
# handed on (to an executor, a partial).
_SLEEP = re.compile(r"\bsleep\s*\(|\b(?:asyncio|time|anyio|trio)\.sleep\b")
_TAG = re.compile(r"#\s*ok-sleep:\s*\S")  # the tag, with a reason after it


def untagged_sleeps(text: str) -> list[int]:
    """Line numbers (from 1) of the lines of ``text`` that call a sleep without the tag.
    Line-based on purpose: code in strings (a host script, a worker's code) counts too."""
    return [
        number
        for number, line in enumerate(text.splitlines(), 1)
        if _SLEEP.search(line) and not _TAG.search(line)
    ]


def test_every_sleep_in_the_tests_says_why() -> None:
    offenders = [
        f"{path.relative_to(TESTS.parent)}:{number}"
        for path in sorted(TESTS.rglob("*.py"))
        for number in untagged_sleeps(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, (
        "a sleep is not synchronisation: wait on an event with a deadline, or tag a "
        "legitimate sleep with '# ok-sleep: <why>' on its line:\n  " + "\n  ".join(offenders)
    )


def test_the_sleep_check_finds_what_it_should() -> None:
    call = "sl" + "eep("  # (spelled apart: this file must pass its own check)
    text = "\n".join(
        [
            f"await asyncio.{call}0.1)",  # 1: untagged
            f"time.{call}1)  # ok-sleep: the workload of a test process",  # 2: tagged
            f"{call}2)  # ok-sleep:",  # 3: a tag without a reason
            f"x = 'time.{call}3600)'",  # 4: in a string: code that runs somewhere
            "asleep = True  # not a call",  # 5
            f"await asyncio.{call}  # ok-sleep: one loop turn",  # 6: tagged, split call
            "    0)",  # 7
            f"await loop.run_in_executor(None, time.{call[:-1]}, 1)",  # 8: handed on
        ]
    )
    assert untagged_sleeps(text) == [1, 3, 4, 8]
