"""Shared fixtures. Docker-marked tests skip only where no engine exists -- never under CI."""

from __future__ import annotations

import os

import pytest


def docker_available() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=5)
        client.ping()
        client.close()
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("docker") for item in items):
        return
    if docker_available():
        return
    if os.environ.get("P2PORCH_REQUIRE_DOCKER") == "1":
        raise pytest.UsageError(
            "P2PORCH_REQUIRE_DOCKER=1 but no Docker engine answers: refusing to skip docker tests"
        )
    skip = pytest.mark.skip(reason="no Docker engine on this machine")
    for item in items:
        if item.get_closest_marker("docker"):
            item.add_marker(skip)
