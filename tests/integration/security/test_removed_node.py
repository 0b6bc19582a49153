"""A removed node comes back with what its data dir still holds: it is refused everywhere.

The node joins, is removed with ``p2porch node rm`` (the operator's way), stops; then its
certificate and key -- still valid in time, still chained to the cluster CA -- are tried on
every member's API, Raft and gossip ports, and its name on the join call.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import httpx
import pytest

from p2porch.common import pki
from p2porch.gossip.keyring import load_keyring
from tests.integration.cluster.harness import Node, wait_for
from tests.integration.security.kit import (
    AGENT_ARGS,
    GOSSIP_PORT,
    RAFT_PORT,
    ControlPlaneCluster,
    assert_unharmed,
    counted,
    counters,
    gossip_frame,
    join_body,
    membership,
    node_pair,
    refused_after_handshake,
    request_as,
    ssl_context,
    token_secret,
)

pytestmark = pytest.mark.slow


STOLEN = ("node.pem", "node.key", "admin.pem", "admin.key", "gossip.keys")


@attrs.frozen
class Removed:
    node: Node
    # Copies of its credentials taken while it was a member (what it, or a thief, keeps
    # whatever removal later does to the data dir).
    stolen: Path
    # The joined agent's command line, read while it ran (/proc/PID/cmdline: any local user).
    cmdline: bytes
    secret: str

    @property
    def node_pair(self) -> tuple[Path, Path]:
        return self.stolen / "node.pem", self.stolen / "node.key"

    @property
    def admin_pair(self) -> tuple[Path, Path]:
        return self.stolen / "admin.pem", self.stolen / "admin.key"


@pytest.fixture(scope="module")
def removed(
    main: ControlPlaneCluster,
    extra: ControlPlaneCluster,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Removed]:
    """A node joined the operator's way (``p2porch join``, which starts a detached agent),
    then removed with ``p2porch node rm``, then stopped."""
    token = main.nodes[0].get("/v1/token")["token"]
    node = extra.add()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "p2porch.cli.main",
            "join",
            main.nodes[1].host,
            "--token",
            token,
            "--data-dir",
            str(node.data_dir),
            "--advertise",
            node.host,
            "--name",
            node.name,
            "--preset",
            "local",
            *AGENT_ARGS,
        ],
        check=True,
        capture_output=True,
        timeout=90,
    )
    pid = int((node.data_dir / "agent.pid").read_text())
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        wait_for(
            lambda: (
                node.name in membership(main.nodes[0])[1]
                and all(v.get(node.name) == "alive" for v in _views(main))
            ),
            60,
            f"{node.name} admitted and alive",
            node,
        )
        stolen = tmp_path_factory.mktemp("stolen")
        for name in STOLEN:
            shutil.copy2(node.data_dir / name, stolen / name)
        main.nodes[0].cli("node", "rm", node.name)
        for member in main.nodes:

            def gone(m: Node = member) -> bool:
                marked = any(r["name"] == node.name and r["removed"] for r in m.get("/v1/nodes"))
                return marked and node.name not in membership(m)[1]

            wait_for(gone, 60, f"{node.name} removed, as {member.name} sees it", member)
    finally:
        _stop(pid)
    yield Removed(node, stolen, cmdline, token_secret(token))


def _stop(pid: int) -> None:
    """Stop the detached agent (ours: started above) and wait until it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _views(main: ControlPlaneCluster) -> list[dict[str, str]]:
    return [{r["name"]: r["status"] for r in n.get("/v1/nodes")} for n in main.nodes]


def test_removed_node_certificate_is_refused_by_every_api(
    main: ControlPlaneCluster, removed: Removed
) -> None:
    assert pki.verify_issued_by(
        pki.load_cert(removed.node_pair[0].read_bytes()),
        pki.load_certs((main.nodes[0].data_dir / "ca.pem").read_bytes())[0],
    ), "the removed node's certificate is still a valid one of this CA"
    for member in main.nodes:
        before = counters(member)
        with pytest.raises(httpx.TransportError):
            request_as(member, "GET", "/v1/status", removed.node_pair)
        with pytest.raises(httpx.TransportError):  # not even the open endpoints
            request_as(member, "GET", "/healthz", removed.node_pair)
        counted(member, before, api__tls_refused=2)
        # The control: another member's certificate is served.
        other = next(n for n in main.nodes if n is not member)
        assert request_as(member, "GET", "/v1/status", node_pair(other)).status_code == 200
    assert_unharmed(main)


def test_removed_node_cannot_speak_raft_or_gossip(
    main: ControlPlaneCluster, removed: Removed
) -> None:
    for member in main.nodes:
        context = ssl_context(member.data_dir / "ca.pem", *removed.node_pair)
        # A genuine gossip request: the removed node still holds the gossip key.
        frame = gossip_frame(load_keyring(removed.stolen / "gossip.keys"), member.name)
        before = counters(member)
        assert refused_after_handshake(member.host, RAFT_PORT, context, b"\x00\x00\x00\x00")
        assert refused_after_handshake(member.host, GOSSIP_PORT, context, frame)
        counted(member, before, raftTlsRefused=1, gossipTlsRefused=1)
    assert_unharmed(main)


def test_removed_name_cannot_join_again(main: ControlPlaneCluster, removed: Removed) -> None:
    secret = token_secret(main.nodes[0].get("/v1/token")["token"])
    csr = pki.make_request(pki.generate_key(), removed.node.name).decode()
    before = membership(main.nodes[0])
    body = join_body(secret, removed.node.name, removed.node.host, csr)
    resp = request_as(main.nodes[2], "POST", "/v1/join", None, json=body)
    assert resp.status_code == 409, resp.text
    assert membership(main.nodes[0]) == before


def test_removed_node_keeps_nothing_that_opens_the_cluster(
    main: ControlPlaneCluster, removed: Removed
) -> None:
    member = main.nodes[0]
    try:
        resp = request_as(member, "GET", "/v1/token", removed.admin_pair)
        usable = resp.status_code == 200
    except httpx.TransportError:
        usable = False
    assert not usable, "the removed node's admin certificate still reads the join token"
    left = sorted(
        f
        for f in ("ca.key", "data.key", "gossip.keys", "admin.key", "join-token")
        if (removed.node.data_dir / f).exists()
    )
    assert left == [], f"the removed node's data dir still holds {left}"


def test_the_join_token_is_not_on_the_agents_command_line(removed: Removed) -> None:
    assert removed.cmdline, "the agent's command line was read"
    assert removed.secret.encode() not in removed.cmdline
