"""Fuzzing the join exchange against real agents, and the 5xx answers it found.

``POST /v1/join`` is one of the three endpoints open to anyone, and with the right secret it
reaches the certificate signing code. Whatever arrives -- any JSON, any field of any type, a
certificate request that is garbage, of the wrong PEM type, of a key type we refuse or for
another name -- the answer must be a 4xx with a JSON error, never a 5xx and never a hang, and
the cluster must gain nothing. The right secret is used for most examples so the fuzz gets
past the secret check.

Never drawn: a valid request whose CN matches the record's name (that is a real join).
Pinned as their own tests: the inputs that once answered 500 (a deeply nested body,
1e400 and 2**64 capacities, certificate requests with key types we do not accept).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2porch.common import pki
from tests.integration.cluster.harness import wait_for
from tests.integration.security.kit import (
    AGENT_ARGS,
    ControlPlaneCluster,
    admin_pair,
    assert_unharmed,
    join_body,
    membership,
    request_as,
    ssl_context,
    token_secret,
)

pytestmark = pytest.mark.slow

RIGHT = "<the right secret>"  # replaced by the cluster's secret when sent
CSR_ONLY = "h6-csr-only"  # the CN of the valid requests; no drawn record name is this


def _pem(label: str, der: bytes) -> str:
    return f"-----BEGIN {label}-----\n{base64.encodebytes(der).decode()}-----END {label}-----\n"


def _csr(key: Any, names: list[str], algorithm: Any) -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n) for n in names])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(key, algorithm)
        .public_bytes(serialization.Encoding.DER)
    )


def _canned_pems() -> list[str]:
    """Certificate requests and other PEM a hostile joiner might send (all must be refused)."""
    ec_key = pki.generate_key()
    ca = pki.CertificateAuthority.create("fuzz", pki.utcnow())
    good = _csr(ec_key, [CSR_ONLY], hashes.SHA256())
    flipped = good[:-3] + bytes([good[-3] ^ 1]) + good[-2:]
    return [
        _pem("CERTIFICATE REQUEST", good),  # valid, but for another name than the record's
        _pem("CERTIFICATE REQUEST", _csr(ec_key, [CSR_ONLY], hashes.SHA512())),
        _pem("CERTIFICATE REQUEST", flipped),  # bad signature
        _pem("CERTIFICATE REQUEST", good[:-7]),  # truncated
        _pem("CERTIFICATE REQUEST", _csr(ec_key, [], hashes.SHA256())),  # no CN
        _pem("CERTIFICATE REQUEST", _csr(ec_key, ["a", "b"], hashes.SHA256())),  # two CNs
        _pem("CERTIFICATE REQUEST", _csr(ec_key, ["../../etc"], hashes.SHA256())),  # bad name
        _pem("CERTIFICATE REQUEST", _csr(ec_key, ["x" * 64], hashes.SHA256())),  # too long
        _pem(
            "CERTIFICATE REQUEST",
            _csr(rsa.generate_private_key(65537, 1024), [CSR_ONLY], hashes.SHA256()),
        ),
        _pem(
            "CERTIFICATE REQUEST",
            _csr(ed25519.Ed25519PrivateKey.generate(), [CSR_ONLY], None),
        ),
        pki.cert_pem(ca.cert).decode(),  # a certificate, not a request
        pki.key_pem(ec_key).decode(),  # a private key
        pki.cert_pem(ca.cert).decode() + _pem("CERTIFICATE REQUEST", good),  # two blocks
        "-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE REQUEST-----\n",
        "",
    ]


CANNED = _canned_pems()

# JSON values without the inputs known to answer 500 (non-finite numbers: see
# test_non_finite_capacity_is_a_400). Integers stay within what JSON writers produce.
leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
garbage_pem = st.builds(
    _pem,
    st.sampled_from(["CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST", "CERTIFICATE", "X"]),
    st.binary(max_size=200),
)
csrs = st.one_of(st.sampled_from(CANNED), garbage_pem, st.text(max_size=50), json_values)
names = st.one_of(
    st.sampled_from(["sm1", "sm2", "h6-fuzz", "", "-x", "a" * 70, "ü", "a b", "x\x00y"]),
    st.text(max_size=20),
    json_values,
).filter(lambda n: n != CSR_ONLY)
addresses = st.one_of(
    st.sampled_from(["127.0.0.131", "127.0.0.101", "", "::1", "é", "a" * 300, "x:y:z"]),
    st.text(max_size=20),
    json_values,
)
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "secret": st.one_of(st.just(RIGHT), st.just(RIGHT), st.just(RIGHT), json_values),
    "csr": csrs,
    "name": names,
    "address": addresses,
    "apiAddress": addresses,
    "raftAddress": addresses,
    "gossipAddress": addresses,
    "labels": st.one_of(st.dictionaries(st.text(max_size=8), json_values, max_size=3), json_values),
    "cpuMillicores": json_values,
    "memoryBytes": json_values,
}


@st.composite
def join_bodies(draw: st.DrawFn) -> bytes:
    """A request body: mostly a join-shaped object (some fields dropped, some of the wrong
    type, unknown ones added), sometimes any JSON, sometimes not JSON at all."""
    kind = draw(st.sampled_from(["shaped", "shaped", "shaped", "any-json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "any-json":
        return json.dumps(draw(json_values)).encode()
    body: dict[str, Any] = {}
    for field, values in FIELD_VALUES.items():
        if draw(st.integers(0, 9)) > 0:  # each field present 90% of the time
            body[field] = draw(values)
    body.update(draw(st.dictionaries(st.text(max_size=10), json_values, max_size=2)))
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def secret(main: ControlPlaneCluster) -> str:
    resp = main.nodes[0].request("GET", "/v1/token")
    assert resp.status_code == 200, resp.text
    return token_secret(resp.json()["token"])


@pytest.fixture(scope="module")
def baseline(main: ControlPlaneCluster) -> tuple[frozenset[str], frozenset[str]]:
    """What the log and Raft held before the fuzz (earlier modules may have added and removed
    nodes of their own)."""
    return membership(main.nodes[0])


@pytest.fixture(scope="module")
def anonymous(main: ControlPlaneCluster) -> Iterator[dict[str, httpx.Client]]:
    """Clients without a certificate, kept alive, to the leader and to a follower."""
    leader = main.leader()
    follower = next(n for n in main.nodes if n is not leader)
    clients = {
        role: httpx.Client(
            base_url=node.api, verify=ssl_context(node.data_dir / "ca.pem"), timeout=20
        )
        for role, node in (("leader", leader), ("follower", follower))
    }
    yield clients
    for client in clients.values():
        client.close()


def assert_clean_refusal(resp: httpx.Response) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    error = resp.json()["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str)


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=join_bodies(), via=st.sampled_from(["leader", "follower"]))
def test_join_fuzz_always_answers_a_clean_4xx(
    baseline: tuple[frozenset[str], frozenset[str]],
    secret: str,
    anonymous: dict[str, httpx.Client],
    body: bytes,
    via: str,
) -> None:
    content = body.replace(json.dumps(RIGHT).encode(), json.dumps(secret).encode())
    # A hang fails here: the client's timeout raises.
    resp = anonymous[via].post(
        "/v1/join", content=content, headers={"content-type": "application/json"}
    )
    assert_clean_refusal(resp)


def test_after_the_fuzz_the_cluster_gained_nothing(
    main: ControlPlaneCluster, baseline: tuple[frozenset[str], frozenset[str]]
) -> None:
    assert membership(main.nodes[0]) == baseline
    assert baseline[1] == {n.name for n in main.nodes}
    assert_unharmed(main)


# --------------------------------------------------------------------------- found by the fuzz


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_deeply_nested_json_is_a_400(anonymous: dict[str, httpx.Client]) -> None:
    resp = anonymous["follower"].post(
        "/v1/join", content=deep_json(100_000), headers={"content-type": "application/json"}
    )
    assert_clean_refusal(resp)


def test_non_finite_capacity_is_a_400(anonymous: dict[str, httpx.Client], secret: str) -> None:
    body = join_body(secret, "h6-inf", "127.0.0.133", CANNED[0])
    text = json.dumps(body).replace('"cpuMillicores": 1000', '"cpuMillicores": 1e400')
    assert "1e400" in text
    resp = anonymous["leader"].post(
        "/v1/join", content=text.encode(), headers={"content-type": "application/json"}
    )
    assert_clean_refusal(resp)


def _unsupported_key_csr(name: str) -> str:
    """A well-formed request whose key algorithm OID nobody supports (ecPublicKey -> .9)."""
    der = _csr(pki.generate_key(), [name], hashes.SHA256())
    ec_public_key = bytes.fromhex("06072a8648ce3d0201")
    assert der.count(ec_public_key) == 1
    return _pem(
        "CERTIFICATE REQUEST", der.replace(ec_public_key, bytes.fromhex("06072a8648ce3d0209"))
    )


def test_request_with_an_unknown_key_type_is_a_400_on_join(
    anonymous: dict[str, httpx.Client], secret: str
) -> None:
    body = join_body(secret, "h6-oid", "127.0.0.133", _unsupported_key_csr("h6-oid"))
    resp = anonymous["leader"].post("/v1/join", json=body)
    assert_clean_refusal(resp)


def test_request_with_an_unknown_key_type_is_a_400_on_users(main: ControlPlaneCluster) -> None:
    resp = request_as(
        main.nodes[0],
        "POST",
        "/v1/users",
        admin_pair(main.nodes[0]),
        json={"name": "h6-oid", "role": "viewer", "csr": _unsupported_key_csr("h6-oid")},
    )
    assert_clean_refusal(resp)


# A throwaway cluster: the bug below leaves a Raft learner behind that nothing can remove.
@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneCluster]:
    c = ControlPlaneCluster(
        tmp_path_factory.mktemp("sec-scratch"), "fz", first_host=111, agent_args=AGENT_ARGS
    )
    try:
        c.form(1)
        yield c
    finally:
        c.teardown()


def test_oversized_capacity_is_a_400_and_adds_no_learner(
    scratch: ControlPlaneCluster, tmp_path: Path
) -> None:
    node = scratch.nodes[0]
    wait_for(lambda: node.get("/v1/token")["token"], 30, "a token", node)
    secret_ = token_secret(node.get("/v1/token")["token"])
    name = "h6-big"
    csr = pki.make_request(pki.generate_key(), name).decode()
    body = join_body(secret_, name, "127.0.0.134", csr)
    body["memoryBytes"] = 2**70
    before = membership(node)
    resp = request_as(node, "POST", "/v1/join", None, json=body)
    after = membership(node)
    assert after == before, f"the cluster changed: {before} -> {after}"
    assert_clean_refusal(resp)
