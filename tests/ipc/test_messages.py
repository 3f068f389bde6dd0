"""Every message Struct round-trips through its channel's union, and the unions are strict."""

from __future__ import annotations

import typing
from typing import Any

import msgspec
import pytest

from corral.ipc.framing import FrameDecoder, ProtocolViolation, RecordDecoder, encode_frame
from corral.ipc.messages import (
    PROTOCOL_VERSION,
    Bind,
    Call,
    CallFailed,
    ErrorKind,
    FromWarden,
    FromWorker,
    Hello,
    KillWorker,
    LayerCheck,
    RemoteError,
    Result,
    SandboxSpec,
    Shutdown,
    SpawnFailed,
    SpawnWorker,
    Start,
    StartFailed,
    ToWarden,
    ToWorker,
    WardenHello,
    WorkerExited,
    WorkerSpawned,
)

SANDBOX = SandboxSpec(
    rlimits=[("core", 0)],
    scratch=True,
    no_new_privs=True,
    landlock=False,
    seccomp=True,
    read_paths=["/usr"],
    cgroup_tree=True,
    max_processes=64,
    uid_range=(200_000_000, 16),
    namespaces=True,
    shm_bytes=1 << 20,
    drop_capabilities=True,
    scratch_bytes=8 << 20,
    scratch_inodes=1024,
)


def raw(value: Any) -> msgspec.Raw:
    return msgspec.Raw(msgspec.msgpack.encode(value))


ERROR = RemoteError(
    type_name="builtins.KeyError", message="'k'", traceback="Traceback (most recent call last):\n"
)

SAMPLES: dict[Any, list[Any]] = {
    ToWorker: [
        Start(
            tenant="acme",
            factory="pkg.mod:make",
            factory_blob=None,
            sys_path=["/srv/plugins"],
            max_frame_bytes=1 << 20,
        ),
        Start(
            tenant="t\u00e9nant",
            factory=None,
            factory_blob=b"\x80\x04dill\x00\xff",
            sys_path=[],
            max_frame_bytes=2**32 - 1,
        ),
        Call(id=0, method="add", args=raw([[1, 2], {}])),
        Call(id=2**63 - 1, method="f", args=raw([[None, 1.5, b"b"], {"k": [1, {"x": 2}]}])),
        Bind(tenant="tenant-7"),
        Shutdown(),
    ],
    FromWorker: [
        Hello(protocol_version=PROTOCOL_VERSION, pid=4242, host_pid=None),
        Hello(protocol_version=PROTOCOL_VERSION, pid=2, host_pid=4243),
        StartFailed(error=ERROR),
        Result(id=7, value=raw({"sum": 3})),
        Result(id=8, value=raw(None)),
        Result(id=9, value=raw([b"bytes", 1.5, "text", True])),
        *(CallFailed(id=9, kind=kind, error=ERROR) for kind in typing.get_args(ErrorKind)),
    ],
    ToWarden: [
        SpawnWorker(id=1, exec=True, memory_limit=None, memory_method="rlimit", sandbox=SANDBOX),
        SpawnWorker(
            id=2, exec=False, memory_limit=256 << 20, memory_method="cgroup", sandbox=SANDBOX
        ),
        KillWorker(pid=4242, signal=9),
    ],
    FromWarden: [
        WardenHello(
            protocol_version=PROTOCOL_VERSION,
            pid=100,
            memory_cgroups=True,
            memory_cgroups_detail="cgroup v1 memory",
            sandbox_layers={
                "landlock": LayerCheck(True, "ABI 7"),
                "seccomp": LayerCheck(True, ""),
                "namespaces": LayerCheck(False, "needs root"),
            },
        ),
        WorkerSpawned(id=1, pid=4242, memory_cgroup=None),
        WorkerSpawned(id=2, pid=4243, memory_cgroup="/sys/fs/cgroup/memory/corral-1/w2"),
        SpawnFailed(id=2, message="fork: Resource temporarily unavailable"),
        WorkerExited(pid=4242, returncode=-9, oom_killed=True),
        WorkerExited(pid=4243, returncode=0, oom_killed=False),
    ],
}
UNIONS = {
    "ToWorker": ToWorker,
    "FromWorker": FromWorker,
    "ToWarden": ToWarden,
    "FromWarden": FromWarden,
}
CASES = [
    pytest.param(union, msg, id=f"{name}-{type(msg).__name__}-{i}")
    for name, union in UNIONS.items()
    for i, msg in enumerate(SAMPLES[union])
]


