"""The discrete-event simulator: trace loading, engine semantics, the report (no wall clock)."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections import Counter
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.config import Config, Model, Provider, Region
from provisioner.inputs import ASSUMED_SESSION_S, TICK_S, Arrivals
from provisioner.policy import (
    Decisions,
    PoolKey,
    ScalingConfig,
    Snapshot,
    decide,
    decide_reactive,
    static_fleet,
)
from sim.engine import routes
from sim.metrics import perfect_packing
from sim.report import undominated
from sim.run import (
    SWEEP,
    Session,
    TraceError,
    builtin_trace,
    bursty_trace,
    load_trace,
    main,
    run_all,
    sim_config,
    simulate,
    sweep,
)
from sim.trace import BURST_S, BURSTY_MAX_SESSION_S

KEYS = {"gpu_hours", "lower_bound_gpu_hours", "cost_ratio", "wait_fraction", "wait_s_p50",
        "wait_s_p95", "wait_s_p99", "wait_s_max", "sessions", "cost_usd",
        "spot_interruptions", "interrupted_sessions"}
BASELINES = {"fixed_buffer", "reactive", "static_peak"}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `simulate --json` run over two hours of the built-in day (shared by the tests)."""
    chart = tmp_path_factory.mktemp("sim") / "chart.png"
    out = run_main(["--hours", "2", "--seed", "3", "--json", "--chart", str(chart)])
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


