"""Joining without the right token, or through a man in the middle: refused, nothing leaks.

Each attempt runs a real ``p2porch agent --join`` process and waits for it to give up. What
is asserted besides the refusal: the joiner's data dir stays empty (a retry with the right
token starts clean), the cluster gained no node, and -- where the joiner talks to a fake
member this suite runs -- the join secret never reached it.
"""

from __future__ import annotations

import time
from pathlib import Path

import attrs
import httpx
import pytest

from p2porch.common import pki
from tests.integration.cluster.harness import Node, wait_for
from tests.integration.security.kit import (
    ControlPlaneCluster,
    FakeMember,
    JoinAttempt,
    admin_pair,
    assert_unharmed,
    join_body,
    make_user,
    membership,
    random_name,
    request_as,
    token_secret,
    write_pair,
)

pytestmark = pytest.mark.slow


def current_token(main: ControlPlaneCluster) -> str:
    resp = main.nodes[0].request("GET", "/v1/token")
    assert resp.status_code == 200, resp.text
    return str(resp.json()["token"])


def other_ca_member(tmp: Path, host: str) -> tuple[pki.CertificateAuthority, tuple[Path, Path]]:
    """Another CA and a node certificate it signed for ``host`` (what an impostor holds)."""
    now = pki.utcnow()
    ca = pki.CertificateAuthority.create("impostor", now)
    key = pki.generate_key()
    cert = ca.issue(key.public_key(), "impostor", pki.ROLE_NODE, now, addresses=(host,))
    return ca, write_pair(tmp / host, "impostor", pki.cert_pem(cert), pki.key_pem(key))


def test_join_without_a_token_is_refused_before_any_contact(
    main: ControlPlaneCluster, tmp_path: Path
) -> None:
    before = membership(main.nodes[0])
    ca, pair = other_ca_member(tmp_path, "127.0.0.121")
    with FakeMember("127.0.0.121", pair, pki.cert_pem(ca.cert), ca.fingerprint) as fake:
        attempt = JoinAttempt(tmp_path, random_name("nt")).start("127.0.0.121", None)
        output = attempt.wait_refused()
        assert "--join needs --token" in output, output
        assert fake.request_lines == [] and fake.failed_handshakes == 0
    assert attempt.left_nothing() == []
    # The same through the API: a join request carrying no secret.
    resp = request_as(main.nodes[1], "POST", "/v1/join", None, json=join_body("", "x", "h", None))
    assert resp.status_code == 403, resp.text
    body = {k: v for k, v in join_body("", "x", "h", "csr").items() if k != "secret"}
    resp = request_as(main.nodes[1], "POST", "/v1/join", None, json=body)
    assert resp.status_code == 403, resp.text
    assert membership(main.nodes[0]) == before


MALFORMED = {
    "unknown-version": lambda t: t.replace("P2P-1-", "P2P-2-"),
    "no-prefix": lambda t: t.removeprefix("P2P-1-"),
    "cut-short": lambda t: t[:20],
    "upper-case": lambda t: t.upper(),
    "secret-not-hex": lambda t: t.rsplit("-", 1)[0] + "-not-hex-at-all",
    "secret-empty": lambda t: t.rsplit("-", 1)[0] + "-",
}


def test_join_with_a_malformed_token_contacts_nobody(
    main: ControlPlaneCluster, tmp_path: Path
) -> None:
    token = current_token(main)
    ca, pair = other_ca_member(tmp_path, "127.0.0.121")
    with FakeMember("127.0.0.121", pair, pki.cert_pem(ca.cert), ca.fingerprint) as fake:
        attempts = {  # all at once: each is a process start
            what: JoinAttempt(tmp_path, random_name("mt")).start("127.0.0.121", mangle(token))
            for what, mangle in MALFORMED.items()
        }
        for what, attempt in attempts.items():
            output = attempt.wait_refused()
            assert "malformed join token" in output, (what, output)
            # The error names the bad part; it never repeats the secret (logs are not secret).
            assert token_secret(token) not in output, what
            assert attempt.left_nothing() == [], what
        assert fake.request_lines == [] and fake.failed_handshakes == 0


def test_join_with_the_right_fingerprint_and_a_wrong_secret(
    main: ControlPlaneCluster, tmp_path: Path
) -> None:
    first = main.nodes[0]
    before = membership(first)
    token = pki.JoinToken.parse(current_token(main))
    wrong = str(pki.JoinToken(token.ca_fingerprint, "0" * 32))
    # Through a follower (it forwards joins to the leader) and through the leader.
    attempts = [
        JoinAttempt(tmp_path, random_name("ws")).start(node.host, wrong)
        for node in (main.nodes[1], main.leader())
    ]
    for attempt in attempts:
        output = attempt.wait_refused()
        assert "wrong join token" in output, output
        assert attempt.left_nothing() == []
    # The API answer itself, with a well-formed request and a real certificate request.
    name = random_name("ws")
    csr = pki.make_request(pki.generate_key(), name).decode()
    resp = request_as(
        main.nodes[2], "POST", "/v1/join", None, json=join_body("1" * 32, name, "127.0.0.131", csr)
    )
    assert resp.status_code == 403, resp.text
    assert resp.json()["error"]["code"] == "forbidden"
    assert membership(first) == before
    assert_unharmed(main)


