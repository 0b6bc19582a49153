"""Test kit for the ingress: tiny h11 backends on 127.0.0.1 and an EndpointTable for them.

A backend answers every request with JSON naming itself and echoing what it received (method,
target, headers, body length and SHA-256), so tests can see which replica answered and what
the ingress forwarded. Special targets: ``/chunked`` (a chunked body of five pieces),
``/slow`` (answers after ``slow_s``), ``/hangup`` (reads the request, closes without a word),
``/ws`` (answers a websocket upgrade with 101, then echoes raw bytes), ``/hold`` (answers
after ``release`` is set, so tests can hold requests in flight).
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Sequence

import h11
import trio

from p2porch.node.endpoints import Endpoint, EndpointPort, EndpointTable, NodeEndpoints
from p2porch.node.ingress import Ingress, IngressConfig, IngressRule

HOST = "127.0.0.1"
CHUNKS = [b"alpha-", b"beta-", b"gamma-", b"delta-", b"omega"]


class Backend:
    def __init__(
        self, name: str, *, keep_alive: bool = True, drop_idle: bool = False, slow_s: float = 30.0
    ) -> None:
        """``keep_alive=False`` answers with ``Connection: close``; ``drop_idle`` promises
        keep-alive but closes right after each response (a server's idle timeout, at once)."""
        self.name = name
        self.keep_alive = keep_alive
        self.drop_idle = drop_idle
        self.slow_s = slow_s
        self.port = 0
        self.requests = 0
        self.connections = 0
        self.closed = 0
        self.release = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            await self._exchanges(stream)
        finally:
            await stream.aclose()
            self.closed += 1

    async def _exchanges(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            head = None
            digest = hashlib.sha256()
            size = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(event, h11.Request):
                    head = event
                elif isinstance(event, h11.Data):
                    digest.update(event.data)
                    size += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            assert head is not None
            self.requests += 1
            target = head.target.decode()
            hdrs: dict[str, str] = {}
            for k, v in head.headers:
                key = k.decode()
                hdrs[key] = f"{hdrs[key]}, {v.decode()}" if key in hdrs else v.decode()
            if target == "/hangup":
                return
            if target == "/hold":
                await self.release.wait()
            if target == "/slow":
                await trio.sleep(self.slow_s)
            if target == "/ws" and hdrs.get("upgrade") == "websocket":
                await stream.send_all(
                    conn.send(
                        h11.InformationalResponse(
                            status_code=101,
                            headers=[
                                ("upgrade", "websocket"),
                                ("connection", "Upgrade"),
                                ("x-backend", self.name),
                            ],
                        )
                    )
                )
                await self._echo(stream, conn.trailing_data[0])
                return
            extra = [] if self.keep_alive else [("connection", "close")]
            if target == "/chunked":
                await stream.send_all(
                    conn.send(
                        h11.Response(
                            status_code=200,
                            headers=[
                                ("transfer-encoding", "chunked"),
                                ("x-backend", self.name),
                            ],
                        )
                    )
                )
                for piece in CHUNKS:
                    await stream.send_all(conn.send(h11.Data(data=piece)))
                    await trio.sleep(0)
            else:
                body = json.dumps(
                    {
                        "backend": self.name,
                        "method": head.method.decode(),
                        "target": target,
                        "headers": hdrs,
                        "body_bytes": size,
                        "body_sha256": digest.hexdigest(),
                    }
                ).encode()
                response = h11.Response(
                    status_code=200,
                    headers=[
                        ("content-type", "application/json"),
                        ("content-length", str(len(body))),
                        ("x-backend", self.name),
                        *extra,
                    ],
                )
                await stream.send_all(conn.send(response))
                await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            if self.drop_idle:
                return
            conn.start_next_cycle()

    async def _echo(self, stream: trio.SocketStream, rest: bytes) -> None:
        if rest:
            await stream.send_all(rest)
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


def dead_port() -> int:
    """A loopback port nothing listens on (bound, then released): connects are refused."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def endpoint(
    port: int, index: int, *, ns: str = "default", app: str = "web", node: str = "n1"
) -> Endpoint:
    return Endpoint(
        namespace=ns,
        app=app,
        slot=index,
        replica=f"{app}-{index}",
        node=node,
        revision=1,
        container_id=f"{app}-c{index}",
        ports=(EndpointPort(container_port=8080, host=HOST, host_port=port),),
        ready=True,
    )


def table_for(groups: dict[tuple[str, str], Sequence[int]]) -> EndpointTable:
    """(namespace, app) -> backend ports, spread over nodes n1 and n2 (the ingress runs on n1)."""
    table = EndpointTable("n1")
    per_node: dict[str, list[Endpoint]] = {"n1": [], "n2": []}
    for (ns, app), ports in groups.items():
        for i, port in enumerate(ports):
            node = "n1" if i % 2 == 0 else "n2"
            per_node[node].append(endpoint(port, i, ns=ns, app=app, node=node))
    for node, eps in per_node.items():
        table.update(NodeEndpoints(node=node, epoch=1, version=1, endpoints=tuple(eps)))
    return table


def web_rule(app: str = "web", host: str = "", path: str = "/") -> IngressRule:
    return IngressRule(host=host, path=path, namespace="default", app=app, container_port=8080)


async def start_ingress(
    nursery: trio.Nursery,
    table: EndpointTable,
    rules: Sequence[IngressRule],
    config: IngressConfig | None = None,
) -> tuple[Ingress, str]:
    ingress = Ingress(table, HOST, 0, config or IngressConfig(), "n1")
    ingress.set_rules(rules)
    port = await nursery.start(ingress.run)
    return ingress, f"http://{HOST}:{port}"


async def start_backends(nursery: trio.Nursery, *backends: Backend) -> list[int]:
    return [await nursery.start(b.serve) for b in backends]


async def raw_exchange(base: str, data: bytes, *, until_eof: bool = True) -> bytes:
    """Send ``data`` on a new connection and read until the ingress closes it."""
    host, port = base.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    out = b""
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(20):
            while chunk := await stream.receive_some(65536):
                out += chunk
                if not until_eof and b"\r\n\r\n" in out:
                    break
    return out
