"""Compression: importance (one calibration pass, cached scores: ``importance.Importance``), pruning by named axis
(``prune``), and architecture search (``candidates`` enumeration and ranking statistics, ``nas`` the search)."""
