"""Node security material: bootstrap/load/join, renewal, sealing, authorizers, state records."""

from __future__ import annotations

import datetime as dt
import os
import random
import stat
from pathlib import Path

import attrs
import pytest

from p2porch.common import codec, pki
from p2porch.node.api import authorize, required_role
from p2porch.node.daemon import Identity, SecretValues
from p2porch.node.errors import SpecError
from p2porch.node.http import HttpError, Request
from p2porch.node.scheduler import NodeStatus, schedule
from p2porch.node.security import (
    NodeSecurity,
    SecurityError,
    api_authorizer,
    node_authorizer,
    seal,
    unseal,
)
from p2porch.node.spec import App, AppSpec, ObjectMeta
from p2porch.node.state import (
    ClusterState,
    Command,
    DeleteApp,
    DeleteSecret,
    GossipKeys,
    JoinTokenRecord,
    NodeRecord,
    PutApp,
    PutNode,
    PutSecret,
    RemoveNode,
    SecretRecord,
    SetGossipKeys,
    SetJoinToken,
    decode_command,
    encode_command,
)

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def security(tmp_path: Path) -> NodeSecurity:
    return NodeSecurity.bootstrap(tmp_path, "c1", "n1", ("127.0.0.2", "host1"), NOW)


# --------------------------------------------------------------------------- files


def test_bootstrap_writes_private_files_and_loads_back(security: NodeSecurity) -> None:
    for path in NodeSecurity.paths(security.data_dir).values():
        if path.name in ("client.yaml", "admin.pem", "admin.key"):
            continue
        assert path.exists(), path
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    loaded = NodeSecurity.load(security.data_dir)
    assert loaded.fingerprint == security.fingerprint
    assert loaded.data_key == security.data_key
    assert loaded.node_key_id == security.node_key_id
    cert = loaded.node_cert
    assert pki.covers_addresses(cert, ("127.0.0.2", "host1"))
    assert pki.identity_of(cert).role == pki.ROLE_NODE


def test_load_names_the_problem(tmp_path: Path, security: NodeSecurity) -> None:
    (security.data_dir / "ca.key").write_bytes(b"garbage")
    with pytest.raises(SecurityError, match="unusable"):
        NodeSecurity.load(security.data_dir)
    with pytest.raises(SecurityError):
        NodeSecurity.load(tmp_path / "missing")


def test_join_material_is_checked(tmp_path: Path, security: NodeSecurity) -> None:
    key = pki.generate_key()
    csr = pki.make_request(key, "n2")
    cert = security.issue_node(csr, ("127.0.0.3",), NOW)
    (tmp_path / "n2").mkdir()
    joined = NodeSecurity.from_join(
        tmp_path / "n2",
        node_key=key,
        ca_bundle=security.ca_bundle,
        ca_key=pki.key_pem(security.ca.key),
        node_cert=cert,
        data_key=security.data_key,
    )
    assert joined.fingerprint == security.fingerprint
    # A certificate for another key, or from another CA, is refused.
    other_key = pki.generate_key()
    (tmp_path / "n3").mkdir()
    with pytest.raises(SecurityError, match="not for our key"):
        NodeSecurity.from_join(
            tmp_path / "n3",
            node_key=other_key,
            ca_bundle=security.ca_bundle,
            ca_key=pki.key_pem(security.ca.key),
            node_cert=cert,
            data_key=security.data_key,
        )
    foreign = pki.CertificateAuthority.create("evil", NOW)
    forged = pki.cert_pem(foreign.issue(key.public_key(), "n2", pki.ROLE_NODE, NOW))
    with pytest.raises(SecurityError, match="not issued by the pinned CA"):
        NodeSecurity.from_join(
            tmp_path / "n3",
            node_key=key,
            ca_bundle=security.ca_bundle,
            ca_key=pki.key_pem(security.ca.key),
            node_cert=forged,
            data_key=security.data_key,
        )