def strict_decoders(union: Any) -> list[Any]:
    """Decode one body with both decoders; each must raise ProtocolViolation on bad input."""

    def via_frame(body: bytes) -> Any:
        [msg] = FrameDecoder(union).feed(len(body).to_bytes(4, "big") + body)
        return msg

    def via_record(body: bytes) -> Any:
        return RecordDecoder(union).decode(body)

    return [via_frame, via_record]


def assert_rejected(union: Any, body: bytes) -> None:
    for decode in strict_decoders(union):
        with pytest.raises(ProtocolViolation):
            decode(body)


# --- round trips ---------------------------------------------------------------------------------


def test_samples_cover_every_struct_of_every_union() -> None:
    for union in UNIONS.values():
        assert {type(m) for m in SAMPLES[union]} == set(typing.get_args(union))
    kinds = {m.kind for m in SAMPLES[FromWorker] if isinstance(m, CallFailed)}
    assert kinds == {"kernel", "method", "arguments", "result"}


@pytest.mark.parametrize(("union", "msg"), CASES)
def test_round_trip_through_a_frame(union: Any, msg: Any) -> None:
    got = FrameDecoder(union).feed(encode_frame(msg))
    assert got == [msg]
    assert type(got[0]) is type(msg)


@pytest.mark.parametrize(("union", "msg"), CASES)
def test_round_trip_through_a_record(union: Any, msg: Any) -> None:
    got = RecordDecoder(union).decode(msgspec.msgpack.encode(msg))
    assert got == msg
    assert type(got) is type(msg)


def test_raw_payload_round_trips_byte_for_byte() -> None:
    payload = msgspec.msgpack.encode([[1, "two", b"3"], {"four": 4.0}])
    [msg] = FrameDecoder(ToWorker).feed(
        encode_frame(Call(id=5, method="m", args=msgspec.Raw(payload)))
    )
    assert isinstance(msg, Call)
    assert bytes(msg.args) == payload
    assert msgspec.msgpack.decode(msg.args) == [[1, "two", b"3"], {"four": 4.0}]


def test_messages_are_compact_tagged_arrays() -> None:
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(Call(id=3, method="m", args=raw(1)))) == [
        "call",
        3,
        "m",
        1,
    ]
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(Shutdown())) == ["shutdown"]
    hello = WardenHello(1, 2, False, "", {"landlock": LayerCheck(True, "ABI 7")})
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(hello)) == [
        "warden_hello",
        1,
        2,
        False,
        "",
        {"landlock": [True, "ABI 7"]},
    ]
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(StartFailed(error=ERROR))) == [
        "start_failed",
        ["builtins.KeyError", "'k'", "Traceback (most recent call last):\n"],
    ]


@pytest.mark.parametrize("msg", [SAMPLES[ToWorker][0], SAMPLES[FromWarden][-1], ERROR])
def test_messages_are_frozen(msg: Any) -> None:
    field = msg.__struct_fields__[0]
    before = getattr(msg, field)
    with pytest.raises(AttributeError):
        setattr(msg, field, None)
    assert getattr(msg, field) == before


# --- strictness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("union", UNIONS.values(), ids=UNIONS.keys())
def test_unknown_tag_is_a_violation(union: Any) -> None:
    assert_rejected(union, msgspec.msgpack.encode(["no_such_message", 1, 2]))


@pytest.mark.parametrize(
    ("union", "foreign"),
    [
        (ToWorker, Hello(protocol_version=1, pid=1, host_pid=None)),
        (FromWorker, Call(id=1, method="m", args=raw(None))),
        (ToWarden, WorkerSpawned(id=1, pid=2, memory_cgroup=None)),
        (
            FromWarden,
            SpawnWorker(
                id=1, exec=True, memory_limit=None, memory_method="rlimit", sandbox=SANDBOX
            ),
        ),
        (
            FromWorker,
            WardenHello(
                protocol_version=1,
                pid=1,
                memory_cgroups=False,
                memory_cgroups_detail="",
                sandbox_layers={},
            ),
        ),
    ],
    ids=lambda v: getattr(v, "__name__", type(v).__name__),
)
def test_message_of_another_direction_is_a_violation(union: Any, foreign: Any) -> None:
    assert_rejected(union, msgspec.msgpack.encode(foreign))


