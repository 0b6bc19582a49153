"""The ``p2porch`` command: start a node, and drive the cluster through any node's API.

``agent`` runs the daemon in the foreground; ``init``/``join`` start it in the background
and wait until it answers. Every other command is one or a few calls to the HTTP API of
docs/api.md, through :class:`p2porch.cli.client.ApiClient`.

Exit codes: 0 success; 1 an error (the API's code and message are printed, e.g.
``error: no_quorum: ...``; an unreachable node; a manifest with problems); 2 a usage error
(click's default); ``exec`` exits with the remote command's exit code; 130 when a followed
stream is interrupted with Ctrl-C.

Everything that touches the world (HTTP transport, clock, sleep, process spawning, the home
folder) comes from a :class:`Runtime` in ``ctx.obj``, so tests drive every command with a
fake API (``httpx.MockTransport``) and no real waiting.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol
from urllib.parse import quote

import attrs
import click
import httpx
import yaml

from p2porch import __version__
from p2porch.common import pki
from p2porch.node.errors import ManifestError, ManifestProblem
from p2porch.node.manifest import (
    load_manifest_file,
    parse_cpu_millicores,
    parse_manifests,
    parse_memory_bytes,
    to_manifest,
)
from p2porch.node.spec import App

from . import output as out
from .client import ApiClient, ApiError, BadResponse, ClientError, TlsFailure, Unreachable
from .config import (
    DEFAULT_PORT,
    ConfigError,
    Target,
    dump_config,
    parse_address,
    resolve_target,
    target_from_config,
)

DEFAULT_WAIT_TIMEOUT_S = 120.0
DEFAULT_START_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.5
PLACEHOLDER_DEMO = (
    "p2porch demo: the demo driver is not part of this build (cli/demo.py is missing).\n"
    "What runs today: the Raft and SWIM layers and their simulations, e.g.\n"
    "  python3 -m p2porch.consensus.sim --seeds 50\n"
    "  python3 -m p2porch.gossip.sim --nodes 100 --seconds 30"
)


# --------------------------------------------------------------------------- runtime


class AgentProcess(Protocol):
    """What init/join need of the background agent: its pid and whether it already exited."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...


def spawn_detached(argv: Sequence[str], log_path: Path, env: Mapping[str, str]) -> AgentProcess:
    """Start ``argv`` in its own session (it outlives this shell), output appended to a log."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=dict(env),
        )


@attrs.define
class Runtime:
    """The CLI's contact with the world; tests replace each part."""

    transport: httpx.BaseTransport | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    spawn: Callable[[Sequence[str], Path, Mapping[str, str]], AgentProcess] = spawn_detached
    home: Path | None = None
    poll_interval_s: float = POLL_INTERVAL_S
    node: str | None = None
    request_timeout_s: float = 30.0
    _client: ApiClient | None = attrs.field(default=None, init=False)
    _target: Target | None = attrs.field(default=None, init=False)

    def target(self) -> Target:
        if self._target is None:
            home = self.home if self.home is not None else Path.home()
            self._target = resolve_target(self.node, os.environ, home)
        return self._target

    @property
    def chosen_by(self) -> str:
        """Why this node was picked (for hints), once the target has been resolved."""
        return self._target.source if self._target is not None else ""

    def api(self) -> ApiClient:
        """The client of the selected node (created once per command)."""
        if self._client is None:
            self._client = ApiClient(
                self.target(), transport=self.transport, timeout_s=self.request_timeout_s
            )
        return self._client

    def client_for(self, target: Target) -> ApiClient:
        return ApiClient(target, transport=self.transport, timeout_s=self.request_timeout_s)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def runtime() -> Runtime:
    obj = click.get_current_context().find_object(Runtime)
    if obj is None:  # pragma: no cover - the root group always sets one
        raise RuntimeError("no Runtime in the click context")
    return obj


def api() -> ApiClient:
    return runtime().api()


# --------------------------------------------------------------------------- errors


def report_error(exc: Exception) -> None:
    """Print an error the way users read it: code, message, then one line per detail."""
    if isinstance(exc, ApiError):
        out.echo_err(f"error: {exc.code}: {exc.message}")
        for detail in exc.details:
            out.echo_err(f"  {out.format_detail(detail)}")
    elif isinstance(exc, TlsFailure):
        out.echo_err(f"error: {exc.message}")
        for hint in exc.hints:
            out.echo_err(f"  {hint}")
    elif isinstance(exc, ManifestError):
        count = len(exc.problems)
        out.echo_err(f"error: {count} problem{'s' if count != 1 else ''} in manifest")
        for problem in exc.problems:
            out.echo_err(f"  {problem}")
    else:
        out.echo_err(f"error: {exc}")


def fail(message: str) -> NoReturn:
    out.echo_err(f"error: {message}")
    raise click.exceptions.Exit(1)


class P2porchGroup(click.Group):
    """Turns the project's errors into ``error: ...`` on stderr and exit code 1.

    Subcommand aliases (``get app``, ``get ns``) resolve through ``aliases``.
    """

    aliases: Mapping[str, str] = {}

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, self.aliases.get(cmd_name, cmd_name))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ClientError, ConfigError, ManifestError) as exc:
            report_error(exc)
            rt = ctx.find_object(Runtime)
            if isinstance(exc, Unreachable | TlsFailure) and rt is not None and rt.chosen_by:
                out.echo_err(
                    f"  (node chosen by {rt.chosen_by}; pick one with --node ADDR or P2PORCH_NODE)"
                )
            ctx.exit(1)


class GetGroup(P2porchGroup):
    aliases = {
        "app": "apps",
        "replica": "replicas",
        "node": "nodes",
        "namespace": "namespaces",
        "ns": "namespaces",
        "endpoint": "endpoints",
        "ep": "endpoints",
    }


class DescribeGroup(P2porchGroup):
    aliases = {"apps": "app", "nodes": "node"}


# --------------------------------------------------------------------------- root


@click.group(cls=P2porchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--node",
    "node",
    envvar="P2PORCH_NODE",
    metavar="ADDR[:PORT]",
    help="Node whose API to use (env P2PORCH_NODE; default port 7950). "
    "Else P2PORCH_CONFIG, else ~/.config/p2porch/client.yaml, else 127.0.0.1:7950.",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds to wait for each API answer (streams excepted).",
)
@click.version_option(version=__version__, prog_name="p2porch", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, node: str | None, request_timeout: float) -> None:
    """p2porch: a peer-to-peer container orchestrator. Every node serves the whole API."""
    rt = ctx.ensure_object(Runtime)
    rt.node = node
    rt.request_timeout_s = request_timeout
    ctx.call_on_close(rt.close)


# --------------------------------------------------------------------------- daemon

# The daemon's flags: (click option, parameter name, help). Shared by agent, init and join,
# so what init starts in the background is exactly what `agent` would run.
_DAEMON_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--name", "name", "Node name (default: derived by the agent, kept in DATA_DIR)."),
    ("--labels", "labels", "Node labels for placement constraints: k=v,k2=v2."),
    ("--api-port", "api_port", "Port of the HTTP API (default 7950)."),
    ("--raft-port", "raft_port", "Port of Raft traffic (default 7951)."),
    ("--gossip-port", "gossip_port", "Port of SWIM gossip (default 7946)."),
    ("--preset", "preset", "Timing preset: local, lan (default) or wan."),
    ("--cpu", "cpu", "CPU this node offers, e.g. 2 or 1500m (default: detected)."),
    ("--memory", "memory", "Memory this node offers, e.g. 4Gi (default: detected)."),
    ("--voter-grace", "voter_grace_s", "Seconds a voter may be dead before it is replaced."),
    (
        "--left-grace",
        "left_grace_s",
        "Seconds a node that stopped gracefully keeps its replicas before they move.",
    ),
    ("--ingress-port", "ingress_port", "Port of the HTTP ingress (default 80; 0: none)."),
    ("--dns-port", "dns_port", "Port of the service DNS server (default 53; 0: none)."),
    ("--dns-domain", "dns_domain", "Domain of service names (default p2porch)."),
)
_INT_FLAGS = {"api_port", "raft_port", "gossip_port"}
# Data-plane ports: 0 turns the service off.
_OPTIONAL_PORT_FLAGS = {"ingress_port", "dns_port"}


