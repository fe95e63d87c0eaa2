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

from common.config import Config, Model
from provisioner import clouds
from provisioner.placement import claim_order, rank_regions, regions_in_budget
from provisioner.policy import (
    Decisions,
    NodeSnap,
    PoolDemand,
    PoolKey,
    ScalingConfig,
    Snapshot,
    decide,
)
from provisioner.state import NodeRecord, State, pool_id
from provisioner.states import NodeState

log = logging.getLogger("provisioner")

PROVISION_SLACK_S = 30.0   # beyond boot + load, before a node that never became ready dies
REGION_COOLOFF_S = 60.0    # a region whose nodes all failed is avoided this long
POLL_S = 0.5               # poll countdown: far below the broker visibility timeout


@dataclass(frozen=True)
class NodeEnd:
    """A node left the fleet: what the bill needs."""

    record: NodeRecord
    ended_at: float
    reason: str


NodeEndHook = Callable[[NodeEnd], None]


def bill_row(rec: NodeRecord) -> dict[str, object]:
    """What the GPU bill records of a node."""
    return {"id": rec.id, "provider": rec.provider, "region": rec.region, "model": rec.model,
            "started_s": rec.requested_at or rec.started_at, "price_per_hour": rec.price_per_hour}


def live_models(state: State, cfg: Config) -> list[Model]:
    models = state.models()
    if not models:
        return list(cfg.models)
    return [Model(m.name, m.version, m.semitones) for m in models]


def live_model(state: State, cfg: Config, name: str) -> Model | None:
    m = state.model(name)
    if m is not None:
        return Model(m.name, m.version, m.semitones)
    return cfg.model(name)


SEEN_FULL_TRIED = 4


def candidates_for(cfg: Config, model: Model, region: str, records: list[NodeRecord],
                   now: float) -> list[str]:
    """Nodes that may serve the queue of (model, region), in the placement policy's order
    (the same `claim_order` the simulator runs): alive, not retired, within the budget.

    `records` may be the lobby's cached view, up to 100 ms old, so the nearest
    SEEN_FULL_TRIED nodes it shows full come last rather than not at all: a slot freed since
    then is still found, since the admit and assign scripts re-check every candidate's room
    (a few, not all: each candidate costs the script call two keys)."""
    home = cfg.region(region)
    assert home is not None
    near = dict((r.name, rtt) for r, rtt in regions_in_budget(
        rank_regions(cfg.regions, home.lat, home.lon), cfg.latency_budget_ms))
    usable = [n.view() for n in records
              if not n.retired and n.alive(now, cfg.heartbeat_timeout_s)]
    seen_full = [replace(v, sessions=v.capacity - 1) for v in usable if v.sessions >= v.capacity]
    return (claim_order(usable, model.name, model.version, near)
            + claim_order(seen_full, model.name, model.version, near)[:SEEN_FULL_TRIED])


def snapshot(state: State, cfg: Config, now: float) -> tuple[Snapshot, list[NodeRecord]]:
    """The policy's view: live nodes (idle time tracked here) and demand per live pool."""
    records = [n for n in state.nodes() if n.alive(now, cfg.heartbeat_timeout_s)]
    nodes = []
    for n in records:
        idle_since = state.touch_idle(n, now)
        nodes.append(NodeSnap(
            id=n.id, model=n.model, version=n.version, region=n.region, provider=n.provider,
            state=NodeState.STOPPED if n.retired else n.state, sessions=n.sessions,
            capacity=n.capacity, requested_at=n.requested_at or n.started_at,
            ready_at=n.ready_at, idle_since=idle_since, eta_ready=n.eta_ready))
    pools = [pool_id(m.name, m.version, r.name) for m in live_models(state, cfg)
             for r in cfg.regions]
    waiting = state.queue_lengths()
    rates = state.arrival_rates(pools, now, cfg.arrival_tau_s)
    demand = tuple(PoolDemand(PoolKey(*p.split("|")), waiting=waiting.get(p, 0),
                              arrival_rate_per_s=rates[p]) for p in pools)
    return Snapshot(tuple(nodes), demand), records


def scaling_config(cfg: Config) -> ScalingConfig:
    return ScalingConfig.from_config(cfg)


def scale(state: State, cfg: Config, now: float, provision: Callable[[str], None],
          on_end: NodeEndHook) -> Decisions:
    """One autoscaler step: snapshot -> policy -> boot, retarget, stop."""
    snap, records = snapshot(state, cfg, now)
    decisions = decide(snap, now, scaling_config(cfg))
    by_id = {n.id: n for n in records}
    for key in decisions.boot:
        provision(request_node(state, cfg, key, now))
    for node_id, key in decisions.retarget:
        if not retarget(state, cfg, by_id[node_id], key, now):
            provision(request_node(state, cfg, key, now))
    for node_id in decisions.stop:
        if state.retire(node_id, now):
            stop(state, cfg, by_id[node_id], now, "idle", on_end)
    if decisions:
        log.info("scale: boot %s, retarget %s, stop %s", [str(k) for k in decisions.boot],
                 decisions.retarget, list(decisions.stop))
    return decisions


def request_node(state: State, cfg: Config, key: PoolKey, now: float) -> str:
    """Record a node as requested (the bill starts now); the provision task boots it."""
    region = cfg.region(key.region)
    assert region is not None
    provider = cfg.provider(region.provider)
    model = live_model(state, cfg, key.model)
    semitones = model.semitones if model and model.version == key.version else 0.0
    node_id = f"n-{uuid.uuid4().hex[:10]}"
    lead_s = provider.boot_s + cfg.model_load_s
    state.add_node({"id": node_id, "provider": provider.name, "region": key.region,
                    "model": key.model, "version": key.version, "semitones": semitones,
                    "state": NodeState.REQUESTED.value, "requested_at": now,
                    "deadline": now + lead_s + PROVISION_SLACK_S, "eta_ready": now + lead_s,
                    "capacity": cfg.node_capacity, "price_per_hour": provider.price_per_hour})
    return node_id


