"""The L4 routing mesh: every node answers on every app's published port and forwards each TCP
connection to a ready replica of that app, wherever in the cluster it runs.

Why a user-space splice and not the kernel: Swarm's mesh is IPVS, and this kernel has none
(design brief, section 4); iptables DNAT would need root and per-connection conntrack state
that a dying node takes with it. A trio task pair per connection costs more CPU than the
kernel, but every decision stays in one place that tests can drive over real loopback
sockets, and it is the same code on every machine.

What happens to one connection:

1. The listener accepts it (or, at ``max_connections`` live ones on that port, closes it at
   once and counts ``over_limit``: a bounded node beats a node that runs out of descriptors).
2. The :class:`~p2porch.node.endpoints.EndpointTable` is read *now*, so a replica the table
   stopped listing as ready never gets a new connection; the route's
   :class:`~p2porch.node.balance.Balancer` picks one (round-robin or least-connections,
   local replicas first). No ready endpoint: the client is closed at once (``no_endpoint``).
3. A refused or timed-out connect is retried on *another* replica (``exclude``), up to
   ``max_connect_attempts`` in all. That is safe because not one client byte has been
   forwarded yet; the client sees no failure unless every attempt fails (``unreachable``).
4. With ``proxy_protocol`` the replica first receives a PROXY protocol v2 header carrying the
   client's address -- the only way the app learns it, since the replica sees the mesh's
   connection (from the node's advertise address, like every outbound connection here).
5. Bytes are spliced both ways with half-close: a side's EOF becomes a ``shutdown(SHUT_WR)``
   towards the other, so a client that shuts its write side still reads the reply. Each send
   is awaited before the next receive, so a slow reader slows the writer instead of growing a
   buffer. When either side errors, the other is reset (RST, not FIN) -- a FIN would make a
   truncated close-delimited response look complete -- and both are closed.

A replica that the table drops while connections to it are spliced is *not* cut off: those
connections end when the replica (or the client) closes them. Cutting them would turn every
rolling update or readiness flap into client errors; a replica that died outright resets
them by itself.

Only TCP. UDP has no connection to pin a client to a replica, so it would need a flow table
with timeouts and per-datagram source rewriting; out of scope here (service DNS gives UDP
apps their replicas' addresses instead).

``Mesh.set_routes`` is synchronous: it binds new published ports and closes removed ones on
the spot, so ``status()`` is true the moment it returns. A port that cannot be bound (in use)
is reported with the OS's text and retried every ``bind_retry_interval_s``; it never stops
the other routes. Connections on a removed route keep running until they end.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable
from typing import Any

import attrs
import trio

from p2porch.node.balance import Balancer, EndpointKey, Strategy, endpoint_key
from p2porch.node.endpoints import Endpoint, EndpointTable
from p2porch.node.errors import NodeError

log = logging.getLogger("p2porch.node.mesh")

# ---- PROXY protocol v2 (haproxy's proxy-protocol.txt, section 2.2)

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_VERSION_2_PROXY = 0x21  # high nibble: version 2; low nibble: PROXY (not LOCAL)
_TCP_OVER_IPV4 = 0x11  # high nibble: AF_INET; low nibble: STREAM
_TCP_OVER_IPV6 = 0x21  # high nibble: AF_INET6; low nibble: STREAM

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_ip(host: str) -> IPAddress:
    """The address in ``host``, without an IPv6 zone (``%eth0``); IPv4-mapped IPv6 unwrapped."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _as_ipv6(address: IPAddress) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)


