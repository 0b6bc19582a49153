"""agent / init / join / demo, with the daemon and process spawning replaced."""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from p2porch.cli import main as cli_main

from .conftest import Cli, FakeApi, error


class FakeProcess:
    def __init__(self, pid: int = 4242, exit_after_polls: int | None = None) -> None:
        self.pid = pid
        self.polls = 0
        self.exit_after_polls = exit_after_polls

    def poll(self) -> int | None:
        self.polls += 1
        if self.exit_after_polls is not None and self.polls > self.exit_after_polls:
            return 3
        return None


# What a node writes to its data dir for the local CLI (node/security.py): the API is HTTPS
# with client certificates, so init/join reach it only with these credentials.
CLIENT_YAML = """apiVersion: p2porch/v1
kind: ClientConfig
server: 127.0.0.2:7950
cluster: c0ffee
credentials:
  caFile: ca.pem
  certFile: admin.pem
  keyFile: admin.key
"""


class Spawner:
    def __init__(
        self, process: FakeProcess, token: str | None = "tok-file", client_yaml: bool = True
    ) -> None:
        self.process = process
        self.token = token
        self.client_yaml = client_yaml
        self.calls: list[tuple[list[str], Path, dict[str, str]]] = []

    def __call__(self, argv: Sequence[str], log_path: Path, env: Mapping[str, str]) -> FakeProcess:
        self.calls.append((list(argv), log_path, dict(env)))
        log_path.write_text("booting\nfatal: port 7950 in use\n")
        if self.token is not None:
            (log_path.parent / "join-token").write_text(self.token + "\n")
        if self.client_yaml:
            (log_path.parent / "client.yaml").write_text(CLIENT_YAML)
        return self.process


def _flaky_healthz(api: FakeApi, failures: int) -> None:
    seen = {"n": 0}

    def answer(request: httpx.Request, _p: dict[str, str]) -> httpx.Response:
        seen["n"] += 1
        if seen["n"] <= failures:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"ok": True})

    api.route("GET", "/healthz", answer)


def test_init_starts_agent_waits_and_prints_next_steps(
    run: Cli, api: FakeApi, tmp_path: Path
) -> None:
    spawner = Spawner(FakeProcess())
    run.runtime_overrides["spawn"] = spawner
    _flaky_healthz(api, failures=2)
    data = tmp_path / "n1"
    result = run(
        "init",
        "--data-dir",
        str(data),
        "--advertise",
        "127.0.0.2",
        "--labels",
        "zone=a",
        "--name",
        "n1",
    )
    assert result.exit_code == 0, result.output
    (argv, log_path, env) = spawner.calls[0]
    assert argv[:4] == [sys.executable, "-m", "p2porch.cli.main", "agent"]
    assert argv[4:] == [
        "--data-dir",
        str(data.resolve()),
        "--advertise",
        "127.0.0.2",
        "--name",
        "n1",
        "--labels",
        "zone=a",
    ]
    assert log_path == data.resolve() / "agent.log"
    assert "PYTHONPATH" in env
    assert (data / "agent.pid").read_text() == "4242\n"
    assert [r.url.host for r in api.requests] == ["127.0.0.2"] * 3
    assert {(r.url.scheme, r.url.port) for r in api.requests} == {("https", 7950)}
    out = result.stdout
    config = data.resolve() / "client.yaml"
    assert "Join token: tok-file" in out
    assert f"Admin credentials for the CLI: {config}" in out
    assert "p2porch join 127.0.0.2:7950 --token tok-file" in out
    assert f"export P2PORCH_CONFIG={config}" in out
    assert "p2porch user create NAME" in out
    assert "pid 4242" in result.stderr


def test_init_waits_for_the_credentials_the_agent_writes(
    run: Cli, api: FakeApi, tmp_path: Path
) -> None:
    """No client.yaml, no way to reach an HTTPS-only API: the wait says which file is missing."""
    run.runtime_overrides["spawn"] = Spawner(FakeProcess(), client_yaml=False)
    data = tmp_path / "d"
    result = run("init", "--data-dir", str(data), "--advertise", "127.0.0.2", "--timeout", "2")
    assert result.exit_code == 1
    assert f"did not write a usable {data.resolve() / 'client.yaml'} within 2s" in result.stderr
    assert api.requests == []


