"""Tools of the hostile-input suite: real agents without a container engine, attackers' sockets.

Addresses (loopback only, this suite's own range 127.0.0.100-139):

=============  ==================================================================
100-104        the cluster under attack (5 agents, ``--no-runtime``)
110            a second, unrelated 1-node cluster (another CA)
111            a throwaway 1-node cluster a known bug damages (test_join_fuzz)
121-123        fake members (:class:`FakeMember`): men in the middle a joiner is sent to
124-129        nodes that really join the cluster under attack (token and removal tests)
130-138        joiners that must be refused (they never bind a port, so hosts are reused)
139            the source address of every raw attacker socket
=============  ==================================================================

Every wait is bounded and polls behaviour; nothing here asserts how long something took.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from p2porch.common import codec, pki
from p2porch.gossip.keyring import (
    PURPOSE_TCP,
    PURPOSE_UDP,
    AuthenticationFailed,
    Keyring,
    load_keyring,
)
from p2porch.gossip.messages import Ack, Compound, Packet, Ping, SingleMessage
from p2porch.gossip.service import StreamPingRequest
from tests.integration.cluster.harness import API_PORT, Cluster, Node, wait_for

RAFT_PORT = 7951
GOSSIP_PORT = 7946
ATTACKER = "127.0.0.139"
AGENT_ARGS = ("--no-runtime", "--voter-grace", "5", "--left-grace", "30")
# Addresses of joiners that must fail: they never get as far as binding, so reuse is safe.
_REFUSED_HOSTS = itertools.cycle(f"127.0.0.{i}" for i in range(130, 139))
# What the API opens without a client certificate (the suite's own copy of the rule: the
# product's table is what is under test).
OPEN_ENDPOINTS = frozenset({("GET", "/healthz"), ("GET", "/v1/ca"), ("POST", "/v1/join")})


class ControlPlaneCluster(Cluster):
    """The harness's cluster, for agents started with ``--no-runtime`` (no containers)."""

    def remove_containers(self, node_name: str) -> None:
        return None

    def containers(self, node_name: str) -> list[Any]:
        return []


def live_nodes(c: Cluster) -> list[Node]:
    return [n for n in c.nodes if n.proc is not None and n.proc.poll() is None]


# --------------------------------------------------------------------------- TLS material


def ssl_context(
    ca: Path | bytes, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A TLS client context trusting ``ca`` (a file or PEM bytes), presenting ``cert``."""
    context = ssl.create_default_context()
    context.load_verify_locations(cadata=ca.decode() if isinstance(ca, bytes) else ca.read_text())
    context.check_hostname = False  # the raw probes address peers by IP; chains still verified
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def write_pair(folder: Path, name: str, cert_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    key.chmod(0o600)
    return cert, key


def node_pair(node: Node) -> tuple[Path, Path]:
    """A node's own certificate and key, as its data dir holds them."""
    return node.data_dir / "node.pem", node.data_dir / "node.key"


def admin_pair(node: Node) -> tuple[Path, Path]:
    return node.data_dir / "admin.pem", node.data_dir / "admin.key"


def make_user(via: Node, name: str, role: str, folder: Path) -> tuple[Path, Path]:
    """A user certificate through ``POST /v1/users`` (the key never leaves this process)."""
    key = pki.generate_key()
    resp = via.request(
        "POST",
        "/v1/users",
        json={"name": name, "role": role, "csr": pki.make_request(key, name).decode()},
    )
    assert resp.status_code == 200, resp.text
    return write_pair(folder, name, resp.json()["certificate"].encode(), pki.key_pem(key))


def request_as(
    node: Node,
    method: str,
    path: str,
    pair: tuple[Path, Path] | None,
    **kw: Any,
) -> httpx.Response:
    """One API call presenting ``pair`` (None: no client certificate at all)."""
    ca = node.data_dir / "ca.pem"
    context = ssl_context(ca, *(pair or (None, None)))
    return httpx.request(
        method, f"{node.api}{path}", verify=context, timeout=kw.pop("timeout", 20), **kw
    )


# --------------------------------------------------------------------------- raw sockets


def connect(host: str, port: int, timeout_s: float = 10.0, source: str = ATTACKER) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout_s, source_address=(source, 0))


