"""Fuzz the parsers at the front doors with hypothesis: the lobby's query (raw bytes through
werkzeug too), the usage API's date, the client address, the node's audio protocol, the
node reports and the node endpoints. Property: any input parses into something valid or
raises the parser's own error with a message; never another exception, never a 500.

Deterministic (derandomize: the same examples every run) and quick; a longer hunt:
FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import make_config
from flask import Request
from flask.testing import FlaskClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from werkzeug.test import create_environ

from common.config import Config
from provisioner import membership
from provisioner.errors import BadReport
from provisioner.state import State, connect
from webapp.app import create_app
from webapp.frontdoor import client_of
from webapp.requests import USER_RE, BadRequest, LobbyRequest, parse_lobby, parse_since
from worker_node import protocol
from worker_node.protocol import Malformed

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None,
                derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CFG = make_config("redis://127.0.0.1:1/0")   # the default fleet; the parsers do no I/O
DEEP = "[" * 5000 + "]" * 5000               # past the JSON decoder's recursion limit

names = st.from_regex(r"\A[A-Za-z0-9_.-]{1,64}\Z")
odd_text = st.text(max_size=80) | st.sampled_from(
    ["", " ", "miku", "us-west", "alice", "0", "90", "-90.0", "180", "1e400", "-1e400", "nan",
     "inf", "-0", "1_0", " 5 ", "٣", "x" * 65, "a\x00b", "\ufffd", "true", "1"])
values = odd_text | names | st.floats().map(str) | st.integers().map(str)
keys = st.sampled_from(["user", "model", "region", "lat", "lon", "resume", "takeover"])
json_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
                | names)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=5),
                           max_leaves=12)


def check_lobby(got: LobbyRequest) -> None:
    """What a parsed lobby request promises the lobby."""
    assert USER_RE.match(got.user) and USER_RE.match(got.model)
    assert -90 <= got.lat <= 90 and -180 <= got.lon <= 180
    assert got.region is None or CFG.region(got.region) is not None
    assert got.resume is None or USER_RE.match(got.resume)


def check_refusal(e: BadRequest) -> None:
    assert e.code in ("bad_request", "unknown_model"), e.code
    assert str(e) and len(str(e)) < 600, str(e)   # says what to fix; never echoes a flood


@FUZZ
@given(st.dictionaries(keys | st.text(max_size=8), values, max_size=8),
       st.dictionaries(st.just("uid") | st.text(max_size=5), values, max_size=2))
@example({"user": "alice", "model": "miku", "lat": "nan", "lon": "0"}, {})
@example({"user": "alice", "model": "miku", "lat": "1e400", "lon": "0"}, {})
@example({"model": "miku", "region": "us-west"}, {"uid": "bob"})
def test_parse_lobby(args: dict[str, str], cookies: dict[str, str]) -> None:
    try:
        check_lobby(parse_lobby(args, cookies, CFG))
    except BadRequest as e:
        check_refusal(e)


def query(pairs: list[tuple[bytes, bytes]]) -> str:
    return "&".join(urllib.parse.quote_from_bytes(k) + "=" + urllib.parse.quote_from_bytes(v)
                    for k, v in pairs)


raw_pairs = st.lists(st.tuples(st.sampled_from([b"user", b"model", b"region", b"lat", b"lon",
                                                b"resume"]) | st.binary(max_size=6),
                               st.binary(max_size=40) | values.map(str.encode)), max_size=6)


@FUZZ
@given(st.binary(max_size=300).map(lambda b: b.decode("latin-1")) | raw_pairs.map(query),
       st.binary(max_size=100).map(lambda b: b.decode("latin-1")))
@example("user=%ff%fe&model=miku&region=us-west", "")
@example("user=alice&model=%c3%28&region=us-west", "uid=\xff\xfe")
@example("user=alice&model=miku&region=us-west&" + "x=y&" * 2000, "")
def test_raw_query_strings(raw: str, cookie: str) -> None:
    """Bytes as they come off the wire (non-UTF-8, broken escapes, floods of keys), through
    werkzeug as the lobby view gets them."""
    environ = create_environ("/ws/session")
    environ["QUERY_STRING"], environ["HTTP_COOKIE"] = raw, cookie
    req = Request(environ)
    try:
        req.query_string.decode()
    except UnicodeDecodeError:
        return   # refused before any view runs: test_query_strings_that_are_not_utf8
    try:
        check_lobby(parse_lobby(req.args, req.cookies, CFG))
    except BadRequest as e:
        check_refusal(e)


@FUZZ
@given(odd_text | st.datetimes().map(lambda t: t.isoformat()) | st.sampled_from(
    ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-11-27Z", "2026-W48"]))
def test_parse_since(raw: str) -> None:
    try:
        got = parse_since(raw)
    except BadRequest as e:
        check_refusal(e)
        return
    assert got is None or got.tzinfo is None   # naive UTC, as the ledger compares


@FUZZ
@given(st.text(max_size=50), st.text(max_size=200), st.integers(0, 5))
@example("10.0.0.1", "::ffff:1.2.3.4", 1)
@example("10.0.0.1", "[2001:db8::1]", 1)
@example("10.0.0.1", " , ,,", 3)
def test_client_of(remote: str, forwarded: str, proxies: int) -> None:
    got = client_of({"REMOTE_ADDR": remote, "HTTP_X_FORWARDED_FOR": forwarded}, proxies)
    assert got.key and len(got.key) <= 64   # a Redis key of bounded size, whatever was sent


start_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["start", "stop", "x"]) | st.text(max_size=5)},
    optional={"sample_rate": json_values | st.integers(0, 100_000) | st.floats()})
node_messages = (st.text(max_size=100) | st.binary(max_size=100) | json_values.map(json.dumps)
                 | start_like.map(json.dumps))


@FUZZ
@given(node_messages)
@example(DEEP)
@example('{"type": "start", "sample_rate": NaN}')
@example('{"type": "start", "sample_rate": 1e400}')
@example('{"type": "start", "sample_rate": true}')
def test_node_start_message(msg: str | bytes) -> None:
    try:
        rate = protocol.parse_start(msg)
    except Malformed as e:
        assert str(e)
        return
    assert isinstance(rate, int) and protocol.MIN_RATE_HZ <= rate <= protocol.MAX_RATE_HZ


@FUZZ
@given(st.text(max_size=100) | json_values.map(json.dumps) | start_like.map(json.dumps))
@example(DEEP)
def test_node_text_while_streaming(msg: str) -> None:
    try:
        protocol.check_text(msg)
    except Malformed as e:
        assert str(e)
        return
    assert json.loads(msg)["type"] == "stop"


@FUZZ
@given(st.integers(0, 2 * protocol.MAX_MESSAGE_BYTES),
       st.integers(protocol.MIN_RATE_HZ, protocol.MAX_RATE_HZ))
def test_node_binary_frame(nbytes: int, rate: int) -> None:
    bounds = protocol.frame_bounds(rate)
    try:
        n = protocol.check_frame(nbytes, rate, bounds)
    except Malformed as e:
        assert str(e)
        return
    assert 2 * n == nbytes and bounds[0] <= n <= bounds[1]
    assert protocol.MIN_FRAME_S - 1e-3 <= n / rate <= protocol.MAX_FRAME_S + 1e-3


def row(size: int) -> Any:
    """A report row: mostly the right shape, with a wrong value or length now and then."""
    good = st.tuples(*[names | st.integers(-1, 10**12).map(lambda i: i * 60) | st.floats()
                       | st.sampled_from(["a1b2", "zz", ""])
                       for _ in range(size)]).map(list)
    return good | st.lists(json_scalars, max_size=size + 1) | json_scalars


beat_bodies = st.fixed_dictionaries({}, optional={
    "state": st.sampled_from(["loading", "ready", "draining", "dead", "booting"]) | json_values,
    "progress": json_values, "eta_ready_s": json_values, "ready_at": json_values,
    "serving": json_values,
    "streams": st.lists(row(4), max_size=4) | json_values,
    "usage": st.lists(row(5), max_size=4) | json_values,
    "closed": st.lists(row(2), max_size=4) | json_values})


@FUZZ
@given(beat_bodies | st.dictionaries(st.text(max_size=8), json_values, max_size=5))
@example({"state": "ready", "usage": [[math.inf, "u", "s", "a1", 1.0]]})
@example({"state": "ready", "usage": [[60, "u", "s", "a1", math.nan]]})
@example({"state": "ready", "streams": [["u", "s", math.inf, "a1"]]})
@example({"state": "ready", "closed": ["ab"]})
@example({"state": "ready", "progress": "x", "eta_ready_s": [1]})
def test_node_report(body: dict[str, Any]) -> None:
    try:
        beat = membership.parse_beat(body)
    except BadReport as e:
        assert isinstance(e, ValueError) and str(e)   # the node endpoints answer 400
        return
    assert beat.state in membership.NODE_STATES and 0.0 <= beat.progress <= 1.0
    for user, session, _fence in beat.streams:
        assert USER_RE.match(user) and USER_RE.match(session)
    for minute, _key, seconds in beat.usage:
        assert minute % 60 == 0 and 0.0 <= seconds <= 60.0
    for user, session in beat.closed:
        assert USER_RE.match(user) and USER_RE.match(session)
    for value in (beat.eta_ready, beat.ready_at):
        assert value is None or math.isfinite(value)


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
@example(DEEP.encode())
@example(b'{"a": 1e400}')
def test_node_report_text(raw: bytes) -> None:
    try:
        got = membership.parse_report(raw)
    except BadReport as e:
        assert str(e)
        return
    assert isinstance(got, dict)


@pytest.fixture(scope="module")
def app_client(redis_server: str) -> Iterator[tuple[FlaskClient, str]]:
    """The webapp in process on the real Redis, and one joined node's credential."""
    cfg: Config = make_config(redis_server)
    state = State(connect(redis_server))
    node_id = "n-fuzz"
    state.add_node({"id": node_id, "home": "us-west", "region": "us-west", "provider": "local",
                    "model": "miku", "version": "1", "digest": "", "state": "booting",
                    "requested_at": time.time(), "deadline": time.time() + 600,
                    "capacity": 4, "price_per_hour": "1.10"})
    token = membership.join_token_for(state, cfg, node_id)
    grant = membership.join(state, cfg, token, "ws://127.0.0.1:9/ws", time.time())
    yield create_app(cfg, state).test_client(), grant.credential
    state.forget_node(node_id)


