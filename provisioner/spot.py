"""Spot machines taken back: what the control plane does with an interruption notice.

A spot node learns of its interruption from its instance metadata (EC2's
`spot/instance-action`, polled by worker_node/metadata.py) and says so in its heartbeats
(`interruption_at`); `voicectl kill-node --spot-notice` plays the provider by hand. Either
way `noticed` drains the node for good, reason `spot`, with the notice's time as its
deadline: it takes nobody new, its streams move make-before-break (the drain's path), the
policy counts it as nobody's capacity (its users as demand of its pool, so capacity for
them boots), and the reaper destroys it once empty, or at the deadline, when the machine
goes anyway.
"""

from __future__ import annotations

import logging

from provisioner.state import State

__all__ = ["SPOT", "noticed"]

log = logging.getLogger("provisioner.spot")

SPOT = "spot"   # the drain reason of a node its provider takes back


def noticed(state: State, node_id: str, at: float, now: float) -> float | None:
    """The provider takes `node_id` back at `at`: drain it for good. Returns its drain
    deadline (the notice's time, or an earlier one it had already); None for a node the
    control plane does not know. Idempotent: every heartbeat repeats the notice."""
    rec = state.node(node_id)
    if rec is None:
        return None
    if rec.interrupt_at == at and rec.drain_deadline is not None:
        return float(rec.drain_deadline)
    keep = rec.drain_deadline is not None and not rec.consolidating
    deadline = min(at, rec.drain_deadline) if keep and rec.drain_deadline else at
    state.interrupt(node_id, at, deadline)
    state.count("voice_spot_notices")
    log.warning("node %s (%s v%s in %s): its provider takes it back in %.0f s (spot notice): "
                "draining, its %d user(s) move to other nodes", node_id, rec.model,
                rec.version, rec.region, at - now, rec.sessions)
    return deadline
