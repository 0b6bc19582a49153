"""Service DNS: every node answers for the cluster's apps from its own endpoint table.

Why every node, and why from the endpoint table: a container asks the DNS server of the node
it runs on, and that node already holds every app's ready replicas (the merged
:class:`~p2porch.node.endpoints.EndpointTable`), so an answer never leaves the machine and keeps
working when the cluster has lost quorum (static stability). Names, under a configurable
domain (``p2porch`` by default)::

    <app>.<namespace>.<domain>                    A/AAAA: the ready replicas' host addresses
                                                  SRV: one per ready replica and TCP port
    _<port>._tcp.<app>.<namespace>.<domain>       SRV for that container port (``_udp`` too)
    <replica>.<app>.<namespace>.<domain>          A/AAAA: that replica's host address

Addresses are the *published* host address and port of each replica (what the routing mesh
and probes use too), never a container's bridge address. SRV records give the local node's
replicas priority 0 and the others 10, so a client that honours SRV stays on its own node.

Negative answers are chosen so clients retry instead of caching a failure: an app that exists
but has no ready replica answers NOERROR with no records (NODATA) and a name that names no app
answers NXDOMAIN; both carry an SOA whose TTL (and minimum) is the short negative TTL.
Positive TTLs are short too (2 s by default) because endpoints move.

Names outside the domain go to the configured upstream resolvers (REFUSED when there are
none). The module is one pure core -- :func:`answer` and :func:`handle_wire` turn a query into
a response, a forward, or a drop, with no I/O, clock or randomness -- and a thin trio shell,
:class:`DnsServer`, that serves UDP and TCP on one address and relays forwards.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import secrets
from collections.abc import Iterable
from typing import Any

import attrs
import dns.asyncbackend
import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import trio

from p2porch.node.endpoints import Endpoint, EndpointTable
from p2porch.node.errors import NodeError
from p2porch.node.spec import Protocol, replica_name

log = logging.getLogger("p2porch.dns")

Apps = frozenset[tuple[str, str]]

_MAX_LABEL = 63  # a DNS label, as the spec allows app, namespace and replica names
# A name is at most 253 characters; the domain leaves room for "<replica>.<app>.<namespace>."
# with realistic names (a longer one only loses its SRV target, never the server).
_MAX_DOMAIN = 100
_UDP_MIN = 512  # RFC 1035: every UDP response fits in 512 bytes unless EDNS says more
_TCP_MAX = 65535
_SRV_WEIGHT = 10
_SRV_PRIORITY_LOCAL = 0
_SRV_PRIORITY_REMOTE = 10
_SOA_REFRESH_S = 60
_SOA_RETRY_S = 30
_SOA_EXPIRE_S = 3600

IN = dns.rdataclass.IN
A = dns.rdatatype.A
AAAA = dns.rdatatype.AAAA
SRV = dns.rdatatype.SRV
SOA = dns.rdatatype.SOA
ANY = dns.rdatatype.ANY


class DnsError(NodeError):
    """The DNS server could not start (its address or port cannot be bound)."""


def _is_ldh_label(label: str) -> bool:
    if not 1 <= len(label) <= _MAX_LABEL or label[0] == "-" or label[-1] == "-":
        return False
    return all(c.isascii() and (c.isalnum() or c == "-") for c in label)


def _normalize_domain(value: object) -> object:
    if isinstance(value, str):
        return value.strip().rstrip(".").lower()
    return value


def _check_domain(_instance: object, _attribute: object, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"domain must be a non-empty DNS name, got {value!r}")
    if len(value) > _MAX_DOMAIN:
        raise ValueError(f"domain must be at most {_MAX_DOMAIN} characters, got {len(value)}")
    for label in value.split("."):
        if not _is_ldh_label(label):
            raise ValueError(
                f"domain {value!r}: label {label!r} is not a DNS label "
                "(letters, digits and inner hyphens, 1-63 characters)"
            )


def _check_upstreams(_instance: object, _attribute: object, value: tuple[Any, ...]) -> None:
    for item in value:
        if len(item) != 2:
            raise ValueError(f"upstream {item!r} is not an (address, port) pair")
        host, port = item
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"upstream address {host!r} is not an IP address") from None
        if type(port) is not int or not 1 <= port <= 65535:
            raise ValueError(f"upstream port {port!r} is not in 1..65535")


def _upstreams(value: Any) -> tuple[tuple[Any, ...], ...]:
    """Accept lists (e.g. from JSON or YAML) as well as tuples; the validator checks types."""
    try:
        return tuple(tuple(item) for item in value)
    except TypeError:
        raise ValueError(f"upstreams must be (address, port) pairs, got {value!r}") from None


@attrs.frozen
class DnsConfig:
    """How the node's DNS server answers; every field is checked (ValueError when wrong).

    ``max_udp_payload_bytes`` is the EDNS payload we advertise and the most we send over UDP
    even when a client offers more (1232: the DNS flag day 2020 value, which avoids IP
    fragmentation). Time limits: ``upstream_timeout_s`` per upstream tried,
    ``tcp_idle_timeout_s`` for the next query (whole frame) on a TCP connection.
    """

    domain: str = attrs.field(
        default="p2porch", converter=_normalize_domain, validator=_check_domain
    )
    ttl_s: int = 2
    negative_ttl_s: int = 5
    upstreams: tuple[tuple[str, int], ...] = attrs.field(
        default=(), converter=_upstreams, validator=_check_upstreams
    )
    upstream_timeout_s: float = 2.0
    max_tcp_connections: int = 128
    tcp_idle_timeout_s: float = 10.0
    max_udp_payload_bytes: int = 1232
    max_forwards_in_flight: int = 256

    def __attrs_post_init__(self) -> None:
        for name in ("ttl_s", "negative_ttl_s"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= 86400:
                raise ValueError(f"{name} must be an integer in 0..86400, got {value!r}")
        if self.negative_ttl_s > 300:
            # A name that appears (a new app) must resolve soon: keep negative caching short.
            raise ValueError(f"negative_ttl_s must be at most 300, got {self.negative_ttl_s}")
        for name in ("upstream_timeout_s", "tcp_idle_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        for name in ("max_tcp_connections", "max_forwards_in_flight"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        size = self.max_udp_payload_bytes
        if type(size) is not int or not _UDP_MIN <= size <= _TCP_MAX:
            raise ValueError(f"max_udp_payload_bytes must be in {_UDP_MIN}..{_TCP_MAX}, got {size}")

    @property
    def origin(self) -> dns.name.Name:
        return dns.name.from_text(self.domain)


# ---------------------------------------------------------------------------------------------
# The pure core


def _rcode_response(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    """A header-only error answer that still echoes the id, the opcode and RD.

    Built by hand rather than with ``make_response`` because the query may be one
    ``make_response`` cannot shape (no question, two questions, an UPDATE).
    """
    response = dns.message.Message(id=query.id)
    response.flags = dns.flags.QR | (query.flags & dns.flags.RD)
    response.set_opcode(query.opcode())
    if len(query.question) == 1 and rcode != dns.rcode.FORMERR:
        response.question = list(query.question)
    response.set_rcode(rcode)
    return response


def _address_rdtype(host: str) -> dns.rdatatype.RdataType | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None  # a host name, not an address: nothing we can put in A/AAAA
    return A if address.version == 4 else AAAA


def _hosts(endpoints: Iterable[Endpoint]) -> list[str]:
    """Distinct host addresses in endpoint order (the table puts the local node first)."""
    seen: dict[str, None] = {}
    for ep in endpoints:
        for port in ep.ports:
            seen.setdefault(port.host, None)
    return list(seen)


def _spread(endpoints: list[Endpoint], local_node: str, turn: int) -> list[Endpoint]:
    """The local node's endpoints first, then the others rotated by ``turn``.

    Many clients take the first address; without rotation every one of them would pick the
    same remote node. ``turn`` is the query's id (random per client), which keeps the core
    pure and spreads clients without any state here.
    """
    local = [ep for ep in endpoints if ep.node == local_node]
    remote = [ep for ep in endpoints if ep.node != local_node]
    if remote:
        nodes = sorted({ep.node for ep in remote})
        first = nodes[turn % len(nodes)]
        start = next(i for i, ep in enumerate(remote) if ep.node == first)
        remote = remote[start:] + remote[:start]
    return local + remote


def _address_rrset(
    owner: dns.name.Name, rdtype: dns.rdatatype.RdataType, hosts: Iterable[str], ttl: int
) -> dns.rrset.RRset | None:
    rrset = dns.rrset.RRset(owner, IN, rdtype)
    for host in hosts:
        if _address_rdtype(host) != rdtype:
            continue
        try:
            rdata = dns.rdata.from_text(IN, rdtype, host)
        except (ValueError, dns.exception.DNSException):
            continue  # e.g. an IPv6 address with a scope id: not expressible in AAAA
        rrset.add(rdata, ttl)
    return rrset if len(rrset) else None


def _soa(config: DnsConfig, serial: int) -> dns.rrset.RRset:
    origin = config.origin
    rrset = dns.rrset.RRset(origin, IN, SOA)
    text = (
        f"ns.{origin} hostmaster.{origin} {serial & 0xFFFFFFFF} "
        f"{_SOA_REFRESH_S} {_SOA_RETRY_S} {_SOA_EXPIRE_S} {config.negative_ttl_s}"
    )
    rrset.add(dns.rdata.from_text(IN, SOA, text), config.negative_ttl_s)
    return rrset


@attrs.frozen
class _Answer:
    """What a name has: None for "no such name" (NXDOMAIN); else records (maybe none)."""

    answer: list[dns.rrset.RRset] = attrs.Factory(list)
    additional: list[dns.rrset.RRset] = attrs.Factory(list)


def _replica_exists(table: EndpointTable, namespace: str, app: str, label: str) -> bool:
    """A replica name that exists now (any readiness) or is one the app's replicas would take.

    A replica that is starting (or restarting) has no endpoint at all; answering NXDOMAIN
    for it would be cached, so any ``<app>-<index>`` name of an existing app is a NODATA name.
    """
    if any(ep.replica == label for ep in table.endpoints(namespace, app, ready_only=False)):
        return True
    _, sep, index = label.rpartition("-")
    return bool(sep) and index.isdigit() and replica_name(app, int(index)) == label


def _srv_records(
    owner: dns.name.Name,
    *,
    endpoints: list[Endpoint],
    table: EndpointTable,
    protocol: Protocol,
    container_port: int | None,
    service: dns.name.Name,
    config: DnsConfig,
) -> _Answer:
    srv = dns.rrset.RRset(owner, IN, SRV)
    targets: dict[str, list[Endpoint]] = {}
    for ep in endpoints:
        priority = _SRV_PRIORITY_LOCAL if ep.node == table.local_node else _SRV_PRIORITY_REMOTE
        try:
            target = dns.name.Name((ep.replica.encode(), *service.labels))
        except dns.name.NameTooLong:
            continue  # long names under a long domain: no SRV target can name this replica
        for port in ep.ports:
            if port.protocol is not protocol:
                continue
            if container_port is not None and port.container_port != container_port:
                continue
            text = f"{priority} {_SRV_WEIGHT} {port.host_port} {target}"
            srv.add(dns.rdata.from_text(IN, SRV, text), config.ttl_s)
            eps = targets.setdefault(ep.replica, [])
            if ep not in eps:
                eps.append(ep)
    if not len(srv):
        return _Answer()
    additional = []
    for replica, eps in targets.items():
        target = dns.name.Name((replica.encode(), *service.labels))
        for rdtype in (A, AAAA):
            rrset = _address_rrset(target, rdtype, _hosts(eps), config.ttl_s)
            if rrset is not None:
                additional.append(rrset)
    return _Answer([srv], additional)


def _addresses(
    owner: dns.name.Name, qtype: dns.rdatatype.RdataType, hosts: list[str], ttl: int
) -> list[dns.rrset.RRset]:
    out = []
    for rdtype in (A, AAAA):
        if qtype in (rdtype, ANY):
            rrset = _address_rrset(owner, rdtype, hosts, ttl)
            if rrset is not None:
                out.append(rrset)
    return out


def _namespace_exists(table: EndpointTable, apps: Apps, namespace: str) -> bool:
    if any(ns == namespace for ns, _ in apps):
        return True
    for node in table.nodes():
        record = table.record(node)
        if record is not None and any(ep.namespace == namespace for ep in record.endpoints):
            return True
    return False


def _lookup(
    labels: list[str],
    *,
    owner: dns.name.Name,
    qtype: dns.rdatatype.RdataType,
    table: EndpointTable,
    apps: Apps,
    config: DnsConfig,
    turn: int = 0,
) -> _Answer | None:
    """Records for ``labels`` (relative to the domain, lower case, leftmost first)."""

    def app_exists(namespace: str, app: str) -> bool:
        # The caller's set is the truth for apps without endpoints; the table also counts so
        # an endpoint that arrives before the app set is refreshed still resolves.
        return (namespace, app) in apps or bool(table.endpoints(namespace, app, ready_only=False))

    depth = len(labels)
    if depth == 0:  # the domain itself
        return _Answer([_soa(config, table.version)] if qtype in (SOA, ANY) else [])
    namespace = labels[-1]
    if depth == 1:  # a namespace: an empty non-terminal while it holds an app
        return _Answer() if _namespace_exists(table, apps, namespace) else None
    app = labels[-2]
    if not app_exists(namespace, app):
        return None
    service = dns.name.Name((app.encode(), namespace.encode(), *config.origin.labels))
    ready = _spread(table.endpoints(namespace, app), table.local_node, turn)
    if depth == 2:  # <app>.<namespace>
        answer = _addresses(owner, qtype, _hosts(ready), config.ttl_s)
        additional: list[dns.rrset.RRset] = []
        if qtype in (SRV, ANY):
            srv = _srv_records(
                owner,
                endpoints=ready,
                table=table,
                protocol=Protocol.TCP,
                container_port=None,
                service=service,
                config=config,
            )
            answer += srv.answer
            additional = [] if qtype == ANY else srv.additional
        return _Answer(answer, additional)
    if depth == 3:
        first = labels[0]
        if first in ("_tcp", "_udp"):  # empty non-terminal above _<port>._<proto>
            return _Answer()
        if not _replica_exists(table, namespace, app, first):
            return None
        mine = [ep for ep in ready if ep.replica == first]
        return _Answer(_addresses(owner, qtype, _hosts(mine), config.ttl_s))
    if depth == 4:  # _<port>._<proto>.<app>.<namespace>
        port_label, proto_label = labels[0], labels[1]
        protocols = {"_tcp": Protocol.TCP, "_udp": Protocol.UDP}
        digits = port_label[1:]
        if (
            proto_label not in protocols
            or not port_label.startswith("_")
            or not digits.isdigit()
            or not 1 <= int(digits) <= 65535
        ):
            return None
        if qtype not in (SRV, ANY):
            return _Answer()
        return _srv_records(
            owner,
            endpoints=ready,
            table=table,
            protocol=protocols[proto_label],
            container_port=int(digits),
            service=service,
            config=config,
        )
    return None


def answer(
    query: dns.message.Message,
    table: EndpointTable,
    apps: frozenset[tuple[str, str]],
    config: DnsConfig,
) -> dns.message.Message | None:
    """The response to ``query``, or None when it must be forwarded to an upstream resolver.

    Pure: reads the table, never changes it. Size limits are not applied here (they depend
    on the transport); :func:`encode_response` truncates.
    """
    if query.opcode() != dns.opcode.QUERY:
        return _rcode_response(query, dns.rcode.NOTIMP)
    if len(query.question) != 1:
        return _rcode_response(query, dns.rcode.FORMERR)
    recursion = bool(config.upstreams)
    if query.edns > 0:
        # RFC 6891: we speak EDNS version 0 only; BADVERS tells the client to downgrade.
        response = dns.message.make_response(
            query, recursion, our_payload=config.max_udp_payload_bytes
        )
        response.set_rcode(dns.rcode.BADVERS)
        return response
    question = query.question[0]
    origin = config.origin
    if not question.name.is_subdomain(origin):
        if config.upstreams:
            return None
        return _rcode_response(query, dns.rcode.REFUSED)
    if question.rdclass not in (IN, dns.rdataclass.ANY) or question.rdtype in (
        dns.rdatatype.AXFR,
        dns.rdatatype.IXFR,
    ):
        # Other classes (CHAOS "version.bind") and zone transfers are not served.
        return _rcode_response(query, dns.rcode.REFUSED)
    response = dns.message.make_response(query, recursion, our_payload=config.max_udp_payload_bytes)
    response.flags |= dns.flags.AA
    labels = [label.lower().decode("latin-1") for label in question.name.relativize(origin).labels]
    found = _lookup(
        labels,
        owner=question.name,
        qtype=question.rdtype,
        table=table,
        apps=apps,
        config=config,
        turn=query.id,
    )
    if found is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority = [_soa(config, table.version)]
    elif not found.answer:
        response.authority = [_soa(config, table.version)]  # NODATA (RFC 2308 type 2)
    else:
        response.answer = found.answer
        response.additional = found.additional
    return response


def response_size_limit(query: dns.message.Message, config: DnsConfig, *, tcp: bool) -> int:
    """Bytes the response may take: 64 KiB over TCP; over UDP 512 unless EDNS offers more
    (capped at our advertised payload)."""
    if tcp:
        return _TCP_MAX
    if query.edns >= 0:
        return max(_UDP_MIN, min(query.payload, config.max_udp_payload_bytes))
    return _UDP_MIN


def encode_response(
    response: dns.message.Message, query: dns.message.Message, config: DnsConfig, *, tcp: bool
) -> tuple[bytes, bool]:
    """Wire bytes of ``response`` within the transport's limit, and whether TC was set.

    Records keep their order (local node first). Truncation drops whole RRsets (RFC 2181 9):
    a client told TC retries over TCP; dropped additional records (SRV targets' addresses)
    are not worth a TC on their own.
    """
    wire = response.to_wire(
        max_size=response_size_limit(query, config, tcp=tcp),
        prefer_truncation=True,
        # dnspython shuffles records by default; the local node's addresses must stay first.
        want_shuffle=False,
    )
    truncated = bool(wire[2] & 0x02) and not response.flags & dns.flags.TC
    return wire, truncated


@attrs.frozen
class Reply:
    """Send ``wire`` back; ``response`` is kept for counting (rcode) and tests."""

    wire: bytes
    response: dns.message.Message
    truncated: bool


@attrs.frozen
class Forward:
    """Resolve ``query`` upstream, then relay the answer under ``query.id``."""

    query: dns.message.Message


@attrs.frozen
class Drop:
    """Say nothing: the bytes are not a DNS query we can answer (counted by the shell)."""

    reason: str


Outcome = Reply | Forward | Drop


def parse_query(data: bytes) -> dns.message.Message | Drop:
    """The query in ``data``, or a Drop: malformed bytes, a response, a TSIG we cannot check."""
    try:
        query = dns.message.from_wire(data)
    except Exception as exc:  # dnspython raises many types on garbage; none may escape
        return Drop(f"malformed: {type(exc).__name__}")
    if query.flags & dns.flags.QR:
        # Answering a response could start a loop between two servers (or a reflection).
        return Drop("not a query (QR set)")
    return query


def _notimp_from_header(data: bytes) -> Reply | None:
    """NOTIMP for a request of another opcode whose body we could not parse (an UPDATE with
    its zone section, say): the 12-byte header is enough to say "not here" (RFC 1035 4.1.1)."""
    if len(data) < 12:
        return None
    flags = int.from_bytes(data[2:4], "big")
    opcode = dns.opcode.from_flags(flags)
    if flags & dns.flags.QR or opcode == dns.opcode.QUERY:
        return None
    response = dns.message.Message(id=int.from_bytes(data[:2], "big"))
    response.flags = dns.flags.QR | (flags & dns.flags.RD)
    response.set_opcode(opcode)
    response.set_rcode(dns.rcode.NOTIMP)
    return Reply(response.to_wire(), response, truncated=False)


def handle_wire(
    data: bytes, table: EndpointTable, apps: Apps, config: DnsConfig, *, tcp: bool
) -> Outcome:
    """One datagram (or TCP frame) in, what to do about it out. Never raises."""
    query = parse_query(data)
    if isinstance(query, Drop):
        return _notimp_from_header(data) or query
    try:
        response = answer(query, table, apps, config)
        if response is None:
            return Forward(query)
        wire, truncated = encode_response(response, query, config, tcp=tcp)
    except Exception as exc:  # a bug must cost one query, never the server
        log.exception("DNS query %s failed", query.question)
        return Drop(f"internal error: {type(exc).__name__}")
    return Reply(wire, response, truncated)


def upstream_query(query: dns.message.Message, query_id: int) -> dns.message.Message:
    """A copy of the client's query under our own id, so upstream answers are matched to
    what we asked (a spoofer must guess our id, not the client's)."""
    copy = dns.message.from_wire(query.to_wire())
    copy.id = query_id
    return copy


def relay_response(
    upstream: dns.message.Message, query: dns.message.Message, config: DnsConfig
) -> dns.message.Message:
    """The upstream answer as the client must see it: the client's id, our RA bit."""
    upstream.id = query.id
    upstream.flags |= dns.flags.RA
    return upstream


def servfail(query: dns.message.Message, config: DnsConfig) -> dns.message.Message:
    response = dns.message.make_response(
        query, bool(config.upstreams), our_payload=config.max_udp_payload_bytes
    )
    response.set_rcode(dns.rcode.SERVFAIL)
    return response


# ---------------------------------------------------------------------------------------------
# The trio shell


@attrs.define
class DnsCounters:
    queries: int = 0  # messages parsed as queries (UDP and TCP)
    answered: int = 0  # NOERROR answers for our domain (NODATA included)
    nxdomain: int = 0
    forwarded: int = 0  # queries sent upstream (answered or not)
    upstream_failures: int = 0  # forwards no upstream answered: SERVFAIL to the client
    dropped_malformed: int = 0  # bytes that are no query: never answered
    truncated: int = 0  # UDP responses sent with TC
    refused: int = 0
    formerr: int = 0
    notimp: int = 0
    servfail: int = 0
    forward_overflow: int = 0  # too many forwards in flight: SERVFAIL at once
    tcp_connections: int = 0
    tcp_refused: int = 0  # over the connection cap: closed at once
    tcp_timeouts: int = 0  # a frame started but did not finish within the idle timeout
    send_errors: int = 0


def _family(host: str) -> int:
    try:
        return (
            trio.socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else trio.socket.AF_INET
        )
    except ValueError:
        raise DnsError(f"DNS listen address {host!r} is not an IP address") from None


class DnsServer:
    """Serves :func:`answer` on UDP and TCP at ``(listen_host, port)`` (port 0: any free
    port, the same for both; ``run`` reports it through ``task_status``)."""

    def __init__(
        self,
        table: EndpointTable,
        listen_host: str,
        port: int,
        config: DnsConfig | None = None,
    ) -> None:
        self.table = table
        self.listen_host = listen_host
        self.requested_port = port
        self.config = config or DnsConfig()
        self.port: int | None = None
        self.counters = DnsCounters()
        self._apps: Apps = frozenset()
        self._tcp_open = 0
        self._forwards = 0
        self._backend = dns.asyncbackend.get_backend("trio")

    # ---- the daemon's side

    def set_apps(self, apps: Iterable[tuple[str, str]]) -> None:
        """Every ``(namespace, app)`` that exists in desired state (with endpoints or not)."""
        self._apps = frozenset((ns, app) for ns, app in apps)

    def status(self) -> dict[str, Any]:
        return {
            "listen": self.listen_host,
            "port": self.port,
            "domain": self.config.domain,
            "apps": len(self._apps),
            "tcp_open": self._tcp_open,
            "forwards_in_flight": self._forwards,
            **attrs.asdict(self.counters),
        }

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        udp, tcp, port = await self._bind()
        listener = trio.SocketListener(tcp)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_udp, udp, nursery)
                nursery.start_soon(
                    functools.partial(
                        trio.serve_listeners,
                        self._tcp_connection,
                        [listener],
                        handler_nursery=nursery,
                    )
                )
                task_status.started(port)
        finally:
            udp.close()
            with trio.CancelScope(shield=True):
                await listener.aclose()

    async def _bind(self) -> tuple[trio.socket.SocketType, trio.socket.SocketType, int]:
        """UDP and TCP on one port. With port 0 the kernel picks the UDP port; the TCP port
        of that number may be taken, so a few picks are tried."""
        family = _family(self.listen_host)
        attempts = 1 if self.requested_port else 20
        last: OSError | None = None
        for _ in range(attempts):
            udp = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
            tcp = trio.socket.socket(family, trio.socket.SOCK_STREAM)
            try:
                await udp.bind((self.listen_host, self.requested_port))
                port = udp.getsockname()[1]
                tcp.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
                await tcp.bind((self.listen_host, port))
                tcp.listen(128)
            except OSError as exc:
                udp.close()
                tcp.close()
                last = exc
                continue
            self.port = port
            return udp, tcp, port
        raise DnsError(
            f"cannot bind DNS on {self.listen_host}:{self.requested_port}: {last}"
        ) from last

    # ---- counting

    def _count(self, response: dns.message.Message) -> None:
        """Our own answers by rcode (forwarded ones count as ``forwarded``)."""
        rcode = response.rcode()
        if rcode == dns.rcode.NOERROR:
            self.counters.answered += 1
        elif rcode == dns.rcode.NXDOMAIN:
            self.counters.nxdomain += 1
        elif rcode == dns.rcode.REFUSED:
            self.counters.refused += 1
        elif rcode == dns.rcode.FORMERR:
            self.counters.formerr += 1
        elif rcode == dns.rcode.NOTIMP:
            self.counters.notimp += 1
        elif rcode == dns.rcode.SERVFAIL:
            self.counters.servfail += 1

    def _outcome(self, data: bytes, *, tcp: bool) -> Outcome:
        outcome = handle_wire(data, self.table, self._apps, self.config, tcp=tcp)
        if isinstance(outcome, Drop):
            self.counters.dropped_malformed += 1
            return outcome
        self.counters.queries += 1
        if isinstance(outcome, Reply):
            self._count(outcome.response)
            if outcome.truncated:
                self.counters.truncated += 1
        return outcome

    # ---- UDP

    async def _serve_udp(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                data, peer = await sock.recvfrom(_TCP_MAX)
            except OSError:
                # E.g. ICMP errors surfacing on the socket; nothing to answer.
                continue
            outcome = self._outcome(data, tcp=False)
            if isinstance(outcome, Reply):
                await self._sendto(sock, outcome.wire, peer)
            elif isinstance(outcome, Forward):
                if self._forwards >= self.config.max_forwards_in_flight:
                    self.counters.forward_overflow += 1
                    wire, _ = encode_response(
                        servfail(outcome.query, self.config), outcome.query, self.config, tcp=False
                    )
                    await self._sendto(sock, wire, peer)
                else:
                    self._forwards += 1
                    nursery.start_soon(self._forward_udp, sock, outcome.query, peer)

    async def _sendto(self, sock: trio.socket.SocketType, wire: bytes, peer: Any) -> None:
        try:
            await sock.sendto(wire, peer)
        except OSError:
            self.counters.send_errors += 1

    async def _forward_udp(
        self, sock: trio.socket.SocketType, query: dns.message.Message, peer: Any
    ) -> None:
        try:
            wire = await self._forward(query, tcp=False)
            await self._sendto(sock, wire, peer)
        finally:
            self._forwards -= 1

    # ---- forwarding

    async def _forward(self, query: dns.message.Message, *, tcp: bool) -> bytes:
        """Ask each upstream in turn (each bounded by ``upstream_timeout_s``); relay the
        first answer, or SERVFAIL when none answers."""
        self.counters.forwarded += 1
        response: dns.message.Message | None = None
        for host, port in self.config.upstreams:
            response = await self._ask_upstream(query, host, port)
            if response is not None:
                break
        if response is None:
            self.counters.upstream_failures += 1
            response = servfail(query, self.config)
        else:
            response = relay_response(response, query, self.config)
        try:
            wire, truncated = encode_response(response, query, self.config, tcp=tcp)
        except Exception:
            # An upstream answer we cannot re-encode (e.g. signed): the client gets SERVFAIL.
            log.exception("cannot relay the upstream answer to %s", query.question)
            self.counters.upstream_failures += 1
            wire, truncated = encode_response(
                servfail(query, self.config), query, self.config, tcp=tcp
            )
        if truncated:
            self.counters.truncated += 1
        return wire

    async def _ask_upstream(
        self, query: dns.message.Message, host: str, port: int
    ) -> dns.message.Message | None:
        timeout = self.config.upstream_timeout_s
        with trio.move_on_after(timeout):
            try:
                outgoing = upstream_query(query, secrets.randbits(16))
                # A datagram from elsewhere or with another id is ignored (not an error):
                # only the upstream's answer to our id ends the wait.
                response = await dns.asyncquery.udp(
                    outgoing,
                    host,
                    timeout=timeout,
                    port=port,
                    backend=self._backend,
                    ignore_unexpected=True,
                    ignore_errors=True,
                )
                if response.flags & dns.flags.TC:
                    response = await dns.asyncquery.tcp(
                        outgoing, host, timeout=timeout, port=port, backend=self._backend
                    )
                return response
            except (OSError, EOFError, ValueError, dns.exception.DNSException) as exc:
                log.debug("upstream %s:%s failed: %r", host, port, exc)
                return None
        log.debug("upstream %s:%s timed out", host, port)
        return None

    # ---- TCP

    async def _tcp_connection(self, stream: trio.SocketStream) -> None:
        if self._tcp_open >= self.config.max_tcp_connections:
            self.counters.tcp_refused += 1
            await stream.aclose()
            return
        self._tcp_open += 1
        self.counters.tcp_connections += 1
        try:
            buffer = bytearray()
            while True:
                frame: bytes | None = None
                with trio.move_on_after(self.config.tcp_idle_timeout_s):
                    frame = await _read_frame(stream, buffer)
                    if frame is None:
                        return  # the client closed
                if frame is None:
                    if buffer:
                        self.counters.tcp_timeouts += 1
                    return
                outcome = self._outcome(frame, tcp=True)
                if isinstance(outcome, Drop):
                    return  # framing is intact, but a client sending garbage is done
                if isinstance(outcome, Forward):
                    wire = await self._forward(outcome.query, tcp=True)
                else:
                    wire = outcome.wire
                with trio.move_on_after(self.config.tcp_idle_timeout_s):
                    await stream.send_all(len(wire).to_bytes(2, "big") + wire)
                    continue
                self.counters.tcp_timeouts += 1
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._tcp_open -= 1
            with trio.move_on_after(1):
                await stream.aclose()


async def _read_frame(stream: trio.abc.ReceiveStream, buffer: bytearray) -> bytes | None:
    """One length-prefixed DNS message (RFC 1035 4.2.2); None at end of stream. Bytes past
    the frame (a pipelined next query) stay in ``buffer``."""
    while True:
        if len(buffer) >= 2:
            size = int.from_bytes(buffer[:2], "big")
            if len(buffer) >= 2 + size:
                frame = bytes(buffer[2 : 2 + size])
                del buffer[: 2 + size]
                return frame
        chunk = await stream.receive_some(_TCP_MAX)
        if not chunk:
            return None
        buffer += chunk
