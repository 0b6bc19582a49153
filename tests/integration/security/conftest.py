"""The clusters the hostile-input suite attacks, shared by its modules (one package scope).

``main`` is five real agents on 127.0.0.100-104; every test leaves it as it found it (five
live voters) and checks that with :func:`~tests.integration.security.kit.assert_unharmed`.
``foreign`` is an unrelated one-node cluster (its own CA) on 127.0.0.110; ``extra`` holds the
nodes a test really joins to ``main`` (127.0.0.124-129), removed again by that test.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.integration.cluster.harness import wait_for
from tests.integration.security.kit import AGENT_ARGS, ControlPlaneCluster, member_views


def _dump_logs(c: ControlPlaneCluster) -> None:
    for node in c.nodes:
        sys.stderr.write(f"\n--- {node.name} ({node.host}) log ---\n{node.log(80)}\n")


@pytest.fixture(scope="package")
def main(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneCluster]:
    c = ControlPlaneCluster(
        tmp_path_factory.mktemp("sec-main"), "sm", first_host=100, agent_args=AGENT_ARGS
    )
    try:
        c.form(5)
        first = c.nodes[0]
        wait_for(lambda: len(first.get("/v1/status")["voters"]) == 5, 60, "5 voters", first)
        wait_for(
            lambda: all(
                len(v) == 5 and set(v.values()) == {"alive"} for v in member_views(c).values()
            ),
            60,
            "every member alive everywhere",
            first,
        )
    except BaseException:
        _dump_logs(c)
        c.teardown()
        raise
    yield c
    c.teardown()


@pytest.fixture(scope="package")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneCluster]:
    c = ControlPlaneCluster(
        tmp_path_factory.mktemp("sec-foreign"), "fx", first_host=110, agent_args=AGENT_ARGS
    )
    try:
        c.form(1)
    except BaseException:
        _dump_logs(c)
        c.teardown()
        raise
    yield c
    c.teardown()


@pytest.fixture(scope="package")
def extra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneCluster]:
    c = ControlPlaneCluster(
        tmp_path_factory.mktemp("sec-extra"), "sx", first_host=124, agent_args=AGENT_ARGS
    )
    yield c
    c.teardown()
