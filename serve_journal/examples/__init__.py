"""Runnable examples shipped with the package (so Ray workers can import them)."""
