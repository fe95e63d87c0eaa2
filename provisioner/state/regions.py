"""Region health: regions placement avoids for a while."""

from __future__ import annotations

from provisioner.state.base import StateBase
from provisioner.state.keys import REGION_DOWN


class RegionHealth(StateBase):
    """State's verbs on region health (a mixin)."""

    def mark_region_down(self, region: str, until: float) -> None:
        self.r.hset(REGION_DOWN, region, repr(until))

    def mark_region_up(self, region: str) -> None:
        self.r.hdel(REGION_DOWN, region)

    def regions_down_until(self, now: float) -> dict[str, float]:
        """Regions avoided now -> until when."""
        return {r: float(until) for r, until in self.r.hgetall(REGION_DOWN).items()
                if float(until) > now}

    def regions_down(self, now: float) -> frozenset[str]:
        return frozenset(self.regions_down_until(now))