def test_init_falls_back_to_the_token_endpoint(run: Cli, api: FakeApi, tmp_path: Path) -> None:
    run.runtime_overrides["spawn"] = Spawner(FakeProcess(), token=None)
    result = run(
        "init",
        "--data-dir",
        str(tmp_path / "d"),
        "--advertise",
        "127.0.0.2:7951",
        "--api-port",
        "7960",
    )
    assert result.exit_code == 0, result.output
    assert "Join token: tok-123" in result.stdout
    assert api.requests[0].url.port == 7960


def test_join_passes_peer_and_token(run: Cli, api: FakeApi, tmp_path: Path) -> None:
    spawner = Spawner(FakeProcess(), token=None)
    run.runtime_overrides["spawn"] = spawner
    result = run(
        "join",
        "127.0.0.2",
        "--token",
        "T0K",
        "--data-dir",
        str(tmp_path / "n2"),
        "--advertise",
        "127.0.0.3",
        "--preset",
        "local",
        "--no-runtime",
    )
    assert result.exit_code == 0, result.output
    argv, _log, env = spawner.calls[0]
    assert argv[argv.index("--join") + 1] == "127.0.0.2"
    # The token travels in the agent's environment, never on its (world-readable) argv.
    assert "--token" not in argv and "T0K" not in argv
    assert env["P2PORCH_JOIN_TOKEN"] == "T0K"
    assert argv[argv.index("--preset") + 1] == "local"
    assert "--no-runtime" in argv
    config = (tmp_path / "n2").resolve() / "client.yaml"
    assert f"P2PORCH_CONFIG={config} p2porch get nodes" in result.stdout
    # the joined node's own API, with the credentials it wrote (not the peer's address)
    assert {r.url.host for r in api.requests} == {"127.0.0.3"}


def test_agent_that_dies_shows_its_log(run: Cli, api: FakeApi, tmp_path: Path) -> None:
    run.runtime_overrides["spawn"] = Spawner(FakeProcess(exit_after_polls=1))
    _flaky_healthz(api, failures=100)
    result = run("init", "--data-dir", str(tmp_path / "d"), "--advertise", "127.0.0.2")
    assert result.exit_code == 1
    assert "the agent exited with code 3" in result.stderr
    assert "fatal: port 7950 in use" in result.stderr


def test_agent_that_never_answers_times_out(run: Cli, api: FakeApi, tmp_path: Path) -> None:
    run.runtime_overrides["spawn"] = Spawner(FakeProcess())
    _flaky_healthz(api, failures=10_000)
    result = run(
        "init", "--data-dir", str(tmp_path / "d"), "--advertise", "127.0.0.2", "--timeout", "3"
    )
    assert result.exit_code == 1
    assert "did not answer on 127.0.0.2:7950/healthz within 3s" in result.stderr


def test_init_requires_data_dir_and_advertise(run: Cli) -> None:
    assert run("init", "--advertise", "127.0.0.2").exit_code == 2
    assert run("join", "127.0.0.2", "--data-dir", "x", "--advertise", "y").exit_code == 2


def test_spawn_detached_writes_the_log(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    process = cli_main.spawn_detached(
        [sys.executable, "-c", "print('hello from the agent')"], log, {"PATH": "/usr/bin"}
    )
    for _ in range(500):  # bounded: the child prints and exits at once
        if process.poll() is not None:
            break
        time.sleep(0.01)
    assert process.poll() == 0
    assert "hello from the agent" in log.read_text()


# --------------------------------------------------------------------------- agent


def _fake_daemon(monkeypatch: pytest.MonkeyPatch, fields: Sequence[str]) -> list[Any]:
    import attrs

    seen: list[Any] = []
    options_class = attrs.make_class("AgentOptions", {f: attrs.field(default=None) for f in fields})
    module = types.ModuleType("p2porch.node.daemon")
    module.AgentOptions = options_class  # type: ignore[attr-defined]

    def main_agent(options: Any) -> int:
        seen.append(options)
        return 7

    module.main_agent = main_agent  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "p2porch.node.daemon", module)
    return seen


ALL_FIELDS = (
    "data_dir",
    "advertise",
    "join",
    "token",
    "name",
    "labels",
    "api_port",
    "raft_port",
    "gossip_port",
    "preset",
    "runtime",
    "cpu_millicores",
    "memory_bytes",
    "voter_grace_s",
)


