"""Errors of the gossip layer.

::

    P2porchError                       (p2porch.common.errors)
    └── GossipError                    anything the gossip layer raises on purpose
        ├── MetaTooLarge               set_meta() beyond config.max_meta_bytes
        ├── NotRunning                 an operation after leave() / on a stopped service
        ├── JoinFailed                 no seed answered within the join attempts (shell)
        └── TransportError             the shell's socket work failed (wraps OSError etc.)
            └── KeyringError           decryption / key management problems (keyring)

Bad bytes from a peer are *not* raised out of the core: they surface as
``p2porch.common.errors.CodecError`` inside it, are dropped and counted in ``stats()``.
"""

from __future__ import annotations

from p2porch.common.errors import P2porchError


class GossipError(P2porchError):
    """Root of the gossip layer's errors."""


class MetaTooLarge(GossipError):
    """Node metadata must fit in a datagram next to other rumours; the bound is a config field."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"node metadata is {size} bytes; max_meta_bytes is {limit}")
        self.size = size
        self.limit = limit


class NotRunning(GossipError):
    """The node left the cluster (or the service stopped); it no longer takes part."""


class JoinFailed(GossipError):
    """No seed could be reached to join the cluster."""


class TransportError(GossipError):
    """Sending or receiving on the network failed (the shell wraps OSError and friends)."""


class KeyringError(TransportError):
    """A datagram could not be decrypted, or a key operation is invalid."""
