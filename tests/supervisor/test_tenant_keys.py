"""Issue 14, point 5 (library side): one rule for tenant keys, refused with
``InvalidCallError`` at every entry point, and log output that nothing a kernel prints,
raises or sends can forge. The rule itself is pure; the rest runs real workers."""

from __future__ import annotations

import logging
import os
import sys
import uuid
from typing import Any

import msgspec
import pytest

import corral
from corral import InvalidCallError, Supervisor, SyncSupervisor, check_tenant
from corral._text import one_line
from corral.ipc.framing import frame_header
from tests.helpers import FAST, K, supervisor

LOUD = "tests.supervisor.test_tenant_keys:make_loud"
FORGED = "\n2026-01-01 corral: worker ready [victim pid 1]"


class LoudKernel:
    """Prints what it is told to, as text or raw bytes, on stdout or stderr."""

    def say(self, text: str, stream: str = "stdout") -> bool:
        out = sys.stdout if stream == "stdout" else sys.stderr
        out.write(text)
        out.flush()
        return True

    def say_bytes(self, data: bytes) -> bool:
        os.write(1, data)
        return True


def make_loud(tenant: str) -> LoudKernel:
    if tenant.startswith("broken"):
        raise RuntimeError(FORGED + "\x1b[2J\x00")
    return LoudKernel()


GOOD = [
    "a",
    "0",
    "tenant-42",
    str(uuid.UUID(int=0x6F1C2A4E1B2D4C3E9F00123456789ABC)),
    "alice+eu@example.com",
    "org:project",
    "Org.Team_1:proj-2",
    "x" * corral.TENANT_MAX_BYTES,
]

BAD = {
    "": "it is empty",
    "x" * (corral.TENANT_MAX_BYTES + 1): "129 characters long",
    "x" * 100_000: "100000 characters long",
    "a/b": "contains '/'",
    "a\nb": "contains '\\n'",
    "a\x00b": "contains '\\x00'",
    "a\x1b[2J": "contains '\\x1b'",
    "a b": "contains ' '",
    "a%2Fb": "contains '%'",
    "a?b": "contains '?'",
    "a#b": "contains '#'",
    "<u>&amp;": "starts with '<'",
    ".": "starts with '.'",
    "..": "starts with '.'",
    "-rf": "starts with '-'",
    "_x": "starts with '_'",
    "café": "contains 'é'",
    "\u0430cme": "starts with '\u0430'",  # Cyrillic a: a look-alike of "acme"
    "a\u202eb": "contains '\\u202e'",
}

NOT_STR: list[object] = [None, 5, b"tenant", ["t"], ("t",)]


# -- the rule (pure) ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", GOOD)
def test_keys_real_tenants_use_are_accepted(key: str) -> None:
    assert check_tenant(key) is None


@pytest.mark.parametrize(("key", "why"), list(BAD.items()), ids=lambda v: repr(v)[:20])
def test_keys_breaking_the_rule_are_refused_saying_why(key: str, why: str) -> None:
    with pytest.raises(InvalidCallError) as err:
        check_tenant(key)
    message = str(err.value)
    assert err.value.kind == "tenant"
    assert why in message and corral.TENANT_RULE in message
    assert message.isprintable() and len(message) < 400  # never the key whole, never raw


@pytest.mark.parametrize("key", NOT_STR)
def test_keys_that_are_not_str_are_refused(key: object) -> None:
    with pytest.raises(InvalidCallError, match=f"must be a str.*got {type(key).__name__}") as err:
        check_tenant(key)
    assert err.value.kind == "tenant"
    assert isinstance(err.value, ValueError)  # as before the rule: callers catching it still do


def test_a_str_subclass_is_held_to_the_same_rule() -> None:
    class Key(str):
        pass

    check_tenant(Key("org:project"))
    with pytest.raises(InvalidCallError):
        check_tenant(Key("a/b"))


def test_the_rule_in_words_and_in_bytes() -> None:
    assert corral.TENANT_MAX_BYTES == 128
    assert corral.TENANT_RULE == (
        "1 to 128 characters, each an ASCII letter, digit or one of . _ - : @ +, "
        "the first a letter or digit"
    )
    for key in GOOD:  # ASCII: bytes and characters are the same count
        assert len(key.encode()) == len(key) <= corral.TENANT_MAX_BYTES


# -- one_line (pure) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("worker ready", "worker ready"),
        ("café ∑ 漢字 \\ 'q'", "café ∑ 漢字 \\ 'q'"),  # printable: as it is
        (FORGED, "\\n2026-01-01 corral: worker ready [victim pid 1]"),
        ("\x1b[2J", "\\x1b[2J"),
        ("\x00", "\\x00"),
        ("50%\r100%", "50%\\r100%"),
        ("a\tb\x7f\x85", "a\\tb\\x7f\\x85"),
        ("x\u2028y\u2029z", "x\\u2028y\\u2029z"),  # line and paragraph separators
        ("user\u202efdp.exe", "user\\u202efdp.exe"),  # right-to-left override
        ("a\u200bb", "a\\u200bb"),  # zero-width space
        ("é\n\\", "\\xe9\\n\\\\"),  # escaped as a whole: unambiguous
    ],
)
def test_one_line_escapes_what_is_not_printable(text: str, shown: str) -> None:
    assert one_line(text) == shown
    assert one_line(text).isprintable()


def test_one_line_cuts_before_escaping() -> None:
    assert one_line("\n" * 10, 3) == "\\n\\n\\n... (7 more characters)"
    assert one_line("abc", 3) == "abc"
    assert len(one_line("\x00" * 100_000, 500)) < 2100


