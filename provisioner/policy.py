"""Autoscaling policy: how many nodes of which model boot where, which to stop, which to reload.

Pure code: no I/O, no clock, no randomness. The Celery beat task and the simulator both take
a `Snapshot` of the fleet and the queues, call `decide(snapshot, now, cfg)`, and apply the
`Decisions`. Applying them and taking the next snapshot must make a second call boot nothing
more: coming nodes (requested, booting, loading) count as capacity.

A pool is one (model, version, region). Its demand is its streaming sessions plus its
waiting users; free slots on top form a warm buffer (`warm_buffer_slots`) so that arrivals
find room while new capacity gets ready: per pool for the arrivals of one model reload,
per region (on idle nodes of any model, a reload away) for those of one VM boot.
`Snapshot.demand` lists every live pool (zero demand included): a (model, version) that
no demand entry names is not live and keeps no buffer and no minimum. Draining nodes are
nobody's capacity, and are never retargeted or stopped here.

Arrivals come as two averages (`PoolDemand`): over ~10 minutes and over ~1 minute. The
policy plans for the fast one while it is significantly above the slow one, so a burst
counts within seconds and noise in the fast one books nothing.

The baselines `decide_fixed_buffer`, `decide_reactive` and `static_fleet` have the same
signature, so the simulator can measure the policy against them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal

from provisioner.scaling import (
    FAST_TAU_SHARE,
    SPOT_NOTICE_S,
    Decisions,
    NodeSnap,
    Policy,
    PoolDemand,
    PoolKey,
    ScalingConfig,
    Snapshot,
    fast_tau_s,
)
from provisioner.states import NodeState

__all__ = [
    "FAST_TAU_SHARE", "Decisions", "NodeSnap", "Policy", "PoolDemand", "PoolKey",
    "ScalingConfig", "Snapshot", "fast_tau_s",
    "consolidation", "decide", "decide_fixed_buffer", "decide_reactive", "spot_hedge",
    "static_fleet", "warm_buffer_slots",
]

# A node is emptied only when, once empty, it could stop within this much more than its
# idle grace and stop window (the moves' deadline and a few ticks).
MOVE_SLACK_S = 60.0


def warm_buffer_slots(streaming: int, arrival_rate_per_s: float, mean_session_s: float,
                      lead_s: float, z: float) -> int:
    """Free slots to keep so that arrivals during `lead_s` rarely find no room.

    Over the lead time L, arrivals are Poisson(a = rate * L) and about
    d = streaming * (1 - exp(-L / mean_session_s)) current sessions end; the net growth
    a - d has variance a + d (Skellam), so the buffer is ceil(a - d + z * sqrt(a + d)),
    at least 0, and 0 when even a single arrival within L is rarer than the z tail.
    """
    return _skellam_slots(max(0.0, arrival_rate_per_s) * lead_s,
                          _ends(streaming, mean_session_s, lead_s), z)


def _ends(streaming: int, mean_session_s: float, lead_s: float) -> float:
    return streaming * -math.expm1(-lead_s / mean_session_s) if mean_session_s > 0 else 0.0


def _skellam_slots(arrivals: float, ends: float, z: float) -> int:
    if arrivals <= 0.0:
        return 0   # a buffer against departures alone would never be used
    if -math.expm1(-arrivals) <= 0.5 * math.erfc(z / math.sqrt(2)):
        # Even one arrival within the lead time is less likely than the tail z allows, so
        # keep nothing warm (the normal approximation would round any trickle up to a slot,
        # and a decaying arrival-rate average would then hold a node forever).
        return 0
    return max(0, math.ceil(arrivals - ends + z * math.sqrt(arrivals + ends) - 1e-9))


BufferFn = Callable[[int, float, float, float, float], int]  # streaming, rate, mean_s, lead_s, z


@dataclass(slots=True)
class _Pool:
    key: PoolKey
    demand: PoolDemand | None
    ready: list[NodeSnap] = field(default_factory=list)
    coming: list[NodeSnap] = field(default_factory=list)
    streaming: int = 0
    count: int = 0     # nodes kept, as the plan goes
    spots: int = 0     # how many of them are spot nodes
    slots: int = 0     # their slots
    soon: int = 0      # the slots of those ready within the pool's lead time
    rate: float = 0.0  # arrivals/s to plan for (`_plan_rates`)

    @property
    def waiting(self) -> int:
        return self.demand.waiting if self.demand else 0

    @property
    def free(self) -> int:
        return self.slots - self.streaming - self.waiting

    def buffer(self, fn: BufferFn, lead_s: float, z: float) -> int:
        if self.demand is None:
            return 0   # not live: no buffer, no minimum
        return fn(self.streaming, self.rate, self.demand.mean_session_s, lead_s, z)

    def keep(self, capacity: int, nodes: int = 1, soon: bool = True, spot: bool = False
             ) -> None:
        self.count += nodes
        self.spots += nodes if spot else 0
        self.slots += capacity * nodes
        self.soon += capacity * nodes if soon else 0

    def on_spot(self, more: int, share: float) -> int:
        """How many of `more` nodes to boot on spot: up to `share` of the pool's nodes
        (rounded down: a pool of one node keeps it on-demand below a share of 1)."""
        return max(0, min(more, math.floor(share * (self.count + more) + 1e-9) - self.spots))


def _pools(snapshot: Snapshot) -> dict[PoolKey, _Pool]:
    # Indexed by plain tuples while grouping: they hash much faster than PoolKey.
    pools = {(d.key.model, d.key.version, d.key.region): _Pool(d.key, d)
             for d in snapshot.demand}
    ready, coming = NodeState.READY, (NodeState.REQUESTED, NodeState.BOOTING, NodeState.LOADING)
    draining = NodeState.DRAINING
    for node in snapshot.nodes:
        state = node.state
        if state is draining:   # of a live version: its users are moving into its pool
            if (pool := pools.get((node.model, node.version, node.region))) is not None:
                pool.streaming += node.sessions
        elif state is ready or state in coming:
            pool = pools.get((node.model, node.version, node.region))
            if pool is None:
                pool = pools[(node.model, node.version, node.region)] = _Pool(node.key, None)
            if state is ready:
                pool.ready.append(node)
                pool.streaming += node.sessions
            else:
                pool.coming.append(node)
    return {pool.key: pool for pool in pools.values()}


def _plan_rates(members: list[_Pool], fast_tau_s: float) -> None:
    """Set each live pool's planning rate (`PoolDemand.rate_per_s`)."""
    for p in members:
        if p.demand:
            p.rate = p.demand.rate_per_s(fast_tau_s)


