"""Helpers shared by the integration tests that drive the real Docker engine.

Traffic goes only to loopback (published ports on 127.0.0.x), never to a container's
bridge address.
"""

from __future__ import annotations

import contextlib
import socket
import urllib.error
import urllib.request
from typing import Any

import docker
import trio

from p2porch.node.runtime import LABEL_NODE

# Containers a test makes itself (not through the runtime) carry this label for cleanup.
TEST_LABEL = "io.p2porch-test.run"


def free_port(address: str) -> int:
    """A port nothing listens on right now (tiny race with other processes, acceptable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def remove_test_objects(client: Any, node_name: str) -> None:
    """Remove every container and volume owned by ``node_name`` or labelled for its test."""
    for label in (f"{LABEL_NODE}={node_name}", f"{TEST_LABEL}={node_name}"):
        for container in client.containers.list(all=True, filters={"label": label}):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.remove(force=True)
        for volume in client.volumes.list(filters={"label": label}):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                volume.remove(force=True)


async def fetch(url: str) -> str:
    """GET ``url`` (loopback only), retrying while the server comes up."""

    def get() -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    with trio.fail_after(30):
        while True:
            body = await trio.to_thread.run_sync(get)
            if body is not None:
                return body
            await trio.sleep(0.1)