def run_main(argv: list[str]) -> str:
    """stdout of a successful `simulate` run (progress lines on stderr are dropped)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    return out.getvalue()


def test_json_report_has_every_key(report: dict[str, Any]) -> None:
    assert KEYS <= set(report)
    assert set(report["baselines"]) == BASELINES
    for metrics in report["baselines"].values():
        assert KEYS <= set(metrics)
    assert report["sessions"] > 1000
    assert 0.0 <= report["wait_fraction"] <= 1.0


def test_lower_bound_is_below_every_policy(report: dict[str, Any]) -> None:
    for metrics in [report, *report["baselines"].values()]:
        assert metrics["lower_bound_gpu_hours"] == report["lower_bound_gpu_hours"]
        assert 0 < metrics["lower_bound_gpu_hours"] <= metrics["gpu_hours"]
        assert metrics["cost_ratio"] >= 1.0


def test_policy_beats_fixed_buffer_on_cost_and_waits(report: dict[str, Any]) -> None:
    fixed = report["baselines"]["fixed_buffer"]
    assert report["cost_usd"] < fixed["cost_usd"]
    assert report["wait_fraction"] < fixed["wait_fraction"]
    static = report["baselines"]["static_peak"]
    assert static["wait_fraction"] == 0.0 and static["gpu_hours"] > report["gpu_hours"]


def test_builtin_trace_is_deterministic_per_seed() -> None:
    config = sim_config()
    first = builtin_trace(config, hours=1, seed=7)
    assert first == builtin_trace(config, hours=1, seed=7)
    assert first != builtin_trace(config, hours=1, seed=8)
    assert {s.model for s in first} == {"miku", "teto"}
    assert first == sorted(first, key=lambda s: s.arrival_s)


def test_csv_rows_in_any_order_with_region_or_lat_lon(tmp_path: Path) -> None:
    config = sim_config()
    tokyo = next(r for r in config.regions if r.name == "ap-northeast")
    trace = write(tmp_path / "t.csv", "model,arrival_s,duration_s,region,lat,lon\n"
                                      "teto,500,60,,35.6,139.8\n"
                                      "miku,0.5,600,us-west,,\n"
                                      "miku,120,30.5,eu-west,1,2\n")
    sessions = load_trace(trace, config)
    assert [s.arrival_s for s in sessions] == [0.5, 120.0, 500.0]
    assert sessions[2] == Session(500.0, 60.0, "teto", 35.6, 139.8)
    dublin = next(r for r in config.regions if r.name == "eu-west")
    assert (sessions[1].lat, sessions[1].lon) == (dublin.lat, dublin.lon)  # region wins
    only_latlon = write(tmp_path / "l.csv", f"arrival_s,duration_s,model,lat,lon\n"
                                            f"3,10,miku,{tokyo.lat},{tokyo.lon}\n")
    assert load_trace(only_latlon, config)[0].lat == tokyo.lat


@pytest.mark.parametrize(("row", "complaint"), [
    ("abc,10,miku,us-west", "arrival_s='abc'"),
    ("-5,10,miku,us-west", "arrival_s='-5'"),
    ("5,0,miku,us-west", "duration_s='0'"),
    ("5,nan,miku,us-west", "duration_s='nan'"),
    ("5,10,gakupo,us-west", "model='gakupo'"),
    ("5,10,miku,mars-1", "region='mars-1'"),
    ("5,10,miku,", "no region and no lat/lon"),
])
def test_csv_bad_row_names_the_line(tmp_path: Path, row: str, complaint: str) -> None:
    trace = write(tmp_path / "bad.csv", f"arrival_s,duration_s,model,region\n"
                                        f"1,10,miku,us-west\n{row}\n")
    with pytest.raises(TraceError) as err:
        load_trace(trace, sim_config())
    assert "bad.csv:3: " in str(err.value) and complaint in str(err.value)


def test_csv_bad_lat_lon_and_header(tmp_path: Path) -> None:
    trace = write(tmp_path / "ll.csv", "arrival_s,duration_s,model,lat,lon\n1,10,miku,95,0\n")
    with pytest.raises(TraceError, match=r"ll\.csv:2: lat='95'"):
        load_trace(trace, sim_config())
    header = write(tmp_path / "h.csv", "arrival_s,duration,model,region\n1,10,miku,us-west\n")
    with pytest.raises(TraceError, match=r"h\.csv:1: header .* expected arrival_s"):
        load_trace(header, sim_config())


def test_cli_reports_a_bad_trace_and_exits_2(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    trace = write(tmp_path / "bad.csv", "arrival_s,duration_s,model,region\nx,1,miku,us-west\n")
    assert main(["--trace", str(trace), "--no-chart"]) == 2
    assert "bad.csv:2: arrival_s='x'" in capsys.readouterr().err


def test_cli_runs_a_csv_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = "".join(f"{i * 7.5},{300 + i % 5 * 60},{'miku' if i % 3 else 'teto'},us-east\n"
                   for i in range(80))
    trace = write(tmp_path / "t.csv", "arrival_s,duration_s,model,region\n" + rows)
    assert main(["--trace", str(trace), "--json", "--chart", str(tmp_path / "c.png")]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out["sessions"] == 80 and KEYS <= set(out)
    assert (tmp_path / "c.png").exists()
    table = run_main(["--trace", str(trace), "--no-chart"])
    assert "fixed_buffer" in table.splitlines()[0] and "80 sessions measured" in table


def test_one_user_waits_for_a_boot_and_pays_by_the_increment() -> None:
    """Reactive: nothing is up, so the first user waits boot_s + load_s; the bill rounds
    up to the provider's increment (a minute here, an hour in ap-northeast)."""
    config = sim_config()
    west = next(r for r in config.regions if r.name == "us-west")
    tokyo = next(r for r in config.regions if r.name == "ap-northeast")
    for region, cost in ((west, 720 / 3600 * 1.10), (tokyo, 0.90)):
        one = [Session(0.0, 600.0, "miku", region.lat, region.lon)]
        result = simulate(one, config, decide_reactive, name="reactive").metrics()
        lead = config.provider(region.provider).boot_s + config.model_load_s
        assert result["wait_s_p50"] == pytest.approx(lead)
        assert result["wait_s_max"] == pytest.approx(lead)
        assert result["gpu_hours"] == pytest.approx((lead + 600) / 3600, abs=1e-3)
        assert result["lower_bound_gpu_hours"] == pytest.approx(600 / 3600, abs=1e-3)
        assert result["cost_usd"] == pytest.approx(cost, abs=0.01)