def _plan(snapshot: Snapshot, now: float, cfg: ScalingConfig, *, buffer: BufferFn,
          may_stop: Callable[[NodeSnap], bool], pooled: bool, margin: int = 0,
          queue_lead: bool = False, z_at: Callable[[str], float] | None = None,
          spot_share: float = 0.0) -> Decisions:
    """Size every pool to demand + buffer; reuse, keep or stop the idle nodes left over.

    Unpooled, each pool keeps the buffer for a new node's full lead time. Pooled, a pool
    keeps only the buffer for the time a reload takes, and each region keeps the buffer
    for a boot's lead time over all its pools together, as idle nodes of any model that
    the pool in need takes by reloading: fewer free slots for the same waits. An idle
    node is spare only if its pool, when it wants any room, keeps `margin` slots more than
    it wants (hysteresis: a node booted again a minute after it stopped costs a boot).
    With `queue_lead`, a pool with users waiting sizes its buffer for a boot's lead time:
    its queue shows that the region's buffer did not hold, and the arrivals of the next
    boot would otherwise wait a whole boot each (one decision answers the burst).
    `z_at(region)` is the buffer's z-score there (default `cfg.buffer_z`). Where spot is
    offered, up to `spot_share` of each pool's nodes (ready and coming) boot on spot.
    """
    pools = _pools(snapshot)
    fast_tau = cfg.fast_tau_s
    by_region: dict[str, list[_Pool]] = {}
    for pool in sorted(pools.values(), key=lambda p: (p.key.model, p.key.version, p.key.region)):
        by_region.setdefault(pool.key.region, []).append(pool)
    spare: dict[str, list[NodeSnap]] = {}        # region -> idle ready nodes not needed
    want: dict[tuple[str, str], int] = {}        # pool -> demand + its own buffer (slots)
    missing: dict[tuple[str, str], int] = {}     # pool -> nodes short within its lead

    def stop_order(n: NodeSnap) -> tuple[bool, Decimal, float, float, str]:
        """Stoppable first, then the most expensive, nearest the end of its paid time."""
        return (not may_stop(n), -cfg.node_price(n), cfg.paid_left_s(n, now),
                -_idle_for(n, now), n.id)

    boot: list[PoolKey] = []
    spot: list[PoolKey] = []
    moves: list[tuple[str, PoolKey]] = []
    for region in sorted(by_region):
        members = by_region[region]
        z = z_at(region) if z_at else cfg.buffer_z
        _plan_rates(members, fast_tau)
        reload_faster = pooled and cfg.load_s < cfg.lead_s(region)
        boot_lead = cfg.reaction_s + cfg.lead_s(region)
        lead = cfg.reaction_s + cfg.load_s if reload_faster else boot_lead
        for pool in members:
            ident, key = _ident(pool.key), pool.key
            own_lead = boot_lead if queue_lead and pool.waiting else lead
            want[ident] = (pool.streaming + pool.waiting + pool.buffer(buffer, own_lead, z)
                           + (spot_hedge(cfg, region, pool.ready) if spot_share else 0))
            lo, hi = (cfg.min_nodes(key.model) if pool.demand else 0), cfg.max_nodes(key.model)
            # Unpooled, every coming node counts; pooled, only those ready within a reload.
            ready_slots = sum(n.capacity for n in pool.ready)
            pool.count = len(pool.ready) + len(pool.coming)
            pool.spots = sum(n.spot for n in pool.ready) + sum(n.spot for n in pool.coming)
            pool.slots = ready_slots + sum(n.capacity for n in pool.coming)
            pool.soon = ready_slots + sum(
                n.capacity for n in pool.coming
                if not pooled or (n.eta_ready if n.eta_ready is not None else now) <= now + lead)
            keep_slots = want[ident] + (margin if want[ident] else 0)
            for node in sorted((n for n in pool.ready if n.sessions == 0), key=stop_order):
                if pool.count > hi or (pool.count > lo and pool.soon - node.capacity >= keep_slots):
                    spare.setdefault(region, []).append(node)
                    pool.keep(node.capacity, -1, spot=node.spot)
            short = math.ceil(max(0, want[ident] - pool.soon) / cfg.capacity_of(key.model))
            missing[ident] = max(0, min(max(short, lo - pool.count), hi - pool.count))

        share = spot_share if cfg.spot_offered(region) else 0.0
        region_spare = spare.get(region, [])
        region_spare.sort(key=lambda n: (may_stop(n), n.id))   # reuse the paid-for first
        for pool in sorted(members, key=lambda p: (-p.waiting, -missing[_ident(p.key)])):
            ident, key = _ident(pool.key), pool.key
            while reload_faster and missing[ident] and region_spare:
                node = region_spare.pop(0)
                moves.append((node.id, key))
                pool.keep(cfg.capacity_of(key.model), spot=node.spot)
                missing[ident] -= 1
            # Boot only for what the nodes already coming will not cover.
            short = math.ceil(max(0, want[ident] - pool.slots) / cfg.capacity_of(key.model))
            floor = cfg.min_nodes(key.model) - pool.count if pool.demand else 0
            more = max(0, min(max(short, floor), cfg.max_nodes(key.model) - pool.count))
            on_spot = pool.on_spot(more, share)
            spot.extend([key] * on_spot)
            boot.extend([key] * (more - on_spot))
            pool.keep(cfg.capacity_of(key.model), more - on_spot, soon=False)
            pool.keep(cfg.capacity_of(key.model), on_spot, soon=False, spot=True)
        if not pooled:
            continue

        live = [p for p in members if p.demand]
        lead = boot_lead
        arrivals = sum(p.rate for p in live) * lead
        ends = sum(_ends(p.streaming, p.demand.mean_session_s, lead) for p in live if p.demand)
        need = _skellam_slots(arrivals, ends, z) - sum(p.free for p in live)
        region_spare.sort(key=stop_order)
        owner = {_ident(p.key): p for p in members}
        while need > 0 and region_spare:             # keep the cheapest, least stoppable
            node = region_spare.pop()
            owner[(node.model, node.version)].keep(node.capacity, spot=node.spot)
            need -= node.capacity
        while need > 0:                              # boot for the pool likeliest to need it
            room = [p for p in live if p.count < cfg.max_nodes(p.key.model)]
            if not room:
                break
            pool = max(room, key=lambda p: (p.buffer(buffer, lead, z) - p.free, p.key.model))
            on_spot = pool.on_spot(1, share) > 0
            (spot if on_spot else boot).append(pool.key)
            pool.keep(cfg.capacity_of(pool.key.model), soon=False, spot=on_spot)
            need -= cfg.capacity_of(pool.key.model)

    stop = [n.id for region in spare for n in spare[region] if may_stop(n)]
    return Decisions(boot=tuple(boot), stop=tuple(sorted(stop)), retarget=tuple(moves),
                     spot=tuple(spot))


