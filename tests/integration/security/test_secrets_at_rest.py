"""Secrets, the join secret, the gossip keys and the data key are never on disk in clear.

A binary-safe ``grep -r`` over every node's data dir (WAL segments, snapshots, logs,
everything) for each value as raw bytes, hex and base64. Each search has a positive control:
something the log does hold in clear (a secret's item name, a node's name) is found in every
node's ``raft/`` folder, so an empty result means "not there", not "not searched".
"""

from __future__ import annotations

import base64
import os
import uuid

import pytest

from tests.integration.cluster.harness import Node, wait_for
from tests.integration.security.kit import (
    ControlPlaneCluster,
    assert_unharmed,
    cluster_keyring,
    find_in_files,
    forms_of,
    token_secret,
)

pytestmark = pytest.mark.slow


def test_secret_plaintext_is_nowhere_on_disk(main: ControlPlaneCluster) -> None:
    leader = main.leader()
    via = next(n for n in main.nodes if n is not leader)  # sealed on a follower
    namespace = f"h6-sec-{uuid.uuid4().hex[:8]}"
    item = f"h6item{uuid.uuid4().hex}"  # item names are stored in clear (secret ls shows them)
    text = f"h6-plaintext-{uuid.uuid4().hex}".encode()
    binary = os.urandom(24)
    assert via.request("PUT", f"/v1/namespaces/{namespace}").status_code == 200
    resp = via.request(
        "PUT",
        f"/v1/secrets/{namespace}/db",
        json={
            "data": {
                item: base64.b64encode(text).decode(),
                "blob": base64.b64encode(binary).decode(),
            }
        },
    )
    assert resp.status_code == 200, resp.text
    assert sorted(resp.json()["keys"]) == sorted([item, "blob"])
    for node in main.nodes:

        def listed(n: Node = node) -> bool:
            return any(s["name"] == "db" for s in n.get(f"/v1/secrets?namespace={namespace}"))

        wait_for(listed, 30, f"the secret on {node.name}", node)
    data_dirs = [n.data_dir for n in main.nodes]
    raft_dirs = [n.data_dir / "raft" for n in main.nodes]
    # Control: the item name (clear by design) is in every node's WAL.
    wait_for(
        lambda: len(find_in_files(raft_dirs, {"item": item.encode()})) >= len(main.nodes),
        30,
        "the item name in every WAL",
    )
    needles = {f"text {k}": v for k, v in forms_of(text).items()}
    needles |= {f"binary {k}": v for k, v in forms_of(binary).items()}
    assert find_in_files(data_dirs, needles) == []
    # Nor does the API hand it back: not in the listing, not on the event stream.
    for path in (f"/v1/secrets?namespace={namespace}", "/v1/events"):
        body = leader.request("GET", path).content
        assert not any(v in body for v in needles.values()), path
    assert via.request("DELETE", f"/v1/secrets/{namespace}/db").status_code == 200
    assert via.request("DELETE", f"/v1/namespaces/{namespace}").status_code == 200
    assert_unharmed(main)


def test_cluster_keys_are_not_in_clear_in_the_raft_folders(main: ControlPlaneCluster) -> None:
    first = main.nodes[0]
    # A rotation now, so the log holds a join secret we know.
    resp = first.request("POST", "/v1/token/rotate", json={})
    assert resp.status_code == 200, resp.text
    secret = token_secret(resp.json()["token"])
    for node in main.nodes:

        def rotated(n: Node = node) -> bool:
            return token_secret(n.get("/v1/token")["token"]) == secret

        wait_for(rotated, 30, f"the new token on {node.name}", node)
    needles = {f"join secret {k}": v for k, v in forms_of(secret.encode()).items()}
    for node in main.nodes:
        for i, key in enumerate(cluster_keyring(node).installed_keys()):
            needles |= {f"gossip key {i} {k}": v for k, v in forms_of(key).items()}
    data_key = (first.data_dir / "data.key").read_bytes()
    needles |= {f"data key {k}": v for k, v in forms_of(data_key).items()}
    ca_key = (first.data_dir / "ca.key").read_bytes()
    ca_key_body = b"".join(ca_key.splitlines()[1:-1])  # the base64 of the PKCS#8 DER
    needles |= {"CA key (PEM body)": ca_key_body, "CA key (DER)": base64.b64decode(ca_key_body)}
    raft_dirs = [n.data_dir / "raft" for n in main.nodes]
    # Control: a node's name (clear in PutNode records) is found in every node's raft folder.
    assert len(find_in_files(raft_dirs, {"name": main.nodes[-1].name.encode()})) >= len(main.nodes)
    assert find_in_files(raft_dirs, needles) == []
    assert_unharmed(main)
