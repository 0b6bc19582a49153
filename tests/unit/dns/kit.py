"""Building endpoint tables and queries for the DNS tests (unit and shell)."""

from __future__ import annotations

import itertools

import dns.message
import dns.rdatatype

from p2porch.node.endpoints import Endpoint, EndpointPort, EndpointTable, NodeEndpoints
from p2porch.node.spec import Protocol

LOCAL = "node-b"  # sorts after node-a: "local first" must come from the table, not the name

_versions = itertools.count(1)


def ep(
    replica: str,
    node: str,
    *ports: EndpointPort,
    namespace: str = "default",
    app: str = "web",
    ready: bool = True,
    revision: int = 1,
) -> Endpoint:
    slot = int(replica.rsplit("-", 1)[1]) if replica.rsplit("-", 1)[-1].isdigit() else 0
    return Endpoint(namespace, app, slot, replica, node, revision, f"c-{replica}", ports, ready)


def tcp(container_port: int, host: str, host_port: int) -> EndpointPort:
    return EndpointPort(container_port, host, host_port, Protocol.TCP)


def udp(container_port: int, host: str, host_port: int) -> EndpointPort:
    return EndpointPort(container_port, host, host_port, Protocol.UDP)


def table(*endpoints: Endpoint, local: str = LOCAL) -> EndpointTable:
    out = EndpointTable(local)
    by_node: dict[str, list[Endpoint]] = {}
    for e in endpoints:
        by_node.setdefault(e.node, []).append(e)
    for node, eps in by_node.items():
        out.update(NodeEndpoints(node, 1, next(_versions), tuple(eps)))
    return out


def query(
    name: str, rdtype: str = "A", *, edns: int | bool = False, payload: int = 1232
) -> dns.message.Message:
    if edns is False:
        return dns.message.make_query(name, dns.rdatatype.from_text(rdtype), use_edns=False)
    version = 0 if edns is True else int(edns)
    return dns.message.make_query(
        name, dns.rdatatype.from_text(rdtype), use_edns=version, payload=payload
    )