def spot_hedge(cfg: ScalingConfig, region: str, nodes: Iterable[NodeSnap]) -> int:
    """Free slots a pool keeps so that the users of a spot node told of its interruption
    find room on its other nodes before it goes: a whole node's (its own free slots do not
    count) where one of its ready spot `nodes` serves users and a new node would not be
    ready within the notice (SPOT_NOTICE_S); elsewhere 0, since the replacement the policy
    boots at the notice is ready in time."""
    if cfg.reaction_s + cfg.lead_s(region) <= SPOT_NOTICE_S:
        return 0
    return max((n.capacity for n in nodes
                if n.spot and n.sessions and n.state is NodeState.READY), default=0)


def _ident(key: PoolKey) -> tuple[str, str]:
    """A pool's name within its region (faster to hash than the key)."""
    return key.model, key.version


def _idle_for(node: NodeSnap, now: float) -> float:
    return now - node.idle_since if node.idle_since is not None else 0.0


def decide(snapshot: Snapshot, now: float, cfg: ScalingConfig) -> Decisions:
    """The autoscaler: demand plus a warm buffer, pooled per region; billing-aware stops.

    Each pool keeps free slots for the arrivals of one reload (`load_s`); each region keeps
    free slots, on idle nodes of any model, for the arrivals of all its pools during one
    boot (`warm_buffer_slots`), both at the region's z-score (`ScalingConfig.buffer_z_at`:
    lower where a provider bills long increments). Arrival rates are the minute-scale
    average while it is significantly above the ten-minute one (a burst), else the
    ten-minute one. A pool with users waiting plans its own buffer for a whole boot: one
    decision books nodes for everyone queued plus the arrivals until they are ready. A
    pool short of room takes
    idle nodes of other pools of its region by reloading them (faster than booting a VM),
    then boots the rest. Where spot is offered, up to `spot_share` of each pool's nodes boot
    on spot (`Decisions.spot`), the rest on-demand; a noticed spot node drains, so its users
    count as demand at once, and where a new node could not be ready within the notice a
    pool serving users on spot keeps a node's worth of room for them (`spot_hedge`). An
    idle node stops only after `idle_grace_s` empty and near the end of its paid billing
    increment, when its pool and region keep their buffers without it; the most
    expensive first.
    """
    def may_stop(node: NodeSnap) -> bool:
        return (_idle_for(node, now) >= cfg.idle_grace_s
                and cfg.paid_left_s(node, now) <= cfg.stop_window_s)

    plan = _plan(snapshot, now, cfg, buffer=warm_buffer_slots, may_stop=may_stop, pooled=True,
                 margin=cfg.stop_margin_slots, queue_lead=True, z_at=cfg.buffer_z_at,
                 spot_share=cfg.spot_share)
    return replace(plan, drain=consolidation(snapshot, cfg, now)) if cfg.consolidate else plan


