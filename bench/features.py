"""Features against what they cost: consolidation (dollars saved against users moved) and
recall after a region outage (how often it fires, what it buys).

    python bench/features.py [--seeds 1 2 3] [--hours 24] [--jobs 2] [--variants ...] [--json]

Consolidation: the real policy (`policy.decide`) over the simulator's standard days (the
bursty day and the built-in diurnal day, each seed), all else equal, as variants:
  off        `ScalingConfig.consolidate=False` at the default warm-buffer z (2.8)
  off_z2.4   the same at z 2.4: a second point of off's cost/wait curve
  on         consolidation as the policy does it: a node is emptied only if the rest of
             its pool keeps its warm buffer until the node may stop (so it stops rather
             than taking users again)
Per run: GPU dollars and their ratio to the lower bound, waits (share of users who
waited, the longest), moves per session-hour, the most moves of any one session, the
share of sessions moved, and what became of each node emptied: stopped before it took
a user again, or reused (took users, or was reloaded for another pool). A variant's
saving is against off at the same waits: off's cost interpolated (linearly, in the share
of users who waited) between its two z points, per seed; `$/move` divides it by moves.

Recall: the simulator injects no region outage (`sim.engine` has no outage event: no
node dies, no region is marked down), so recall fires 0 times on its days. What one
outage would give it is measured on the same traces instead: region R down for D minutes
from hour h (every R, each D in OUTAGE_MIN, h every OUTAGE_EVERY_H hours). Users of R
streaming when it fell or arriving while it is down are served from the nearest region
up (beyond the latency budget: every region is alone within it); when R serves again,
recall fires for those still streaming, and each one's remaining time past RECALL_MOVE_S
(the most the move takes) is what recall saves them far away, at the extra RTT shown.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from report import report  # noqa: E402

from common.config import RECALL_MOVE_S, Config  # noqa: E402
from provisioner.inputs import TICK_S  # noqa: E402
from provisioner.placement import estimate_rtt_ms, home_region, near_regions  # noqa: E402
from provisioner.policy import (  # noqa: E402
    Decisions,
    ScalingConfig,
    decide,
)
from sim.engine import Sim, SimNode, routes  # noqa: E402
from sim.metrics import RunResult, lower_bound_usd, perfect_packing  # noqa: E402
from sim.trace import Session, builtin_trace, bursty_trace, sim_config  # noqa: E402

TRACES = ("bursty", "diurnal")
OFF, OFF_LOW = "off", "off_z2.4"
OFF_LOW_Z = 2.4
# variant -> (consolidate, buffer_z or None for the default)
VARIANTS: dict[str, tuple[bool, float | None]] = {
    OFF: (False, None),
    OFF_LOW: (False, OFF_LOW_Z),
    "on": (True, None),
}
DEFAULT_VARIANTS = (OFF, OFF_LOW, "on")
OUTAGE_MIN = (15.0, 60.0)
OUTAGE_EVERY_H = 2.0


class CountingSim(Sim):
    """The simulator's engine, counting each session's moves and each emptied node's fate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.moved: Counter[int] = Counter()
        self.emptied: set[str] = set()          # nodes emptied, not yet stopped nor reused
        self.fates: Counter[str] = Counter()
        self.last_end = max(s.arrival_s + s.duration_s for s in self.sessions)

    def _reused(self, node_id: str) -> None:
        if node_id in self.emptied:
            self.emptied.discard(node_id)
            self.fates["reused"] += 1

    def empty(self, node: SimNode, now: float, drained: set[str]) -> None:
        moving = sorted(node.sessions)
        super().empty(node, now, drained)
        self.moved.update(moving)
        self.emptied.add(node.id)
        self.fates["emptied"] += 1

    def start(self, node: SimNode, idx: int, now: float) -> None:
        self._reused(node.id)
        super().start(node, idx, now)

    def apply(self, decisions: Decisions, now: float) -> None:
        for node_id, _ in decisions.retarget:
            self._reused(node_id)
        super().apply(decisions, now)

    def stop(self, node: SimNode, now: float) -> None:
        if node.id in self.emptied:
            self.emptied.discard(node.id)
            self.fates["stopped" if now < self.last_end else "up_at_end"] += 1
        super().stop(node, now)


