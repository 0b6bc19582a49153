"""Fixtures for runtime tests on the real engine: images, a per-test node, cleanup.

Every test gets its own node name (``it-<random>``), which is also the ownership label of
every container it makes; teardown removes all containers and volumes with that label, and
foreign containers a test makes carry ``io.p2porch-test.run=<node name>`` so they are found
and removed too. Traffic goes only to published ports on 127.0.0.2.
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import docker
import pytest

from p2porch.node import images
from p2porch.node.runtime import LABEL_NODE, DockerRuntime, RuntimeConfig

ADDRESS = "127.0.0.2"
TEST_LABEL = "io.p2porch-test.run"


def free_port(address: str = ADDRESS) -> int:
    """A port nothing listens on right now (tiny race with other processes, acceptable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    client = docker.from_env(timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="session")
def built_images(docker_client: Any) -> dict[str, str]:
    """Build (or find up to date) p2porch/busybox and p2porch/demo once per session."""
    return images.build_builtin_images(docker_client)


@pytest.fixture
def node_name() -> str:
    return f"it-{uuid.uuid4().hex[:10]}"


def _cleanup(client: Any, node_name: str) -> None:
    for label in (f"{LABEL_NODE}={node_name}", f"{TEST_LABEL}={node_name}"):
        for container in client.containers.list(all=True, filters={"label": label}):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.remove(force=True)
        for volume in client.volumes.list(filters={"label": label}):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                volume.remove(force=True)


@pytest.fixture
async def runtime(
    docker_client: Any, built_images: dict[str, str], node_name: str
) -> AsyncIterator[DockerRuntime]:
    rt = await DockerRuntime.connect(node_name, ADDRESS, RuntimeConfig.local())
    try:
        yield rt
    finally:
        await rt.aclose()
        _cleanup(docker_client, node_name)