def consolidation(snapshot: Snapshot, cfg: ScalingConfig, now: float) -> tuple[str, ...]:
    """Ready nodes to empty by moving their users onto the free slots of the other ready
    nodes of their pool (planned moves, make-before-break): the most expensive and least
    loaded first, while the rest of the pool has room for them beside its waiting users and
    the users already moving (on draining nodes of its live version). A free node (an own
    machine) is never emptied: it is what the others' users should move to. Nor is a node
    with much of a long billing increment paid and left (an hour-billed one early in its
    hour): once empty it could not stop before its grace and the increment's end anyway."""
    demand = {d.key: d for d in snapshot.demand}
    busy: dict[PoolKey, list[NodeSnap]] = {}
    moving: dict[PoolKey, int] = {}
    for n in snapshot.nodes:
        if n.state is NodeState.READY and n.sessions > 0:
            busy.setdefault(n.key, []).append(n)
        elif n.state is NodeState.DRAINING:
            moving[n.key] = moving.get(n.key, 0) + n.sessions
    out: list[str] = []
    for key, nodes in busy.items():
        d = demand.get(key)
        if d is None or len(nodes) < 2:
            continue   # not a live pool (its version drains) or nothing to merge into
        # The room left must still hold the pool's warm buffer until the emptied node may
        # stop: otherwise arrivals fill the moved users' slots, a node boots or the emptied
        # one takes users again, and the moves bought nothing (bench/features.py: without
        # this, 4 in 5 emptied nodes never stopped).
        keep = cfg.stop_margin_slots + spot_hedge(cfg, key.region, nodes) + warm_buffer_slots(
            sum(n.sessions for n in nodes), d.rate_per_s(cfg.fast_tau_s), d.mean_session_s,
            cfg.reaction_s + cfg.idle_grace_s + cfg.stop_window_s, cfg.buffer_z_at(key.region))
        room = (sum(n.capacity - n.sessions for n in nodes) - d.waiting - moving.get(key, 0)
                - keep)
        left = len(nodes)
        for src in sorted(nodes, key=lambda n: (-cfg.node_price(n), n.sessions, n.id)):
            own_free = src.capacity - src.sessions   # its free slots leave with it
            if left < 2 or cfg.node_price(src) <= 0 or room - own_free < src.sessions:
                continue
            if cfg.paid_left_s(src, now) > cfg.idle_grace_s + cfg.stop_window_s + MOVE_SLACK_S:
                continue   # it could not stop once empty: its users would move for nothing
            room -= own_free + src.sessions
            left -= 1
            out.append(src.id)
    return tuple(out)


