"""One gossip member as a process: ``python -m p2porch.gossip.agent_main``.

Exists for integration tests and benchmarks (real processes, real sockets, kill -9), and as a
debugging tool. It is deliberately line-oriented so a test can drive it through pipes:

* **stdout**: one JSON object per line -- ``{"type": "ready", ...}`` once bound, then
  ``{"type": "event", "kind": "JOINED", "member": {...}}`` for every membership event,
  ``{"type": "resync", ...}`` if events were dropped, and one ``{"type": "reply", ...}`` per
  command.
* **stdin**: one JSON command per line, ``{"id": 1, "cmd": "members"}``. Commands: ``members``,
  ``stats``, ``keys``, ``install``/``use``/``remove`` (``"key"``: base64), ``set_meta``
  (``"meta"``: text), ``join`` (``"seeds"``: list), ``leave``, ``quit``. End of stdin stops
  the agent (so agents never outlive the test that started them).

Example::

    python -m p2porch.gossip.agent_main --name a --bind 127.0.0.2:7946 --preset local \\
        --key "$(head -c32 /dev/urandom | base64)" --seed 127.0.0.3:7946
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import trio

from .config import GossipConfig
from .errors import GossipError
from .keyring import Keyring, load_keyring, save_keyring
from .messages import Event, Member
from .service import GossipService, Resync, ShellLimits, parse_addr


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def member_json(member: Member) -> dict[str, Any]:
    return {
        "name": member.name,
        "addr": member.addr,
        "incarnation": member.incarnation,
        "state": member.state.name,
        "meta": member.meta.decode("utf-8", errors="replace"),
        "meta_version": member.meta_version,
    }


def preset(name: str) -> GossipConfig:
    """``local`` / ``lan`` / ``wan`` -> the core's preset of that name."""
    factory: Callable[[], GossipConfig] | None = getattr(GossipConfig, name, None)
    if name not in ("local", "lan", "wan") or factory is None:
        raise SystemExit(f"unknown preset {name!r}")
    return factory()


class Agent:
    def __init__(self, service: GossipService) -> None:
        self.service = service

    async def pump_events(self) -> None:
        async for item in self.service.events():
            if isinstance(item, Resync):
                _emit({"type": "resync", "dropped": item.dropped, "t": trio.current_time()})
                continue
            event: Event = item
            _emit(
                {
                    "type": "event",
                    "kind": event.kind.name,
                    "member": member_json(event.member),
                    "t": trio.current_time(),
                }
            )

    async def handle(self, command: dict[str, Any]) -> tuple[Any, bool]:
        """Run one command; returns (result, keep_running)."""
        service = self.service
        cmd = command.get("cmd")
        if cmd == "members":
            return [member_json(m) for m in service.members()], True
        if cmd == "stats":
            return service.stats(), True
        if cmd == "keys":
            return [base64.b64encode(k).decode() for k in service.keyring.installed_keys()], True
        if cmd in ("install", "use", "remove"):
            key = base64.b64decode(command["key"], validate=True)
            {"install": service.install_key, "use": service.use_key, "remove": service.remove_key}[
                cmd
            ](key)
            return None, True
        if cmd == "set_meta":
            service.set_meta(str(command["meta"]).encode())
            return None, True
        if cmd == "join":
            await service.join([str(s) for s in command["seeds"]])
            return None, True
        if cmd == "leave":
            await service.leave()
            return None, True
        if cmd == "quit":
            return None, False
        raise ValueError(f"unknown command {cmd!r}")

    async def read_commands(self) -> None:
        """Serve stdin commands; return at EOF or ``quit``."""
        stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buffer = b""
        async with stream:
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if not line.strip():
                        continue
                    if not await self._one(line):
                        return

    async def _one(self, line: bytes) -> bool:
        request_id: Any = None
        try:
            command = _parse_command(line)
            request_id = command.get("id")
            result, keep_running = await self.handle(command)
        except (GossipError, ValueError, KeyError, TypeError) as exc:
            _emit({"type": "reply", "id": request_id, "ok": False, "error": str(exc)})
            return True
        _emit({"type": "reply", "id": request_id, "ok": True, "result": result})
        return keep_running


def _parse_command(line: bytes) -> dict[str, Any]:
    command = json.loads(line)
    if not isinstance(command, dict):
        raise TypeError("a command is a JSON object")
    return command


