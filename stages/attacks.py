"""Stage `attacks`: not implemented yet (see the open issues)."""
