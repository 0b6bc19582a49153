"""Write throughput and latency of the p2porch Raft KV vs etcd 3.4, side by side in one run.

Run from the repository root (needs root for apt-get if etcd is missing)::

    python3 -m benchmarks.raft_bench [--seconds 3] [--rounds 2] [--clients 1,16,64] [--skip-etcd]

Three clusters of 3 real processes each on loopback, data directories in a temp dir, fsync on
(the default of both systems): p2porch in the contract's order "persist, THEN send"
(127.0.0.2-4), p2porch with ``--leader-parallel-append`` (127.0.0.5-7, Raft thesis 10.2.1:
the leader's fsync overlaps its followers'), and etcd 3.4 from Debian (127.0.0.12-14).

All are driven by THIS Python process with trio at the same concurrency: each of N client
tasks issues one put at a time (256-byte values, keys spread over 1000 names); every request's
latency is recorded after a warm-up. The rounds are INTERLEAVED (A, B, C, A, B, C ...) and
merged, so background load on a shared machine hits every system alike. Ours: the framed
client protocol (``KvClient``, one TCP connection per client, to the leader). etcd: its v3 JSON
gRPC gateway over HTTP/1.1 (a minimal keep-alive HTTP client on trio streams, one connection
per client, to the leader; httpx only finds the leader). So the Python driver's per-request
overhead is similar on both sides; the cores are shared by the driver and the clusters.

Targets (recorded, not asserted): writes/s at 64 clients >= 50% of etcd's; p50 at 1 client
<= 2x etcd's. Everything started is killed at the end; traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import httpx
import trio

from p2porch.consensus.node_main import KvClient, LocalCluster, free_port

VALUE = b"x" * 256
KEYSPACE = 1000
ETCD_HOSTS = ("127.0.0.12", "127.0.0.13", "127.0.0.14")


@attrs.frozen
class Figures:
    clients: int
    writes: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def per_s(self) -> float:
        return self.writes / self.seconds if self.seconds else 0.0


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


PutFactory = Callable[[int], Awaitable[Callable[[str], Awaitable[None]]]]


@attrs.define
class Samples:
    """Latencies and errors of one system at one concurrency, merged over rounds."""

    clients: int
    latencies: list[float] = attrs.field(factory=list)
    seconds: float = 0.0
    errors: int = 0

    def figures(self) -> Figures:
        ordered = sorted(self.latencies)
        return Figures(
            clients=self.clients,
            writes=len(ordered),
            seconds=self.seconds,
            p50_ms=percentile(ordered, 0.50) * 1000,
            p99_ms=percentile(ordered, 0.99) * 1000,
            errors=self.errors,
        )


async def drive(
    make_put: PutFactory, clients: int, seconds: float, warmup_s: float, into: Samples
) -> None:
    """N tasks doing one put at a time; latencies counted after the warm-up."""
    start = trio.current_time()
    measure_from = start + warmup_s
    stop_at = measure_from + seconds

    async def worker(i: int) -> None:
        put = await make_put(i)
        n = 0
        while True:
            now = trio.current_time()
            if now >= stop_at:
                return
            n += 1
            key = f"k{(i * 7919 + n) % KEYSPACE}"
            t0 = time.perf_counter()
            try:
                await put(key)
            except Exception:
                into.errors += 1
                continue
            if now >= measure_from:
                into.latencies.append(time.perf_counter() - t0)

    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(worker, i)
    into.seconds += seconds


class System:
    """One cluster under test: started once, driven in several interleaved rounds."""

    name = ""

    async def start(self) -> None:
        raise NotImplementedError

    async def clients(self, count: int, round_no: int) -> tuple[PutFactory, list[object]]:
        raise NotImplementedError

    async def close(self, opened: list[object]) -> None:
        for client in opened:
            aclose = getattr(client, "aclose", None)
            if aclose is not None:
                await aclose()

    def stop(self) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- p2porch


class P2porchSystem(System):
    def __init__(self, root: Path, hosts: tuple[str, ...], parallel: bool) -> None:
        self.name = "p2porch+parallel" if parallel else "p2porch"
        where = root / self.name
        where.mkdir()
        extra = ("--leader-parallel-append",) if parallel else ()
        self.cluster = LocalCluster(where, hosts=hosts, extra_args=extra)
        self.leader: str | None = None

    async def start(self) -> None:
        await self.cluster.start_all()
        self.leader = await self.cluster.leader(timeout_s=15)
        if self.leader is None:
            raise RuntimeError("p2porch cluster elected no leader")

    async def clients(self, count: int, round_no: int) -> tuple[PutFactory, list[object]]:
        opened: list[object] = []

        async def make_put(i: int) -> Callable[[str], Awaitable[None]]:
            client = KvClient(self.cluster.clients, f"bench-{count}-{round_no}-{i}")
            if self.leader is not None:
                client._target = self.leader  # start at the leader, as etcd's client does
            opened.append(client)

            async def put(key: str) -> None:
                result = await client.put(key, VALUE)
                if not result.ok:
                    raise RuntimeError("put failed")

            return put

        return make_put, opened

    def stop(self) -> None:
        self.cluster.stop_all()


# --------------------------------------------------------------------------- etcd


def ensure_etcd() -> str:
    path = shutil.which("etcd")
    if path is None:
        print("etcd not found: apt-get install -y etcd-server etcd-client", flush=True)
        subprocess.run(
            ["apt-get", "install", "-y", "etcd-server", "etcd-client"],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            stdout=subprocess.DEVNULL,
        )
        path = shutil.which("etcd")
        if path is None:
            raise RuntimeError("etcd still not installed")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, check=True)
    print(version.stdout.splitlines()[0], flush=True)
    return path


class RawHttpClient:
    """A minimal HTTP/1.1 keep-alive client on a trio stream.

    Why not httpx: its per-request CPU cost in this Python driver (~1 ms) would be measured
    as etcd latency and would cap etcd's throughput; this client costs about what our own
    framed client does, so the driver overhead is the same on both sides.
    """

    def __init__(self, url: str) -> None:
        hostport = url.removeprefix("http://")
        host, _, port = hostport.partition(":")
        self.host = host
        self.port = int(port)
        self.stream: trio.SocketStream | None = None
        self.buffer = bytearray()

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None

    async def _fill(self) -> None:
        assert self.stream is not None
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buffer += chunk

    async def post(self, path: str, body: bytes) -> bytes:
        if self.stream is None:
            self.stream = await trio.open_tcp_stream(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        await self.stream.send_all(head.encode() + body)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        lines = bytes(self.buffer[:end]).split(b"\r\n")
        del self.buffer[: end + 4]
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            length = int(headers[b"content-length"])
            while len(self.buffer) < length:
                await self._fill()
            payload = bytes(self.buffer[:length])
            del self.buffer[:length]
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            payload = b""
            while True:
                while (eol := self.buffer.find(b"\r\n")) < 0:
                    await self._fill()
                size = int(bytes(self.buffer[:eol]).split(b";")[0], 16)
                del self.buffer[: eol + 2]
                while len(self.buffer) < size + 2:
                    await self._fill()
                payload += bytes(self.buffer[:size])
                del self.buffer[: size + 2]
                if size == 0:
                    break
        else:
            raise ConnectionError("response without length")
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {payload[:200]!r}")
        return payload


class EtcdCluster:
    def __init__(self, root: Path, binary: str) -> None:
        self.root = root
        self.binary = binary
        self.port = free_port(ETCD_HOSTS)
        self.names = [f"e{i}" for i in range(len(ETCD_HOSTS))]
        self.client_urls = {
            n: f"http://{h}:{self.port}" for n, h in zip(self.names, ETCD_HOSTS, strict=True)
        }
        self.peer_urls = {
            n: f"http://{h}:{self.port + 1}" for n, h in zip(self.names, ETCD_HOSTS, strict=True)
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        initial = ",".join(f"{n}={u}" for n, u in self.peer_urls.items())
        for name in self.names:
            log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            self.procs.append(
                subprocess.Popen(
                    [
                        self.binary,
                        "--name", name,
                        "--data-dir", str(self.root / name),
                        "--listen-client-urls", self.client_urls[name],
                        "--advertise-client-urls", self.client_urls[name],
                        "--listen-peer-urls", self.peer_urls[name],
                        "--initial-advertise-peer-urls", self.peer_urls[name],
                        "--initial-cluster", initial,
                        "--initial-cluster-state", "new",
                        "--initial-cluster-token", "p2porch-bench",
                        "--logger", "zap",
                        "--log-level", "error",
                    ],
                    stdout=log,
                    stderr=log,
                )
            )  # fmt: skip

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.procs.clear()

    async def leader_url(self, timeout_s: float = 20.0) -> str:
        with trio.fail_after(timeout_s):
            async with httpx.AsyncClient(timeout=1.0) as http:
                while True:
                    for url in self.client_urls.values():
                        try:
                            reply = await http.post(f"{url}/v3/maintenance/status", json={})
                            body = reply.json()
                        except (httpx.HTTPError, ValueError):
                            continue
                        member = body.get("header", {}).get("member_id")
                        if member is not None and member == body.get("leader"):
                            return url
                    await trio.sleep(0.1)


class EtcdSystem(System):
    name = "etcd 3.4"

    def __init__(self, root: Path, binary: str) -> None:
        where = root / "etcd"
        where.mkdir()
        self.cluster = EtcdCluster(where, binary)
        self.leader = ""
        self.encoded_value = base64.b64encode(VALUE).decode()

    async def start(self) -> None:
        self.cluster.start()
        self.leader = await self.cluster.leader_url()

    async def clients(self, count: int, round_no: int) -> tuple[PutFactory, list[object]]:
        opened: list[object] = []

        async def make_put(i: int) -> Callable[[str], Awaitable[None]]:
            http = RawHttpClient(self.leader)
            opened.append(http)

            async def put(key: str) -> None:
                body = {"key": base64.b64encode(key.encode()).decode(), "value": self.encoded_value}
                await http.post("/v3/kv/put", json.dumps(body).encode())

            return put

        return make_put, opened

    def stop(self) -> None:
        self.cluster.stop()


# --------------------------------------------------------------------------- report


def report(variants: dict[str, list[Figures]], etcd: list[Figures] | None) -> None:
    header = (
        f"{'clients':>7} | {'system':<17} | {'writes/s':>9} | {'p50 ms':>7} | {'p99 ms':>7} | err"
    )
    print(header)
    print("-" * len(header))
    names = list(variants)
    for index, count in enumerate(f.clients for f in variants[names[0]]):
        rows = [(name, variants[name][index]) for name in names]
        if etcd is not None:
            rows.append(("etcd 3.4", etcd[index]))
        for name, fig in rows:
            print(
                f"{count:>7} | {name:<17} | {fig.per_s:>9.0f} | {fig.p50_ms:>7.2f} | "
                f"{fig.p99_ms:>7.2f} | {fig.errors}"
            )
        if etcd is not None:
            other = etcd[index]
            for name in names:
                mine = variants[name][index]
                print(
                    f"{'':>7} | {'ratio ' + name:<17} | {mine.per_s / other.per_s:>8.2f}x | "
                    f"{mine.p50_ms / other.p50_ms:>6.2f}x | {mine.p99_ms / other.p99_ms:>6.2f}x |"
                )
    if etcd is None:
        return
    etcd_by = {f.clients: f for f in etcd}
    for name in names:
        ours = {f.clients: f for f in variants[name]}
        if 64 in ours:
            ratio = ours[64].per_s / etcd_by[64].per_s
            verdict = "meets" if ratio >= 0.5 else "misses"
            print(f"[{name}] target writes/s@64 >= 50% of etcd: {ratio:.0%} ({verdict})")
        if 1 in ours:
            ratio = ours[1].p50_ms / etcd_by[1].p50_ms
            verdict = "meets" if ratio <= 2 else "misses"
            print(f"[{name}] target p50@1 <= 2x etcd: {ratio:.2f}x ({verdict})")


async def run(args: argparse.Namespace) -> None:
    counts = [int(c) for c in args.clients.split(",")]
    binary = None if args.skip_etcd else ensure_etcd()
    with tempfile.TemporaryDirectory(prefix="raft-bench-") as tmp:
        root = Path(tmp)
        systems: list[System] = [
            P2porchSystem(root, ("127.0.0.2", "127.0.0.3", "127.0.0.4"), parallel=False),
            P2porchSystem(root, ("127.0.0.5", "127.0.0.6", "127.0.0.7"), parallel=True),
        ]
        if binary is not None:
            systems.append(EtcdSystem(root, binary))
        samples = {(sys_.name, c): Samples(c) for sys_ in systems for c in counts}
        try:
            for system in systems:
                await system.start()
            print(
                f"{len(systems)} clusters of 3 processes up; {args.rounds} interleaved rounds of "
                f"{args.seconds}s (+{args.warmup}s warm-up) per system and concurrency",
                flush=True,
            )
            for count in counts:
                for round_no in range(args.rounds):
                    for system in systems:
                        make_put, opened = await system.clients(count, round_no)
                        await drive(
                            make_put, count, args.seconds, args.warmup, samples[system.name, count]
                        )
                        await system.close(opened)
        finally:
            for system in systems:
                system.stop()
    variants = {
        s.name: [samples[s.name, c].figures() for c in counts]
        for s in systems
        if isinstance(s, P2porchSystem)
    }
    etcd = [samples["etcd 3.4", c].figures() for c in counts] if binary is not None else None
    report(variants, etcd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--skip-etcd", action="store_true")
    args = parser.parse_args()
    if args.seconds <= 0 or args.seconds > 60 or not 1 <= args.rounds <= 10:
        sys.exit("--seconds must be in (0, 60] and --rounds in [1, 10]")
    trio.run(run, args)


if __name__ == "__main__":
    main()
