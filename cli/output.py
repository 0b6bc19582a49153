"""Rendering API objects for people (tables, text) and for programs (json, yaml).

``-o json`` and ``-o yaml`` dump what the API answered, untouched, so scripts see exactly the
documented shapes. Tables pick columns per kind; ``wide`` adds the ones that matter less
often. Tables are drawn by rich into a string and echoed through click, so they go wherever
click's stdout goes (a pipe, a test runner) and lose trailing padding; colour only on a
terminal.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import click
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from p2porch.node.manifest import format_cpu, format_memory

FORMATS = ("table", "wide", "json", "yaml")
PIPE_WIDTH = 1000

_STATE_STYLES = {
    "running": "green",
    "succeeded": "green",
    "alive": "green",
    "pending": "yellow",
    "starting": "yellow",
    "suspect": "yellow",
    "unknown": "yellow",
    "failed": "red",
    "dead": "red",
    "left": "dim",
}


def stdout_is_terminal() -> bool:
    return is_terminal(sys.stdout)


def is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty()) if callable(isatty) else False


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False)


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def emit_data(data: Any, fmt: str) -> None:
    """Print ``data`` as json or yaml (exact API objects)."""
    if fmt == "json":
        click.echo(dump_json(data))
    else:
        click.echo(dump_yaml(data), nl=False)


def render_table(table: Table) -> str:
    """A rich table as text: colour and terminal width only when stdout is a terminal."""
    terminal = stdout_is_terminal()
    width = shutil.get_terminal_size((120, 24)).columns if terminal else PIPE_WIDTH
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=width,
        force_terminal=terminal,
        no_color=not terminal,
        highlight=False,
        color_system="auto" if terminal else None,
    )
    console.print(table)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def make_table(columns: Sequence[str]) -> Table:
    table = Table(
        box=None, show_edge=False, pad_edge=False, header_style="bold", padding=(0, 3, 0, 0)
    )
    for column in columns:
        table.add_column(column, no_wrap=True, overflow="fold")
    return table


def styled(value: str) -> Text:
    return Text(value, style=_STATE_STYLES.get(value, ""))


def cell(value: object) -> str:
    """One table cell: '-' for missing, compact for containers."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def echo_err(message: str) -> None:
    click.echo(message, err=True)


# --------------------------------------------------------------------------- field access


def dig(obj: Any, *path: str, default: Any = None) -> Any:
    """``dig(app, "metadata", "name")`` without KeyErrors on odd shapes."""
    current = obj
    for key in path:
        if not isinstance(current, Mapping) or key not in current:
            return default
        current = current[key]
    return current


def app_ports(app: Mapping[str, Any]) -> str:
    parts = []
    for port in dig(app, "spec", "ports", default=[]) or []:
        if not isinstance(port, Mapping):
            continue
        text = f"{port.get('containerPort')}/{port.get('protocol', 'tcp')}"
        if port.get("publishedPort") is not None:
            text = f"{port['publishedPort']}->{text}"
        parts.append(text)
    return ",".join(parts)


def replica_ports(replica: Mapping[str, Any]) -> str:
    published = replica.get("publishedPorts") or {}
    if not isinstance(published, Mapping):
        return cell(published)
    return ",".join(f"{host}->{port}" for port, host in published.items())


def node_cpu(node: Any) -> object:
    """``cpu`` as the API documents it, else formatted from ``cpuMillicores``."""
    millis = dig(node, "cpuMillicores")
    if dig(node, "cpu") is None and isinstance(millis, int):
        return format_cpu(millis)
    return dig(node, "cpu")


def node_memory(node: Any) -> object:
    num_bytes = dig(node, "memoryBytes")
    if dig(node, "memory") is None and isinstance(num_bytes, int):
        return format_memory(num_bytes)
    return dig(node, "memory")


def namespace_name(ns: Any) -> str:
    if isinstance(ns, str):
        return ns
    return str(dig(ns, "metadata", "name") or dig(ns, "name") or "?")


# --------------------------------------------------------------------------- tables


def _rows(
    objects: Iterable[Any],
    columns: Sequence[tuple[str, Callable[[Any], object]]],
    styled_columns: Sequence[str] = (),
) -> str:
    table = make_table([name for name, _ in columns])
    for obj in objects:
        row: list[str | Text] = []
        for name, getter in columns:
            text = cell(getter(obj))
            row.append(styled(text) if name in styled_columns else text)
        table.add_row(*row)
    return render_table(table)