def test_users_fill_a_ready_node_then_queue_for_the_next() -> None:
    """Five users at once: one node boots per four, all wait; later users find room."""
    config = sim_config()
    west = next(r for r in config.regions if r.name == "us-west")
    burst = [Session(0.0, 1000.0, "miku", west.lat, west.lon) for _ in range(5)]
    later = [Session(200.0 + i, 100.0, "miku", west.lat, west.lon) for i in range(3)]
    result = simulate(burst + later, config, decide_reactive, name="reactive")
    assert result.boots == 2
    assert result.waits[:5] == [pytest.approx(100.0)] * 5
    assert result.waits[5:] == [0.0, 0.0, 0.0]


def test_a_waiting_user_takes_a_slot_freed_in_a_region_within_the_budget() -> None:
    """Two regions 110 km apart (7 ms): a user of the first waits while the only node, in
    the second, is full, and takes its slot as soon as a session there ends (as the lobby's
    waiting room offers every node within the budget), not only once a node of its own home
    is up; a static fleet boots none for it."""
    config = Config(regions=(Region("a", "cloud", 37.8, -122.4),
                             Region("b", "cloud", 38.5, -121.5)),
                    providers=(Provider("cloud", Decimal("1.10"), billing_increment_s=60,
                                        boot_s=90.0),),
                    models=(Model("miku", Path("models/miku")),))
    b_users = [Session(float(i), 50.0 if i == 0 else 500.0, "miku", 38.5, -121.5)
               for i in range(4)]
    a_user = Session(10.0, 60.0, "miku", 37.8, -122.4)
    fleet = {PoolKey("miku", "1", "b"): 1}
    result = simulate([*b_users, a_user], config, static_fleet(fleet), name="static",
                      initial=fleet)
    assert result.waits == [0.0, 0.0, 0.0, 0.0, pytest.approx(40.0)]


@pytest.mark.parametrize(("streams_per_gpu", "nodes"), [(4, 1), (2, 2)])
def test_a_heavy_model_is_packed_and_priced_by_its_streams_per_gpu(
        streams_per_gpu: int, nodes: int) -> None:
    """Four users at once of a model whose package says 2 streams per GPU need two nodes,
    in the simulator's boots and in its lower bound; of a 4-stream model, one."""
    config = Config(regions=(Region("a", "cloud", 37.8, -122.4),),
                    providers=(Provider("cloud", Decimal("1.10"), billing_increment_s=60,
                                        boot_s=30.0),),
                    models=(Model("miku", Path("models/miku"), streams_per_gpu),))
    users = [Session(0.0, 600.0, "miku", 37.8, -122.4) for _ in range(4)]
    seconds, peaks = perfect_packing(users, ["a"] * 4, config, 600.0)
    assert seconds == {PoolKey("miku", "1", "a"): 600.0 * nodes}
    result = simulate(users, config, decide_reactive, name="reactive", until_s=600.0)
    assert result.boots == nodes


def test_run_all_never_breaks_the_rules() -> None:
    """Every policy stops only idle ready nodes (the engine raises otherwise)."""
    config = sim_config()
    sessions = builtin_trace(config, hours=0.5, seed=1)
    results = run_all(sessions, config, until_s=1800.0)
    assert set(results) == {"policy"} | BASELINES
    assert results["policy"].stops > 0 or results["policy"].boots > 0
    policy = simulate(sessions, config, decide, name="policy", until_s=1800.0)
    assert policy.metrics() == results["policy"].metrics()     # deterministic


