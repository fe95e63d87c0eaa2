"""The lobby's front door: who a client is, attempt limits per user and per client (token
buckets in the real Redis), the cap on a client's open lobby sockets, and the errors that
say which limit and when to retry, against a real webapp."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import serve
from simple_websocket import Client, ConnectionClosed, ConnectionError

from billing.ledger import Ledger
from common.config import DEFAULT_CONFIG_PATH, Config, load_config
from common.errors import ConfigError
from provisioner.state import Limit, State
from webapp.app import create_app
from webapp.frontdoor import FrontDoor, client_of

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("environ, proxies, address, key", [
    ({"REMOTE_ADDR": "203.0.113.7"}, 0, "203.0.113.7", "203.0.113.7"),
    # Without trusted proxies a forwarded header is the client's own claim: ignored.
    ({"REMOTE_ADDR": "203.0.113.7", "HTTP_X_FORWARDED_FOR": "1.2.3.4"}, 0,
     "203.0.113.7", "203.0.113.7"),
    # One proxy: the entry it appended (the last); what the client wrote before it is not.
    ({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "6.6.6.6, 198.51.100.9"}, 1,
     "198.51.100.9", "198.51.100.9"),
    ({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "198.51.100.9, 10.0.0.1"}, 2,
     "198.51.100.9", "198.51.100.9"),
    # Came past the proxies (no header) or a proxy wrote nonsense: the peer counts.
    ({"REMOTE_ADDR": "10.0.0.2"}, 1, "10.0.0.2", "10.0.0.2"),
    ({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "unknown"}, 1, "10.0.0.2", "10.0.0.2"),
    # IPv6 counts per /64; an IPv4-mapped address is the IPv4 one.
    ({"REMOTE_ADDR": "2001:db8:1:2:aaaa::1"}, 0, "2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ({"REMOTE_ADDR": "::ffff:192.0.2.1"}, 0, "192.0.2.1", "192.0.2.1"),
    ({"REMOTE_ADDR": ""}, 0, "unknown", "unknown"),
])
def test_client_of(environ: dict[str, str], proxies: int, address: str, key: str) -> None:
    got = client_of(environ, proxies)
    assert (got.address, got.key) == (address, key)


def test_config_front_door(tmp_path: Path) -> None:
    local = load_config({})
    assert local.lobby_limit_exempt == ("127.0.0.1", "::1")   # tests, benchmarks, voicectl run
    deploy = load_config({"VOICE_CONFIG": str(ROOT / "common" / "deploy.toml")})
    assert deploy.lobby_limit_exempt == () and deploy.lobby_attempts_per_user > 0
    assert Config.lobby_limit_exempt == ()   # a config file that says nothing exempts nobody
    text = DEFAULT_CONFIG_PATH.read_text()
    for old, bad, needle in [
            ('lobby_limit_exempt = ["127.0.0.1", "::1"]',
             'lobby_limit_exempt = ["127.0.0.1", "localhost"]', "'localhost'"),
            ("lobby_sockets_per_client = 32", "lobby_sockets_per_client = -1",
             "lobby_sockets_per_client = -1")]:
        path = tmp_path / "voice.toml"
        assert old in text
        path.write_text(text.replace(old, bad))
        with pytest.raises(ConfigError, match=needle):
            load_config({"VOICE_CONFIG": str(path)})


def test_token_buckets(state: State) -> None:
    client = Limit("client", "192.0.2.1", 6, 60.0, always=True)
    alice, bob = Limit("user", "alice", 3, 60.0), Limit("user", "bob", 3, 60.0)
    for _ in range(3):
        assert state.take_attempt([client, alice], now=1000.0) is None
    got = state.take_attempt([client, alice], now=1000.0)
    assert got is not None and got.limit == alice and got.retry_after_s == pytest.approx(20.0)
    # The client paid for the refused attempt too (always): 2 of its 6 are left. The attempt
    # that takes its last is let through, saying when it has one again.
    assert state.take_attempt([client, bob], now=1000.0) is None
    got = state.take_attempt([client, bob], now=1000.0)
    assert got is not None and got.let_through and got.limit == client
    assert got.retry_after_s == pytest.approx(10.0)
    got = state.take_attempt([client, bob], now=1000.0)
    assert got is not None and not got.let_through
    assert got is not None and got.limit == client and got.retry_after_s == pytest.approx(10.0)
    # Refused by the client: bob's bucket was not touched (his last one is left), nor by a
    # refusal of a bucket marked otherwise.
    assert state.take_attempt([bob], now=1000.0).let_through   # type: ignore[union-attr]
    carol, dave = Limit("user", "carol", 1, 60.0), Limit("user", "dave", 1, 60.0)
    x = Limit("client", "x", 1, 60.0)      # not `always`
    assert state.take_attempt([carol, x], now=1000.0).let_through   # type: ignore[union-attr]
    got = state.take_attempt([dave, x], now=1000.0)
    assert got is not None and got.limit == x and not got.let_through
    assert state.take_attempt([dave], now=1000.0).let_through   # type: ignore[union-attr]
    # A burst below the window's count: 2 at once, then one a second (60 a minute).
    eve = Limit("user", "eve", 60, 60.0, burst=2)
    assert state.take_attempt([eve], now=1000.0) is None
    assert state.take_attempt([eve], now=1000.0).let_through   # type: ignore[union-attr]
    got = state.take_attempt([eve], now=1000.0)
    assert got is not None and not got.let_through and got.retry_after_s == pytest.approx(1.0)
    assert state.take_attempt([eve], now=1001.0).let_through   # type: ignore[union-attr]
    # Refilled evenly: one attempt every 20 s for alice.
    assert not state.take_attempt([alice], now=1019.0).let_through   # type: ignore[union-attr]
    assert state.take_attempt([alice], now=1020.0).let_through   # type: ignore[union-attr]
    assert state.take_attempt([], now=1020.0) is None


@pytest.fixture
def strict(cfg: Config, state: State) -> Iterator[tuple[str, FrontDoor]]:
    """The webapp with small limits and nobody exempt; clients told apart by the
    X-Forwarded-For entry of one trusted proxy (every test client is 127.0.0.1)."""
    cfg = cfg.with_overrides(lobby_attempts_per_user=3, lobby_attempts_per_client=5,
                             lobby_sockets_per_client=3, trusted_proxies=1,
                             lobby_limit_exempt=())
    host, server = serve(create_app(cfg, state, ledger=Ledger.open(cfg.database_url)))
    yield f"ws://{host}", FrontDoor(cfg, state)
    server.shutdown()


def open_lobby(ws_url: str, query: str, client: str) -> Client:
    return Client.connect(f"{ws_url}/ws/session?{query}",
                          headers={"X-Forwarded-For": client})


def shut(ws: Client) -> None:
    try:
        ws.close()
    except (ConnectionClosed, OSError):
        pass   # the server closed first


def first(ws: Client) -> dict[str, object]:
    raw = ws.receive(timeout=15)
    assert raw is not None, "the lobby said nothing"
    return dict(json.loads(raw))


def test_attempts_per_user_and_per_client(strict: tuple[str, FrontDoor], state: State) -> None:
    from conftest import wait_for

    from provisioner.state.keys import lock_key
    ws_url, _ = strict
    query = "user=alice&model=miku&region=us-west"   # no node: each attempt queues
    for _ in range(3):
        ws = open_lobby(ws_url, query, "198.51.100.1")
        assert first(ws)["type"] == "queued"
        ws.close()   # its lobby lets go of alice's waiting lock (else: already streaming)
        wait_for(lambda: not state.r.exists(lock_key("alice")), 10, "lock never released")
    refused = first(open_lobby(ws_url, query, "198.51.100.2"))   # another address: same user
    assert (refused["type"], refused["code"]) == ("error", "rate_limited"), refused
    assert "user alice: at most 3 per 60 s; try again in" in str(refused["message"])
    assert 0 < float(refused["retry_after_s"]) <= 20.0          # type: ignore[arg-type]
    # The client 198.51.100.1 spent 3 of its 5: two more users get in, the third does not.
    for user in ("bob", "carol"):
        ws = open_lobby(ws_url, f"user={user}&model=miku&region=us-west", "198.51.100.1")
        assert first(ws)["type"] == "queued"
        ws.close()
    refused = first(open_lobby(ws_url, "user=dave&model=miku&region=us-west", "198.51.100.1"))
    assert refused["code"] == "rate_limited"
    assert "client 198.51.100.1: at most 5 per 60 s" in str(refused["message"])
    # Everyone else is served as before.
    ws = open_lobby(ws_url, "user=erin&model=miku&region=us-west", "198.51.100.3")
    assert first(ws)["type"] == "queued"
    ws.close()


def get(url: str, client: str) -> tuple[int, dict[str, object], dict[str, str]]:
    req = urllib.request.Request(url, headers={"X-Forwarded-For": client})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_open_lobby_sockets_per_client(strict: tuple[str, FrontDoor]) -> None:
    ws_url, _ = strict
    held = [open_lobby(ws_url, f"user=w{i}&model=miku&region=us-west", "198.51.100.7")
            for i in range(3)]
    for ws in held:
        assert first(ws)["type"] == "queued"
    # The fourth is refused before the WebSocket handshake: HTTP 429, saying why.
    with pytest.raises(ConnectionError, match="429"):
        open_lobby(ws_url, "user=w2&model=miku&region=us-west", "198.51.100.7")
    base = ws_url.replace("ws://", "http://")
    status, body, headers = get(f"{base}/ws/session?user=w2&model=miku&region=us-west",
                                "198.51.100.7")
    assert (status, body["error"]) == (429, "rate_limited"), body
    assert "has 3 lobby sockets open already" in str(body["message"])
    assert int(headers["Retry-After"]) >= 1
    other = open_lobby(ws_url, "user=w3&model=miku&region=us-west", "198.51.100.8")
    assert first(other)["type"] == "queued"                      # another client: served
    other.close()
    held[0].close()
    for _ in range(50):   # the server notices the close within a poll (0.25 s)
        try:
            ws = open_lobby(ws_url, "user=w5&model=miku&region=us-west", "198.51.100.7")
        except ConnectionError:
            continue
        assert first(ws)["type"] == "queued"
        ws.close()
        break
    else:
        raise AssertionError("a closed lobby socket still counted")
    for ws in held[1:]:
        ws.close()


def test_refused_clients_are_refused_before_the_handshake(
        strict: tuple[str, FrontDoor]) -> None:
    """After its first rate_limited lobby error a client is answered 429 until its retry
    time, without a handshake; a bad request spends an attempt; a query far longer than any
    lobby's is not parsed (414)."""
    ws_url, _ = strict
    base = ws_url.replace("ws://", "http://")
    for i in range(5):   # bad requests spend the client's 5
        ws = open_lobby(ws_url, f"user=b{i}&model=miku&region=mars", "198.51.100.20")
        assert first(ws)["code"] == "bad_request"
        shut(ws)
        time.sleep(0.1)   # a refused socket lingers 50 ms after its close frame (wsclose)
    refused = first(open_lobby(ws_url, "user=b9&model=miku&region=us-west", "198.51.100.20"))
    assert refused["code"] == "rate_limited" and "client 198.51.100.20" in str(refused["message"])
    status, body, headers = get(f"{base}/ws/session?user=b9&model=miku&region=us-west",
                                "198.51.100.20")
    assert (status, body["error"]) == (429, "rate_limited")
    assert "client 198.51.100.20: at most 5 per 60 s; try again in" in str(body["message"])
    assert float(body["retry_after_s"]) > 0 and int(headers["Retry-After"]) >= 1  # type: ignore[arg-type]
    status, body, _ = get(f"{base}/ws/session?user={'x' * 3000}&model=miku", "198.51.100.21")
    assert (status, body["error"]) == (414, "bad_request") and "3016 bytes" in str(body["message"])


def test_a_lobby_that_is_sent_messages_refuses(strict: tuple[str, FrontDoor]) -> None:
    ws_url, _ = strict
    ws = open_lobby(ws_url, "user=flood&model=miku&region=us-west", "198.51.100.9")
    assert first(ws)["type"] == "queued"
    for _ in range(100):
        ws.send("x" * 1000)
    msg = first(ws)
    assert (msg["code"], msg["type"]) == ("bad_request", "error")
    assert "takes no messages" in str(msg["message"])