WRONG_TYPES = [
    (ToWorker, ["call", "1", "m", None]),  # id as str
    (ToWorker, ["call", 1, 7, None]),  # method as int
    (ToWorker, ["call", True, "m", None]),  # bool is not an int
    (ToWorker, ["call", 1.0, "m", None]),  # float is not an int
    (ToWorker, ["start", "t", None, None, "/not/a/list", 10]),
    (ToWorker, ["start", "t", None, None, [1], 10]),  # sys_path of ints
    (ToWorker, ["start", "t", None, "blob-as-str", [], 10]),
    (ToWorker, ["start", None, "m:f", None, [], 10]),  # tenant is not optional
    (FromWorker, ["hello", "1", 42]),
    (FromWorker, ["failed", 1, "meltdown", ["T", "m", "tb"]]),  # kind outside the Literal
    (FromWorker, ["failed", 1, "kernel", ["T", "m"]]),  # RemoteError short a field
    (FromWorker, ["failed", 1, "kernel", {"type_name": "T", "message": "m", "traceback": ""}]),
    (FromWorker, ["start_failed", "just a string"]),
    (ToWarden, ["spawn", 1, 1]),  # exec must be a bool
    (ToWarden, ["kill", 1, "SIGKILL"]),
    (FromWarden, ["exited", 1, None]),
    (FromWarden, ["spawn_failed", 1, b"bytes"]),
    (FromWarden, ["warden_hello", 1, 2, True, "", {"landlock": "available (ABI 7)"}]),  # text
    (FromWarden, ["warden_hello", 1, 2, True, "", {"landlock": [1, "ABI 7"]}]),  # not a bool
    (FromWarden, ["warden_hello", 1, 2, True, "", {"landlock": [True]}]),  # no detail
    (FromWarden, ["warden_hello", 1, 2, True, "", {"landlock": [True, "", 0]}]),  # extra
]


@pytest.mark.parametrize(("union", "body"), WRONG_TYPES, ids=lambda v: repr(v)[:40])
def test_wrong_field_type_is_a_violation(union: Any, body: list[Any]) -> None:
    assert_rejected(union, msgspec.msgpack.encode(body))


@pytest.mark.parametrize(("union", "msg"), [c for c in CASES if c.values[1].__struct_fields__])
def test_missing_last_field_is_a_violation(union: Any, msg: Any) -> None:
    fields = msgspec.msgpack.decode(msgspec.msgpack.encode(msg))
    assert_rejected(union, msgspec.msgpack.encode(fields[:-1]))


@pytest.mark.parametrize(("union", "msg"), CASES)
def test_map_encoding_is_a_violation(union: Any, msg: Any) -> None:
    as_map = {"type": msgspec.msgpack.decode(msgspec.msgpack.encode(msg))[0]}
    as_map.update(zip(msg.__struct_fields__, msgspec.structs.astuple(msg), strict=True))
    assert_rejected(union, msgspec.msgpack.encode(as_map))


def accepts(union: Any, body: bytes) -> bool:
    try:
        RecordDecoder(union).decode(body)
    except ProtocolViolation:
        return False
    return True


def test_forbid_unknown_fields_rejects_an_extra_element() -> None:
    """Control: forbid_unknown_fields=True on a plain array_like Struct rejects extras."""

    class Strict(msgspec.Struct, array_like=True, tag="s", forbid_unknown_fields=True):
        x: int

    assert accepts(Strict, msgspec.msgpack.encode(["s", 1]))
    assert not accepts(Strict, msgspec.msgpack.encode(["s", 1, 0]))


def test_extra_array_element_is_a_violation() -> None:
    accepted = []
    for case in CASES:
        union, msg = case.values
        fields = msgspec.msgpack.decode(msgspec.msgpack.encode(msg))
        body = msgspec.msgpack.encode([*fields, 0])
        for decode in strict_decoders(union):
            try:
                decode(body)
            except ProtocolViolation:
                continue
            accepted.append((case.id, decode.__name__))
    assert accepted == []


def test_extra_element_in_nested_remote_error_is_a_violation() -> None:
    assert_rejected(FromWorker, msgspec.msgpack.encode(["start_failed", ["T", "m", "tb", "x"]]))


@pytest.mark.parametrize("max_frame_bytes", [1024, 4096, 65536, 1 << 20])
def test_an_error_reply_always_fits_in_one_frame(max_frame_bytes: int) -> None:
    """Whatever a kernel raises (here: a 1 MiB message of 4-byte characters, from a class
    with a 10,000-character name), its CallFailed reply fits in ``max_frame_bytes``."""
    from corral.ipc import CallFailed, encode_frame
    from corral.worker._loop import remote_error

    hostile = type("\U0001f600" * 10_000, (Exception,), {})
    try:
        raise hostile("\U0001f4a3" * (1 << 20))
    except Exception as exc:
        error = remote_error(exc, max_frame_bytes)
    frame = encode_frame(CallFailed(7, "kernel", error))
    assert len(frame) <= max_frame_bytes
    assert error.message.endswith("...[truncated]") and error.type_name.endswith("...[truncated]")