# -- every entry point refuses a bad key, and starts nothing -----------------------------------


async def test_every_async_entry_point_refuses_a_bad_key_and_starts_nothing() -> None:
    events: list[corral.WorkerEvent] = []
    async with supervisor(on_event=events.append) as sup:
        for key in [*BAD, *NOT_STR]:
            attempts: list[Any] = [
                lambda k=key: sup.call(k, "echo", 1),
                lambda k=key: sup.invoke(k, "echo", [1], timeout=5),
                lambda k=key: sup.get_or_create(k),
                lambda k=key: sup.evict(k),
            ]
            for attempt in attempts:
                with pytest.raises(InvalidCallError) as err:
                    await attempt()
                assert err.value.kind == "tenant"
            with pytest.raises(InvalidCallError):
                _ = key in sup
        assert sup.stats().starts == 0 and sup.keys() == [] and events == []
        # A warm worker does not make a bad key look up anything either.
        await sup.call("a", "echo", 1)
        with pytest.raises(InvalidCallError):
            await sup.call("a/b", "echo", 1)
        assert sup.keys() == ["a"] and sup.stats().starts == 1


async def test_every_good_key_gets_its_own_worker() -> None:
    async with supervisor(max_workers=len(GOOD)) as sup:
        for key in GOOD:
            assert (await sup.call(key, "whoami"))["tenant"] == key
            assert key in sup
        assert sup.keys() == GOOD
        assert [w.tenant for w in sup.stats().workers] == GOOD
        for key in GOOD:
            assert await sup.evict(key) is True
        assert len(sup) == 0


def test_every_sync_entry_point_refuses_a_bad_key() -> None:
    with SyncSupervisor(K, **FAST) as sup:
        for key in ["a/b", "a\nb", "x" * 100_000, "", None]:
            for attempt in (
                lambda k=key: sup.call(k, "echo", 1),  # type: ignore[arg-type]
                lambda k=key: sup.invoke(k, "echo", [1]),  # type: ignore[arg-type]
                lambda k=key: sup.get_or_create(k),  # type: ignore[arg-type]
                lambda k=key: sup.evict(k),  # type: ignore[arg-type]
                lambda k=key: k in sup,
            ):
                with pytest.raises(InvalidCallError) as err:
                    attempt()
                assert err.value.kind == "tenant"
        assert sup.stats().starts == 0
        assert sup.call("org:project", "echo", 7) == 7
        assert "org:project" in sup and sup.keys() == ["org:project"]


# -- log output cannot be forged ---------------------------------------------------------------


def _lines(records: list[logging.LogRecord]) -> list[str]:
    """What a plain one-line-per-record handler would write."""
    formatter = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s")
    return "\n".join(formatter.format(r) for r in records).split("\n")


async def test_what_a_kernel_prints_is_one_escaped_record_per_line_naming_its_tenant(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="corral")
    async with Supervisor(LOUD, **FAST) as sup:
        await sup.call("t", "say", FORGED + "\n")
        await sup.call("t", "say", "\x1b[2J\x1b[1;1Hclean screen\n", "stderr")
        await sup.call("t", "say", "nul\x00byte\rcarriage\u2028separator\x85nel\n")
        await sup.call("t", "say_bytes", b"not utf-8: \xff\xfe\n")
        await sup.call("t", "say", "no newline at the end \x1b[31m")
        pid = sup.stats().workers[0].pid
    worker = [r for r in caplog.records if r.name == "corral.worker"]
    messages = [r.getMessage() for r in worker]
    assert messages == [
        "[t] ",
        "[t] 2026-01-01 corral: worker ready [victim pid 1]",
        "[t] \\x1b[2J\\x1b[1;1Hclean screen",
        "[t] nul\\x00byte\\rcarriage\\u2028separator\\x85nel",
        "[t] not utf-8: \\xff\\xfe",
        "[t] no newline at the end \\x1b[31m",
    ]
    assert all((r.tenant, r.pid) == ("t", pid) for r in worker)  # type: ignore[attr-defined]
    everything = [r for r in caplog.records if r.name.startswith("corral")]
    assert len(_lines(everything)) == len(everything)  # one line per record, all printable
    assert all(line.isprintable() for line in _lines(everything))


async def test_what_a_worker_sends_or_raises_is_escaped_in_logs_and_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="corral")
    hostile = FORGED + "\x1b[2J\x00" + "x" * 100_000
    async with supervisor() as sup:
        # The kernel raises: KernelError's message is one line; its attributes are as raised.
        with pytest.raises(corral.KernelError) as kernel_error:
            await sup.call("t", "fail", FORGED + "\x1b[2J")
        assert str(kernel_error.value).isprintable()
        assert kernel_error.value.remote_message == FORGED + "\x1b[2J"
        # A frame whose tag is the forged line: msgspec quotes the value it refused.
        body = msgspec.msgpack.encode([hostile, 1])
        with pytest.raises(corral.ProtocolError) as protocol_error:
            await sup.call("t", "write_raw", frame_header(len(body)) + body)
        assert str(protocol_error.value).isprintable()
        assert len(str(protocol_error.value)) < 2000
    async with Supervisor(LOUD, **FAST) as sup:
        # The factory raises: StartError's message is one line.
        with pytest.raises(corral.StartError) as start_error:
            await sup.call("broken", "say", "x")
        assert str(start_error.value).isprintable()
        assert "victim pid 1" in str(start_error.value)
    records = [r for r in caplog.records if r.name.startswith("corral")]
    assert any("protocol violation" in r.getMessage() for r in records)
    assert len(_lines(records)) == len(records)
    assert all(line.isprintable() and len(line) < 4000 for line in _lines(records))
