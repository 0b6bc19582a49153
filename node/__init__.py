"""p2porch.node."""
