"""Region loss moves users: a region marked down is skipped by waiting lobbies (they wait in
the nearest healthy region instead, and say so) and by the autoscaler until it recovers;
users who named it are told and may choose another. Real webapp, nodes, Celery and Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

from conftest import ControlPlane, Fleet, Webapp, lobby, start_stream
from simple_websocket import Client

from common.config import Config
from provisioner import fleet as fleet_ops
from provisioner.state import State

SF = "lat=37.8&lon=-122.4"   # us-west; us-east is beyond the 60 ms latency budget


def _until(ws: Client, kind: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Messages up to and including the first of type `kind`."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        raw = ws.receive(timeout=0.2)
        if raw is not None:
            out.append(json.loads(raw))
            if out[-1]["type"] == kind:
                return out
    raise AssertionError(f"no {kind} in {timeout_s} s: {out}")


def _drain(ws: Client) -> list[dict[str, Any]]:
    out = []
    while (raw := ws.receive(timeout=0.05)) is not None:
        out.append(json.loads(raw))
    return out


def test_waiting_lobby_moves_out_of_a_region_that_goes_down(webapp: Webapp,
                                                           fleet: Fleet) -> None:
    """The lobby picked the region once: a user queued in us-west stayed there after us-west
    went down, though us-east had room. Now it re-places and tells the user."""
    east = fleet.start("miku", region="us-east")
    ws = Client.connect(f"{webapp.ws_url}/ws/session?user=w1&model=miku&{SF}")
    first = json.loads(ws.receive(timeout=5))
    assert (first["type"], first["region"]) == ("queued", "us-west"), first
    webapp.state.mark_region_down("us-west", time.time() + 60)   # as the reaper does
    webapp.state.wake_lobbies()
    msgs = _until(ws, "ready")   # then the server closes
    ready = msgs[-1]
    assert (ready["node_id"], ready["region"]) == (east, "us-east"), msgs
    assert "us-west is down" in ready["note"] and "us-east" in ready["note"], ready
    assert webapp.state.queue_lengths().get("miku|1|us-west") == 0


def test_user_who_named_a_down_region_is_told_and_offered_others(webapp: Webapp) -> None:
    webapp.state.mark_region_down("us-west", time.time() + 60)
    ws = Client.connect(f"{webapp.ws_url}/ws/session?user=p1&model=miku&region=us-west")
    first = json.loads(ws.receive(timeout=5))
    ws.close()
    assert (first["type"], first["region"]) == ("queued", "us-west"), first
    assert "us-west is down" in first["note"], first
    assert "choose another region: us-east" in first["note"], first


def test_region_outage_moves_users_and_the_scaler_stays_out(control_plane: ControlPlane
                                                           ) -> None:
    """kill-region: the user resumes at once in the next nearest region; a user who named
    the dead region waits there, told so, and no node boots into it while it is down (the
    scaler booted into it 17 ms after marking it down)."""
    cp = control_plane
    first = lobby(cp.ws_url, f"user=o1&model=miku&{SF}")[-1]
    assert first["region"] == "us-west"
    _held = start_stream(first)
    t_kill = time.time()
    out = subprocess.run([sys.executable, "-m", "voicectl", "kill-region", "us-west", "--json"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "REDIS_URL": cp.config.redis_url or ""})
    assert first["node_id"] in json.loads(out.stdout)["killed"], out.stderr
    pinned = Client.connect(f"{cp.ws_url}/ws/session?user=o2&model=miku&region=us-west")
    # told at once, or at the waiting room's first look if this process's shared fleet view
    # was read just before the kill (a stale view is served while a fresh one is read)
    told = json.loads(pinned.receive(timeout=5))
    while "note" not in told:   # the stale view may show a node booting there (a buffer)
        assert told["type"] in ("queued", "booting") and told["region"] == "us-west", told
        told = json.loads(pinned.receive(timeout=5))
    assert told["region"] == "us-west" and "us-west is down" in told["note"], told
    again = lobby(cp.ws_url, f"user=o1&model=miku&{SF}&resume={first['session_id']}")[-1]
    assert again["type"] == "ready" and again["region"] == "us-east", again
    time.sleep(1.5)   # three beat ticks, and kicks, with a user waiting in us-west
    booted = [(n.id, n.state.value) for n in cp.state.nodes()   # the killed ones may
              if n.region == "us-west" and n.requested_at > t_kill]  # linger till reaped
    assert booted == [], booted
    assert all(m["type"] == "queued" for m in _drain(pinned)), "a node was found in us-west"
    pinned.close()
    status = {r["name"]: r["state"] for r in json.loads(
        urllib.request.urlopen(f"{cp.base_url}/api/regions", timeout=5).read())}
    assert status["us-west"] == "down" and status["us-east"] == "up"


def test_nodes_lost_together_are_an_outage_one_alone_a_crash(state: State, cfg: Config) -> None:
    """The reaper marks a region down only when two or more serving nodes went at once: a
    single crash is replaced in place (its users, even those who named the region, get a
    node there again) instead of sending everyone away for a minute."""
    now = time.time()
    missed_one = now - 2 * cfg.heartbeat_interval_s    # alive: under the 3-beat timeout
    for node_id, region, seen in [("w1", "us-west", now - 10), ("w2", "us-west", missed_one),
                                  ("e1", "us-east", now - 10), ("e2", "us-east", now),
                                  ("x1", "eu-west", now - 10)]:
        state.heartbeat({"id": node_id, "provider": "local", "region": region,
                         "model": "miku", "version": "1", "state": "ready", "capacity": 4,
                         "url": "ws://127.0.0.1:1/ws"}, seen)
    state.stamp_beat_path(now - 60, gap_s=60)          # a webapp took heartbeats all along
    ended: list[object] = []
    dead = fleet_ops.reap(state, cfg, now, ended.append)
    assert sorted(dead) == ["e1", "w1", "x1"]           # w2 only missed one beat
    assert state.regions_down(now) == {"us-west"}       # w2 fell with w1; e2 lives; x1 alone
