"""Fixtures for runtime tests on the real engine: images, a per-test node, cleanup.

Every test gets its own node name (``it-<random>``), which is also the ownership label of
every container it makes; teardown removes all containers and volumes with that label, and
foreign containers a test makes carry ``io.p2porch-test.run=<node name>`` so they are found
and removed too. Traffic goes only to published ports on 127.0.0.2.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from p2porch.node.runtime import DockerRuntime, RuntimeConfig
from tests.integration.dockerkit import TEST_LABEL, free_port, remove_test_objects

__all__ = ["ADDRESS", "TEST_LABEL", "free_port"]

ADDRESS = "127.0.0.2"


@pytest.fixture
def node_name() -> str:
    return f"it-{uuid.uuid4().hex[:10]}"


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
