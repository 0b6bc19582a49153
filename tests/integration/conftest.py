"""Fixtures shared by the integration tests on the real Docker engine."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import docker
import pytest

from p2porch.node import images


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    client = docker.from_env(timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="session")
def built_images(docker_client: Any) -> dict[str, str]:
    """Build (or find up to date) p2porch/busybox and p2porch/demo once per session."""
    return images.build_builtin_images(docker_client)
