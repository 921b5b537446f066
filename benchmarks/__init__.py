"""Measured comparisons, run as ``python -m benchmarks.<name>`` from the repository root.

- ``snapshot_bytes``: bytes each snapshot policy writes, against the number of snapshots;
- ``cil``: class-incremental accuracy of every method on CIFAR-10 (or digits for a smoke run).

Each prints a table, writes JSON (``--out DIR``, default ``runs/benchmarks/<name>/``), draws a
PNG where a curve says more, and prints one JSON object on stdout with ``--json``. None is a test.
"""
