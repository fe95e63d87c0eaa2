"""Fleet adapters: read the live state, call the pure policy, apply its decisions.

Celery tasks (provisioner/tasks.py) are one-line wrappers around these functions, so each
step here is idempotent and safe to run twice. Clocks are arguments.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from libcloud.compute.types import NodeState as LibcloudState

from common.config import ORPHAN_SERVING_S, Config, Region
from provisioner import catalog, clouds, membership, orders, outages, spot
from provisioner.errors import CapacityError
from provisioner.inputs import Arrivals, policy_inputs
from provisioner.placement import boot_regions, candidates_for
from provisioner.policy import (
    Decisions,
    NodeSnap,
    PoolKey,
    ScalingConfig,
    Snapshot,
    decide,
)
from provisioner.state import NodeRecord, State, pool_id
from provisioner.states import NodeState
from provisioner.versions import Version, VersionState

log = logging.getLogger("provisioner")

PROVISION_SLACK_S = 30.0   # beyond boot + load, before a node that never became ready dies
CONSOLIDATE_S = 10.0       # a consolidated node's users move within this (told at once)
POLL_S = 0.5               # poll countdown: far below the broker visibility timeout


@dataclass(frozen=True)
class NodeEnd:
    """A node left the fleet: what the bill needs."""

    record: NodeRecord
    ended_at: float
    reason: str


NodeEndHook = Callable[[NodeEnd], None]


def boot_order(state: State, cfg: Config, home: str, now: float) -> list[Region]:
    """Where a node for `home`'s queue boots, best first (see placement.boot_regions)."""
    return boot_regions(cfg, home, frozenset(state.constrained(now)), state.regions_down(now))


def snapshot(state: State, cfg: Config, now: float) -> tuple[Snapshot, list[NodeRecord]]:
    """The policy's view (built by inputs.policy_inputs, as the simulator builds it): live
    nodes in the pool of the queue each serves (its home), idle time tracked here, and
    demand per live pool. Retired nodes, and nodes a client reported lost (their users
    wait in the queue again), are nobody's capacity: a resuming user is demand at once."""
    records = [n for n in state.nodes() if n.alive(now, cfg.heartbeat_timeout_s)]
    nodes = [NodeSnap(id=n.id, model=n.model, version=n.version, region=n.home,
                      provider=n.provider, state=n.state, sessions=n.sessions,
                      capacity=n.capacity, requested_at=n.requested_at or n.started_at,
                      ready_at=n.ready_at, idle_since=state.touch_idle(n, now),
                      eta_ready=n.eta_ready, spot=n.spot)
             for n in records]
    pools = [pool_id(v.model, v.version, r.name) for v in catalog.serving(state)
             for r in cfg.regions]
    keys = {p: PoolKey(*p.split("|")) for p in pools}
    # anonymous users' waits count only where their demand scales (admit.lua, waiting.lua)
    waiting = {keys[p]: n for p, (_, n) in state.waiting().items() if p in keys}
    arrivals = {keys[p]: Arrivals(*a) for p, a in state.arrivals(pools).items()}
    # a node its provider takes back is nobody's capacity (draining, its users are demand)
    gone = {n.id for n in records if n.retired or n.reported_lost or (
        n.interrupt_at is not None and n.state is not NodeState.DRAINING)}
    snap = policy_inputs(nodes, keys.values(), waiting, arrivals, now, cfg.arrival_tau_s,
                         retired=gone)
    return snap, records


def scaling_config(cfg: Config, serving: list[Version] | None = None) -> ScalingConfig:
    """The policy's knobs; a node of each serving version holds its streams_per_gpu."""
    base = ScalingConfig.from_config(cfg)
    return replace(base, capacity_by_model={**base.capacity_by_model, **{
        v.model: v.streams_per_gpu for v in serving or ()}})


