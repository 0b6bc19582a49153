"""``python -m p2porch.consensus.node_main``: one replicated-KV Raft node as a process.

Why: integration tests (kill -9 a real process, restart it from its data directory) and the
benchmarks against etcd need the shell, the WAL and TCP exactly as a daemon runs them, minus
the rest of the node. This is that process, plus the small client that talks to it.

Usage::

    python -m p2porch.consensus.node_main --id a --listen 127.0.0.2:7000 \\
        --client 127.0.0.2:7001 --peers a=127.0.0.2:7000,b=127.0.0.3:7000,c=127.0.0.4:7000 \\
        --data-dir /tmp/a --bootstrap a,b,c

It prints ``READY <raft address> <client address>`` on stdout once both ports listen.

``--tls DIR`` puts Raft peer traffic under mutual TLS 1.3 (``DIR`` holds ``ca.pem``,
``<id>.pem`` and ``<id>.key``; a peer must present a node certificate from that CA naming one
of ``--peers``). The client protocol port stays plain TCP: it is this test process's own
harness, not the product's API (which has its own TLS). Make such a directory with::

    python -m p2porch.consensus.node_main make-tls DIR a=127.0.0.2 b=127.0.0.3 c=127.0.0.4

Client protocol (same framing as the Raft transport, codec tags 70-79): a client sends
:class:`KvRequest` (a :class:`~p2porch.consensus.kv.KvCommand` through the log) or
:class:`KvReadRequest` (a linearizable ReadIndex read of one key) or :class:`KvStatusRequest`;
the node answers :class:`KvResponse` with the same ``req_id``. Requests on one connection are
served concurrently (responses may come out of order). A follower answers ``not_leader`` with
a leader hint; :class:`KvClient` follows hints and retries idempotently.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import trio

from p2porch.common import codec, pki
from p2porch.common.errors import CodecError
from p2porch.common.tls import TlsContexts, TlsError, TlsMaterial, require_role
from p2porch.consensus.errors import NotLeader, ProposalDropped
from p2porch.consensus.kv import (
    KvCas,
    KvCommand,
    KvDelete,
    KvGet,
    KvOp,
    KvPut,
    KvResult,
    KvStateMachine,
)
from p2porch.consensus.messages import Membership, Status
from p2porch.consensus.service import (
    ProposalLost,
    RaftService,
    RequestTimeout,
    ServiceConfig,
    ServiceStopped,
)
from p2porch.consensus.storage import Storage, StorageError
from p2porch.consensus.transport import (
    FrameError,
    FrameReader,
    TcpTransport,
    TlsTransport,
    Transport,
    TransportError,
    encode_frame,
)

__all__ = [
    "KvClient",
    "KvReadRequest",
    "KvRequest",
    "KvResponse",
    "KvStatusRequest",
    "LocalCluster",
    "main",
    "write_tls_dir",
]

log = logging.getLogger("p2porch.consensus.node_main")

MAX_CLIENT_FRAME_BYTES = 4 << 20
MAX_INFLIGHT_PER_CONNECTION = 256


@codec.register(70)
@attrs.frozen
class KvRequest:
    req_id: int
    command: KvCommand


@codec.register(71)
@attrs.frozen
class KvReadRequest:
    req_id: int
    key: str


@codec.register(72)
@attrs.frozen
class KvStatusRequest:
    req_id: int


@codec.register(73)
@attrs.frozen
class KvResponse:
    """``result`` on success; otherwise ``error`` says why and what a client may do:
    ``not_leader`` (go to ``leader_hint``), ``retry`` (safe to resend as is), ``unknown``
    (the write may or may not have happened: resend the SAME command to find out)."""

    req_id: int
    result: KvResult | None = None
    value: bytes | None = None
    error: str | None = None
    not_leader: bool = False
    leader_hint: str | None = None
    retry: bool = False
    unknown: bool = False
    status: Status | None = None


ClientMessage = KvRequest | KvReadRequest | KvStatusRequest


# --------------------------------------------------------------------------- server


class KvServer:
    """Serves the client protocol for one node."""

    def __init__(self, service: RaftService, machine: KvStateMachine) -> None:
        self.service = service
        self.machine = machine
        self.bad_requests = 0

    async def handle(self, stream: trio.abc.Stream) -> None:
        reader = FrameReader(stream, MAX_CLIENT_FRAME_BYTES)
        send_lock = trio.Lock()
        limit = trio.Semaphore(MAX_INFLIGHT_PER_CONNECTION)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    payload = await reader.receive()
                except FrameError:
                    self.bad_requests += 1
                    break
                if payload is None:
                    break
                try:
                    request: ClientMessage = codec.decode(payload, ClientMessage)
                except CodecError:
                    self.bad_requests += 1
                    break
                await limit.acquire()
                nursery.start_soon(self._serve_one, stream, send_lock, limit, request)

    async def _serve_one(
        self,
        stream: trio.abc.Stream,
        send_lock: trio.Lock,
        limit: trio.Semaphore,
        request: ClientMessage,
    ) -> None:
        try:
            response = await self._answer(request)
            async with send_lock:
                await stream.send_all(encode_frame(codec.encode(response)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            limit.release()

    async def _answer(self, request: ClientMessage) -> KvResponse:
        rid = request.req_id
        service = self.service
        try:
            if isinstance(request, KvStatusRequest):
                return KvResponse(rid, status=service.status())
            if isinstance(request, KvReadRequest):
                await service.read_barrier()
                value = self.machine.get(request.key)
                return KvResponse(rid, result=KvResult(ok=value is not None), value=value)
            result = await service.propose(codec.encode(request.command))
            if not isinstance(result, KvResult):
                return KvResponse(rid, error="state machine returned no result")
            return KvResponse(rid, result=result)
        except NotLeader as exc:
            return KvResponse(rid, error=str(exc), not_leader=True, leader_hint=exc.leader_hint)
        except (ProposalDropped, ProposalLost) as exc:
            return KvResponse(rid, error=str(exc), retry=True)
        except RequestTimeout as exc:
            return KvResponse(rid, error=str(exc), unknown=True)
        except ServiceStopped as exc:
            return KvResponse(rid, error=str(exc), unknown=True)


# --------------------------------------------------------------------------- client


class KvClientError(Exception):
    """The cluster did not answer in time (the outcome of a write is unknown)."""


class KvClient:
    """A client session: leader-following, exactly-once writes by (client_id, seq).

    One request at a time per client (sessions require increasing sequence numbers with one
    outstanding command). Use several clients for concurrency.
    """

    def __init__(
        self,
        addresses: dict[str, str],
        client_id: str,
        *,
        transport: Transport | None = None,
        timeout_s: float = 10.0,
        attempt_timeout_s: float = 2.0,
    ) -> None:
        if not addresses:
            raise ValueError("need at least one node address")
        self.addresses = dict(addresses)
        self.client_id = client_id
        self.transport = transport or TcpTransport(connect_timeout_s=1.0)
        self.timeout_s = timeout_s
        self.attempt_timeout_s = attempt_timeout_s
        self._seq = 0
        self._req_ids = itertools.count(1)
        self._streams: dict[str, tuple[trio.abc.Stream, FrameReader]] = {}
        self._target = sorted(self.addresses)[0]
        self._rng = random.Random(client_id)

    async def aclose(self) -> None:
        for stream, _ in self._streams.values():
            with contextlib.suppress(Exception):
                await stream.aclose()
        self._streams.clear()

    async def __aenter__(self) -> KvClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def put(self, key: str, value: bytes) -> KvResult:
        return await self.command(KvPut(key, value))

    async def delete(self, key: str) -> KvResult:
        return await self.command(KvDelete(key))

    async def cas(self, key: str, expected: bytes | None, value: bytes) -> KvResult:
        return await self.command(KvCas(key, expected, value))

    async def get_via_log(self, key: str) -> KvResult:
        return await self.command(KvGet(key))

    async def command(self, op: KvOp) -> KvResult:
        """Run one command exactly once (retries reuse its sequence number)."""
        self._seq += 1
        command = KvCommand(self.client_id, self._seq, op)
        response = await self._request(lambda rid: KvRequest(rid, command))
        if response.result is None:
            raise KvClientError(f"no result: {response.error}")
        return response.result

    async def get(self, key: str) -> bytes | None:
        """Linearizable read (ReadIndex on the leader)."""
        response = await self._request(lambda rid: KvReadRequest(rid, key))
        return response.value

    async def status(self, node_id: str) -> Status | None:
        rid = next(self._req_ids)
        with trio.move_on_after(self.attempt_timeout_s):
            try:
                response = await self._exchange(node_id, KvStatusRequest(rid))
                return response.status
            except (TransportError, OSError, trio.BrokenResourceError, FrameError, CodecError):
                await self._drop(node_id)
        return None

    async def _request(self, build: Callable[[int], ClientMessage]) -> KvResponse:
        with trio.move_on_after(self.timeout_s):
            delay = 0.02
            while True:
                node = self._target
                rid = next(self._req_ids)
                response: KvResponse | None = None
                with trio.move_on_after(self.attempt_timeout_s):
                    try:
                        response = await self._exchange(node, build(rid))
                    except (TransportError, OSError, trio.BrokenResourceError, FrameError):
                        await self._drop(node)
                    except CodecError:
                        await self._drop(node)
                if response is None:
                    await self._drop(node)
                    self._target = self._other(node)
                elif (
                    response.result is not None
                    or response.value is not None
                    or response.error is None
                ):
                    return response
                elif response.not_leader:
                    hint = response.leader_hint
                    if hint in self.addresses and hint != node:
                        self._target = hint
                        continue
                    self._target = self._other(node)
                # retry / unknown / no leader yet: back off a little, resend the same command
                await trio.sleep(delay * (0.5 + self._rng.random()))
                delay = min(delay * 2, 0.5)
        raise KvClientError(f"no answer within {self.timeout_s}s")

    def _other(self, node: str) -> str:
        others = sorted(n for n in self.addresses if n != node)
        return self._rng.choice(others) if others else node

    async def _exchange(self, node: str, request: ClientMessage) -> KvResponse:
        if node not in self._streams:
            stream = await self.transport.connect(self.addresses[node])
            self._streams[node] = (stream, FrameReader(stream, MAX_CLIENT_FRAME_BYTES))
        stream, reader = self._streams[node]
        await stream.send_all(encode_frame(codec.encode(request)))
        while True:
            payload = await reader.receive()
            if payload is None:
                raise TransportError(f"{node} closed the connection")
            response: KvResponse = codec.decode(payload, KvResponse)
            if response.req_id == request.req_id:
                return response
            # an answer to an abandoned earlier attempt: skip it

    async def _drop(self, node: str) -> None:
        entry = self._streams.pop(node, None)
        if entry is not None:
            with contextlib.suppress(Exception):
                await entry[0].aclose()


# --------------------------------------------------------------------------- launcher


def free_port(hosts: Sequence[str], rng: random.Random | None = None) -> int:
    """A TCP port free on every host (and port+1 too: Raft and client ports side by side)."""
    pick = rng or random.Random()
    for _ in range(200):
        port = pick.randrange(20_000, 60_000, 2)
        try:
            for host in hosts:
                for candidate in (port, port + 1):
                    with socket.socket() as sock:
                        sock.bind((host, candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair found")


class LocalCluster:
    """Real node processes on loopback addresses, for integration tests and benchmarks.

    Node ``i`` listens on ``hosts[i]:port`` (Raft) and ``hosts[i]:port+1`` (clients). Killing
    is ``SIGKILL`` (what a power cut does to a process); data directories survive restarts.
    """

    def __init__(
        self,
        root: Path,
        ids: Sequence[str] = ("a", "b", "c"),
        hosts: Sequence[str] = ("127.0.0.2", "127.0.0.3", "127.0.0.4"),
        *,
        preset: str = "local",
        snapshot_every: int = 10_000,
        log_level: str = "WARNING",
        extra_args: Sequence[str] = (),
        tls: bool = False,
    ) -> None:
        """``tls``: Raft peer traffic over mutual TLS (certificates made in ``root/tls``)."""
        if len(ids) != len(hosts):
            raise ValueError("one host per node id")
        self.root = root
        self.ids = tuple(ids)
        self.port = free_port(hosts)
        self.raft = {n: f"{h}:{self.port}" for n, h in zip(ids, hosts, strict=True)}
        self.clients = {n: f"{h}:{self.port + 1}" for n, h in zip(ids, hosts, strict=True)}
        self.preset = preset
        self.snapshot_every = snapshot_every
        self.log_level = log_level
        self.extra_args = tuple(extra_args)
        if tls:
            self.tls_dir: Path | None = root / "tls"
            write_tls_dir(self.tls_dir, dict(zip(ids, hosts, strict=True)))
            self.extra_args += ("--tls", str(self.tls_dir))
        else:
            self.tls_dir = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts = 0

    def data_dir(self, node_id: str) -> Path:
        return self.root / f"data-{node_id}"

    async def start(self, node_id: str, timeout_s: float = 20.0) -> None:
        """Start (or restart) a node and wait for its READY line."""
        self.starts += 1
        out = self.root / f"{node_id}.{self.starts}.out"
        err = self.root / f"{node_id}.{self.starts}.err"
        argv = [
            sys.executable,
            "-m",
            "p2porch.consensus.node_main",
            "--id",
            node_id,
            "--listen",
            self.raft[node_id],
            "--client",
            self.clients[node_id],
            "--peers",
            ",".join(f"{n}={a}" for n, a in self.raft.items()),
            "--data-dir",
            str(self.data_dir(node_id)),
            "--bootstrap",
            ",".join(self.ids),
            "--preset",
            self.preset,
            "--snapshot-every",
            str(self.snapshot_every),
            "--log-level",
            self.log_level,
            *self.extra_args,
        ]
        env = dict(os.environ)
        project_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = project_root + os.pathsep + env.get("PYTHONPATH", "")
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env)
        self.procs[node_id] = proc
        with trio.fail_after(timeout_s):
            while b"READY" not in out.read_bytes():
                if proc.poll() is not None:
                    raise RuntimeError(f"node {node_id} exited: {err.read_text()[-2000:]}")
                await trio.sleep(0.02)

    async def start_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for node_id in self.ids:
                nursery.start_soon(self.start, node_id)

    def kill9(self, node_id: str) -> None:
        proc = self.procs.pop(node_id, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop_all(self) -> None:
        """SIGKILL everything this cluster started (safe to call twice)."""
        for node_id in list(self.procs):
            self.kill9(node_id)

    def running(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    async def leader(self, timeout_s: float = 10.0) -> str | None:
        """The node id every running node agrees leads, or None on timeout."""
        with trio.move_on_after(timeout_s):
            async with KvClient(self.clients, "probe", attempt_timeout_s=0.5) as client:
                while True:
                    views = [await client.status(n) for n in self.running()]
                    leaders = {v.leader_id for v in views if v is not None}
                    if len(leaders) == 1 and None not in leaders and all(views):
                        return leaders.pop()
                    await trio.sleep(0.05)
        return None


# --------------------------------------------------------------------------- process


def _parse_peers(text: str) -> dict[str, str]:
    peers: dict[str, str] = {}
    for item in filter(None, text.split(",")):
        node_id, sep, address = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"peer must be id=host:port, got {item!r}")
        peers[node_id] = address
    return peers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m p2porch.consensus.node_main")
    parser.add_argument("--id", required=True)
    parser.add_argument("--listen", required=True, help="Raft address host:port")
    parser.add_argument("--client", required=True, help="client protocol address host:port")
    parser.add_argument("--peers", type=_parse_peers, default={}, help="id=host:port,...")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument(
        "--bootstrap", default="", help="voter ids of a NEW cluster (ignored if data exists)"
    )
    parser.add_argument("--preset", choices=["local", "lan", "wan"], default="local")
    parser.add_argument("--snapshot-every", type=int, default=10_000)
    parser.add_argument(
        "--leader-parallel-append",
        action="store_true",
        help="leader sends AppendEntries before its own fsync (Raft thesis 10.2.1)",
    )
    parser.add_argument(
        "--tls",
        metavar="DIR",
        help="mutual TLS for Raft peer traffic: DIR holds ca.pem, <id>.pem, <id>.key "
        "(the client port stays plain)",
    )
    parser.add_argument("--log-level", default="WARNING")
    return parser


def write_tls_dir(directory: Path, nodes: dict[str, str]) -> None:
    """A throw-away cluster CA and one node certificate per ``{id: host}`` (SAN = host).

    For tests and benchmarks only: the CA key is not kept (nothing more can be issued), and
    node keys are written 0600.
    """
    now = pki.utcnow()
    ca = pki.CertificateAuthority.create("node-main", now)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(pki.cert_pem(ca.cert))
    for node_id, host in nodes.items():
        key = pki.generate_key()
        cert = ca.issue(key.public_key(), node_id, pki.ROLE_NODE, now, addresses=(host,))
        key_path = directory / f"{node_id}.key"
        key_path.touch(mode=0o600)
        key_path.write_bytes(pki.key_pem(key))
        (directory / f"{node_id}.pem").write_bytes(pki.cert_pem(cert))


def _make_tls_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m p2porch.consensus.node_main make-tls",
        description="write ca.pem and <id>.pem/<id>.key for each node into DIR",
    )
    parser.add_argument("dir", type=Path)
    parser.add_argument("nodes", nargs="+", metavar="ID=HOST")
    args = parser.parse_args(argv)
    nodes: dict[str, str] = {}
    for item in args.nodes:
        node_id, sep, host = item.partition("=")
        if not sep or not node_id or not host:
            parser.error(f"expected ID=HOST, got {item!r}")
        nodes[node_id] = host
    try:
        write_tls_dir(args.dir, nodes)
    except (OSError, pki.PkiError) as exc:
        print(f"make-tls: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.dir}/ca.pem and certificates for {', '.join(nodes)}")
    return 0


def peer_transport(args: argparse.Namespace) -> Transport:
    """Plain TCP, or (``--tls``) mutual TLS admitting only node certificates of our peers."""
    if not args.tls:
        return TcpTransport()
    where = Path(args.tls)
    material = TlsMaterial.from_files(
        where / "ca.pem", where / f"{args.id}.pem", where / f"{args.id}.key"
    )
    members = frozenset(args.peers) | {args.id}
    nodes_only = require_role(pki.ROLE_NODE)

    def authorize(peer: pki.PeerIdentity) -> str | None:
        if peer.name not in members:
            return f"{peer.name} is not one of the configured peers"
        return nodes_only(peer)

    return TlsTransport(TcpTransport(), TlsContexts.build(material), authorize)


async def run_node(args: argparse.Namespace) -> None:
    presets = {"local": ServiceConfig.local, "lan": ServiceConfig.lan, "wan": ServiceConfig.wan}
    base = presets[args.preset]()
    config = attrs.evolve(
        base,
        snapshot_every_entries=args.snapshot_every,
        leader_parallel_append=args.leader_parallel_append,
    )
    storage = Storage.open(args.data_dir)
    machine = KvStateMachine()
    voters = frozenset(filter(None, args.bootstrap.split(",")))
    service = RaftService(
        args.id,
        config=config,
        storage=storage,
        state_machine=machine,
        transport=peer_transport(args),
        listen=args.listen,
        peers=args.peers,
        bootstrap=Membership(voters) if voters else None,
    )
    server = KvServer(service, machine)
    failure: list[StorageError] = []

    async def run_service(task_status: trio.TaskStatus[str]) -> None:
        # A storage failure stops the whole process (never keep serving clients on a node
        # that can no longer persist); it is re-raised below, outside the nursery.
        try:
            await service.run(task_status=task_status)
        except StorageError as exc:
            failure.append(exc)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        raft_address = await nursery.start(run_service)
        client_address = await nursery.start(TcpTransport().serve, args.client, server.handle)
        print(f"READY {raft_address} {client_address}", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    if failure:
        raise failure[0]


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["make-tls"]:
        return _make_tls_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    code = 0
    try:
        trio.run(run_node, args)
    except* StorageError as group:
        print(f"FATAL storage error: {_first_leaf(group)}", file=sys.stderr, flush=True)
        code = 3
    except* (TransportError, TlsError, pki.PkiError) as group:
        print(f"FATAL: {_first_leaf(group)}", file=sys.stderr, flush=True)
        code = 2
    return code


if __name__ == "__main__":
    sys.exit(main())
