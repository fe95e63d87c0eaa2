"""Placement policy: which region and which nodes a session may go to.

Pure code: no I/O and no clock. The lobby reads a snapshot of the nodes, asks this module
for an order of candidates, and lets one atomic Redis script claim the first with room.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from common.config import Config, Region
from provisioner.states import NodeState

EARTH_RADIUS_KM = 6371.0
# Light in fibre covers ~200 km per ms; real routes are ~2x the great circle, and a round
# trip goes both ways: 0.02 ms per km, plus a few ms of last-mile and queuing.
RTT_MS_PER_KM = 0.02
RTT_BASE_MS = 5.0


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def estimate_rtt_ms(lat: float, lon: float, region: Region) -> float:
    return RTT_BASE_MS + RTT_MS_PER_KM * distance_km(lat, lon, region.lat, region.lon)


def rank_regions(regions: Iterable[Region], lat: float, lon: float,
                 avoid: frozenset[str] = frozenset(),
                 measured: Mapping[str, float] | None = None) -> list[tuple[Region, float]]:
    """Regions nearest first, with their RTT: `measured` (the page timed the region's
    beacon) where present, else estimated from (lat, lon); avoided regions (outage) last."""
    ranked = [(r, (measured or {}).get(r.name, estimate_rtt_ms(lat, lon, r))) for r in regions]
    return sorted(ranked, key=lambda pair: (pair[0].name in avoid, pair[1], pair[0].name))


def regions_in_budget(ranked: Sequence[tuple[Region, float]], budget_ms: float
                      ) -> list[tuple[Region, float]]:
    """The regions within the latency budget; at least the nearest one."""
    inside = [pair for pair in ranked if pair[1] <= budget_ms]
    return inside or list(ranked[:1])


@dataclass(frozen=True)
class NodeView:
    """What placement needs to know about one node."""

    id: str
    region: str
    model: str
    version: str
    state: NodeState
    sessions: int
    capacity: int
    price_per_hour: float = 0.0


def claim_order(nodes: Iterable[NodeView], model: str, version: str,
                rtt_by_region: dict[str, float]) -> list[str]:
    """Ids of the ready nodes of `model`/`version` with room, in the order to try.

    Cheapest first (an own machine costs nothing, so it fills before any rented GPU); then
    most-loaded, so that sessions pack onto few nodes and whole nodes empty out (and can
    stop); among equally loaded nodes, the nearest region first.
    """
    fit = [n for n in nodes
           if n.state is NodeState.READY and n.model == model and n.version == version
           and n.region in rtt_by_region and n.sessions < n.capacity]
    fit.sort(key=lambda n: (n.price_per_hour, -n.sessions, rtt_by_region[n.region], n.id))
    return [n.id for n in fit]


SEEN_FULL_TRIED = 4


def near_regions(cfg: Config, home: str) -> dict[str, float]:
    """Regions within the latency budget of `home`'s place -> estimated RTT (ms)."""
    region = cfg.region(home)
    if region is None:
        raise ValueError(f"unknown region {home!r}; known: {[r.name for r in cfg.regions]}")
    return {r.name: rtt for r, rtt in regions_in_budget(
        rank_regions(cfg.regions, region.lat, region.lon), cfg.latency_budget_ms)}


def candidates(cfg: Config, model: str, version: str, home: str,
               usable: Sequence[NodeView]) -> list[str]:
    """Nodes that may serve the queue of (model, version, home), in claim order.

    `usable` are the nodes alive and not retired, possibly from a view up to 100 ms old, so
    the nearest SEEN_FULL_TRIED nodes it shows full come last rather than not at all: a slot
    freed since then is still found, since the admit and assign scripts re-check every
    candidate's room (a few, not all: each candidate costs the script call two keys)."""
    near = near_regions(cfg, home)
    full = [NodeView(v.id, v.region, v.model, v.version, v.state, v.capacity - 1, v.capacity,
                     v.price_per_hour) for v in usable if v.sessions >= v.capacity]
    return (claim_order(usable, model, version, near)
            + claim_order(full, model, version, near)[:SEEN_FULL_TRIED])


class Record(Protocol):
    """What candidates_for reads of a node record (provisioner.state.NodeRecord)."""

    @property
    def id(self) -> str: ...
    @property
    def region(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def state(self) -> NodeState: ...
    @property
    def sessions(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def price_per_hour(self) -> str: ...   # as stored

    def placeable(self, now: float, timeout_s: float) -> bool: ...


def candidates_for(cfg: Config, model: str, version: str, home: str,
                   records: Sequence[Record], now: float) -> list[str]:
    """Nodes that may serve the queue of (model, home): alive, not retired nor reported
    lost, in placement's order (see placement.candidates)."""
    usable = [NodeView(n.id, n.region, n.model, n.version, n.state, n.sessions, n.capacity,
                       float(n.price_per_hour))
              for n in records if n.model == model and n.placeable(now, cfg.heartbeat_timeout_s)]
    return candidates(cfg, model, version, home, usable)


def home_region(cfg: Config, lat: float, lon: float, only: str | None = None,
                avoid: frozenset[str] = frozenset(),
                measured: Mapping[str, float] | None = None) -> Region:
    """The region whose queue a user at (lat, lon) waits in: the nearest one we can boot
    nodes in (own machines are used when free, but nobody can boot one for a queue), or
    `only` when the user named a region. Nearest by `measured` RTT where the page timed a
    region's beacon (see rank_regions)."""
    pool = [r for r in cfg.regions if only in (None, r.name)]
    ranked = rank_regions(pool, lat, lon, avoid, measured)
    bootable = [r for r, _ in ranked if cfg.provider(r.provider).bootable]
    return bootable[0] if bootable and only is None else ranked[0][0]


def boot_regions(cfg: Config, home: str, refused: frozenset[str] = frozenset(),
                 down: frozenset[str] = frozenset()) -> list[Region]:
    """Where to boot a node for `home`'s queue, best first: regions within the latency
    budget whose provider we can boot, cheapest first (price, then billing increment, then
    boot time, then RTT). Regions whose provider refused for capacity, and regions down (an
    outage: their nodes all died or failed to boot), are left out until they recover: none
    may be left, and the queue's users are re-placed elsewhere or wait (the lobby)."""
    near = near_regions(cfg, home)
    fit = [r for r in cfg.regions if r.name in near and r.name not in refused
           and r.name not in down and cfg.provider(r.provider).bootable]

    def cost(r: Region) -> tuple[object, ...]:
        p = cfg.provider(r.provider)
        return (p.price_per_hour, p.billing_increment_s, p.boot_s, near[r.name], r.name)
    return sorted(fit, key=cost)
