"""The autoscaling policy's vocabulary: what it is given (`Snapshot`: nodes, and demand per
pool), the knobs it runs with (`ScalingConfig`) and what it answers (`Decisions`). Pure
data; provisioner.policy decides, provisioner.inputs builds snapshots for production and
the simulator alike."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from statistics import NormalDist
from typing import Any

from common.config import Config
from provisioner.states import NodeState

FAST_TAU_SHARE = 0.1   # the fast arrival average's time constant: this share of the slow one
FAST_TAU_MIN_S = 10.0  # but never shorter: users arriving in the same instant are no rate


def fast_tau_s(tau_s: float) -> float:
    """The fast arrival average's time constant for a slow one of `tau_s` (fn_arrive.lua
    computes the same)."""
    return max(tau_s * FAST_TAU_SHARE, FAST_TAU_MIN_S)
RISE_Z = 2.0           # standard errors by which the fast average must lead to count as a rise
# A spot machine's interruption is announced this long before it goes (EC2's
# `spot/instance-action`); its users move to other nodes meanwhile (make-before-break).
SPOT_NOTICE_S = 120.0


@dataclass(frozen=True, order=True, slots=True)
class PoolKey:
    model: str
    version: str
    region: str


@dataclass(frozen=True, slots=True)
class NodeSnap:
    """One node as the policy sees it; times are absolute seconds on the caller's clock."""

    id: str
    model: str
    version: str
    region: str
    provider: str
    state: NodeState
    sessions: int = 0
    capacity: int = 4
    requested_at: float = 0.0
    ready_at: float | None = None      # when it turned ready; None while coming
    idle_since: float | None = None    # when it last became empty; None while it has sessions
    eta_ready: float | None = None     # expected time a coming node turns ready
    spot: bool = False                 # a spot node: cheaper, and may be interrupted

    @property
    def key(self) -> PoolKey:
        return PoolKey(self.model, self.version, self.region)


@dataclass(frozen=True, slots=True)
class PoolDemand:
    key: PoolKey
    waiting: int = 0
    arrival_rate_per_s: float = 0.0    # recent (e.g. an EWMA over ~10 minutes)
    mean_session_s: float = 600.0
    arrival_rate_fast_per_s: float = 0.0   # the same over ~a minute: sees a burst at once

    def rate_per_s(self, fast_tau_s: float, z: float = RISE_Z) -> float:
        """The rate to plan for: the fast average while it is significantly above the slow
        one (a burst rising: more than `z` standard errors of a Poisson rate as high as the
        fast one, averaged over `fast_tau_s`), else the slow one. Noise in the fast average
        alone boots nothing, nor do a handful of arrivals at once (each adds 1 / tau)."""
        slow, fast = self.arrival_rate_per_s, self.arrival_rate_fast_per_s
        noise = z * math.sqrt(fast / (2 * max(fast_tau_s, 1e-9)))
        return fast if fast - slow > noise else slow


@dataclass(frozen=True, slots=True)
class Snapshot:
    nodes: tuple[NodeSnap, ...] = ()
    demand: tuple[PoolDemand, ...] = ()


