"""Lifecycle states of a node (see docs/architecture.md)."""

from enum import StrEnum


class NodeState(StrEnum):
    """requested -> booting -> loading -> ready -> draining -> stopped; dead from any state."""

    REQUESTED = "requested"
    BOOTING = "booting"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    DEAD = "dead"

    @property
    def serving(self) -> bool:
        """True while the node holds streams (ready, or draining its live ones)."""
        return self in (NodeState.READY, NodeState.DRAINING)

    @property
    def coming(self) -> bool:
        """True while the node is on its way to ready."""
        return self in (NodeState.REQUESTED, NodeState.BOOTING, NodeState.LOADING)
