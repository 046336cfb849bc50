"""Compression: importance (the statistics: ``importance``; one calibration pass, cached scores:
``importance_cache.Importance``), pruning by named axis (``spec`` what to prune, ``prune`` the slicing and the
recipe), and architecture search (``candidates`` enumeration and ranking statistics, ``nas`` the search)."""
