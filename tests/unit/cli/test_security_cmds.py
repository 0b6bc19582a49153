"""token rotate, user create, secret create/ls/rm, keys rotate: what they send and print."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path
from typing import Any

import click
import httpx
import pytest

from p2porch.cli.config import target_from_config
from p2porch.cli.main import MAX_SECRET_BYTES, format_epoch, parse_duration, secret_data
from p2porch.common import pki

from .conftest import Cli, FakeApi, error

# --------------------------------------------------------------------------- token


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1h", 3600), ("30m", 1800), ("3600s", 3600), ("90", 90), ("1h30m", 5400), ("2d", 172800)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "0", "-5", "1x", "h", "1h 30m", "30m1", "inf", "nan"])
def test_parse_duration_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_token_rotate_with_ttl(run: Cli, api: FakeApi) -> None:
    api.json_route("POST", "/v1/token/rotate", {"token": "P2P-1-new", "expiresAt": 1_800_000_000.0})
    result = run("token", "rotate", "--ttl", "1h")
    assert result.exit_code == 0, result.output
    assert api.calls() == ["POST /v1/token/rotate"]
    assert api.body() == {"ttlSeconds": 3600.0}
    assert result.stdout == "P2P-1-new\n"  # alone on stdout: TOKEN=$(p2porch token rotate)
    assert "expires 2027-01-15 08:00:00 UTC" in result.stderr
    assert "older tokens no longer work" in result.stderr


def test_format_epoch_far_future() -> None:
    assert format_epoch(1e300).endswith("s after 1970-01-01 UTC")
    assert format_epoch(0) == "1970-01-01 00:00:00 UTC"


def test_token_rotate_without_ttl_and_as_json(run: Cli, api: FakeApi) -> None:
    answer = {"token": "P2P-1-new", "expiresAt": None}
    api.json_route("POST", "/v1/token/rotate", answer)
    result = run("token", "rotate")
    assert result.exit_code == 0 and api.body() == {}
    assert "does not expire" in result.stderr
    result = run("token", "rotate", "-o", "json")
    assert json.loads(result.stdout) == answer


def test_token_rotate_bad_ttl_is_a_usage_error(run: Cli, api: FakeApi) -> None:
    result = run("token", "rotate", "--ttl", "soon")
    assert result.exit_code == 2 and "not a duration" in result.stderr
    assert api.requests == []


def test_token_shows_expiry_on_stderr(run: Cli, api: FakeApi) -> None:
    api.json_route("GET", "/v1/token", {"token": "P2P-1-t", "expiresAt": 1_800_000_000})
    result = run("token")
    assert result.stdout == "P2P-1-t\n"
    assert "(expires 2027-01-15 08:00:00 UTC)" in result.stderr


# --------------------------------------------------------------------------- user create


class Signer:
    """POST /v1/users as a node answers it: the cluster CA signs the request's key."""

    def __init__(self) -> None:
        self.ca = pki.CertificateAuthority.create("c0ffee", pki.utcnow())

    def __call__(self, request: httpx.Request, _params: dict[str, str]) -> httpx.Response:
        body = json.loads(request.content)
        cert = self.ca.sign_request(body["csr"].encode(), body["role"], pki.utcnow())
        return httpx.Response(
            200,
            json={
                "certificate": pki.cert_pem(cert).decode(),
                "ca": pki.cert_pem(self.ca.cert).decode(),
                "role": body["role"],
            },
        )