def trace(kind: str, config: Config, hours: float, seed: int) -> list[Session]:
    if kind == "bursty":
        return bursty_trace(config, hours, seed, 600.0)   # voicectl simulate's default peak
    return builtin_trace(config, hours, seed)


def run_consolidation(kind: str, seed: int, variant: str, hours: float) -> dict[str, Any]:
    """One policy run, as sim.run.simulate runs it, on the counting engine."""
    consolidate, z = VARIANTS[variant]
    config = sim_config(None)
    sessions = trace(kind, config, hours, seed)
    until = hours * 3600.0
    scaling = replace(ScalingConfig.from_config(config), consolidate=consolidate)
    if z is not None:
        scaling = replace(scaling, buffer_z=z)
    routes_ = routes(sessions, config)
    lower, _ = perfect_packing(sessions, [r.home for r in routes_], config, until)
    result = RunResult(variant, lower_bound_s=sum(lower.values()),
                       lower_bound_usd=lower_bound_usd(lower, config))
    sim = CountingSim(sessions, routes_, config, scaling, decide, result, tick_s=TICK_S,
                      event_driven=True, progress=None, until_s=until,
                      spot_offers={}, seed=seed)
    m = sim.run({}).metrics()
    moves = sum(sim.moved.values())
    emptied = sim.fates["emptied"]
    return {
        "trace": kind, "seed": seed, "variant": variant,
        "cost_usd": m["cost_usd"], "cost_usd_ratio": m["cost_usd_ratio"],
        "wait_fraction": m["wait_fraction"], "wait_s_max": m["wait_s_max"],
        "moves": moves,
        "moves_per_session_h": round(moves * 3600 / sum(s.duration_s for s in sessions), 4),
        "max_moves_one_session": max(sim.moved.values(), default=0),
        "moved_share": round(len(sim.moved) / len(sessions), 4),
        "emptied_nodes": emptied,
        "emptied_stopped_share": round(sim.fates["stopped"] / emptied, 3) if emptied else None,
        "emptied_reused_share": round(sim.fates["reused"] / emptied, 3) if emptied else None,
    }


def recall_outages(kind: str, seed: int, hours: float) -> list[dict[str, Any]]:
    """Recall's counterfactual, one outage per (region, duration, start hour)."""
    config = sim_config(None)
    sessions = trace(kind, config, hours, seed)
    homes = [home_region(config, s.lat, s.lon).name for s in sessions]
    out = []
    for region in config.regions:
        near = near_regions(config, region.name)
        others = [r for r in config.regions if r.name not in near]
        mine = [s for s, home in zip(sessions, homes, strict=True) if home == region.name]
        for minutes in OUTAGE_MIN:
            for k in range(max(1, int(hours / OUTAGE_EVERY_H))):
                down = k * OUTAGE_EVERY_H * 3600.0
                up = down + minutes * 60
                fired, far_s, extra_ms = 0, 0.0, 0.0
                for s in mine:
                    end = s.arrival_s + s.duration_s
                    if s.arrival_s >= up or end <= up:
                        continue   # arrived after it came back, or ended before
                    far = min(others, key=lambda r: estimate_rtt_ms(s.lat, s.lon, r))
                    fired += 1
                    far_s += max(0.0, end - up - RECALL_MOVE_S)
                    extra_ms += (estimate_rtt_ms(s.lat, s.lon, far)
                                 - estimate_rtt_ms(s.lat, s.lon, region))
                out.append({"trace": kind, "seed": seed, "region": region.name,
                            "minutes": minutes, "fired": fired, "far_min_saved": far_s / 60,
                            "extra_rtt_ms": extra_ms / fired if fired else None})
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def iso_wait_saving(run: dict[str, Any], off: dict[str, Any], low: dict[str, Any]) -> float:
    """Off's cost at `run`'s waits (linear through off's two points) minus `run`'s cost."""
    w0, w1, w = (float(r["wait_fraction"]) for r in (off, low, run))
    c0, c1, c = (float(r["cost_usd"]) for r in (off, low, run))
    return c0 + ((c1 - c0) / (w1 - w0) if w1 != w0 else 0.0) * (w - w0) - c


