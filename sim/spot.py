"""Spot offers as the simulator models them: interruptions with a notice, and refusals.

A spot node is taken back after an exponential time (a provider's `interruptions_per_hour`),
announced SPOT_NOTICE_S before the machine goes, as EC2's `spot/instance-action` is. A spot
request is refused (no spot capacity) with the provider's `refusal` probability; the fleet
then boots the node on-demand in the same step. Draws come from one seeded generator.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from provisioner.scaling import SPOT_NOTICE_S

__all__ = ["SPOT_NOTICE_S", "SpotMarket", "SpotOffer"]


@dataclass(frozen=True, slots=True)
class SpotOffer:
    """One provider's spot offer."""

    price_per_hour: Decimal
    interruptions_per_hour: float = 0.0   # per node-hour on spot
    refusal: float = 0.0                  # share of spot requests refused


class SpotMarket:
    """The spot offers of a run's providers, and the seeded draws of their events."""

    def __init__(self, offers: Mapping[str, SpotOffer], seed: int) -> None:
        self.offers, self.rng = offers, random.Random(seed)

    def refused(self, provider: str) -> bool:
        """Whether this spot request for `provider` is refused (boot on-demand instead)."""
        offer = self.offers.get(provider)
        return offer is None or (offer.refusal > 0 and self.rng.random() < offer.refusal)

    def notice_in_s(self, provider: str) -> float | None:
        """Seconds from a spot node's request to its interruption notice (None: never)."""
        offer = self.offers.get(provider)
        if offer is None or offer.interruptions_per_hour <= 0:
            return None
        return self.rng.expovariate(offer.interruptions_per_hour / 3600.0)