@attrs.frozen
class Impostors:
    """What four men in the middle saw, and what the joiners sent to them said."""

    secret: str
    fakes: dict[str, FakeMember]
    attempts: dict[str, JoinAttempt]
    outputs: dict[str, str]
    gained: tuple[frozenset[str], frozenset[str]]  # main cluster's (names, Raft) change, if any
    foreign_gained: tuple[frozenset[str], frozenset[str]]


@pytest.fixture(scope="module")
def impostors(
    main: ControlPlaneCluster,
    foreign: ControlPlaneCluster,
    tmp_path_factory: pytest.TempPathFactory,
) -> Impostors:
    """Four impostors stand where joiners were told to go, each joiner with the real token:

    - A answers ``/v1/ca`` with its own CA (caught by the fingerprint check);
    - B answers with the *real* CA bundle (public) but serves TLS with its own certificate;
    - C answers with the real CA bundle and serves TLS with a *viewer* certificate that the
      real CA issued (a user is not a node: its certificate is for client auth only);
    - D is a real, unrelated p2porch cluster.
    """
    tmp = tmp_path_factory.mktemp("impostors")
    token = current_token(main)
    real_ca = (main.nodes[0].data_dir / "ca.pem").read_bytes()
    real_fp = pki.JoinToken.parse(token).ca_fingerprint
    own_ca, own_pair = other_ca_member(tmp, "fake")
    viewer_pair = make_user(main.nodes[0], random_name("mitm-viewer"), "viewer", tmp)
    before, foreign_before = membership(main.nodes[0]), membership(foreign.nodes[0])
    fakes = {
        "A": FakeMember("127.0.0.121", own_pair, pki.cert_pem(own_ca.cert), own_ca.fingerprint),
        "B": FakeMember("127.0.0.122", own_pair, real_ca, real_fp),
        "C": FakeMember("127.0.0.123", viewer_pair, real_ca, real_fp),
    }
    targets = {**{k: f.host for k, f in fakes.items()}, "D": foreign.nodes[0].host}
    with fakes["A"], fakes["B"], fakes["C"]:
        attempts = {
            k: JoinAttempt(tmp, random_name(f"m{k.lower()}")).start(host, token)
            for k, host in targets.items()
        }
        outputs = {k: a.wait_refused() for k, a in attempts.items()}
    after, foreign_after = membership(main.nodes[0]), membership(foreign.nodes[0])
    return Impostors(
        secret=token_secret(token),
        fakes=fakes,
        attempts=attempts,
        outputs=outputs,
        gained=(after[0] - before[0], after[1] - before[1]),
        foreign_gained=(foreign_after[0] - foreign_before[0], foreign_after[1] - foreign_before[1]),
    )


def test_man_in_the_middle_never_receives_the_secret(impostors: Impostors) -> None:
    outputs = impostors.outputs
    for which, fake in impostors.fakes.items():
        # Only the public CA bundle was ever asked for; no join call got through.
        assert fake.request_lines, f"{which}: the joiner never came"
        assert all(line.startswith("GET /v1/ca ") for line in fake.request_lines), (
            which,
            fake.request_lines,
        )
        assert not fake.saw(impostors.secret), f"{which} received the join secret"
    # B and C: the joiner went on to the join call and refused the impostor's certificate.
    assert impostors.fakes["B"].failed_handshakes >= 1, outputs["B"]
    assert impostors.fakes["C"].failed_handshakes >= 1, outputs["C"]
    for which in ("A", "D"):
        assert "man in the middle" in outputs[which], outputs[which]
        assert "Nothing was sent" in outputs[which]
    for which, attempt in impostors.attempts.items():
        assert "p2porch agent: error:" in outputs[which], outputs[which]
        assert attempt.left_nothing() == [], which
    assert impostors.gained == (frozenset(), frozenset())
    assert impostors.foreign_gained == (frozenset(), frozenset())


def test_joiner_names_an_impostor_certificate(impostors: Impostors) -> None:
    for which in ("B", "C"):
        output = impostors.outputs[which]
        assert "certificate" in output and "man in the middle" in output, output
        assert "cannot reach" not in output, output


