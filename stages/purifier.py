"""Stage `purifier`: not implemented yet (see the open issues)."""
