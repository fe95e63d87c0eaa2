"""The control plane goes away (its process killed) while a node streams: the stream goes
on, the reaper does not take the silence it causes for the node's death, the node keeps its
usage ledger and delivers it when the control plane is back; it is billed however late it
is settled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests
from conftest import LOAD_S, SECRET, Fleet, closed_code, make_config, start_stream, wait_for
from test_membership import ticket_for

from billing.ledger import Ledger
from common.config import ORPHAN_SERVING_S, Config
from provisioner import fleet as fleet_ops
from provisioner.state import NodeRecord, State, connect
from research.quality import harmonic_tone
from voicectl import procs

SERVE = """
import sys
from werkzeug.serving import make_server
from billing.ledger import Ledger
from common.config import load_config
from provisioner.state import State, connect
from webapp.app import before_serving, create_app
import os
cfg = load_config(os.environ)
state = State(connect(cfg.redis_url))
server = make_server("127.0.0.1", int(sys.argv[1]),
                     create_app(cfg, state, ledger=Ledger.open(cfg.database_url)), threaded=True)
before_serving(cfg, state)
server.serve_forever()
"""


def control_plane(port: int, redis_url: str, tmp: Path) -> subprocess.Popen[bytes]:
    """The webapp (node endpoints included) in its own process, so it can really die."""
    env = {"PATH": os.environ["PATH"], "REDIS_URL": redis_url, "TICKET_SECRET": SECRET,
           "MODEL_LOAD_SECONDS": str(LOAD_S), "VOICE_DEV_USERS": "1",
           "DATABASE_URL": f"sqlite:///{tmp / 'b.sqlite'}"}
    proc = procs.spawn([sys.executable, "-c", SERVE, str(port)], env=env,
                       log=tmp / "control-plane.log")
    wait_for(lambda: _up(port), 30, "the control plane to listen")
    return proc


def _up(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
    except requests.RequestException:
        return False


def test_streams_outlive_the_control_plane_and_usage_arrives_later(
        cfg: Config, state: State, redis_url: str, tmp_path: Path) -> None:
    port = procs.free_port()
    web = control_plane(port, redis_url, tmp_path)
    fleet = Fleet(cfg, state, tmp_path, f"http://127.0.0.1:{port}")
    try:
        node_id, token = fleet.enroll("miku")
        node = fleet.join(token, node_id, "--orphan-s", "1")
        fleet.wait_state(node_id, "ready")
        ws = start_stream({"node_url": fleet.url(node_id),
                           "ticket": ticket_for(node_id, node_id, state=fleet.state)})
        before = stream_audio(ws, 0.5)
        procs.stop([web])                   # the control plane dies (its hub's sockets too)
        after = stream_audio(ws, 3.0)       # well past --orphan-s: the stream goes on
        ws.send(json.dumps({"type": "stop"}))
        assert closed_code(ws)[0] == 1000
        time.sleep(1.5)
        assert node.poll() is None          # streaming, then owing usage: it stays
        assert _counted(state, node_id) < 1.5   # what it streamed since is not known yet
        # Silent for longer than a heartbeat timeout, as every node is while no webapp takes
        # heartbeats: the reaper (the Celery tick's) leaves them, streams and machines.
        assert not _known(state, node_id).alive(time.time(), cfg.heartbeat_timeout_s)
        assert fleet_ops.reap(state, cfg, time.time(), print) == []
        assert _known(state, node_id) and node.poll() is None

        web = control_plane(port, redis_url, tmp_path)   # back: the ledger is delivered
        assert fleet_ops.reap(state, cfg, time.time(), print) == []   # back too briefly
        wait_for(lambda: _known(state, node_id).alive(time.time(), cfg.heartbeat_timeout_s),
                 10, "the node to beat again")
        streamed = before + after           # audio seconds sent and answered
        wait_for(lambda: _counted(state, node_id) >= streamed - 0.05, 20,
                 "the node to deliver the usage streamed while the control plane was away")
        assert _counted(state, node_id) <= streamed + 0.05   # each second once: no double count

        # Settled three hours on (the control plane came back that late): still billed.
        ledger = Ledger.open(f"sqlite:///{tmp_path / 'b.sqlite'}")
        ledger.settle_from(state, time.time() + 3 * 3600)
        billed = sum(r.seconds for r in ledger.usage("alice"))
        ledger.engine.dispose()
        assert abs(billed - streamed) <= 0.05, (billed, streamed)
    finally:
        procs.stop(fleet.procs)
        procs.stop([web])


def test_silence_is_death_only_while_heartbeats_can_arrive(state: State, cfg: Config) -> None:
    """A silent node is reaped once a webapp has taken heartbeats for a whole timeout, or
    when none has for longer than a serving node waits for one; not before."""
    def silent(node_id: str) -> str:
        state.heartbeat({"id": node_id, "provider": "local", "region": "us-west",
                         "model": "miku", "version": "1", "state": "ready", "capacity": 4,
                         "url": "ws://127.0.0.1:1/ws"}, time.time() - 60)
        return node_id

    timeout = cfg.heartbeat_timeout_s
    silent("n1")
    assert fleet_ops.reap(state, cfg, time.time(), print) == []      # no webapp ever stamped
    state.stamp_beat_path(time.time(), gap_s=0.3)                    # one is up, just now
    assert fleet_ops.reap(state, cfg, time.time(), print) == []
    assert fleet_ops.reap(state, cfg, time.time() + timeout, print) == ["n1"]   # a timeout on

    time.sleep(0.4)                                                  # it went: its stamp lapsed
    silent("n2")
    assert fleet_ops.reap(state, cfg, time.time(), print) == []
    state.stamp_beat_path(time.time() - ORPHAN_SERVING_S - 10, gap_s=0.01)   # long ago, then
    time.sleep(0.05)                                                 # none: the nodes left
    assert fleet_ops.reap(state, cfg, time.time(), print) == ["n2"]


def _known(state: State, node_id: str) -> NodeRecord:
    rec = state.node(node_id)
    assert rec is not None, f"node {node_id} was forgotten"
    return rec


def _counted(state: State, node_id: str) -> float:
    """Seconds in the live usage counters of this node, over the last few minutes."""
    now = int(time.time() // 60) * 60
    return sum(secs for m in range(now - 300, now + 60, 60)
               for f, secs in state.usage_counters(m).items() if f"|{node_id}|" in f)


def stream_audio(ws, seconds: float) -> float:  # type: ignore[no-untyped-def]
    """Stream for `seconds` of wall time; returns the seconds of audio sent (and answered)."""
    chunk = harmonic_tone(150.0, 16000, 0.02).astype("<i2").tobytes()
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ws.send(chunk)
        assert len(ws.receive(timeout=5)) == len(chunk)
        sent += 1
        time.sleep(0.015)
    return sent * 0.02


def test_redis_killed_and_back_with_its_append_only_file_bills_within_2_s(
        tmp_path: Path) -> None:
    """kill -9 Redis mid-stream (its append-only file synced every second) and start it
    again on the same folder: the stream goes on throughout, and what is billed is within
    2 s of what was streamed."""
    data = tmp_path / "redis"
    redis_url, redis_proc = procs.start_redis(data_dir=data)
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    cfg = make_config(redis_url, DATABASE_URL=f"sqlite:///{tmp_path / 'b.sqlite'}")
    state = State(connect(redis_url))
    port = procs.free_port()
    web = control_plane(port, redis_url, tmp_path)
    fleet = Fleet(cfg, state, tmp_path, f"http://127.0.0.1:{port}")
    try:
        node_id, token = fleet.enroll("miku")
        fleet.join(token, node_id)
        fleet.wait_state(node_id, "ready")
        ws = start_stream({"node_url": fleet.url(node_id),
                           "ticket": ticket_for(node_id, node_id, state=fleet.state)})
        streamed = stream_audio(ws, 2.0)
        redis_proc.kill()                   # no time to sync: the worst case
        redis_proc.wait()
        streamed += stream_audio(ws, 2.0)   # no live state: the stream goes on
        _, redis_proc = procs.start_redis(port=redis_port, data_dir=data)
        streamed += stream_audio(ws, 1.0)
        ws.send(json.dumps({"type": "stop"}))
        assert closed_code(ws)[0] == 1000
        wait_for(lambda: _counted(state, node_id) >= streamed - 2.0, 20,
                 "the node to deliver what it streamed while Redis was away")
        time.sleep(cfg.heartbeat_interval_s)   # anything still owed
        ledger = Ledger.open(cfg.database_url)
        ledger.settle_from(state, time.time() + 60)
        billed = sum(r.seconds for r in ledger.usage("alice"))
        ledger.engine.dispose()
        print(f"streamed {streamed:.2f} s, billed {billed:.2f} s")
        assert abs(billed - streamed) <= 2.0, (billed, streamed)
    finally:
        procs.stop(fleet.procs)
        procs.stop([web, redis_proc])
