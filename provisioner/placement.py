"""Placement policy: which region and which nodes a session may go to.

Pure code: no I/O and no clock. The lobby reads a snapshot of the nodes, asks this module
for an order of candidates, and lets one atomic Redis script claim the first with room.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from common.config import Region
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
                 avoid: frozenset[str] = frozenset()) -> list[tuple[Region, float]]:
    """Regions nearest first, with their estimated RTT; avoided regions (outage) go last."""
    ranked = [(r, estimate_rtt_ms(lat, lon, r)) for r in regions]
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


def claim_order(nodes: Iterable[NodeView], model: str, version: str,
                rtt_by_region: dict[str, float]) -> list[str]:
    """Ids of the ready nodes of `model`/`version` with room, in the order to try.

    Most-loaded first, so that sessions pack onto few nodes and whole nodes empty out
    (and can stop); among equally loaded nodes, the nearest region first.
    """
    fit = [n for n in nodes
           if n.state is NodeState.READY and n.model == model and n.version == version
           and n.region in rtt_by_region and n.sessions < n.capacity]
    fit.sort(key=lambda n: (-n.sessions, rtt_by_region[n.region], n.id))
    return [n.id for n in fit]
