"""Redis with failover (issue 20): a primary, a replica and three sentinels as real
processes. The live state follows a failover through the sentinels; so do the lobby,
the nodes' heartbeats and Celery, while streams never stop (nodes stream without Redis)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from conftest import control_plane_config, lobby, running_control_plane, start_stream
from sentinels import PASSWORD, SENTINEL, sentinel_redis

from provisioner.state import State, connect
from provisioner.state.keys import placed_key

pytestmark = pytest.mark.skipif(SENTINEL is None, reason="Debian's redis-sentinel is not "
                                "installed (apt-get install redis-sentinel; .ci/run does)")


def back_after(state: State, since: float, limit_s: float = 20.0) -> float:
    """Seconds from `since` until a write and a read of the live state work again."""
    while time.monotonic() - since < limit_s:
        try:
            state.r.set("test:probe", "1")
            if state.r.get("test:probe") == "1":
                return time.monotonic() - since
        except Exception:  # noqa: BLE001  any redis error: not back yet
            time.sleep(0.05)
    raise AssertionError(f"the live state was not back within {limit_s} s")


def test_the_live_state_follows_a_failover(tmp_path: Path) -> None:
    with sentinel_redis(tmp_path) as deployment:
        state = State(connect(deployment.url, "voice"))
        state.r.set("test:kept", "yes")
        state.r.execute_command("WAIT", 1, 1000)      # on the replica before the crash
        deployment.primary.kill()
        killed = time.monotonic()
        gap = back_after(state, killed)
        assert gap < 10, gap
        assert state.r.get("test:kept") == "yes"
        assert deployment.current_primary() != deployment.primary_port


def test_a_placement_is_on_the_replica_before_the_user_is_told(tmp_path: Path) -> None:
    """Replication is asynchronous: a placement the old primary took and had not copied
    would be lost by a failover (and its node's reports dropped as not placed). So the
    lobby's save waits for the replica (WAIT): with the replica stopped for a moment, the
    save returns only once it runs again, and the placement is there."""
    with sentinel_redis(tmp_path) as deployment:
        state = State(connect(deployment.url, "voice"))
        assert state.replicas == 1
        replica = deployment.procs[1]
        fields = {"user": "u1", "node": "n-1", "fence": 1, "created_at": 1.0, "model": "miku"}
        state.save_session("s-warm", fields, 60)       # connections made, scripts cached
        replica.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        threading.Timer(0.15, replica.send_signal, (signal.SIGCONT,)).start()
        state.save_session("s-1", fields, 60)
        waited = time.monotonic() - stopped
        assert waited >= 0.1, f"returned {waited:.3f} s after the replica stopped (0.15 s)"
        assert state.r.hget(placed_key("n-1"), "s-1") == "u1|1|1.0"
        with redis.Redis(port=int(deployment.replica_port), password=PASSWORD,
                         decode_responses=True) as r:
            assert r.hget(placed_key("n-1"), "s-1") == "u1|1|1.0"


def test_lobby_heartbeats_and_celery_follow_a_failover_and_streams_go_on(
        tmp_path: Path, sqlite_url: str) -> None:
    """One user streams in real time; the primary is killed. The stream never stops, the
    node's heartbeats land on the new primary, and a new user is placed and a cold one gets a
    booted node, all within seconds."""
    with sentinel_redis(tmp_path) as deployment:
        cfg = control_plane_config(deployment.url, database_url=sqlite_url)
        with running_control_plane(cfg) as cp:
            msgs = lobby(cp.ws_url, "user=streamer&model=miku&region=us-west")
            ws = start_stream(msgs[-1])
            node_id = msgs[-1]["node_id"]
            answers: list[float] = []
            stop = threading.Event()

            def stream() -> None:   # a browser: a 20 ms frame every 20 ms
                frame = np.zeros(320, np.int16).tobytes()
                while not stop.is_set():
                    ws.send(frame)
                    if isinstance(ws.receive(timeout=5), bytes):
                        answers.append(time.monotonic())
                    time.sleep(0.02)

            streamer = threading.Thread(target=stream, daemon=True)
            streamer.start()
            time.sleep(1.0)
            cp.state.r.execute_command("WAIT", 1, 1000)
            deployment.primary.kill()
            killed = time.monotonic()
            assert back_after(cp.state, killed) < 10
            beat = cp.wait(lambda: (rec := cp.state.node(node_id)) is not None
                           and rec.last_seen > time.time() - 1 and time.monotonic(),
                           15, "the node's heartbeats never reached the new primary")
            assert beat - killed < 10
            warm = lobby(cp.ws_url, "user=after&model=miku&region=us-west")
            assert warm[-1]["type"] == "ready", warm
            assert time.monotonic() - killed < 12
            cold = lobby(cp.ws_url, "user=cold&model=teto&region=us-west")   # a boot: Celery
            assert cold[-1]["type"] == "ready", cold
            stop.set()
            streamer.join(10)
            gaps = np.diff([t for t in answers if t > killed - 1])
            assert len(answers) > 100 and gaps.max() < 1.0, gaps.max()   # never interrupted
            ws.send(json.dumps({"type": "stop"}))
