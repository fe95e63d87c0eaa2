"""A pitch voice: worker_node.splice's shifter (on every node) with this package's params."""

from worker_node.splice import make, process_batch  # noqa: F401  the entry and batch step
