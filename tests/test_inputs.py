"""The autoscaler's inputs (provisioner/inputs.py): one builder for the control plane and
the simulator. Pure tables, then the Redis side against a real redis-server."""

from __future__ import annotations

import math

import pytest

from common.config import Config
from provisioner import catalog, fleet
from provisioner.inputs import ASSUMED_SESSION_S, Arrivals, policy_inputs
from provisioner.policy import FAST_TAU_SHARE, NodeSnap, PoolKey
from provisioner.state import State, pool_id
from provisioner.states import NodeState

WEST = PoolKey("miku", "1", "us-west")


def test_arrivals_count_and_decay_on_two_time_scales() -> None:
    a = Arrivals().counted(100.0, 600.0).counted(100.0, 600.0)
    assert a == Arrivals(2 / 600, 2 / 60, 100.0)
    slow, fast = a.decayed(160.0, 600.0)
    assert slow == pytest.approx(2 / 600 * math.exp(-0.1))
    assert fast == pytest.approx(2 / 60 * math.exp(-1.0))
    assert Arrivals().decayed(1e9, 600.0) == (0.0, 0.0)


def test_policy_inputs_retired_nodes_are_stopped_and_sessions_assumed() -> None:
    up = NodeSnap("a", "miku", "1", "us-west", "p", NodeState.READY, sessions=2)
    going = NodeSnap("b", "miku", "1", "us-west", "p", NodeState.READY)
    snap = policy_inputs([up, going], [WEST], {WEST: 3}, {WEST: Arrivals(0.1, 0.5, 0.0)},
                         now=60.0, tau_s=600.0, retired={"b"})
    assert [n.state for n in snap.nodes] == [NodeState.READY, NodeState.STOPPED]
    (d,) = snap.demand
    assert d.waiting == 3 and d.mean_session_s == ASSUMED_SESSION_S
    assert d.arrival_rate_per_s == pytest.approx(0.1 * math.exp(-0.1))
    assert d.arrival_rate_fast_per_s == pytest.approx(0.5 * math.exp(-60 / (600 * FAST_TAU_SHARE)))


def test_arrive_script_keeps_both_averages_as_python_counts_them(state: State) -> None:
    pool = pool_id(WEST.model, WEST.version, WEST.region)
    expected = Arrivals()
    for t in (10.0, 12.5, 40.0):
        state.arrive(pool, t, 600.0)
        expected = expected.counted(t, 600.0)
    got = state.arrivals([pool, "teto|1|us-west"])
    assert got[pool].at == expected.at
    assert got[pool].rate == pytest.approx(expected.rate)
    assert got[pool].fast == pytest.approx(expected.fast)
    assert Arrivals(*got["teto|1|us-west"]) == Arrivals()


def test_fleet_snapshot_is_policy_inputs_of_the_live_state(state: State, cfg: Config) -> None:
    now = 1000.0
    catalog.seed(state, cfg)   # the config's models: their pools are the live ones
    for node_id in ("n-a", "n-b"):
        state.add_node({"id": node_id, "home": "us-west", "model": "miku", "version": "1",
                        "state": NodeState.REQUESTED.value, "requested_at": now,
                        "capacity": 4, "region": "us-west", "provider": "local",
                        "price_per_hour": "1.10", "eta_ready": now + 11, "deadline": now + 60})
    assert state.retire("n-b", now)
    state.arrive("miku|1|us-west", now - 5, cfg.arrival_tau_s)
    snap, records = fleet.snapshot(state, cfg, now)
    assert {r.id for r in records} == {"n-a", "n-b"}
    by_id = {n.id: n for n in snap.nodes}
    assert by_id["n-a"].state is NodeState.REQUESTED and by_id["n-b"].state is NodeState.STOPPED
    demand = {d.key: d for d in snap.demand}
    west = demand[WEST]
    expected = Arrivals().counted(now - 5, cfg.arrival_tau_s).decayed(now, cfg.arrival_tau_s)
    assert (west.arrival_rate_per_s, west.arrival_rate_fast_per_s) == pytest.approx(expected)
    assert all(d.mean_session_s == ASSUMED_SESSION_S for d in snap.demand)
