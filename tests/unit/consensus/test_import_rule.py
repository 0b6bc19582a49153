"""The Raft core stays sans-I/O: no clocks, sockets, threads, event loops or global randomness."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CONSENSUS = Path(__file__).resolve().parents[3] / "consensus"
PURE = ["core.py", "log.py", "messages.py", "config.py", "errors.py"]
FORBIDDEN = {"trio", "time", "socket", "msgpack", "docker", "asyncio", "threading", "random"}


@pytest.mark.parametrize("name", PURE)
def test_pure_module_imports(name: str) -> None:
    tree = ast.parse((CONSENSUS / name).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, f"{name} imports {sorted(imported & FORBIDDEN)}"


def test_core_keeps_its_rng_attribute() -> None:
    import random

    from p2porch.consensus.config import RaftConfig
    from p2porch.consensus.core import RaftCore
    from p2porch.consensus.messages import Membership, PersistentState

    rng = random.Random(7)
    core = RaftCore("a", RaftConfig(), rng, PersistentState.bootstrap(Membership(frozenset("a"))))
    assert core.rng is rng
