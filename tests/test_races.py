"""The races a code review found, each pinned: duplicate connections of one session,
resume as a back door to a second stream, leaked assignments, double retire, repairs."""

from __future__ import annotations

import json
import threading
import time

from conftest import ControlPlane, Fleet, closed_code, lobby, push_version, serve, start_stream
from simple_websocket import Client
from test_node import stream_tone, ticket

from common.config import Config
from common.states import NodeState
from provisioner import catalog
from provisioner.state import Admitted, State, connect, lock_key, slots_key
from research.quality import harmonic_tone
from webapp.app import create_app
from worker_node.runtime import NodeRuntime, Stream


def test_second_connection_of_a_session_replaces_the_first(fleet: Fleet) -> None:
    node_id = fleet.start("miku")
    url = fleet.url(node_id)
    first = start_stream({"node_url": url, "ticket": ticket(
        node_id, state=fleet.state, user="dup", session="s-dup", fence=1)}, rate=48000)
    second = start_stream({"node_url": url, "ticket": ticket(   # a resume: a new ticket
        node_id, state=fleet.state, user="dup", session="s-dup", fence=2)}, rate=48000)
    code, reason = closed_code(first)
    assert code == 4409 and "replaced" in reason
    time.sleep(0.3)   # the first handler has ended: it must not free the live slot or lock
    assert fleet.state.live_sessions(node_id) == ["s-dup"]
    others = [start_stream({"node_url": url,
                            "ticket": ticket(node_id, state=fleet.state, user=f"o{i}")},
                           rate=48000) for i in range(3)]
    full = Client.connect(f"{url}?ticket={ticket(node_id, state=fleet.state, user='o9')}")
    assert closed_code(full)[0] == 4503               # still 4 streams at most
    assert len(stream_tone(second, harmonic_tone(150.0, 48000, 0.1))) == 4800
    for ws in others:
        ws.close()


def test_usage_counters_are_per_connection() -> None:
    node = NodeRuntime("n", "miku", "1", "us-west", "local", 4.0, 4, 0.0)
    a, b = Stream("s", "u", 1), Stream("s", "u", 2)
    node.add_seconds(a, 40.0, 60.0)
    node.add_seconds(b, 20.0, 70.0)
    fields = {f for _, f, _ in node.usage([a, b])}
    assert len(fields) == 2            # a resumed connection does not hide under the old


def test_a_take_over_order_closes_the_old_connection_not_the_resume_that_replaced_it() -> None:
    """The lobby's kick (and a heartbeat's `lost`) name the session; a resume of it may have
    reached this node first. Only connections under the new holder's fence close."""
    node = NodeRuntime("n", "miku", "1", "us-west", "local", "d", 4, 0.0)
    node.state = NodeState.READY
    closed: list[tuple[str, int]] = []
    old, new = Stream("s", "u", 1), Stream("s", "u", 2)
    old.kick = lambda code, why: closed.append(("old", code))
    new.kick = lambda code, why: closed.append(("new", code))
    assert node.open(old) is None and node.open(new) is None   # the resume replaced it here
    assert closed == [("old", 4409)]
    node.kick("s", 4409, "taken over", below=2)                # the order for fence 2
    assert closed == [("old", 4409)]                           # the resume streams on
    node.kick("s", 4409, "taken over", below=3)                # a newer holder elsewhere
    assert closed == [("old", 4409), ("new", 4409)]


def test_resume_cannot_open_a_second_stream(control_plane: ControlPlane) -> None:
    cp = control_plane
    first = lobby(cp.ws_url, "user=rs&model=miku&region=us-west")[-1]
    old = start_stream(first)
    again = lobby(cp.ws_url, f"user=rs&model=miku&region=us-west&resume={first['session_id']}")
    assert again[-1]["type"] == "ready"
    code, _ = closed_code(old, timeout_s=10)          # the old connection is closed
    assert code == 4409
    new = start_stream(again[-1])
    assert len(stream_tone(new, harmonic_tone(150.0, 16000, 0.1), frame=320)) == 1600


