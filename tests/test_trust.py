"""Trust boundaries (issue 18): a node that lies harms no one else. Every attack here is
made with what one own machine's join token gives (a node credential), against the real
webapp, Redis and node processes; each test fails without its fix."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import requests
from conftest import Fleet, closed_code, place, wait_for
from simple_websocket import Client
from test_node import open_stream, ticket

from billing.ledger import Ledger
from provisioner.state import Beat, lock_key, node_key
from provisioner.state.membership import LIE_LIMIT


def attacker(fleet: Fleet) -> tuple[str, str]:
    """An own machine that joined honestly: its node id and credential."""
    node_id, token = fleet.enroll("miku")
    got = requests.post(f"{fleet.control_url}/api/nodes/join", timeout=5,
                        json={"token": token, "url": "ws://127.0.0.1:9/ws"})
    assert got.status_code == 200, got.text
    return node_id, got.json()["credential"]


def beat(fleet: Fleet, cred: str, **report: object) -> requests.Response:
    body = {"state": "ready", "progress": 1.0, "serving": "miku:1", "streams": [],
            "usage": [], **report}
    return requests.post(f"{fleet.control_url}/api/nodes/heartbeat", json=body, timeout=5,
                         headers={"Authorization": f"Bearer {cred}"})


def test_a_node_cannot_take_over_another_users_stream(fleet: Fleet) -> None:
    node_id = fleet.start("miku")
    ws, _ = open_stream(fleet.url(node_id), ticket(node_id, user="victim", state=fleet.state))
    wait_for(lambda: fleet.state.r.hget(lock_key("victim"), "node") == node_id, 10)
    lock = fleet.state.r.hgetall(lock_key("victim"))
    evil, cred = attacker(fleet)
    got = beat(fleet, cred, streams=[["victim", "s-evil", 10**15, "ab"],
                                     ["victim", lock["session"], 10**15, "ab"]])
    assert got.status_code == 200 and got.json()["lost"] == []
    assert fleet.state.r.hgetall(lock_key("victim")) == lock   # untouched
    assert fleet.state.live_sessions(evil) == []
    ws.send(np.zeros(960, np.int16).tobytes())                   # the victim streams on
    assert isinstance(ws.receive(timeout=5), bytes)
    rec = fleet.state.node(evil)
    assert rec is not None and rec.dropped == 2 and "not placed here" in (
        fleet.state.r.hget(node_key(evil), "dropped_why") or "")


def test_a_node_bills_only_its_own_sessions_in_their_time(fleet: Fleet) -> None:
    evil, cred = attacker(fleet)
    now = int(time.time() // 60) * 60
    place(fleet.state, evil, "own", "s-own", 1)
    got = beat(fleet, cred, usage=[[now, "erin", "s-x", "ab", 60],        # never placed
                                   [now, "own", "s-own", "ab", 30],      # its own: billed
                                   [now - 3600, "own", "s-own", "cd", 60],   # before placed
                                   [978307200, "own", "s-own", "ef", 60],    # 2001
                                   [now + 600, "own", "s-own", "ab", 60]])   # the future
    assert got.status_code == 200, got.text
    assert fleet.state.usage_counters(now) == {f"own|s-own:ab|{evil}|miku|us-west": 30.0}
    assert fleet.state.usage_counters(978307200) == {}
    assert fleet.state.node(evil).dropped == 4   # type: ignore[union-attr]
    refused = beat(fleet, cred, usage=[[-6 * 10**12, "own", "s-own", "ab", 1]])
    assert refused.status_code == 400 and "minute" in refused.json()["message"]


def test_a_node_that_keeps_lying_is_drained_and_shown(fleet: Fleet) -> None:
    evil, cred = attacker(fleet)
    for i in range(LIE_LIMIT):
        assert beat(fleet, cred, streams=[[f"u{i}", f"s{i}", 1, "ab"]]).status_code == 200
    rec = fleet.state.node(evil)
    assert rec is not None and rec.drain_deadline is not None
    assert f"{LIE_LIMIT} reports dropped" in rec.suspect
    cluster = requests.get(f"{fleet.control_url}/api/cluster", timeout=5).json()
    shown = next(n for n in cluster["nodes"] if n["id"] == evil)
    assert shown["reports_dropped"] == LIE_LIMIT and "not placed here" in shown["suspect"]
    assert beat(fleet, cred).json()["drain_deadline"] is not None   # told to drain


def test_one_nodes_bad_report_fails_that_node_only(fleet: Fleet) -> None:
    """A report the beat script cannot take (here a minute Lua cannot read, which the
    parser lets no real report through with) fails its own node, not the batch."""
    good, good_cred = attacker(fleet)
    bad, bad_cred = attacker(fleet)
    place(fleet.state, good, "g", "s-g", 1)
    ok = Beat("ready", 1.0, None, None, "miku:1", streams=[("g", "s-g", 1)])
    broken = Beat("ready", 1.0, None, None, "miku:1",
                  usage=[("not-a-minute", "g|s-g:ab", 1.0)])   # type: ignore[list-item]
    out = fleet.state.beats([(bad, bad_cred, broken), (good, good_cred, ok)], time.time(), 10)
    assert isinstance(out[0], Exception) and not isinstance(out[1], Exception)
    assert fleet.state.live_sessions(good) == ["s-g"]


def test_settlement_skips_a_bad_counter_and_bills_the_rest(fleet: Fleet, tmp_path) -> None:
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'b.sqlite'}")
    minute = int(time.time() // 60) * 60 - 120
    fleet.state.report_usage([(-6 * 10**12, "u|s:ab|n|miku|us-west", 5.0),
                              (minute, "u|s:ab|n|miku|us-west", 42.0)])
    assert ledger.settle_from(fleet.state, time.time()) == 1
    assert [r.seconds for r in ledger.usage("u")] == [42.0]
    assert fleet.state.dirty_minutes(time.time(), 10) == []      # it does not block the next
    assert any("-6000000000000" in r for r in fleet.state.rejected())
    ledger.engine.dispose()


def test_a_ticket_opens_one_stream_and_stays_out_of_the_logs(fleet: Fleet) -> None:
    node_id = fleet.start("miku")
    tok = ticket(node_id, user="once", state=fleet.state)
    ws, _ = open_stream(fleet.url(node_id), tok)
    again = Client.connect(f"{fleet.url(node_id)}?ticket={tok}")        # replayed while live
    code, reason = closed_code(again)
    assert code == 4401 and "used already" in reason
    ws.send(np.zeros(960, np.int16).tobytes())
    assert isinstance(ws.receive(timeout=5), bytes)                      # unharmed
    ws.send(json.dumps({"type": "stop"}))
    assert closed_code(ws)[0] == 1000
    after = Client.connect(f"{fleet.url(node_id)}?ticket={tok}")         # replayed after stop
    assert closed_code(after)[0] == 4401
    time.sleep(0.2)
    log = (fleet.tmp / f"{node_id}.log").read_text()
    assert "GET /ws" in log and tok not in log and "ticket=" not in log


@pytest.mark.parametrize("lie", ["stream", "close"])
def test_a_lie_about_a_session_placed_elsewhere_is_dropped(fleet: Fleet, lie: str) -> None:
    """A session the lobby placed on another node is not this node's to report."""
    evil, cred = attacker(fleet)
    honest, _ = attacker(fleet)
    place(fleet.state, honest, "v", "s-v", 3)
    fleet.state.r.hset(lock_key("v"), mapping={"session": "s-v", "fence": 3, "node": honest})
    report = ({"streams": [["v", "s-v", 3, "ab"]]} if lie == "stream"
              else {"closed": [["v", "s-v"]]})
    assert beat(fleet, cred, **report).status_code == 200
    assert fleet.state.r.hget(lock_key("v"), "node") == honest       # still the victim's
    assert fleet.state.node(evil).dropped == 1   # type: ignore[union-attr]


