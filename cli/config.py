"""Which node the CLI talks to, and with which credentials.

Every node serves the whole API, so the client needs just one address. It is chosen, first
match wins:

1. ``--node ADDR[:PORT]`` (or the ``P2PORCH_NODE`` environment variable, its twin);
2. the ``server`` of the client config named by ``P2PORCH_CONFIG`` (which must exist);
3. the ``server`` of ``~/.config/p2porch/client.yaml`` (if it exists);
4. ``127.0.0.1:7950``, the node on this machine.

The config file also carries credentials (``credentials: {caFile, certFile, keyFile}``): the
cluster CA the node's certificate must chain to, and the client certificate and key the CLI
presents (a node writes an admin one to ``DATA_DIR/client.yaml``; ``p2porch user create``
issues more). They apply whichever way the address was chosen, because a node picked with
``--node`` still expects the cluster's client certificate. Relative paths are read from the
config file's folder, so a config directory can be copied as a whole.

Every node's API is HTTPS only (TLS 1.3), so an address without a scheme means ``https://``;
an explicit ``http://`` URL is kept as given (a proxy, a test server).

Pure: reads only the file it is told to read; the environment arrives as a mapping.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

from p2porch.common.errors import P2porchError

DEFAULT_PORT = 7950
DEFAULT_HOST = "127.0.0.1"
CONFIG_API_VERSION = "p2porch/v1"
CONFIG_KIND = "ClientConfig"
ENV_NODE = "P2PORCH_NODE"
ENV_CONFIG = "P2PORCH_CONFIG"
_CONFIG_FIELDS = ("apiVersion", "kind", "server", "cluster", "credentials")
_CREDENTIAL_FIELDS = ("caFile", "certFile", "keyFile")


class ConfigError(P2porchError):
    """The node address or the client config file is unusable (shown to the user as is)."""


@attrs.frozen
class Credentials:
    """Paths of the TLS material (absolute once loaded); all optional."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def present(self) -> bool:
        return any(p is not None for p in (self.ca_file, self.cert_file, self.key_file))

    def ssl_context(self) -> ssl.SSLContext:
        """The context httpx verifies the node with and presents our certificate from."""
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            if self.cert_file is not None:
                context.load_cert_chain(
                    str(self.cert_file), str(self.key_file) if self.key_file else None
                )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the client credentials: {exc}") from exc
        return context


@attrs.frozen
class Target:
    """Where requests go: ``base_url`` like ``https://127.0.0.2:7950``; ``source`` says why.

    ``config_path`` is the client.yaml the credentials came from (None: no config file in
    use), so error messages can name the file to fix or to use instead.
    """

    base_url: str
    source: str
    cluster: str | None = None
    credentials: Credentials = Credentials()
    config_path: Path | None = None

    @property
    def display(self) -> str:
        """The address as users typed it (no scheme), for messages."""
        return self.base_url.split("://", 1)[-1]


def parse_address(text: str) -> str:
    """``ADDR[:PORT]`` (or a full ``http(s)://`` URL) -> a base URL; ConfigError if malformed.

    Without a scheme the URL is ``https://``: the API speaks nothing else.
    """
    raw = text.strip()
    if not raw:
        raise ConfigError("the node address is empty")
    if "://" in raw:
        scheme, rest = raw.split("://", 1)
        if scheme not in ("http", "https"):
            raise ConfigError(f"unsupported scheme {scheme!r} in node address {text!r}")
        raw = rest.rstrip("/")
    else:
        scheme = "https"
    if raw.startswith("["):  # [v6]:port
        host, sep, port_text = raw[1:].partition("]")
        if not sep:
            raise ConfigError(f"unclosed '[' in node address {text!r}")
        port_text = port_text.removeprefix(":")
        host = f"[{host}]"
    elif raw.count(":") > 1:  # a bare IPv6 address: no port possible
        host, port_text = f"[{raw}]", ""
    else:
        host, _, port_text = raw.partition(":")
    if not host or host == "[]" or "/" in host or " " in host:
        raise ConfigError(f"not a node address: {text!r} (expected ADDR[:PORT])")
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ConfigError(f"bad port {port_text!r} in node address {text!r}")
        port = int(port_text)
    else:
        port = DEFAULT_PORT
    return f"{scheme}://{host}:{port}"