def test_renewal_keeps_the_key_and_happens_in_the_window(security: NodeSecurity) -> None:
    rng = random.Random(7)
    before = security.node_cert
    key_id = security.node_key_id
    assert not security.ensure_node_cert("n1", ("127.0.0.2",), NOW, rng)
    # Past 80% of the 90-day life: always due.
    late = NOW + dt.timedelta(days=75)
    assert security.ensure_node_cert("n1", ("127.0.0.2",), late, rng)
    after = security.node_cert
    assert after.serial_number != before.serial_number
    assert pki.key_id(after.public_key()) == key_id
    assert after.not_valid_after_utc > before.not_valid_after_utc
    # A changed advertise address is reissued at once.
    assert security.ensure_node_cert("n1", ("127.0.0.9",), late, rng)
    assert pki.covers_addresses(security.node_cert, ("127.0.0.9",))
    # The files hold the renewed certificate.
    assert NodeSecurity.load(security.data_dir).node_cert.serial_number == (
        security.node_cert.serial_number
    )


def test_user_certificates_take_their_role_from_the_caller(security: NodeSecurity) -> None:
    key = pki.generate_key()
    csr = pki.make_request(key, "alice")
    viewer = pki.identity_of(pki.load_cert(security.issue_user(csr, pki.ROLE_VIEWER, NOW)))
    assert (viewer.name, viewer.role) == ("alice", pki.ROLE_VIEWER)
    with pytest.raises(SecurityError, match="role must be"):
        security.issue_user(csr, pki.ROLE_NODE, NOW)
    with pytest.raises(SecurityError):
        security.issue_user(b"-----BEGIN CERTIFICATE REQUEST-----\nxx\n", pki.ROLE_ADMIN, NOW)


def test_admin_client_config(security: NodeSecurity) -> None:
    path = security.write_admin_client("127.0.0.2:7950", "c1", NOW)
    text = path.read_text()
    assert "server: 127.0.0.2:7950" in text and "certFile: admin.pem" in text
    admin = pki.identity_of(pki.load_cert((security.data_dir / "admin.pem").read_bytes()))
    assert admin.role == pki.ROLE_ADMIN
    # Written once: a restart keeps the same credentials.
    serial = admin.serial
    security.write_admin_client("127.0.0.2:7950", "c1", NOW)
    again = pki.identity_of(pki.load_cert((security.data_dir / "admin.pem").read_bytes()))
    assert again.serial == serial


# --------------------------------------------------------------------------- sealing


def test_seal_is_bound_to_key_and_record() -> None:
    key = os.urandom(32)
    sealed = seal(key, b"hunter2", b"secret/default/db")
    assert b"hunter2" not in sealed
    assert unseal(key, sealed, b"secret/default/db") == b"hunter2"
    assert seal(key, b"hunter2", b"x") != seal(key, b"hunter2", b"x")  # fresh nonces
    with pytest.raises(SecurityError, match="does not open"):
        unseal(key, sealed, b"secret/default/other")
    with pytest.raises(SecurityError, match="does not open"):
        unseal(os.urandom(32), sealed, b"secret/default/db")
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SecurityError):
        unseal(key, tampered, b"secret/default/db")
    with pytest.raises(SecurityError, match="malformed"):
        unseal(key, b"\x01short", b"")


# --------------------------------------------------------------------------- authorizers


def _peer(name: str, role: str, cluster: str = "c1", key: str = "k1") -> pki.PeerIdentity:
    return pki.PeerIdentity(name, role, cluster, 1, NOW, key)


def test_node_authorizer() -> None:
    records = {"gone": (True, "k1"), "n2": (False, "k2"), "n3": (False, "")}
    check = node_authorizer("c1", records.get)
    assert check(_peer("n2", pki.ROLE_NODE, key="k2")) is None
    assert check(_peer("n3", pki.ROLE_NODE)) is None  # no key recorded (older record)
    assert check(_peer("newbie", pki.ROLE_NODE)) is None  # a joiner the log does not know yet
    assert "removed" in (check(_peer("gone", pki.ROLE_NODE)) or "")
    assert "key" in (check(_peer("n2", pki.ROLE_NODE, key="other")) or "")
    assert "cluster" in (check(_peer("n2", pki.ROLE_NODE, cluster="c2", key="k2")) or "")
    assert "role" in (check(_peer("alice", pki.ROLE_ADMIN)) or "")


def test_api_authorizer_admits_users_but_not_removed_nodes() -> None:
    check = api_authorizer("c1", {"gone": (True, "k1")}.get)
    assert check(_peer("alice", pki.ROLE_VIEWER)) is None
    assert check(_peer("gone", pki.ROLE_NODE)) is not None
    assert check(_peer("alice", pki.ROLE_ADMIN, cluster="c2")) is not None


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [
        ("GET", "/healthz", None),
        ("GET", "/v1/ca", None),
        ("POST", "/v1/join", None),
        ("GET", "/v1/apps", pki.ROLE_VIEWER),
        ("GET", "/v1/token", pki.ROLE_ADMIN),
        ("PUT", "/v1/apps/default/web", pki.ROLE_ADMIN),
        ("POST", "/v1/internal/propose", pki.ROLE_NODE),
        ("GET", "/v1/local/replicas", pki.ROLE_NODE),
    ],
)
def test_required_roles(method: str, path: str, role: str | None) -> None:
    assert required_role(method, path) == role


