"""The API's HTTP server: hostile and buggy input costs one request, never the node."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import trio

from p2porch.node.http import HttpError, HttpServer, Request, Response, Router


def make_router() -> Router:
    router = Router()

    async def ok(request: Request) -> Response:
        return Response.json({"ok": True, "name": request.params.get("name")})

    async def boom(request: Request) -> Response:
        raise RuntimeError("a bug")

    async def refuse(request: Request) -> Response:
        raise HttpError(409, "conflict", "no")

    async def echo(request: Request) -> Response:
        return Response.json(request.json())

    async def stream(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"{i}\n".encode()

        return Response(content_type="text/plain", stream=chunks())

    router.add("GET", "/ok/{name}", ok)
    router.add("GET", "/boom", boom)
    router.add("GET", "/refuse", refuse)
    router.add("POST", "/echo", echo)
    router.add("GET", "/stream", stream)
    return router


async def start(nursery: trio.Nursery, **kw: float) -> tuple[HttpServer, str]:
    server = HttpServer(make_router(), max_body_bytes=1024, **kw)  # type: ignore[arg-type]
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{port}"


async def raw(base: str, data: bytes, read: bool = True) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(data)
        if not read:
            return b""
        out = b""
        with trio.move_on_after(5):
            while chunk := await stream.receive_some(65536):
                out += chunk
        return out


async def test_routes_errors_and_a_handler_bug_do_not_kill_the_server() -> None:
    async with trio.open_nursery() as nursery:
        server, base = await start(nursery)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{base}/ok/a%20b")).json() == {"ok": True, "name": "a b"}
            r = await client.get(f"{base}/refuse")
            assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
            r = await client.get(f"{base}/boom")
            assert r.status_code == 500 and r.json()["error"]["code"] == "internal"
            assert (await client.get(f"{base}/ok/x")).status_code == 200
            assert (await client.get(f"{base}/nope")).status_code == 404
            assert (await client.post(f"{base}/ok/x")).status_code == 405
            r = await client.post(f"{base}/echo", content=b"{not json")
            assert r.status_code == 400
            r = await client.post(f"{base}/echo", content=json.dumps({"k": "v" * 2000}))
            assert r.status_code == 413
            assert (await client.get(f"{base}/stream")).text == "0\n1\n2\n"
        assert server.counters.internal_errors == 1
        nursery.cancel_scope.cancel()


async def test_garbage_and_slow_clients_are_cut_off_while_others_are_served() -> None:
    async with trio.open_nursery() as nursery:
        server, base = await start(nursery, header_timeout_s=0.5)
        reply = await raw(base, b"\x16\x03\x01 not http at all\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400")

        # A slow client holding connections open (slowloris) does not block others.
        async def trickle() -> None:
            await raw(base, b"GET /ok/a HTTP/1.1\r\nHost: x\r\n", read=True)

        for _ in range(5):
            nursery.start_soon(trickle)
        async with httpx.AsyncClient() as client:
            for _ in range(3):
                assert (await client.get(f"{base}/ok/b")).status_code == 200
        with trio.fail_after(10):
            while server.counters.timeouts < 5:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