def test_a_resume_that_replaces_a_waiter_mid_step_gets_its_node(state: State,
                                                                  cfg: Config) -> None:
    """The room reads its waiters, then a resume of one's session replaces it (same pool, a
    new fence) before the step hands out the node: the resume gets it. (It went back as if
    the lobby had left: the user waited forever, the queue empty and the node idle.)"""
    from provisioner.versions import Version
    from webapp.fleetview import FleetCache
    from webapp.waiting import Waiter, WaitingRoom

    state.heartbeat({"id": "a", "provider": "local", "region": "us-west", "model": "miku",
                     "version": "1", "state": "ready", "capacity": 4, "url": "ws://x"},
                    time.time())
    pool, model = "miku|1|us-west", Version("miku", "1", "d")
    first = Waiter("u", "s-1", 1, pool, model, "us-west")
    resumed = Waiter("u", "s-1", 2, pool, model, "us-west")
    fleet, swapped = FleetCache(state), threading.Event()

    def read():  # type: ignore[no-untyped-def]
        if first.node_id is None and not swapped.is_set():   # this step read `first`
            swapped.set()
            room.enter(resumed)   # the old lobby has not noticed its client went
        return fleet.get(fresh=True)

    room = WaitingRoom(state, cfg, read, lambda *_: ["a"], backstop_s=3600)
    state.enqueue(pool, "s-1", time.time())
    room.enter(first)
    try:
        deadline = time.monotonic() + 10
        while resumed.node_id is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert swapped.is_set() and resumed.node_id == "a"
        assert state.r.zscore(slots_key("a"), "s-1") is not None   # still reserved for it
        assert first.lost   # its lobby ends (its client is gone), not waiting on for minutes
    finally:
        room.leave(resumed)


def test_a_waiter_whose_session_was_resumed_elsewhere_leaves_its_node_to_the_resume(
        state: State, cfg: Config) -> None:
    """A waiting lobby's session is resumed through another webapp (a newer fence) and, before
    this room's next lock check notices, a node frees up: the room does not give it to the
    stale lobby (whose client is gone) but leaves it for the resume's room."""
    from provisioner.versions import Version
    from webapp.fleetview import FleetCache
    from webapp.waiting import Waiter, WaitingRoom

    pool, now = "miku|1|us-west", time.time()
    first = state.admit("u", "s-1", "miku", "1", "us-west", now, [], lock_ttl_s=60,
                        takeover=False, resume=False, tau_s=1, hold_s=3, heartbeat_timeout_s=6)
    assert isinstance(first, Admitted)
    stale = Waiter("u", "s-1", first.lock.fence, pool, Version("miku", "1", "d"), "us-west")
    fleet = FleetCache(state)
    room = WaitingRoom(state, cfg, lambda: fleet.get(fresh=True), lambda *_: ["a"],
                       backstop_s=3600)
    room.enter(stale)   # its first step checks the lock (good) and finds no node
    try:
        time.sleep(0.3)
        again = state.admit("u", "s-1", "miku", "1", "us-west", time.time(), [], lock_ttl_s=60,
                            takeover=False, resume=True, tau_s=1, hold_s=3,
                            heartbeat_timeout_s=6)   # the resume, through another webapp
        assert isinstance(again, Admitted) and again.lock.fence > first.lock.fence
        state.heartbeat({"id": "a", "provider": "local", "region": "us-west", "model": "miku",
                         "version": "1", "state": "ready", "capacity": 4, "url": "ws://x"},
                        time.time())
        room.poke()   # a step well within the 2 s until its next lock check
        time.sleep(0.5)
        assert stale.node_id is None
        assert state.take_assignments([("u", "s-1", again.lock.fence)]) == {"s-1": "a"}
    finally:
        room.leave(stale)


def test_a_newer_fence_of_the_session_takes_its_lock_an_older_one_is_told_it_lost(
        state: State) -> None:
    """Keeping a lock alive: the same session under an older fence (a lock re-created from a
    stale report) yields to the newer one, as in a heartbeat; the older is told it lost."""
    state.refresh_locks("n-1", [("u", "s-1", 1)], 60)             # re-created, fence 1
    assert state.refresh_locks("n-2", [("u", "s-1", 2)], 60) == []  # the resume keeps it
    assert state.r.hget(lock_key("u"), "fence") == "2"
    assert state.refresh_locks("n-1", [("u", "s-1", 1)], 60) == ["s-1"]
    assert state.refresh_locks("n-3", [("u", "s-9", 3)], 60) == ["s-9"]   # another session