def proxy_v2_header(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """The PROXY v2 header telling a replica that ``src`` (the client) connected to ``dst``.

    ``dst`` is the listener's local address (the node's published port). A dual-stack socket
    reports IPv4 clients as ``::ffff:a.b.c.d``; those are sent as plain IPv4, and when the two
    ends still differ in family the IPv4 one is sent IPv4-mapped inside an IPv6 block (the
    spec has one family per header). Raises ValueError for a host that is not an IP address
    or a port outside 0-65535.
    """
    src_ip, dst_ip = _parse_ip(src[0]), _parse_ip(dst[0])
    for port in (src[1], dst[1]):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} out of range")
    if isinstance(src_ip, ipaddress.IPv4Address) and isinstance(dst_ip, ipaddress.IPv4Address):
        family = _TCP_OVER_IPV4
        body = src_ip.packed + dst_ip.packed
    else:
        family = _TCP_OVER_IPV6
        body = _as_ipv6(src_ip).packed + _as_ipv6(dst_ip).packed
    body += struct.pack("!HH", src[1], dst[1])
    return PROXY_V2_SIGNATURE + struct.pack("!BBH", _VERSION_2_PROXY, family, len(body)) + body


# ---- values


def _port(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= 0xFFFF:
        raise ValueError(f"{attribute.name} must be 1-65535, got {value}")


@attrs.frozen
class MeshRoute:
    """Listen on ``published_port`` of the node; forward to the app's ``container_port``.

    ``proxy_protocol`` is opt-in because an app that does not expect the header reads it as
    garbage at the start of its stream.
    """

    namespace: str
    app: str
    published_port: int = attrs.field(validator=_port)
    container_port: int = attrs.field(validator=_port)
    proxy_protocol: bool = False
    strategy: Strategy = Strategy.ROUND_ROBIN
    prefer_local: bool = True


@attrs.frozen
class MeshConfig:
    """Limits and timings of the mesh.

    ``idle_timeout_s`` (1 hour) closes a connection on which nothing moved either way for
    that long. It exists to reclaim connections whose peer vanished without a FIN or RST; it
    must be longer than the idle periods of real connection pools (database pools commonly
    keep idle connections 10-30 minutes; HTTP keep-alive 1-2 minutes), because an app cannot
    tell "the mesh dropped my idle connection" from a network fault. Swarm's IPVS uses 900 s
    and silently breaks such pools; an hour clears typical pools with margin while still
    bounding what a leak of half-open connections can hold. When it fires, both sides get a
    clean close (FIN), never a silent black hole.

    ``buffer_bytes`` is the most read from one side before it is written to the other: the
    only buffering per direction, so a connection holds at most twice this in flight.
    """

    connect_timeout_s: float = 2.0
    max_connect_attempts: int = 3
    idle_timeout_s: float = 3600.0
    max_connections: int = 4096
    buffer_bytes: int = 64 * 1024
    bind_retry_interval_s: float = 5.0
    listen_backlog: int = 1024

    def __attrs_post_init__(self) -> None:
        if not self.connect_timeout_s > 0:
            raise ValueError("connect_timeout_s must be > 0")
        if self.max_connect_attempts < 1:
            raise ValueError("max_connect_attempts must be >= 1")
        if not self.idle_timeout_s > 0:
            raise ValueError("idle_timeout_s must be > 0")
        if self.idle_timeout_s <= self.connect_timeout_s:
            raise ValueError("idle_timeout_s must be longer than connect_timeout_s")
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if not 1024 <= self.buffer_bytes <= 16 * 1024 * 1024:
            raise ValueError("buffer_bytes must be between 1 KiB and 16 MiB")
        if not self.bind_retry_interval_s > 0:
            raise ValueError("bind_retry_interval_s must be > 0")
        if self.listen_backlog < 1:
            raise ValueError("listen_backlog must be >= 1")


class MeshError(NodeError):
    """Root of the mesh's errors (none escapes a connection task: each is counted)."""


class UpstreamConnectError(MeshError):
    """Connecting to a replica failed (refused, timed out, or the PROXY header not sent)."""


@attrs.define
class RouteStats:
    """Counters of one listener (mutable; the shell's bookkeeping, not a value)."""

    active: int = 0
    total: int = 0
    no_endpoint: int = 0
    failed_connects: int = 0
    unreachable: int = 0
    over_limit: int = 0
    idle_timeouts: int = 0
    bytes_to_replica: int = 0
    bytes_to_client: int = 0

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


_COUNTERS = tuple(f.name for f in attrs.fields(RouteStats) if f.name != "active")

# accept(2) errors that mean "the machine is full right now", not "this socket is broken".
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_BACKOFF_S = 0.1


class _Listener:
    """One published port: its route, balancer, socket (or bind error) and counters."""

    def __init__(self, route: MeshRoute, local_node: str) -> None:
        self.route = route
        self.balancer = Balancer(local_node, route.strategy, route.prefer_local)
        self.stats = RouteStats()
        self.sock: trio.socket.SocketType | None = None
        self.error: str | None = None
        self.accepting: trio.CancelScope | None = None

    def close(self) -> None:
        """Stop accepting and free the port now; live connections are not touched."""
        if self.accepting is not None:
            self.accepting.cancel()
            self.accepting = None
        if self.sock is not None:
            self.sock.close()  # trio wakes a task blocked in accept() on it
            self.sock = None


def _is_wildcard(host: str) -> bool:
    return _parse_ip(host).is_unspecified


def _abort(stream: trio.SocketStream) -> None:
    """Close with RST: the peer must not take a broken splice for a clean end of stream."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def _open_stream(host: str, port: int, source: str | None) -> trio.SocketStream:
    """Connect to a literal address. Not ``trio.open_tcp_stream``: its resolver pass and
    happy-eyeballs nursery cost a busy mesh a third of its CPU per connection, and replica
    addresses are always IP literals."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        if source is not None:
            await sock.bind((source, 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


class Mesh:
    """The routing mesh of one node (trio shell).

    ``listen_host`` is the node's advertise address: published ports are bound there, and
    connections to replicas originate from it (unless it is a wildcard), so peers and firewall
    rules see an address the node owns. Call every method from the trio thread.
    """

    def __init__(
        self, table: EndpointTable, listen_host: str, config: MeshConfig, local_node: str
    ) -> None:
        self.table = table
        self.listen_host = listen_host
        self.config = config
        self.local_node = local_node
        self._family = (
            socket.AF_INET6
            if isinstance(ipaddress.ip_address(listen_host), ipaddress.IPv6Address)
            else socket.AF_INET
        )
        self._source = None if _is_wildcard(listen_host) else listen_host
        self._listeners: dict[int, _Listener] = {}
        self._nursery: trio.Nursery | None = None
        self._bind_failed = trio.Event()  # set when a listener loses or cannot take its port
        self._totals = RouteStats()
        self._draining: set[_Listener] = set()

    # ---- public API

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; routes set before this are bound before it reports started."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for listener in self._listeners.values():
                    self._bind(listener)
                nursery.start_soon(self._retry_binds)
                task_status.started()
        finally:
            self._nursery = None
            for listener in self._listeners.values():
                listener.close()

    def set_routes(self, routes: Iterable[MeshRoute]) -> None:
        """Make the listeners match ``routes`` (one per published port), effective at once.

        A route whose port is already served is changed in place (its socket stays open); a
        route that names another app gets a fresh balancer. Removed routes stop accepting now;
        their connections run on. Raises ValueError if two routes share a published port.
        """
        wanted: dict[int, MeshRoute] = {}
        for route in routes:
            if route.published_port in wanted and wanted[route.published_port] != route:
                raise ValueError(f"two routes on published port {route.published_port}")
            wanted[route.published_port] = route
        for port in [p for p in self._listeners if p not in wanted]:
            listener = self._listeners.pop(port)
            listener.close()
            if listener.stats.active:
                self._draining.add(listener)
        for port, route in wanted.items():
            existing = self._listeners.get(port)
            if existing is None:
                listener = self._listeners[port] = _Listener(route, self.local_node)
            else:
                listener = existing
            if listener.route != route:
                if (listener.route.namespace, listener.route.app) != (route.namespace, route.app):
                    listener.balancer = Balancer(
                        self.local_node, route.strategy, route.prefer_local
                    )
                else:
                    listener.balancer.strategy = route.strategy
                    listener.balancer.prefer_local = route.prefer_local
                listener.route = route
            if self._nursery is not None and listener.sock is None:
                self._bind(listener)

    def status(self) -> dict[str, Any]:
        """Per route (by port): state, bind error, counters; and totals over all routes ever."""
        routes = []
        for port in sorted(self._listeners):
            listener = self._listeners[port]
            route = listener.route
            if listener.sock is not None:
                state = "listening"
            elif listener.error is not None:
                state = "error"
            else:
                state = "stopped"
            routes.append(
                {
                    "namespace": route.namespace,
                    "app": route.app,
                    "published_port": route.published_port,
                    "container_port": route.container_port,
                    "proxy_protocol": route.proxy_protocol,
                    "strategy": route.strategy.value,
                    "prefer_local": route.prefer_local,
                    "state": state,
                    "error": listener.error,
                    **listener.stats.as_dict(),
                }
            )
        totals = self._totals.as_dict()
        totals["active"] = sum(lst.stats.active for lst in self._listeners.values()) + sum(
            lst.stats.active for lst in self._draining
        )
        return {
            "listen_host": self.listen_host,
            "routes": routes,
            "draining_connections": sum(lst.stats.active for lst in self._draining),
            "totals": totals,
        }

    # ---- listeners

    def _bind(self, listener: _Listener) -> None:
        """Open the listener's port now (sync: bind and listen never block); errors recorded."""
        assert self._nursery is not None
        port = listener.route.published_port
        raw = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            # SO_REUSEADDR only skips TIME_WAIT leftovers of a previous run; a live listener on
            # the port still makes bind fail (no SO_REUSEPORT: we want to hear "in use").
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            raw.bind((self.listen_host, port))
            raw.listen(self.config.listen_backlog)
        except OSError as exc:
            raw.close()
            if listener.error != str(exc):
                log.warning("mesh: cannot listen on %s:%d: %s", self.listen_host, port, exc)
            listener.error = str(exc)
            self._bind_failed.set()
            return
        listener.sock = trio.socket.from_stdlib_socket(raw)
        listener.error = None
        listener.accepting = trio.CancelScope()
        self._nursery.start_soon(self._accept_loop, listener, listener.sock, listener.accepting)
        log.info(
            "mesh: listening on %s:%d for %s/%s",
            self.listen_host,
            port,
            listener.route.namespace,
            listener.route.app,
        )

    async def _retry_binds(self) -> None:
        while True:
            if all(listener.sock is not None for listener in self._listeners.values()):
                # Every port bound: sleep until one fails (an idle node must not wake).
                self._bind_failed = trio.Event()
                await self._bind_failed.wait()
            await trio.sleep(self.config.bind_retry_interval_s)
            for listener in list(self._listeners.values()):
                if listener.sock is None:
                    self._bind(listener)

    async def _accept_loop(
        self, listener: _Listener, sock: trio.socket.SocketType, scope: trio.CancelScope
    ) -> None:
        assert self._nursery is not None
        server = trio.SocketListener(sock)
        with scope:
            while True:
                try:
                    client = await server.accept()
                except trio.ClosedResourceError:
                    return  # closed by set_routes / shutdown
                except OSError as exc:
                    if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                        log.warning(
                            "mesh: accept on port %d: %s", listener.route.published_port, exc
                        )
                        await trio.sleep(_ACCEPT_BACKOFF_S)
                        continue
                    # Anything else: drop the socket; the retry loop binds it again.
                    listener.error = str(exc)
                    self._bind_failed.set()
                    if listener.sock is sock:
                        listener.sock = None
                    sock.close()
                    return
                if listener.stats.active >= self.config.max_connections:
                    self._count(listener, "over_limit")
                    client.socket.close()
                    continue
                listener.stats.active += 1
                self._count(listener, "total")
                self._nursery.start_soon(
                    self._handle, listener, listener.route, listener.balancer, client
                )

    def _count(self, listener: _Listener, name: str, amount: int = 1) -> None:
        setattr(listener.stats, name, getattr(listener.stats, name) + amount)
        setattr(self._totals, name, getattr(self._totals, name) + amount)

    # ---- connections

    async def _handle(
        self, listener: _Listener, route: MeshRoute, balancer: Balancer, client: trio.SocketStream
    ) -> None:
        endpoint: Endpoint | None = None
        try:
            try:
                peer = client.socket.getpeername()
                local = client.socket.getsockname()
            except OSError:
                return  # the client is already gone
            upstream, endpoint = await self._open_upstream(
                listener, route, balancer, (peer[0], peer[1]), (local[0], local[1])
            )
            if upstream is None:
                return
            await self._splice(listener, client, upstream)
        finally:
            if endpoint is not None:
                balancer.release(endpoint)
            client.socket.close()
            listener.stats.active -= 1
            if listener.stats.active == 0:
                self._draining.discard(listener)

    async def _open_upstream(
        self,
        listener: _Listener,
        route: MeshRoute,
        balancer: Balancer,
        peer: tuple[str, int],
        local: tuple[str, int],
    ) -> tuple[trio.SocketStream | None, Endpoint | None]:
        """A connected replica stream and its (acquired) endpoint, or (None, None) if none."""
        tried: set[EndpointKey] = set()
        for _ in range(self.config.max_connect_attempts):
            # Re-read every attempt: the table may have dropped a replica meanwhile.
            endpoints = [
                ep
                for ep in self.table.endpoints(route.namespace, route.app)
                if ep.address(route.container_port) is not None
            ]
            endpoint = balancer.choose(endpoints, exclude=tried)
            if endpoint is None:
                break
            address = endpoint.address(route.container_port)
            assert address is not None
            tried.add(endpoint_key(endpoint))
            balancer.acquire(endpoint)  # before connecting: concurrent accepts see it busy
            header = proxy_v2_header(peer, local) if route.proxy_protocol else b""
            try:
                upstream = await self._connect(address, header)
            except UpstreamConnectError as exc:
                balancer.release(endpoint)
                self._count(listener, "failed_connects")
                log.debug("mesh: %s/%s -> %s: %s", route.namespace, route.app, address, exc)
                continue
            return upstream, endpoint
        if tried:
            self._count(listener, "unreachable")
        else:
            self._count(listener, "no_endpoint")
        return None, None

    async def _connect(self, address: tuple[str, int], header: bytes) -> trio.SocketStream:
        host, port = address
        source = self._source
        if source is not None and _parse_ip(source).version != _parse_ip(host).version:
            source = None  # an IPv4 advertise address cannot originate an IPv6 connection
        stream: trio.SocketStream | None = None
        try:
            with trio.move_on_after(self.config.connect_timeout_s):
                stream = await _open_stream(host, port, source)
                if header:
                    await stream.send_all(header)
                connected, stream = stream, None
                return connected
        except (OSError, trio.BrokenResourceError) as exc:
            raise UpstreamConnectError(f"connect to {host}:{port}: {exc}") from exc
        finally:
            if stream is not None:  # not handed over: timed out, failed or cancelled
                stream.socket.close()
        raise UpstreamConnectError(
            f"connect to {host}:{port}: timed out after {self.config.connect_timeout_s} s"
        )

    async def _splice(
        self, listener: _Listener, client: trio.SocketStream, upstream: trio.SocketStream
    ) -> None:
        """Copy both ways until both sides sent EOF, either side errors, or the idle timeout."""
        idle_s = self.config.idle_timeout_s
        size = self.config.buffer_bytes
        idle = trio.CancelScope(deadline=trio.current_time() + idle_s)
        broken = False

        async def pump(src: trio.SocketStream, dst: trio.SocketStream, counter: str) -> None:
            nonlocal broken
            try:
                while True:
                    data = await src.receive_some(size)
                    if not data:
                        await dst.send_eof()
                        return
                    idle.deadline = trio.current_time() + idle_s
                    await dst.send_all(data)
                    self._count(listener, counter, len(data))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                broken = True
                idle.cancel()

        try:
            with idle:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pump, client, upstream, "bytes_to_replica")
                    nursery.start_soon(pump, upstream, client, "bytes_to_client")
            if idle.cancelled_caught and not broken:
                self._count(listener, "idle_timeouts")
        finally:
            if broken:
                _abort(client)
                _abort(upstream)
            else:
                upstream.socket.close()
                client.socket.close()