def decide_fixed_buffer(snapshot: Snapshot, now: float, cfg: ScalingConfig) -> Decisions:
    """Baseline, Agones' buffer policy: `fixed_buffer_nodes` nodes' worth of free slots per
    live pool; surplus idle nodes stop at once (no grace, blind to billing), no reuse."""
    slots = cfg.fixed_buffer_nodes * cfg.capacity
    return _plan(snapshot, now, cfg, buffer=lambda *_: slots, may_stop=lambda node: True,
                 pooled=False)


def decide_reactive(snapshot: Snapshot, now: float, cfg: ScalingConfig) -> Decisions:
    """Baseline without a buffer: boot exactly for waiting users, stop idle nodes after grace."""
    return _plan(snapshot, now, cfg, buffer=lambda *_: 0,
                 may_stop=lambda node: _idle_for(node, now) >= cfg.idle_grace_s,
                 pooled=False)


def static_fleet(nodes_by_pool: Mapping[PoolKey, int]) -> Policy:
    """Baseline: a fixed fleet (e.g. sized for the peak) that boots once and never stops."""
    def decide_static(snapshot: Snapshot, now: float, cfg: ScalingConfig) -> Decisions:
        have: dict[PoolKey, int] = {}
        for node in snapshot.nodes:
            if node.state is NodeState.READY or node.state.coming:
                have[node.key] = have.get(node.key, 0) + 1
        boot = [key for key in sorted(nodes_by_pool)
                for _ in range(nodes_by_pool[key] - have.get(key, 0))]
        return Decisions(boot=tuple(boot))
    return decide_static
