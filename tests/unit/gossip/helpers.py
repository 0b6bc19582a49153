"""A zero-latency, fully scripted network of SwimCores for unit scenarios."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

from p2porch.gossip.config import GossipConfig
from p2porch.gossip.core import SwimCore
from p2porch.gossip.messages import Event, EventKind, Member, MemberState
from p2porch.gossip.table import MemberSnapshot


def addr_of(name: str) -> str:
    return f"{name}:7946"


class Net:
    """Cores keyed by address; packets delivered instantly unless dropped or down."""

    def __init__(
        self,
        config: GossipConfig,
        names: Iterable[str],
        *,
        seed: int = 1,
        bootstrap: bool = True,
        running: Iterable[str] | None = None,
    ) -> None:
        self.config = config
        self.now = 0.0
        self.cores: dict[str, SwimCore] = {}
        self.events: list[tuple[float, str, Event]] = []
        self.packets: list[tuple[float, str, str, bytes]] = []
        self.drop: set[tuple[str, str]] = set()  # (src name, dst name) UDP paths cut
        self.down: set[str] = set()  # names whose packets vanish (crashed)
        self.frozen: set[str] = set()  # names whose timers do not run (only answer)
        self.tcp_ok = True
        names = list(names)
        run = set(names if running is None else running)
        for i, name in enumerate(names):
            if name in run:
                self.cores[name] = SwimCore(
                    config, name, addr_of(name), random.Random(seed * 100 + i), 0.0
                )
        if bootstrap:
            snap = MemberSnapshot(Member(n, addr_of(n), 0, MemberState.ALIVE) for n in names)
            for core in self.cores.values():
                core.bootstrap(0.0, snap)

    def core(self, name: str) -> SwimCore:
        return self.cores[name]

    def add(self, name: str, *, incarnation: int = 0, seed: int = 99) -> SwimCore:
        core = SwimCore(
            self.config,
            name,
            addr_of(name),
            random.Random(seed),
            self.now,
            incarnation=incarnation,
        )
        self.cores[name] = core
        self.down.discard(name)
        return core

    def _name(self, addr: str) -> str:
        return addr.rsplit(":", 1)[0]

    def _reachable(self, src: str, dst: str, udp: bool = True) -> bool:
        return (
            dst in self.cores
            and src not in self.down
            and dst not in self.down
            and not (udp and (src, dst) in self.drop)
        )

    def flush(self) -> None:
        for _ in range(1000):
            busy = False
            for name, core in list(self.cores.items()):
                if not core.has_ready():
                    continue
                busy = True
                ready = core.ready()
                for ev in ready.events:
                    self.events.append((self.now, name, ev))
                if name in self.down:
                    continue
                for pkt in ready.packets:
                    dst = self._name(pkt.dst)
                    self.packets.append((self.now, name, dst, pkt.data))
                    if self._reachable(name, dst):
                        self.cores[dst].receive_packet(self.now, addr_of(name), pkt.data)
                for pkt in ready.tcp_pings:
                    dst = self._name(pkt.dst)
                    if self.tcp_ok and self._reachable(name, dst, udp=False):
                        answer = self.cores[dst].receive_tcp_ping(self.now, addr_of(name), pkt.data)
                        if answer is not None:
                            core.receive_packet(self.now, pkt.dst, answer)
                for addr in ready.push_pulls:
                    dst = self._name(addr)
                    if self._reachable(name, dst, udp=False):
                        other = self.cores[dst]
                        mine = core.local_state(self.now, False)
                        theirs = other.local_state(self.now, False)
                        other.merge_remote_state(self.now, mine, False)
                        core.merge_remote_state(self.now, theirs, False)
            if not busy:
                return
        raise AssertionError("packet storm: flush did not settle")

    def run_until(self, until: float) -> None:
        self.flush()
        while True:
            active = [
                c for n, c in self.cores.items() if n not in self.down and n not in self.frozen
            ]
            nxt = min((c.next_deadline() for c in active), default=math.inf)
            if nxt > until:
                self.now = until
                return
            self.now = max(self.now, nxt)
            for c in active:
                if c.next_deadline() <= self.now:
                    c.tick(self.now)
            self.flush()

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def events_of(
        self, observer: str, kind: EventKind, about: str | None = None
    ) -> list[tuple[float, Event]]:
        return [
            (t, e)
            for t, o, e in self.events
            if o == observer and e.kind is kind and (about is None or e.member.name == about)
        ]
