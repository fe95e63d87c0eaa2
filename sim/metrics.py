"""What a simulated run measured, and the lower bound it is compared with.

Pure code. The lower bound is perfect packing with zero boot time: the integral of
ceil(streaming / capacity) per (model, home region) pool; in dollars, those node-seconds
billed by the second. GPU-hours count idle time already paid for (a provider billing whole
hours: the policy keeps such nodes as buffer until their hour ends), dollars do not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.config import Config
from provisioner.placement import boot_regions
from provisioner.policy import PoolKey
from sim.trace import Session

__all__ = ["RunResult", "lower_bound_usd", "perfect_packing"]


def perfect_packing(sessions: Sequence[Session], homes: Sequence[str], config: Config,
                    until_s: float) -> tuple[dict[PoolKey, float], dict[PoolKey, int]]:
    """Lower bound node-seconds of each pool in [0, until_s], and its peak concurrency."""
    live = {m.name: m.version for m in config.models}
    by_pool: dict[PoolKey, list[tuple[float, int]]] = {}
    for s, home in zip(sessions, homes, strict=True):
        edges = by_pool.setdefault(PoolKey(s.model, live[s.model], home), [])
        edges += [(s.arrival_s, 1), (s.arrival_s + s.duration_s, -1)]
    seconds, peaks = {}, {}
    for key, edges in by_pool.items():
        edges.sort()
        t = np.array([e[0] for e in edges])
        n = np.cumsum([e[1] for e in edges])
        nodes = np.ceil(n[:-1] / config.streams_per_gpu(key.model))
        seconds[key] = float(np.sum(nodes * np.diff(np.clip(t, 0.0, until_s))))
        peaks[key] = int(n.max())
    return seconds, peaks


def lower_bound_usd(seconds: Mapping[PoolKey, float], config: Config) -> float:
    """Dollars of the lower bound: each pool's node-seconds at the price of the region its
    nodes boot in, billed by the second (no increments, nothing idle)."""
    total = 0.0
    for key, s in seconds.items():
        where = boot_regions(config, key.region)
        region = where[0] if where else config.region(key.region)
        if region is not None:
            total += s * float(config.provider(region.provider).price_per_hour) / 3600
    return total


@dataclass
class RunResult:
    """What one policy did to one trace; `metrics()` gives the reported figures."""

    name: str
    gpu_s: float = 0.0
    billed_s: float = 0.0       # GPU time rounded up to whole billing increments
    cost_usd: float = 0.0
    lower_bound_s: float = 0.0
    lower_bound_usd: float = 0.0
    waits: list[float] = field(default_factory=list)
    # (t, streaming + waiting, waiting, ready slots, perfect-packing slots) every SAMPLE_S
    samples: list[tuple[float, int, int, int, int]] = field(default_factory=list)
    boots: int = 0
    stops: int = 0
    retargets: int = 0
    moves: int = 0              # sessions moved to another node of their pool (planned)
    peak_nodes: int = 0
    spot_boots: int = 0
    spot_gpu_s: float = 0.0
    spot_refusals: int = 0         # spot requests refused (booted on-demand instead)
    interruptions: int = 0         # spot nodes the provider took back (notices)
    interrupted_sessions: int = 0  # streams on them at the notice
    moved_users: int = 0           # of those, moved make-before-break before the node went
    users_without_audio_over_1s: int = 0   # still on it when it went: resumed first in line

    def metrics(self) -> dict[str, Any]:
        waits = np.array(self.waits or [0.0])
        p50, p95, p99 = (float(x) for x in np.percentile(waits, [50, 95, 99]))
        return {
            "gpu_hours": round(self.gpu_s / 3600, 3),
            "lower_bound_gpu_hours": round(self.lower_bound_s / 3600, 3),
            "cost_ratio": round(self.gpu_s / self.lower_bound_s, 4) if self.lower_bound_s else
            None,
            "wait_fraction": round(float(np.mean(waits > 1e-9)), 5),
            "wait_s_p50": round(p50, 2), "wait_s_p95": round(p95, 2),
            "wait_s_p99": round(p99, 2), "wait_s_max": round(float(waits.max()), 2),
            "sessions": len(self.waits),
            "billed_gpu_hours": round(self.billed_s / 3600, 3),
            "cost_usd": round(self.cost_usd, 2),
            "lower_bound_usd": round(self.lower_bound_usd, 2),
            "cost_usd_ratio": round(self.cost_usd / self.lower_bound_usd, 4)
            if self.lower_bound_usd else None,
            "boots": self.boots, "stops": self.stops, "retargets": self.retargets,
            "moves": self.moves, "peak_nodes": self.peak_nodes,
            "spot_boots": self.spot_boots, "spot_gpu_hours": round(self.spot_gpu_s / 3600, 3),
            "spot_refusals": self.spot_refusals,
            "spot_interruptions": self.interruptions, "interruptions": self.interruptions,
            "interrupted_sessions": self.interrupted_sessions,
            "moved_users": self.moved_users,
            "users_without_audio_over_1s": self.users_without_audio_over_1s,
        }
