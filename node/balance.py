"""Choosing a replica for each new connection or request: the mesh's and the ingress's picker.

Pure (no I/O, no clock). One :class:`Balancer` per route keeps the state a strategy needs: a
round-robin cursor, and the connections in flight per endpoint for least-connections. The
endpoint list itself is passed in on every call, so a replica that became unready or died is
never chosen again the moment the table says so.

``prefer_local``: the routing mesh sends to replicas on its own node when there are any (no
extra hop, and the replica sees traffic from the node it runs on); the ingress spreads over
the whole cluster, which is what a user refreshing a page expects to see. ``exclude`` lets a
caller retry a failed connect on another replica without picking the same one twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

import attrs

from p2porch.node.endpoints import Endpoint
from p2porch.node.spec import Balance

# The picker goes by the app spec's own enum (``loadBalancing``): one spelling, no mapping.
Strategy = Balance


EndpointKey = tuple[str, str]  # (node, container id): unique per running replica container


def endpoint_key(endpoint: Endpoint) -> EndpointKey:
    return (endpoint.node, endpoint.container_id)


@attrs.define
class Balancer:
    """Picks endpoints for one route; :meth:`acquire`/:meth:`release` count live connections."""

    local_node: str
    strategy: Strategy = Strategy.ROUND_ROBIN
    prefer_local: bool = True
    _cursor: int = 0
    _active: Counter[EndpointKey] = attrs.field(factory=Counter)

    def choose(
        self, endpoints: Sequence[Endpoint], exclude: Collection[EndpointKey] = ()
    ) -> Endpoint | None:
        """The endpoint for the next connection, None when no ready one is left."""
        pool = [ep for ep in endpoints if ep.ready and endpoint_key(ep) not in exclude]
        if self.prefer_local:
            local = [ep for ep in pool if ep.node == self.local_node]
            if local:
                pool = local
        if not pool:
            return None
        # A stable order, so the cursor walks the same ring whatever order the caller used.
        pool.sort(key=lambda ep: (ep.node, ep.replica, ep.container_id))
        if self.strategy is Strategy.LEAST_CONNECTIONS:
            fewest = min(self._active[endpoint_key(ep)] for ep in pool)
            pool = [ep for ep in pool if self._active[endpoint_key(ep)] == fewest]
        chosen = pool[self._cursor % len(pool)]
        self._cursor += 1
        return chosen

    def acquire(self, endpoint: Endpoint) -> None:
        self._active[endpoint_key(endpoint)] += 1

    def release(self, endpoint: Endpoint) -> None:
        key = endpoint_key(endpoint)
        self._active[key] -= 1
        if self._active[key] <= 0:
            del self._active[key]

    def active(self, endpoint: Endpoint) -> int:
        return self._active[endpoint_key(endpoint)]