def _request(method: str, path: str, identity: pki.PeerIdentity | None) -> Request:
    return Request(method, path, {}, {}, b"", "127.0.0.1:1", identity=identity)


def test_authorize_statuses() -> None:
    authorize(_request("GET", "/healthz", None))
    with pytest.raises(HttpError) as exc:
        authorize(_request("GET", "/v1/apps", None))
    assert exc.value.status == 401
    viewer = _peer("bob", pki.ROLE_VIEWER)
    authorize(_request("GET", "/v1/apps", viewer))
    for method, path in (("PUT", "/v1/apps/default/web"), ("GET", "/v1/token")):
        with pytest.raises(HttpError) as exc:
            authorize(_request(method, path, viewer))
        assert exc.value.status == 403 and "viewer" in exc.value.message
    with pytest.raises(HttpError) as exc:
        authorize(_request("GET", "/v1/local/replicas", _peer("root", pki.ROLE_ADMIN)))
    assert exc.value.status == 403
    authorize(_request("POST", "/v1/internal/propose", _peer("n2", pki.ROLE_NODE)))


# --------------------------------------------------------------------------- state records


def _app(name: str, secrets: tuple[str, ...] = ()) -> App:
    return App(ObjectMeta(name=name), AppSpec(image="demo", replicas=2, secrets=secrets))


def test_security_commands_round_trip_and_snapshot() -> None:
    state = ClusterState()
    commands: list[Command] = [
        SetJoinToken(JoinTokenRecord(b"sealed-token", expires_at=1e9)),
        SetGossipKeys(GossipKeys((b"k1", b"k2"))),
        PutSecret(SecretRecord("default", "db", ("password",), b"sealed")),
    ]
    for index, command in enumerate(commands, 1):
        assert decode_command(encode_command(command)) == command
        assert state.apply(index, command).error is None
    assert state.join_token is not None and state.join_token.version == 1
    assert state.gossip_keys is not None and state.gossip_keys.version == 1
    assert state.secrets["default/db"].version == 1
    state.apply(4, SetJoinToken(JoinTokenRecord(b"other")))
    assert state.join_token.version == 2
    restored = ClusterState.restore(state.snapshot())
    assert restored == state
    assert restored.secrets == state.secrets and restored.join_token == state.join_token


def test_secret_rules() -> None:
    state = ClusterState()
    result = state.apply(1, PutSecret(SecretRecord("nowhere", "db", ("a",), b"s")))
    assert result.error and "namespace" in result.error
    assert state.apply(2, SetGossipKeys(GossipKeys(()))).error
    # An app using a missing secret stays pending with the reason.
    state.apply(3, PutNode(NodeRecord("n1", "a", "a:1", "a:2", "a:3", cpu_millicores=4000)))
    state.apply(4, PutApp(_app("web", ("db",))))
    decision = schedule(
        state.sched_apps(), state.sched_nodes({"n1": NodeStatus.ALIVE}), state.slot_map()
    )
    assert not decision.place
    assert {reason for _, reason in decision.pending} == {
        "secret(s) db not found in namespace 'default'"
    }
    state.apply(5, PutSecret(SecretRecord("default", "db", ("a",), b"s")))
    decision = schedule(
        state.sched_apps(), state.sched_nodes({"n1": NodeStatus.ALIVE}), state.slot_map()
    )
    assert len(decision.place) == 2
    # A secret in use cannot be deleted; once the app is gone it can.
    refused = state.apply(6, DeleteSecret("default", "db"))
    assert refused.error and "web" in refused.error
    state.apply(7, DeleteApp("default", "web"))
    assert state.apply(8, DeleteSecret("default", "db")).error is None
    assert "not found" in (state.apply(9, DeleteSecret("default", "db")).error or "")


def test_removed_node_keeps_its_key_record() -> None:
    state = ClusterState()
    state.apply(1, PutNode(NodeRecord("n1", "a", "a:1", "a:2", "a:3", cert_key="k")))
    state.apply(2, RemoveNode("n1"))
    node = state.nodes["n1"]
    assert node.removed and node.cert_key == "k"


