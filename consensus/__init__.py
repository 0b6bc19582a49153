"""p2porch.consensus."""