def test_a_page_on_another_site_cannot_open_the_lobby(webapp) -> None:  # noqa: ANN001
    url = f"{webapp.ws_url}/ws/session?user=o1&model=miku&region=us-west"
    evil = Client.connect(url, headers={"Origin": "https://evil.example"})
    got = json.loads(evil.receive(timeout=5))
    assert got["type"] == "error" and got["code"] == "bad_request"
    assert "evil.example" in got["message"] and webapp.config.public_url in got["message"]
    ours = Client.connect(url, headers={"Origin": webapp.config.public_url})   # ours: fine
    first = json.loads(ours.receive(timeout=5))
    assert first["type"] in ("queued", "booting"), first
    ours.close()


def test_dev_users_are_refused_in_a_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    from common.config import load_config
    from common.errors import ConfigError
    from webapp import wsgi

    env = {"REDIS_URL": "redis://r:6379/0", "DATABASE_URL": "postgresql://x/y",
           "TICKET_SECRET": "t" * 64, "USER_TOKEN_SECRET": "u" * 64,
           "VOICE_PUBLIC_URL": "https://voice.example", "VOICE_DEV_USERS": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="local runs and tests only"):
        wsgi.deployed()
    assert load_config(env).dev_users   # a local run's webapp may


def test_behind_a_tls_proxy_the_cookie_is_secure(cfg, state) -> None:  # noqa: ANN001
    from conftest import serve

    from webapp.app import create_app

    for hops, secure in ((0, False), (1, True)):
        host, server = serve(create_app(cfg.with_overrides(trusted_proxies=hops), state))
        try:
            got = requests.get(f"http://{host}/", timeout=5,
                               headers={"X-Forwarded-Proto": "https",
                                        "X-Forwarded-Host": "voice.example"})
            assert ("Secure" in got.headers["Set-Cookie"]) is secure, got.headers
        finally:
            server.shutdown()


