"""Node selection: --node > P2PORCH_NODE > P2PORCH_CONFIG > ~/.config/p2porch/client.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2porch.cli.config import (
    ConfigError,
    Credentials,
    dump_config,
    load_config,
    parse_address,
    resolve_target,
    target_from_config,
)

from .conftest import Cli, FakeApi


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("127.0.0.2", "https://127.0.0.2:7950"),
        ("127.0.0.2:8000", "https://127.0.0.2:8000"),
        ("node-a.example", "https://node-a.example:7950"),
        ("https://127.0.0.2:9000/", "https://127.0.0.2:9000"),
        ("http://127.0.0.2:9000", "http://127.0.0.2:9000"),
        ("[::1]:7000", "https://[::1]:7000"),
        ("[::1]", "https://[::1]:7950"),
        ("::1", "https://[::1]:7950"),
    ],
)
def test_parse_address(text: str, url: str) -> None:
    """No scheme means https (the API speaks nothing else); an explicit one is kept."""
    assert parse_address(text) == url


@pytest.mark.parametrize("bad", ["", "127.0.0.2:0", "127.0.0.2:99999", "h:x", "ftp://h", "[::1"])
def test_parse_address_rejects(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(bad)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_resolve_precedence(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _write(home / ".config/p2porch/client.yaml", "server: 127.0.0.4\n")
    explicit = _write(
        tmp_path / "c.yaml",
        "apiVersion: p2porch/v1\nkind: ClientConfig\nserver: 127.0.0.5:7000\ncluster: c1\n",
    )
    env = {"P2PORCH_CONFIG": str(explicit)}
    by_node = resolve_target("127.0.0.3", env, home)
    assert by_node.base_url == "https://127.0.0.3:7950"
    assert by_node.config_path == explicit  # --node still uses the config's credentials
    target = resolve_target(None, env, home)
    assert target.base_url == "https://127.0.0.5:7000" and target.cluster == "c1"
    assert "P2PORCH_CONFIG" in target.source and target.config_path == explicit
    from_home = resolve_target(None, {}, home)
    assert from_home.base_url == "https://127.0.0.4:7950"
    assert from_home.config_path == home / ".config/p2porch/client.yaml"
    fallback = resolve_target(None, {}, tmp_path / "nohome")
    assert fallback.base_url == "https://127.0.0.1:7950" and fallback.config_path is None


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        resolve_target(None, {"P2PORCH_CONFIG": str(tmp_path / "nope.yaml")}, tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "expected a mapping"),
        ("server: [x]", "server must be a string"),
        ("sever: 127.0.0.2", "unknown field"),
        ("kind: Other", "kind must be ClientConfig"),
        ("apiVersion: v9", "apiVersion must be"),
        ("credentials: {certFile: 3}", "credentials.certFile must be a file path"),
        ("credentials: {password: x}", "unknown credentials field"),
        ("server: [", "not valid YAML"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_credentials_resolve_relative_and_switch_to_https(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "conf" / "client.yaml",
        "server: 127.0.0.2\ncredentials: {caFile: ca.pem, certFile: /abs/c.pem, keyFile: k.pem}\n",
    )
    target = resolve_target(None, {"P2PORCH_CONFIG": str(path)}, tmp_path)
    assert target.base_url == "https://127.0.0.2:7950"
    assert target.credentials == Credentials(
        ca_file=tmp_path / "conf" / "ca.pem",
        cert_file=Path("/abs/c.pem"),
        key_file=tmp_path / "conf" / "k.pem",
    )
    # --node keeps the config's credentials (the cluster still wants them)
    assert resolve_target("127.0.0.9", {"P2PORCH_CONFIG": str(path)}, tmp_path).base_url == (
        "https://127.0.0.9:7950"
    )


def test_unloadable_credentials_are_a_config_error(tmp_path: Path) -> None:
    creds = Credentials(ca_file=tmp_path / "missing-ca.pem")
    with pytest.raises(ConfigError, match="cannot load the client credentials"):
        creds.ssl_context()


# --------------------------------------------------------------------------- through the CLI


def _host(api: FakeApi) -> str:
    url = api.requests[-1].url
    return f"{url.scheme}://{url.host}:{url.port}"


def test_cli_node_selection_order(run: Cli, api: FakeApi, tmp_path: Path) -> None:
    run("get", "nodes")
    assert _host(api) == "https://127.0.0.1:7950"
    _write(run.home / ".config/p2porch/client.yaml", "server: 127.0.0.4:7001\n")
    run("get", "nodes")
    assert _host(api) == "https://127.0.0.4:7001"
    explicit = _write(tmp_path / "other.yaml", "server: 127.0.0.5\n")
    run("get", "nodes", env={"P2PORCH_CONFIG": str(explicit)})
    assert _host(api) == "https://127.0.0.5:7950"
    run("get", "nodes", env={"P2PORCH_CONFIG": str(explicit), "P2PORCH_NODE": "127.0.0.6:7002"})
    assert _host(api) == "https://127.0.0.6:7002"
    run("--node", "127.0.0.7", "get", "nodes", env={"P2PORCH_NODE": "127.0.0.6:7002"})
    assert _host(api) == "https://127.0.0.7:7950"


def test_cli_config_errors_exit_1(run: Cli, api: FakeApi, tmp_path: Path) -> None:
    result = run("get", "nodes", env={"P2PORCH_CONFIG": str(tmp_path / "absent.yaml")})
    assert result.exit_code == 1
    assert "error: P2PORCH_CONFIG=" in result.stderr and "no such file" in result.stderr
    result = run("--node", "127.0.0.2:http", "get", "nodes")
    assert result.exit_code == 1 and "bad port" in result.stderr
    assert api.requests == []


def test_target_from_config_and_dump_round_trip(tmp_path: Path) -> None:
    text = dump_config("127.0.0.2:7950", "c0ffee", "ca.pem", "bob.pem", "bob.key")
    path = _write(tmp_path / "creds" / "client.yaml", text)
    target = target_from_config(path)
    assert target.base_url == "https://127.0.0.2:7950"
    assert target.cluster == "c0ffee" and target.config_path == path
    assert target.credentials == Credentials(
        ca_file=tmp_path / "creds" / "ca.pem",
        cert_file=tmp_path / "creds" / "bob.pem",
        key_file=tmp_path / "creds" / "bob.key",
    )
    other = target_from_config(path, node="127.0.0.3:7950")
    assert other.base_url == "https://127.0.0.3:7950" and other.credentials == target.credentials
    with pytest.raises(ConfigError, match="no server"):
        target_from_config(_write(tmp_path / "empty.yaml", "kind: ClientConfig\n"))
