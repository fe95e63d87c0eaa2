"""The simulator's nouns: where a user may go (`Route`) and one simulated node (`SimNode`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from common.config import Config
from provisioner.placement import NodeView, home_region, near_regions
from provisioner.policy import NodeSnap, PoolKey
from provisioner.states import NodeState
from sim.trace import Session

__all__ = ["Route", "SimNode", "routes"]


@dataclass(frozen=True, slots=True)
class Route:
    """Where a user may go: their home region and the regions within its budget (RTT)."""

    home: str
    rtt: dict[str, float]


def routes(sessions: Sequence[Session], config: Config) -> list[Route]:
    """Each session's route, in order (users at one place share one `Route`)."""
    by_home: dict[str, Route] = {}
    cache: dict[tuple[float, float], Route] = {}
    out = []
    for s in sessions:
        route = cache.get((s.lat, s.lon))
        if route is None:
            home = home_region(config, s.lat, s.lon).name
            route = by_home.get(home)
            if route is None:
                route = by_home[home] = Route(home, near_regions(config, home))
            cache[(s.lat, s.lon)] = route
        out.append(route)
    return out


@dataclass(slots=True)
class SimNode:
    """One node of a run; `touch()` after any change, so the policy's snapshot and the
    placement view are rebuilt."""

    sim: Any              # the engine.Sim it belongs to (touch() drops its snapshot)
    id: str
    key: PoolKey          # the pool of its home queue (the policy's pool)
    region: str           # where it runs
    provider: str
    capacity: int
    state: NodeState
    requested_at: float
    eta: float | None
    spot: bool = False
    sessions: set[int] = field(default_factory=set)
    ready_at: float | None = None
    idle_since: float | None = None
    cached_snap: NodeSnap | None = None
    cached_view: NodeView | None = None

    def touch(self) -> None:
        self.cached_snap = self.cached_view = None
        self.sim.snaps = None

    def snap(self) -> NodeSnap:
        if self.cached_snap is None:
            k = self.key
            self.cached_snap = NodeSnap(self.id, k.model, k.version, k.region, self.provider,
                                        self.state, len(self.sessions), self.capacity,
                                        self.requested_at, self.ready_at, self.idle_since,
                                        self.eta, self.spot)
        return self.cached_snap

    def view(self) -> NodeView:
        if self.cached_view is None:
            k = self.key
            self.cached_view = NodeView(self.id, self.region, k.model, k.version, self.state,
                                        len(self.sessions), self.capacity)
        return self.cached_view
