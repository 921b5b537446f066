"""Runtimes and probes on the board."""
