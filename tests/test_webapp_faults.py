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
