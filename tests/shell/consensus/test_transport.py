"""Framing and the transports: bounded reads, garbage refused, links cut and healed."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from p2porch.consensus.transport import (
    FrameError,
    FrameReader,
    MemoryNetwork,
    TcpTransport,
    TransportError,
    encode_frame,
    parse_address,
)


async def frames_from(chunks: list[bytes], max_frame: int = 1000) -> list[bytes]:
    send, receive = trio.testing.memory_stream_one_way_pair()
    for chunk in chunks:
        await send.send_all(chunk)
    await send.aclose()
    reader = FrameReader(receive, max_frame)
    out = []
    while (frame := await reader.receive()) is not None:
        out.append(frame)
    return out


async def test_frames_split_and_coalesced_arbitrarily() -> None:
    payloads = [b"", b"a", b"hello" * 50, bytes(range(256))]
    blob = b"".join(encode_frame(p) for p in payloads)
    assert await frames_from([blob]) == payloads
    assert await frames_from([blob[i : i + 1] for i in range(len(blob))]) == payloads


async def test_oversized_frame_refused_before_buffering() -> None:
    with pytest.raises(FrameError, match="over the 1000 limit"):
        await frames_from([b"\x00\x10\x00\x00"])


async def test_stream_ending_inside_a_frame_is_an_error() -> None:
    with pytest.raises(FrameError, match="inside a frame"):
        await frames_from([encode_frame(b"abcdef")[:-2]])
    with pytest.raises(FrameError):
        await frames_from([b"\x00\x00"])


def test_parse_address() -> None:
    assert parse_address("127.0.0.2:7000") == ("127.0.0.2", 7000)
    for bad in ("127.0.0.2", ":70", "host:x", "h:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)


async def test_memory_network_connect_isolate_heal(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    received: list[bytes] = []

    async def echo(stream: trio.abc.Stream) -> None:
        reader = FrameReader(stream, 1000)
        while (frame := await reader.receive()) is not None:
            received.append(frame)

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(network.transport("srv:1").serve, "srv:1", echo)
        assert bound == "srv:1"
        client = network.transport("cli:1")
        stream = await client.connect("srv:1")
        await stream.send_all(encode_frame(b"one"))
        await trio.sleep(0.1)
        assert received == [b"one"]
        network.isolate("srv:1")
        with pytest.raises((trio.ClosedResourceError, trio.BrokenResourceError)):
            await stream.send_all(encode_frame(b"lost"))
        with pytest.raises(TransportError):
            await client.connect("srv:1")
        network.heal("srv:1")
        stream = await client.connect("srv:1")
        await stream.send_all(encode_frame(b"two"))
        await trio.sleep(0.1)
        assert received == [b"one", b"two"]
        with pytest.raises(TransportError, match="nothing serves"):
            await client.connect("nobody:1")
        nursery.cancel_scope.cancel()


async def test_tcp_transport_round_trip_on_loopback() -> None:
    transport = TcpTransport(connect_timeout_s=2.0)
    got = trio.Event()
    seen: list[bytes] = []

    async def handler(stream: trio.abc.Stream) -> None:
        frame = await FrameReader(stream, 1000).receive()
        if frame is not None:
            seen.append(frame)
        got.set()

    async with trio.open_nursery() as nursery:
        address = await nursery.start(transport.serve, "127.0.0.2:0", handler)
        assert address.startswith("127.0.0.2:")
        stream = await transport.connect(address)
        await stream.send_all(encode_frame(b"over tcp"))
        with trio.fail_after(5):
            await got.wait()
        assert seen == [b"over tcp"]
        await stream.aclose()
        nursery.cancel_scope.cancel()
    with pytest.raises(TransportError):
        await transport.connect(address)
