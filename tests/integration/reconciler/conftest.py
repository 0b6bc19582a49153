"""Fixtures for reconciler tests on the real engine: images, a per-test node, cleanup.

Each test gets its own node name (``rc-<random>``), the ownership label of every container
the reconciler makes; teardown removes every container with that label, and the foreign
containers a test makes carry ``io.p2porch-test.run=<node name>`` so they go too. Published
ports bind 127.0.0.4 only; all traffic stays on loopback.
"""

from __future__ import annotations

import contextlib
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import docker
import pytest
import trio

from p2porch.node import images
from p2porch.node.reconcile_core import ReconcilerConfig, ReplicaStatus
from p2porch.node.reconciler import Reconciler
from p2porch.node.runtime import LABEL_NODE, DockerRuntime, RuntimeConfig

ADDRESS = "127.0.0.4"
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
    return f"rc-{uuid.uuid4().hex[:10]}"


def cleanup(client: Any, node_name: str) -> None:
    for label in (f"{LABEL_NODE}={node_name}", f"{TEST_LABEL}={node_name}"):
        for container in client.containers.list(all=True, filters={"label": label}):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.remove(force=True)


@pytest.fixture
async def runtime(
    docker_client: Any, built_images: dict[str, str], node_name: str
) -> AsyncIterator[DockerRuntime]:
    rt = await DockerRuntime.connect(node_name, ADDRESS, RuntimeConfig.local())
    try:
        yield rt
    finally:
        await rt.aclose()
        cleanup(docker_client, node_name)


@contextlib.asynccontextmanager
async def running(
    runtime: DockerRuntime, config: ReconcilerConfig | None = None
) -> AsyncIterator[Reconciler]:
    """A Reconciler running in the background for the body of the ``async with``."""
    rec = Reconciler(runtime, runtime.node_name, ADDRESS, config or ReconcilerConfig.fast())
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        yield rec
        nursery.cancel_scope.cancel()


async def wait_statuses(
    rec: Reconciler,
    predicate: Callable[[list[ReplicaStatus]], bool],
    timeout_s: float = 30.0,
    seen: Callable[[list[ReplicaStatus]], None] | None = None,
) -> list[ReplicaStatus]:
    """Wait (on status changes, not by polling) until ``predicate`` holds; bounded in time."""
    version = rec.status_version
    with trio.fail_after(timeout_s):
        while True:
            statuses = rec.statuses()
            if seen is not None:
                seen(statuses)
            if predicate(statuses):
                return statuses
            version = await rec.wait_statuses_changed(version)


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
