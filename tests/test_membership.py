"""Nodes join over HTTP with a one-time token, hold no control-plane secrets, report only
themselves, and every refusal is a clear error that leaves everyone else's streams alone."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import SECRET, Fleet, closed_code, place, start_stream
from simple_websocket import Client

from common.tickets import Ticket, node_key, sign
from provisioner import orders
from provisioner.state import State
from research.quality import harmonic_tone
from voicectl import procs


def post(fleet: Fleet, path: str, body: object, credential: str = "") -> requests.Response:
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    return requests.post(f"{fleet.control_url}/api/nodes/{path}", json=body, headers=headers,
                         timeout=5)


def ticket_for(node_id: str, key_of: str, user: str = "alice",
               state: State | None = None) -> str:
    """A ticket for `node_id` signed with `key_of`'s key; with `state`, placed there."""
    if state is not None:
        place(state, node_id, user, f"s-{user}", 1)
    return sign(Ticket(user=user, session=f"s-{user}", node=node_id, model="miku",
                       version="1", fence=1, exp=time.time() + 60), node_key(SECRET, key_of))


def test_join_token_works_once_and_bad_tokens_are_refused(fleet: Fleet) -> None:
    node_id, token = fleet.enroll("miku")
    first = post(fleet, "join", {"token": token, "url": "ws://127.0.0.1:1/ws"})
    assert first.status_code == 200, first.text
    grant = first.json()
    assert grant["node_id"] == node_id and grant["model"] == "miku"
    assert grant["ticket_key"] == node_key(SECRET, node_id) != SECRET
    again = post(fleet, "join", {"token": token, "url": "ws://127.0.0.1:1/ws"})
    assert again.status_code == 401 and "already used" in again.json()["message"]
    for body in ({"token": "j-forged", "url": "ws://127.0.0.1:1/ws"}, {"url": "ws://x:1/ws"}):
        bad = post(fleet, "join", body)
        assert bad.status_code == 401 and "new one" in bad.json()["message"]
    _, token2 = fleet.enroll("miku")
    bad_url = post(fleet, "join", {"token": token2, "url": "http://evil/"})
    assert bad_url.status_code == 401 and "--public-url" in bad_url.json()["message"]
    # The node command says what went wrong and exits; nothing joined.
    proc = fleet.join("j-not-a-token", "bad-join")
    assert proc.wait(timeout=30) == 3
    assert "already used" in (fleet.tmp / "bad-join.log").read_text()


