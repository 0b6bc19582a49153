"""Entry point of the ``p2porch`` command.

The full CLI (init, join, apply, get, ...) arrives with the node daemon; until then the
command reports honestly what exists.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["demo"]:
        print(
            "p2porch demo: the node daemon is not built yet (see the open issues).\n"
            "What runs today: the Raft and SWIM layers and their simulations, e.g.\n"
            "  .venv/bin/python -m p2porch.consensus.sim --seeds 50\n"
            "  .venv/bin/python -m p2porch.gossip.sim --nodes 100 --seconds 30"
        )
        return 0
    print("usage: p2porch demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
