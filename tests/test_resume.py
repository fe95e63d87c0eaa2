"""Resume after a crash lands on a live node: a client's `resume` reports its node lost, so
neither it nor anyone else is placed there until that node heartbeats again, and the
resuming user is demand for the autoscaler at once. Real nodes, real webapp, real Redis."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from conftest import (
    ControlPlane,
    Fleet,
    Webapp,
    control_plane_config,
    lobby,
    running_control_plane,
    start_stream,
)


def test_resume_lands_on_the_warm_spare_within_2_s(webapp: Webapp, fleet: Fleet) -> None:
    """A node serving 3 of 4 streams dies. Its free slot, and each resumer's own old slot,
    looked like room until its last heartbeat aged out (the resumes got `ready` for the dead
    node 350 times in 4.8 s); now each resume, and a new user who arrives after the first
    report, lands on the live spare within 2 s of the crash."""
    ids = [fleet.start("miku", wait=False) for _ in range(2)]
    for node_id in ids:
        fleet.wait_state(node_id, "ready")
    q = "model=miku&region=us-west"
    first = [lobby(webapp.ws_url, f"user=r{i}&{q}")[-1] for i in range(3)]
    dead = first[0]["node_id"]
    assert {r["node_id"] for r in first} == {dead}          # packed onto one node
    spare = next(n for n in ids if n != dead)
    _held = [start_stream(r) for r in first]                 # streaming when it dies
    proc = fleet.procs[ids.index(dead)]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = [lobby(webapp.ws_url, f"user=r0&{q}&resume={first[0]['session_id']}")[-1]]
    newcomer = lobby(webapp.ws_url, f"user=n0&{q}")[-1]      # the dead node still shows 3/4
    resumed += [lobby(webapp.ws_url, f"user=r{i}&{q}&resume={first[i]['session_id']}")[-1]
                for i in (1, 2)]
    took_s = time.monotonic() - t0
    print(f"three resumes and a newcomer placed {took_s:.2f} s after the crash")
    assert [r.get("node_id") for r in resumed] == [spare] * 3, resumed
    assert [r["session_id"] for r in resumed] == [r["session_id"] for r in first]
    assert newcomer.get("node_id") == spare, newcomer
    assert took_s < 2.0, f"resumed {took_s:.2f} s after the crash"
    assert start_stream(resumed[0]).started["session_id"] == first[0]["session_id"]
    rec = fleet.state.node(dead)
    assert rec is not None and rec.reported_lost       # not reaped yet: the report did it


@pytest.fixture
def cp_slow_beats(redis_url: str, sqlite_url: str) -> Iterator[ControlPlane]:
    """A control plane whose nodes count as dead only 15 s after their last heartbeat."""
    cfg = control_plane_config(redis_url, database_url=sqlite_url, heartbeat_interval_s=5.0)
    with running_control_plane(cfg) as cp:
        yield cp


def test_resume_without_a_spare_boots_a_node_at_once(cp_slow_beats: ControlPlane) -> None:
    """No warm capacity: the resuming user is demand at once (the dead node's free slot is
    no room), so a node boots and takes the user long before the dead one is reaped."""
    cp = cp_slow_beats
    first = lobby(cp.ws_url, "user=c1&model=miku&region=us-west")[-1]
    _held = start_stream(first)
    cp.wait(lambda: [n.id for n in cp.live_nodes()] == [first["node_id"]], 30,
            "a warm spare stayed up")
    vm = next(v for v in cp.state.vms() if v["name"] == first["node_id"])
    t0 = time.monotonic()
    os.kill(int(vm["pid"]), signal.SIGKILL)
    again = lobby(cp.ws_url, f"user=c1&model=miku&region=us-west&resume={first['session_id']}")
    took_s = time.monotonic() - t0
    ready = again[-1]
    assert ready["type"] == "ready" and ready["node_id"] != first["node_id"], again
    assert ready["session_id"] == first["session_id"]
    assert cp.state.node(first["node_id"]) is not None   # the dead node is not even reaped yet
    assert took_s < cp.config.heartbeat_timeout_s - 3, f"resumed after {took_s:.1f} s"
    print(f"resume with a boot: {took_s:.2f} s after the crash")
    assert start_stream(ready).started["session_id"] == first["session_id"]


def test_a_waiting_session_resumed_while_its_old_lobby_is_open_is_placed(
        webapp: Webapp, fleet: Fleet) -> None:
    """The page lost its waiting lobby and resumed through a new one while the server still
    held the old one (a half-open connection). The old lobby's clean-up, when it goes, must
    leave the resume's turn, lock and node be: the resume is placed once a node serves."""
    import json

    from simple_websocket import Client

    q = "user=half&model=miku&region=us-west"
    old = Client.connect(f"{webapp.ws_url}/ws/session?{q}")
    queued = json.loads(old.receive(timeout=10))
    assert queued["type"] == "queued", queued
    again = Client.connect(f"{webapp.ws_url}/ws/session?{q}&resume={queued['session_id']}")
    assert json.loads(again.receive(timeout=10))["type"] == "queued"
    old.close()   # the old lobby goes now, after the resume took the session over
    time.sleep(1.0)
    node_id = fleet.start("miku")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        raw = again.receive(timeout=0.5)
        if raw is not None and json.loads(raw)["type"] in ("ready", "error"):
            break
    else:
        raise AssertionError("the resumed session was never placed")
    got = json.loads(raw)
    assert got["type"] == "ready" and got["node_id"] == node_id, got
    assert got["session_id"] == queued["session_id"]   # (the server closes the lobby)
