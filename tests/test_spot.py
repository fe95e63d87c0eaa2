"""Spot machines in production (issue 21): the policy's spot boots become EC2 spot instances
(moto) at the spot price, on-demand when spot is refused; a spot notice in the instance
metadata reaches the node, the node's heartbeat tells the control plane, and its users
move make-before-break (the page's crossfade measures the gap) before the machine goes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ControlPlane,
    closed_code,
    fleet_config,
    lobby,
    make_config,
    running_control_plane,
    start_stream,
    wait_for,
)
from playwright.sync_api import Browser, expect
from test_move import FRAME_MS, _state, silences
from test_page import (  # noqa: F401  fixtures
    CHROMIUM,
    browser,
    open_page,
    pw,
    tone_wav,
    wait_until,
)

from common.config import Config
from provisioner import clouds, fleet, membership
from provisioner.policy import PoolKey
from provisioner.state import State
from provisioner.states import NodeState
from voicectl import devcloud
from worker_node.agent import Agent
from worker_node.metadata import SpotWatch, watch_spot
from worker_node.runtime import NodeRuntime

CONFIG = """
[settings]
cluster = "{cluster}"

[providers.aws]
driver = "ec2"
price_per_hour = "0.53"
spot_price_per_hour = "0.19"
billing_increment_s = 1
boot_s = 0.2
instance_type = "g4dn.xlarge"
image = "{image}"
spot = true
endpoint = "{endpoint}"
node_port = 0

[[regions]]
name = "us-west-aws"
provider = "aws"
provider_region = "us-west-2"
lat = 45.6
lon = -121.2

[[models]]
package = "models/miku"
"""
POOL = PoolKey("miku", "1", "us-west-aws")
FRAME = b"\x00\x00" * 320   # 20 ms at 16 kHz


@pytest.fixture
def fault(moto: str) -> Iterator[devcloud.CapacityFault]:
    with devcloud.CapacityFault(moto) as f:
        yield f


@pytest.fixture
def aws(redis_url: str, sqlite_url: str, tmp_path: Path, image: str,
        fault: devcloud.CapacityFault) -> Config:
    cluster = f"t-{uuid.uuid4().hex[:8]}"     # one moto serves the run: tests keep apart
    toml = CONFIG.format(image=image, endpoint=fault.endpoint, cluster=cluster)
    return fleet_config(redis_url, tmp_path, toml, database_url=sqlite_url, idle_grace_s=60.0)


def _vm(cfg: Config, node_id: str) -> Any:
    region = cfg.region("us-west-aws")
    assert region is not None
    return next(vm for vm in clouds.list_ours(cfg, region) if clouds.node_id_of(vm) == node_id)


def _boot(state: State, cfg: Config, on_spot: bool) -> tuple[str, Any]:
    """What fleet.scale does for one entry of Decisions.spot (or .boot): request, provision."""
    from provisioner import catalog

    catalog.seed(state, cfg)
    node_id = fleet.request_node(state, cfg, POOL, time.time(), on_spot)
    assert node_id is not None
    assert fleet.provision(state, cfg, node_id, time.time())
    return node_id, _vm(cfg, node_id)


def _destroy_all(cfg: Config) -> None:
    for region in clouds.machine_regions(cfg):
        for vm in clouds.list_ours(cfg, region):
            clouds.destroy(cfg, region, vm)


def test_spot_decisions_boot_spot_instances_at_the_spot_price(aws: Config, state: State
                                                              ) -> None:
    try:
        spot_id, spot_vm = _boot(state, aws, on_spot=True)
        demand_id, demand_vm = _boot(state, aws, on_spot=False)
        assert spot_vm.extra.get("instance_lifecycle") == "spot"
        assert demand_vm.extra.get("instance_lifecycle") != "spot"
        spot_rec, demand_rec = state.node(spot_id), state.node(demand_id)
        assert spot_rec is not None and demand_rec is not None
        assert (spot_rec.spot, Decimal(spot_rec.price_per_hour)) == (True, Decimal("0.19"))
        assert (demand_rec.spot, Decimal(demand_rec.price_per_hour)) == (False, Decimal("0.53"))
        # the GPU bill reads the record's price: the spot node's cost is at the spot price
        assert membership.bill_row(spot_rec)["price_per_hour"] == "0.19"
        snap, _ = fleet.snapshot(state, aws, time.time())
        assert {n.id: n.spot for n in snap.nodes} == {spot_id: True, demand_id: False}
    finally:
        _destroy_all(aws)


def test_spot_refused_boots_on_demand_in_the_same_step(
        aws: Config, state: State, fault: devcloud.CapacityFault,
        caplog: pytest.LogCaptureFixture) -> None:
    fault.refuse_spot = True                         # no spot capacity; on-demand there is
    try:
        with caplog.at_level(logging.WARNING, "provisioner"):
            node_id, vm = _boot(state, aws, on_spot=True)
        assert fault.refused == 1 and vm.extra.get("instance_lifecycle") != "spot"
        rec = state.node(node_id)
        assert rec is not None and (rec.spot, rec.region) == (False, "us-west-aws")
        assert Decimal(rec.price_per_hour) == Decimal("0.53")
        assert state.constrained(time.time()) == {}      # the region itself has room
        assert any("no spot g4dn.xlarge" in r.message and "on-demand instead" in r.message
                   for r in caplog.records), caplog.text
    finally:
        _destroy_all(aws)


class _Control:
    """A node's ControlClient that hands each report to the control plane in-process."""

    def __init__(self, state: State, cfg: Config, node_id: str, credential: str) -> None:
        self.state, self.cfg, self.node_id, self.credential = state, cfg, node_id, credential

    def beat(self, report: dict[str, Any]) -> dict[str, Any]:
        orders = membership.heartbeat(self.state, self.cfg, self.node_id, self.credential,
                                      json.loads(json.dumps(report)), time.time())
        return membership.orders_json(orders, time.time())


