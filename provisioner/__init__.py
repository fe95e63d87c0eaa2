"""The control plane: live state in Redis, placement and scaling policy, clouds."""