# How `join` hands the token to the agent it starts (never on its command line).
TOKEN_ENV = "P2PORCH_JOIN_TOKEN"


def _daemon_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--no-runtime",
        is_flag=True,
        hidden=True,
        help="Run without a container engine (control plane only; tests).",
    )(func)
    for flag, param, help_text in reversed(_DAEMON_FLAGS):
        kind: Any = str
        if param in _INT_FLAGS:
            kind = click.IntRange(1, 65535)
        elif param in _OPTIONAL_PORT_FLAGS:
            kind = click.IntRange(0, 65535)
        elif param in ("voter_grace_s", "left_grace_s"):
            kind = click.FloatRange(min=0, min_open=True)
        elif param == "preset":
            kind = click.Choice(["local", "lan", "wan"])
        func = click.option(flag, param, type=kind, default=None, help=help_text)(func)
    func = click.option(
        "--advertise",
        required=True,
        metavar="ADDR",
        help="Address other nodes and clients reach this node at (the API is ADDR:API_PORT).",
    )(func)
    func = click.option(
        "--data-dir",
        required=True,
        type=click.Path(file_okay=False),
        help="Where the node keeps its identity, Raft log, snapshots and keys.",
    )(func)
    return func


def _agent_argv(opts: Mapping[str, Any]) -> list[str]:
    """The ``p2porch agent`` flags that reproduce ``opts`` (only those given)."""
    argv = ["--data-dir", str(opts["data_dir"]), "--advertise", str(opts["advertise"])]
    # Never the token: a command line is world-readable (ps, /proc/PID/cmdline); it travels
    # in the environment instead (see _start_agent), which only the owner can read.
    if opts.get("join") is not None:
        argv += ["--join", str(opts["join"])]
    for flag, param, _ in _DAEMON_FLAGS:
        if opts.get(param) is not None:
            argv += [flag, str(opts[param])]
    if opts.get("no_runtime"):
        argv.append("--no-runtime")
    return argv


def parse_labels(text: str) -> tuple[tuple[str, str], ...]:
    """``zone=a,disk=ssd`` -> sorted pairs (click.BadParameter if malformed)."""
    pairs: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected k=v,..., got {item!r}", param_hint="--labels")
        pairs[key.strip()] = value.strip()
    return tuple(sorted(pairs.items()))


def _agent_options_kwargs(opts: Mapping[str, Any], accepted: Sequence[str]) -> dict[str, Any]:
    """Keyword arguments for the daemon's ``AgentOptions`` (only fields it has)."""
    kwargs: dict[str, Any] = {
        "data_dir": Path(opts["data_dir"]).expanduser(),
        "advertise": opts["advertise"],
    }
    for key in (
        "join",
        "token",
        "name",
        "api_port",
        "raft_port",
        "gossip_port",
        "preset",
        "ingress_port",
        "dns_port",
        "dns_domain",
    ):
        if opts.get(key) is not None:
            kwargs[key] = opts[key]
    for key in ("voter_grace_s", "left_grace_s"):
        if opts.get(key) is not None:
            kwargs[key] = float(opts[key])
    if opts.get("labels") is not None:
        kwargs["labels"] = parse_labels(opts["labels"])
    try:
        if opts.get("cpu") is not None:
            kwargs["cpu_millicores"] = parse_cpu_millicores(opts["cpu"])
        if opts.get("memory") is not None:
            kwargs["memory_bytes"] = parse_memory_bytes(opts["memory"])
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if opts.get("no_runtime"):
        kwargs["runtime"] = False
    unsupported = sorted(set(kwargs) - set(accepted))
    if unsupported:
        raise click.UsageError(f"this daemon does not support: {', '.join(unsupported)}")
    return kwargs


@cli.command()
@_daemon_options
@click.option("--join", "join", metavar="PEER", help="Join the cluster PEER (ADDR[:PORT]) is in.")
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    help=f"Join token (print it on any member: p2porch token); or ${TOKEN_ENV}.",
)
def agent(**opts: Any) -> None:
    """Run the node daemon in the foreground (what systemd runs)."""
    if opts.get("join") is not None and opts.get("token") is None:
        raise click.UsageError("--join needs --token (print it on any member: p2porch token)")
    try:
        daemon = importlib.import_module("p2porch.node.daemon")
        main_agent = daemon.main_agent
    except (ImportError, AttributeError):
        fail("the node daemon is not available in this build")
    options_class = getattr(daemon, "AgentOptions", None)
    if options_class is not None and attrs.has(options_class):
        kwargs = _agent_options_kwargs(opts, list(attrs.fields_dict(options_class)))
        try:
            options = options_class(**kwargs)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        code = main_agent(options)
    else:
        code = main_agent(_agent_argv(opts))
    raise click.exceptions.Exit(code if isinstance(code, int) else 0)


def _api_target_of(advertise: str, api_port: int | None) -> Target:
    """The API the agent will serve: the advertised host on the API port (docs/api.md)."""
    text = advertise.strip().split("://", 1)[-1]
    if text.startswith("["):
        host = text[: text.index("]") + 1] if "]" in text else text
    elif text.count(":") > 1:
        host = f"[{text}]"
    else:
        host = text.split(":", 1)[0]
    return Target(parse_address(f"{host}:{api_port or DEFAULT_PORT}"), "--advertise")


def _start_agent(opts: dict[str, Any], timeout_s: float) -> tuple[Target, Path]:
    """Spawn ``p2porch agent`` detached and wait for its /healthz: (its API, its data dir)."""
    rt = runtime()
    directory = Path(opts["data_dir"]).expanduser().resolve()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create the data directory {directory}: {exc}")
    log_path = directory / "agent.log"
    argv = [
        sys.executable,
        "-m",
        "p2porch.cli.main",
        "agent",
        *_agent_argv({**opts, "data_dir": directory}),
    ]
    env = dict(os.environ)
    # The child must import the same p2porch as this process, wherever it was started from.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.pop(TOKEN_ENV, None)
    if opts.get("token") is not None:
        env[TOKEN_ENV] = str(opts["token"])
    try:
        process = rt.spawn(argv, log_path, env)
    except OSError as exc:
        fail(f"cannot start the agent: {exc}")
    with contextlib.suppress(OSError):  # only a convenience for stopping it by hand
        (directory / "agent.pid").write_text(f"{process.pid}\n", encoding="utf-8")
    address = _api_target_of(opts["advertise"], opts.get("api_port")).display
    config_path = directory / "client.yaml"
    out.echo_err(f"started p2porch agent (pid {process.pid}), log {log_path}")
    deadline = rt.clock() + timeout_s
    client: ApiClient | None = None
    config_problem = ""
    try:
        while True:
            code = process.poll()
            if code is not None:
                out.echo_err(f"error: the agent exited with code {code}; end of {log_path}:")
                for line in _tail(log_path, 20):
                    out.echo_err(f"  {line}")
                raise click.exceptions.Exit(1)
            # The API is HTTPS only: its CA and an admin certificate are in the client.yaml
            # the agent writes to its data dir before it serves.
            if client is None and config_path.is_file():
                try:
                    client = rt.client_for(target_from_config(config_path, node=address))
                except ConfigError as exc:
                    config_problem = f" ({exc})"
            if client is not None:
                try:
                    if client.healthz():
                        return client.target, directory
                except ClientError:
                    pass
            if rt.clock() >= deadline:
                if client is None:
                    fail(
                        f"the agent (pid {process.pid}) did not write a usable {config_path} "
                        f"within {timeout_s:g}s{config_problem}; see {log_path}"
                    )
                fail(
                    f"the agent (pid {process.pid}) did not answer on {address}/healthz "
                    f"within {timeout_s:g}s; see {log_path}"
                )
            rt.sleep(rt.poll_interval_s)
    finally:
        if client is not None:
            client.close()


def _tail(path: Path, lines: int) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _read_token(directory: Path, client: ApiClient, rt: Runtime, timeout_s: float) -> str:
    """The join token: DATA_DIR/join-token (written at bootstrap), else GET /v1/token."""
    token_file = directory / "join-token"
    deadline = rt.clock() + timeout_s
    while True:
        with contextlib.suppress(OSError):
            token = token_file.read_text(encoding="utf-8").strip()
            if token:
                return token
        if rt.clock() >= deadline:
            return client.token()
        rt.sleep(rt.poll_interval_s)