def _load_or_build_keyring(args: argparse.Namespace) -> Keyring:
    keys = [base64.b64decode(k, validate=True) for k in args.key]
    if args.keyring_file and os.path.exists(args.keyring_file):
        ring = load_keyring(args.keyring_file)
        for key in keys:
            ring.install(key)
        return ring
    if not keys:
        raise SystemExit("need --key (base64, first is primary) or an existing --keyring-file")
    ring = Keyring(keys[0], keys[1:])
    if args.keyring_file:
        save_keyring(ring, args.keyring_file)
    return ring


async def amain(args: argparse.Namespace) -> None:
    config = preset(args.preset)
    host, port = parse_addr(args.bind, allow_port_zero=True)
    service = GossipService(
        config,
        args.name,
        (host, port),
        _load_or_build_keyring(args),
        args.meta.encode(),
        args.seed,
        limits=ShellLimits(leave_propagate_s=args.leave_propagate_s),
        keyring_path=args.keyring_file,
        incarnation=args.incarnation,
    )
    agent = Agent(service)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        nursery.start_soon(agent.pump_events)
        _emit({"type": "ready", "name": args.name, "addr": service.addr})
        await agent.read_commands()
        service.stop()
        nursery.cancel_scope.cancel()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m p2porch.gossip.agent_main")
    parser.add_argument("--name", required=True)
    parser.add_argument("--bind", required=True, help="host:port for UDP and TCP")
    parser.add_argument("--seed", action="append", default=[], help="host:port (repeatable)")
    parser.add_argument("--key", action="append", default=[], help="base64 key (repeatable)")
    parser.add_argument("--keyring-file", default=None, help="load/save the keyring here (0600)")
    parser.add_argument("--preset", default="local", choices=("local", "lan", "wan"))
    parser.add_argument("--meta", default="")
    parser.add_argument("--incarnation", type=int, default=0)
    parser.add_argument("--leave-propagate-s", type=float, default=0.5)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- driving an agent


class AgentProcess:
    """Start and drive one agent process from synchronous code (tests, benchmarks).

    A reader thread parses the agent's stdout: events are appended to ``events`` (with the
    agent's monotonic timestamp), replies are matched to calls by id. ``kill()`` is kill -9.
    """

    def __init__(
        self,
        name: str,
        bind: str,
        keys_b64: Sequence[str],
        seeds: Sequence[str] = (),
        *,
        preset_name: str = "local",
        extra_args: Sequence[str] = (),
        stderr_path: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        args = [sys.executable, "-m", "p2porch.gossip.agent_main", "--name", name]
        args += ["--bind", bind, "--preset", preset_name, *extra_args]
        for key in keys_b64:
            args += ["--key", key]
        for seed in seeds:
            args += ["--seed", seed]
        self._stderr: IO[bytes] | None = open(stderr_path, "ab") if stderr_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr if self._stderr is not None else subprocess.DEVNULL,
            cwd=cwd,
        )
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._replies: dict[Any, queue.Queue[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._ready: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.addr = ""

    def wait_ready(self, timeout_s: float = 20.0) -> str:
        """Block until the agent has bound its sockets; return its address."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ready = self._ready.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"agent {self.name} exited with {self.proc.returncode} before ready"
                    ) from None
                continue
            self.addr = str(ready["addr"])
            return self.addr
        raise TimeoutError(f"agent {self.name} did not report ready")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            kind = line.get("type")
            if kind == "ready":
                self._ready.put(line)
            elif kind == "reply":
                with self._lock:
                    box = self._replies.get(line.get("id"))
                if box is not None:
                    box.put(line)
            else:
                with self._lock:
                    self.events.append(line)

    def call(self, cmd: str, timeout_s: float = 15.0, **fields: Any) -> Any:
        """Send one command; return its result or raise RuntimeError with the agent's error."""
        request_id = next(self._ids)
        box: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            self._replies[request_id] = box
        assert self.proc.stdin is not None
        line = json.dumps({"id": request_id, "cmd": cmd, **fields}) + "\n"
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()
        try:
            reply = box.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"agent {self.name}: no reply to {cmd}") from None
        finally:
            with self._lock:
                self._replies.pop(request_id, None)
        if not reply.get("ok"):
            raise RuntimeError(f"agent {self.name}: {cmd} failed: {reply.get('error')}")
        return reply.get("result")

    def members(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in self.call("members")}

    def events_snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def kill(self) -> None:
        """kill -9: no goodbye, sockets vanish."""
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._close_files()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close stdin (the agent exits at EOF); kill -9 if it lingers."""
        if self.proc.poll() is None:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
                self.proc.wait(timeout=timeout_s)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._close_files()

    def _close_files(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


def main(argv: Sequence[str] | None = None) -> None:
    trio.run(amain, parse_args(argv))


if __name__ == "__main__":
    main()
