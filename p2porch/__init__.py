"""p2porch: a peer-to-peer container orchestrator.

The subpackages live in top-level folders of the repository (consensus/, gossip/, node/,
cli/, common/); this folder links them under one import root, ``p2porch.*``.
"""

__version__ = "0.1.0"
