"""The thread-to-trio stream pump behind events() and logs(), with a fake blocking stream."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from p2porch.node.errors import EngineUnavailable
from p2porch.node.runtime import EventKind, EventStream, LogStream, _ThreadStream

_CLOSE = object()


class FakeStream:
    """Blocks like an HTTP stream: items come from a queue; close() breaks the read."""

    def __init__(self) -> None:
        self.items: queue.Queue[Any] = queue.Queue()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self.items.get()
            if item is _CLOSE:
                if self.closed:
                    raise OSError("socket closed")  # what a shut-down socket looks like
                return  # the engine ended the stream
            yield item

    def close(self) -> None:
        self.closed = True
        self.items.put(_CLOSE)


def die_event(container_id: str) -> dict[str, Any]:
    return {
        "Type": "container",
        "Action": "die",
        "Actor": {"ID": container_id, "Attributes": {"exitCode": "3"}},
        "timeNano": 1,
    }


def make(fake: FakeStream, limiter: trio.CapacityLimiter | None = None) -> _ThreadStream:
    return _ThreadStream(lambda: fake, limiter or trio.CapacityLimiter(4), "test stream")


async def test_events_survive_a_cancelled_read_and_stop_on_close() -> None:
    fake = FakeStream()
    async with EventStream(make(fake)) as events:
        with trio.move_on_after(0.01):
            await events.__anext__()  # nothing yet: cancelled, nothing lost
        fake.items.put({"Type": "network", "Action": "connect"})  # not ours: skipped
        fake.items.put(die_event("c1"))
        event = await events.__anext__()
        assert event.kind is EventKind.DIE and event.container_id == "c1"
        assert event.exit_code == 3
    assert fake.closed
    with pytest.raises(StopAsyncIteration):
        await events.__anext__()


async def test_engine_ending_the_event_stream_is_an_error() -> None:
    fake = FakeStream()
    async with EventStream(make(fake)) as events:
        fake.items.put(_CLOSE)  # the engine hangs up (fake.closed is False)
        with pytest.raises(EngineUnavailable):
            await events.__anext__()


async def test_log_lines_are_split_and_flushed_at_the_end() -> None:
    fake = FakeStream()
    for chunk in (b"one\ntw", b"o\r\n", b"three"):
        fake.items.put(chunk)
    fake.items.put(_CLOSE)
    async with LogStream(make(fake)) as lines:
        assert [line async for line in lines] == [b"one", b"two", b"three"]


async def test_streams_are_bounded_and_give_their_slot_back() -> None:
    limiter = trio.CapacityLimiter(1)
    first = EventStream(make(FakeStream(), limiter))
    async with first:
        assert limiter.borrowed_tokens == 1
        second = EventStream(make(FakeStream(), limiter))
        with trio.move_on_after(0.05) as scope:
            await second.__aenter__()
        assert scope.cancelled_caught  # waits for a slot while the first is open
    assert limiter.borrowed_tokens == 0
    async with second:
        assert limiter.borrowed_tokens == 1
    assert limiter.borrowed_tokens == 0