def test_the_node_sees_the_notice_in_its_metadata_and_its_beat_drains_it(
        redis_url: str, state: State) -> None:
    cfg = make_config(redis_url)
    meta = devcloud.Metadata()
    try:
        watch = SpotWatch(meta.base_for("i-0abc"))
        assert watch.poll() is None                       # 404: no notice
        at = float(int(time.time()) + 120)
        meta.notices["i-0abc"] = at
        assert watch.poll() == at and meta.polled["i-0abc"] == 2   # IMDSv2 token kept
        assert SpotWatch(meta.base_for("i-0other")).poll() is None  # per instance

        node_id = "n-spot1"
        state.add_node({"id": node_id, "home": "us-west", "region": "us-west",
                        "provider": "local", "model": "miku", "version": "1", "spot": "1",
                        "state": "booting", "requested_at": time.time(),
                        "deadline": time.time() + 60, "capacity": 4, "price_per_hour": "0.3"})
        token = membership.join_token_for(state, cfg, node_id)
        grant = membership.join(state, cfg, token, "ws://127.0.0.1:1/ws", time.time())
        node = NodeRuntime(node_id, "miku", "1", "us-west", "local", "", 4, 0.0)
        node.state = NodeState.READY
        agent = Agent(node, _Control(state, cfg, node_id, grant.credential),  # type: ignore[arg-type]
                      1.0)
        agent.beat()
        assert state.node(node_id).drain_deadline is None            # type: ignore[union-attr]
        stop = threading.Event()
        watch_spot(watch, 0.05, agent.interrupted, stop)
        wait_for(lambda: agent.interrupt_at == at, 5, "the watch to see the notice")
        stop.set()
        agent.beat()                                      # the report says so ...
        assert agent.report()["interruption_at"] == at
        rec = state.node(node_id)                          # ... and the control plane drains
        assert rec is not None and (rec.drain_deadline, rec.interrupt_at) == (at, at)
        assert rec.drain_reason == "spot" and node.drain_deadline == at   # in the same answer
        snap, _ = fleet.snapshot(state, cfg, time.time())
        assert [n.state for n in snap.nodes] == [NodeState.DRAINING]   # nobody's capacity
        with pytest.raises(ValueError, match="interruption_at"):
            membership.parse_beat({"state": "ready", "interruption_at": "soon"})
    finally:
        meta.close()


