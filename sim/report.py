"""The simulator's output: the JSON report, the table, and the two charts.

matplotlib is an optional extra (`pip install -e '.[charts]'`, part of `dev`); without it
`chart` and `frontier_chart` raise `ChartUnavailable`, whose message says how to install it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.errors import VoiceError
from sim.metrics import RunResult

__all__ = ["ChartUnavailable", "chart", "frontier_chart", "report", "require_charts", "table",
           "undominated"]

INSTALL_CHARTS = "pip install -e '.[charts]'  (or: make .venv/.installed, which installs dev)"


class ChartUnavailable(VoiceError):
    """A chart was asked for but matplotlib, an optional extra, is not installed."""


def report(results: Mapping[str, RunResult]) -> dict[str, Any]:
    """The policy's metrics, the baselines' under `baselines`; with an `on_demand` run
    (`--spot`), its metrics under `on_demand` and `cost_vs_on_demand`: the policy's dollars
    over that run's (same trace, same policy, no spot)."""
    out = results["policy"].metrics()
    on_demand = results.get("on_demand")
    if on_demand is not None:
        out["on_demand"] = on_demand.metrics()
        out["cost_vs_on_demand"] = (round(results["policy"].cost_usd / on_demand.cost_usd, 4)
                                    if on_demand.cost_usd else None)
    out["baselines"] = {name: r.metrics() for name, r in results.items()
                        if name not in ("policy", "on_demand")}
    return out


def table(results: Mapping[str, RunResult]) -> str:
    rows = [("GPU-hours", "gpu_hours", "{:.2f}"),
            ("lower bound GPU-hours", "lower_bound_gpu_hours", "{:.2f}"),
            ("ratio to lower bound", "cost_ratio", "{:.3f}"),
            ("users who waited", "wait_fraction", "{:.2%}"),
            ("wait p50 s", "wait_s_p50", "{:.1f}"), ("wait p95 s", "wait_s_p95", "{:.1f}"),
            ("wait p99 s", "wait_s_p99", "{:.1f}"), ("wait max s", "wait_s_max", "{:.1f}"),
            ("billed GPU-hours", "billed_gpu_hours", "{:.2f}"),
            ("GPU cost $", "cost_usd", "{:,.2f}"),
            ("cost $ / lower bound $", "cost_usd_ratio", "{:.3f}"),
            ("node boots", "boots", "{}"), ("model reloads", "retargets", "{}"),
            ("planned moves", "moves", "{}"),
            ("spot boots", "spot_boots", "{}"), ("spot refusals", "spot_refusals", "{}"),
            ("spot interruptions", "interruptions", "{}"),
            ("users on them", "interrupted_sessions", "{}"),
            ("moved on notice", "moved_users", "{}"),
            ("no audio over 1 s", "users_without_audio_over_1s", "{}")]
    metrics = {name: r.metrics() for name, r in results.items()}
    lines = [f"{'':24}" + "".join(f"{name:>14}" for name in metrics)]
    for label, key, fmt in rows:
        lines.append(f"{label:24}" + "".join(
            f"{fmt.format(m[key]) if m[key] is not None else '-':>14}" for m in metrics.values()))
    sessions = next(iter(metrics.values()))["sessions"]
    lines.append(f"{sessions} sessions measured")
    if "on_demand" in results and results["on_demand"].cost_usd:
        ratio = results["policy"].cost_usd / results["on_demand"].cost_usd
        lines.append(f"policy with spot / on-demand only, dollars: {ratio:.3f}")
    return "\n".join(lines)


def undominated(curves: Mapping[str, Sequence[Mapping[str, Any]]], ours: Sequence[str],
                cost: str = "cost_ratio") -> list[tuple[str, float]]:
    """The points of the other curves (name, knob value) where `ours` do not dominate: no
    setting of ours, and no point between two settings of one of ours adjacent in cost
    (running each for part of the time reaches it), costs at most as much (`cost`) with at
    most as many users waiting."""
    def best_wait(at: float) -> float:
        best = math.inf
        for name in ours:
            points = sorted(curves.get(name, ()), key=lambda p: float(p[cost]))
            best = min([best, *(p["wait_fraction"] for p in points if p[cost] <= at)])
            for a, b in zip(points, points[1:], strict=False):
                if a[cost] <= at < b[cost]:
                    share = (at - a[cost]) / (b[cost] - a[cost])
                    best = min(best, a["wait_fraction"]
                               + share * (b["wait_fraction"] - a["wait_fraction"]))
        return best
    return [(name, float(p["value"])) for name, points in curves.items() if name not in ours
            for p in points if best_wait(float(p[cost])) > p["wait_fraction"]]


def require_charts() -> None:
    """Raise ChartUnavailable now if a chart could not be drawn later."""
    _pyplot()


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ChartUnavailable("drawing a chart needs matplotlib, an optional extra that is "
                               f"not installed; install it with {INSTALL_CHARTS}, "
                               "or pass --no-chart") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def chart(results: Mapping[str, RunResult], path: Path) -> None:
    """Demand, ready slots and waiting users over time: the policy against the fixed buffer."""
    plt = _pyplot()
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


def frontier_chart(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: Path,
                   title: str) -> None:
    """The share of users who waited against cost, one curve per policy, one point per
    setting of its knob (labelled): cost as GPU-hours over the lower bound (left) and as
    billed dollars over the lower bound's (right; billing-aware stops show here)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for ax, key, label in ((axes[0], "cost_ratio", "GPU-hours / lower bound"),
                           (axes[1], "cost_usd_ratio", "billed dollars / lower bound dollars")):
        for name, points in curves.items():
            pts = sorted(points, key=lambda p: p[key])
            ax.plot([p[key] for p in pts], [100 * p["wait_fraction"] for p in pts],
                    marker="o", lw=1.3, label=f"{name} ({pts[0]['knob']})")
            for p in pts:
                ax.annotate(f"{p['value']:g}", (p[key], 100 * p["wait_fraction"]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("users who waited (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
