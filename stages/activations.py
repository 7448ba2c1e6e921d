"""Stage `activations`: not implemented yet (see the open issues)."""
