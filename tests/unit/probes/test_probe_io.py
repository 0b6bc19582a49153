"""HTTP and TCP probes against real servers on loopback (127.0.0.1, ports of the kernel's
choosing): what counts as a pass, and the words a failure is reported with."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from p2porch.node.probes import Outcome, ProbeResult
from p2porch.node.reconciler import _output_excerpt, http_probe, tcp_probe

HOST = "127.0.0.1"
Handler = Callable[[trio.SocketStream], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=HOST))
        yield int(listeners[0].socket.getsockname()[1])
        nursery.cancel_scope.cancel()


def answering(head: bytes) -> Handler:
    """A server that reads the request head and writes ``head`` (then closes)."""

    async def handle(stream: trio.SocketStream) -> None:
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            received += chunk
        assert received.startswith(b"GET /healthz?x=1 HTTP/1.1\r\n")
        assert b"\r\nhost: 127.0.0.1:" in received.lower()
        await stream.send_all(head)
        await stream.aclose()

    return handle


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("head", "outcome", "detail"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", Outcome.SUCCESS, "HTTP 200"),
        (b"HTTP/1.0 302 Found\r\nLocation: /x\r\n\r\n", Outcome.SUCCESS, "HTTP 302"),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No\r\n\r\n", Outcome.SUCCESS, "HTTP 204"),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", Outcome.FAILURE, "HTTP 404"),
        (b"HTTP/1.1 500 Oops\r\n\r\n", Outcome.FAILURE, "HTTP 500"),
    ],
)
async def test_http_status_decides(head: bytes, outcome: Outcome, detail: str) -> None:
    async with serving(answering(head)) as port:
        result = await http_probe(HOST, port, "/healthz?x=1", 5, local_address=HOST)
    assert result == ProbeResult(outcome, detail)


async def test_http_failures_are_named() -> None:
    async def close_at_once(stream: trio.SocketStream) -> None:
        await stream.aclose()  # what the engine's port proxy does when nothing listens

    async with serving(close_at_once) as port:
        result = await http_probe(HOST, port, "/", 5)
    assert result == ProbeResult.failure("connection closed before a response")

    async with serving(answering(b"SSH-2.0-OpenSSH\r\n\r\n")) as port:
        result = await http_probe(HOST, port, "/healthz?x=1", 5)
    assert result.outcome is Outcome.FAILURE and result.detail.startswith("bad HTTP response")

    result = await http_probe(HOST, closed_port(), "/", 5)
    assert result == ProbeResult.failure("connection refused")


async def test_http_timeout() -> None:
    async def never_answer(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with serving(never_answer) as port:
        result = await http_probe(HOST, port, "/", 1)
    assert result == ProbeResult.failure("timed out after 1s")


async def test_tcp_open_passes_immediate_close_fails() -> None:
    async def hold(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async def banner(stream: trio.SocketStream) -> None:
        await stream.send_all(b"220 hello\r\n")
        await trio.sleep_forever()

    async def close_at_once(stream: trio.SocketStream) -> None:
        await stream.aclose()

    for handler in (hold, banner):
        async with serving(handler) as port:
            assert await tcp_probe(HOST, port, 5, local_address=HOST) == ProbeResult.success(
                "connected"
            )
    async with serving(close_at_once) as port:
        result = await tcp_probe(HOST, port, 5)
    assert result == ProbeResult.failure("connection closed at once (nothing listening?)")
    assert await tcp_probe(HOST, closed_port(), 5) == ProbeResult.failure("connection refused")


def test_output_excerpt_keeps_the_last_line_short() -> None:
    assert _output_excerpt(b"") == ""
    assert _output_excerpt(b"first\nlast line\n\n") == "last line"
    assert _output_excerpt(b"x" * 200) == "x" * 77 + "..."
    assert _output_excerpt(b"\xff\xfe bad bytes") == "\ufffd\ufffd bad bytes"
