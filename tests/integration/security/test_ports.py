"""Raw attackers on the node ports: the API (7950), Raft (7951) and gossip (7946 TCP + UDP).

Raft and gossip streams are mutual TLS for members only: no certificate, another CA's, or a
user's (even an admin's) is refused. Bytes that are not TLS, a ClientHello followed by
silence, and -- from a member's certificate -- garbage or oversized frames all end with the
connection dropped, and the cluster keeps working. Gossip datagrams that are forged, sealed
under another key, truncated or oversized are dropped: a genuine ping sent right after them
is the only one answered.
"""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import select
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import pytest

from p2porch.common import codec
from p2porch.gossip.keyring import PURPOSE_TCP, PURPOSE_UDP, Keyring, generate_key, key_hint
from p2porch.gossip.messages import Dead, Left, Suspect
from p2porch.gossip.service import StreamPingRequest
from tests.integration.cluster.harness import API_PORT
from tests.integration.security.kit import (
    ATTACKER,
    GOSSIP_PORT,
    RAFT_PORT,
    ControlPlaneCluster,
    admin_pair,
    assert_unharmed,
    client_hello,
    cluster_keyring,
    connect,
    counted,
    counters,
    gossip_frame,
    make_user,
    member_views,
    node_pair,
    ping,
    probe_gossip,
    random_name,
    read_until_closed,
    refused_after_handshake,
    ssl_context,
    tls_connect,
)

pytestmark = pytest.mark.slow

PORTS = {"api": API_PORT, "raft": RAFT_PORT, "gossip": GOSSIP_PORT}


def test_plain_bytes_on_every_port_are_dropped(main: ControlPlaneCluster) -> None:
    node = main.nodes[0]
    keyring = cluster_keyring(node)
    payloads = {
        "random": secrets.token_bytes(2048),
        "raft-like frame": struct.pack(">I", 8) + secrets.token_bytes(8),
        "gossip frame in clear": gossip_frame(keyring, node.name),
        "http": b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n",
    }
    for port_name, port in PORTS.items():
        for what, payload in payloads.items():
            with connect(node.host, port) as sock:
                sock.sendall(payload)
                got = read_until_closed(sock, 30)
            # At most a TLS alert record: never an answer to what was sent.
            assert got[:1] in (b"", b"\x15"), (port_name, what, got[:40])
    assert_unharmed(main)


def test_client_hello_then_silence_is_cut_at_the_handshake_deadline(
    main: ControlPlaneCluster,
) -> None:
    node = main.nodes[1]
    hello = client_hello()

    def hold(port: int) -> bytes:
        with connect(node.host, port) as sock:
            sock.sendall(hello)
            return read_until_closed(sock, 60)  # the deadlines are 5 s (nodes), 10 s (API)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(PORTS)) as pool:
        answers = dict(zip(PORTS, pool.map(hold, PORTS.values()), strict=True))
    for port_name, got in answers.items():
        assert got[:1] == b"\x16", (port_name, got[:40])  # the ServerHello came, then the cut
    assert_unharmed(main)


def test_node_ports_admit_members_only(
    main: ControlPlaneCluster, foreign: ControlPlaneCluster, tmp_path: Path
) -> None:
    target, member = main.nodes[0], main.nodes[1]
    ca = target.data_dir / "ca.pem"
    viewer = make_user(target, random_name("pv"), "viewer", tmp_path)
    keyring = cluster_keyring(target)
    outsiders = {
        "no certificate": ssl_context(ca),
        "another CA's node": ssl_context(ca, *node_pair(foreign.nodes[0])),
        "another CA's admin": ssl_context(ca, *admin_pair(foreign.nodes[0])),
        "our admin": ssl_context(ca, *admin_pair(target)),
        "our viewer": ssl_context(ca, *viewer),
    }
    requests = {
        RAFT_PORT: struct.pack(">I", 8) + secrets.token_bytes(8),
        GOSSIP_PORT: gossip_frame(keyring, target.name),
    }
    before = counters(target)
    for who, context in outsiders.items():
        for port, request in requests.items():
            assert refused_after_handshake(target.host, port, context, request), (who, port)
    counted(target, before, raftTlsRefused=len(outsiders), gossipTlsRefused=len(outsiders))

    # Controls: a member's certificate gets the gossip answer, and Raft keeps its stream open.
    member_context = ssl_context(ca, *node_pair(member))
    with tls_connect(target.host, GOSSIP_PORT, member_context) as tls:
        tls.sendall(requests[GOSSIP_PORT])
        reply = read_until_closed(tls, 15)
    (length,) = struct.unpack(">I", reply[:4])
    assert keyring.open(reply[4 : 4 + length], PURPOSE_TCP)
    with tls_connect(target.host, RAFT_PORT, member_context) as tls:
        tls.settimeout(2)
        with pytest.raises(TimeoutError):
            tls.recv(1)
    assert_unharmed(main)


