"""Compression: importance from calibration passes, pruning by named axis, and architecture search."""
