"""corral's log lines say which tenant, which pid and why in the message text itself, so
that a host with plain ``logging.basicConfig`` sees them; the fields stay on the record
(``extra=``) for handlers that read them, and ``corral serve``'s formatter, which appends
fields the text does not say, prints none of them twice."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest

import corral
from corral.cli._serve import _Formatter
from tests.helpers import supervisor

BASIC = "%(levelname)s:%(name)s:%(message)s"  # logging.basicConfig's default format

pytestmark = pytest.mark.timeout(60)


class _Lines(logging.Handler):
    """What ``logging.basicConfig(format=BASIC)`` would print for corral's records (pytest
    keeps handlers on the root logger, where basicConfig would then do nothing), and the
    records themselves."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.stream = io.StringIO()
        self.records: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter(BASIC))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.stream.write(self.format(record) + "\n")

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()


@pytest.fixture
def basic() -> Iterator[_Lines]:
    logger = logging.getLogger("corral")
    handler = _Lines()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _one(lines: list[str], pattern: str) -> str:
    found = [line for line in lines if re.fullmatch(pattern, line)]
    assert len(found) == 1, (pattern, lines)
    return found[0]


async def test_start_crash_and_eviction_lines_name_tenant_pid_and_reason(basic: _Lines) -> None:
    async with supervisor(max_workers=2, idle_ttl=None) as sup:
        alice = (await sup.call("alice", "whoami"))["pid"]
        bob = (await sup.get_or_create("bob")).pid
        with pytest.raises(corral.WorkerCrashedError):
            await sup.call("bob", "crash", 3)
        await sup.call("carol", "echo", 1)
        await sup.call("dave", "echo", 1)  # two slots: alice, least recently used, goes
        assert "alice" not in sup

    lines = basic.lines()
    _one(lines, f"INFO:corral:worker ready tenant=alice pid={alice}")
    _one(lines, f"INFO:corral:worker ready tenant=bob pid={bob}")
    _one(
        lines,
        rf"WARNING:corral:worker stopped \(crashed, none\) tenant=bob pid={bob} "
        r"reason=crashed: exited with code 3",
    )
    _one(
        lines,
        rf"INFO:corral:worker stopped \(lru, ask\) tenant=alice pid={alice} reason=lru: "
        r"exited with code 0",
    )

    # The fields are still on the records, and the gateway's formatter says each once.
    serve = _Formatter(as_json=False)
    fields = ("tenant", "pid", "reason")
    ours = [r for r in basic.records if any(hasattr(r, f) for f in fields)]
    assert ours
    for record in ours:
        line = serve.format(record)
        for field in fields:
            if hasattr(record, field):
                said = f"{field}={getattr(record, field)}"
                assert line.count(said) == 1, line
                assert line.count(f" {field}=") == 1, line
