"""The pitch voices: worker_node.splice's shifter, ready on every node, with this package's
params (docs/models.md)."""

from worker_node.splice import make, process_batch  # noqa: F401  the entry and batch step