bodies = (st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
          | beat_bodies.map(lambda v: json.dumps(v).encode()))


@FUZZ
@given(bodies, st.sampled_from(["application/json", "text/plain", None]))
@example(DEEP.encode(), "application/json")
@example(b'{"token": [1], "url": {}}', "application/json")
def test_node_join_endpoint(app_client: tuple[FlaskClient, str], body: bytes,
                            ctype: str | None) -> None:
    client, _ = app_client
    got = client.post("/api/nodes/join", data=body, content_type=ctype)
    assert got.status_code in (400, 401), (got.status_code, got.data[:200])
    assert got.get_json()["message"]


@FUZZ
@given(bodies)
@example(DEEP.encode())
@example(json.dumps({"state": "ready", "usage": [[1e400, "u", "s", "a1", 1]]}).encode())
def test_node_heartbeat_endpoint(app_client: tuple[FlaskClient, str], body: bytes) -> None:
    client, credential = app_client
    got = client.post("/api/nodes/heartbeat", data=body, content_type="application/json",
                      headers={"Authorization": f"Bearer {credential}"})
    assert got.status_code in (200, 400), (got.status_code, got.data[:200])
    if got.status_code == 400:
        assert got.get_json()["error"] == "bad_request" and got.get_json()["message"]


@pytest.mark.parametrize("path", ["/ws/session", "/api/usage", "/healthz"])
def test_query_strings_that_are_not_utf8(app_client: tuple[FlaskClient, str], path: str) -> None:
    client, _ = app_client
    got = client.get(path, environ_overrides={"QUERY_STRING": "user=\x80\xff&model=miku"})
    assert got.status_code == 400 and "percent-encode" in got.get_json()["message"]