def test_heartbeat_needs_a_live_credential_and_reports_only_the_node(fleet: Fleet) -> None:
    node_id, token = fleet.enroll("miku")
    cred = post(fleet, "join", {"token": token, "url": "ws://127.0.0.1:1/ws"}).json()["credential"]
    minute = int(time.time() // 60) * 60
    place(fleet.state, node_id, "bob", "s-1", 1)   # the lobby placed bob's session there
    beat = {"state": "ready", "progress": 1.0, "serving": "miku:1", "streams": [],
            "usage": [[minute, "bob", "s-1", "ab12", 12.5]],
            # what the control plane decided is not the node's to say: ignored
            "price_per_hour": "0.01", "model": "teto", "region": "eu-west", "capacity": 99}
    ok = post(fleet, "heartbeat", beat, cred)
    assert ok.status_code == 200, ok.text
    got = ok.json()
    assert abs(got.pop("now") - time.time()) < 5   # the control plane's clock, for the node
    assert got == {"drain_deadline": None, "retarget": None, "lost": []}
    rec = fleet.state.node(node_id)
    assert rec is not None and rec.state.value == "ready"
    assert (rec.model, rec.region, rec.capacity, rec.price_per_hour) == (
        "miku", "us-west", 4, "1.10")
    [field] = fleet.state.usage_counters(minute)
    assert field == f"bob|s-1:ab12|{node_id}|miku|us-west"   # keyed by what we know
    for bad, needle in ((dict(beat, state="hacked"), "state"),
                        (dict(beat, usage=[[minute, "bob", "s-1", "ab12", 61]]), "0-60 s"),
                        (dict(beat, usage=[[minute, "b|ob", "s-1", "ab12", 1]]), "user"),
                        (dict(beat, streams=[["eve", "s-2", "x", "ab"]]), "malformed")):
        refused = post(fleet, "heartbeat", bad, cred)
        assert refused.status_code == 400 and needle in refused.json()["message"], refused.text
    assert post(fleet, "heartbeat", beat).status_code == 401            # no credential
    assert post(fleet, "heartbeat", beat, "c-forged").status_code == 401
    fleet.state.revoke(node_id)
    revoked = post(fleet, "heartbeat", beat, cred)
    assert revoked.status_code == 401 and "revoked" in revoked.json()["message"]


def test_a_revoked_node_exits_and_other_streams_go_on(fleet: Fleet) -> None:
    victim = fleet.start("miku", node_id="n-victim")
    other = fleet.start("miku", node_id="n-other")
    ws = start_stream({"node_url": fleet.url(other),
                       "ticket": ticket_for(other, other, state=fleet.state)}, rate=16000)
    proc = fleet.procs[0]
    fleet.state.revoke(victim)
    assert proc.wait(timeout=15) == 0          # refused at its next heartbeat: it leaves
    assert "no longer knows node" in (fleet.tmp / "n-victim.log").read_text()
    tone = harmonic_tone(150.0, 16000, 0.2)
    ws.send(tone.astype("<i2").tobytes()[:640])
    assert len(ws.receive(timeout=5)) == 640   # the other node's stream is untouched
    ws.send(json.dumps({"type": "stop"}))
    assert closed_code(ws)[0] == 1000


def test_a_nodes_key_signs_tickets_for_itself_alone(fleet: Fleet) -> None:
    a = fleet.start("miku", node_id="n-a")
    b = fleet.start("miku", node_id="n-b")
    # A compromised node A forges a ticket for node B with its own key: refused.
    code, reason = closed_code(Client.connect(f"{fleet.url(b)}?ticket={ticket_for(b, a)}"))
    assert code == 4401 and "forged" in reason and "lobby" in reason
    # A genuine ticket of node A used on node B: refused as foreign.
    code, reason = closed_code(Client.connect(f"{fleet.url(b)}?ticket={ticket_for(a, a)}"))
    assert code == 4401 and "lobby" in reason
    ws = start_stream({"node_url": fleet.url(b), "ticket": ticket_for(b, b, state=fleet.state)})
    ws.close()


def test_nodes_hold_no_control_plane_secrets(fleet: Fleet) -> None:
    node_id = fleet.start("miku")
    pid = fleet.procs[-1].pid
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    names = {e.split(b"=", 1)[0].decode() for e in environ if e}
    assert not names & {"REDIS_URL", "DATABASE_URL", "TICKET_SECRET", "AWS_SECRET_ACCESS_KEY"}
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    assert "redis://" not in cmdline and SECRET not in cmdline
    assert fleet.state.node(node_id) is not None
    # The node's code needs nothing of the control plane's.
    out = subprocess.run([sys.executable, "-c", "import sys, worker_node.__main__; print("
                          "sorted({m.split('.')[0] for m in sys.modules} & "
                          "{'provisioner', 'webapp', 'billing', 'redis', 'sqlalchemy', "
                          "'celery', 'libcloud'}))"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_forgotten_node_exits(fleet: Fleet) -> None:
    node_id = fleet.start("miku")
    fleet.state.forget_node(node_id)
    assert fleet.procs[-1].wait(timeout=15) == 0


def test_a_node_serves_wss_with_a_certificate(fleet: Fleet, tmp_path: Path) -> None:
    """A page on https cannot open ws://: a node given a certificate serves wss://, and
    the control plane's orders reach it over https."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate: apt-get install openssl")
    cert, key = tmp_path / "node.pem", tmp_path / "node.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    node_id, token = fleet.enroll("miku", node_id="n-tls")
    port = procs.free_port()
    fleet.join(token, "n-tls", "--public-url", f"wss://127.0.0.1:{port}", "--host",
               "127.0.0.1", "--cert", str(cert), "--key", str(key))
    fleet.wait_state(node_id, "ready")
    url = fleet.url(node_id)
    assert url == f"wss://127.0.0.1:{port}/ws"
    trust = ssl.create_default_context(cafile=str(cert))
    ws = Client.connect(f"{url}?ticket={ticket_for(node_id, node_id, state=fleet.state)}",
                        ssl_context=trust)
    ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
    assert json.loads(ws.receive(timeout=5))["type"] == "started"
    rec = fleet.state.node(node_id)
    assert rec is not None
    trusting = fleet.cfg.with_overrides(node_ca_file=str(cert))
    orders.notify(trusting, rec, {"kick": ["s-alice"]}, wait=True)   # https://.../control
    code, reason = closed_code(ws)
    assert code == 4409 and "taken over" in reason


def test_the_webapp_needs_no_cloud_code() -> None:
    """The lobby chooses candidates with pure placement; libcloud stays in the workers."""
    out = subprocess.run([sys.executable, "-c", "import sys, webapp.app; print(sorted("
                          "{m.split('.')[0] for m in sys.modules} & {'libcloud', 'celery'}), "
                          "'provisioner.fleet' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] False", out.stdout