def apps_table(apps: Sequence[Any], wide: bool) -> str:
    def ready(app: Any) -> str:
        desired = dig(app, "status", "replicas", default=dig(app, "spec", "replicas"))
        return f"{dig(app, 'status', 'running', default=0)}/{cell(desired)}"

    columns: list[tuple[str, Callable[[Any], object]]] = [
        ("NAME", lambda a: dig(a, "metadata", "name")),
        ("NAMESPACE", lambda a: dig(a, "metadata", "namespace")),
        ("IMAGE", lambda a: dig(a, "spec", "image")),
        ("RUNNING", ready),
        ("PENDING", lambda a: dig(a, "status", "pending", default=0)),
        ("FAILED", lambda a: dig(a, "status", "failed", default=0)),
    ]
    if wide:
        columns += [
            ("GENERATION", lambda a: dig(a, "metadata", "generation")),
            ("REVISION", lambda a: dig(a, "status", "revision")),
            ("ROLLOUT", lambda a: dig(a, "status", "rollout")),
            ("PORTS", app_ports),
            ("CPU", lambda a: dig(a, "spec", "resources", "requests", "cpu")),
            ("MEMORY", lambda a: dig(a, "spec", "resources", "requests", "memory")),
            ("LABELS", lambda a: dig(a, "metadata", "labels")),
        ]
    return _rows(apps, columns)


def replicas_table(replicas: Sequence[Any], wide: bool) -> str:
    columns: list[tuple[str, Callable[[Any], object]]] = [
        ("NAME", lambda r: dig(r, "name")),
        ("NAMESPACE", lambda r: dig(r, "namespace")),
        ("APP", lambda r: dig(r, "app")),
        ("NODE", lambda r: dig(r, "node")),
        ("STATE", lambda r: dig(r, "state")),
        ("READY", lambda r: dig(r, "ready")),
        ("RESTARTS", lambda r: dig(r, "restarts", default=0)),
        ("REASON", lambda r: dig(r, "reason")),
    ]
    if wide:
        columns += [
            ("LAST TERMINATION", lambda r: dig(r, "lastTermination")),
            ("EXIT", lambda r: dig(r, "exitCode")),
            ("GENERATION", lambda r: dig(r, "generation")),
            ("CONTAINER", lambda r: str(dig(r, "containerId") or "")[:12]),
            ("PORTS", replica_ports),
        ]
    return _rows(replicas, columns, styled_columns=("STATE",))


def _endpoint_address(endpoint: Any) -> str:
    ports = dig(endpoint, "ports") or []
    return ", ".join(
        f"{dig(p, 'containerPort')}->{dig(p, 'host')}:{dig(p, 'hostPort')}"
        for p in ports
        if isinstance(p, dict)
    )


def endpoints_table(endpoints: Sequence[Any], wide: bool) -> str:
    """What the asked node's mesh, ingress and DNS route to right now."""
    columns: list[tuple[str, Callable[[Any], object]]] = [
        ("REPLICA", lambda e: dig(e, "replica")),
        ("NAMESPACE", lambda e: dig(e, "namespace")),
        ("APP", lambda e: dig(e, "app")),
        ("NODE", lambda e: dig(e, "node")),
        ("REVISION", lambda e: dig(e, "revision")),
        ("READY", lambda e: dig(e, "ready")),
        ("ADDRESS", _endpoint_address),
    ]
    if wide:
        columns.append(("CONTAINER", lambda e: str(dig(e, "containerId") or "")[:12]))
    return _rows(endpoints, columns)


def nodes_table(nodes: Sequence[Any], wide: bool) -> str:
    columns: list[tuple[str, Callable[[Any], object]]] = [
        ("NAME", lambda n: dig(n, "name")),
        ("ADDRESS", lambda n: dig(n, "address")),
        ("STATUS", lambda n: dig(n, "status")),
        ("ROLE", lambda n: dig(n, "role")),
        ("REPLICAS", lambda n: dig(n, "replicas", default=0)),
        ("DRAINED", lambda n: dig(n, "drained", default=False)),
    ]
    if wide:
        columns += [
            ("API", lambda n: dig(n, "apiAddress")),
            ("CPU", node_cpu),
            ("MEMORY", node_memory),
            ("LABELS", lambda n: dig(n, "labels")),
        ]
    return _rows(nodes, columns, styled_columns=("STATUS",))


def namespaces_table(namespaces: Sequence[Any], wide: bool) -> str:
    columns: list[tuple[str, Callable[[Any], object]]] = [("NAME", namespace_name)]
    if wide:
        columns += [
            ("LABELS", lambda n: dig(n, "metadata", "labels") or dig(n, "labels")),
            ("GENERATION", lambda n: dig(n, "metadata", "generation") or dig(n, "generation")),
        ]
    return _rows(namespaces, columns)


