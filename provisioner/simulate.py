"""Discrete-event simulator: the real placement and scaling code, replayed in virtual time.

`voicectl simulate` calls `main(argv)`. A trace of sessions (the built-in diurnal day, or a
CSV as in docs/protocol.md) runs against the autoscaler (`policy.decide`) and three
baselines: Agones-style fixed buffer, reactive (no buffer), and a static fleet sized for
the peak. Each run reports GPU-hours (request to stop, per node), the lower bound
(perfect packing with zero boot time: the integral of ceil(streaming / capacity) per
(model, region) pool, sessions in their nearest region), waits and billed dollars.

Simulation rules, mirroring the control plane: an arrival claims a slot with
`placement.claim_order` in the regions within the latency budget; without room it waits
in the FIFO queue of its (model, live version, nearest region) pool and triggers an
immediate policy evaluation (the fixed-buffer baseline waits for its 30 s tick instead).
A node turning ready, or a slot freed on a ready node, takes the first waiting users of
its pool. Nodes take boot_s (provider) + load_s to turn ready; a retargeted one load_s.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.config import Config
from common.errors import VoiceError
from provisioner.placement import NodeView, claim_order, rank_regions, regions_in_budget
from provisioner.policy import (
    Decisions,
    NodeSnap,
    Policy,
    PoolDemand,
    PoolKey,
    ScalingConfig,
    Snapshot,
    decide,
    decide_fixed_buffer,
    decide_reactive,
    static_fleet,
)
from provisioner.simtrace import Session, TraceError, builtin_trace, load_trace, sim_config
from provisioner.states import NodeState

__all__ = ["RunResult", "Session", "SimulationError", "TraceError", "builtin_trace", "load_trace",
           "main",
           "run_all", "sim_config", "simulate"]

TICK_S = 5.0                # backstop policy tick
FIXED_TICK_S = 30.0         # Agones' fleet autoscaler sync period
SAMPLE_S = 60.0             # chart resolution
RATE_TAU_S = 600.0          # EWMA time constant of the arrival rate given to the policy
MEAN_SESSION_ALPHA = 0.01   # EWMA weight of each finished session in the mean duration
PROGRESS_EVERY = 16384      # events between progress callbacks
PRIOR_MEAN_SESSION_S = 600.0  # mean session length assumed before any session ends

STUCK_S = 7 * 86400.0       # users waiting this long with nothing coming: the policy is stuck

_END, _READY, _ARRIVAL, _TICK = 0, 1, 2, 3   # order of simultaneous events


class SimulationError(VoiceError):
    """A policy broke the rules in simulation: stopped a busy node, or left users waiting."""


@dataclass(frozen=True, slots=True)
class _Route:
    """Where a user may go: in-budget regions with RTTs, nearest first."""

    nearest: str
    rtt: dict[str, float]


def _routes(sessions: Sequence[Session], config: Config) -> list[_Route]:
    cache: dict[tuple[float, float], _Route] = {}
    out = []
    for s in sessions:
        route = cache.get((s.lat, s.lon))
        if route is None:
            ranked = regions_in_budget(rank_regions(config.regions, s.lat, s.lon),
                                       config.latency_budget_ms)
            route = cache[(s.lat, s.lon)] = _Route(ranked[0][0].name,
                                                   {r.name: rtt for r, rtt in ranked})
        out.append(route)
    return out


def _perfect_packing(sessions: Sequence[Session], routes: Sequence[_Route], config: Config,
                     until_s: float) -> tuple[float, dict[PoolKey, int]]:
    """Lower bound node-seconds in [0, until_s], and the peak concurrency of each pool."""
    live = {m.name: m.version for m in config.models}
    by_pool: dict[PoolKey, list[tuple[float, int]]] = {}
    for s, route in zip(sessions, routes, strict=True):
        edges = by_pool.setdefault(PoolKey(s.model, live[s.model], route.nearest), [])
        edges += [(s.arrival_s, 1), (s.arrival_s + s.duration_s, -1)]
    total, peaks = 0.0, {}
    for key, edges in by_pool.items():
        edges.sort()
        t = np.array([e[0] for e in edges])
        n = np.cumsum([e[1] for e in edges])
        nodes = np.ceil(n[:-1] / config.node_capacity)
        total += float(np.sum(nodes * np.diff(np.clip(t, 0.0, until_s))))
        peaks[key] = int(n.max())
    return total, peaks


@dataclass(slots=True)
class _Node:
    id: str
    key: PoolKey
    provider: str
    capacity: int
    state: NodeState
    requested_at: float
    eta: float | None
    sessions: int = 0
    ready_at: float | None = None
    idle_since: float | None = None
    cached_snap: NodeSnap | None = None
    cached_view: NodeView | None = None

    def touch(self) -> None:
        self.cached_snap = self.cached_view = None

    def snap(self) -> NodeSnap:
        if self.cached_snap is None:
            k = self.key
            self.cached_snap = NodeSnap(self.id, k.model, k.version, k.region, self.provider,
                                        self.state, self.sessions, self.capacity,
                                        self.requested_at, self.ready_at, self.idle_since,
                                        self.eta)
        return self.cached_snap

    def view(self) -> NodeView:
        if self.cached_view is None:
            k = self.key
            self.cached_view = NodeView(self.id, k.region, k.model, k.version, self.state,
                                        self.sessions, self.capacity)
        return self.cached_view


@dataclass
class RunResult:
    """What one policy did to one trace; `metrics()` gives the reported figures."""

    name: str
    gpu_s: float = 0.0
    billed_s: float = 0.0       # GPU time rounded up to whole billing increments
    cost_usd: float = 0.0
    lower_bound_s: float = 0.0
    waits: list[float] = field(default_factory=list)
    # (t, streaming + waiting, waiting, ready slots, perfect-packing slots) every SAMPLE_S
    samples: list[tuple[float, int, int, int, int]] = field(default_factory=list)
    boots: int = 0
    stops: int = 0
    retargets: int = 0
    peak_nodes: int = 0

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
            "wait_s_p99": round(p99, 2),
            "sessions": len(self.waits),
            "billed_gpu_hours": round(self.billed_s / 3600, 3),
            "cost_usd": round(self.cost_usd, 2),
            "boots": self.boots, "stops": self.stops, "retargets": self.retargets,
            "peak_nodes": self.peak_nodes,
        }


class _Sim:
    """One run of one policy over one trace. Virtual time only; the policy sees snapshots."""

    def __init__(self, sessions: Sequence[Session], routes: Sequence[_Route], config: Config,
                 scaling: ScalingConfig, policy: Policy, result: RunResult, *,
                 tick_s: float, event_driven: bool,
                 progress: Callable[[str, float], None] | None, until_s: float) -> None:
        self.sessions, self.routes, self.config, self.scaling = sessions, routes, config, scaling
        self.policy, self.result, self.tick_s = policy, result, tick_s
        self.event_driven, self.progress, self.until = event_driven, progress, until_s
        self.live = {m.name: m.version for m in config.models}
        traced = {s.model for s in sessions}
        self.pool_keys = [PoolKey(m.name, m.version, r.name)
                          for m in config.models if m.name in traced for r in config.regions]
        self.nodes: dict[str, _Node] = {}
        self.by_pool: dict[PoolKey, dict[str, _Node]] = {k: {} for k in self.pool_keys}
        self.queues: dict[PoolKey, deque[int]] = {k: deque() for k in self.pool_keys}
        self.streaming = dict.fromkeys(self.pool_keys, 0)
        self.rate = {k: (0.0, 0.0) for k in self.pool_keys}      # (ewma value, at time)
        self.mean_s = dict.fromkeys(self.pool_keys, PRIOR_MEAN_SESSION_S)
        self.price = {p.name: float(p.price_per_hour) for p in config.providers}
        self.increment = {p.name: float(p.billing_increment_s) for p in config.providers}
        self.heap: list[tuple[float, int, int, str]] = []
        self.seq = self.next_id = 0
        self.waiting = self.ready_slots = self.total_streaming = 0

    # -- events ------------------------------------------------------------------------
    def push(self, t: float, kind: int, payload: str) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, payload))

    def run(self, initial: Mapping[PoolKey, int]) -> RunResult:
        sessions, n = self.sessions, len(self.sessions)
        start = math.floor(min(0.0, sessions[0].arrival_s) / SAMPLE_S) * SAMPLE_S
        for key in sorted(initial):      # a fleet that is up before the trace starts
            for _ in range(initial[key]):
                self.boot(key, start - self.scaling.lead_s(key.region), 0.0)
        self.push(start, _TICK, "0")
        ai = ended = events = 0
        now = start
        while ended < n:
            if ai < n and (not self.heap or (sessions[ai].arrival_s, _ARRIVAL) < self.heap[0][:2]):
                now = sessions[ai].arrival_s
                self.arrive(ai, now)
                ai += 1
            else:
                now, kind, _, payload = heapq.heappop(self.heap)
                if kind == _END:
                    node_id, _, idx = payload.partition(":")
                    self.end(self.nodes[node_id], int(idx), now)
                    ended += 1
                elif kind == _READY:
                    self.make_ready(self.nodes[payload], now)
                else:
                    self.tick(int(payload), now)
            events += 1
            if events % PROGRESS_EVERY == 0:
                if self.progress:
                    self.progress(self.result.name, now)
                if ai == n and now > sessions[-1].arrival_s + STUCK_S:
                    raise SimulationError(f"{self.result.name}: {self.waiting} users still wait "
                                          f"{STUCK_S / 86400:.0f} days after the last arrival; "
                                          "the policy boots nothing for them (max nodes 0?)")
        for node in list(self.nodes.values()):
            self.stop(node, now)
        return self.result

    def arrive(self, idx: int, now: float) -> None:
        s, route = self.sessions[idx], self.routes[idx]
        version = self.live[s.model]
        views = [node.view() for region in route.rtt
                 for node in self.by_pool[PoolKey(s.model, version, region)].values()]
        order = claim_order(views, s.model, version, route.rtt)
        if order:
            node = self.nodes[order[0]]
            self.count_arrival(node.key, now)
            self.start(node, idx, now)
            return
        key = PoolKey(s.model, version, route.nearest)
        self.count_arrival(key, now)
        self.queues[key].append(idx)
        self.waiting += 1
        if self.event_driven:
            self.evaluate(now)

    def start(self, node: _Node, idx: int, now: float) -> None:
        s = self.sessions[idx]
        node.sessions += 1
        node.idle_since = None
        node.touch()
        self.streaming[node.key] += 1
        self.total_streaming += 1
        if 0 <= s.arrival_s < self.until:
            self.result.waits.append(now - s.arrival_s)
        self.push(now + s.duration_s, _END, f"{node.id}:{idx}")

    def end(self, node: _Node, idx: int, now: float) -> None:
        node.sessions -= 1
        if node.sessions == 0:
            node.idle_since = now
        node.touch()
        self.streaming[node.key] -= 1
        self.total_streaming -= 1
        mean = self.mean_s[node.key]
        self.mean_s[node.key] = mean + MEAN_SESSION_ALPHA * (self.sessions[idx].duration_s - mean)
        self.serve_queue(node, now)

    def make_ready(self, node: _Node, now: float) -> None:
        node.state = NodeState.READY
        node.ready_at = node.idle_since = now
        node.eta = None
        node.touch()
        self.ready_slots += node.capacity
        self.serve_queue(node, now)

    def serve_queue(self, node: _Node, now: float) -> None:
        queue = self.queues.get(node.key)
        while queue and node.sessions < node.capacity:
            self.waiting -= 1
            self.start(node, queue.popleft(), now)

    def count_arrival(self, key: PoolKey, now: float) -> None:
        value, at = self.rate[key]
        self.rate[key] = (value * math.exp((at - now) / RATE_TAU_S) + 1 / RATE_TAU_S, now)

    # -- policy ------------------------------------------------------------------------
    def tick(self, k: int, now: float) -> None:
        self.evaluate(now)
        self.push(now + self.tick_s, _TICK, str(k + 1))
        if 0 <= now <= self.until and (k * self.tick_s) % SAMPLE_S == 0:
            packed = sum(math.ceil(v / self.config.node_capacity) for v in self.streaming.values())
            self.result.samples.append((now, self.total_streaming + self.waiting, self.waiting,
                                        self.ready_slots, packed * self.config.node_capacity))

    def evaluate(self, now: float) -> None:
        demand = tuple(
            PoolDemand(key, len(self.queues[key]),
                       self.rate[key][0] * math.exp((self.rate[key][1] - now) / RATE_TAU_S),
                       self.mean_s[key])
            for key in self.pool_keys)
        snapshot = Snapshot(tuple(node.snap() for node in self.nodes.values()), demand)
        self.apply(self.policy(snapshot, now, self.scaling), now)

    def apply(self, decisions: Decisions, now: float) -> None:
        for key in decisions.boot:
            self.boot(key, now, lead_s=self.scaling.lead_s(key.region))
        for node_id, key in decisions.retarget:
            node = self.nodes[node_id]
            if node.state is not NodeState.READY or node.sessions or node.key.region != key.region:
                raise SimulationError(f"policy retargeted {node} to {key}: not idle and ready "
                                     "in the same region")
            del self.by_pool[node.key][node.id]
            self.by_pool.setdefault(key, {})[node.id] = node
            node.key, node.state, node.eta = key, NodeState.LOADING, now + self.scaling.load_s
            node.ready_at = node.idle_since = None
            node.touch()
            self.ready_slots -= node.capacity
            self.result.retargets += 1
            self.push(node.eta, _READY, node.id)
        for node_id in decisions.stop:
            node = self.nodes[node_id]
            if node.sessions or node.state is not NodeState.READY:
                raise SimulationError(f"policy stopped {node}: it is not idle and ready")
            self.stop(node, now)
            self.result.stops += 1

    def boot(self, key: PoolKey, now: float, lead_s: float) -> _Node:
        provider = self.scaling.region_provider.get(key.region, "")
        self.next_id += 1
        node = _Node(f"n{self.next_id:05d}", key, provider, self.config.node_capacity,
                     NodeState.BOOTING, now, now + lead_s)
        self.nodes[node.id] = node
        self.by_pool.setdefault(key, {})[node.id] = node
        self.result.boots += 1
        self.result.peak_nodes = max(self.result.peak_nodes, len(self.nodes))
        self.push(now + lead_s, _READY, node.id)
        return node

    def stop(self, node: _Node, now: float) -> None:
        del self.nodes[node.id]
        del self.by_pool[node.key][node.id]
        if node.state is NodeState.READY:
            self.ready_slots -= node.capacity
        life = now - node.requested_at
        measured = max(0.0, min(now, self.until) - max(0.0, node.requested_at))
        inc = self.increment.get(node.provider, 1.0)
        billed = math.ceil(life / inc - 1e-9) * inc if life > 0 else 0.0
        self.result.gpu_s += measured
        if life > 0:   # the bill of a node that straddles the window: pro rata
            self.result.billed_s += billed * measured / life
            self.result.cost_usd += self.price.get(node.provider, 0.0) * billed / 3600 * (
                measured / life)


def simulate(sessions: Sequence[Session], config: Config, policy: Policy, *, name: str,
             scaling: ScalingConfig | None = None, tick_s: float = TICK_S,
             event_driven: bool = True, initial: Mapping[PoolKey, int] | None = None,
             progress: Callable[[str, float], None] | None = None,
             routes: Sequence[_Route] | None = None, until_s: float | None = None
             ) -> RunResult:
    """Replay `sessions` (sorted by arrival) against one policy.

    Measures the window [0, until_s] (default: until the last session ends): GPU time and
    the lower bound inside it, waits of the sessions arriving in it. Nodes still up when
    the last session ends stop then.
    """
    if not sessions:
        raise TraceError("the trace has no sessions")
    until = math.inf if until_s is None else until_s
    routes = routes or _routes(sessions, config)
    lower, _ = _perfect_packing(sessions, routes, config, until)
    result = RunResult(name, lower_bound_s=lower)
    sim = _Sim(sessions, routes, config, scaling or ScalingConfig.from_config(config), policy,
               result, tick_s=tick_s, event_driven=event_driven, progress=progress,
               until_s=until)
    return sim.run(initial or {})


def run_all(sessions: Sequence[Session], config: Config, *, until_s: float | None = None,
            progress: Callable[[str, float], None] | None = None) -> dict[str, RunResult]:
    """The policy and the three baselines over the same trace (see `simulate`)."""
    scaling = ScalingConfig.from_config(config)
    routes = _routes(sessions, config)
    _, peaks = _perfect_packing(sessions, routes, config, math.inf)
    peak_nodes = {k: math.ceil(v / config.node_capacity) for k, v in peaks.items()}
    runs: list[tuple[str, Policy, float, bool, Mapping[PoolKey, int]]] = [
        ("policy", decide, TICK_S, True, {}),
        ("fixed_buffer", decide_fixed_buffer, FIXED_TICK_S, False, {}),
        ("reactive", decide_reactive, TICK_S, True, {}),
        ("static_peak", static_fleet(peak_nodes), SAMPLE_S, False, peak_nodes),
    ]
    return {name: simulate(sessions, config, policy, name=name, scaling=scaling, tick_s=tick,
                           event_driven=eager, initial=initial, progress=progress,
                           routes=routes, until_s=until_s)
            for name, policy, tick, eager, initial in runs}


def _report(results: Mapping[str, RunResult]) -> dict[str, Any]:
    out = results["policy"].metrics()
    out["baselines"] = {name: r.metrics() for name, r in results.items() if name != "policy"}
    return out


def _table(results: Mapping[str, RunResult]) -> str:
    rows = [("GPU-hours", "gpu_hours", "{:.2f}"),
            ("lower bound GPU-hours", "lower_bound_gpu_hours", "{:.2f}"),
            ("ratio to lower bound", "cost_ratio", "{:.3f}"),
            ("users who waited", "wait_fraction", "{:.2%}"),
            ("wait p50 s", "wait_s_p50", "{:.1f}"), ("wait p95 s", "wait_s_p95", "{:.1f}"),
            ("wait p99 s", "wait_s_p99", "{:.1f}"),
            ("billed GPU-hours", "billed_gpu_hours", "{:.2f}"),
            ("GPU cost $", "cost_usd", "{:,.2f}"),
            ("node boots", "boots", "{}"), ("model reloads", "retargets", "{}")]
    metrics = {name: r.metrics() for name, r in results.items()}
    lines = [f"{'':24}" + "".join(f"{name:>14}" for name in metrics)]
    for label, key, fmt in rows:
        lines.append(f"{label:24}" + "".join(
            f"{fmt.format(m[key]) if m[key] is not None else '-':>14}" for m in metrics.values()))
    sessions = next(iter(metrics.values()))["sessions"]
    lines.append(f"{sessions} sessions measured")
    return "\n".join(lines)


def _chart(results: Mapping[str, RunResult], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, low) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    for name, style in (("policy", "-"), ("fixed_buffer", ":")):
        samples = results[name].samples
        hours = [s[0] / 3600 for s in samples]
        if name == "policy":
            ax.plot(hours, [s[1] for s in samples], color="black", lw=1,
                    label="demand (streaming + waiting)")
            ax.plot(hours, [s[4] for s in samples], color="grey", lw=1, ls="--",
                    label="perfect packing, zero boot time (slots)")
        ax.plot(hours, [s[3] for s in samples], ls=style, lw=1.2, label=f"{name}: ready slots")
        low.plot(hours, [s[2] for s in samples], ls=style, lw=1, label=name)
    ax.set_ylabel("sessions / slots")
    ax.set_title("Demand and capacity (sampled every minute)")
    ax.legend(loc="upper left", fontsize=8)
    low.set_ylabel("users waiting")
    low.set_xlabel("hours")
    low.legend(loc="upper left", fontsize=8)
    for axis in (ax, low):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voicectl simulate",
        description="Replay a trace against the autoscaler and three baselines.")
    parser.add_argument("--trace", type=Path, help="CSV: arrival_s, duration_s, model, "
                        "and region or lat and lon (default: the built-in diurnal day)")
    parser.add_argument("--hours", type=float, default=24.0, help="built-in trace length")
    parser.add_argument("--seed", type=int, default=0, help="built-in trace seed")
    parser.add_argument("--config", type=Path, help="TOML config (default: default.toml "
                        "regions and models on simulated cloud providers)")
    parser.add_argument("--chart", type=Path, default=Path("simulation.png"),
                        help="PNG of demand and capacity (default: simulation.png)")
    parser.add_argument("--no-chart", action="store_true", help="do not draw the chart")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    if not 0 < args.hours <= 24 * 31:
        parser.error(f"--hours {args.hours} is out of range; expected 0 < H <= 744")

    began = time.monotonic()
    last = [began]

    def progress(name: str, now: float) -> None:
        wall = time.monotonic()
        if wall - began > 1.0 and wall - last[0] > 1.0:
            last[0] = wall
            print(f"simulate: {name} at {now / 3600:.1f} h of virtual time "
                  f"({wall - began:.0f} s)", file=sys.stderr, flush=True)

    try:
        config = sim_config(args.config)
        sessions = (load_trace(args.trace, config) if args.trace
                    else builtin_trace(config, args.hours, args.seed))
        until_s = None if args.trace else args.hours * 3600.0
        results = run_all(sessions, config, until_s=until_s, progress=progress)
    except VoiceError as e:
        print(f"voicectl simulate: {e}", file=sys.stderr)
        return 2
    if not args.no_chart:
        try:
            _chart(results, args.chart)
        except OSError as e:
            print(f"voicectl simulate: cannot write the chart to {str(args.chart)!r}: {e}; "
                  "pass --chart PATH in a writable folder or --no-chart", file=sys.stderr)
            return 2
        print(f"simulate: chart written to {args.chart}", file=sys.stderr)
    if time.monotonic() - began > 1.0:
        print(f"simulate: done in {time.monotonic() - began:.1f} s", file=sys.stderr)
    if args.json:
        print(json.dumps(_report(results)))
    else:
        print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