def tls_connect(
    host: str,
    port: int,
    context: ssl.SSLContext,
    timeout_s: float = 10.0,
    source: str = ATTACKER,
) -> ssl.SSLSocket:
    """Connect (from ``source``) and handshake. With TLS 1.3 the client's handshake ends
    before the server has judged the client certificate: a refusal shows up as an alert or
    EOF on the first read."""
    return context.wrap_socket(connect(host, port, timeout_s, source), server_hostname=host)


def read_until_closed(sock: socket.socket, within_s: float) -> bytes:
    """Everything the peer sends until it closes (EOF, reset or TLS alert); AssertionError if
    it still holds the connection open after ``within_s``."""
    received = bytearray()
    deadline = time.monotonic() + within_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"the server still holds the connection after {within_s:.0f} s "
                f"(received {bytes(received[:200])!r})"
            )
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLError, ConnectionError):
            return bytes(received)
        except TimeoutError:
            continue
        if not chunk:
            return bytes(received)
        received += chunk


def refused_after_handshake(
    host: str, port: int, context: ssl.SSLContext, request: bytes, within_s: float = 15.0
) -> bool:
    """True if the server refuses us: the handshake fails, or it closes (or alerts) without
    answering ``request``. AssertionError if it keeps the connection open ``within_s``."""
    try:
        with tls_connect(host, port, context) as tls:
            tls.sendall(request)
            return read_until_closed(tls, within_s) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def client_hello() -> bytes:
    """The bytes of a genuine TLS 1.3 ClientHello (then we say nothing more)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", "not a TLS handshake record"
    return hello


# --------------------------------------------------------------------------- gossip packets


def cluster_keyring(node: Node) -> Keyring:
    """The gossip keyring a member holds (its data dir's ``gossip.keys``)."""
    return load_keyring(node.data_dir / "gossip.keys")


def ping(seq: int, target: str) -> bytes:
    return codec.encode(Ping(seq=seq, target=target, source="h6-intruder"))


def gossip_frame(keyring: Keyring, target: str) -> bytes:
    """A genuine gossip stream request (a TCP ping), length-prefixed and sealed."""
    sealed = keyring.seal(codec.encode(StreamPingRequest(ping(7, target))), PURPOSE_TCP)
    return struct.pack(">I", len(sealed)) + sealed


def acked_seqs(data: bytes, keyring: Keyring) -> list[int]:
    """The Ack sequence numbers in one datagram (a compound may piggyback gossip)."""
    try:
        plaintext = keyring.open(data, PURPOSE_UDP)
    except AuthenticationFailed:
        return []
    packet: Packet = codec.decode(plaintext, Packet)
    parts: list[SingleMessage] = (
        [codec.decode(p, SingleMessage) for p in packet.parts]
        if isinstance(packet, Compound)
        else [packet]
    )
    return [m.seq for m in parts if isinstance(m, Ack)]


def probe_gossip(
    node: Node, attacks: list[bytes], keyring: Keyring, control_seq: int, within_s: float = 15.0
) -> list[int]:
    """Send ``attacks`` then one genuine ping (``control_seq``) to ``node``'s gossip port;
    return every Ack seq received until the control's Ack (and a short drain after it).

    The control proves the path works; an attack packet that was *not* dropped would have
    been answered before it (one socket, one ordered queue on the node)."""
    acks: list[int] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((ATTACKER, 0))
        for packet in attacks:
            udp.sendto(packet, (node.host, GOSSIP_PORT))
            time.sleep(0.002)  # paced: a loaded node must not lose them to a full buffer
        genuine = keyring.seal(ping(control_seq, node.name), PURPOSE_UDP)
        deadline = time.monotonic() + within_s
        while control_seq not in acks:
            # UDP is lossy even on loopback under load: resend the control until answered.
            udp.sendto(genuine, (node.host, GOSSIP_PORT))
            udp.settimeout(1.0)
            with contextlib.suppress(TimeoutError):
                while True:
                    data, _ = udp.recvfrom(65536)
                    acks += acked_seqs(data, keyring)
                    if control_seq in acks:
                        break
            if time.monotonic() > deadline:
                raise AssertionError(f"{node.name} never answered the genuine ping")
        udp.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            while True:
                data, _ = udp.recvfrom(65536)
                acks += acked_seqs(data, keyring)
    return acks


# --------------------------------------------------------------------------- cluster health


def member_views(c: Cluster) -> dict[str, dict[str, str]]:
    """Every live node's view: node name -> status, for nodes the log has not removed."""
    views = {}
    for node in live_nodes(c):
        rows = node.get("/v1/nodes", timeout=10)
        views[node.name] = {r["name"]: r["status"] for r in rows if not r["removed"]}
    return views


def counters(node: Node) -> dict[str, Any]:
    """What ``node`` says it dropped at each boundary (``GET /v1/status``)."""
    return dict(node.get("/v1/status")["counters"])


def counted(node: Node, before: dict[str, Any], **at_least: int) -> None:
    """Wait until each ``section__name`` counter of ``node`` grew by at least the amount
    (``raft__bad_frames=1``; a top-level counter is just its name)."""

    def grown() -> bool:
        now = counters(node)
        for key, amount in at_least.items():
            section, _, name = key.partition("__")
            old = before[section][name] if name else before[section]
            new = now[section][name] if name else now[section]
            if new < old + amount:
                return False
        return True

    wait_for(grown, 20, f"counters of {node.name} to grow by {at_least}", node)


def namespace_names(node: Node) -> set[str]:
    return {doc["metadata"]["name"] for doc in node.get("/v1/namespaces")}


def membership(node: Node) -> tuple[frozenset[str], frozenset[str]]:
    """(node names the log knows, Raft members) as ``node`` sees them."""
    names = frozenset(r["name"] for r in node.get("/v1/nodes"))
    status = node.get("/v1/status")
    return names, frozenset(status["voters"]) | frozenset(status["learners"])


def assert_unharmed(c: Cluster) -> None:
    """The cluster survived: every agent runs, sees every member alive, and a write through a
    follower and through the leader both commit and show up everywhere."""
    nodes = live_nodes(c)
    assert len(nodes) == len([n for n in c.nodes if n.proc is not None]), "an agent exited"

    def all_alive() -> bool:
        expected = {n.name for n in nodes}
        for view in member_views(c).values():
            if not expected <= set(view) or any(s != "alive" for s in view.values()):
                return False
        return True

    wait_for(all_alive, 45, "every member alive in every view", nodes[0])
    leader = c.leader(nodes[0])
    follower = next(n for n in nodes if n is not leader) if len(nodes) > 1 else leader
    for via in (follower, leader):
        name = f"h6-{uuid.uuid4().hex[:10]}"
        resp = via.request("PUT", f"/v1/namespaces/{name}")
        assert resp.status_code == 200, resp.text
        for node in nodes:

            def seen(n: Node = node, ns: str = name) -> bool:
                return ns in namespace_names(n)

            wait_for(seen, 30, f"namespace {name} on {node.name}", node)
        assert via.request("DELETE", f"/v1/namespaces/{name}").status_code == 200


# --------------------------------------------------------------------------- joiners


class JoinAttempt:
    """A ``p2porch agent --join`` process that is expected to be refused."""

    def __init__(self, base: Path, name: str) -> None:
        self.name = name
        self.host = next(_REFUSED_HOSTS)
        self.data_dir = base / name
        self.log_path = base / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, target: str, token: str | None) -> JoinAttempt:
        cmd = [
            sys.executable,
            "-m",
            "p2porch.cli.main",
            "agent",
            "--data-dir",
            str(self.data_dir),
            "--advertise",
            self.host,
            "--name",
            self.name,
            "--preset",
            "local",
            *AGENT_ARGS,
            "--join",
            target,
        ]
        if token is not None:
            cmd += ["--token", token]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_refused(self, timeout_s: float = 90.0) -> str:
        """Wait for the agent to give up; its output. A joiner still running was admitted."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"{self.name} did not give up: admitted?\n{self.output()}"
            ) from None
        output = self.output()
        assert code != 0, f"{self.name} exited 0:\n{output}"
        return output

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def left_nothing(self) -> list[str]:
        """What a refused join left in its data dir (must be nothing)."""
        if not self.data_dir.exists():
            return []
        return sorted(str(p.relative_to(self.data_dir)) for p in self.data_dir.rglob("*"))


def join_body(secret: str, name: str, host: str, csr: str | None) -> dict[str, Any]:
    """A well-formed join request body (what a real joiner sends)."""
    body: dict[str, Any] = {
        "secret": secret,
        "name": name,
        "address": host,
        "apiAddress": f"{host}:{API_PORT}",
        "raftAddress": f"{host}:{RAFT_PORT}",
        "gossipAddress": f"{host}:{GOSSIP_PORT}",
        "labels": {},
        "cpuMillicores": 1000,
        "memoryBytes": 1 << 30,
    }
    if csr is not None:
        body["csr"] = csr
    return body


def token_secret(token: str) -> str:
    return pki.JoinToken.parse(token).secret


# --------------------------------------------------------------------------- a fake member


class FakeMember:
    """A TLS server on ``host``:7950 posing as a member: it answers ``GET /v1/ca`` with
    ``ca_answer`` and records every byte it could decrypt (to prove what never arrived)."""

    def __init__(
        self, host: str, cert: tuple[Path, Path], ca_answer: bytes, fingerprint: str
    ) -> None:
        self.host = host
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert[0]), str(cert[1]))
        self.ca_answer = ca_answer
        self.fingerprint = fingerprint
        self.received: list[bytes] = []
        self.failed_handshakes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server((host, API_PORT))
        self._listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> FakeMember:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._listener.close()

    @property
    def request_lines(self) -> list[str]:
        with self._lock:
            return [r.split(b"\r\n", 1)[0].decode("latin-1") for r in self.received]

    def saw(self, needle: str) -> bool:
        with self._lock:
            return any(needle.encode() in r for r in self.received)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            with self._lock:
                self.failed_handshakes += 1
            conn.close()
            return
        with tls:
            data = bytearray()
            try:
                while b"\r\n\r\n" not in data and len(data) < 1 << 20:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                head, _, body = bytes(data).partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                while len(body) < min(length, 1 << 20):
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    body += chunk
            except (ssl.SSLError, OSError, ValueError):
                return
            with self._lock:
                self.received.append(head + b"\r\n\r\n" + body)
            if head.startswith(b"GET /v1/ca "):
                status = "200 OK"
                payload: dict[str, Any] = {
                    "ca": self.ca_answer.decode(),
                    "fingerprint": self.fingerprint,
                }
            else:
                status = "403 Forbidden"
                payload = {"error": {"code": "forbidden", "message": "fake member"}}
            text = json.dumps(payload).encode()
            with contextlib.suppress(ssl.SSLError, OSError):
                tls.sendall(
                    f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(text)}\r\nconnection: close\r\n\r\n".encode()
                    + text
                )


# --------------------------------------------------------------------------- files


def files_under(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            yield path


def forms_of(value: bytes) -> dict[str, bytes]:
    """The ways a value could sit in a file in clear: raw, hex and base64."""
    return {
        "raw": value,
        "hex": value.hex().encode(),
        "base64": base64.b64encode(value),
    }


def find_in_files(folders: list[Path], needles: dict[str, bytes]) -> list[str]:
    """Binary-safe ``grep -r``: "file: what" for every needle found in any file."""
    hits = []
    for folder in folders:
        for path in files_under(folder):
            data = path.read_bytes()
            hits += [f"{path}: {what}" for what, needle in needles.items() if needle in data]
    return hits


def random_name(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"