def test_rotated_token_old_fails_new_joins(
    main: ControlPlaneCluster, extra: ControlPlaneCluster, tmp_path: Path
) -> None:
    old = current_token(main)
    # Rotate through a follower: the new secret is committed to the log for every node.
    resp = main.nodes[3].request("POST", "/v1/token/rotate", json={})
    assert resp.status_code == 200, resp.text
    new = str(resp.json()["token"])
    assert new != old and resp.json()["expiresAt"] is None
    assert pki.JoinToken.parse(new).ca_fingerprint == pki.JoinToken.parse(old).ca_fingerprint
    for node in main.nodes:  # every node now hands out the new token

        def hands_out_new(n: Node = node) -> bool:
            return bool(n.get("/v1/token")["token"] == new)

        wait_for(hands_out_new, 30, "new token", node)

    before = membership(main.nodes[0])
    attempt = JoinAttempt(tmp_path, random_name("old")).start(main.nodes[2].host, old)
    assert "wrong join token" in attempt.wait_refused()
    assert membership(main.nodes[0]) == before

    joiner = extra.add()
    joiner.start(join=main.nodes[2], token=new)
    try:
        wait_for(
            lambda: (
                joiner.name in membership(main.nodes[0])[0]
                and joiner.get("/v1/status")["leader"] is not None
            ),
            60,
            f"{joiner.name} admitted with the new token",
            joiner,
        )
    finally:
        resp = main.nodes[0].request("DELETE", f"/v1/nodes/{joiner.name}")
        assert resp.status_code == 200, resp.text
        wait_for(
            lambda: joiner.name not in membership(main.nodes[0])[1],
            60,
            f"{joiner.name} out of Raft",
            main.nodes[0],
        )
        joiner.terminate()
    assert_unharmed(main)


def test_token_with_a_short_ttl_expires(main: ControlPlaneCluster, tmp_path: Path) -> None:
    first = main.nodes[0]
    asked = time.time()
    resp = first.request("POST", "/v1/token/rotate", json={"ttlSeconds": 3})
    assert resp.status_code == 200, resp.text
    short = str(resp.json()["token"])
    expires_at = float(resp.json()["expiresAt"])
    assert asked + 3 <= expires_at <= time.time() + 3
    while time.time() <= expires_at + 0.5:
        time.sleep(0.2)

    before = membership(first)
    name = random_name("ttl")
    csr = pki.make_request(pki.generate_key(), name).decode()
    body = join_body(token_secret(short), name, "127.0.0.132", csr)
    resp = request_as(main.nodes[1], "POST", "/v1/join", None, json=body)
    assert resp.status_code == 403, resp.text
    assert "expired" in resp.json()["error"]["message"]
    attempt = JoinAttempt(tmp_path, random_name("ttl")).start(first.host, short)
    assert "expired" in attempt.wait_refused()
    assert membership(first) == before

    # A fresh token without expiry works again (checked up to the certificate request, which
    # this body omits on purpose: nothing is admitted).
    resp = first.request("POST", "/v1/token/rotate", json={})
    assert resp.status_code == 200, resp.text
    fresh = token_secret(str(resp.json()["token"]))
    body = {k: v for k, v in join_body(fresh, name, "127.0.0.132", None).items()}
    resp = request_as(main.nodes[1], "POST", "/v1/join", None, json=body)
    assert resp.status_code == 400, resp.text
    assert "csr" in resp.json()["error"]["message"]
    assert membership(first) == before
    assert_unharmed(main)


def test_token_rotation_needs_an_admin(main: ControlPlaneCluster, tmp_path: Path) -> None:
    viewer = make_user(main.nodes[0], random_name("tv"), "viewer", tmp_path)
    token = current_token(main)
    for method, path in (("POST", "/v1/token/rotate"), ("GET", "/v1/token")):
        resp = request_as(main.nodes[1], method, path, viewer, json={})
        assert resp.status_code == 403, resp.text
        resp = request_as(main.nodes[1], method, path, None, json={})
        assert resp.status_code == 401, resp.text
    assert current_token(main) == token
    # An admin still may (the control of the two refusals above).
    resp = request_as(main.nodes[1], "GET", "/v1/token", admin_pair(main.nodes[1]))
    assert resp.status_code == 200 and resp.json()["token"] == token


def test_join_is_refused_to_a_client_that_cannot_reach_the_pinned_ca(
    main: ControlPlaneCluster, tmp_path: Path
) -> None:
    """A token pinning a CA nobody serves: the joiner stops at the CA check, sends nothing."""
    token = pki.JoinToken.parse(current_token(main))
    pinned_elsewhere = str(pki.JoinToken("ab" * 32, token.secret))
    attempt = JoinAttempt(tmp_path, random_name("fp")).start(main.nodes[0].host, pinned_elsewhere)
    output = attempt.wait_refused()
    assert "fingerprint" in output and "Nothing was sent" in output, output
    assert attempt.left_nothing() == []
    with pytest.raises(httpx.HTTPError):  # and no API answers a plain-HTTP join either
        httpx.post(f"http://{main.nodes[0].host}:7950/v1/join", json={}, timeout=10)