_start_timeout = click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0),
    default=DEFAULT_START_TIMEOUT_S,
    show_default=True,
    help="Seconds to wait for the agent's API to answer.",
)


@cli.command()
@_daemon_options
@_start_timeout
def init(timeout_s: float, **opts: Any) -> None:
    """Start the first node of a new cluster in the background."""
    rt = runtime()
    target, directory = _start_agent(opts, timeout_s)
    with rt.client_for(target) as client:
        token = _read_token(directory, client, rt, min(timeout_s, 5.0))
    click.echo(f"A new cluster is running; this node's API is {target.display}.")
    click.echo(f"Admin credentials for the CLI: {target.config_path}")
    click.echo(f"Join token: {token}")
    click.echo("Next, on every other machine:")
    click.echo(
        f"  p2porch join {target.display} --token {token} --data-dir DIR --advertise ITS_ADDRESS"
    )
    click.echo("Then:")
    click.echo(f"  export P2PORCH_CONFIG={target.config_path}")
    click.echo("  p2porch get nodes")
    click.echo("  p2porch user create NAME --role admin|viewer   # credentials for others")


@cli.command()
@click.argument("peer")
@click.option("--token", required=True, help="Join token (print it on any member: p2porch token).")
@_daemon_options
@_start_timeout
def join(peer: str, token: str, timeout_s: float, **opts: Any) -> None:
    """Start a node in the background that joins the cluster PEER is in."""
    target, _ = _start_agent({**opts, "join": peer, "token": token}, timeout_s)
    click.echo(f"This node joined through {peer}; its API is {target.display}.")
    click.echo(f"Admin credentials for the CLI: {target.config_path}")
    click.echo("Next:")
    click.echo(f"  P2PORCH_CONFIG={target.config_path} p2porch get nodes")


@cli.command()
@click.option(
    "--dir",
    "base",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the demo nodes keep their data (default ./demo-cluster).",
)
@click.option("--down", is_flag=True, help="Stop the demo's agents and remove its containers.")
@click.option("--purge", is_flag=True, help="With --down: also delete the demo's data.")
@click.option(
    "--tour/--no-tour",
    default=True,
    help="After the app runs: ingress, scaling and a rolling update under load (default on).",
)
def demo(base: Path | None, down: bool, purge: bool, tour: bool) -> None:
    """Run a local 3-node cluster with the demo app (what scripts/demo.sh runs)."""
    if purge and not down:
        raise click.UsageError("--purge goes with --down")
    try:
        module = importlib.import_module("p2porch.cli.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "p2porch.cli.demo":
            raise
        click.echo(PLACEHOLDER_DEMO)
        return
    run_demo = module.run_demo
    accepted = inspect.signature(run_demo).parameters
    given = {"base": base, "down": down, "purge": purge, "tour": tour}
    code = run_demo(**{k: v for k, v in given.items() if k in accepted})
    raise click.exceptions.Exit(code if isinstance(code, int) else 0)


# --------------------------------------------------------------------------- cluster commands


@cli.group(cls=P2porchGroup, invoke_without_command=True)
@click.pass_context
def token(ctx: click.Context) -> None:
    """Print the join token (for `p2porch join PEER --token ...`); `token rotate` replaces it."""
    if ctx.invoked_subcommand is not None:
        return
    answer = api().token_info()
    click.echo(answer["token"])
    expires = answer.get("expiresAt")
    if isinstance(expires, int | float) and not isinstance(expires, bool):
        out.echo_err(f"(expires {format_epoch(expires)})")


def parse_duration(text: str) -> float:
    """``1h``, ``30m``, ``3600s``, ``1h30m``, ``2d`` or plain seconds -> seconds (> 0).

    ValueError with the reason when malformed.
    """
    raw = text.strip().lower()
    if not raw:
        raise ValueError("empty duration")
    try:
        seconds = float(raw)
    except ValueError:
        units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
        parts = re.findall(r"(\d+(?:\.\d+)?)([dhms])", raw)
        if not parts or "".join(n + u for n, u in parts) != raw:
            raise ValueError(
                f"not a duration: {text!r} (expected e.g. 1h, 30m, 3600s, 1h30m or 2d)"
            ) from None
        seconds = sum(float(n) * units[u] for n, u in parts)
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"the duration must be positive, got {text!r}")
    return seconds


def format_epoch(seconds: float) -> str:
    """Seconds since the epoch as ``2026-11-27 21:00:00 UTC``."""
    try:
        when = dt.datetime.fromtimestamp(seconds, dt.UTC)
    except (OverflowError, ValueError, OSError):  # beyond what datetime can show
        return f"{seconds:.0f} s after 1970-01-01 UTC"
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@token.command("rotate")
@click.option(
    "--ttl",
    "ttl_s",
    metavar="DURATION",
    default=None,
    callback=_duration_option,
    help="The new token expires after this long (1h, 30m, 3600s); default: never.",
)
@click.option("-o", "--output", "fmt", type=click.Choice(["text", "json", "yaml"]), default="text")
def token_rotate(ttl_s: float | None, fmt: str) -> None:
    """Make a new join token; every older token stops working at once."""
    answer = api().rotate_token(ttl_s)
    if fmt != "text":
        out.emit_data(answer, fmt)
        return
    click.echo(answer["token"])
    expires = answer.get("expiresAt")
    if isinstance(expires, int | float) and not isinstance(expires, bool):
        out.echo_err(f"new join token; it expires {format_epoch(expires)}")
    else:
        out.echo_err("new join token; it does not expire (until the next rotation)")
    out.echo_err("older tokens no longer work (nodes that already joined are not affected)")


@cli.command()
def leave() -> None:
    """Make the selected node leave the cluster gracefully."""
    answer = api().leave()
    who = answer.get("name") or answer.get("node")
    click.echo(f"node {who or runtime().target().display} is leaving the cluster")


@cli.group(cls=P2porchGroup)
def node() -> None:
    """Manage cluster members."""


@node.command("rm")
@click.argument("name")
def node_rm(name: str) -> None:
    """Remove a dead or leaving node; its replicas move."""
    api().remove_node(name)
    click.echo(f"node {name} removed")


@node.command("drain")
@click.argument("name")
@click.option("--undo", is_flag=True, help="Allow placements on the node again.")
def node_drain(name: str, undo: bool) -> None:
    """Stop placing replicas on NAME and move its replicas away (--undo reverts)."""
    api().drain(name, not undo)
    click.echo(f"node {name} {'undrained' if undo else 'drained'}")


@cli.command()
@click.option(
    "-o", "--output", "fmt", type=click.Choice(["table", "json", "yaml"]), default="table"
)
def status(fmt: str) -> None:
    """This node's view of the cluster: role, leader, term, quorum, members."""
    client = api()
    info = client.status()
    if fmt != "table":
        out.emit_data(info, fmt)
        return
    members = info.get("members") or {}
    summary = ", ".join(f"{members.get(k, 0)} {k}" for k in ("alive", "suspect", "dead", "left"))
    leader = info.get("leader") or "none known"
    click.echo(
        out.key_values(
            [
                ("Node", f"{info.get('node')} ({info.get('address')})"),
                ("API", client.target.display),
                ("Role", info.get("role")),
                ("Leader", f"{leader} (term {info.get('term')})"),
                ("Quorum", "yes" if info.get("quorum") else "NO: writes are refused"),
                ("Log", f"commit {info.get('commitIndex')}, applied {info.get('appliedIndex')}"),
                ("Members", summary),
                ("Version", info.get("version")),
            ]
        )
    )
    try:
        nodes = client.nodes()
    except ClientError as exc:
        out.echo_err(f"(cannot list members: {exc})")
        return
    if nodes:
        click.echo("")
        click.echo(out.nodes_table(nodes, wide=False))


@cli.command()
def rebalance() -> None:
    """Move replicas to even out load across nodes."""
    moves = api().rebalance().get("moves") or []
    if not moves:
        click.echo("nothing to move: the cluster is balanced")
        return
    click.echo(out.moves_table(moves))
    click.echo(f"{len(moves)} replica{'s' if len(moves) != 1 else ''} moving")


# --------------------------------------------------------------------------- manifests