@dataclass(frozen=True)
class ScalingConfig:
    """Knobs of the policy and its baselines; `from_config` builds it from the app config."""

    capacity: int = 4                  # streams per node of a model not in capacity_by_model
    capacity_by_model: Mapping[str, int] = field(default_factory=dict)   # streams_per_gpu
    load_s: float = 10.0
    boot_s_by_provider: Mapping[str, float] = field(default_factory=dict)
    billing_increment_s_by_provider: Mapping[str, float] = field(default_factory=dict)
    price_per_hour_by_provider: Mapping[str, Decimal] = field(default_factory=dict)
    region_provider: Mapping[str, str] = field(default_factory=dict)
    min_nodes_by_model: Mapping[str, int] = field(default_factory=dict)  # per pool
    max_nodes_by_model: Mapping[str, int] = field(default_factory=dict)  # per pool
    # A runaway guard per pool, not a plan: a provider's quota is a region's max_nodes. At 50
    # (200 slots) the guard bound below the bursty day's busiest pools (up to 249 sessions),
    # and their users waited for slots nobody would boot.
    default_max_nodes: int = 250
    idle_grace_s: float = 60.0
    # An idle node stops only when at most this much of its paid increment is left, so a
    # provider billing whole hours gets its hour's worth (60 s increments: any time).
    stop_window_s: float = 60.0
    # Warm buffer: z-score of the net arrivals while new capacity gets ready, where a buffer
    # node that goes unused costs about its lead time and grace (see `buffer_z_at`). With
    # consolidation, 2.8 kept waits at 4.4-4.5 % of users on the simulator's bursty days
    # (seeds 1-3) and 1.0 % on its diurnal day, at 1.33-1.37 and 1.24 of the lower bound.
    buffer_z: float = 2.8
    # How late the policy may notice: the beat's tick (inputs.TICK_S); a lobby that finds no
    # slot asks for a step at once.
    reaction_s: float = 2.0
    stop_margin_slots: int = 2         # hysteresis: free slots beyond the buffer kept up
    default_boot_s: float = 60.0       # for a provider missing from boot_s_by_provider
    fixed_buffer_nodes: int = 1        # decide_fixed_buffer: free nodes' worth of slots
    # Spot offers (providers with `spot = true`, or the simulator's): the price of a spot
    # node per provider. Where spot is offered, up to `spot_share` of each pool's nodes boot
    # on spot and the rest on-demand (`Decisions.spot`, `Decisions.boot`).
    spot_price_per_hour_by_provider: Mapping[str, Decimal] = field(default_factory=dict)
    # At most this share of a pool's nodes (up and coming) on spot, rounded down; the rest is
    # the on-demand hedge that no wave of interruptions takes. At 35 % of the price, 0.8 cost
    # 0.54 of on-demand only on the simulator's days (docs/architecture.md, Autoscaling).
    spot_share: float = 0.8
    fast_tau_s: float = 60.0           # time constant of PoolDemand.arrival_rate_fast_per_s
    # Consolidation (`policy.consolidation`): empty a node whose users fit into the free
    # slots of the other nodes of their pool, by planned moves (no gap). The free slots that
    # sessions ending leave scattered over busy nodes become a whole idle node, which the
    # plan stops, keeps as buffer or reloads; the buffer's z-score is set for that (free
    # slots are no longer kept up by accident). Off: the same z keeps fewer users waiting
    # at a higher cost (docs/architecture.md, Autoscaling).
    consolidate: bool = True

    @classmethod
    def from_config(cls, config: Config, **overrides: Any) -> ScalingConfig:
        """The scaling knobs implied by the app config; keyword overrides win."""
        base = cls(
            capacity_by_model={m.name: m.streams_per_gpu for m in config.models},
            load_s=config.model_load_s,
            boot_s_by_provider={p.name: p.boot_s for p in config.providers},
            billing_increment_s_by_provider={p.name: float(p.billing_increment_s)
                                             for p in config.providers},
            price_per_hour_by_provider={p.name: p.price_per_hour for p in config.providers},
            spot_price_per_hour_by_provider={p.name: p.spot_price for p in config.providers
                                             if p.spot},
            region_provider={r.name: r.provider for r in config.regions},
            idle_grace_s=config.idle_grace_s,
            fast_tau_s=fast_tau_s(config.arrival_tau_s),
        )
        return replace(base, **overrides)

    def capacity_of(self, model: str) -> int:
        """Streams one node of `model` serves (its package's streams_per_gpu)."""
        return self.capacity_by_model.get(model, self.capacity)

    def boot_s(self, provider: str) -> float:
        return self.boot_s_by_provider.get(provider, self.default_boot_s)

    def buffer_z_at(self, region: str) -> float:
        """The warm buffer's z-score in `region`: `buffer_z`, or lower where the provider
        bills a node for longer than a buffer node that goes unused would otherwise cost
        (its reaction, boot, load and idle grace).

        A newsvendor's rule: a buffer node is worth booting while the odds that it is used
        beat its cost against the value of a user who does not wait. `buffer_z` fixes that
        service level for the short cost; a node billed `k` times as long (a whole hour
        against about three minutes) keeps odds `k` times lower: 2.2 becomes 0.8.
        """
        short_s = self.reaction_s + self.lead_s(region) + self.idle_grace_s
        billed_s = self.billing_increment_s_by_provider.get(
            self.region_provider.get(region, ""), 0.0)
        if billed_s <= short_s or short_s <= 0:
            return self.buffer_z
        normal = NormalDist()
        level = min(max(normal.cdf(self.buffer_z), 1e-12), 1 - 1e-12)
        odds = level / (1 - level) * short_s / billed_s
        return normal.inv_cdf(min(max(odds / (1 + odds), 1e-12), 1 - 1e-12))

    def lead_s(self, region: str) -> float:
        """Seconds from asking for a new node in `region` to its first free slot."""
        return self.boot_s(self.region_provider.get(region, "")) + self.load_s

    def min_nodes(self, model: str) -> int:
        return self.min_nodes_by_model.get(model, 0)

    def max_nodes(self, model: str) -> int:
        return self.max_nodes_by_model.get(model, self.default_max_nodes)

    def price(self, provider: str) -> Decimal:
        return self.price_per_hour_by_provider.get(provider, Decimal(0))

    def node_price(self, node: NodeSnap) -> Decimal:
        if node.spot:
            return self.spot_price_per_hour_by_provider.get(node.provider,
                                                            self.price(node.provider))
        return self.price(node.provider)

    def spot_offered(self, region: str) -> bool:
        return self.region_provider.get(region, "") in self.spot_price_per_hour_by_provider

    def paid_left_s(self, node: NodeSnap, now: float) -> float:
        """Seconds left in the node's current paid billing increment (0 at a boundary)."""
        inc = self.billing_increment_s_by_provider.get(node.provider, 1.0)
        return (node.requested_at - now) % inc if inc > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Decisions:
    boot: tuple[PoolKey, ...] = ()                  # one entry per node to boot
    stop: tuple[str, ...] = ()                      # node ids, all idle
    retarget: tuple[tuple[str, PoolKey], ...] = ()  # idle ready node -> pool, same region
    spot: tuple[PoolKey, ...] = ()                  # one entry per spot node to boot
    drain: tuple[str, ...] = ()                     # node ids to empty into their pool

    def __bool__(self) -> bool:
        return bool(self.boot or self.stop or self.retarget or self.spot or self.drain)


Policy = Callable[[Snapshot, float, ScalingConfig], Decisions]