def test_node_urls_are_limited_to_the_configured_schemes_and_ports(fleet: Fleet) -> None:
    from provisioner import membership
    from provisioner.errors import JoinError

    cfg = fleet.cfg.with_overrides(node_url_schemes=("wss",), node_url_ports=(8765,))
    for url in ("ws://10.0.0.5:8765/ws", "wss://10.0.0.5:6379/ws", "wss://10.0.0.5/ws"):
        _, token = fleet.enroll("miku")
        with pytest.raises(JoinError, match="wss://HOST on port 8765"):
            membership.join(fleet.state, cfg, token, url, time.time())
    _, token = fleet.enroll("miku")
    assert membership.join(fleet.state, cfg, token, "wss://10.0.0.5:8765/ws", time.time())


def test_the_embedded_redis_wants_a_password_no_process_argument_shows() -> None:
    import redis

    from voicectl import procs

    url, proc = procs.start_redis()
    try:
        password = url.split(":")[2].split("@")[0]
        assert len(password) == 64 and password not in " ".join(map(str, proc.args))
        assert procs.redacted(url) == url.replace(password, "***")
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert redis.Redis.from_url(url).ping()
    finally:
        procs.stop([proc])


@pytest.mark.parametrize("skew_s", [120.0, -120.0])
def test_a_node_with_a_wrong_clock_keeps_the_control_planes(fleet: Fleet,
                                                          skew_s: float) -> None:
    """A machine clock 2 minutes off: its tickets are not refused (60 s tickets would all
    be, one way), and its usage lands in the control plane's minute, which beat.lua
    accepts (else it would be dropped as outside the session's time)."""
    node_id, token = fleet.enroll("miku")
    fleet.join(token, node_id, "--clock-skew-s", str(skew_s))
    fleet.wait_state(node_id, "ready")
    time.sleep(2.5 * fleet.cfg.heartbeat_interval_s)   # a beat's answer set its clock
    ws, _ = open_stream(fleet.url(node_id), ticket(node_id, user="skew", state=fleet.state))
    for _ in range(10):
        ws.send(np.zeros(960, np.int16).tobytes())
        assert isinstance(ws.receive(timeout=5), bytes)
    ws.send(json.dumps({"type": "stop"}))
    assert closed_code(ws)[0] == 1000
    minute = int(time.time() // 60) * 60
    wait_for(lambda: any(k.startswith("skew|") for m in (minute - 60, minute)
                         for k in fleet.state.usage_counters(m)), 10,
             "the stream's usage never arrived in the control plane's minute")
    rec = fleet.state.node(node_id)
    assert rec is not None and rec.dropped == 0
    assert "clock is" in (fleet.tmp / f"{node_id}.log").read_text()
    # reported, for ops (/api/cluster, `voicectl nodes`): ours minus its own
    assert rec.clock_offset_s == pytest.approx(-skew_s, abs=2.0)


def test_the_join_token_is_not_in_the_nodes_arguments(fleet: Fleet) -> None:
    """The user-data passes the one-time token as an argument (the contract's form); the
    node hides it from `ps` as soon as it starts."""
    from pathlib import Path

    node_id, token = fleet.enroll("miku")
    proc = fleet.join(token, node_id)
    fleet.wait_state(node_id, "ready")
    shown = Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert "--token ***" in shown and token not in shown, shown