def load_files(files: Sequence[str]) -> list[dict[str, Any]]:
    """Parse every file (``-`` is stdin, a folder means its *.yaml/*.yml) before sending any.

    All problems of all files are reported together, as one ManifestError.
    """
    problems: list[ManifestProblem] = []
    documents: list[dict[str, Any]] = []
    for name in files:
        paths: list[Path | None]
        if name == "-":
            paths = [None]
        elif Path(name).is_dir():
            paths = [p for p in sorted(Path(name).iterdir()) if p.suffix in (".yaml", ".yml")]
        else:
            paths = [Path(name)]
        for path in paths:
            try:
                if path is None:
                    records = parse_manifests(sys.stdin.read(), "<stdin>")
                else:
                    records = load_manifest_file(path)
            except ManifestError as exc:
                problems.extend(exc.problems)
                continue
            documents.extend(to_manifest(record) for record in records)
    if problems:
        raise ManifestError(problems)
    if not documents:
        fail("no documents in " + ", ".join(files))
    return documents


def _doc_ref(doc: Mapping[str, Any]) -> str:
    kind = str(doc.get("kind", "?")).lower()
    name = out.dig(doc, "name") or out.dig(doc, "metadata", "name")
    namespace = out.dig(doc, "namespace") or out.dig(doc, "metadata", "namespace")
    return f"{kind} {namespace}/{name}" if namespace and kind != "namespace" else f"{kind} {name}"


_files_option = click.option(
    "-f",
    "--filename",
    "files",
    multiple=True,
    metavar="FILE",
    help="Manifest file (repeatable; '-' reads stdin; a folder reads its *.yaml).",
)
_wait_options = [
    click.option("--wait", is_flag=True, help="Show progress until every replica runs."),
    click.option(
        "--timeout",
        "timeout_s",
        type=click.FloatRange(min=0),
        default=DEFAULT_WAIT_TIMEOUT_S,
        show_default=True,
        help="Seconds --wait waits before failing.",
    ),
]


def _with_wait(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_wait_options):
        func = option(func)
    return func


@cli.command()
@_files_option
@_with_wait
def apply(files: tuple[str, ...], wait: bool, timeout_s: float) -> None:
    """Create or update the Apps and Namespaces of manifest files."""
    if not files:
        raise click.UsageError("give at least one -f FILE")
    documents = load_files(files)
    answer = api().apply(documents)
    results = answer.get("results") or []
    for result in results:
        click.echo(f"{_doc_ref(result)} {result.get('action', 'applied')}")
    if wait:
        apps = [
            (str(d["metadata"].get("namespace", "default")), str(d["metadata"]["name"]))
            for d in documents
            if d.get("kind") == "App"
        ]
        wait_for_apps(apps, timeout_s)


@cli.group(cls=P2porchGroup, invoke_without_command=True)
@_files_option
@click.pass_context
def delete(ctx: click.Context, files: tuple[str, ...]) -> None:
    """Delete what manifest files name (-f), or one app / namespace."""
    if ctx.invoked_subcommand is not None:
        if files:
            raise click.UsageError("use either -f FILE or a subcommand, not both")
        return
    if not files:
        raise click.UsageError("give -f FILE, or `delete app NAME`")
    documents = load_files(files)
    answer = api().delete_documents(documents)
    results = answer.get("results")
    if isinstance(results, list) and results:
        for result in results:
            click.echo(f"{_doc_ref(result)} {result.get('action', 'deleted')}")
    else:
        for doc in documents:
            click.echo(f"{_doc_ref(doc)} deleted")


_namespace_option = click.option(
    "-n", "--namespace", default="default", show_default=True, help="Namespace of the app."
)


@delete.command("app")
@click.argument("name")
@_namespace_option
def delete_app(name: str, namespace: str) -> None:
    """Delete an app; its replicas stop."""
    api().delete_app(namespace, name)
    click.echo(f"app {namespace}/{name} deleted")


@delete.command("namespace")
@click.argument("name")
def delete_namespace(name: str) -> None:
    """Delete an empty namespace."""
    api().delete_namespace(name)
    click.echo(f"namespace {name} deleted")


def _parse_env(values: Sequence[str]) -> list[dict[str, str]]:
    env = []
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected K=V, got {item!r}", param_hint="--env")
        env.append({"name": key, "value": value})
    return env


def _parse_publish(values: Sequence[str]) -> list[dict[str, Any]]:
    ports = []
    for item in values:
        text, _, protocol = item.partition("/")
        published, sep, container = text.rpartition(":")
        try:
            port: dict[str, Any] = {"containerPort": int(container)}
            if sep:
                port["publishedPort"] = int(published)
        except ValueError:
            raise click.BadParameter(
                f"expected PUBLISHED:CONTAINER[/tcp|udp] or CONTAINER, got {item!r}",
                param_hint="--publish",
            ) from None
        port["protocol"] = protocol or "tcp"
        ports.append(port)
    return ports


