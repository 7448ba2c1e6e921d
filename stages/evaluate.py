"""Stage `evaluate`: not implemented yet (see the open issues)."""
