"""Fuzz the node API's HTTP connection loop (node.http: h11 reader, body cap, error answers).

The real HttpServer and Router serve one connection over a trio memory stream under a
MockClock, so timeouts pass instantly and a stuck read cannot hang the test. Mutated valid
requests and random bytes must never raise out of the loop or count an internal error, a
handler must never see a body over the cap, and every answer must be an HTTP/1.1 response.
"""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2porch.node.http import HttpServer, Request, Response, Router

from .targets import HttpTarget

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
TARGET = HttpTarget()


def test_seeds_are_served() -> None:
    for data in TARGET.seeds():
        TARGET.run(data)


@settings(FUZZ, max_examples=120)
@given(seed=st.integers(0, 2**32 - 1), cut=st.integers(0, 255))
def test_mutated_requests(seed: int, cut: int) -> None:
    rnd = random.Random(seed)
    seeds = TARGET.seeds()
    data = rnd.choice(seeds)
    for _ in range(3):
        data = TARGET.mutate(data, rnd, seeds)
        TARGET.run(bytes((cut,)) + data[1:])


@settings(FUZZ, max_examples=80)
@given(data=st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    TARGET.run(data)


async def _exchange(sent: bytes) -> tuple[bytes, list[int], HttpServer]:
    seen: list[int] = []

    async def echo(request: Request) -> Response:
        seen.append(len(request.body))
        return Response.json({"n": len(request.body)})

    router = Router()
    router.add("POST", "/echo", echo)
    router.add("POST", "/json", _parse_json)
    server = HttpServer(router, max_body_bytes=1024)
    client, remote = trio.testing.memory_stream_pair()
    received = bytearray()

    async def talk() -> None:
        try:
            await client.send_all(sent)
            await client.send_eof()
        except trio.BrokenResourceError:
            pass
        while chunk := await client.receive_some(65536):
            received.extend(chunk)

    async def serve() -> None:
        try:
            await server._serve_connection(remote, "test:1")
        finally:
            await remote.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(talk)
        nursery.start_soon(serve)
    return bytes(received), seen, server


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"100\r\n"
        + b"x" * 256
        + b"\r\n" * 1
        + (b"100\r\n" + b"x" * 256 + b"\r\n") * 8
        + b"0\r\n\r\n",
    ],
    ids=["declared", "sent", "chunked"],
)
async def test_bodies_over_the_cap_are_refused_unseen(request_bytes: bytes) -> None:
    answer, seen, _server = await _exchange(request_bytes)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert seen == []


async def test_an_endless_header_is_refused() -> None:
    """h11 keeps at most 64 KiB of an unfinished head (max_incomplete_event_size)."""
    answer, seen, server = await _exchange(b"GET /echo HTTP/1.1\r\nX: " + b"a" * 200_000)
    assert answer.split(b" ")[1] in (b"400", b"431")
    assert seen == [] and server.counters.bad_requests == 1


async def _parse_json(request: Request) -> Response:
    return Response.json({"type": type(request.json()).__name__})


async def test_deeply_nested_json_is_a_bad_request() -> None:
    """json.loads raises RecursionError (not a ValueError) past its stack: a 400, not a 500."""
    body = b"[" * 1000
    head = b"POST /json HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
    answer, _seen, server = await _exchange(head + body)
    assert server.counters.internal_errors == 0
    assert answer.startswith(b"HTTP/1.1 400 ")


def test_an_unclosed_ipv6_target_is_a_bad_request() -> None:
    """Found by the 1,000,000-input run: ``//ech]hk`` made urlsplit raise ValueError out of
    the connection loop (the request went unanswered and a traceback was logged)."""
    HttpTarget().run(
        b"\xf3oGET /eco HTTP/1.1\r\nHost:\n\r\nGET ohk HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GE //ech]hk HTTP/1.1\r\nHost:\n\r\nGET /echoxo HTT"
    )
