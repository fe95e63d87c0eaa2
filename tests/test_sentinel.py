"""Redis with failover (issue 20): a primary, a replica and three sentinels as real
processes. The live state follows a failover through the sentinels; so do the lobby,
the nodes' heartbeats and Celery, while streams never stop (nodes stream without Redis)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import control_plane_config, lobby, running_control_plane, start_stream
from sentinels import SENTINEL, sentinel_redis

from provisioner.state import State, connect

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