def test_app_secret_names_are_validated() -> None:
    with pytest.raises(SpecError):
        AppSpec(image="demo", secrets=("Bad_Name",))
    with pytest.raises(SpecError, match="twice"):
        AppSpec(image="demo", secrets=("db", "db"))
    assert attrs.evolve(AppSpec(image="demo"), secrets=("db",)).secrets == ("db",)


def test_secret_values_codec_record() -> None:
    values = SecretValues((("password", b"\x00\xffbytes"),))
    assert codec.decode(codec.encode(values), SecretValues) == values


def test_secret_delivery_only_to_nodes_running_a_user(tmp_path: Path) -> None:
    """The delivery path opens a secret only for an app that uses it AND runs here."""
    from p2porch.node.daemon import Agent, AgentOptions, secret_aad
    from p2porch.node.state import ApplyDecision, Placement

    agent = Agent(AgentOptions(data_dir=tmp_path, advertise="127.0.0.2", runtime=False))
    security = NodeSecurity.bootstrap(tmp_path, "c1", "n1", ("127.0.0.2",), NOW)
    agent.security = security
    agent.identity = None
    state = agent.machine.state
    plaintext = codec.encode(SecretValues((("password", b"hunter2"),)))
    sealed = security.seal(plaintext, secret_aad("default", "db"))
    state.apply(1, PutSecret(SecretRecord("default", "db", ("password",), sealed)))
    state.apply(2, PutApp(_app("web", ("db",))))
    state.apply(3, PutApp(_app("other")))
    for i, name in enumerate(("n1", "n2"), 10):
        state.apply(i, PutNode(NodeRecord(name, "a", "a:1", "a:2", "a:3")))
    state.apply(4, ApplyDecision((Placement("default", "web", 0, "n2", 1),), ()))
    agent.identity = _identity("n1")
    with pytest.raises(SecurityError, match="no replica"):
        agent.secret_values("default", "web", "db")
    with pytest.raises(SecurityError, match="does not use"):
        agent.secret_values("default", "other", "db")
    state.apply(5, ApplyDecision((Placement("default", "web", 1, "n1", 1),), ()))
    assert agent.secret_values("default", "web", "db") == {"password": b"hunter2"}


def _identity(name: str) -> Identity:
    return Identity(name, "c1", "127.0.0.2", 7950, 7951, 7946)


def test_adopt_ca_reissues_and_narrows_trust(security: NodeSecurity) -> None:
    """The three CA rotation steps as one node sees them (node/daemon.py rotate_ca)."""
    security.write_admin_client("127.0.0.2:7950", "c1", NOW)
    old = security.ca
    new = pki.CertificateAuthority.create("c1", NOW)
    both = pki.cert_pem(new.cert) + security.ca_bundle
    key_id = security.node_key_id
    # 1. trust both, still signed by the old CA: nothing reissued.
    assert security.adopt_ca(both, pki.key_pem(old.key), "n1", ("127.0.0.2",), NOW)
    assert security.trusted_fingerprints == [new.fingerprint, old.fingerprint]
    assert security.cert_issuer_fingerprint == old.fingerprint
    assert not security.adopt_ca(both, pki.key_pem(old.key), "n1", ("127.0.0.2",), NOW)
    # 2. sign with the new CA: our certificate and the admin one are reissued, same key.
    assert security.adopt_ca(both, pki.key_pem(new.key), "n1", ("127.0.0.2",), NOW)
    assert security.cert_issuer_fingerprint == new.fingerprint
    assert security.node_key_id == key_id
    admin = pki.load_cert((security.data_dir / "admin.pem").read_bytes())
    assert pki.verify_issued_by(admin, new.cert)
    # 3. trust the new CA only; the files agree after a restart.
    assert security.adopt_ca(pki.cert_pem(new.cert), pki.key_pem(new.key), "n1", (), NOW)
    loaded = NodeSecurity.load(security.data_dir)
    assert loaded.trusted_fingerprints == [new.fingerprint]
    assert loaded.fingerprint == new.fingerprint
    # A key that matches no certificate of the bundle is refused.
    with pytest.raises(SecurityError, match="unusable"):
        security.adopt_ca(pki.cert_pem(new.cert), pki.key_pem(old.key), "n1", (), NOW)
