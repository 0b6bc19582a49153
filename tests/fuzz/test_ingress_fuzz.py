"""Fuzz the HTTP ingress (node.ingress) over real loopback sockets.

One real :class:`Ingress` (one catch-all rule, one replica) and one recording h11 backend run
for the whole module in a trio loop on a background thread, so hypothesis drives plain sync
tests and every example meets the same long-lived ingress (parked upstream connections,
balancer state and all). Each example is one client connection carrying a mutated valid
request (seeds: keep-alive GET, Content-Length POST, chunked POST, websocket upgrade,
pipelined requests, Expect: 100-continue) or random bytes. Contract after every example:

- the answer is empty (the ingress may hang up) or starts with ``HTTP/1.1 ``;
- no exception escaped the ingress's tasks (the harness's nursery would end and say why) and
  nothing was logged at ERROR or above by a ``p2porch`` logger;
- a fresh well-formed GET through the same ingress still gets the backend's 200;
- request smuggling guard: the backend (a strict h11 server) never hits a framing error
  mid-stream, never sees CR/LF/NUL in a request line or header, never sees both
  Content-Length and Transfer-Encoding or two Hosts, and never sees more requests than the
  ingress parsed from its clients.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import h11
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from p2porch.node.ingress import Ingress, IngressConfig

from ..shell.ingress.kit import HOST, table_for, web_rule

T = TypeVar("T")
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
READ_CAP_S = 5.0  # the longest wait for one answer (a half-closed client is answered at once)
QUIET_S = 0.15  # a client that keeps its side open stops reading after this much silence
LIMIT_S = 20.0  # generous bound on the health check and on harness start/stop
FORBIDDEN = (b"\r", b"\n", b"\x00")

SEEDS: tuple[bytes, ...] = (
    b"GET /page?q=1 HTTP/1.1\r\nHost: fuzz.test\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n",
    b"POST /submit HTTP/1.1\r\nHost: fuzz.test\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 11\r\n\r\nhello world",
    b"POST /upload HTTP/1.1\r\nHost: fuzz.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: fuzz.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    b"\x81\x05hello",
    b"GET /one HTTP/1.1\r\nHost: fuzz.test\r\n\r\n"
    b"POST /two HTTP/1.1\r\nHost: fuzz.test\r\nContent-Length: 3\r\n\r\nabc"
    b"GET /three HTTP/1.1\r\nHost: fuzz.test\r\n\r\n",
    b"PUT /expect HTTP/1.1\r\nHost: fuzz.test\r\nExpect: 100-continue\r\n"
    b"Content-Length: 4\r\n\r\nbody",
)
# Status lines each seed gets, in order, and what the backend sees (method, target, body).
SEED_STATUSES: tuple[tuple[bytes, ...], ...] = (
    (b"200",),
    (b"200",),
    (b"200",),
    (b"101",),
    (b"200", b"200", b"200"),
    (b"100", b"200"),
)
SEED_REQUESTS: tuple[tuple[tuple[bytes, bytes, bytes], ...], ...] = (
    ((b"GET", b"/page?q=1", b""),),
    ((b"POST", b"/submit", b"hello world"),),
    ((b"POST", b"/upload", b"hello world"),),
    ((b"GET", b"/ws", b""),),
    ((b"GET", b"/one", b""), (b"POST", b"/two", b"abc"), (b"GET", b"/three", b"")),
    ((b"PUT", b"/expect", b"body"),),
)

# Whole header lines slipped into a head: injections, lies about framing, obfuscations.
HEADER_LINES: tuple[bytes, ...] = (
    b"X-A: b\rInjected: 1\r\n",
    b"X-A: b\nInjected: 1\r\n",
    b"X-A: b\r\nInjected: 1\n",
    b"X-\x00: v\r\n",
    b"X-A: v\x00w\r\n",
    b"X A: v\r\n",
    b" folded: continuation\r\n",
    b"\tfolded\r\n",
    b"X-A:\tv \r\n",
    b": empty-name\r\n",
    b"Host: evil.test\r\n",
    b"Content-Length: 99999999999999999999\r\n",
    b"Content-Length: 18446744073709551617\r\n",
    b"Content-Length: 4294967296\r\n",
    b"Content-Length: -1\r\n",
    b"Content-Length: +5\r\n",
    b"Content-Length: 5, 6\r\n",
    b"Content-Length: 0x10\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: 0\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked, identity\r\n",
    b"Transfer-Encoding: identity, chunked\r\n",
    b"Transfer-Encoding : chunked\r\n",
    b"Transfer-Encoding: \x0bchunked\r\n",
    b"Transfer-Encoding: xchunked\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
    b"Connection: close, content-length, host\r\n",
    b"Connection: transfer-encoding\r\n",
    b"Connection: Upgrade\r\nUpgrade: websocket\r\n",
    b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n",
    b"Expect: 100-continue\r\n",
    b"Proxy: http://evil.test\r\n",
    b"X-Forwarded-For: 1.2.3.4\r\n",
    b"Forwarded: for=evil\r\n",
    b"X-Long: " + b"a" * 5000 + b"\r\n",
)
BYTES: tuple[bytes, ...] = (
    b"\r",
    b"\n",
    b"\x00",
    b"\r\n",
    b"\r\n\r\n",
    b" ",
    b":",
    b"\x7f",
    b"\xff",
)
LENGTHS: tuple[bytes, ...] = (
    b"99999999999999999999",
    b"999999999999999999999999",
    b"18446744073709551616",
    b"2147483648",
    b"-1",
    b"+5",
    b" 5 ",
    b"5, 6",
    b"5,5",
    b"1e3",
    b"0",
    b"00",
    b"",
)
CHUNK_SIZES: tuple[bytes, ...] = (
    b"ffffffffffffffffffffffff",
    b"fffffffffffffffe",
    b"7fffffffffffffff",
    b"-1",
    b"0x5",
    b"5;ext=\x00",
    b"5 ",
    b" 5",
    b"5;" + b"e" * 300,
    b"1" * 100,
    b"",
    b"g",
)
METHODS: tuple[bytes, ...] = (
    b"HEAD",
    b"OPTIONS",
    b"CONNECT",
    b"TRACE",
    b"DELETE",
    b"PATCH",
    b"get",
    b"G\x00T",
    b"GET GET",
    b"",
)
TARGETS: tuple[bytes, ...] = (
    b"*",
    b"http://evil.test/x?y",
    b"http://user:pw@fuzz.test:8080/a",
    b"http://[::1",
    b"http://[::1]:80/",
    b"https:///nohost",
    b"fuzz.test:443",
    b"//double/slash",
    b"/a#frag",
    b"/%00%0d%0a",
    b"/a?x=\x7f",
    b"/" + b"p" * 3000,
    b"",
)
VERSIONS: tuple[bytes, ...] = (
    b"HTTP/1.0",
    b"HTTP/2.0",
    b"HTTP/0.9",
    b"HTTP/1.10",
    b"http/1.1",
    b"HTTP/1.1 extra",
    b"",
)
EDITS = (
    "flip",
    "set",
    "truncate",
    "delete",
    "duplicate",
    "header",
    "byte",
    "length",
    "chunk",
    "pipeline",
    "splice",
    "method",
    "target",
    "version",
)
Edit = tuple[str, int, int]
# Mostly the client half-closes after sending (so the ingress ends the exchange at once);
# sometimes it keeps its side open and stops reading after QUIET_S of silence.
HALF_CLOSE = st.sampled_from((True, True, True, False))
CUT = st.sampled_from((0, 0, 0, 1, 5, 64))  # 0: one write, else writes of this many bytes
EDIT = st.tuples(st.sampled_from(EDITS), st.integers(0, 1 << 16), st.integers(0, 255))


def _head_end(data: bytes) -> int:
    end = data.find(b"\r\n\r\n")
    return len(data) if end == -1 else end + 2


def apply_edit(data: bytes, edit: Edit) -> bytes:
    """One edit of a request; ``pos`` and ``arg`` are reduced modulo what they index."""
    op, pos, arg = edit
    buf = bytearray(data)
    at = pos % (len(buf) + 1)
    one = min(at, len(buf) - 1)
    if op == "flip" and buf:
        buf[one] ^= 1 << (arg % 8)
    elif op == "set" and buf:
        buf[one] = arg
    elif op == "truncate":
        del buf[at:]
    elif op == "delete":
        del buf[at : at + 1 + arg % 16]
    elif op == "duplicate":
        buf[at:at] = buf[at : at + 1 + arg % 64]
    elif op == "header":
        # At a line boundary inside the head, so the line is read as a header.
        head = bytes(buf[: _head_end(data)])
        starts = [m.end() for m in re.finditer(rb"\r\n", head)][:-1] or [len(head)]
        where = starts[pos % len(starts)]
        buf[where:where] = HEADER_LINES[arg % len(HEADER_LINES)]
    elif op == "byte":
        buf[at:at] = BYTES[arg % len(BYTES)]
    elif op == "length":
        value = LENGTHS[arg % len(LENGTHS)]
        found = re.search(rb"(?i)content-length:([^\r\n]*)", data)
        if found:
            buf[found.start(1) : found.end(1)] = b" " + value
        else:
            where = _head_end(data)
            buf[where:where] = b"Content-Length: " + value + b"\r\n"
    elif op == "chunk":
        # Replace a chunk-size line of the body (or the body's first line).
        body = _head_end(data) + 2
        lines = [m.start() for m in re.finditer(rb"(?m)^[0-9a-fA-F]+\r?$", data[body:])]
        start = body + (lines[pos % len(lines)] if lines else 0)
        end = data.find(b"\r\n", start)
        end = len(data) if end == -1 else end
        buf[start:end] = CHUNK_SIZES[arg % len(CHUNK_SIZES)]
    elif op in ("method", "target", "version"):
        # Replace one part of the request line of one of the requests (pipelines hold more).
        request_lines = list(re.finditer(rb"(?m)^([A-Za-z]+) (\S*) (HTTP/1\.[01])\r$", data))
        if request_lines:
            line = request_lines[pos % len(request_lines)]
            group = ("method", "target", "version").index(op) + 1
            choices = {"method": METHODS, "target": TARGETS, "version": VERSIONS}[op]
            buf[line.start(group) : line.end(group)] = choices[arg % len(choices)]
    elif op == "pipeline":
        buf += SEEDS[arg % len(SEEDS)]
    elif op == "splice":
        other = SEEDS[arg % len(SEEDS)]
        buf = buf[:at] + bytearray(other[pos % (len(other) + 1) :])
    return bytes(buf)


def mutate(seed: int, edits: list[Edit]) -> bytes:
    data = SEEDS[seed % len(SEEDS)]
    for edit in edits:
        data = apply_edit(data, edit)
    return data


# ---------------------------------------------------------------------------------------------
# The backend: a strict h11 server that records what the ingress forwarded


class RecordingBackend:
    """Answers every request with a 200 (a websocket upgrade of /ws with a 101 and an echo)
    and records each request, plus anything that would mean the ingress desynchronised it."""

    NAME = "fuzz-backend"

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[tuple[bytes, bytes, bytes]] = []  # method, target, body (capped)
        self.violations: list[str] = []  # what the ingress must never make a replica see
        self.crashes: list[str] = []  # a bug of this backend itself

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        eof = [False]
        try:
            await self._exchanges(stream, conn, eof)
        except h11.RemoteProtocolError as exc:
            # Cut off mid-message (the ingress gave up on its client): no desync. A framing
            # error while the bytes still flow is one.
            if not eof[0]:
                self.violations.append(f"backend could not parse the forwarded bytes: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception as exc:  # noqa: BLE001 -- reported by the test, not swallowed
            self.crashes.append(repr(exc))
        finally:
            with trio.move_on_after(1):
                await stream.aclose()

    async def _next(
        self, stream: trio.SocketStream, conn: h11.Connection, eof: list[bool]
    ) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await stream.receive_some(65536)
            eof[0] = not data
            conn.receive_data(data)

    def _check_head(self, head: h11.Request) -> None:
        parts = [head.method, head.target, *(k for k, _ in head.headers)]
        parts += [v for _, v in head.headers]
        for part in parts:
            if any(c in part for c in FORBIDDEN):
                self.violations.append(f"CR/LF/NUL reached the backend: {part!r}")
        names = [k for k, _ in head.headers]
        if b"content-length" in names and b"transfer-encoding" in names:
            self.violations.append(f"both Content-Length and Transfer-Encoding: {head!r}")
        if names.count(b"host") != 1:
            self.violations.append(f"{names.count(b'host')} Host headers: {head!r}")

    async def _exchanges(
        self, stream: trio.SocketStream, conn: h11.Connection, eof: list[bool]
    ) -> None:
        while True:
            event = await self._next(stream, conn, eof)
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                self.violations.append(f"backend expected a request head, got {event!r}")
                return
            head = event
            self._check_head(head)
            body = bytearray()
            while True:
                event = await self._next(stream, conn, eof)
                if isinstance(event, h11.Data):
                    body += event.data[: max(0, 4096 - len(body))]
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    self.violations.append(f"backend expected a body, got {event!r}")
                    return
            self.requests.append((head.method, head.target, bytes(body)))
            connection = b",".join(v.lower() for k, v in head.headers if k == b"connection")
            upgrade = b"upgrade" in {t.strip() for t in connection.split(b",")} and any(
                k == b"upgrade" and v.lower() == b"websocket" for k, v in head.headers
            )
            if head.target == b"/ws" and upgrade:
                await stream.send_all(
                    conn.send(
                        h11.InformationalResponse(
                            status_code=101,
                            headers=[("upgrade", "websocket"), ("connection", "Upgrade")],
                        )
                    )
                )
                rest = conn.trailing_data[0]
                if rest:
                    await stream.send_all(rest)
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
                return
            answer = b"ok from " + self.NAME.encode()
            response = h11.Response(
                status_code=200,
                headers=[("content-length", str(len(answer))), ("x-backend", self.NAME)],
            )
            await stream.send_all(conn.send(response))
            if head.method != b"HEAD":
                await stream.send_all(conn.send(h11.Data(data=answer)))
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()


# ---------------------------------------------------------------------------------------------
# The harness: ingress + backend in a trio loop on a thread; the tests talk to it from outside


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        self._guard = threading.Lock()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            self.records.append(record)

    def take(self) -> list[str]:
        with self._guard:
            out = [self.format(r) for r in self.records]
            self.records.clear()
        return out


class Harness:
    def __init__(self) -> None:
        self.backend = RecordingBackend()
        self.ingress: Ingress | None = None
        self.port = 0
        self.failure: BaseException | None = None
        self.logs = _Records()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="ingress-fuzz", daemon=True)

    # ---- lifecycle

    def start(self) -> None:
        logging.getLogger("p2porch").addHandler(self.logs)
        self._thread.start()
        assert self._started.wait(LIMIT_S), "the ingress harness did not start"
        self._raise_failure()

    def stop(self) -> None:
        logging.getLogger("p2porch").removeHandler(self.logs)
        if self._token is not None and self._cancel is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(LIMIT_S)

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as exc:  # noqa: BLE001 -- handed to the test thread
            self.failure = exc
        finally:
            self._started.set()

    async def _run(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            backend_port = await nursery.start(self.backend.serve)
            table = table_for({("default", "web"): [backend_port]})
            self.ingress = Ingress(table, HOST, 0, IngressConfig(), "n1")
            self.ingress.set_rules([web_rule()])
            self.port = await nursery.start(self.ingress.run)
            self._started.set()

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise AssertionError(f"the ingress harness died: {self.failure!r}") from self.failure

    def _call(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        self._raise_failure()
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            self._raise_failure()
            raise

    # ---- one example

    def exchange(self, data: bytes, half_close: bool = True, cut: int = 0) -> bytes:
        return self._call(self._exchange, data, half_close, cut)

    async def _exchange(self, data: bytes, half_close: bool, cut: int) -> bytes:
        """Send ``data`` in one write, or in writes of ``cut`` bytes (TCP_NODELAY: the
        ingress sees heads and bodies arrive piecemeal), then read what comes back."""
        stream = await trio.open_tcp_stream(HOST, self.port)
        received = bytearray()
        async with stream:
            # The ingress may hang up before it read everything (after a 400, say).
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                step = cut or max(1, len(data))
                for i in range(0, len(data), step):
                    await stream.send_all(data[i : i + step])
                    if cut:
                        await trio.sleep(0)
                if half_close:
                    await stream.send_eof()
            with trio.move_on_after(READ_CAP_S):
                while True:
                    try:
                        with trio.move_on_after(READ_CAP_S if half_close else QUIET_S) as quiet:
                            chunk = await stream.receive_some(65536)
                    except (trio.BrokenResourceError, OSError):
                        break  # reset after the ingress closed with our bytes unread
                    if quiet.cancelled_caught or not chunk:
                        break
                    received += chunk
        return bytes(received)

    def health(self) -> None:
        """A fresh well-formed GET still reaches the backend and gets its 200."""
        self._call(self._health)

    async def _health(self) -> None:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target="/health", headers=[("host", "fuzz.test")])
        with trio.fail_after(LIMIT_S):
            stream = await trio.open_tcp_stream(HOST, self.port)
            async with stream:
                await stream.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
                body = b""
                response: h11.Response | None = None
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        response = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    else:
                        break
        assert response is not None and response.status_code == 200, (response, body)
        assert (b"x-backend", RecordingBackend.NAME.encode()) in response.headers, response
        assert body == b"ok from " + RecordingBackend.NAME.encode()

    def counts(self) -> tuple[int, int]:
        """(requests the backend saw, requests the ingress parsed), read in that order on the
        trio thread: the ingress counts a request before it forwards it."""
        return self._call(self._counts)

    async def _counts(self) -> tuple[int, int]:
        assert self.ingress is not None
        return len(self.backend.requests), self.ingress.counters.requests

    def settle(self) -> None:
        """Wait (bounded) until no client connection is open at the ingress, so what the
        backend records next belongs to the next exchange."""
        self._call(self._settle)

    async def _settle(self) -> None:
        assert self.ingress is not None
        with trio.fail_after(LIMIT_S):
            while self.ingress.status()["active_connections"]:
                await trio.sleep(0.01)

    def check(self, data: bytes, half_close: bool = True, cut: int = 0) -> bytes:
        """One example: send, then hold the ingress to its contract."""
        answer = self.exchange(data, half_close, cut)
        assert not answer or answer.startswith(b"HTTP/1.1 "), answer[:200]
        self.health()
        errors = self.logs.take()
        assert not errors, errors
        assert not self.backend.crashes, self.backend.crashes
        assert not self.backend.violations, self.backend.violations
        backend_seen, ingress_parsed = self.counts()
        assert backend_seen <= ingress_parsed, (backend_seen, ingress_parsed)
        self._raise_failure()
        return answer


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    h.start()
    try:
        yield h
    finally:
        h.stop()
    # An exception that ended the ingress's nursery fails the module even after the last test.
    h._raise_failure()


# ---------------------------------------------------------------------------------------------
# Tests


def _statuses(answer: bytes) -> tuple[bytes, ...]:
    return tuple(re.findall(rb"HTTP/1\.1 (\d{3}) ", answer))


@pytest.mark.parametrize("index", range(len(SEEDS)))
def test_seeds_are_relayed(harness: Harness, index: int) -> None:
    harness.settle()
    before = len(harness.backend.requests)
    answer = harness.check(SEEDS[index])
    assert _statuses(answer) == SEED_STATUSES[index], answer[:300]
    harness.settle()
    # The health check's GET /health follows the seed's own requests.
    seen = harness.backend.requests[before:]
    assert tuple(seen[: len(SEED_REQUESTS[index])]) == SEED_REQUESTS[index]
    if index == 3:
        assert answer.endswith(b"\x81\x05hello")  # the websocket echo came back through


@settings(FUZZ, max_examples=120)
@given(
    seed=st.integers(0, len(SEEDS) - 1),
    edits=st.lists(EDIT, min_size=1, max_size=4),
    half_close=HALF_CLOSE,
    cut=CUT,
)
@example(seed=2, edits=[("chunk", 0, 0)], half_close=True, cut=0)
@example(seed=1, edits=[("header", 1, 28)], half_close=True, cut=0)
@example(seed=0, edits=[("header", 0, 1)], half_close=False, cut=0)
@example(seed=3, edits=[("header", 2, 18)], half_close=True, cut=1)
def test_mutated_requests(
    harness: Harness, seed: int, edits: list[Edit], half_close: bool, cut: int
) -> None:
    harness.check(mutate(seed, edits), half_close, cut)


@settings(FUZZ, max_examples=60)
@given(data=st.binary(max_size=400), half_close=HALF_CLOSE)
def test_random_bytes(harness: Harness, data: bytes, half_close: bool) -> None:
    harness.check(data, half_close)


@settings(FUZZ, max_examples=40)
@given(
    head=st.sampled_from((b"GET", b"POST", b"PUT")),
    junk=st.binary(min_size=1, max_size=200),
    half_close=HALF_CLOSE,
)
def test_random_bytes_after_a_request_line(
    harness: Harness, head: bytes, junk: bytes, half_close: bool
) -> None:
    harness.check(head + b" /x HTTP/1.1\r\nHost: fuzz.test\r\n" + junk, half_close)


# The classic smuggling shapes, pinned: (request, statuses the client gets, what the backend
# sees). Whatever the ingress accepts it re-frames, so the backend reads the same requests.
SMUGGLING = [
    pytest.param(
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        (b"200", b"200"),
        ((b"POST", b"/a", b""), (b"GET", b"/smuggled", b"")),
        id="cl-te",
    ),
    # Transfer-Encoding wins: the 0x5c-byte chunk never completes before the client's EOF.
    # The head was forwarded already, so the ingress just drops both sides (no page, and the
    # backend never gets a complete request).
    pytest.param(
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        b"5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n",
        (),
        (),
        id="te-cl-bad-chunk",
    ),
    pytest.param(
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        (b"501",),
        (),
        id="te-te",
    ),
    pytest.param(
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        (b"400",),
        (),
        id="te-space-before-colon",
    ),
    pytest.param(
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc",
        (b"400",),
        (),
        id="two-lengths",
    ),
    pytest.param(
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: b\nGET /smuggled HTTP/1.1\r\n\r\n",
        (b"400",),
        (),
        id="bare-lf-in-value",
    ),
    pytest.param(
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: b\rGET /smuggled HTTP/1.1\r\n\r\n",
        (b"400",),
        (),
        id="bare-cr-in-value",
    ),
    pytest.param(
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: b\x00c\r\n\r\n",
        (b"400",),
        (),
        id="nul-in-value",
    ),
    pytest.param(
        b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        (b"400",),
        (),
        id="two-hosts",
    ),
    # A chunk size past h11's 20 hex digits breaks the body after the head went upstream: the
    # ingress ends both connections (no 400: see _ClientGone), the backend sees no request.
    pytest.param(
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"ffffffffffffffffffffffff\r\nabc",
        (),
        (),
        id="absurd-chunk-size",
    ),
    pytest.param(
        b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: content-length\r\nContent-Length: 3\r\n\r\n"
        b"abcGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
        (b"200", b"200"),
        ((b"POST", b"/a", b"abc"), (b"GET", b"/b", b"")),
        id="connection-names-content-length",
    ),
]


@pytest.mark.parametrize(("request_bytes", "statuses", "forwarded"), SMUGGLING)
def test_smuggling_shapes(
    harness: Harness,
    request_bytes: bytes,
    statuses: tuple[bytes, ...],
    forwarded: tuple[tuple[bytes, bytes, bytes], ...],
) -> None:
    harness.settle()
    before = len(harness.backend.requests)
    answer = harness.exchange(request_bytes)
    harness.settle()
    seen = tuple(harness.backend.requests[before:])
    assert _statuses(answer) == statuses, answer[:300]
    assert seen == forwarded
    harness.check(b"")
