"""The simulator with spot: notices, moves make-before-break, audio lost only when the
machine goes, refusals that boot on-demand, and the cost against on-demand only (issue 21)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from test_simulate import BASELINES, run_main

from common.config import Config, Model, Provider, Region
from provisioner.inputs import TICK_S
from provisioner.policy import (
    Decisions,
    Policy,
    PoolKey,
    ScalingConfig,
    Snapshot,
    decide,
)
from sim.engine import Sim, routes
from sim.metrics import RunResult
from sim.run import Session, bursty_trace, sim_config, simulate, spot_scaling
from sim.spot import SpotMarket, SpotOffer

ONE_REGION = Config(regions=(Region("a", "cloud", 37.8, -122.4),),
                    providers=(Provider("cloud", Decimal("1.00"), billing_increment_s=1,
                                        boot_s=90.0),),
                    models=(Model("miku", Path("models/miku")),))
MIKU = PoolKey("miku", "1", "a")


def scripted(*steps: tuple[float, Decisions]) -> Policy:
    """A policy that answers each step's decisions once, at its time or the first
    evaluation after it, and nothing otherwise."""
    pending = list(steps)

    def policy(snapshot: Snapshot, now: float, cfg: ScalingConfig) -> Decisions:
        return pending.pop(0)[1] if pending and now >= pending[0][0] else Decisions()
    return policy


class NoticeAt(SpotMarket):
    """The test seam: every spot node is told of its interruption `notice_s` after its
    request; nothing is refused."""

    def __init__(self, notice_s: float) -> None:
        super().__init__({}, 0)
        self.notice_s = notice_s

    def refused(self, provider: str) -> bool:
        return False

    def notice_in_s(self, provider: str) -> float | None:
        return self.notice_s


def run_spot(users: list[Session], policy: Policy, market: SpotMarket) -> RunResult:
    """One run on ONE_REGION (boot 90 s + load 10 s; $1 an hour on-demand, $0.35 spot)."""
    scaling = replace(ScalingConfig.from_config(ONE_REGION),
                      spot_price_per_hour_by_provider={"cloud": Decimal("0.35")})
    sim = Sim(users, routes(users, ONE_REGION), ONE_REGION, scaling, policy, RunResult("t"),
              tick_s=TICK_S, event_driven=True, progress=None, until_s=math.inf,
              spot_offers={}, seed=0)
    sim.market = market
    return sim.run({})


def test_a_notice_moves_the_users_make_before_break_and_gives_the_node_back() -> None:
    """A spot node serves four users; at its notice (t=500) an on-demand node has room:
    all four move at once (no gap: nobody waits, nobody loses audio) and the spot node
    stops then, billed 500 s at the spot price."""
    users = [Session(110.0 + i, 1000.0, "miku", 37.8, -122.4) for i in range(4)]
    policy = scripted((0.0, Decisions(spot=(MIKU,))), (200.0, Decisions(boot=(MIKU,))))
    result = run_spot(users, policy, NoticeAt(500.0))
    assert (result.interruptions, result.interrupted_sessions) == (1, 4)
    assert (result.moved_users, result.users_without_audio_over_1s) == (4, 0)
    assert result.waits == [0.0] * 4
    assert result.spot_gpu_s == pytest.approx(500.0)
    assert result.gpu_s == pytest.approx(500.0 + 1113.0 - 200.0)   # sessions end on time
    assert result.cost_usd == pytest.approx(500 * 0.35 / 3600 + 913 / 3600)


def test_users_move_as_slots_free_first_and_the_rest_lose_audio_when_the_node_goes() -> None:
    """No room at the notice (t=500): a slot freed at 550 goes to a user of the noticed node
    before the user waiting since 510; the three still on it when the machine goes (620)
    lost audio, and resume first in line on the node ready at 800, before the waiting user,
    who found no slot left there (capacity 4) and waits for the next."""
    on_demand = [Session(100.0 + i, 450.0 if i == 0 else 3000.0, "miku", 37.8, -122.4)
                 for i in range(4)]
    on_spot = [Session(110.0 + i, 2000.0, "miku", 37.8, -122.4) for i in range(4)]
    late = [Session(510.0 + i, 1000.0, "miku", 37.8, -122.4) for i in range(2)]
    policy = scripted((0.0, Decisions(boot=(MIKU,), spot=(MIKU,))),
                      (700.0, Decisions(boot=(MIKU,))), (900.0, Decisions(boot=(MIKU,))))
    result = run_spot(on_demand + on_spot + late, policy, NoticeAt(500.0))
    assert (result.moved_users, result.users_without_audio_over_1s) == (1, 3)
    # The first late user takes the last slot at 800 (after the three resumed); the other
    # waits for the node booted at 900.
    assert result.waits[-2:] == [pytest.approx(290.0), pytest.approx(489.0)]


def test_a_refused_spot_request_boots_on_demand_in_the_same_step() -> None:
    users = [Session(110.0, 600.0, "miku", 37.8, -122.4)]
    market = SpotMarket({"cloud": SpotOffer(Decimal("0.35"), 60.0, refusal=1.0)}, seed=0)
    result = run_spot(users, scripted((0.0, Decisions(spot=(MIKU,)))), market)
    assert (result.spot_refusals, result.spot_boots, result.boots) == (1, 0, 1)
    assert result.interruptions == 0 and result.waits == [0.0]


def test_spot_at_the_simulators_rates_costs_less_and_nobody_loses_audio() -> None:
    """The policy on spot (the simulator's offers: 35 % of the price, interruptions and
    refusals) against itself on-demand only; and with a node interrupted every ten minutes
    on average, users still move before their node goes."""
    config = sim_config()
    sessions = bursty_trace(config, hours=0.5, seed=2, peak_sessions=120)
    scaling, offers = spot_scaling(config, ScalingConfig.from_config(config))
    assert offers and scaling.spot_price_per_hour_by_provider
    plain = simulate(sessions, config, decide, name="plain", until_s=1800.0)
    spot = simulate(sessions, config, decide, name="spot", scaling=scaling,
                    spot_offers=offers, until_s=1800.0)
    assert spot.spot_boots > 0 and spot.cost_usd < 0.7 * plain.cost_usd
    assert plain.spot_boots == plain.interruptions == 0
    often = {p: replace(o, interruptions_per_hour=6.0) for p, o in offers.items()}
    stormy = simulate(sessions, config, decide, name="spot", scaling=scaling,
                      spot_offers=often, until_s=1800.0)
    assert stormy.interruptions > 10 and stormy.moved_users > 0
    assert stormy.users_without_audio_over_1s == 0
    assert len(stormy.waits) == len(plain.waits)                    # every session served


def test_simulate_spot_reports_the_cost_against_on_demand_only(tmp_path: Path) -> None:
    out = json.loads(run_main(["--bursty", "--hours", "0.5", "--peak", "150", "--seed", "2",
                               "--spot", "--json", "--no-chart"]).splitlines()[-1])
    assert {"cost_vs_on_demand", "on_demand", "interruptions", "moved_users",
            "users_without_audio_over_1s", "spot_refusals"} <= set(out)
    assert out["cost_vs_on_demand"] == pytest.approx(
        out["cost_usd"] / out["on_demand"]["cost_usd"], abs=1e-3)
    assert out["on_demand"]["spot_boots"] == 0 and set(out["baselines"]) == BASELINES
