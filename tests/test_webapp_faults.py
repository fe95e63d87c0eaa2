"""A webapp process dies while it holds a waiting lobby (issue 20): the page resumes the
waiting session through another webapp at once, and the dead lobby's lock goes within
seconds, not a ticket's minute."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from conftest import Webapp, local_webapp
from simple_websocket import Client, ConnectionClosed

from common.config import Config
from webapp.waiting import WAITING_LOCK_TTL_S


def first(ws_url: str, query: str) -> dict[str, object]:
    ws = Client.connect(f"{ws_url}/ws/session?{query}")
    try:
        return dict(json.loads(ws.receive(timeout=10)))
    except ConnectionClosed as e:   # an error closes the lobby: its code is the reason
        return {"type": "error", "code": e.message}
    finally:
        with contextlib.suppress(ConnectionClosed, OSError):   # closed by the server
            ws.close()


def _die_waiting(cfg: Config, tmp_path: Path, user: str) -> dict[str, object]:
    """A lobby of `user` waiting in a webapp process that then dies; its `queued`."""
    port, proc = local_webapp(cfg, tmp_path)
    held = Client.connect(f"ws://127.0.0.1:{port}/ws/session?user={user}&{WAIT}")
    queued = json.loads(held.receive(timeout=10))
    assert queued["type"] == "queued", queued
    proc.kill()                                   # the webapp dies: no goodbye, no cleanup
    proc.wait(10)
    return dict(queued)


WAIT = "model=miku&region=ap-northeast"   # no node there: the user waits


def test_a_waiting_session_is_resumed_through_another_webapp(
        webapp: Webapp, cfg: Config, tmp_path: Path) -> None:
    queued = _die_waiting(cfg, tmp_path, "w1")
    again = first(webapp.ws_url, f"user=w1&{WAIT}&resume={queued['session_id']}")
    assert again["type"] == "queued" and again["session_id"] == queued["session_id"], again


def test_a_dead_lobbys_lock_goes_within_seconds(webapp: Webapp, cfg: Config,
                                                tmp_path: Path) -> None:
    """Another tab of the user starts a new session: refused while the dead lobby's lock
    lives, which is seconds (WAITING_LOCK_TTL_S), not the ticket's minute."""
    _die_waiting(cfg, tmp_path, "w2")
    t0 = time.monotonic()
    while (got := first(webapp.ws_url, f"user=w2&{WAIT}"))["type"] != "queued":
        assert got.get("code") == "already_streaming", got
        assert time.monotonic() - t0 < WAITING_LOCK_TTL_S + 3, "the dead lobby's lock lives on"
        time.sleep(0.5)
    assert cfg.ticket_ttl_s >= 30   # what it would have lived


def test_a_lost_provision_is_sent_again_within_seconds(control_plane) -> None:  # noqa: ANN001
    """A node requested whose provision task died with its worker (here: never sent):
    the tick sends it again, the same node boots, once."""
    from provisioner import fleet
    from provisioner.policy import PoolKey

    cp = control_plane
    node_id = fleet.request_node(cp.state, cp.config, PoolKey("miku", "1", "us-west"),
                                 time.time() - 10)
    assert node_id is not None
    t0 = time.monotonic()
    cp.wait(lambda: (n := cp.state.node(node_id)) is not None and n.state.value == "ready",
            30, "the lost provision was never sent again")
    assert time.monotonic() - t0 < 20
    assert [vm["name"] for vm in cp.state.vms()].count(node_id) == 1


SLEEPY = '''
import time


class Sleepy:
    """Call `after` sleeps `sleep_s` (a GPU call that hangs), or with `every` so does each
    call after it (a slow GPU): the process and its heartbeats live on meanwhile."""
    latency_samples = 0

    def __init__(self, params):
        self.after, self.sleep_s, self.every = params["after"], params["sleep_s"], params["every"]
        self.calls = 0

    def process(self, frames):
        self.calls += 1
        if self.calls == self.after or (self.every and self.calls > self.after):
            time.sleep(self.sleep_s)
        return frames


def make(sample_rate, params, files):
    return Sleepy(params)
'''


