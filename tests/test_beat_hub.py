"""The heartbeat socket `WS /api/nodes/beat`: one hub thread answers every node, batches
their reports, holds no thread per node, and refuses bad reports with clear errors without
touching other nodes' sockets."""

from __future__ import annotations

import json
import socket
import threading

import pytest
import requests
from conftest import Fleet, closed_code, wait_for
from simple_websocket import Client

REPORT = {"state": "ready", "progress": 1.0, "serving": "miku:1", "streams": [], "usage": []}


def joined(fleet: Fleet, n: int) -> list[tuple[str, str]]:
    """n nodes recorded and joined over HTTP: (node id, credential)."""
    out = []
    for i in range(n):
        node_id, token = fleet.enroll("miku")
        got = requests.post(f"{fleet.control_url}/api/nodes/join", timeout=5,
                            json={"token": token, "url": f"ws://127.0.0.1:{9000 + i}/ws"})
        assert got.status_code == 200, got.text
        out.append((node_id, got.json()["credential"]))
    return out


def beat_socket(fleet: Fleet, credential: str) -> Client:
    url = fleet.control_url.replace("http://", "ws://") + "/api/nodes/beat"
    return Client.connect(url, headers={"Authorization": f"Bearer {credential}"}
                          if credential else {})


def beat(ws: Client, report: dict[str, object] | None = None) -> dict[str, object]:
    ws.send(json.dumps(report or REPORT))
    answer = ws.receive(timeout=5)
    assert answer is not None, "no answer to a heartbeat within 5 s"
    return dict(json.loads(answer))


def test_many_nodes_beat_on_one_thread(fleet: Fleet) -> None:
    earlier = set(threading.enumerate())   # other tests' servers may still be serving
    nodes = joined(fleet, 12)
    sockets = [beat_socket(fleet, cred) for _, cred in nodes]
    try:
        for _ in range(3):   # every node beats at once, again and again: a batch each time
            for ws in sockets:
                ws.send(json.dumps(REPORT))
            for ws in sockets:
                answer = ws.receive(timeout=5)
                assert answer is not None
                assert json.loads(answer) == {"drain_deadline": None, "retarget": None,
                                              "lost": []}
        for node_id, _ in nodes:
            rec = fleet.state.node(node_id)
            assert rec is not None and rec.state.value == "ready"
        # Open sockets hold no request thread: werkzeug's ended when the hub took over.
        requests_open = [t for t in threading.enumerate()
                         if "process_request_thread" in t.name and t not in earlier]
        assert not requests_open, requests_open
    finally:
        for ws in sockets:
            ws.close()


def test_bad_reports_are_refused_and_other_nodes_go_on(fleet: Fleet) -> None:
    (good_id, good), (_, bad_json), (_, binary), (_, not_object), (gone_id, revoked) = \
        joined(fleet, 5)
    keeper = beat_socket(fleet, good)
    assert "error" not in beat(keeper)

    ws = beat_socket(fleet, bad_json)
    ws.send("{not json")
    assert "not JSON" in json.loads(ws.receive(timeout=5))["message"]
    assert closed_code(ws)[0] == 4400

    ws = beat_socket(fleet, binary)
    ws.send(b"\x00\x01")
    assert "JSON text message" in json.loads(ws.receive(timeout=5))["message"]
    assert closed_code(ws)[0] == 4400

    ws = beat_socket(fleet, not_object)
    refused = beat(ws, dict(REPORT, state="hacked"))
    assert refused["error"] == "bad_request" and "state" in str(refused["message"])
    assert closed_code(ws)[0] == 4400

    ws = beat_socket(fleet, revoked)
    assert "error" not in beat(ws)
    fleet.state.revoke(gone_id)          # revoked while its socket is open: the next beat
    refused = beat(ws)
    assert refused["error"] == "refused" and "revoked" in str(refused["message"])
    assert closed_code(ws)[0] == 4401

    assert "error" not in beat(keeper)   # the good node's socket never noticed
    rec = fleet.state.node(good_id)
    assert rec is not None and rec.state.value == "ready"
    keeper.close()


@pytest.mark.parametrize("credential", ["c-forged", ""])
def test_a_bad_credential_is_refused_at_the_handshake(fleet: Fleet, credential: str) -> None:
    ws = beat_socket(fleet, credential)
    refused = json.loads(ws.receive(timeout=5))
    assert refused["error"] == "refused" and "join" in refused["message"]
    assert closed_code(ws)[0] == 4401


def test_a_node_that_drops_its_socket_may_reconnect_at_once(fleet: Fleet) -> None:
    (node_id, cred), (_, other) = joined(fleet, 2)
    ws = beat_socket(fleet, cred)
    assert "error" not in beat(ws)
    ws.sock.shutdown(socket.SHUT_RDWR)   # dropped without a close frame: a crashed process
    ws.sock.close()                      # (its kernel closes the socket; close() alone may
                                         # wait for the client's own reader thread)
    # seen at once: nobody is placed there until it beats again
    wait_for(lambda: (r := fleet.state.node(node_id)) and r.reported_lost, 5,
             "a dropped heartbeat socket was not taken as a loss")
    keeper = beat_socket(fleet, other)
    assert "error" not in beat(keeper)   # the hub goes on serving everyone else
    again = beat_socket(fleet, cred)
    assert "error" not in beat(again)
    rec = fleet.state.node(node_id)
    assert rec is not None and rec.state.value == "ready" and not rec.reported_lost
    again.close()
    keeper.close()
