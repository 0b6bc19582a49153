"""Base of every p2porch exception.

Each package has its own ``errors.py`` deriving from :class:`P2porchError`, so a caller can
catch everything from the project with one clause and still tell layers apart::

    P2porchError
    ├── common.errors.CodecError          bad bytes from a peer (dropped and counted)
    ├── consensus.errors.ConsensusError   (see consensus/errors.py)
    ├── gossip.errors.GossipError         (see gossip/errors.py)
    └── node.errors.NodeError             (see node/errors.py)
"""


class P2porchError(Exception):
    """Root of every exception the project raises on purpose."""


class CodecError(P2porchError):
    """Bytes that do not decode to a registered, well-typed value.

    Raised only at the boundary where peer bytes enter; the caller drops the input and counts it.
    """