def secrets_table(secrets: Sequence[Any], wide: bool) -> str:
    """Names, keys and users of secrets: the API never sends values, and neither do we."""
    columns: list[tuple[str, Callable[[Any], object]]] = [
        ("NAME", lambda s: dig(s, "name")),
        ("NAMESPACE", lambda s: dig(s, "namespace")),
        ("KEYS", lambda s: dig(s, "keys")),
        ("USED BY", lambda s: dig(s, "usedBy")),
    ]
    if wide:
        columns.append(("VERSION", lambda s: dig(s, "version")))
    return _rows(secrets, columns)


def moves_table(moves: Sequence[Any]) -> str:
    return _rows(
        moves,
        [
            ("REPLICA", lambda m: dig(m, "replica")),
            ("FROM", lambda m: dig(m, "from")),
            ("TO", lambda m: dig(m, "to")),
        ],
    )


def _epoch(seconds: object) -> str:
    """Seconds since the epoch as ``2026-11-27 21:00:00 UTC`` ('-' when unknown or 0)."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0:
        return "-"
    try:
        when = dt.datetime.fromtimestamp(seconds, dt.UTC)
    except (OverflowError, ValueError, OSError):
        return "-"
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def revisions_table(revisions: Sequence[Any], wide: bool) -> str:
    """``rollout history``: one row per revision, oldest first (the API's order)."""
    columns: list[tuple[str, Callable[[Any], object]]] = [
        ("REVISION", lambda r: dig(r, "revision")),
        ("CAUSE", lambda r: dig(r, "cause")),
        ("CREATED", lambda r: _epoch(dig(r, "createdAt"))),
        ("CURRENT", lambda r: bool(dig(r, "current"))),
    ]
    if wide:
        columns.append(("TEMPLATE", lambda r: dig(r, "summary") or dig(r, "image")))
    return _rows(revisions, columns)


def rollout_state(rollout: Mapping[str, Any]) -> str:
    """``progressing``, ``paused`` (a user's pause shows as paused too), ``complete``..."""
    state = str(rollout.get("state") or "unknown")
    if rollout.get("paused") and state == "progressing":
        return "paused"
    return state


def rollout_line(rollout: Mapping[str, Any]) -> str:
    """``default/web revision 2: progressing, 1/3 updated, 1/3 ready (from revision 1)``."""
    total = cell(rollout.get("replicas"))
    text = (
        f"{rollout.get('namespace')}/{rollout.get('app')} revision {cell(rollout.get('revision'))}"
        f": {rollout_state(rollout)}, {cell(rollout.get('updated'))}/{total} updated, "
        f"{cell(rollout.get('ready'))}/{total} ready"
    )
    notes = []
    if rollout.get("state") != "complete":
        if rollout.get("rollbackOf"):
            notes.append(f"rolling back revision {rollout['rollbackOf']}")
        elif rollout.get("fromRevision"):
            notes.append(f"from revision {rollout['fromRevision']}")
        if rollout.get("paused"):
            notes.append("paused by a user")
    if notes:
        text += f" ({', '.join(notes)})"
    message = rollout.get("message")
    return f"{text}: {message}" if message else text


# --------------------------------------------------------------------------- events, errors


def event_line(event: Mapping[str, Any]) -> str:
    """``   812  placement  put      default/hello-0  node=n2`` -- one event per line."""
    obj = event.get("object")
    detail: list[str] = []
    if isinstance(obj, Mapping):
        for key in ("state", "node", "status", "generation", "reason"):
            value = obj.get(key)
            if value not in (None, "", {}):
                detail.append(f"{key}={value}")
        generation = dig(obj, "metadata", "generation")
        if generation is not None and "generation" not in obj:
            detail.append(f"generation={generation}")
    line = (
        f"{cell(event.get('index')):>7}  {cell(event.get('kind')):<10} "
        f"{cell(event.get('action')):<8} {cell(event.get('key'))}"
    )
    return f"{line}  {' '.join(detail)}" if detail else line


def format_detail(detail: Any) -> str:
    if isinstance(detail, Mapping):
        path, message = detail.get("path"), detail.get("message")
        if message is not None:
            return f"{path}: {message}" if path else str(message)
        return ", ".join(f"{k}={v}" for k, v in detail.items())
    return str(detail)


def key_values(pairs: Sequence[tuple[str, object]]) -> str:
    """Aligned ``Key:  value`` lines for describe/status."""
    width = max((len(k) for k, _ in pairs), default=0) + 2
    return "\n".join(f"{(k + ':'):<{width}}{cell(v)}" for k, v in pairs)


def flush_stdout() -> None:
    sys.stdout.flush()