def test_garbage_and_oversized_frames_from_a_member(main: ControlPlaneCluster) -> None:
    """Inside TLS, with a member's own certificate: frames that are garbage, too large or
    sealed under another key end the connection, unanswered."""
    target, member = main.nodes[2], main.nodes[3]
    context = ssl_context(target.data_dir / "ca.pem", *node_pair(member))
    keyring = cluster_keyring(target)
    foreign_frame = Keyring(generate_key()).seal(
        codec.encode(StreamPingRequest(ping(1, target.name))), PURPOSE_TCP
    )
    garbage_sealed = keyring.seal(secrets.token_bytes(64), PURPOSE_TCP)
    udp_sealed = keyring.seal(codec.encode(StreamPingRequest(ping(1, target.name))), PURPOSE_UDP)
    attacks = {
        RAFT_PORT: {
            "oversized": struct.pack(">I", 0xFFFFFFF0) + b"x" * 1024,
            "garbage": struct.pack(">I", 64) + secrets.token_bytes(64),
            "empty": struct.pack(">I", 0),
        },
        GOSSIP_PORT: {
            "oversized": struct.pack(">I", 0xFFFFFFF0) + b"x" * 1024,
            "garbage": struct.pack(">I", 64) + secrets.token_bytes(64),
            "another key": struct.pack(">I", len(foreign_frame)) + foreign_frame,
            "garbage sealed": struct.pack(">I", len(garbage_sealed)) + garbage_sealed,
            "udp purpose": struct.pack(">I", len(udp_sealed)) + udp_sealed,
        },
    }
    before = counters(target)
    for port, frames in attacks.items():
        for what, frame in frames.items():
            with tls_connect(target.host, port, context) as tls:
                tls.sendall(frame)
                assert read_until_closed(tls, 30) == b"", (port, what)
        # A frame cut short, then the connection dropped by us.
        with tls_connect(target.host, port, context) as tls:
            tls.sendall(struct.pack(">I", 1000) + b"x" * 10)
    counted(
        target,
        before,
        raft__bad_frames=1,  # the oversized one
        raft__bad_messages=2,  # garbage, empty
        gossip__tcp_bad_frames=5,
        gossip__bad_auth=2,  # another key; a datagram's sealing on a stream
    )
    assert_unharmed(main)


def test_forged_truncated_and_foreign_gossip_packets_are_dropped(
    main: ControlPlaneCluster,
) -> None:
    node = main.nodes[0]
    keyring = cluster_keyring(node)
    other = Keyring(generate_key())
    genuine = keyring.seal(ping(2, node.name), PURPOSE_UDP)
    forged_header = bytes([1]) + key_hint(keyring.primary) + os.urandom(12 + 40)
    attacks = [
        other.seal(ping(1, node.name), PURPOSE_UDP),
        other.seal(ping(1, node.name), PURPOSE_UDP),  # the same, again
        keyring.seal(os.urandom(40), PURPOSE_UDP),  # our key, garbage inside
        keyring.seal(codec.encode(StreamPingRequest(b"x")), PURPOSE_UDP),  # the wrong record
        keyring.seal(ping(3, node.name), PURPOSE_TCP),  # a stream frame replayed as a datagram
        forged_header,  # a valid header, garbage after it
        bytes([2]) + genuine[1:],  # an unknown version
        genuine[:20] + bytes([genuine[20] ^ 1]) + genuine[21:],  # one bit flipped
        os.urandom(60_000),  # over the datagram limit
        b"",
        *[genuine[:cut] for cut in range(len(genuine))],  # every truncation
        *[os.urandom(n) for n in (1, 17, 33, 100, 1400)],
    ]
    before = counters(node)
    acks = probe_gossip(node, attacks, keyring, control_seq=100)
    assert set(acks) == {100}, acks
    # Dropped and counted (the count is what an operator sees in GET /v1/status).
    counted(
        node,
        before,
        # 2 under another key, 1 stream frame, 1 forged header, 1 unknown version, 1 bit flip,
        # the empty one, every truncation, 5 random
        gossip__bad_auth=12 + len(genuine),
        gossip__bad_packets=2,  # our key, garbage or the wrong record inside
        gossip__udp_oversize=1,
    )
    assert_unharmed(main)