def test_a_node_off_the_cloud_never_polls(fleet: Any) -> None:
    """A local-driver node (or an own machine) has no instance metadata: it never asks."""
    node_id = fleet.start("miku", "us-west")         # ready: its start-up is logged
    text = (fleet.tmp / f"{node_id}.log").read_text()
    assert "serving miku" in text and "interruption notices" not in text, text
    assert "metadata" not in text, text


def test_a_node_without_a_metadata_service_says_so_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """A machine that is no cloud VM, or whose metadata service is away, is not flooded
    with errors: the watch says it once, and again only after it answered."""
    from voicectl import procs

    stop = threading.Event()
    calls: list[float] = []
    with caplog.at_level(logging.INFO, "worker_node.metadata"):
        t = watch_spot(SpotWatch(f"http://127.0.0.1:{procs.free_port()}"), 0.02,
                       calls.append, stop)
        time.sleep(0.5)
        stop.set()
        t.join(5)
    assert calls == [] and len(caplog.records) == 1, caplog.text
    assert "spot notices unknown for now" in caplog.records[0].message


@pytest.mark.parametrize(("node", "args", "says"), [
    ("n-nope", [], "no node 'n-nope'"),
    ("n-od", [], "n-od is an on-demand machine"),
    ("n-sp", ["--notice-s", "0"], "--notice-s 0 is not 0-3600 seconds"),
])
def test_kill_node_spot_notice_says_what_is_wrong(
        aws: Config, state: State, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], node: str, args: list[str], says: str) -> None:
    from voicectl import cli

    for node_id, spot in (("n-od", ""), ("n-sp", "1")):
        state.add_node({"id": node_id, "home": "us-west-aws", "region": "us-west-aws",
                        "provider": "aws", "model": "miku", "version": "1", "spot": spot,
                        "state": "ready", "capacity": 4, "price_per_hour": "0.53"})
    monkeypatch.setenv("REDIS_URL", aws.redis_url or "")
    monkeypatch.setenv("VOICE_CONFIG", str(tmp_path / "voice.toml"))
    assert cli.main(["kill-node", node, "--spot-notice", *args]) == 2
    assert says in capsys.readouterr().err