def sleepy_package(tmp: Path, after: int, sleep_s: float, every: bool) -> Path:
    """A version of miku whose model sleeps (see SLEEPY)."""
    pkg = tmp / "sleepy"
    pkg.mkdir()
    (pkg / "model.toml").write_text(f'name = "miku"\nentry = "sleepy:make"\n\n[params]\n'
                                    f"after = {after}\nsleep_s = {sleep_s}\n"
                                    f"every = {str(every).lower()}\n")
    (pkg / "sleepy.py").write_text(SLEEPY)
    return pkg


def test_a_stalled_model_is_seen_and_its_node_drained(fleet, tmp_path: Path) -> None:  # noqa: ANN001
    """The model call hangs 4 s: the node's heartbeats (its agent thread lives) say so,
    the control plane drains it as suspect within seconds, and the stream is never closed
    as the client's fault (4400) for the silence the stall made."""
    import numpy as np
    from conftest import push_version
    from test_node import open_stream, ticket

    pkg = sleepy_package(tmp_path, after=10, sleep_s=4.0, every=False)   # hangs 4 s
    push_version(fleet.state, fleet.cfg, "miku", package=pkg)
    node_id = fleet.start("miku")
    ws, _ = open_stream(fleet.url(node_id), ticket(node_id, user="st", version="2",
                                                   state=fleet.state))
    frame = np.zeros(960, np.int16).tobytes()
    t0 = time.monotonic()
    for _ in range(12):
        ws.send(frame)
    rec = wait_until_suspect(fleet, node_id)
    assert "hung" in rec.suspect and rec.drain_deadline is not None
    assert time.monotonic() - t0 < 4.0 + 2 * fleet.cfg.heartbeat_interval_s
    try:
        while True:
            ws.receive(timeout=10)
    except ConnectionClosed as e:
        assert e.reason != 4400, e   # drained (4503), never blamed on the client


def wait_until_suspect(fleet, node_id: str):  # noqa: ANN001, ANN201
    from conftest import wait_for
    return wait_for(lambda: (r := fleet.state.node(node_id)) is not None and r.suspect and r,
                    10, "the stalled node was never drained")


def test_a_slow_node_is_seen_and_its_users_move(fleet, tmp_path: Path) -> None:  # noqa: ANN001
    """Answers 40-60 ms late, real-time frames: the node reports how late its answers go
    out and each stream's progress in its beats; the control plane drains it as suspect
    ('late') and its user is told to move make-before-break, within seconds."""
    import threading

    import numpy as np
    from conftest import push_version
    from test_node import open_stream, ticket

    pkg = sleepy_package(tmp_path, after=60, sleep_s=0.06, every=True)   # after the check
    push_version(fleet.state, fleet.cfg, "miku", package=pkg)
    node_id = fleet.start("miku")
    ws, _ = open_stream(fleet.url(node_id), ticket(node_id, user="sl", version="2",
                                                   state=fleet.state))
    stop = threading.Event()

    def pace() -> None:   # a browser: a frame every 20 ms, whatever comes back
        frame = np.zeros(960, np.int16).tobytes()
        while not stop.is_set():
            try:
                ws.send(frame)
            except (ConnectionClosed, OSError):
                return
            time.sleep(0.02)

    threading.Thread(target=pace, daemon=True).start()
    t0, move = time.monotonic(), None
    try:
        while move is None and time.monotonic() - t0 < 20:
            msg = ws.receive(timeout=1)
            if isinstance(msg, str) and json.loads(msg)["type"] == "move":
                move = json.loads(msg)
    finally:
        stop.set()
    assert move is not None and move["reason"] == "drain", "the slow node's user never moved"
    assert time.monotonic() - t0 < 10
    rec = fleet.state.node(node_id)
    assert rec is not None and "late" in rec.suspect, rec