def test_agent_builds_options_and_returns_exit_code(
    run: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _fake_daemon(monkeypatch, ALL_FIELDS)
    result = run(
        "agent",
        "--data-dir",
        "/tmp/d1",
        "--advertise",
        "127.0.0.2",
        "--join",
        "127.0.0.3",
        "--token",
        "t",
        "--labels",
        "zone=a,disk=ssd",
        "--cpu",
        "1500m",
        "--memory",
        "1Gi",
        "--api-port",
        "7999",
        "--voter-grace",
        "12.5",
        "--no-runtime",
    )
    assert result.exit_code == 7, result.output
    options = seen[0]
    assert options.data_dir == Path("/tmp/d1")
    assert options.advertise == "127.0.0.2"
    assert (options.join, options.token) == ("127.0.0.3", "t")
    assert options.labels == (("disk", "ssd"), ("zone", "a"))
    assert options.cpu_millicores == 1500 and options.memory_bytes == 2**30
    assert options.api_port == 7999 and options.voter_grace_s == 12.5
    assert options.runtime is False
    assert options.raft_port is None  # not given: the daemon's default applies


def test_agent_usage_errors(run: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fake_daemon(monkeypatch, ALL_FIELDS)
    base = ["agent", "--data-dir", "/tmp/d", "--advertise", "127.0.0.2"]
    assert run(*base, "--join", "127.0.0.3").exit_code == 2
    assert run(*base, "--labels", "novalue").exit_code == 2
    assert run(*base, "--cpu", "lots").exit_code == 2
    assert run(*base, "--preset", "fast").exit_code == 2
    assert seen == []


def test_agent_unsupported_option_for_this_daemon(
    run: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_daemon(monkeypatch, ("data_dir", "advertise"))
    result = run("agent", "--data-dir", "/tmp/d", "--advertise", "a", "--cpu", "1")
    assert result.exit_code == 2 and "cpu_millicores" in result.output


def test_agent_without_daemon(run: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "p2porch.node.daemon", None)
    result = run("agent", "--data-dir", "/tmp/d", "--advertise", "127.0.0.2")
    assert result.exit_code == 1
    assert "the node daemon is not available in this build" in result.stderr


def test_agent_with_argv_style_daemon(run: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    module = types.ModuleType("p2porch.node.daemon")

    def main_agent(argv: list[str]) -> int:
        seen.append(argv)
        return 0

    module.main_agent = main_agent  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "p2porch.node.daemon", module)
    result = run("agent", "--data-dir", "/tmp/d", "--advertise", "127.0.0.2", "--name", "n1")
    assert result.exit_code == 0
    assert seen == [["--data-dir", "/tmp/d", "--advertise", "127.0.0.2", "--name", "n1"]]


# --------------------------------------------------------------------------- demo, main()


def test_demo_placeholder_when_module_missing(run: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "p2porch.cli.demo", None)
    result = run("demo")
    assert result.exit_code == 0
    assert "demo driver is not part of this build" in result.stdout


def test_demo_calls_run_demo_with_options(
    run: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[dict[str, Any]] = []
    module = types.ModuleType("p2porch.cli.demo")

    def run_demo(base: Path | None = None, down: bool = False, purge: bool = False) -> int:
        seen.append({"base": base, "down": down, "purge": purge})
        return 4

    module.run_demo = run_demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "p2porch.cli.demo", module)
    result = run("demo", "--dir", str(tmp_path), "--down", "--purge")
    assert result.exit_code == 4
    assert seen == [{"base": tmp_path, "down": True, "purge": True}]
    assert run("demo").exit_code == 4
    assert seen[-1] == {"base": None, "down": False, "purge": False}
    assert run("demo", "--purge").exit_code == 2


def test_main_returns_exit_codes(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    assert cli_main.main(["--help"]) == 0
    assert cli_main.main(["no-such-command"]) == 2
    assert "No such command" in capsys.readouterr().err


def test_main_error_code_through_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return error(503, "no_quorum", "no leader")

    original = cli_main.Runtime.__init__

    def patched(self: cli_main.Runtime, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.transport = httpx.MockTransport(refuse)

    monkeypatch.setattr(cli_main.Runtime, "__init__", patched)
    monkeypatch.delenv("P2PORCH_NODE", raising=False)
    monkeypatch.delenv("P2PORCH_CONFIG", raising=False)
    assert cli_main.main(["token"]) == 1


def test_version(run: Cli) -> None:
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.startswith("p2porch 0.")
