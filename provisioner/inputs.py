"""The autoscaler's inputs, built one way for the control plane and for the simulator.

Pure code: no I/O, no clock. `fleet.snapshot` reads Redis and `simengine` reads its own
state, and both hand the facts to `policy_inputs`, so the simulator's figures describe
the controller that production runs: the same session length assumed, the same arrival
averages (time constants from the config), nodes counted in the pool of their home queue,
retired nodes counted as nobody's capacity.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace

from provisioner.policy import FAST_TAU_SHARE, NodeSnap, PoolDemand, PoolKey, Snapshot, fast_tau_s
from provisioner.states import NodeState

__all__ = ["ASSUMED_SESSION_S", "FAST_TAU_SHARE", "TICK_S", "Arrivals", "policy_inputs"]

TICK_S = 2.0                 # the beat's backstop scale step (tasks.py runs it this often)
ASSUMED_SESSION_S = 600.0    # mean session length the policy assumes (none is learned)
# FAST_TAU_SHARE (policy): the fast arrival average's time constant as a share of
# `arrival_tau_s` (600 s -> 60 s); fn_arrive.lua keeps both averages with the same share.


@dataclass(frozen=True, slots=True)
class Arrivals:
    """A pool's arrival averages as stored (Redis `vc:arrivals:*`, or the simulator's)."""

    rate: float = 0.0    # EWMA of arrivals/s, time constant tau_s, as of `at`
    fast: float = 0.0    # the same with tau_s * FAST_TAU_SHARE: sees a burst in seconds
    at: float = 0.0

    def counted(self, now: float, tau_s: float) -> Arrivals:
        """These averages after one more arrival at `now` (what fn_arrive.lua does)."""
        rate, fast = self.decayed(now, tau_s)
        return Arrivals(rate + 1 / tau_s, fast + 1 / fast_tau_s(tau_s), now)

    def decayed(self, now: float, tau_s: float) -> tuple[float, float]:
        """(slow, fast) arrivals/s as of `now`, with no arrival since `at`."""
        dt = max(0.0, now - self.at)
        return (self.rate * math.exp(-dt / tau_s) if self.rate else 0.0,
                self.fast * math.exp(-dt / fast_tau_s(tau_s)) if self.fast else 0.0)


def policy_inputs(nodes: Iterable[NodeSnap], pools: Iterable[PoolKey],
                  waiting: Mapping[PoolKey, int], arrivals: Mapping[PoolKey, Arrivals],
                  now: float, tau_s: float, retired: Collection[str] = frozenset()
                  ) -> Snapshot:
    """The snapshot `policy.decide` takes.

    `nodes` are the live nodes, each with `region` = its home (the queue it serves);
    `pools` every live (model, live version, region); `retired` ids of nodes being stopped
    (shown as STOPPED: nobody's capacity). Every pool assumes ASSUMED_SESSION_S sessions.
    """
    snaps = tuple(replace(n, state=NodeState.STOPPED) if n.id in retired else n
                  for n in nodes) if retired else tuple(nodes)
    demand = []
    for key in pools:
        rate, fast = arrivals.get(key, _NONE).decayed(now, tau_s)
        demand.append(PoolDemand(key, waiting=waiting.get(key, 0), arrival_rate_per_s=rate,
                                 mean_session_s=ASSUMED_SESSION_S,
                                 arrival_rate_fast_per_s=fast))
    return Snapshot(snaps, tuple(demand))


_NONE = Arrivals()