def test_engine_feeds_decide_what_the_control_plane_feeds_it() -> None:
    """The engine builds decide's inputs as fleet.snapshot does (inputs.policy_inputs): the
    config's arrival time constant, both averages, counted in the user's home pool, the
    assumed session length, and the control plane's 2 s tick."""
    config = replace(sim_config(), arrival_tau_s=120.0)
    west = next(r for r in config.regions if r.name == "us-west")
    sessions = [Session(float(t), 900.0, "miku", west.lat + 1.0, west.lon - 1.0)
                for t in (1.5, 2.5, 30.5)]
    seen: list[tuple[float, Snapshot]] = []

    def spy(snapshot: Snapshot, now: float, cfg: ScalingConfig) -> Decisions:
        seen.append((now, snapshot))
        return decide_reactive(snapshot, now, cfg)

    simulate(sessions, config, spy, name="spy", until_s=200.0)
    ticks = sorted({now for now, _ in seen if now == int(now)})
    assert ticks[:3] == [0.0, TICK_S, 2 * TICK_S]
    expected = Arrivals()
    for s in sessions:
        expected = expected.counted(s.arrival_s, 120.0)
    now, snap = next((n, s) for n, s in seen if n == 60.0)
    demand = {d.key: d for d in snap.demand}[PoolKey("miku", "1", "us-west")]
    slow, fast = expected.decayed(now, 120.0)
    assert demand.arrival_rate_per_s == pytest.approx(slow)
    assert demand.arrival_rate_fast_per_s == pytest.approx(fast)
    assert {d.mean_session_s for d in snap.demand} == {ASSUMED_SESSION_S}


def test_bursty_trace_bursts_heavy_tails_zipf_and_seeded() -> None:
    config = sim_config()
    trace = bursty_trace(config, hours=6, seed=4, peak_sessions=400)
    assert trace == bursty_trace(config, hours=6, seed=4, peak_sessions=400)
    assert trace != bursty_trace(config, hours=6, seed=5, peak_sessions=400)
    durations = np.array([s.duration_s for s in trace])
    assert 320 < np.median(durations) < 400 and durations.max() <= BURSTY_MAX_SESSION_S
    assert durations.mean() > 1.4 * np.median(durations)          # a heavy right tail
    counts = Counter(s.model for s in trace)
    assert counts["miku"] > counts["teto"] > counts["kaito"] > 0   # Zipf, config order
    arrivals = np.array([s.arrival_s for s in trace])
    per_window = np.histogram(arrivals, bins=np.arange(0.0, 6 * 3600 + 1, BURST_S))[0]
    assert per_window.max() > 1.6 * np.median(per_window)          # bursts stand out


