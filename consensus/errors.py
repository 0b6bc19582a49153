"""Errors raised by the consensus layer.

::

    P2porchError                          (p2porch.common.errors)
    └── ConsensusError                    anything the Raft layer refuses or fails at
        ├── NotLeader                     this node cannot accept the request; try leader_hint
        ├── ProposalDropped               the leader refused it for now (back-pressure, a
        │   │                             leadership transfer in progress); retrying is safe
        │   └── ConfChangeRefused         a membership change not allowed now (one already
        │                                 pending, a learner too far behind, no such member...)
        └── TransferRefused               a leadership transfer that cannot start

Storage errors live in ``consensus/storage.py`` and also derive from :class:`ConsensusError`.
"""

from __future__ import annotations

from p2porch.common.errors import P2porchError


class ConsensusError(P2porchError):
    """Root of every consensus-layer error."""


class NotLeader(ConsensusError):
    """Only the leader accepts proposals and reads; ``leader_hint`` is who we think leads."""

    def __init__(self, leader_hint: str | None) -> None:
        super().__init__(f"not the leader (leader hint: {leader_hint})")
        self.leader_hint = leader_hint


class ProposalDropped(ConsensusError):
    """The leader refused the proposal without appending it; nothing was written."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"proposal dropped: {reason}")
        self.reason = reason


class ConfChangeRefused(ProposalDropped):
    """A membership change the current configuration or progress does not allow."""


class TransferRefused(ConsensusError):
    """A leadership transfer to a node that is not a voter, or while not leader."""