def scale(state: State, cfg: Config, now: float, provision: Callable[[str], None],
          on_end: NodeEndHook) -> Decisions:
    """One autoscaler step: snapshot -> policy -> boot (on-demand, and spot where the
    policy says), retarget, stop."""
    snap, records = snapshot(state, cfg, now)
    decisions = decide(snap, now, scaling_config(cfg, catalog.serving(state)))
    by_id = {n.id: n for n in records}
    nowhere: set[PoolKey] = set()   # pools no region may boot for now: asked once a step

    def boot(key: PoolKey, on_spot: bool = False) -> bool:
        node_id = None if key in nowhere else request_node(state, cfg, key, now, on_spot)
        if node_id is None:
            nowhere.add(key)
            return False
        provision(node_id)
        return True

    coming = False
    for key in decisions.boot:
        coming = boot(key) or coming
    for key in decisions.spot:
        coming = boot(key, on_spot=True) or coming
    for node_id, key in decisions.retarget:
        coming = retarget(state, cfg, by_id[node_id], key, now) or boot(key) or coming
    for node_id in decisions.drain:
        consolidate(state, cfg, by_id[node_id], now)
    if coming:   # waiting users see the coming node and its ETA now (not at the backstop)
        state.wake_lobbies()
    for node_id in decisions.stop:
        if not cfg.provider(by_id[node_id].provider).bootable:
            continue   # own machines are never destroyed by us: they only leave
        if state.retire(node_id, now):
            stop(state, cfg, by_id[node_id], now, "idle", on_end)
    if decisions:
        log.info("scale: boot %s, spot %s, retarget %s, stop %s",
                 [str(k) for k in decisions.boot], [str(k) for k in decisions.spot],
                 decisions.retarget, list(decisions.stop))
    return decisions


def consolidate(state: State, cfg: Config, rec: NodeRecord, now: float) -> None:
    """Empty a node into its pool (the policy's consolidation): drained with a short
    deadline, it tells its streams to move at once, their pages move make-before-break onto
    the other nodes of the pool, and once it is empty (reap) it serves again, idle, for the
    policy to stop, keep or reload."""
    log.info("node %s (%s v%s in %s): moving its %d users into its pool", rec.id, rec.model,
             rec.version, rec.region, rec.sessions)
    state.drain(rec.id, now + CONSOLIDATE_S, consolidate=True)
    orders.wake(cfg, rec)   # it hears of the drain now, not at its next beat


def request_node(state: State, cfg: Config, key: PoolKey, now: float,
                 on_spot: bool = False) -> str | None:
    """Record a node as requested (the bill starts now) in the cheapest region that may
    serve `key`'s queue; the provision task boots it, on spot if `on_spot` and that region's
    provider offers spot (else on-demand). None if every such region is avoided (refused
    for capacity) for now."""
    where = boot_order(state, cfg, key.region, now)
    if not where:
        log.warning("no region may boot %s for %s now (down or out of capacity)",
                    key.model, key.region)
        return None
    version = catalog.version(state, key.model, key.version)
    if version is None:
        return None
    node_id = f"n-{uuid.uuid4().hex[:10]}"
    state.add_node({"id": node_id, "home": key.region, "model": key.model,
                    "version": key.version, "digest": version.digest,
                    "state": NodeState.REQUESTED.value, "requested_at": now,
                    "capacity": version.streams_per_gpu,
                    **_placed(cfg, where[0], now, on_spot)})
    return node_id


RESEND_S = 3.0   # a node still `requested` this long after its provision was sent: again


def resend_lost(state: State, cfg: Config, now: float,
                provision: Callable[[str], None]) -> list[str]:
    """Nodes still `requested` RESEND_S after their provision task was sent: a worker that
    held it died (Redis redelivers an unacked task only after the visibility timeout,
    minutes). Send it again; `provision` is idempotent (the node id names the machine, or
    is EC2's client token), so two deliveries make one machine. Returns the node ids."""
    again = []
    for rec in state.nodes():
        if rec.state is NodeState.REQUESTED and not rec.retired and \
                now - max(rec.requested_at, rec.sent_at or 0.0) > RESEND_S:
            # its boot starts now: the deadline moves with it (not a boot timeout, then)
            state.set_node(rec.id, sent_at=now, deadline=max(
                rec.deadline, now + rec.deadline - max(rec.requested_at, rec.sent_at or 0.0)))
            provision(rec.id)
            again.append(rec.id)
    if again:
        log.warning("provisioning %s again: still requested %.0f s after it was sent",
                    again, RESEND_S)
    return again


def _placed(cfg: Config, region: Region, now: float, on_spot: bool) -> dict[str, object]:
    """A requested node's fields that follow from where it boots (spot where offered)."""
    provider = cfg.provider(region.provider)
    lead_s = provider.boot_s + cfg.model_load_s
    market = on_spot and provider.spot
    return {"region": region.name, "provider": provider.name, "spot": "1" if market else "",
            "price_per_hour": provider.spot_price if market else provider.price_per_hour,
            "eta_ready": now + lead_s, "deadline": now + lead_s + PROVISION_SLACK_S}