def summarize(runs: list[dict[str, Any]], outages: list[dict[str, Any]],
              variants: Sequence[str]) -> dict[str, Any]:
    by = {(r["trace"], r["seed"], r["variant"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    figures: dict[str, Any] = {}
    for kind in TRACES:
        for v in variants:
            rs = [by[(kind, s, v)] for s in seeds]
            for key in ("cost_usd", "cost_usd_ratio", "wait_fraction", "wait_s_max",
                        "moves_per_session_h", "moved_share", "emptied_stopped_share"):
                vals = [r[key] for r in rs if r[key] is not None]
                figures[f"{kind}_{v}_{key}"] = round(_mean(vals), 4) if vals else None
            figures[f"{kind}_{v}_max_moves_one_session"] = max(
                r["max_moves_one_session"] for r in rs)
            if VARIANTS[v][0] and OFF in variants and OFF_LOW in variants:
                saved = [iso_wait_saving(by[(kind, s, v)], by[(kind, s, OFF)],
                                         by[(kind, s, OFF_LOW)]) for s in seeds]
                figures[f"{kind}_{v}_saved_usd_iso_wait"] = round(_mean(saved), 1)
                base = [by[(kind, s, OFF)]["cost_usd"] for s in seeds]
                figures[f"{kind}_{v}_saved_pct_iso_wait"] = round(100 * _mean(
                    [x / b for x, b in zip(saved, base, strict=True)]), 2)
                moves = _mean([by[(kind, s, v)]["moves"] for s in seeds])
                figures[f"{kind}_{v}_usd_per_move"] = round(_mean(saved) / moves, 4) \
                    if moves else None
        figures[f"{kind}_recall_fires_on_sim_days"] = 0
        for minutes in OUTAGE_MIN:
            os_ = [o for o in outages if o["trace"] == kind and o["minutes"] == minutes]
            pre = f"{kind}_outage{minutes:g}m"
            figures[f"{pre}_recall_fires_mean"] = round(_mean([o["fired"] for o in os_]), 1)
            figures[f"{pre}_recall_fires_max"] = max((o["fired"] for o in os_), default=0)
            far = sum(o["far_min_saved"] for o in os_)
            figures[f"{pre}_far_min_saved_mean"] = round(far / max(1, len(os_)), 1)
            figures[f"{pre}_far_min_saved_per_recall"] = round(
                far / max(1, sum(o["fired"] for o in os_)), 1)
            ms = [o["extra_rtt_ms"] for o in os_ if o["extra_rtt_ms"] is not None]
            figures[f"{pre}_extra_rtt_ms_mean"] = round(_mean(ms), 1)
    return figures


def table(runs: list[dict[str, Any]], variants: Sequence[str]) -> str:
    cols = {"cost_usd": "$", "cost_usd_ratio": "$/lb", "wait_fraction": "waited",
            "wait_s_max": "maxwait", "moves_per_session_h": "mv/ses-h",
            "max_moves_one_session": "maxmv", "moved_share": "moved",
            "emptied_nodes": "emptied", "emptied_stopped_share": "stopped"}
    lines = [f"{'trace':8} {'seed':>4} {'variant':9} "
             + " ".join(f"{h:>8}" for h in cols.values())]
    for r in sorted(runs, key=lambda r: (r["trace"], r["seed"], variants.index(r["variant"]))):
        lines.append(f"{r['trace']:8} {r['seed']:>4} {r['variant']:9} "
                     + " ".join(f"{'-' if r[c] is None else r[c]:>8}" for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--hours", type=float, default=24.0, help="length of each day")
    p.add_argument("--jobs", type=int, default=2, help="simulator processes at once")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                   default=list(DEFAULT_VARIANTS))
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    args = p.parse_args(argv)
    began = time.monotonic()
    jobs = [(kind, seed, v, args.hours) for kind in TRACES for seed in args.seeds
            for v in args.variants]
    days = [(kind, seed, args.hours) for kind in TRACES for seed in args.seeds]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = list(pool.map(run_consolidation, *zip(*jobs, strict=True)))
        outages = [o for day in pool.map(recall_outages, *zip(*days, strict=True)) for o in day]
    print(table(runs, args.variants))
    figures = summarize(runs, outages, args.variants)
    figures["wall_s"] = round(time.monotonic() - began, 1)
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