def test_forged_rumours_under_another_key_kill_nobody(main: ControlPlaneCluster) -> None:
    victim = main.nodes[1]
    other = Keyring(generate_key())
    keyring = cluster_keyring(victim)
    rumours = [
        codec.encode(Dead(name=victim.name, incarnation=2**40, accuser=main.nodes[2].name)),
        codec.encode(Suspect(name=victim.name, incarnation=2**40, accuser=main.nodes[3].name)),
        codec.encode(Left(name=victim.name, incarnation=2**40)),
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((ATTACKER, 0))
        for _ in range(5):
            for node in main.nodes:
                for rumour in rumours:
                    udp.sendto(other.seal(rumour, PURPOSE_UDP), (node.host, GOSSIP_PORT))
                    # and under our key, cut by one byte
                    udp.sendto(keyring.seal(rumour, PURPOSE_UDP)[:-1], (node.host, GOSSIP_PORT))
            time.sleep(0.3)
    # Sample every view a few times: the victim is alive in all of them, every time.
    for _ in range(4):
        for name, view in member_views(main).items():
            assert view[victim.name] == "alive", (name, view)
        time.sleep(0.5)
    assert_unharmed(main)


class SlotHolder:
    """Keeps ``count`` connections to a port open with a ClientHello and then silence,
    reopening each one the server cuts -- for ``seconds`` at most (a bounded attack)."""

    def __init__(self, host: str, port: int, count: int, seconds: float) -> None:
        self.host, self.port, self.count, self.seconds = host, port, count, seconds
        self.opened = 0
        self.max_opened = 4000
        self._hello = client_hello()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> socket.socket | None:
        try:
            sock = connect(self.host, self.port, timeout_s=2)
            sock.sendall(self._hello)
        except OSError:
            return None
        sock.setblocking(False)
        self.opened += 1
        return sock

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        socks = [s for s in (self._open() for _ in range(self.count)) if s is not None]
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                readable, _, _ = select.select(socks, [], [], 0.05) if socks else ([], [], [])
                for sock in readable:
                    try:
                        alive = sock.recv(65536) != b""
                    except OSError:
                        alive = False
                    if not alive:
                        socks.remove(sock)
                        sock.close()
                while len(socks) < self.count and self.opened < self.max_opened:
                    fresh = self._open()
                    if fresh is None:
                        break
                    socks.append(fresh)
                time.sleep(0.05)  # at most count reconnections per 50 ms: bounded
        finally:
            for sock in socks:
                sock.close()

    def __enter__(self) -> SlotHolder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_silent_connections_do_not_lock_members_out_of_gossip_streams(
    main: ControlPlaneCluster,
) -> None:
    target, member = main.nodes[2], main.nodes[3]
    context = ssl_context(target.data_dir / "ca.pem", *node_pair(member))
    keyring = cluster_keyring(target)
    answered = 0
    with SlotHolder(target.host, GOSSIP_PORT, count=40, seconds=20) as holder:
        time.sleep(1)  # let the attacker take the slots
        for _ in range(6):
            try:
                # From the member's own address, as a member's push-pull comes.
                with tls_connect(
                    target.host, GOSSIP_PORT, context, timeout_s=5, source=member.host
                ) as tls:
                    tls.sendall(gossip_frame(keyring, target.name))
                    answered += len(read_until_closed(tls, 10)) > 4
            except (OSError, ssl.SSLError):
                pass
            time.sleep(0.5)
    assert holder.opened > 16
    assert answered == 6, f"{answered} of 6 member stream pings answered under the attack"
    assert_unharmed(main)