def test_spread_trace_puts_users_at_the_worlds_cities_in_every_regions_queue(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--bursty --spread`: users far from any region (Sydney, Lima, Lagos) as well as near,
    each city with its evening; seeded; every region's queue gets some; lat/lon in range
    (a CSV of it reads back)."""
    config = sim_config()
    trace = bursty_trace(config, hours=3, seed=4, peak_sessions=200, spread=True)
    assert trace == bursty_trace(config, hours=3, seed=4, peak_sessions=200, spread=True)
    assert all(-90 <= s.lat <= 90 and -180 <= s.lon <= 180 for s in trace)
    assert any(s.lat < -25 and s.lon > 140 for s in trace)            # Sydney
    homes = Counter(r.home for r in routes(trace, config))
    assert set(homes) == {r.name for r in config.regions}
    with pytest.raises(SystemExit):
        main(["--spread", "--no-chart"])
    assert "pass --bursty" in capsys.readouterr().err


def test_sweep_draws_one_curve_per_policy(tmp_path: Path) -> None:
    config = sim_config()
    sessions = builtin_trace(config, hours=0.5, seed=2)
    knobs = {"policy": ("buffer_z", (0.5, 2.2)), "fixed_buffer": ("fixed_buffer_nodes", (0, 2)),
             "reactive": ("idle_grace_s", (0.0, 600.0))}
    curves = sweep(sessions, config, until_s=1800.0, knobs=knobs)
    assert set(curves) == set(knobs)
    low, high = curves["policy"]
    assert (low["value"], high["value"]) == (0.5, 2.2)
    assert high["wait_fraction"] <= low["wait_fraction"] and high["gpu_hours"] >= low["gpu_hours"]
    rows = "".join(f"{i * 7.5},{300 + i % 5 * 60},miku,us-east\n" for i in range(40))
    trace = write(tmp_path / "t.csv", "arrival_s,duration_s,model,region\n" + rows)
    png = tmp_path / "f.png"
    out = json.loads(run_main(["--trace", str(trace), "--sweep", "--json", "--chart",
                               str(png)]).splitlines()[-1])
    assert set(out["frontier"]) == set(SWEEP)
    assert all(KEYS <= set(p) and "knob" in p for pts in out["frontier"].values() for p in pts)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lean_curve_is_the_policy_stopping_idle_nodes_at_once() -> None:
    """policy_lean runs the policy with its CURVES knobs (no idle grace, no margin, blind to
    paid time): at the same buffer_z it stops more nodes and holds fewer GPU-hours."""
    config = sim_config()
    sessions = builtin_trace(config, hours=0.5, seed=2)
    knobs = {"policy": ("buffer_z", (2.2,)), "policy_lean": ("buffer_z", (2.2,))}
    curves = sweep(sessions, config, until_s=1800.0, knobs=knobs)
    (aware,), (lean,) = curves["policy"], curves["policy_lean"]
    assert lean["stops"] > aware["stops"] and lean["gpu_hours"] < aware["gpu_hours"]


def test_undominated_points_are_those_no_setting_of_ours_nor_a_mix_beats() -> None:
    def point(value: float, cost: float, waited: float) -> dict[str, float]:
        return {"value": value, "cost_ratio": cost, "wait_fraction": waited}
    curves = {"ours": [point(0, 1.2, 0.2), point(1, 1.4, 0.0)],
              "theirs": [point(0, 1.1, 0.3),     # cheaper than any setting of ours
                         point(1, 1.3, 0.2),     # half of each of ours: 1.3, 10 % waited
                         point(2, 1.3, 0.05),    # ... not 5 %
                         point(3, 1.5, 0.0)]}    # ours at 1.4: nobody waits
    assert undominated(curves, ["ours"]) == [("theirs", 0.0), ("theirs", 2.0)]


def test_chart_without_matplotlib_says_how_to_install(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # as if the extra were missing
    trace = write(tmp_path / "t.csv", "arrival_s,duration_s,model,region\n1,60,miku,us-west\n")
    assert main(["--trace", str(trace), "--chart", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install -e '.[charts]'" in err and "--no-chart" in err
    assert main(["--trace", str(trace), "--no-chart"]) == 0       # no chart: no matplotlib


def test_generated_trace_written_as_csv_reads_back(tmp_path: Path) -> None:
    config = sim_config()
    path = tmp_path / "bursty.csv"
    run_main(["--bursty", "--hours", "0.2", "--seed", "3", "--peak", "100", "--no-chart",
              "--write-trace", str(path)])
    measured = [s for s in bursty_trace(config, 0.2, 3, 100) if s.arrival_s >= 0]
    back = load_trace(path, config)
    assert len(back) == len(measured) > 0
    assert back[0].model == measured[0].model
    assert back[0].arrival_s == pytest.approx(measured[0].arrival_s, abs=1e-3)


def test_consolidation_moves_users_onto_fewer_nodes_and_costs_less() -> None:
    """Eight users fill two nodes, four each; after 300 s one long session is left on each:
    the policy moves one onto the other node (a planned move: nobody waits), and the emptied
    node stops some 2,700 s sooner than without consolidation."""
    config = sim_config()
    west = next(r for r in config.regions if r.name == "us-west")
    lengths = [3000.0, 300.0, 300.0, 300.0, 3000.0, 300.0, 300.0, 300.0]
    users = [Session(float(i), d, "miku", west.lat, west.lon) for i, d in enumerate(lengths)]
    fleet = {PoolKey("miku", "1", "us-west"): 2}
    scaling = replace(ScalingConfig.from_config(config), buffer_z=0.0)
    runs = {on: simulate(users, config, decide, name="policy", initial=fleet,
                         scaling=replace(scaling, consolidate=on))
            for on in (True, False)}
    assert runs[True].moves == 1 and runs[False].moves == 0
    assert runs[True].waits == runs[False].waits
    assert runs[True].gpu_s < runs[False].gpu_s - 2000
