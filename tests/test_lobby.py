"""The lobby and the JSON API against a real webapp, real Redis and real node processes."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import Fleet, Webapp, lobby
from simple_websocket import Client
from test_node import stream_tone

from provisioner.state import node_key
from research.quality import harmonic_tone


def get(url: str) -> tuple[int, object, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = r.read()
            return r.status, json.loads(body) if r.headers.get_content_type() == \
                "application/json" else body.decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_ready_ticket_streams_on_the_node(webapp: Webapp, fleet: Fleet) -> None:
    node_id = fleet.start("teto", region="us-west")
    msgs = lobby(webapp.ws_url, "user=alice&model=teto&region=us-west")
    ready = msgs[-1]
    assert ready["type"] == "ready" and ready["node_id"] == node_id
    assert ready["region"] == "us-west" and ready["rtt_ms"] > 0
    ws = Client.connect(f"{ready['node_url']}?ticket={ready['ticket']}")
    ws.send(json.dumps({"type": "start", "sample_rate": 48000}))
    started = json.loads(ws.receive(timeout=5))
    assert started["session_id"] == ready["session_id"] and started["model"] == "teto"
    assert len(stream_tone(ws, harmonic_tone(150.0, 48000, 0.2))) == 9600


@pytest.mark.parametrize("query, code, needle", [
    ("user=alice&model=nope&region=us-west", "unknown_model", "miku"),
    ("user=bad%20id!&model=miku&region=us-west", "bad_request", "A-Z"),
    ("user=" + "x" * 65 + "&model=miku&region=us-west", "bad_request", "1-64"),
    ("model=miku&region=us-west", "bad_request", "no user id"),
    ("user=alice&region=us-west", "bad_request", "no model"),
    ("user=alice&model=miku", "bad_request", "no location"),
    ("user=alice&model=miku&region=mars", "bad_request", "unknown region"),
    ("user=alice&model=miku&lat=95&lon=0", "bad_request", "out of range"),
    ("user=alice&model=miku&lat=x&lon=0", "bad_request", "not a number"),
    ("user=alice&model=miku&lat=0&lon=0&rtt=mars:5", "bad_request", "REGION:MS"),
    ("user=alice&model=miku&lat=0&lon=0&rtt=us-west:-1", "bad_request", "0-10000 ms"),
    ("user=alice&model=miku&lat=0&lon=0&rtt=us-west:fast", "bad_request", "known region"),
])
def test_bad_lobby_requests_get_clear_errors(webapp: Webapp, query: str, code: str,
                                             needle: str) -> None:
    msgs = lobby(webapp.ws_url, query)
    assert msgs[-1]["type"] == "error" and msgs[-1]["code"] == code
    assert needle in msgs[-1]["message"], msgs[-1]


def test_booting_with_eta_then_ready(webapp: Webapp, fleet: Fleet) -> None:
    node_id = fleet.start("kaito", load_s=2.0, wait=False)
    fleet.wait_state(node_id, "loading")
    msgs = lobby(webapp.ws_url, "user=bob&model=kaito&region=us-west")
    kinds = [m["type"] for m in msgs]
    assert kinds[0] == "booting" and kinds[-1] == "ready", kinds
    etas = [m["eta_s"] for m in msgs if m["type"] == "booting"]
    assert 0 < etas[0] <= 2.0 and etas == sorted(etas, reverse=True)


def test_nearest_region_wins(webapp: Webapp, fleet: Fleet) -> None:
    west = fleet.start("miku", region="us-west", wait=False)
    eu = fleet.start("miku", region="eu-west", wait=False)
    fleet.wait_state(west, "ready")
    fleet.wait_state(eu, "ready")
    dublin = lobby(webapp.ws_url, "user=d&model=miku&lat=53.3&lon=-6.2")[-1]
    sf = lobby(webapp.ws_url, "user=s&model=miku&lat=37.7&lon=-122.4")[-1]
    assert (dublin["node_id"], dublin["region"]) == (eu, "eu-west")
    assert (sf["node_id"], sf["region"]) == (west, "us-west")
    assert dublin["rtt_ms"] < 10


def test_packs_most_loaded_first_then_queues(webapp: Webapp, fleet: Fleet) -> None:
    a = fleet.start("miku", wait=False)
    b = fleet.start("miku", wait=False)
    fleet.wait_state(a, "ready")
    fleet.wait_state(b, "ready")
    placed: list[str] = []

    def one(i: int) -> None:
        placed.append(lobby(webapp.ws_url, f"user=p{i}&model=miku&region=us-west")[-1]
                      .get("node_id", "none"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(placed.count(n) for n in (a, b)) == [4, 4]   # packed, 4 max each

    ninth = Client.connect(f"{webapp.ws_url}/ws/session?user=p9&model=miku&region=us-west")
    first = json.loads(ninth.receive(timeout=5))
    assert first["type"] == "queued" and first["position"] == 1 and first["eta_s"] > 0
    ninth.close()
    pool = "miku|1|us-west"
    deadline = time.monotonic() + 5
    while (webapp.state.queue_lengths().get(pool) or webapp.state.lock_holder("p9")) \
            and time.monotonic() < deadline:   # the lobby leaves the queue, then the lock
        time.sleep(0.05)
    assert webapp.state.queue_lengths()[pool] == 0         # leaving the lobby leaves the queue
    assert webapp.state.lock_holder("p9") is None           # and frees the user's lock


def test_api_endpoints(webapp: Webapp, fleet: Fleet) -> None:
    fleet.start("miku")
    status, models, _ = get(webapp.base_url + "/api/models")
    miku = next(m for m in models if m["name"] == "miku")
    assert status == 200 and {"name": "miku", "version": "1", "state": "live",
                              "canary_percent": 0, "streams_per_gpu": 4}.items() <= miku.items()
    assert {m["name"] for m in models} == {"miku", "teto", "kaito", "robot"}
    status, regions, _ = get(webapp.base_url + "/api/regions")
    assert status == 200 and regions[0] == {"name": "us-west", "provider": "local",
                                            "lat": 37.8, "lon": -122.4,
                                            "state": "up", "beacon_url": None}
    status, cluster, _ = get(webapp.base_url + "/api/cluster")
    node = cluster["nodes"][0]
    assert {"id", "provider", "region", "model", "version", "state", "sessions", "capacity",
            "url", "started_at", "price_per_hour"} <= node.keys()
    assert node["state"] == "ready" and cluster["cost_per_hour"] == pytest.approx(1.10)
    status, health, _ = get(webapp.base_url + "/healthz")
    assert status == 200 and health["ok"] is True
    status, page, headers = get(webapp.base_url + "/")
    assert status == 200 and "<html" in page.lower() and "uid=u-" in headers["Set-Cookie"]


def test_node_that_stops_heartbeating_is_not_placed(webapp: Webapp, fleet: Fleet) -> None:
    node_id = fleet.start("miku")
    fleet.procs[-1].kill()
    fleet.procs[-1].wait()
    webapp.state.r.hset(node_key(node_id), "last_seen", "1")   # long ago
    ws = Client.connect(f"{webapp.ws_url}/ws/session?user=z&model=miku&region=us-west")
    assert json.loads(ws.receive(timeout=5))["type"] == "queued"
    assert ws.receive(timeout=1.0) is None      # waits; never handed to the dead node
    ws.close()


def test_measured_round_trips_beat_the_guess_from_lat_lon(webapp: Webapp, fleet: Fleet) -> None:
    """A user the time zone puts near San Francisco whose page timed us-east's beacon at
    20 ms and us-west's at 90 ms is placed in us-east, and `ready` says the 20 ms it
    placed by; without measurements the guess places them in us-west."""
    west = fleet.start("miku", region="us-west", wait=False)
    east = fleet.start("miku", region="us-east", wait=False)
    fleet.wait_state(west, "ready")
    fleet.wait_state(east, "ready")
    sf = "model=miku&lat=37.7&lon=-122.4"
    measured = lobby(webapp.ws_url, f"user=m&{sf}&rtt=us-west:90,us-east:20")[-1]
    assert (measured["node_id"], measured["region"], measured["rtt_ms"]) == (east, "us-east", 20)
    guessed = lobby(webapp.ws_url, f"user=g&{sf}")[-1]
    assert (guessed["node_id"], guessed["region"]) == (west, "us-west")