def test_user_create_writes_a_usable_credentials_folder(
    run: Cli, api: FakeApi, tmp_path: Path
) -> None:
    signer = Signer()
    api.route("POST", "/v1/users", signer)
    out_dir = tmp_path / "bob-creds"
    result = run(
        "--node", "127.0.0.3", "user", "create", "bob", "--role", "viewer", "--out", str(out_dir)
    )
    assert result.exit_code == 0, result.output
    sent = api.body()
    assert (sent["name"], sent["role"]) == ("bob", "viewer")
    assert "PRIVATE KEY" not in json.dumps(sent)  # only the request travels
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "bob.key",
        "bob.pem",
        "ca.pem",
        "client.yaml",
    ]
    assert stat.S_IMODE((out_dir / "bob.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(out_dir.stat().st_mode) == 0o700
    # the folder is a client config: the node we talked to, the CA, the cert and its key
    target = target_from_config(out_dir / "client.yaml")
    assert target.base_url == "https://127.0.0.3:7950" and target.cluster == "c0ffee"
    cert = pki.load_cert((out_dir / "bob.pem").read_bytes())
    key = pki.load_key((out_dir / "bob.key").read_bytes())
    assert pki.key_id(cert.public_key()) == pki.key_id(key.public_key())
    assert pki.identity_of(cert).role == "viewer"
    assert target.credentials.ca_file == out_dir / "ca.pem"
    assert pki.verify_issued_by(cert, pki.load_cert(target.credentials.ca_file.read_bytes()))
    target.credentials.ssl_context()  # loads as the CLI will load it
    assert "user bob (role viewer) created" in result.stdout
    assert f"P2PORCH_CONFIG={out_dir / 'client.yaml'} p2porch get nodes" in result.stdout


def test_user_create_default_folder(
    run: Cli, api: FakeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.route("POST", "/v1/users", Signer())
    monkeypatch.chdir(tmp_path)
    result = run("user", "create", "ann", "--role", "admin")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ann-credentials" / "ann.key").is_file()


def test_user_create_refuses_to_overwrite(run: Cli, api: FakeApi, tmp_path: Path) -> None:
    out_dir = tmp_path / "x"
    out_dir.mkdir()
    (out_dir / "bob.key").write_text("precious")
    result = run("user", "create", "bob", "--role", "admin", "--out", str(out_dir))
    assert result.exit_code == 1 and "already holds bob.key" in result.stderr
    assert api.requests == []  # nothing issued
    assert (out_dir / "bob.key").read_text() == "precious"


def test_user_create_usage_errors(run: Cli, api: FakeApi) -> None:
    assert run("user", "create", "bob").exit_code == 2  # --role is required
    assert run("user", "create", "bob", "--role", "root").exit_code == 2
    result = run("user", "create", "bad/name", "--role", "admin")
    assert result.exit_code == 2 and "invalid name" in result.stderr
    assert api.requests == []


def test_user_create_checks_the_answer(run: Cli, api: FakeApi, tmp_path: Path) -> None:
    """A certificate for some other key would be useless: refused, nothing written."""
    signer = Signer()

    def wrong_key(request: httpx.Request, params: dict[str, str]) -> httpx.Response:
        other = pki.make_request(pki.generate_key(), "bob").decode()
        forged = httpx.Request("POST", request.url, json={"csr": other, "role": "admin"})
        return signer(forged, params)

    api.route("POST", "/v1/users", wrong_key)
    out_dir = tmp_path / "out"
    result = run("user", "create", "bob", "--role", "admin", "--out", str(out_dir))
    assert result.exit_code == 1 and "a certificate for another key" in result.stderr
    assert not out_dir.exists()


def test_user_create_forbidden_for_a_viewer(run: Cli, api: FakeApi, tmp_path: Path) -> None:
    api.fail_route("POST", "/v1/users", error(403, "forbidden", "user val has role viewer"))
    result = run("user", "create", "bob", "--role", "admin", "--out", str(tmp_path / "o"))
    assert result.exit_code == 1
    assert "error: forbidden: user val has role viewer" in result.stderr
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- secrets


def test_secret_create_from_files_and_literals(run: Cli, api: FakeApi, tmp_path: Path) -> None:
    api.route(
        "PUT",
        "/v1/secrets/{ns}/{name}",
        lambda r, p: httpx.Response(
            200,
            json={
                "namespace": p["ns"],
                "name": p["name"],
                "keys": sorted(json.loads(r.content)["data"]),
            },
        ),
    )
    (tmp_path / "tls.crt").write_bytes(b"\x00\xffcert")
    (tmp_path / "pw.txt").write_text("hunter2\n")
    result = run(
        "secret",
        "create",
        "db",
        "-n",
        "shop",
        "--from-file",
        str(tmp_path / "tls.crt"),
        "--from-file",
        f"password={tmp_path / 'pw.txt'}",
        "--from-literal",
        "user=admin=root",
    )
    assert result.exit_code == 0, result.output
    assert api.calls() == ["PUT /v1/secrets/shop/db"]
    data = api.body()["data"]
    assert {k: base64.b64decode(v) for k, v in data.items()} == {
        "tls.crt": b"\x00\xffcert",
        "password": b"hunter2\n",
        "user": b"admin=root",
    }
    assert result.stdout == "secret shop/db saved (3 keys: password, tls.crt, user)\n"
    assert "hunter2" not in result.output


def test_secret_data_errors(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    with pytest.raises(click.UsageError, match="at least one"):
        secret_data([], [])
    with pytest.raises(click.BadParameter, match="given twice"):
        secret_data([str(tmp_path / "a")], ["a=y"])
    with pytest.raises(click.BadParameter, match="may hold only letters"):
        secret_data([], ["bad key=1"])
    with pytest.raises(click.BadParameter, match="expected KEY=VALUE"):
        secret_data([], ["novalue"])
    with pytest.raises(click.BadParameter, match="cannot read"):
        secret_data([str(tmp_path / "missing")], [])
    with pytest.raises(click.BadParameter, match="cannot read"):
        secret_data([str(tmp_path)], [])  # a folder
    with pytest.raises(click.BadParameter, match="no file after"):
        secret_data(["k="], [])
    (tmp_path / "big").write_bytes(b"0" * (MAX_SECRET_BYTES + 1))
    with pytest.raises(click.UsageError, match="at most 1048576"):
        secret_data([str(tmp_path / "big")], [])


def test_secret_create_without_data_sends_nothing(run: Cli, api: FakeApi) -> None:
    result = run("secret", "create", "db")
    assert result.exit_code == 2 and "--from-file" in result.stderr
    assert api.requests == []


SECRETS = [
    {
        "namespace": "default",
        "name": "db",
        "keys": ["password", "user"],
        "version": 3,
        "usedBy": ["web"],
    },
    {"namespace": "shop", "name": "tls", "keys": ["tls.crt"], "version": 1, "usedBy": []},
]


def test_secret_ls_table_and_json(run: Cli, api: FakeApi) -> None:
    api.json_route("GET", "/v1/secrets", SECRETS)
    result = run("secret", "ls")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "NAMESPACE", "KEYS", "USED", "BY"]
    assert lines[1].split() == ["db", "default", "password,user", "web"]
    assert lines[2].split() == ["tls", "shop", "tls.crt", "-"]
    assert "VERSION" in run("secret", "ls", "-o", "wide").stdout
    assert json.loads(run("secret", "ls", "-o", "json").stdout) == SECRETS
    run("secret", "ls", "-n", "shop")
    assert api.requests[-1].url.params["namespace"] == "shop"
    api.json_route("GET", "/v1/secrets", [])
    result = run("secret", "ls")
    assert result.stdout == "" and "no secrets" in result.stderr


def test_secret_rm(run: Cli, api: FakeApi) -> None:
    api.json_route("DELETE", "/v1/secrets/{ns}/{name}", {"deleted": "shop/db"})
    result = run("secret", "rm", "db", "-n", "shop")
    assert result.exit_code == 0 and result.stdout == "secret shop/db deleted\n"
    assert api.calls() == ["DELETE /v1/secrets/shop/db"]
    api.fail_route(
        "DELETE", "/v1/secrets/{ns}/{name}", error(404, "not_found", "secret 'x' not found")
    )
    result = run("secret", "rm", "x")
    assert result.exit_code == 1 and "error: not_found: secret 'x' not found" in result.stderr


# --------------------------------------------------------------------------- keys


def test_keys_rotate(run: Cli, api: FakeApi) -> None:
    seen: list[Any] = []

    def rotate(request: httpx.Request, _p: dict[str, str]) -> httpx.Response:
        seen.append(request.extensions.get("timeout"))
        return httpx.Response(200, json={"primary": "a1b2c3d4", "nodes": 3})

    api.route("POST", "/v1/keys/rotate", rotate)
    result = run("keys", "rotate")
    assert result.exit_code == 0, result.output
    assert (
        result.stdout == "gossip key rotated: new primary key a1b2c3d4, confirmed by 3 live nodes\n"
    )
    # the node waits for every live node at each of three steps: a long read timeout
    assert seen[0]["read"] >= 90


def test_keys_rotate_stalled(run: Cli, api: FakeApi) -> None:
    api.fail_route(
        "POST",
        "/v1/keys/rotate",
        error(400, "invalid", "gossip key rotation stalled: not confirmed by n3"),
    )
    result = run("keys", "rotate")
    assert result.exit_code == 1 and "not confirmed by n3" in result.stderr


# --------------------------------------------------------------------------- ca


def test_ca_rotate(run: Cli, api: FakeApi) -> None:
    seen: list[Any] = []

    def rotate(request: httpx.Request, _p: dict[str, str]) -> httpx.Response:
        seen.append((json.loads(request.content), request.extensions.get("timeout")))
        return httpx.Response(200, json={"fingerprint": "ab" * 32, "token": "P2P-1-x-y"})

    api.route("POST", "/v1/ca/rotate", rotate)
    result = run("ca", "rotate")
    assert result.exit_code == 0, result.output
    assert (
        result.stdout == f"cluster CA rotated: new fingerprint {'ab' * 32}\njoin token: P2P-1-x-y\n"
    )
    assert "issue users new ones" in result.stderr
    body, timeout = seen[0]
    assert body == {}
    assert timeout["read"] >= 180  # three steps of up to 60 s each on the node
    run("ca", "rotate", "--finish", "--force")
    assert seen[-1][0] == {"finish": True, "force": True}


def test_ca_rotate_paused(run: Cli, api: FakeApi) -> None:
    api.fail_route(
        "POST",
        "/v1/ca/rotate",
        error(409, "conflict", "CA rotation paused: n3 did not trust the new CA within 60 s."),
    )
    result = run("ca", "rotate")
    assert result.exit_code == 1
    assert "error: conflict: CA rotation paused: n3" in result.stderr
