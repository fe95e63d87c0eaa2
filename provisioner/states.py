"""Node states live in common/ (the node needs them too); re-exported for the control plane."""

from common.states import NodeState

__all__ = ["NodeState"]
