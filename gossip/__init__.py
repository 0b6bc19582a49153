"""p2porch.gossip."""
