"""Typed results: ``call(..., result_type=T)`` decodes the kernel's reply strictly into
``T``; a reply that does not fit is a ResultTypeError and the worker serves on."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, TypedDict

import msgspec
import pytest

import corral
from corral import ResultTypeError, Supervisor
from tests.helpers import FAST, K

pytestmark = pytest.mark.timeout(60)


class Point(msgspec.Struct):
    x: int
    y: int


@dataclasses.dataclass
class Box:
    name: str
    size: float


class Row(TypedDict):
    id: int
    tags: list[str]


class Cat(msgspec.Struct, tag="cat"):
    lives: int


class Dog(msgspec.Struct, tag="dog"):
    good: bool


Count = Annotated[int, msgspec.Meta(ge=0, le=10)]


@pytest.mark.parametrize(
    ("sent", "result_type", "expected"),
    [
        ({"x": 1, "y": 2}, Point, Point(1, 2)),
        ({"name": "b", "size": 1.5}, Box, Box("b", 1.5)),
        ({"id": 7, "tags": ["a"]}, Row, {"id": 7, "tags": ["a"]}),
        ({"type": "dog", "good": True}, Cat | Dog, Dog(True)),
        ([{"x": 0, "y": 0}, {"x": 3, "y": 4}], list[Point], [Point(0, 0), Point(3, 4)]),
        (7, Count, 7),
        ("on", Literal["on", "off"], "on"),
        (None, int | None, None),
    ],
    ids=[
        "struct",
        "dataclass",
        "typeddict",
        "tagged-union",
        "list",
        "constrained",
        "literal",
        "optional",
    ],
)
async def test_a_reply_is_decoded_into_the_type_asked_for(
    sent: Any, result_type: Any, expected: Any
) -> None:
    async with Supervisor(K, **FAST) as sup:
        value = await sup.call("t", "echo", sent, result_type=result_type)
        assert value == expected and type(value) is type(expected)
        # invoke takes it too, and the untyped call is unchanged
        assert await sup.invoke("t", "echo", (sent,), result_type=result_type) == expected
        assert await sup.call("t", "echo", sent) == sent


@pytest.mark.parametrize(
    ("sent", "result_type", "where"),
    [
        ({"x": 1, "y": "2"}, Point, "$.y"),
        ({"x": 1}, Point, "y"),
        ([1, 2], Point, "object"),
        (11, Count, "<= 10"),
        (-1, Count, ">= 0"),
        ("1", int, "int"),  # strict: no str -> int conversion
        ({"type": "bird"}, Cat | Dog, "bird"),
    ],
    ids=[
        "wrong-field-type",
        "missing-field",
        "not-an-object",
        "too-big",
        "negative",
        "strict",
        "unknown-tag",
    ],
)
async def test_a_reply_that_does_not_fit_is_a_result_type_error_and_the_worker_serves_on(
    sent: Any, result_type: Any, where: str
) -> None:
    async with Supervisor(K, **FAST) as sup:
        before = await sup.get_or_create("t")
        with pytest.raises(ResultTypeError) as err:
            await sup.call("t", "echo", sent, result_type=result_type)
        assert where in str(err.value), err.value
        assert (err.value.tenant, err.value.method, err.value.pid) == ("t", "echo", before.pid)
        assert err.value.result_type == result_type
        # the same worker, still serving, nothing counted as a failure
        assert await sup.call("t", "echo", 5) == 5
        stats = sup.stats()
        assert [w.pid for w in stats.workers] == [before.pid]
        assert stats.stops == {} and stats.tenants_in_backoff == 0


async def test_hostile_output_is_bounded_in_the_error_text() -> None:
    async with Supervisor(K, **FAST) as sup:
        with pytest.raises(ResultTypeError) as err:
            await sup.call(
                "t", "echo", {"x": 1, "y": "\n" * 10_000 + "x" * 100_000}, result_type=Point
            )
        assert "\n" not in str(err.value) and len(str(err.value)) < 1_000


@pytest.mark.parametrize("result_type", [3, "int", dict[object, 1]])  # type: ignore[misc]
async def test_a_type_msgspec_cannot_decode_into_is_refused_before_the_call(
    result_type: Any,
) -> None:
    async with Supervisor(K, **FAST) as sup:
        with pytest.raises(corral.InvalidCallError) as err:
            await sup.call("t", "echo", 1, result_type=result_type)
        assert err.value.kind == "result_type"
        assert sup.keys() == []  # refused before any worker was started


def test_the_sync_supervisor_takes_a_result_type() -> None:
    with corral.SyncSupervisor(K, **FAST) as sup:
        assert sup.call("t", "echo", {"x": 1, "y": 2}, result_type=Point) == Point(1, 2)
        with pytest.raises(ResultTypeError):
            sup.invoke("t", "echo", ({"x": "1", "y": 2},), result_type=Point)
        assert sup.call("t", "echo", 3) == 3