def provision(state: State, cfg: Config, node_id: str, now: float) -> bool:
    """Create the VM for a requested node. Idempotent: the same node id, the same VM."""
    rec = state.node(node_id)
    if rec is None or rec.retired:
        return False
    driver = clouds.driver_for(cfg, rec.provider)
    if not any(vm.name == node_id for vm in driver.list_nodes()):
        model = Model(rec.model, rec.version, rec.semitones)
        driver.create_node(name=node_id, size=driver.list_sizes()[0],
                           image=clouds.image_for(driver, model),
                           location=clouds.location_for(driver, rec.region))
    if rec.state is NodeState.REQUESTED:
        state.set_node(node_id, state=NodeState.BOOTING.value)
    return True


def poll(state: State, cfg: Config, node_id: str, now: float, on_end: NodeEndHook) -> str:
    """'ready', 'waiting' (poll again) or 'gone' (failed and cleaned up, or stopped)."""
    rec = state.node(node_id)
    if rec is None:
        return "gone"
    if rec.state.serving:
        model = Model(rec.model, rec.version, rec.semitones)
        records = state.nodes()
        state.assign(pool_id(rec.model, rec.version, rec.region),
                     candidates_for(cfg, model, rec.region, records, now), now,
                     cfg.ticket_ttl_s, cfg.heartbeat_timeout_s)
        return "ready"
    if now > rec.deadline:
        log.warning("node %s not ready by its deadline: destroying it", node_id)
        stop(state, cfg, rec, now, "boot timeout", on_end)
        state.mark_region_down(rec.region, now + REGION_COOLOFF_S)
        return "gone"
    return "waiting"


def retarget(state: State, cfg: Config, rec: NodeRecord, key: PoolKey, now: float) -> bool:
    """Reload an idle node with another model instead of booting a VM (same region)."""
    model = live_model(state, cfg, key.model)
    if model is None or model.version != key.version or not state.retire(rec.id, now):
        return False
    state.set_node(rec.id, retarget=f"{model.name}:{model.version}:{model.semitones:g}",
                   model=model.name, version=model.version, state=NodeState.LOADING.value,
                   progress=0.0, eta_ready=now + cfg.model_load_s, semitones=model.semitones)
    state.wake(rec.id)
    return True


def stop(state: State, cfg: Config, rec: NodeRecord, now: float, reason: str,
         on_end: NodeEndHook) -> None:
    """Destroy the VM, forget the node, close its bill."""
    driver = clouds.driver_for(cfg, rec.provider)
    for vm in driver.list_nodes():
        if vm.name == rec.id:
            driver.destroy_node(vm)
    on_end(NodeEnd(rec, now, reason))   # first: if the bill fails, the next tick retries
    state.forget_node(rec.id)
    log.info("node %s (%s v%s in %s) stopped: %s", rec.id, rec.model, rec.version,
             rec.region, reason)


def reap(state: State, cfg: Config, now: float, on_end: NodeEndHook) -> list[str]:
    """Nodes without heartbeats are dead: free their slots, destroy the VM, close the bill.

    Old-version nodes that emptied, or passed their drain deadline, stop too; VMs that no
    node record names (a crash between create and record) are destroyed.
    """
    dead = []
    for rec in state.nodes():
        state.drop_expired(rec.id, now)
    records = state.nodes()
    for rec in records:
        if not rec.alive(now, cfg.heartbeat_timeout_s):
            stop(state, cfg, rec, now, "dead: no heartbeat", on_end)
            dead.append(rec.id)
    for region in {r.region for r in records if r.id in dead}:
        if not any(r.region == region and r.id not in dead and r.state.serving
                   for r in records):   # nothing left serving there: an outage
            log.warning("region %s lost all its nodes: avoided for %.0f s", region,
                        REGION_COOLOFF_S)
            state.mark_region_down(region, now + REGION_COOLOFF_S)
    for rec in records:
        if rec.id in dead:
            continue
        if rec.state is NodeState.READY:
            state.mark_region_up(rec.region)   # a node serves there again: recovered
        elif rec.drain_deadline is not None and (
                rec.sessions == 0 or now > rec.drain_deadline + cfg.heartbeat_timeout_s):
            if rec.sessions == 0 and not state.retire(rec.id, now):
                continue
            stop(state, cfg, rec, now, "drained", on_end)
    known = {r.id for r in records}
    for provider in {r.provider for r in cfg.regions}:
        driver = clouds.driver_for(cfg, cfg.provider(provider).name)
        for vm in driver.list_nodes():
            orphan = vm.name not in known and now - float(vm.extra.get("created_at", now)) > 5
            if orphan or vm.state == LibcloudState.TERMINATED:
                driver.destroy_node(vm)
    return dead


def drain_old_versions(state: State, cfg: Config, now: float) -> None:
    """Every node of a version that is no longer live gets its model's drain deadline; a
    node whose version is live again (a rollback) stops draining."""
    live = {m.name: m for m in state.models()}
    for rec in state.nodes():
        m = live.get(rec.model)
        if m is not None and rec.version == m.version and rec.drain_deadline is not None:
            state.undrain(rec.id)
            continue
        if m is None or rec.version == m.version or rec.drain_deadline is not None:
            continue
        deadline = next((float(d["deadline"]) for d in m.draining
                         if str(d["version"]) == rec.version), now + cfg.drain_limit_s)
        state.drain(rec.id, deadline)
