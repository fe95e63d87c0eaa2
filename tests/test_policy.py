"""Table tests of the pure autoscaler (provisioner/policy.py): no I/O, no clock."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.config import Config, Model, Provider, Region, load_config
from provisioner.placement import home_region
from provisioner.policy import (
    Decisions,
    NodeSnap,
    PoolDemand,
    PoolKey,
    ScalingConfig,
    Snapshot,
    decide,
    decide_fixed_buffer,
    decide_reactive,
    static_fleet,
    warm_buffer_slots,
)
from provisioner.states import NodeState

READY, DRAINING = NodeState.READY, NodeState.DRAINING
NOW = 100_000.0
CFG = ScalingConfig(
    capacity=4, load_s=10.0,
    boot_s_by_provider={"minute": 90.0, "hour": 90.0, "pricey": 90.0},
    billing_increment_s_by_provider={"minute": 60.0, "hour": 3600.0, "pricey": 60.0},
    price_per_hour_by_provider={"minute": Decimal("1.10"), "hour": Decimal("0.90"),
                                "pricey": Decimal("3.00")},
    region_provider={"west": "minute", "east": "hour"},
    idle_grace_s=60.0, stop_window_s=60.0, buffer_z=2.2, reaction_s=5.0, stop_margin_slots=2,
)


DEFAULT = load_config(environ={})   # the shipped regions (common/default.toml)
FIT_ONLY = replace(CFG, stop_margin_slots=0)   # consolidation: whether users fit, alone

def key(model: str = "miku", region: str = "west", version: str = "1") -> PoolKey:
    return PoolKey(model, version, region)


def node(node_id: str, *, model: str = "miku", region: str = "west", version: str = "1",
         state: NodeState = READY, sessions: int = 0, provider: str | None = None,
         age_s: float = 1000.0, idle_s: float | None = 1000.0) -> NodeSnap:
    """A node requested `age_s` ago; ready and idle for `idle_s` when it has no sessions."""
    coming = state.coming
    return NodeSnap(
        id=node_id, model=model, version=version, region=region,
        provider=provider or CFG.region_provider[region], state=state, sessions=sessions,
        capacity=4, requested_at=NOW - age_s, ready_at=None if coming else NOW - age_s + 100,
        idle_since=NOW - idle_s if idle_s is not None and sessions == 0 and not coming
        else None,
        eta_ready=NOW + 50 if coming else None)


def demand(k: PoolKey, waiting: int = 0, rate: float = 0.0) -> PoolDemand:
    return PoolDemand(k, waiting=waiting, arrival_rate_per_s=rate, mean_session_s=600.0)


def snap(*nodes: NodeSnap, pools: tuple[PoolDemand, ...] = ()) -> Snapshot:
    return Snapshot(tuple(nodes), pools or (demand(key()),))


def apply(snapshot: Snapshot, d: Decisions, now: float) -> Snapshot:
    """What the adapter does: boots become requested nodes, retargets reload, stops vanish."""
    nodes = {n.id: n for n in snapshot.nodes}
    for node_id, k in d.retarget:
        nodes[node_id] = replace(nodes[node_id], model=k.model, version=k.version,
                                 state=NodeState.LOADING, ready_at=None, idle_since=None,
                                 eta_ready=now + CFG.load_s)
    for node_id in d.stop:
        del nodes[node_id]
    for i, k in enumerate(d.boot):
        new_id = f"new{len(nodes)}-{i}"
        nodes[new_id] = NodeSnap(new_id, k.model, k.version, k.region,
                                 CFG.region_provider[k.region], NodeState.REQUESTED,
                                 requested_at=now, eta_ready=now + CFG.lead_s(k.region))
    return Snapshot(tuple(nodes.values()), snapshot.demand)


@pytest.mark.parametrize(("waiting", "boots"), [(0, 0), (1, 1), (4, 1), (5, 2), (9, 3)])
def test_waiting_users_boot_enough_nodes(waiting: int, boots: int) -> None:
    d = decide(snap(pools=(demand(key(), waiting=waiting),)), NOW, CFG)
    assert d.boot == (key(),) * boots
    assert d.stop == () and d.retarget == ()


@pytest.mark.parametrize(("waiting", "boots"), [(1, 1), (2, 1), (3, 2), (9, 5)])
def test_a_model_with_two_streams_per_gpu_boots_twice_the_nodes(waiting: int,
                                                                  boots: int) -> None:
    heavy = replace(CFG, capacity_by_model={"heavy": 2})
    k = key("heavy")
    assert decide(snap(pools=(demand(k, waiting=waiting),)), NOW, heavy).boot == (k,) * boots


def test_waiting_users_count_against_free_slots_of_coming_nodes() -> None:
    coming = node("c1", state=NodeState.BOOTING, age_s=10)
    assert decide(snap(coming, pools=(demand(key(), waiting=4),)), NOW, CFG).boot == ()
    assert decide(snap(coming, pools=(demand(key(), waiting=6),)), NOW, CFG).boot == (key(),)


@pytest.mark.parametrize(("streaming", "rate", "lead_s", "slots"), [
    (0, 0.0, 105.0, 0),      # nobody arrives: no buffer
    (0, 0.01, 105.0, 4),     # a = 1.05: ceil(1.05 + 2.2 * sqrt(1.05))
    (0, 0.1, 105.0, 18),     # a = 10.5
    (60, 0.1, 105.0, 11),    # as many sessions end as arrive: only the noise is left
    (0, 0.1, 15.0, 5),       # a reload's lead time needs far less
    (30, 0.0, 105.0, 0),     # sessions only end
])
def test_warm_buffer_slots(streaming: int, rate: float, lead_s: float, slots: int) -> None:
    assert warm_buffer_slots(streaming, rate, 600.0, lead_s, 2.2) == slots


def test_buffer_grows_with_arrival_rate() -> None:
    rates = [0.0, 0.005, 0.02, 0.1, 0.5]
    boots = [len(decide(snap(pools=(demand(key(), rate=r),)), NOW, CFG).boot) for r in rates]
    assert boots[0] == 0 and boots[1] >= 1
    assert boots == sorted(boots) and boots[-1] > boots[2] > boots[1]


def test_region_pools_the_buffer_of_its_models() -> None:
    """Two models in one region share idle buffer nodes (a reload away): fewer free slots
    than two separate buffers for a VM boot each."""
    pools = (demand(key("miku"), rate=0.1), demand(key("teto"), rate=0.1))
    d = decide(snap(pools=pools), NOW, CFG)
    lead_s = CFG.reaction_s + CFG.lead_s("west")
    pooled = warm_buffer_slots(0, 0.2, 600.0, lead_s, CFG.buffer_z)
    separate = 2 * warm_buffer_slots(0, 0.1, 600.0, lead_s, CFG.buffer_z)
    assert len(d.boot) * 4 >= pooled
    assert len(d.boot) * 4 < separate
    assert {k.model for k in d.boot} == {"miku", "teto"}


def test_min_nodes_booted_and_kept() -> None:
    cfg = replace(CFG, min_nodes_by_model={"miku": 2})
    assert decide(snap(), NOW, cfg).boot == (key(), key())
    idle = [node(f"n{i}") for i in range(3)]
    d = decide(snap(*idle), NOW, cfg)
    assert len(d.stop) == 1 and d.boot == ()


def test_max_nodes_caps_boots() -> None:
    cfg = replace(CFG, max_nodes_by_model={"miku": 3})
    assert decide(snap(pools=(demand(key(), waiting=100, rate=1.0),)), NOW, cfg).boot == (
        key(),) * 3
    full = [node(f"n{i}", sessions=4) for i in range(2)]
    d = decide(snap(*full, pools=(demand(key(), waiting=100, rate=1.0),)), NOW, cfg)
    assert d.boot == (key(),)


def test_the_default_cap_leaves_room_for_a_busy_pool() -> None:
    """The default cap per pool is a runaway guard, not a plan: the bursty day's busiest
    pools peak near 250 sessions, so 240 users waiting boot a node for every four."""
    d = decide(snap(pools=(demand(key(), waiting=240),)), NOW, CFG)
    assert len(d.boot) == 60


def test_never_stops_a_node_with_sessions() -> None:
    cfg = replace(CFG, max_nodes_by_model={"miku": 1})       # over the maximum, even
    busy = [node(f"n{i}", sessions=1) for i in range(5)]
    draining = node("old", version="0", state=DRAINING, sessions=2)
    for policy in (decide, decide_fixed_buffer, decide_reactive):
        assert policy(snap(*busy, draining), NOW, cfg).stop == ()


@pytest.mark.parametrize(("idle_s", "stopped"), [(5, False), (59, False), (60, True),
                                                 (600, True)])
def test_idle_node_stops_only_after_grace(idle_s: float, stopped: bool) -> None:
    d = decide(snap(node("n1", idle_s=idle_s)), NOW, CFG)
    assert d.stop == (("n1",) if stopped else ())


@pytest.mark.parametrize(("age_s", "stopped"), [
    (1800, False),        # half an hour paid and left: keep it as free buffer
    (3500, False),        # 100 s left
    (3560, True),         # 40 s left: inside the 60 s window
    (3600, True),         # exactly at the boundary
    (3700, False),        # the second hour just started
    (7190, True),         # near the end of the second hour
])
def test_hourly_billed_node_stops_near_the_end_of_its_paid_hour(age_s: float,
                                                                stopped: bool) -> None:
    idle = node("n1", region="east", age_s=age_s, idle_s=600)
    d = decide(snap(idle, pools=(demand(key(region="east")),)), NOW, CFG)
    assert d.stop == (("n1",) if stopped else ())


@pytest.mark.parametrize("age_s", [61, 95, 125, 150, 3601, 3659])
def test_minute_billed_node_stops_right_after_grace(age_s: float) -> None:
    d = decide(snap(node("n1", age_s=age_s, idle_s=CFG.idle_grace_s)), NOW, CFG)
    assert d.stop == ("n1",)


def test_most_expensive_idle_node_stops_first() -> None:
    cfg = replace(CFG, min_nodes_by_model={"miku": 1})
    cheap, pricey = node("a-cheap"), node("b-pricey", provider="pricey")
    assert decide(snap(cheap, pricey), NOW, cfg).stop == ("b-pricey",)
    assert decide(snap(pricey, cheap), NOW, cfg).stop == ("b-pricey",)


def test_idle_node_of_another_model_is_retargeted_instead_of_booting() -> None:
    pools = (demand(key("miku"), waiting=2), demand(key("teto")))
    d = decide(snap(node("t1", model="teto"), pools=pools), NOW, CFG)
    assert d.retarget == (("t1", key("miku")),)
    assert d.boot == () and d.stop == ()


def test_idle_node_still_needed_by_its_pool_is_not_retargeted() -> None:
    pools = (demand(key("miku"), waiting=2), demand(key("teto"), rate=0.2))
    d = decide(snap(node("t1", model="teto"), pools=pools), NOW, CFG)
    assert d.retarget == ()
    assert key("miku") in d.boot


def test_no_retarget_across_regions_or_when_booting_is_as_fast() -> None:
    pools = (demand(key("miku"), waiting=2), demand(key("teto", region="east")))
    d = decide(snap(node("t1", model="teto", region="east"), pools=pools), NOW, CFG)
    assert d.retarget == () and d.boot == (key("miku"),)
    instant = replace(CFG, boot_s_by_provider={"minute": 0.0})   # boot + load == load
    pools = (demand(key("miku"), waiting=2), demand(key("teto")))
    d = decide(snap(node("t1", model="teto"), pools=pools), NOW, instant)
    assert d.retarget == () and d.boot == (key("miku"),)


def test_draining_nodes_are_not_capacity_and_never_retargeted() -> None:
    live = key("miku", version="2")
    old_with_room = node("old1", version="1", state=DRAINING, sessions=1)
    old_idle = node("old2", version="1", state=DRAINING)
    pools = (demand(live, waiting=1), demand(key("teto"), waiting=1))
    d = decide(snap(old_with_room, old_idle, pools=pools), NOW, CFG)
    assert sorted(d.boot) == sorted([live, key("teto")])
    assert d.retarget == () and d.stop == ()


def test_stopped_and_dead_nodes_are_ignored() -> None:
    gone = [node("s", state=NodeState.STOPPED), node("d", state=NodeState.DEAD, sessions=4)]
    d = decide(snap(*gone, pools=(demand(key(), waiting=1),)), NOW, CFG)
    assert d == Decisions(boot=(key(),))


def test_coming_nodes_count_so_repeated_ticks_boot_nothing_more() -> None:
    pools = (demand(key("miku"), waiting=6, rate=0.1), demand(key("teto")),
             demand(key("miku", region="east"), rate=0.02))
    first = snap(node("t1", model="teto"), node("m1", sessions=4), pools=pools)
    d1 = decide(first, NOW, CFG)
    assert d1.boot and d1.retarget                   # reuses the idle teto node, boots more
    assert decide(first, NOW, CFG) == d1             # pure: the same snapshot, the same answer
    second = apply(first, d1, NOW)
    for later in (NOW, NOW + 5, NOW + 30):
        d2 = decide(second, later, CFG)
        assert d2.boot == () and d2.retarget == (), later


def test_fixed_buffer_baseline_keeps_one_free_node_per_pool() -> None:
    pools = (demand(key("miku")), demand(key("teto")))
    assert decide_fixed_buffer(snap(pools=pools), NOW, CFG).boot == (key("miku"), key("teto"))
    one_busy = node("n1", sessions=1)
    assert decide_fixed_buffer(snap(one_busy), NOW, CFG).boot == (key(),)
    just_idle = [node("n1", idle_s=1), node("n2", idle_s=1)]
    assert len(decide_fixed_buffer(snap(*just_idle), NOW, CFG).stop) == 1


def test_reactive_baseline_boots_for_waiting_users_only() -> None:
    d = decide_reactive(snap(pools=(demand(key(), waiting=5, rate=1.0),)), NOW, CFG)
    assert d.boot == (key(), key())
    assert decide_reactive(snap(node("n1", idle_s=30)), NOW, CFG).stop == ()
    assert decide_reactive(snap(node("n1", idle_s=60)), NOW, CFG).stop == ("n1",)


def test_static_fleet_boots_once_and_never_stops() -> None:
    policy = static_fleet({key(): 2})
    assert policy(snap(), NOW, CFG).boot == (key(), key())
    assert policy(snap(node("n1"), node("n2", state=NodeState.BOOTING)), NOW, CFG) == Decisions()


def test_scaling_config_from_app_config() -> None:
    config = Config(
        regions=(Region("west", "cloud", 37.8, -122.4),),
        providers=(Provider("cloud", Decimal("1.10"), billing_increment_s=60, boot_s=90.0),),
        models=(Model("miku", Path("models/miku")), Model("heavy", Path("x"), 2)),
        model_load_s=12.0, idle_grace_s=30.0)
    cfg = ScalingConfig.from_config(config, buffer_z=1.0)
    assert cfg.lead_s("west") == 102.0 and cfg.idle_grace_s == 30.0 and cfg.buffer_z == 1.0
    assert cfg.capacity_of("heavy") == 2 and cfg.capacity_of("miku") == 4
    assert cfg.price("cloud") == Decimal("1.10")
    assert cfg.billing_increment_s_by_provider["cloud"] == 60.0


def fast(k: PoolKey, slow: float, fast_rate: float, waiting: int = 0) -> PoolDemand:
    return PoolDemand(k, waiting=waiting, arrival_rate_per_s=slow, mean_session_s=600.0,
                      arrival_rate_fast_per_s=fast_rate)


def test_a_rising_fast_average_plans_for_the_burst_at_once() -> None:
    """The minute-scale average far above the ten-minute one: size for the burst now."""
    calm = decide(snap(pools=(fast(key(), 0.05, 0.05),)), NOW, CFG)
    burst = decide(snap(pools=(fast(key(), 0.05, 0.4),)), NOW, CFG)
    lead_s = CFG.reaction_s + CFG.lead_s("west")
    assert len(burst.boot) * 4 >= warm_buffer_slots(0, 0.4, 600.0, lead_s, CFG.buffer_z)
    assert len(burst.boot) > len(calm.boot)


@pytest.mark.parametrize("fast_rate", [0.0, 0.03, 0.08])
def test_noise_or_a_falling_fast_average_changes_nothing(fast_rate: float) -> None:
    """Within two standard errors of the slow average (a Poisson rate of 0.08/s averaged
    over 60 s: 0.052), or below it (a burst over), the slow average alone sizes the buffer;
    so it does after a single arrival (below)."""
    slow_only = decide(snap(pools=(demand(key(), rate=0.05),)), NOW, CFG)
    assert decide(snap(pools=(fast(key(), 0.05, fast_rate),)), NOW, CFG) == slow_only
    # One user after a quiet spell: 1/600 and 1/60 per second; 2 SE at 1/60 per s = 0.024.
    assert decide(snap(pools=(fast(key(), 1 / 600, 1 / 60),)), NOW, CFG) == decide(
        snap(pools=(demand(key(), rate=1 / 600),)), NOW, CFG)


def test_a_queue_sizes_its_pool_for_the_arrivals_of_a_whole_boot() -> None:
    """Users waiting: the pooled region buffer did not hold, so the pool boots, in this one
    decision, nodes of its own model for everyone queued plus its own arrivals until new
    nodes are ready (not only the region's share, spread over the other models)."""
    others = (demand(key("teto"), rate=0.1), demand(key("kaito"), rate=0.1))
    d = decide(snap(pools=(fast(key("miku"), 0.1, 0.1, waiting=6), *others)), NOW, CFG)
    lead_s = CFG.reaction_s + CFG.lead_s("west")
    own = 6 + warm_buffer_slots(0, 0.1, 600.0, lead_s, CFG.buffer_z)
    assert d.boot.count(key("miku")) * 4 >= own
    assert d.retarget == ()


def test_a_region_billing_whole_hours_keeps_a_smaller_buffer() -> None:
    """A buffer node that goes unused costs its reaction, boot, load and grace (165 s here)
    where billing is by the minute, but a whole hour where it is by the hour: its odds of
    being used must be 3600/165 times better there, so z 2.2 becomes 0.72 and the same
    arrivals keep fewer free slots (west and east boot equally fast here)."""
    assert CFG.lead_s("west") == CFG.lead_s("east")
    assert CFG.buffer_z_at("west") == CFG.buffer_z
    assert CFG.buffer_z_at("east") == pytest.approx(0.72, abs=0.01)
    west = decide(snap(pools=(demand(key(region="west"), rate=0.3),)), NOW, CFG)
    east = decide(snap(pools=(demand(key(region="east"), rate=0.3),)), NOW, CFG)
    assert (len(west.boot), len(east.boot)) == (11, 9)   # ceil(31.5 + z * sqrt(31.5)) / 4


@pytest.mark.parametrize(("sessions", "waiting", "drained"), [
    ((1, 2), 0, ("a",)),            # one user fits into b's two free slots
    ((1, 1, 2), 0, ("a", "b")),     # a into c, then b into c: c full, two whole nodes free
    ((1, 1, 3), 0, ("a",)),         # a into c fills it: no room left for b
    ((2, 3), 0, ()),                # b has one free slot for a's two users
    ((1, 2), 2, ()),                # b's free slots are for the users waiting
    ((1, 3, 3), 0, ("a",)),         # b and c have a slot each: a's user takes one
    ((2, 3, 4), 0, ()),             # one slot free beside a's two users
    ((4, 4), 0, ()),                # full: nothing to gather
])
def test_consolidation_empties_the_least_loaded_nodes_that_fit_elsewhere(
        sessions: tuple[int, ...], waiting: int, drained: tuple[str, ...]) -> None:
    """No arrivals and no margin here: only whether the users fit (see the next test)."""
    nodes = [node(chr(ord("a") + i), sessions=n) for i, n in enumerate(sessions)]
    d = decide(snap(*nodes, pools=(demand(key(), waiting=waiting),)), NOW, FIT_ONLY)
    assert d.drain == drained


def test_consolidation_leaves_the_pool_its_warm_buffer_until_the_node_could_stop() -> None:
    """Moves that eat the pool's buffer buy nothing: arrivals take the freed slots and the
    emptied node serves again (or another boots). The room must hold the buffer the pool
    wants over the time until the emptied node may stop, and the stop margin."""
    nodes = [node("a", sessions=1), node("b", sessions=1), node("c", sessions=2)]
    quiet = (demand(key()),)
    assert decide(snap(*nodes, pools=quiet), NOW, FIT_ONLY).drain == ("a", "b")
    assert decide(snap(*nodes, pools=quiet), NOW, CFG).drain == ("a",)   # the margin stays
    busy = (demand(key(), rate=0.05),)       # an arrival every 20 s: a few slots to keep
    assert decide(snap(*nodes, pools=busy), NOW, FIT_ONLY).drain == ()


def test_consolidation_counts_users_already_moving_and_stays_in_its_pool() -> None:
    """Users on a node draining into its pool take free slots first; another pool's free
    slots (another model, another region) are not room; an old version's node is left to
    its own drain; with consolidation off nothing is gathered; an own machine (free) is
    never emptied, and the dearest node empties first."""
    a, b = node("a", sessions=1), node("b", sessions=2)
    moving = node("m", sessions=2, state=DRAINING)
    assert decide(snap(a, b, moving), NOW, FIT_ONLY).drain == ()
    other_model = node("t", model="teto", sessions=0)
    east = node("e", region="east", sessions=0)
    pools = (demand(key()), demand(key("teto")), demand(key(region="east")))
    assert decide(snap(a, other_model, east, pools=pools), NOW, FIT_ONLY).drain == ()
    old = [node("o1", version="0", sessions=1), node("o2", version="0", sessions=1)]
    assert decide(snap(*old), NOW, FIT_ONLY).drain == ()
    assert decide(snap(a, b), NOW, replace(CFG, consolidate=False)).drain == ()
    own = node("f", provider="own", sessions=1)      # free: the others move to it
    assert decide(snap(own, node("p", sessions=1)), NOW, FIT_ONLY).drain == ("p",)
    pricey = node("x", provider="pricey", sessions=2)   # the dearest empties first
    assert decide(snap(a, pricey), NOW, FIT_ONLY).drain == ("x",)


@pytest.mark.parametrize(("age_s", "drained"), [
    (600, ()),                # ten minutes into its paid hour: it could not stop once empty
    (3450, ("a",)),           # 150 s before the hour ends: within grace, window and slack
])
def test_consolidation_empties_an_hour_billed_node_only_near_the_end_of_its_hour(
        age_s: float, drained: tuple[str, ...]) -> None:
    a = node("a", region="east", sessions=1, age_s=age_s)
    b = node("b", region="east", sessions=2, age_s=100_000 + 3590)   # mid-hour, fuller
    d = decide(snap(a, b, pools=(demand(key(region="east")),)), NOW, FIT_ONLY)
    assert d.drain == drained


@given(st.dictionaries(st.sampled_from(sorted(r.name for r in DEFAULT.regions)),
                       st.floats(0.0, 2000.0), min_size=1),
       st.floats(-60.0, 60.0), st.floats(-180.0, 180.0))
def test_measured_placement_picks_the_lowest_round_trip_when_it_is_clearly_lowest(
        measured: dict[str, float], lat: float, lon: float) -> None:
    """Wherever the user's guessed place is, the region whose measured round trip is more
    than 10 ms below every other region's is the one placed in (regions the page could
    not time count as far away here: 5 s)."""
    everyone = {r.name: measured.get(r.name, 5000.0) for r in DEFAULT.regions}
    best = min(everyone, key=everyone.__getitem__)
    if all(v - everyone[best] > 10.0 for k, v in everyone.items() if k != best):
        assert home_region(DEFAULT, lat, lon, measured=everyone).name == best