def provision(state: State, cfg: Config, node_id: str, now: float) -> bool:
    """Create the machine for a requested node; a spot one refused for capacity boots
    on-demand there at once (at the on-demand price); an on-demand one refused for
    capacity or quota marks that region constrained and fails over at once to the next
    cheapest region within the latency budget. Idempotent: the same node id, the same
    machine. False if no region would take it (the node is dropped; waiting users are
    told by the lobby)."""
    rec = state.node(node_id)
    if rec is None or rec.retired:
        return False
    token = membership.join_token_for(state, cfg, node_id)
    while True:
        region = cfg.region(rec.region)
        assert region is not None, "request_node placed it in a configured region"
        try:
            clouds.create(cfg, region, node_id,
                          membership.user_data(cfg, cfg.provider(region.provider), token,
                                               f"{node_id} {rec.model} "
                                               f"v{rec.version} in {rec.region}"),
                          clouds.tags_for(cfg, node_id, pool_id(rec.model, rec.version,
                                                                rec.home)), spot=rec.spot)
            break
        except CapacityError as e:
            if rec.spot:   # spot is out here, on-demand may not be: the same step, same place
                log.warning("%s; booting node %s on-demand instead", e, node_id)
                state.set_node(node_id, **_placed(cfg, region, now, on_spot=False))
            else:
                log.warning("%s; failing over", e)
                state.mark_constrained(region.name, now + cfg.constrained_cooloff_s, str(e))
                where = boot_order(state, cfg, rec.home, now)
                if not where:
                    state.forget_node(node_id)
                    return False
                state.set_node(node_id, **_placed(cfg, where[0], now, on_spot=False))
                state.wake_lobbies()   # waiting users learn of the refusal and the new ETA
            rec = state.node(node_id)
            if rec is None:
                return False
    if rec.state is NodeState.REQUESTED:
        state.set_node(node_id, state=NodeState.BOOTING.value)
    return True


def poll(state: State, cfg: Config, node_id: str, now: float, on_end: NodeEndHook) -> str:
    """'ready', 'waiting' (poll again) or 'gone' (failed and cleaned up, or stopped)."""
    rec = state.node(node_id)
    if rec is None:
        return "gone"
    if rec.state.serving:
        records = state.nodes()
        state.assign(pool_id(rec.model, rec.version, rec.home),
                     candidates_for(cfg, rec.model, rec.version, rec.home, records, now), now,
                     cfg.ticket_ttl_s, cfg.heartbeat_timeout_s)
        state.wake_lobbies()
        return "ready"
    if now > rec.deadline:
        log.warning("node %s not ready by its deadline: destroying it", node_id)
        stop(state, cfg, rec, now, "boot timeout", on_end)
        state.mark_region_down(rec.region, now + outages.REGION_COOLOFF_S)
        state.wake_lobbies()   # its waiting users move to the nearest healthy region
        return "gone"
    return "waiting"


def silence_is_death(state: State, cfg: Config, now: float) -> bool:
    """Whether a node's silence means it died: only while its heartbeats could arrive, that
    is some webapp has taken heartbeats without a gap for a whole heartbeat timeout (each
    stamps the beat path every beat). A webapp or Redis outage silences every node at once
    while their streams go on; reaping then would destroy the fleet. Past ORPHAN_SERVING_S
    without any webapp the nodes have exited on their own: their machines are reaped."""
    since, last = state.beat_path()
    if since is not None and now - since >= cfg.heartbeat_timeout_s:
        return True
    if last is not None and now - last > ORPHAN_SERVING_S:
        return True
    log.warning("no webapp has taken heartbeats for a whole %.0f s (last stamp %s): "
                "silent nodes are not reaped until one has", cfg.heartbeat_timeout_s,
                "never" if last is None else f"{now - last:.0f} s ago")
    return False


def retarget(state: State, cfg: Config, rec: NodeRecord, key: PoolKey, now: float) -> bool:
    """Reload an idle node with another model instead of booting a VM (same region)."""
    v = catalog.version(state, key.model, key.version)
    if v is None or not state.retire(rec.id, now):
        return False
    state.set_node(rec.id, retarget=f"{v.model}:{v.version}:{v.digest}:{v.streams_per_gpu}",
                   model=v.model, version=v.version, state=NodeState.LOADING.value,
                   progress=0.0, eta_ready=now + cfg.model_load_s, digest=v.digest,
                   capacity=v.streams_per_gpu, seen_started=0, seen_failed=0)
    orders.wake(cfg, rec)
    return True