@cli.command()
@click.argument("name")
@click.option("--image", required=True, help="Image reference, e.g. p2porch/demo:latest.")
@click.option("--replicas", type=click.IntRange(0, 10_000), default=1, show_default=True)
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment variable.")
@click.option(
    "--publish", "-p", multiple=True, metavar="P:C", help="Publish container port C on P."
)
@click.option("--cpu", help="CPU limit (and request), e.g. 250m or 0.5.")
@click.option("--memory", help="Memory limit (and request), e.g. 64Mi.")
@click.option(
    "--command",
    "as_command",
    is_flag=True,
    help="Trailing arguments replace the image's entrypoint (else its CMD).",
)
@click.option("-n", "--namespace", default="default", show_default=True)
@click.argument("args", nargs=-1)
@_with_wait
def run(  # click passes keywords
    *,
    name: str,
    image: str,
    replicas: int,
    env: tuple[str, ...],
    publish: tuple[str, ...],
    cpu: str | None,
    memory: str | None,
    as_command: bool,
    namespace: str,
    args: tuple[str, ...],
    wait: bool,
    timeout_s: float,
) -> None:
    """Create or replace app NAME from flags: `run web --image IMG -- ARG...`."""
    spec: dict[str, Any] = {"image": image, "replicas": replicas}
    if args:
        spec["command" if as_command else "args"] = list(args)
    elif as_command:
        raise click.UsageError("--command needs the command after --")
    if env:
        spec["env"] = _parse_env(env)
    if publish:
        spec["ports"] = _parse_publish(publish)
    limits = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v is not None}
    if limits:
        spec["resources"] = {"limits": limits}
    document = {
        "apiVersion": "p2porch/v1",
        "kind": "App",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    # The manifest parser holds every rule; run it so flag mistakes read like field errors.
    try:
        records = parse_manifests(yaml.safe_dump(document, sort_keys=False), "run")
    except ManifestError as exc:
        out.echo_err("error: invalid app:")
        for problem in exc.problems:
            out.echo_err(
                f"  {problem.path}: {problem.message}" if problem.path else f"  {problem.message}"
            )
        raise click.exceptions.Exit(1) from None
    record = records[0]
    assert isinstance(record, App)
    stored = api().put_app(namespace, name, to_manifest(record))
    generation = out.dig(stored, "metadata", "generation")
    suffix = f" (generation {generation})" if generation is not None else ""
    click.echo(f"app {namespace}/{name} applied{suffix}")
    if wait:
        wait_for_apps([(namespace, name)], timeout_s)


@cli.command()
@click.argument("target", metavar="NAME=N")
@_namespace_option
def scale(target: str, namespace: str) -> None:
    """Set the number of replicas of an app."""
    name, sep, count = target.partition("=")
    if not sep or not name or not count.isdigit():
        raise click.BadParameter(f"expected NAME=N, got {target!r}", param_hint="NAME=N")
    api().scale(namespace, name, int(count))
    click.echo(f"app {namespace}/{name} scaled to {int(count)}")


# --------------------------------------------------------------------------- get / describe


_output_option = click.option(
    "-o", "--output", "fmt", type=click.Choice(out.FORMATS), default="table", show_default=True
)


def _list_namespace(namespace: str | None, all_namespaces: bool) -> str | None:
    if namespace and all_namespaces:
        raise click.UsageError("-n and -A exclude each other")
    return namespace


_list_ns_options = [
    click.option("-n", "--namespace", default=None, help="Only this namespace."),
    click.option("-A", "--all-namespaces", is_flag=True, help="Every namespace (the default)."),
]


def _with_list_ns(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_list_ns_options):
        func = option(func)
    return func


def _show(items: Any, fmt: str, table: Callable[[Sequence[Any], bool], str], what: str) -> None:
    if fmt in ("json", "yaml"):
        out.emit_data(items, fmt)
        return
    rows = items if isinstance(items, list) else [items]
    if not rows:
        out.echo_err(f"no {what}")
        return
    click.echo(table(rows, fmt == "wide"))


@cli.group(cls=GetGroup)
def get() -> None:
    """List apps, replicas, nodes or namespaces (all namespaces unless -n)."""


@get.command("apps")
@click.argument("name", required=False)
@_with_list_ns
@_output_option
def get_apps(name: str | None, namespace: str | None, all_namespaces: bool, fmt: str) -> None:
    """Apps with their running/desired counts (NAME: just that one, in -n or default)."""
    ns = _list_namespace(namespace, all_namespaces)
    client = api()
    apps: Any = client.app(ns or "default", name) if name else client.apps(ns)
    if fmt in ("table", "wide"):
        rows = apps if isinstance(apps, list) else [apps]
        if any(out.dig(a, "status", "running") is None for a in rows):
            rows = _with_running_counts(client, rows, ns)
        _show(rows, fmt, out.apps_table, "apps")
    else:
        _show(apps, fmt, out.apps_table, "apps")


def _with_running_counts(client: ApiClient, apps: list[Any], ns: str | None) -> list[Any]:
    """Copies of ``apps`` whose status has ``running``, counted from the replica list.

    For servers whose app status lacks the count; only the table shows it, json/yaml stay
    exactly what the API said.
    """
    counts: dict[tuple[str, str], int] = {}
    for replica in client.replicas(ns):
        if replica.get("state") in ("running", "succeeded"):
            key = (str(replica.get("namespace")), str(replica.get("app")))
            counts[key] = counts.get(key, 0) + 1
    shown = []
    for app in apps:
        key = (str(out.dig(app, "metadata", "namespace")), str(out.dig(app, "metadata", "name")))
        status_ = dict(app.get("status") or {})
        status_.setdefault("running", counts.get(key, 0))
        shown.append({**app, "status": status_})
    return shown


@get.command("replicas")
@_with_list_ns
@click.option("--app", default=None, help="Only replicas of this app.")
@_output_option
def get_replicas(namespace: str | None, all_namespaces: bool, app: str | None, fmt: str) -> None:
    """Replicas with their node and state."""
    ns = _list_namespace(namespace, all_namespaces)
    _show(api().replicas(ns, app), fmt, out.replicas_table, "replicas")


@get.command("endpoints")
@_with_list_ns
@click.option("--app", default=None, help="Only endpoints of this app.")
@_output_option
def get_endpoints(namespace: str | None, all_namespaces: bool, app: str | None, fmt: str) -> None:
    """Ready replicas as the asked node routes to them (mesh, ingress, DNS)."""
    ns = _list_namespace(namespace, all_namespaces)
    params: dict[str, str | int] = {}
    if ns:
        params["namespace"] = ns
    if app:
        params["app"] = app
    _show(
        api().request("GET", "/v1/endpoints", params=params), fmt, out.endpoints_table, "endpoints"
    )


@get.command("nodes")
@click.argument("name", required=False)
@_output_option
def get_nodes(name: str | None, fmt: str) -> None:
    """Cluster members with their health and Raft role."""
    _show(api().node(name) if name else api().nodes(), fmt, out.nodes_table, "nodes")


@get.command("namespaces")
@_output_option
def get_namespaces(fmt: str) -> None:
    """Namespaces."""
    _show(api().namespaces(), fmt, out.namespaces_table, "namespaces")


@cli.group(cls=DescribeGroup)
def describe() -> None:
    """Everything about one app or node, for people."""


def _recent_events(client: ApiClient, match: Callable[[dict[str, Any]], bool]) -> list[str]:
    try:
        events = client.recent_events()
    except ClientError as exc:
        return [f"(events unavailable: {exc})"]
    return [out.event_line(e) for e in events if match(e)][-10:]


def _replica_of(app_key: str, key: str) -> bool:
    """``default/hello-2`` (a replica) or ``default/hello.2`` (a slot) of ``default/hello``."""
    return any(key.startswith(app_key + sep) and key[len(app_key) + 1 :].isdigit() for sep in "-.")


def _replica_summary(
    spec: Mapping[str, Any], status_: Mapping[str, Any], replicas: list[Any]
) -> str:
    """``3 desired, 2 running, 1 pending, 0 failed`` (from replicas where status lacks them)."""
    states = [r.get("state") for r in replicas]
    running = status_.get("running", sum(s in ("running", "succeeded") for s in states))
    failed = status_.get("failed", states.count("failed"))
    pending = status_.get("pending", len(states) - running - failed)
    return f"{spec.get('replicas')} desired, {running} running, {pending} pending, {failed} failed"


@describe.command("app")
@click.argument("name")
@_namespace_option
def describe_app(name: str, namespace: str) -> None:
    """An app: spec summary, replicas, pending reasons, recent events."""
    client = api()
    app = client.app(namespace, name)
    replicas = client.replicas(namespace, name)
    spec = app.get("spec") or {}
    status_ = app.get("status") or {}
    resources = spec.get("resources") or {}
    env = ", ".join(f"{e.get('name')}={e.get('value')}" for e in spec.get("env") or [])
    volumes = []
    for vol in spec.get("volumes") or []:
        source = vol.get("volume") or vol.get("hostPath")
        volumes.append(f"{source}->{vol.get('mountPath')}{' (ro)' if vol.get('readOnly') else ''}")
    policy = spec.get("restartPolicy")
    if isinstance(policy, dict):
        policy = f"{policy.get('policy')} (max {policy.get('maxRestarts')} restarts)"
    click.echo(
        out.key_values(
            [
                ("Name", out.dig(app, "metadata", "name")),
                ("Namespace", out.dig(app, "metadata", "namespace")),
                ("Generation", out.dig(app, "metadata", "generation")),
                ("Labels", out.dig(app, "metadata", "labels")),
                ("Image", spec.get("image")),
                ("Command", " ".join(spec.get("command") or [])),
                ("Args", " ".join(str(a) for a in spec.get("args") or [])),
                ("Env", env),
                ("Ports", out.app_ports(app)),
                ("Requests", resources.get("requests")),
                ("Limits", resources.get("limits")),
                ("Restart", policy),
                ("Placement", out.dig(spec, "placement", "constraints")),
                ("Volumes", ", ".join(volumes)),
                ("Replicas", _replica_summary(spec, status_, replicas)),
                ("Update", _update_summary(spec.get("update") or {})),
                ("Ingress", _ingress_summary(spec.get("ingress") or [])),
                ("Rollout", _rollout_summary(client, namespace, name)),
            ]
        )
    )
    click.echo("")
    if replicas:
        click.echo(out.replicas_table(replicas, wide=False))
    else:
        click.echo("No replicas placed.")
    reasons = status_.get("pendingReasons") or {}
    if reasons:
        click.echo("\nPending:")
        for replica, reason in reasons.items():
            click.echo(f"  {replica}: {reason}")
    key = f"{namespace}/{name}"
    lines = _recent_events(
        client, lambda e: e.get("key") == key or _replica_of(key, str(e.get("key")))
    )
    click.echo("\nEvents:" if lines else "\nEvents: none recent")
    for line in lines:
        click.echo(f"  {line}")


def _update_summary(update: Mapping[str, Any]) -> str:
    """``start-first, surge 1, unavailable 0, ready 2s, deadline 120s, on failure rollback``."""
    if not update:
        return ""
    return (
        f"{update.get('order')}, surge {update.get('maxSurge')}, unavailable "
        f"{update.get('maxUnavailable')}, ready {update.get('minReadySeconds')}s, deadline "
        f"{update.get('progressDeadlineSeconds')}s, on failure {update.get('failureAction')}"
    )


def _ingress_summary(routes: Sequence[Any]) -> str:
    return ", ".join(
        f"{r.get('host') or '*'}{r.get('path', '/')} -> {r.get('port')}"
        for r in routes
        if isinstance(r, dict)
    )


def _rollout_summary(client: ApiClient, namespace: str, name: str) -> str:
    """``revision 4 complete (3/3 updated, 3 ready)``, or why it is not known."""
    try:
        status_ = client.request("GET", f"/v1/apps/{namespace}/{name}/rollout")
    except ClientError as exc:
        return f"(unavailable: {exc})"
    if not isinstance(status_, dict):
        return ""
    text = (
        f"revision {status_.get('revision')} {status_.get('state')} "
        f"({status_.get('updated')}/{status_.get('replicas')} updated, "
        f"{status_.get('ready')} ready)"
    )
    if status_.get("paused"):
        text += ", paused by a user"
    if status_.get("message"):
        text += f": {status_.get('message')}"
    return text


@describe.command("node")
@click.argument("name")
def describe_node(name: str) -> None:
    """A node: address, health, role, resources, labels, its replicas, recent events."""
    client = api()
    info = client.node(name)
    replicas = client.replicas(node=name)
    click.echo(
        out.key_values(
            [
                ("Name", info.get("name")),
                ("Address", info.get("address")),
                ("API", info.get("apiAddress")),
                ("Status", info.get("status")),
                ("Role", info.get("role")),
                ("Drained", info.get("drained")),
                ("Labels", info.get("labels")),
                ("CPU", out.node_cpu(info)),
                ("Memory", out.node_memory(info)),
                ("Placements", info.get("placements")),
            ]
        )
    )
    click.echo("")
    if replicas:
        click.echo(out.replicas_table(replicas, wide=False))
    else:
        click.echo("No replicas on this node.")

    def about_node(event: dict[str, Any]) -> bool:
        obj = event.get("object")
        node_of = obj.get("node") if isinstance(obj, dict) else None
        return event.get("key") == name or node_of == name

    lines = _recent_events(client, about_node)
    click.echo("\nEvents:" if lines else "\nEvents: none recent")
    for line in lines:
        click.echo(f"  {line}")


# --------------------------------------------------------------------------- users, secrets, keys


@cli.group(cls=P2porchGroup)
def user() -> None:
    """Client credentials for people and scripts (admin: read and write; viewer: read)."""


@user.command("create")
@click.argument("name")
@click.option(
    "--role", type=click.Choice(list(pki.USER_ROLES)), required=True, help="What it may do."
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the credentials (default ./NAME-credentials).",
)
def user_create(name: str, role: str, out_dir: Path | None) -> None:
    """Issue a client certificate for NAME; writes a client.yaml folder to hand over.

    The private key is made here and never sent: the cluster CA signs a request for it.
    """
    try:
        pki.check_name(name)
    except pki.PkiError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    directory = (out_dir or Path(f"{name}-credentials")).expanduser().absolute()
    files = {"config": "client.yaml", "ca": "ca.pem", "cert": f"{name}.pem", "key": f"{name}.key"}
    taken = [f for f in files.values() if (directory / f).exists()]
    if taken:
        fail(f"{directory} already holds {', '.join(taken)}: remove them or choose another --out")
    key = pki.generate_key()
    client = api()
    answer = client.create_user(name, role, pki.make_request(key, name).decode())
    cert_text, ca_text = answer.get("certificate"), answer.get("ca")
    if not isinstance(cert_text, str) or not isinstance(ca_text, str):
        fail("the node answered POST /v1/users without a certificate and CA")
    try:
        cert = pki.load_cert(cert_text.encode())
        cas = pki.load_certs(ca_text.encode())
        identity = pki.identity_of(cert)
    except pki.PkiError as exc:
        fail(f"the node answered POST /v1/users with an unusable certificate: {exc}")
    if pki.key_id(cert.public_key()) != pki.key_id(key.public_key()):
        fail("the node answered POST /v1/users with a certificate for another key")
    if not any(pki.verify_issued_by(cert, ca) for ca in cas):
        fail("the node answered POST /v1/users with a certificate its CA bundle did not sign")
    config = dump_config(
        client.target.display,
        identity.cluster or client.target.cluster,
        files["ca"],
        files["cert"],
        files["key"],
    )
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_new(directory / files["key"], pki.key_pem(key), 0o600)
        _write_new(directory / files["cert"], cert_text.encode(), 0o644)
        _write_new(directory / files["ca"], ca_text.encode(), 0o644)
        _write_new(directory / files["config"], config.encode(), 0o644)
    except OSError as exc:
        fail(f"the certificate was issued, but writing {directory} failed: {exc}")
    until = cert.not_valid_after_utc.strftime("%Y-%m-%d")
    click.echo(f"user {identity.name} (role {identity.role}) created; valid until {until}")
    click.echo(f"credentials in {directory}:")
    click.echo(f"  client.yaml  ca.pem  {files['cert']}  {files['key']} (private key, mode 0600)")
    click.echo("use them with:")
    click.echo(f"  P2PORCH_CONFIG={directory / files['config']} p2porch get nodes")
    click.echo("hand the whole folder over privately; the key was made here and never sent.")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (never a moment world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


# Item names the node accepts (node/daemon.py put_secret), checked here to fail before sending.
_SECRET_KEY_RE = re.compile(r"[A-Za-z0-9._-]{1,253}")
# Secrets travel in the Raft log and every snapshot; Kubernetes draws the same 1 MiB line.
MAX_SECRET_BYTES = 1 << 20


def secret_data(from_files: Sequence[str], literals: Sequence[str]) -> dict[str, bytes]:
    """``--from-file [KEY=]PATH`` and ``--from-literal KEY=VALUE`` -> {KEY: bytes}.

    click.BadParameter names the option and item that is wrong; nothing is sent then.
    """
    data: dict[str, bytes] = {}

    def add(key: str, value: bytes, item: str, hint: str) -> None:
        if not _SECRET_KEY_RE.fullmatch(key):
            raise click.BadParameter(
                f"{item!r}: the key {key!r} may hold only letters, digits, '-', '.' and '_'",
                param_hint=hint,
            )
        if key in data:
            raise click.BadParameter(f"{item!r}: key {key!r} is given twice", param_hint=hint)
        data[key] = value

    for item in from_files:
        key, sep, path_text = item.partition("=")
        if not sep:
            key, path_text = Path(item).name, item
        path = Path(path_text).expanduser()
        if not path_text:
            raise click.BadParameter(f"{item!r}: no file after '='", param_hint="--from-file")
        try:
            with path.open("rb") as fh:  # never more than the limit (a wrong multi-GB path)
                value = fh.read(MAX_SECRET_BYTES + 1)
        except OSError as exc:
            raise click.BadParameter(
                f"cannot read {path}: {exc.strerror or exc}", param_hint="--from-file"
            ) from None
        add(key, value, item, "--from-file")
    for item in literals:
        key, sep, text = item.partition("=")
        if not sep:
            raise click.BadParameter(
                f"expected KEY=VALUE, got {item!r}", param_hint="--from-literal"
            )
        add(key, text.encode("utf-8"), item, "--from-literal")
    if not data:
        raise click.UsageError("give at least one --from-file [KEY=]PATH or --from-literal K=V")
    size = sum(len(v) for v in data.values())
    if size > MAX_SECRET_BYTES:
        raise click.UsageError(
            f"the secret holds {size} bytes; at most {MAX_SECRET_BYTES} (1 MiB) are accepted"
        )
    return data


@cli.group(cls=P2porchGroup)
def secret() -> None:
    """Secrets for apps (spec.secrets): stored encrypted, values never shown."""


_secret_namespace_option = click.option(
    "-n", "--namespace", default="default", show_default=True, help="Namespace of the secret."
)


@secret.command("create")
@click.argument("name")
@_secret_namespace_option
@click.option(
    "--from-file",
    "from_files",
    multiple=True,
    metavar="[KEY=]PATH",
    help="A file's bytes under KEY (default: the file's name). Repeatable.",
)
@click.option(
    "--from-literal",
    "literals",
    multiple=True,
    metavar="KEY=VALUE",
    help="A value given on the command line. Repeatable.",
)
def secret_create(
    name: str, namespace: str, from_files: tuple[str, ...], literals: tuple[str, ...]
) -> None:
    """Create or replace secret NAME from files and literals (at least one)."""
    data = secret_data(from_files, literals)
    answer = api().put_secret(namespace, name, data)
    keys = answer.get("keys") or sorted(data)
    count = len(keys)
    click.echo(
        f"secret {namespace}/{name} saved ({count} key{'s' if count != 1 else ''}: "
        f"{', '.join(str(k) for k in keys)})"
    )


@secret.command("ls")
@click.option("-n", "--namespace", default=None, help="Only this namespace (default: all).")
@_output_option
def secret_ls(namespace: str | None, fmt: str) -> None:
    """Secrets with their keys and the apps that use them (never their values)."""
    _show(api().secrets(namespace), fmt, out.secrets_table, "secrets")


@secret.command("rm")
@click.argument("name")
@_secret_namespace_option
def secret_rm(name: str, namespace: str) -> None:
    """Delete secret NAME."""
    api().delete_secret(namespace, name)
    click.echo(f"secret {namespace}/{name} deleted")


@cli.group(cls=P2porchGroup)
def ca() -> None:
    """The cluster's certificate authority."""


@ca.command("rotate")
@click.option(
    "--finish", is_flag=True, help="Resume a paused rotation (both CAs trusted) to its end."
)
@click.option(
    "--force",
    is_flag=True,
    help="Finish without members that do not confirm (they must join again).",
)
def ca_rotate(finish: bool, force: bool) -> None:
    """Replace the cluster CA with no member cut off; prints the new join token."""
    answer = api().rotate_ca(finish=finish, force=force)
    click.echo(f"cluster CA rotated: new fingerprint {answer.get('fingerprint')}")
    token = answer.get("token")
    if token:
        click.echo(f"join token: {token}")
    out.echo_err(
        "tokens and client credentials from the old CA no longer work: every node renewed its "
        "DATA_DIR/client.yaml; issue users new ones (p2porch user create NAME --role ROLE)"
    )


@cli.group(cls=P2porchGroup)
def keys() -> None:
    """The cluster's gossip encryption keys."""


@keys.command("rotate")
def keys_rotate() -> None:
    """Replace the gossip key on every live node, with no member lost on the way."""
    answer = api().rotate_keys()
    nodes = answer.get("nodes")
    click.echo(
        f"gossip key rotated: new primary key {answer.get('primary')}, "
        f"confirmed by {nodes} live node{'s' if nodes != 1 else ''}"
    )
    out.echo_err("(a node that is down now takes the new key from the log when it returns)")


# --------------------------------------------------------------------------- logs, exec, events


@cli.command()
@click.argument("replica")
@_namespace_option
@click.option("-f", "--follow", is_flag=True, help="Keep streaming new output.")
@click.option("--tail", type=click.IntRange(min=0), default=None, help="Only the last N lines.")
def logs(replica: str, namespace: str, follow: bool, tail: int | None) -> None:
    """Print a replica's output (proxied from the node that runs it)."""
    sink = sys.stdout.buffer
    try:
        for chunk in api().logs(namespace, replica, follow=follow, tail=tail):
            sink.write(chunk)
            sink.flush()
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130) from None


@cli.command(name="exec")
@click.argument("replica")
@_namespace_option
@click.argument("command", nargs=-1, required=True)
def exec_(replica: str, namespace: str, command: tuple[str, ...]) -> None:
    """Run `-- CMD...` in a replica; exits with the command's exit code."""
    answer = api().exec(namespace, replica, command)
    text = answer.get("output") or ""
    click.echo(text, nl=False)
    code = answer.get("exitCode")
    if not isinstance(code, int) or isinstance(code, bool):
        fail(f"the node did not report an exit code for {replica}")
    raise click.exceptions.Exit(code if 0 <= code <= 255 else 1)


@cli.command()
@click.option("-f", "--follow", is_flag=True, help="Keep streaming events as they happen.")
@click.option(
    "-o", "--output", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
def events(follow: bool, fmt: str) -> None:
    """Changes as the cluster applies them (recent history, or a live stream with -f)."""
    try:
        for event in api().events(follow=follow):
            if isinstance(event, str):
                click.echo(event)
            elif fmt == "json":
                click.echo(json.dumps(event, ensure_ascii=False))
            else:
                click.echo(out.event_line(event))
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130) from None


# --------------------------------------------------------------------------- rollouts

DEFAULT_ROLLOUT_TIMEOUT_S = 600.0
# Rollout states after which nothing moves until someone acts (resume, undo, a new apply).
_HALTED = ("paused", "failed")


def _app_path(namespace: str, name: str, *rest: str) -> str:
    parts = [quote(namespace, safe=""), quote(name, safe=""), *rest]
    return "/v1/apps/" + "/".join(parts)


def _rollout_call(method: str, namespace: str, name: str, *rest: str, body: Any = None) -> Any:
    answer = api().request(method, _app_path(namespace, name, *rest), body=body)
    if not isinstance(answer, dict | list):
        raise BadResponse(f"unexpected answer from {method} {_app_path(namespace, name, *rest)}")
    return answer


class RolloutDisplay(Protocol):
    def update(self, rollout: Mapping[str, Any], note: str) -> None: ...

    def close(self) -> None: ...


class RolloutLines:
    """Without a terminal: the status line again whenever it changes (logs, CI)."""

    def __init__(self) -> None:
        self._last = ""

    def update(self, rollout: Mapping[str, Any], note: str) -> None:
        line = note or out.rollout_line(rollout)
        if line != self._last:
            self._last = line
            click.echo(line)

    def close(self) -> None:
        pass


class RolloutBars:
    """On a terminal: two live bars (updated, ready) of the desired count, and the state."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        from rich.table import Column

        console = Console(file=sys.stdout)
        # The note is capped to what the line has left: rich would squeeze the bars out.
        note_width = max(console.width - 44, 10)
        # Refreshed on each poll, not by a background thread: the display moves exactly
        # when something new is known.
        self._progress = Progress(
            TextColumn("{task.description:>8}", table_column=Column(min_width=8, no_wrap=True)),
            BarColumn(bar_width=24),
            MofNCompleteColumn(table_column=Column(min_width=5, no_wrap=True)),
            TextColumn(
                "{task.fields[note]}",
                table_column=Column(no_wrap=True, overflow="ellipsis", max_width=note_width),
            ),
            console=console,
            auto_refresh=False,
        )
        self._updated = self._progress.add_task("updated", total=1, note="")
        self._ready = self._progress.add_task("ready", total=1, note="")
        self._progress.start()

    def update(self, rollout: Mapping[str, Any], note: str) -> None:
        total = _count(rollout.get("replicas"))
        revision = f"revision {out.cell(rollout.get('revision'))}"
        if rollout.get("fromRevision") and rollout.get("state") != "complete":
            revision += f" (from {rollout['fromRevision']})"
        state = out.rollout_state(rollout) if rollout else ""
        message = rollout.get("message")
        self._progress.update(
            self._updated,
            total=max(total, 1),
            completed=_count(rollout.get("updated")) if total else 1,
            note=revision,
        )
        self._progress.update(
            self._ready,
            total=max(total, 1),
            completed=_count(rollout.get("ready")) if total else 1,
            note=note or (f"{state}: {message}" if message else state),
        )
        self._progress.refresh()

    def close(self) -> None:
        self._progress.stop()


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@cli.group(cls=P2porchGroup)
def rollout() -> None:
    """Follow, pause, resume or undo an app's rolling update; list its revisions."""


@rollout.command("status")
@click.argument("name")
@_namespace_option
@click.option(
    "--watch/--no-watch",
    default=None,
    help="Follow until the rollout completes, pauses or times out "
    "(default: when stdout is a terminal).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_ROLLOUT_TIMEOUT_S,
    show_default=True,
    help="Seconds --watch follows before failing.",
)
def rollout_status(name: str, namespace: str, watch: bool | None, timeout_s: float) -> None:
    """Where an app's update stands: revision, updated and ready replicas.

    With --watch, exits 0 once the rollout is complete and 1 if it pauses (a user's pause
    or a failed update), fails or outlasts --timeout.
    """
    if watch is None:
        watch = out.stdout_is_terminal()
    if not watch:
        click.echo(out.rollout_line(_rollout_call("GET", namespace, name, "rollout")))
        return
    rt = runtime()
    start = rt.clock()
    deadline = start + timeout_s
    display: RolloutDisplay = RolloutBars() if out.is_terminal(sys.stdout) else RolloutLines()
    latest: Mapping[str, Any] = {}
    try:
        while True:
            note = ""
            try:
                latest = _rollout_call("GET", namespace, name, "rollout")
            except ApiError as exc:
                if exc.status == 404:
                    raise
                note = f"(retrying: {exc})"
            except ClientError as exc:  # a node restarting, a leader change: poll again
                note = f"(retrying: {exc})"
            if latest or note:
                display.update(latest, note)
            state = out.rollout_state(latest) if latest and not note else ""
            if state == "complete" or state in _HALTED:
                break
            now = rt.clock()
            if now >= deadline:
                display.close()
                where = out.rollout_line(latest) if latest else note
                fail(f"timed out after {timeout_s:g}s: {where}")
            rt.sleep(min(rt.poll_interval_s, max(deadline - now, 0.0)))
    finally:
        display.close()
    if state == "complete":
        elapsed = rt.clock() - start
        click.echo(
            f"rollout of {namespace}/{name} complete: revision {latest.get('revision')}, "
            f"{latest.get('ready')}/{latest.get('replicas')} ready ({elapsed:.0f}s)"
        )
        return
    why = latest.get("message") or ("paused by a user" if latest.get("paused") else state)
    out.echo_err(f"error: rollout of {namespace}/{name} {state}: {why}")
    out.echo_err(f"  {out.rollout_line(latest)}")
    ns_flag = f" -n {namespace}" if namespace != "default" else ""
    out.echo_err(
        f"  continue it with: p2porch rollout resume {name}{ns_flag}; "
        f"or go back with: p2porch rollout undo {name}{ns_flag}"
    )
    raise click.exceptions.Exit(1)


@rollout.command("history")
@click.argument("name")
@_namespace_option
@_output_option
def rollout_history(name: str, namespace: str, fmt: str) -> None:
    """An app's revisions, oldest first, with why each was made."""
    _show(_rollout_call("GET", namespace, name, "revisions"), fmt, out.revisions_table, "revisions")


@rollout.command("undo")
@click.argument("name")
@_namespace_option
@click.option(
    "--to-revision",
    "to_revision",
    type=click.IntRange(min=1),
    default=None,
    help="Go back to this revision (see rollout history); default: the one before the current.",
)
def rollout_undo(name: str, namespace: str, to_revision: int | None) -> None:
    """Roll an app back to an earlier revision (a new rolling update)."""
    body = {} if to_revision is None else {"toRevision": to_revision}
    answer = _rollout_call("POST", namespace, name, "rollout", "undo", body=body)
    click.echo(f"app {namespace}/{name} rolling back to revision {answer.get('revision')}")


def _pause(name: str, namespace: str, paused: bool) -> None:
    action = "pause" if paused else "resume"
    answer = _rollout_call("POST", namespace, name, "rollout", action)
    done = "paused" if paused else "resumed"
    click.echo(f"rollout of {namespace}/{name} revision {answer.get('revision')} {done}")


@rollout.command("pause")
@click.argument("name")
@_namespace_option
def rollout_pause(name: str, namespace: str) -> None:
    """Stop moving replicas to the new revision (those already moved stay)."""
    _pause(name, namespace, True)


@rollout.command("resume")
@click.argument("name")
@_namespace_option
def rollout_resume(name: str, namespace: str) -> None:
    """Continue a paused rollout (also one the controller paused after a failure)."""
    _pause(name, namespace, False)


# --------------------------------------------------------------------------- apply --wait


@attrs.frozen
class AppProgress:
    """One poll's view of an app: how far it is from all replicas running."""

    key: str
    desired: int
    running: int
    pending: int
    failed: int
    problems: tuple[str, ...] = ()
    error: str = ""

    @property
    def done(self) -> bool:
        return not self.error and self.running >= self.desired

    def line(self) -> str:
        text = f"{self.key}: {self.running}/{self.desired} running"
        extra = [f"{n} {w}" for n, w in ((self.pending, "pending"), (self.failed, "failed")) if n]
        if self.error:
            extra.append(self.error)
        return f"{text} ({', '.join(extra)})" if extra else text


def poll_app(client: ApiClient, namespace: str, name: str) -> AppProgress:
    """Current replicas vs desired, counting only replicas of the current generation."""
    key = f"{namespace}/{name}"
    app = client.app(namespace, name)
    desired = int(out.dig(app, "spec", "replicas", default=0) or 0)
    generation = out.dig(app, "metadata", "generation")
    replicas = client.replicas(namespace, name)
    running = pending = failed = 0
    problems: list[str] = []
    reasons = out.dig(app, "status", "pendingReasons", default={}) or {}
    for replica in replicas:
        state = replica.get("state")
        current = generation is None or replica.get("generation") in (None, generation)
        if state in ("running", "succeeded") and current:
            running += 1
            continue
        if state == "failed":
            failed += 1
        else:
            pending += 1
        rname = replica.get("name")
        reason = reasons.get(rname) or replica.get("reason") or ""
        what = state if current else f"{state}, old generation {replica.get('generation')}"
        exit_code = replica.get("exitCode")
        if exit_code is not None:
            what += f", exit code {exit_code}"
        problems.append(f"{rname} ({what}){': ' + reason if reason else ''}")
    listed = {r.get("name") for r in replicas}
    for rname, reason in reasons.items():
        if rname not in listed:
            pending += 1
            problems.append(f"{rname} (not placed): {reason}")
    return AppProgress(key, desired, min(running, desired), pending, failed, tuple(problems))


class WaitDisplay(Protocol):
    def update(self, progress: Sequence[AppProgress]) -> None: ...

    def close(self) -> None: ...


class LineDisplay:
    """Without a terminal: one line per app whenever its counts change (logs, CI)."""

    def __init__(self) -> None:
        self._last: dict[str, str] = {}

    def update(self, progress: Sequence[AppProgress]) -> None:
        for item in progress:
            line = item.line()
            if self._last.get(item.key) != line:
                self._last[item.key] = line
                out.echo_err(line)

    def close(self) -> None:
        pass


class RichDisplay:
    """On a terminal: a rich progress bar per app."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self._tasks: dict[str, Any] = {}
        self._progress.start()

    def update(self, progress: Sequence[AppProgress]) -> None:
        for item in progress:
            note = ", ".join(
                f"{n} {w}" for n, w in ((item.pending, "pending"), (item.failed, "failed")) if n
            )
            if item.error:
                note = item.error
            if item.key not in self._tasks:
                self._tasks[item.key] = self._progress.add_task(
                    item.key, total=max(item.desired, 1), note=note
                )
            self._progress.update(
                self._tasks[item.key],
                total=max(item.desired, 1) if item.desired else 1,
                completed=item.running if item.desired else 1,
                note=note,
            )

    def close(self) -> None:
        self._progress.stop()


def _display() -> WaitDisplay:
    if out.is_terminal(sys.stderr):
        return RichDisplay()
    return LineDisplay()


def wait_for_apps(apps: Sequence[tuple[str, str]], timeout_s: float) -> None:
    """Poll until every app has all replicas of its current generation running.

    Read errors (a node restarting, a leader change) are retried until the deadline; on
    timeout the pending and failed replicas are listed with their reasons, and the exit
    code is 1.
    """
    if not apps:
        return
    rt = runtime()
    client = rt.api()
    start = rt.clock()
    deadline = start + timeout_s
    display = _display()
    latest: list[AppProgress] = []
    try:
        while True:
            latest = []
            for namespace, name in apps:
                try:
                    latest.append(poll_app(client, namespace, name))
                except ApiError as exc:
                    if exc.status == 404:
                        raise
                    latest.append(AppProgress(f"{namespace}/{name}", 0, 0, 0, 0, (), str(exc)))
                except ClientError as exc:
                    latest.append(AppProgress(f"{namespace}/{name}", 0, 0, 0, 0, (), str(exc)))
            display.update(latest)
            if all(item.done for item in latest):
                break
            now = rt.clock()
            if now >= deadline:
                display.close()
                out.echo_err(f"error: timed out after {timeout_s:g}s waiting for replicas to run")
                for item in latest:
                    if item.done:
                        continue
                    out.echo_err(f"  {item.line()}")
                    for problem in item.problems:
                        out.echo_err(f"    {problem}")
                raise click.exceptions.Exit(1)
            rt.sleep(min(rt.poll_interval_s, max(deadline - now, 0.0)))
    finally:
        display.close()
    total = sum(item.desired for item in latest)
    elapsed = rt.clock() - start
    out.echo_err(f"all {total} replica{'s' if total != 1 else ''} running ({elapsed:.0f}s)")


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Console-script entry: run the command tree, return its exit code."""
    try:
        cli.main(args=argv, prog_name="p2porch", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        return code if isinstance(code, int) else 1


if __name__ == "__main__":
    sys.exit(main())