def test_kill_node_spot_notice_on_the_local_cloud_tells_the_control_plane(
        redis_url: str, state: State, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The local cloud has no metadata service: the notice goes to the control plane, as a
    provider's interruption event would; the node hears its drain at its next beat."""
    from voicectl import cli

    cfg = make_config(redis_url)
    region = cfg.regions[0]
    assert cfg.provider(region.provider).driver == "local"
    state.add_node({"id": "n-loc", "home": region.name, "region": region.name,
                    "provider": region.provider, "model": "miku", "version": "1", "spot": "1",
                    "state": "ready", "capacity": 4, "price_per_hour": "0.3"})
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.delenv("VOICE_CONFIG", raising=False)
    assert cli.main(["kill-node", "n-loc", "--spot-notice", "--notice-s", "30"]) == 0
    assert "told the control plane" in capsys.readouterr().out
    rec = state.node("n-loc")
    assert rec is not None and rec.drain_reason == "spot" and rec.state is NodeState.DRAINING
    assert rec.interrupt_at == rec.drain_deadline and 25 < rec.interrupt_at - time.time() <= 30


# ---- end to end: voicectl kill-node --spot-notice ---------------------------------------


def _voicectl(cfg: Config, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "REDIS_URL": cfg.redis_url or "",
           "VOICE_CONFIG": str(tmp / "voice.toml"), "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing"}
    return subprocess.run([sys.executable, "-m", "voicectl", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def _follow(ws: Any, base: str, ready: dict[str, Any], sent: list[int],
            done: threading.Event) -> None:
    """A user at the protocol (the page's make-before-break): stream, and when told to
    move, resume through the lobby, play both, stop the old one. `sent`: frames, moves."""
    while not done.is_set():
        ws.send(FRAME)
        got = ws.receive(timeout=5)
        sent[0] += 1
        while isinstance(got, str):                       # a move notice
            assert json.loads(got)["type"] == "move", got
            again = lobby(base, f"user=proto&model=miku&region=us-west-aws"
                                f"&resume={ready['session_id']}")[-1]
            assert again["type"] == "ready", again
            new = start_stream(again)
            for w in (ws, new):                           # both play ...
                w.send(FRAME)
                assert len(w.receive(timeout=5)) == len(FRAME)
                sent[0] += 1
            ws.send(json.dumps({"type": "stop"}))          # ... then the old one stops
            assert closed_code(ws)[0] == 1000
            ws, got = new, b""
            sent[1] += 1
        time.sleep(0.02)
    ws.send(json.dumps({"type": "stop"}))
    assert closed_code(ws)[0] == 1000


@pytest.fixture
def plane(aws: Config, tmp_path: Path, moto: str) -> Iterator[tuple[ControlPlane,
                                                                    devcloud.CloudInit]]:
    with running_control_plane(aws) as cp, \
            devcloud.CloudInit(moto, "us-west-2", log_dir=tmp_path / "vms",
                               cluster=aws.cluster) as init:
        yield cp, init


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_kill_node_spot_notice_moves_every_user_without_a_gap_and_bills_them(
        plane: tuple[ControlPlane, devcloud.CloudInit], tmp_path: Path,
        browser: Browser) -> None:  # noqa: F811
    cp, init = plane
    on_spot, on_demand = _spot_and_on_demand(cp)   # users go to the spot one: cheapest
    page = open_page(browser, cp.base_url)
    page.select_option("#model", "miku")
    page.select_option("#region", "us-west-aws")
    page.click("#start")
    expect(page.locator("body")).to_have_attribute("data-state", "streaming", timeout=30_000)
    page_started = time.time()
    ready = lobby(cp.ws_url, "user=proto&model=miku&region=us-west-aws")[-1]
    assert ready["node_id"] == on_spot, ready
    sent, done = [0, 0], threading.Event()
    proto = threading.Thread(target=_follow, args=(start_stream(ready), cp.ws_url, ready, sent,
                                                   done))
    proto.start()
    try:
        # Playing steadily, with no node booting: a node process starting beside the browser
        # on a 2-core machine runs the jitter buffer dry whether or not anything moves
        # (test_move); the policy's buffer booted one (on spot) for these arrivals.
        page.wait_for_timeout(1000)
        wait_until(page, lambda: all(n.state is NodeState.READY for n in cp.state.nodes()),
                   "the fleet to settle", polls=100)
        assert _state(page)["node"] == on_spot
        _first_connections(cp)
        page.evaluate("() => window.voiceState.audio.playback.port.postMessage('gap-reset')")
        page.wait_for_timeout(1000)   # the same run's silences without a move, to compare

        # As in production, the users move MOVE_NOTICE_S (10 s) before the machine goes,
        # after the replacement the notice boots has started: here that is a node process
        # starting beside the browser, which starves it for a moment under load.
        told = _voicectl(cp.config, tmp_path, "kill-node", on_spot, "--spot-notice",
                         "--notice-s", "16")
        assert told.returncode == 0 and "taken back in 16 s" in told.stdout, told.stderr
        # one light look per poll: the page's main thread also relays its audio
        wait_until(page, lambda: page.evaluate("""() => { const s = window.voiceState;
            return s.moveFrom === null && s.moves.length > 0; }"""), "the page to move",
                   polls=150)
        assert getattr(cp.state.node(on_spot), "drain_reason", "spot") == "spot"
        page.wait_for_timeout(800)   # a fresh worklet report from the new node
        _assert_no_gap(_state(page), on_spot)

        cp.wait(lambda: cp.state.node(on_spot) is None, 15, "the spot node to be stopped")
        ended = {dict(labels)["reason"]: n for (name, labels), n in cp.state.counts().items()
                 if name == "voice_nodes_ended"}
        assert ended == {"spot_interruption": 1}, ended
        cp.wait(lambda: _vm_gone(cp.config, on_spot), 10, "its instance to be terminated")
        # the on-demand node polls its metadata too (404: no notice), without a word of error
        demand_vm = _vm(cp.config, on_demand)
        assert init.metadata.polled.get(demand_vm.id, 0) > 0, init.metadata.polled
        text = (tmp_path / "vms" / f"{demand_vm.id}.log").read_text()
        assert "interruption notices" in text and "spot notices unknown" not in text, text
        page.click("#stop")
        expect(page.locator("body")).not_to_have_attribute("data-state", "streaming")
        page_s = time.time() - page_started
    finally:
        done.set()
        proto.join(15)
        page.context.close()
    assert sent[1] == 1, sent                 # the other user moved too
    cp.settle(time.time() + 120)              # each session billed within 2 s
    assert abs(sum(r.seconds for r in cp.ledger.usage("proto")) - sent[0] * 0.02) <= 2.0
    page_user = [r for r in cp.ledger.usage(None) if r.user_id != "proto"]
    assert abs(sum(r.seconds for r in page_user) - page_s) <= 2.0, (page_user, page_s)
    bill = {r["node_id"]: r for r in cp.ledger.node_costs()}[on_spot]
    assert Decimal(bill["price_per_hour"]) == Decimal("0.19") and bill["stopped_at"]


def _spot_and_on_demand(cp: ControlPlane) -> tuple[str, str]:
    """A spot node and an on-demand one of the pool, booted as fleet.scale boots them."""
    ids = [fleet.request_node(cp.state, cp.config, POOL, time.time(), on_spot=s)
           for s in (True, False)]
    for node_id in ids:
        cp.celery.send_task("provisioner.provision", (node_id,))
    for node_id in ids:
        cp.wait(lambda n=node_id: getattr(cp.state.node(n), "state", None) is NodeState.READY,
                30, f"node {node_id} ready")
    return ids[0], ids[1]   # type: ignore[return-value]


def _first_connections(cp: ControlPlane) -> None:
    """Open each node's first connection now (refused: no ticket). A node's first one is
    slow on its real-time audio thread (the first pass through its handshake and stream
    code), which on this shared 2-core machine starves the browser beside it; in
    production the browser is elsewhere. test_move warms its target node the same way."""
    from simple_websocket import Client

    for n in cp.state.nodes():
        ws = Client.connect(f"{n.url}?ticket=warm-up")
        assert closed_code(ws)[0] == 4401


def _assert_no_gap(after: dict[str, Any], old: str) -> None:
    """test_move's measure: the page's longest silence from the node's notice until the
    crossfade is done is one frame at most, or no longer than the worst of the same run
    outside the move (the shared 2-core machine stalls now and then)."""
    [move] = after["moves"]
    assert move["from"] == old and move["to"] == after["node"], move
    gaps = after["playback"]["gaps"]
    across, elsewhere = silences(move, gaps)
    print(f"\nspot move {move['from']} -> {move['to']}: notice to switch {move['ms']:.0f} ms; "
          f"longest silence across it {max(across, default=0):.1f} ms; elsewhere {elsewhere}; "
          "silences (ms, s from the switch):",
          [(round(g["ms"], 1), round(g["end"] - move["at"], 2)) for g in gaps])
    assert max(across, default=0.0) <= max([FRAME_MS, *elsewhere]), (across, gaps, move)


def _vm_gone(cfg: Config, node_id: str) -> bool:
    region = cfg.region("us-west-aws")
    assert region is not None
    return all(clouds.node_id_of(vm) != node_id for vm in clouds.list_ours(cfg, region))