def stop(state: State, cfg: Config, rec: NodeRecord, now: float, reason: str,
         on_end: NodeEndHook) -> None:
    """Destroy the machine, forget the node, close its bill; revoke its credential first."""
    state.revoke(rec.id)
    region = cfg.region(rec.region)
    if region is not None and cfg.provider(rec.provider).bootable:
        for vm in clouds.list_ours(cfg, region):
            if clouds.node_id_of(vm) == rec.id:
                clouds.destroy(cfg, region, vm)
    on_end(NodeEnd(rec, now, reason))   # first: if the bill fails, the next tick retries
    state.forget_node(rec.id)
    state.count("voice_nodes_ended", reason=reason.split(":")[0].replace(" ", "_"))
    log.info("node %s (%s v%s in %s) stopped: %s", rec.id, rec.model, rec.version,
             rec.region, reason)


def reap(state: State, cfg: Config, now: float, on_end: NodeEndHook) -> list[str]:
    """Nodes without heartbeats (while heartbeats can arrive: `silence_is_death`) are dead:
    free their slots, destroy the VM, close the bill.

    Old-version nodes that emptied, or passed their drain deadline, stop too; VMs that no
    node record names (a crash between create and record) are destroyed.
    """
    dead = []
    if sum(state.drop_expired(rec.id, now) for rec in state.nodes()):
        state.wake_lobbies()   # tickets never used: their slots are room again
    records = state.nodes()
    silent = [rec for rec in records if not rec.alive(now, cfg.heartbeat_timeout_s)]
    for rec in silent if silent and silence_is_death(state, cfg, now) else []:
        dead.append(rec.id)
        try:   # one node's provider failing must not keep the others alive and billed
            stop(state, cfg, rec, now, "dead: no heartbeat", on_end)
        except clouds.PROVIDER_ERRORS as e:
            log.warning("dead node %s not stopped yet (%s); the next tick retries", rec.id, e)
    down = outages.mark_down(state, cfg, records, dead, now)
    for rec in records:
        if rec.id in dead:
            continue
        if rec.state is NodeState.READY and outages.answering(cfg, rec, now) and (
                (rec.ready_at or 0.0) > down.get(rec.region, 0.0) - outages.REGION_COOLOFF_S):
            # a node that turned ready since the outage serves there: recovered (one of
            # those lost in it may beat a last time while it goes)
            state.mark_region_up(rec.region)
        elif rec.drain_deadline is not None and (rec.sessions == 0 or now > rec.drain_deadline + (
                0.0 if rec.drain_reason == spot.SPOT else cfg.heartbeat_timeout_s)):
            if rec.consolidating and not rec.drain_reason:   # it serves again, idle
                state.undrain(rec.id)
                continue
            if rec.sessions == 0 and not state.retire(rec.id, now):
                continue
            try:   # a spot node goes at its deadline anyway: no grace for late beats
                stop(state, cfg, rec, now, "spot interruption" if rec.drain_reason == spot.SPOT
                     else "drained", on_end)
            except clouds.PROVIDER_ERRORS as e:
                log.warning("drained node %s not stopped yet (%s); the next tick retries",
                            rec.id, e)
    outages.recall(state, cfg, records, now)
    try:
        sweep(state, cfg)
    except clouds.PROVIDER_ERRORS as e:
        log.warning("orphan sweep failed (%s); the next tick retries", e)
    return dead


def sweep(state: State, cfg: Config) -> list[str]:
    """Destroy machines with our tags that no node record names (a crash between create
    and record, or the records lost with Redis): never leaked, and never anyone else's
    (untagged machines are not ours to touch). Returns what it destroyed."""
    known = set(state.node_ids())
    gone = []
    for region in clouds.machine_regions(cfg):
        for vm in clouds.list_ours(cfg, region):
            if clouds.node_id_of(vm) not in known or vm.state == LibcloudState.TERMINATED:
                clouds.destroy(cfg, region, vm)
                gone.append(vm.name)
    return gone


def drain_old_versions(state: State, cfg: Config, now: float) -> None:
    """Every node of a version new sessions no longer go to drains until that version's
    deadline (a failed version's is now: its users move at once); a node whose version
    serves again (a rollback, a redeploy) stops draining."""
    entries = state.model_entries()
    for rec in state.nodes():
        entry = entries.get(rec.model)
        if entry is None:
            continue
        if entry.state(rec.version, now) in (VersionState.LIVE, VersionState.CANARY):
            if rec.drain_deadline is not None and not (rec.consolidating or rec.suspect
                                                       or rec.drain_reason):
                state.undrain(rec.id)   # (a suspect or interrupted node stays drained)
            continue
        v = entry.versions.get(rec.version)
        deadline = v.deadline if v is not None and v.deadline is not None else (
            now + cfg.drain_limit_s)
        if rec.drain_deadline is None or rec.drain_deadline > deadline + 1.0:
            state.drain(rec.id, deadline)