def test_abandoned_assignment_gives_the_slot_back(state: State) -> None:
    state.heartbeat({"id": "a", "provider": "local", "region": "us-west", "model": "miku",
                     "version": "1", "state": "ready", "capacity": 4, "url": "ws://x"},
                    time.time())
    pool = "miku|1|us-west"
    state.enqueue(pool, "s1", time.time())
    assert state.assign(pool, ["a"], time.time(), 60, 6) == 1
    state.abandon(pool, "s1", "u", 1)                 # the user left before picking it up
    assert state.take_assignments([("u", "s1", 1)]) == {}
    assert state.r.zcard(slots_key("a")) == 0 and state.position(pool, "s1") is None


def test_a_lobby_that_leaves_after_a_resume_took_its_session_over_leaves_it_be(
        state: State) -> None:
    """A waiting lobby learns its session was resumed elsewhere (a newer fence) and leaves:
    the queue entry, the node given and the lock are the resume's now, and stay; the
    resume's own leaving takes them back."""
    pool, now = "miku|1|us-west", time.time()
    first = state.admit("u", "s1", "miku", "1", "us-west", now, [], lock_ttl_s=60,
                        takeover=False, resume=False, tau_s=1, hold_s=3, heartbeat_timeout_s=6)
    again = state.admit("u", "s1", "miku", "1", "us-west", now, [], lock_ttl_s=60,
                        takeover=False, resume=True, tau_s=1, hold_s=3, heartbeat_timeout_s=6)
    assert isinstance(first, Admitted) and isinstance(again, Admitted)
    assert again.lock.fence > first.lock.fence
    state.abandon(pool, "s1", "u", first.lock.fence)          # the old lobby's clean-up
    assert state.position(pool, "s1") == 1 and state.lock_holder("u") == "s1"
    state.abandon(pool, "s1", "u", again.lock.fence)          # the resume's
    assert state.position(pool, "s1") is None and state.lock_holder("u") is None


def test_retire_twice_and_live_slots_repaired(state: State) -> None:
    state.heartbeat({"id": "b", "provider": "local", "region": "us-west", "model": "miku",
                     "version": "1", "state": "ready", "capacity": 4, "url": "ws://x"},
                    time.time())
    assert state.retire("b", time.time()) is True
    assert state.retire("b", time.time()) is False    # only one of two racing stops wins
    state.sync_live("b", ["ghost"])                   # a release that never happened
    state.sync_live("b", ["real"])
    assert state.live_sessions("b") == ["real"]


def test_rollback_undrains_the_old_version(control_plane: ControlPlane) -> None:
    cp = control_plane
    ready = lobby(cp.ws_url, "user=rb&model=kaito&region=us-west")[-1]
    ws = start_stream(ready)
    push_version(cp.state, cp.config, "kaito", semitones=-3)
    cp.wait(lambda: cp.state.node(ready["node_id"]).state.value == "draining", 10)  # type: ignore
    catalog.change(cp.state, cp.config, "kaito", "deploy", time.time(), version="1")
    cp.wait(lambda: cp.state.node(ready["node_id"]).state.value == "ready", 10,  # type: ignore
            "rolled-back version still draining")
    ws.send(json.dumps({"type": "stop"}))


def test_lobby_says_unavailable_when_redis_is_down(cfg: Config) -> None:
    dead = State(connect("redis://127.0.0.1:1/0"))
    host, server = serve(create_app(cfg, dead))
    try:
        got: list[dict] = []
        t = threading.Thread(target=lambda: got.extend(
            lobby(f"ws://{host}", "user=x&model=miku&region=us-west", timeout_s=60)))
        t.start()
        t.join(70)
        assert got and got[-1]["code"] == "unavailable", got
    finally:
        server.shutdown()
