"""Fixtures for reconciler tests on the real engine: images, a per-test node, cleanup.

Each test gets its own node name (``rc-<random>``), the ownership label of every container
the reconciler makes; teardown removes every container with that label, and the foreign
containers a test makes carry ``io.p2porch-test.run=<node name>`` so they go too. Published
ports bind 127.0.0.4 only; all traffic stays on loopback.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

from p2porch.node.reconcile_core import ReconcilerConfig, ReplicaStatus
from p2porch.node.reconciler import Reconciler
from p2porch.node.runtime import DockerRuntime, RuntimeConfig
from tests.integration.dockerkit import TEST_LABEL, fetch, free_port, remove_test_objects

__all__ = ["ADDRESS", "TEST_LABEL", "fetch", "free_port"]

ADDRESS = "127.0.0.4"


@pytest.fixture
def node_name() -> str:
    return f"rc-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def runtime(
    docker_client: Any, built_images: dict[str, str], node_name: str
) -> AsyncIterator[DockerRuntime]:
    rt = await DockerRuntime.connect(node_name, ADDRESS, RuntimeConfig.local())
    try:
        yield rt
    finally:
        await rt.aclose()
        remove_test_objects(docker_client, node_name)


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
