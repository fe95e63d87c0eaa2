"""`voicectl simulate`: replay a trace against the autoscaler and its baselines.

A trace of sessions (the built-in diurnal day, a bursty heavy-tailed day, or a CSV as in
docs/protocol.md) runs through the engine (`sim.engine`) against the autoscaler
(`policy.decide`) and three baselines: Agones-style fixed buffer, reactive (no buffer),
and a static fleet sized for the peak. Each run reports GPU-hours (request to stop, per
node), the lower bound (`sim.metrics`), waits, billed dollars and, with `--spot`, spot
interruptions and the dollars against the same policy on-demand only (`cost_vs_on_demand`).
`--sweep` runs each scaling policy over a range of its main knob and draws the cost/wait
frontier.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.config import Config
from common.errors import VoiceError
from provisioner.inputs import TICK_S
from provisioner.policy import (
    Policy,
    PoolKey,
    ScalingConfig,
    decide,
    decide_fixed_buffer,
    decide_reactive,
    static_fleet,
)
from sim.engine import Route, Sim, SimulationError, routes
from sim.metrics import RunResult, lower_bound_usd, perfect_packing
from sim.report import (
    chart,
    frontier_chart,
    report,
    require_charts,
    table,
    undominated,
)
from sim.spot import SpotOffer
from sim.trace import (
    SIM_SPOT,
    SPOT_INTERRUPTIONS_PER_HOUR,
    SPOT_REFUSAL,
    Session,
    TraceError,
    builtin_trace,
    bursty_trace,
    load_trace,
    sim_config,
    write_trace,
)

__all__ = ["RunResult", "Session", "SimulationError", "TraceError", "builtin_trace",
           "bursty_trace", "load_trace", "main", "run_all", "sim_config", "simulate", "sweep"]

FIXED_TICK_S = 30.0         # Agones' fleet autoscaler sync period
STATIC_TICK_S = 60.0
# --sweep: each curve over its main knob (ScalingConfig field, values).
SWEEP: dict[str, tuple[str, tuple[float, ...]]] = {
    "policy": ("buffer_z", (-2.0, -1.0, 0.0, 1.0, 1.6, 2.2, 3.0, 4.0, 6.0, 9.0)),
    "policy_lean": ("buffer_z", (-3.0, -1.0, 0.0, 1.0, 2.2)),
    "fixed_buffer": ("fixed_buffer_nodes", (0, 1, 2, 3, 5, 8)),
    "reactive": ("idle_grace_s", (0.0, 60.0, 300.0, 900.0, 1800.0, 3600.0)),
}
# Curves that are a policy with other knobs set for the whole curve. policy_lean is ours at
# its GPU-hour end: idle nodes stop at once (no grace, no margin) even inside a paid hour,
# which no buffer_z reaches (at its cheapest the policy keeps paid-for idle nodes: free in
# dollars, counted in GPU-hours).
CURVES: dict[str, tuple[str, dict[str, float]]] = {
    "policy_lean": ("policy", {"idle_grace_s": 0.0, "stop_margin_slots": 0,
                               "stop_window_s": 3600.0}),
}
OURS = ("policy", "policy_lean")   # the curves that must dominate the baselines'
POLICIES: dict[str, tuple[Policy, float, bool]] = {   # policy, tick, event-driven
    "policy": (decide, TICK_S, True),
    "fixed_buffer": (decide_fixed_buffer, FIXED_TICK_S, False),
    "reactive": (decide_reactive, TICK_S, True),
}


def simulate(sessions: Sequence[Session], config: Config, policy: Policy, *, name: str,
             scaling: ScalingConfig | None = None, tick_s: float = TICK_S,
             event_driven: bool = True, initial: Mapping[PoolKey, int] | None = None,
             progress: Callable[[str, float], None] | None = None,
             routes_: Sequence[Route] | None = None, until_s: float | None = None,
             spot_offers: Mapping[str, SpotOffer] | None = None, seed: int = 0
             ) -> RunResult:
    """Replay `sessions` (sorted by arrival) against one policy.

    Measures the window [0, until_s] (default: until the last session ends): GPU time and
    the lower bound inside it, waits of the sessions arriving in it. Nodes still up when
    the last session ends stop then. Spot requests are refused and spot nodes taken back
    as `spot_offers` (per provider) say, drawn from `seed`; the policy sees spot offered
    only through `scaling.spot_price_per_hour_by_provider` (see `spot_scaling`).
    """
    if not sessions:
        raise TraceError("the trace has no sessions")
    until = math.inf if until_s is None else until_s
    routes_ = routes_ or routes(sessions, config)
    lower, _ = perfect_packing(sessions, [r.home for r in routes_], config, until)
    result = RunResult(name, lower_bound_s=sum(lower.values()),
                       lower_bound_usd=lower_bound_usd(lower, config))
    sim = Sim(sessions, routes_, config, scaling or ScalingConfig.from_config(config), policy,
              result, tick_s=tick_s, event_driven=event_driven, progress=progress,
              until_s=until, spot_offers=spot_offers or {}, seed=seed)
    return sim.run(initial or {})


def spot_scaling(config: Config, scaling: ScalingConfig
                 ) -> tuple[ScalingConfig, dict[str, SpotOffer]]:
    """The spot offers of the config's providers: the simulated ones' (SIM_SPOT), and those
    with `spot = true` at their spot price (interrupted and refused as the simulated ones
    are); `scaling` with their prices (for the policy), and the offers (for the engine)."""
    offers = {p.name: SIM_SPOT.get(p.name) or SpotOffer(
        p.spot_price, SPOT_INTERRUPTIONS_PER_HOUR, SPOT_REFUSAL)
        for p in config.providers if p.name in SIM_SPOT or p.spot}
    return (replace(scaling, spot_price_per_hour_by_provider={
        p: v.price_per_hour for p, v in offers.items()}), offers)


def run_all(sessions: Sequence[Session], config: Config, *, until_s: float | None = None,
            progress: Callable[[str, float], None] | None = None, spot: bool = False,
            seed: int = 0) -> dict[str, RunResult]:
    """The policy and the three baselines over the same trace (see `simulate`), on-demand
    only; with `spot`, the policy on spot (`spot_scaling`) and, as `on_demand`, the
    same policy on-demand only (the baselines never boot spot)."""
    plain = replace(ScalingConfig.from_config(config), spot_price_per_hour_by_provider={})
    offers: dict[str, SpotOffer] = {}
    scaling = plain
    if spot:
        scaling, offers = spot_scaling(config, plain)
    routes_ = routes(sessions, config)
    _, peaks = perfect_packing(sessions, [r.home for r in routes_], config, math.inf)
    peak_nodes = {k: math.ceil(v / config.streams_per_gpu(k.model)) for k, v in peaks.items()}
    runs: list[tuple[str, Policy, float, bool, Mapping[PoolKey, int]]] = [
        *((name, p, tick, eager, {}) for name, (p, tick, eager) in POLICIES.items()),
        ("static_peak", static_fleet(peak_nodes), STATIC_TICK_S, False, peak_nodes),
    ]
    if spot:
        runs.insert(1, ("on_demand", decide, TICK_S, True, {}))
    return {name: simulate(sessions, config, policy, name=name,
                           scaling=scaling if name == "policy" else plain, tick_s=tick,
                           event_driven=eager, initial=initial, progress=progress,
                           routes_=routes_, until_s=until_s,
                           spot_offers=offers if name == "policy" else {}, seed=seed)
            for name, policy, tick, eager, initial in runs}


def sweep(sessions: Sequence[Session], config: Config, *, until_s: float | None = None,
          progress: Callable[[str, float], None] | None = None,
          knobs: Mapping[str, tuple[str, tuple[float, ...]]] | None = None
          ) -> dict[str, list[dict[str, Any]]]:
    """Each curve (a scaling policy, with CURVES' fixed knobs) over the values of its main
    knob (`knobs`, default SWEEP), on one trace: the points of its cost/wait curve (knob,
    value and the run's metrics)."""
    scaling = ScalingConfig.from_config(config)
    routes_ = routes(sessions, config)
    curves: dict[str, list[dict[str, Any]]] = {}
    for name, (knob, values) in (knobs or SWEEP).items():
        base, fixed = CURVES.get(name, (name, {}))
        policy, tick, eager = POLICIES[base]
        for value in values:
            knobbed = replace(scaling, **{k: type(getattr(scaling, k))(v)
                                          for k, v in {**fixed, knob: value}.items()})
            run = simulate(sessions, config, policy, name=f"{name} {knob}={value:g}",
                           scaling=knobbed, tick_s=tick, event_driven=eager,
                           progress=progress, routes_=routes_, until_s=until_s)
            curves.setdefault(name, []).append({"knob": knob, "value": value, **run.metrics()})
    return curves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voicectl simulate",
        description="Replay a trace against the autoscaler and three baselines.")
    parser.add_argument("--trace", type=Path, help="CSV: arrival_s, duration_s, model, "
                        "and region or lat and lon (default: the built-in diurnal day)")
    parser.add_argument("--bursty", action="store_true", help="a bursty, heavy-tailed "
                        "trace instead: 10-minute bursts at 4x, lognormal sessions (median "
                        "6 min, at most 3 h), Zipf model popularity, regional peaks")
    parser.add_argument("--spread", action="store_true", help="--bursty: users at the "
                        "world's big cities (lat/lon, each with its own evening and bursts) "
                        "instead of around the regions")
    parser.add_argument("--peak", type=float, default=600.0,
                        help="--bursty: peak concurrent sessions scale (default 600)")
    parser.add_argument("--hours", type=float, default=24.0, help="generated trace length")
    parser.add_argument("--seed", type=int, default=0, help="generated trace seed")
    parser.add_argument("--write-trace", type=Path, help="also write the trace as a CSV")
    parser.add_argument("--config", type=Path, help="TOML config (default: default.toml "
                        "regions and models on simulated cloud providers)")
    parser.add_argument("--spot", action="store_true", help="the simulated providers offer "
                        "spot nodes (35 %% of the price, interrupted now and then with a "
                        "2-minute notice, sometimes refused); the policy boots up to its "
                        "spot_share of each pool on spot, and runs again on-demand only "
                        "(cost_vs_on_demand)")
    parser.add_argument("--sweep", action="store_true", help="run each scaling policy over "
                        "a range of its main knob and draw cost against waits (the frontier)")
    parser.add_argument("--chart", type=Path, default=None,
                        help="PNG (default: simulation.png, or frontier.png with --sweep)")
    parser.add_argument("--no-chart", action="store_true", help="do not draw the chart")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    if not 0 < args.hours <= 24 * 31:
        parser.error(f"--hours {args.hours} is out of range; expected 0 < H <= 744")
    if args.trace and args.bursty:
        parser.error("--trace and --bursty both name a trace; pass one")
    if args.spread and not args.bursty:
        parser.error("--spread shapes the bursty trace; pass --bursty with it")
    path = args.chart or Path("frontier.png" if args.sweep else "simulation.png")

    began = time.monotonic()
    last = [began]

    def progress(name: str, now: float) -> None:
        wall = time.monotonic()
        if wall - began > 1.0 and wall - last[0] > 1.0:
            last[0] = wall
            print(f"simulate: {name} at {now / 3600:.1f} h of virtual time "
                  f"({wall - began:.0f} s)", file=sys.stderr, flush=True)

    try:
        if not args.no_chart:
            require_charts()   # before the run, not after minutes of it
        config = sim_config(args.config)
        if args.trace:
            sessions = load_trace(args.trace, config)
        elif args.bursty:
            sessions = bursty_trace(config, args.hours, args.seed, args.peak, args.spread)
        else:
            sessions = builtin_trace(config, args.hours, args.seed)
        if args.write_trace:
            write_trace(sessions, args.write_trace)
        until_s = None if args.trace else args.hours * 3600.0
        if args.sweep:
            curves = sweep(sessions, config, until_s=until_s, progress=progress)
            if not args.no_chart:
                what = (f"trace {args.trace}" if args.trace else
                        f"{'bursty' if args.bursty else 'built-in diurnal'} day, --seed "
                        f"{args.seed}, {args.hours:g} h")
                frontier_chart(curves, path, f"Cost against waits ({what}, "
                                             f"{len(sessions)} sessions)")
            out: dict[str, Any] = {"frontier": curves}
            text = "\n".join(f"{name:14} {p['knob']}={p['value']:<6g} cost {p['cost_ratio']:.3f}"
                             f" (${p['cost_usd_ratio']:.3f})  waited {p['wait_fraction']:.2%}"
                             f"  max {p['wait_s_max']:.0f} s"
                             for name, pts in curves.items() for p in pts)
            for key, label in (("cost_ratio", "GPU-hours"), ("cost_usd_ratio", "dollars")):
                gaps = undominated(curves, OURS, key)
                text += (f"\nin {label}, not dominated by {' or '.join(OURS)}: "
                         + (", ".join(f"{n} {v:g}" for n, v in gaps) or "none"))
        else:
            results = run_all(sessions, config, until_s=until_s, progress=progress,
                              spot=args.spot, seed=args.seed)
            if not args.no_chart:
                chart(results, path)
            out, text = report(results), table(results)
    except VoiceError as e:
        print(f"voicectl simulate: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"voicectl simulate: cannot write the chart to {str(path)!r}: {e}; "
              "pass --chart PATH in a writable folder or --no-chart", file=sys.stderr)
        return 2
    if not args.no_chart:
        print(f"simulate: chart written to {path}", file=sys.stderr)
    if time.monotonic() - began > 1.0:
        print(f"simulate: done in {time.monotonic() - began:.1f} s", file=sys.stderr)
    print(json.dumps(out) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
