"""The control plane end to end: a real Celery worker, real Redis, real local-driver nodes."""

from __future__ import annotations

import json
import threading
import time

from conftest import (
    ControlPlane,
    Webapp,
    closed_code,
    control_plane_config,
    lobby,
    push_version,
    running_control_plane,
    start_stream,
)
from simple_websocket import Client
from test_node import stream_tone

from common.config import Config
from provisioner.placement import candidates_for
from provisioner.state import Admitted, State
from provisioner.states import NodeState
from research.quality import harmonic_tone


def fake_node(state: State, node_id: str, model: str = "miku", capacity: int = 4) -> None:
    state.heartbeat({"id": node_id, "provider": "local", "region": "us-west", "model": model,
                     "version": "1", "state": "ready", "capacity": capacity,
                     "url": "ws://127.0.0.1:1/ws"}, time.time())


def test_100_concurrent_admissions_never_overfill(state: State) -> None:
    """The lobby's one atomic step (lock, queue, assign) raced by 100 users at once."""
    ids = [f"n{i}" for i in range(3)]
    for node_id in ids:
        fake_node(state, node_id)
    won: list[str | None] = []
    barrier = threading.Barrier(100)

    def admit(i: int) -> None:
        barrier.wait()
        got = state.admit(f"u{i}", f"s{i}", "miku", "1", "us-west", time.time(), ids,
                          lock_ttl_s=60, takeover=False, resume=False, tau_s=600,
                          hold_s=60, heartbeat_timeout_s=6)
        assert isinstance(got, Admitted)
        won.append(got.node)

    threads = [threading.Thread(target=admit, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 100
    assert {n: won.count(n) for n in ids} == {"n0": 4, "n1": 4, "n2": 4}
    assert won.count(None) == 88
    assert [state.node(n).sessions for n in ids] == [4, 4, 4]   # type: ignore[union-attr]
    assert state.queue_lengths()["miku|1|us-west"] == 88      # the rest wait, in order


def test_slot_freed_after_the_lobbys_cached_view_is_still_found(state: State,
                                                                 cfg: Config) -> None:
    """The lobby places from a fleet view up to 100 ms old: a node it shows full must still
    be tried (last), or a user arriving just after a stream ended would wait for nothing."""
    fake_node(state, "full")
    for i in range(4):
        state.admit(f"u{i}", f"s{i}", "miku", "1", "us-west", time.time(), ["full"],
                    lock_ttl_s=60, takeover=False, resume=False, tau_s=600, hold_s=60,
                    heartbeat_timeout_s=6)
    fake_node(state, "roomy")
    stale = state.nodes()                        # "full" shows 4 of 4
    assert candidates_for(cfg, "miku", "1", "us-west", stale, time.time()) == ["roomy", "full"]
    state.forget_node("roomy")
    state.release_slot("full", "s0")             # a stream ended after the view was read
    got = state.admit("late", "s-late", "miku", "1", "us-west", time.time(),
                      candidates_for(cfg, "miku", "1", "us-west", stale, time.time()),
                      lock_ttl_s=60,
                      takeover=False, resume=False, tau_s=600, hold_s=60,
                      heartbeat_timeout_s=6)
    assert isinstance(got, Admitted) and got.node == "full"


def test_assign_hands_out_in_order_and_never_overfills(state: State) -> None:
    fake_node(state, "a")
    fake_node(state, "b")
    pool = "miku|1|us-west"
    for i in range(12):
        state.enqueue(pool, f"s{i:02d}", 1000.0 + i)
    threads = [threading.Thread(target=state.assign, args=(pool, ["a", "b"], time.time(), 60, 6))
               for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = state.take_assignments([(f"u{i}", f"s{i:02d}", 1) for i in range(12)])
    assert [got.get(f"s{i:02d}") for i in range(8)] == ["a"] * 4 + ["b"] * 4   # oldest first
    assert all(got.get(f"s{i:02d}") is None for i in range(8, 12))
    assert state.position(pool, "s08") == 1 and state.position(pool, "s11") == 4


def test_waiting_user_sees_queued_then_booting_then_ready(redis_url: str,
                                                          sqlite_url: str) -> None:
    # A load longer than the waiting room's backstop step: the boot is there to be seen
    # (with 0.3 s, a node could be ready before the room's next look: queued, then ready).
    cfg = control_plane_config(redis_url, database_url=sqlite_url, model_load_s=1.5)
    with running_control_plane(cfg) as control_plane:
        _queued_booting_ready(control_plane)


def _queued_booting_ready(control_plane: ControlPlane) -> None:
    msgs = lobby(control_plane.ws_url, "user=w1&model=teto&region=eu-west")
    kinds = [m["type"] for m in msgs]
    assert kinds[0] == "queued" and msgs[0]["position"] == 1, msgs
    assert "booting" in kinds and kinds[-1] == "ready", msgs
    booting = [m for m in msgs if m["type"] == "booting"]
    assert all(0 <= m["eta_s"] <= 5 for m in booting)
    ready = msgs[-1]
    node = control_plane.state.node(ready["node_id"])
    assert node is not None and (node.model, node.region) == ("teto", "eu-west")
    ws = start_stream(ready)
    assert len(stream_tone(ws, harmonic_tone(150.0, 16000, 0.2), frame=320)) == 3200


def test_nine_users_pack_onto_three_nodes_other_model_separate(cp_slow_grace: ControlPlane
                                                               ) -> None:
    cp = cp_slow_grace
    results: dict[str, dict] = {}

    def one(user: str, model: str) -> None:
        results[user] = lobby(cp.ws_url, f"user={user}&model={model}&region=us-east")[-1]

    threads = [threading.Thread(target=one, args=(f"m{i}", "miku")) for i in range(9)]
    threads.append(threading.Thread(target=one, args=("t0", "teto")))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r["type"] == "ready" for r in results.values()), results
    miku_nodes = [results[f"m{i}"]["node_id"] for i in range(9)]
    assert len(set(miku_nodes)) == 3
    assert sorted(miku_nodes.count(n) for n in set(miku_nodes)) in ([1, 4, 4], [2, 3, 4],
                                                                     [3, 3, 3])
    teto = results["t0"]["node_id"]
    assert teto not in miku_nodes and cp.state.node(teto).model == "teto"  # type: ignore


def test_idle_nodes_stop_after_grace(control_plane: ControlPlane) -> None:
    cp = control_plane
    ready = lobby(cp.ws_url, "user=i1&model=kaito&region=us-west")[-1]
    node_id = ready["node_id"]
    ws = start_stream(ready)
    time.sleep(cp.config.idle_grace_s + 1.5)           # streaming: never stopped
    assert cp.state.node(node_id) is not None
    ws.send(json.dumps({"type": "stop"}))
    assert closed_code(ws)[0] == 1000
    cp.wait(lambda: cp.state.node(node_id) is None, 20, "idle node not stopped")
    vms = [vm for vm in cp.state.vms() if vm["name"] == node_id]
    assert vms == []                                      # the VM is gone too


def test_deploy_drains_old_version_without_cutting_streams(control_plane: ControlPlane) -> None:
    cp = control_plane
    old = lobby(cp.ws_url, "user=d1&model=miku&region=us-west")[-1]
    ws = start_stream(old)
    push_version(cp.state, cp.config, "miku", semitones=5)
    cp.wait(lambda: (n := cp.state.node(old["node_id"])) and n.state is NodeState.DRAINING,
            10, "old node not draining")
    new = lobby(cp.ws_url, "user=d2&model=miku&region=us-west")[-1]
    assert new["type"] == "ready" and new["node_id"] != old["node_id"]
    assert cp.state.node(new["node_id"]).version == "2"   # type: ignore[union-attr]
    tone = harmonic_tone(150.0, 16000, 1.0)
    assert len(stream_tone(ws, tone, frame=320)) == 16000   # the old stream is unharmed
    ws.send(json.dumps({"type": "stop"}))
    assert closed_code(ws)[0] == 1000
    cp.wait(lambda: cp.state.node(old["node_id"]) is None, 20, "drained node not stopped")


def test_drain_deadline_moves_users_to_new_version(control_plane: ControlPlane) -> None:
    cp = control_plane
    old = lobby(cp.ws_url, "user=e1&model=teto&region=us-west")[-1]
    ws = start_stream(old)
    push_version(cp.state, cp.config, "teto", drain_s=1.0)
    code, reason = closed_code(ws, timeout_s=15)
    assert code == 4503 and "resume" in reason
    again = lobby(cp.ws_url, f"user=e1&model=teto&region=us-west&resume={old['session_id']}")
    assert again[-1]["type"] == "ready" and again[-1]["session_id"] == old["session_id"]
    assert cp.state.node(again[-1]["node_id"]).version == "2"   # type: ignore[union-attr]


def test_crashed_node_is_reaped_and_user_resumes(control_plane: ControlPlane) -> None:
    import os
    import signal

    cp = control_plane
    first = lobby(cp.ws_url, "user=c1&model=miku&region=us-west")[-1]
    _held = start_stream(first)   # streaming when the node dies
    vm = next(v for v in cp.state.vms() if v["name"] == first["node_id"])
    os.kill(int(vm["pid"]), signal.SIGKILL)                 # the GPU dies
    cp.wait(lambda: cp.state.node(first["node_id"]) is None, 20, "dead node not reaped")
    again = lobby(cp.ws_url, f"user=c1&model=miku&region=us-west&resume={first['session_id']}")
    assert again[-1]["type"] == "ready" and again[-1]["node_id"] != first["node_id"]
    assert again[-1]["session_id"] == first["session_id"]


def test_scale_up_is_event_driven(redis_url: str, sqlite_url: str) -> None:
    """The beat's tick is an hour away, so only the lobby's kick can boot a node in time."""
    cfg = control_plane_config(redis_url, database_url=sqlite_url)
    with running_control_plane(cfg, tick_s=3600) as cp:
        ws = Client.connect(f"{cp.ws_url}/ws/session?user=f1&model=kaito&region=ap-northeast")
        cp.wait(lambda: cp.live_nodes("kaito"), 5, "no node requested: the kick scaled nothing")
        ws.close()


def test_concurrent_lobbies_get_their_own_sessions(webapp: Webapp) -> None:
    """Thirty users open the lobby at once (no node, nothing scales: all wait): each gets a
    session of its own, and each session its own place in the one queue."""
    users = [f"q{i}" for i in range(30)]
    first: dict[str, dict] = {}
    opened = threading.Barrier(len(users))
    answered, counted = threading.Barrier(len(users) + 1), threading.Event()

    def open_lobby(user: str) -> None:
        opened.wait()
        ws = Client.connect(f"{webapp.ws_url}/ws/session?user={user}&model=miku"
                            "&region=us-west")
        first[user] = json.loads(ws.receive(timeout=10))
        answered.wait(20)
        counted.wait(20)    # everyone still waits while the queue is counted
        ws.close()

    threads = [threading.Thread(target=open_lobby, args=(u,)) for u in users]
    for t in threads:
        t.start()
    answered.wait(20)
    waiting = webapp.state.queue_lengths()
    counted.set()
    for t in threads:
        t.join(30)
    assert {m["type"] for m in first.values()} == {"queued"}, first
    assert len({m["session_id"] for m in first.values()}) == len(users)
    assert waiting == {"miku|1|us-west": len(users)}


def test_idle_node_of_another_model_is_retargeted_not_booted(cp_slow_grace: ControlPlane
                                                             ) -> None:
    cp = cp_slow_grace
    first = lobby(cp.ws_url, "user=r1&model=kaito&region=eu-west")[-1]
    ws = start_stream(first)
    ws.send(json.dumps({"type": "stop"}))
    closed_code(ws)
    time.sleep(3)    # kaito's arrival-rate average decays: its idle nodes become spare
    before = {vm["name"] for vm in cp.state.vms()}
    second = lobby(cp.ws_url, "user=r2&model=teto&region=eu-west")[-1]
    assert second["type"] == "ready"
    node = cp.state.node(second["node_id"])
    assert node is not None and node.model == "teto"
    assert second["node_id"] in before                       # an existing VM, reloaded
    ws = start_stream(second)
    assert ws.started["model"] == "teto"