def default_config_path(home: Path) -> Path:
    return home / ".config" / "p2porch" / "client.yaml"


def _path(value: object, field: str, base: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: credentials.{field} must be a file path")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def dump_config(
    server: str, cluster: str | None, ca_file: str, cert_file: str, key_file: str
) -> str:
    """A client.yaml in the format :func:`load_config` reads (file paths relative to it)."""
    data: dict[str, Any] = {"apiVersion": CONFIG_API_VERSION, "kind": CONFIG_KIND}
    data["server"] = server
    if cluster:
        data["cluster"] = cluster
    data["credentials"] = {"caFile": ca_file, "certFile": cert_file, "keyFile": key_file}
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def load_config(path: Path) -> dict[str, Any]:
    """Read and check a client.yaml; returns its mapping with credential paths made absolute."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the client config {where}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with apiVersion, kind and server")
    unknown = sorted(str(k) for k in data if k not in _CONFIG_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
    if data.get("apiVersion", CONFIG_API_VERSION) != CONFIG_API_VERSION:
        raise ConfigError(f"{where}: apiVersion must be {CONFIG_API_VERSION}")
    if data.get("kind", CONFIG_KIND) != CONFIG_KIND:
        raise ConfigError(f"{where}: kind must be {CONFIG_KIND}")
    server = data.get("server")
    if server is not None and not isinstance(server, str):
        raise ConfigError(f"{where}: server must be a string like 127.0.0.2:7950")
    cluster = data.get("cluster")
    if cluster is not None and not isinstance(cluster, str):
        raise ConfigError(f"{where}: cluster must be a string")
    creds = data.get("credentials") or {}
    if not isinstance(creds, dict):
        raise ConfigError(f"{where}: credentials must be a mapping")
    unknown = sorted(str(k) for k in creds if k not in _CREDENTIAL_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown credentials field(s) {', '.join(unknown)}")
    base = path.parent
    data["credentials"] = {k: _path(v, k, base, where) for k, v in creds.items()}
    return data


def credentials_of(config: Mapping[str, Any]) -> Credentials:
    """The credentials of a mapping :func:`load_config` returned."""
    creds_map: Mapping[str, Path] = config.get("credentials", {})
    return Credentials(
        ca_file=creds_map.get("caFile"),
        cert_file=creds_map.get("certFile"),
        key_file=creds_map.get("keyFile"),
    )


def target_from_config(path: Path, node: str | None = None) -> Target:
    """A target from one client.yaml (a node's ``DATA_DIR/client.yaml``, say): its server,
    or ``node`` when given, with its credentials."""
    config = load_config(path)
    server = node or config.get("server")
    if not server:
        raise ConfigError(f"{path}: no server (expected server: ADDR[:PORT])")
    return Target(
        parse_address(server),
        str(path),
        config.get("cluster"),
        credentials_of(config),
        path,
    )


def resolve_target(node: str | None, environ: Mapping[str, str], home: Path) -> Target:
    """Apply the precedence rules of the module docstring.

    ``node`` is the ``--node`` value, which click already fills from ``P2PORCH_NODE``.
    """
    config: dict[str, Any] = {}
    config_source = ""
    config_path: Path | None = None
    explicit = environ.get(ENV_CONFIG)
    if explicit:
        config_path = Path(explicit).expanduser()
        if not config_path.is_file():
            raise ConfigError(f"{ENV_CONFIG}={explicit}: no such file")
        config, config_source = load_config(config_path), f"{ENV_CONFIG} ({config_path})"
    else:
        default_path = default_config_path(home)
        if default_path.is_file():
            config_path = default_path
            config, config_source = load_config(default_path), str(default_path)
    credentials = credentials_of(config)
    cluster = config.get("cluster")
    if node:
        return Target(parse_address(node), "--node", cluster, credentials, config_path)
    server = config.get("server")
    if server:
        return Target(parse_address(server), config_source, cluster, credentials, config_path)
    return Target(
        parse_address(f"{DEFAULT_HOST}:{DEFAULT_PORT}"),
        "default",
        cluster,
        credentials,
        config_path,
    )
