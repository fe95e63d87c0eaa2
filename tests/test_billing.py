"""Accounting end to end: real nodes meter, a real Celery worker settles into SQLite and
(when TEST_DATABASE_URL is set) PostgreSQL; one stream per user under every race we can make."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from decimal import Decimal

import numpy as np
import pytest
from conftest import ControlPlane, closed_code, lobby, start_stream
from simple_websocket import Client
from test_lobby import get

from billing.ledger import Ledger
from billing.math import UsageCounter, aggregate, node_cost, parse_counter, vanished

RATE = 16000
FRAME = 320   # 20 ms


def stream(ws: Client, seconds: float, paced: bool = False) -> None:
    frame = (np.sin(np.arange(FRAME) * 0.1) * 8000).astype("<i2").tobytes()
    start = time.monotonic()
    for i in range(round(seconds / 0.02)):
        ws.send(frame)
        assert len(ws.receive(timeout=5)) == 2 * FRAME
        if paced:
            time.sleep(max(0.0, start + (i + 1) * 0.02 - time.monotonic()))


def billed(cp: ControlPlane, user: str) -> float:
    return sum(r.seconds for r in cp.ledger.usage(user))


def test_three_users_billed_within_2s(cp_billing: ControlPlane) -> None:
    cp = cp_billing
    durations = {"b1": 3.0, "b2": 5.0, "b3": 8.0}

    def one(user: str) -> None:
        ws = start_stream(lobby(cp.ws_url, f"user={user}&model=miku&region=us-west")[-1])
        stream(ws, durations[user])
        ws.send(json.dumps({"type": "stop"}))
        assert closed_code(ws)[0] == 1000

    threads = [threading.Thread(target=one, args=(u,)) for u in durations]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    cp.settle(time.time() + 120)           # every minute so far is closed by then
    for user, seconds in durations.items():
        assert abs(billed(cp, user) - seconds) <= 2.0, (user, billed(cp, user))
    status, body, _ = get(f"{cp.base_url}/api/usage?user=b3")
    assert status == 200 and body["user"] == "b3" and abs(body["seconds"] - 8.0) <= 2.0
    row = body["minutes"][0]
    assert row["model"] == "miku" and row["region"] == "us-west" and row["minute"].endswith(
        ":00Z")


def test_settling_twice_and_late_reports_never_double_count(state, db_url: str) -> None:
    ledger = Ledger.open(db_url)
    minute = 1_800_000_000 // 60 * 60
    field = "u1|s1|n1|miku|us-west"
    state.report_usage([(minute, field, 10.0), (minute + 60, field, 20.0)])
    state.report_usage([(minute, field, 10.0)])            # a repeated beat
    state.report_usage([(minute, field, 4.0)])             # a stale one cannot lower it
    now = minute + 200
    assert ledger.settle_from(state, now) == 2
    first = ledger.usage("u1")
    assert ledger.settle_from(state, now) == 0              # nothing new: nothing settled
    assert ledger.usage("u1") == first
    assert [r.seconds for r in first] == [10.0, 20.0]
    state.report_usage([(minute + 60, field, 25.0)])       # a late report for a closed minute
    ledger.settle_from(state, now + 1)
    assert [r.seconds for r in ledger.usage("u1")] == [10.0, 25.0]
    ledger.engine.dispose()


def test_usage_of_a_resumed_session_on_two_nodes_adds_up() -> None:
    rows = aggregate([UsageCounter(60, "u", "s", "a", "miku", "r", 30.0),
                      UsageCounter(60, "u", "s", "b", "miku", "r", 25.0),
                      UsageCounter(120, "u", "s", "b", "miku", "r", 60.0)])
    assert rows == {("u", 60, "miku", "r"): 55.0, ("u", 120, "miku", "r"): 60.0}


def test_counters_and_vanished_nodes_are_pure_math() -> None:
    assert parse_counter(60, "u|s:c|n|miku|r", 5.0) == UsageCounter(60, "u", "s:c", "n",
                                                                     "miku", "r", 5.0)
    assert parse_counter(60, "u|s|n|miku", 5.0) is None
    assert parse_counter(60, "u||n|miku|r", 5.0) is None
    bills = [("live", 100.0), ("gone", 90.0), ("never-seen", None)]
    assert vanished(bills, {"live"}, now=200.0) == {"gone": 90.0, "never-seen": 200.0}
    assert vanished(bills, {"live", "gone", "never-seen"}, now=200.0) == {}


def test_node_cost_is_exact() -> None:
    assert node_cost(0, 3600, Decimal("1.10")) == Decimal("1.100000")
    assert node_cost(0, 61, Decimal("1.10"), increment_s=60) == Decimal("0.036667")
    assert node_cost(0, 1, Decimal("3.6"), increment_s=3600) == Decimal("3.600000")
    total = sum((node_cost(0, 1, Decimal("0.10")) for _ in range(36000)), Decimal(0))
    assert total == Decimal("1.000000") or total == Decimal("36000") * Decimal("0.000028")


def test_fifty_concurrent_lobby_attempts_one_stream(cp_billing: ControlPlane) -> None:
    cp = cp_billing
    warm = lobby(cp.ws_url, "user=warmup&model=teto&region=us-west")[-1]   # boot a node
    start_stream(warm).close()
    results: list[dict] = []
    barrier = threading.Barrier(50)

    def attempt() -> None:
        barrier.wait()
        results.append(lobby(cp.ws_url, "user=racer&model=teto&region=us-west")[-1])

    threads = [threading.Thread(target=attempt) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ready = [r for r in results if r["type"] == "ready"]
    refused = [r for r in results if r.get("code") == "already_streaming"]
    assert len(ready) == 1 and len(refused) == 49, [r["type"] for r in results]
    assert "teto" in refused[0]["message"] and "take it over" in refused[0]["message"]
    ws = start_stream(ready[0])
    stream(ws, 0.2)


def test_take_over_leaves_exactly_one_and_stale_ticket_refused(cp_billing_keep: ControlPlane
                                                               ) -> None:
    cp = cp_billing_keep
    first = lobby(cp.ws_url, "user=tk&model=miku&region=us-west")[-1]
    old = start_stream(first)
    stream(old, 0.2)
    again = lobby(cp.ws_url, "user=tk&model=miku&region=us-west")[-1]
    assert again["type"] == "error" and again["code"] == "already_streaming"
    second = lobby(cp.ws_url, "user=tk&model=miku&region=us-west&takeover=1")[-1]
    assert second["type"] == "ready" and second["session_id"] != first["session_id"]
    code, reason = closed_code(old)
    assert code == 4409 and "taken over" in reason
    new = start_stream(second)
    stream(new, 0.2)
    stale = Client.connect(f"{first['node_url']}?ticket={first['ticket']}")
    code, _ = closed_code(stale)
    assert code in (4401, 4409)
    live = [s for n in cp.state.nodes() for s in cp.state.live_sessions(n.id)]
    assert live.count(second["session_id"]) == 1 and first["session_id"] not in live


def test_lock_released_at_stop_and_expires_without_heartbeats(cp_billing: ControlPlane
                                                              ) -> None:
    cp = cp_billing
    ready = lobby(cp.ws_url, "user=lk&model=kaito&region=us-west")[-1]
    ws = start_stream(ready)
    time.sleep(cp.config.heartbeat_interval_s * 2)        # the node keeps the lock alive
    assert cp.state.lock_holder("lk") == ready["session_id"]
    ws.send(json.dumps({"type": "stop"}))
    closed_code(ws)
    assert cp.state.lock_holder("lk") is None              # released at once on stop
    again = lobby(cp.ws_url, "user=lk&model=kaito&region=us-west")[-1]
    ws = start_stream(again)
    vm = next(v for v in cp.state.vms() if v["name"] == again["node_id"])
    os.kill(int(vm["pid"]), signal.SIGKILL)
    cp.wait(lambda: cp.state.lock_holder("lk") is None, 3 * cp.config.heartbeat_timeout_s,
            "lock outlived its stream")


def test_killed_node_loses_at_most_one_heartbeat(cp_billing: ControlPlane) -> None:
    cp = cp_billing
    ready = lobby(cp.ws_url, "user=kn&model=miku&region=us-east")[-1]
    ws = start_stream(ready)
    stream(ws, 5.0, paced=True)
    vm = next(v for v in cp.state.vms() if v["name"] == ready["node_id"])
    rec = cp.state.node(ready["node_id"])
    assert rec is not None
    os.kill(int(vm["pid"]), signal.SIGKILL)
    # what it streamed since its last heartbeat got through: one interval, or longer when
    # the shared machine delayed that beat
    unreported = max(cp.config.heartbeat_interval_s, time.time() - rec.last_seen)
    cp.settle(time.time() + 120)
    lost = 5.0 - billed(cp, "kn")
    assert 0 <= lost <= unreported + 0.1, (lost, unreported)


def test_node_costs_match_lifetime_times_price(cp_billing: ControlPlane) -> None:
    cp = cp_billing
    ready = lobby(cp.ws_url, "user=nc&model=teto&region=eu-west")[-1]
    node_id = ready["node_id"]
    cp.wait(lambda: any(r["node_id"] == node_id for r in cp.ledger.node_costs()), 10,
            "node not on the bill while running")
    cp.wait(lambda: cp.state.node(node_id) is None, 30, "idle node not stopped")
    row = cp.wait(lambda: next((r for r in cp.ledger.node_costs()
                                if r["node_id"] == node_id and r["stopped_at"]), None), 10)
    lifetime = (row["stopped_at"] - row["started_at"]).total_seconds()
    assert 0 < lifetime < 60
    price = Decimal(str(row["price_per_hour"]))
    assert price == Decimal("1.10")
    expected = (Decimal(math.ceil(lifetime / 60) * 60) * price / 3600).quantize(
        Decimal("0.000001"))
    assert Decimal(str(row["cost"])) == expected


@pytest.mark.parametrize("query, needle", [("user=bad%20id", "A-Z"), ("", "no user id"),
                                           ("user=ok&since=yesterday", "ISO-8601")])
def test_usage_api_bad_input(cp_billing: ControlPlane, query: str, needle: str) -> None:
    status, body, _ = get(f"{cp_billing.base_url}/api/usage?{query}")
    assert status == 400 and body["error"] == "bad_request" and needle in body["message"]
