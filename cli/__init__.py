"""The ``p2porch`` command."""
