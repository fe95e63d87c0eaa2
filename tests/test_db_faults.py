"""The billing database hung or away (issue 20): every call gives up within its timeouts,
/healthz says which dependency is down, /api/usage answers JSON 503, never an HTML 500."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from conftest import serve

from billing.ledger import Ledger
from billing.tables import CONNECT_TIMEOUT_S, open_db
from common.config import Config
from provisioner.state import State
from webapp.app import create_app


@pytest.fixture
def hung_db() -> Iterator[str]:
    """A PostgreSQL URL whose server accepts connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    yield f"postgresql+psycopg://voice@127.0.0.1:{listener.getsockname()[1]}/voice"
    stop.set()
    for s in held:
        s.close()
    listener.close()


def test_a_hung_database_fails_fast_and_says_so(hung_db: str, cfg: Config, state: State,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import billing.tables
    monkeypatch.setattr(billing.tables, "CONNECT_TIMEOUT_S", 1)   # 5 in service: same path
    ledger = Ledger(open_db(hung_db))   # not Ledger.open: it would migrate, and hang there
    t0 = time.monotonic()
    assert ledger.check().startswith("unavailable")
    assert time.monotonic() - t0 < 3 * CONNECT_TIMEOUT_S
    host, server = serve(create_app(cfg, state, ledger=ledger))
    try:
        health = requests.get(f"http://{host}/healthz", timeout=30)
        assert health.status_code == 503
        body = health.json()
        assert body["redis"] == "ok" and body["database"].startswith("unavailable")
        t0 = time.monotonic()
        usage = requests.get(f"http://{host}/api/usage?user=alice", timeout=30)
        assert usage.status_code == 503 and usage.json()["error"] == "unavailable"
        assert "try again" in usage.json()["message"]
        assert time.monotonic() - t0 < 3 * CONNECT_TIMEOUT_S
    finally:
        server.shutdown()


def test_healthz_takes_a_write(db_url: str, cfg: Config, state: State) -> None:
    ledger = Ledger.open(db_url)
    assert ledger.check() == "ok"
    host, server = serve(create_app(cfg, state, ledger=ledger))
    try:
        assert requests.get(f"http://{host}/healthz", timeout=10).json() == {
            "ok": True, "redis": "ok", "database": "ok"}
    finally:
        server.shutdown()
        ledger.engine.dispose()


def test_reaping_needs_no_database_and_the_bill_closes_at_the_death(
        hung_db: str, redis_url: str, db_url: str, state: State,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The database hangs: the provisioning tick still reaps a dead node at once (its end is
    noted in Redis); when the database answers, the billing worker closes that node's bill
    at its death, not at the time it was written."""
    from conftest import make_config

    import billing.tables
    from billing.math import epoch
    from provisioner.tasks import make_celery
    monkeypatch.setattr(billing.tables, "CONNECT_TIMEOUT_S", 1)
    now = time.time()
    state.add_node({"id": "n-dead", "home": "us-west", "region": "us-west",
                    "provider": "local", "model": "miku", "version": "1", "digest": "",
                    "state": "ready", "requested_at": now - 120, "started_at": now - 120,
                    "last_seen": now - 60, "capacity": 4, "price_per_hour": "1.10"})
    state.stamp_beat_path(now - 60, gap_s=60)   # a webapp took heartbeats all along
    hung = make_celery(make_config(redis_url, DATABASE_URL=hung_db))
    t0 = time.monotonic()
    hung.tasks["provisioner.tick"].apply().get()
    assert time.monotonic() - t0 < 5 and state.node("n-dead") is None   # reaped, no database
    (end,) = state.node_ends(10)
    assert end["node"]["id"] == "n-dead" and abs(end["ended_s"] - time.time()) < 5
    hung.tasks["billing.tick"].apply()            # the billing worker fails alone, keeps it
    assert len(state.node_ends(10)) == 1
    time.sleep(1.5)
    back = make_celery(make_config(redis_url, DATABASE_URL=db_url))
    back.tasks["billing.tick"].apply().get()      # the database is back
    (bill,) = back.voice.ledger.node_costs()       # type: ignore[attr-defined]
    assert abs(epoch(bill["stopped_at"]) - end["ended_s"]) < 0.01 and not state.node_ends(10)
    back.voice.ledger.engine.dispose()             # type: ignore[attr-defined]


@pytest.fixture
def freezable_pg() -> Iterator[tuple[str, threading.Event]]:
    """PostgreSQL (TEST_DATABASE_URL) behind a proxy that, once the event is set, keeps
    every connection open and forwards nothing more: a database that hangs mid-life."""
    import os

    from sqlalchemy.engine import make_url
    if not os.environ.get("TEST_DATABASE_URL"):
        pytest.skip("PostgreSQL only: set TEST_DATABASE_URL (.ci/run does)")
    upstream = make_url(os.environ["TEST_DATABASE_URL"])
    frozen = threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def pump(a: socket.socket, b: socket.socket) -> None:
        while (data := a.recv(65536)) and not frozen.is_set():
            b.sendall(data)

    def accept() -> None:
        while True:
            try:
                client = listener.accept()[0]
            except OSError:
                return
            if frozen.is_set():
                continue   # held open, never answered
            server = socket.create_connection((upstream.host or "127.0.0.1",
                                               upstream.port or 5432))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield str(upstream.set(host="127.0.0.1", port=listener.getsockname()[1])
              .render_as_string(hide_password=False)), frozen
    listener.close()


def test_usage_and_health_fail_fast_when_a_working_database_hangs(
        freezable_pg: tuple[str, threading.Event], cfg: Config, state: State,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The database answered, then hangs: a pooled connection would wait for as long as
    it stays silent; /api/usage and /healthz use a new connection each, so they answer
    JSON 503 within the connect timeout."""
    import billing.tables
    monkeypatch.setattr(billing.tables, "CONNECT_TIMEOUT_S", 1)
    url, frozen = freezable_pg
    ledger = Ledger.open(url)
    host, server = serve(create_app(cfg, state, ledger=ledger))
    try:
        assert requests.get(f"http://{host}/api/usage?user=alice", timeout=30).status_code == 200
        frozen.set()
        t0 = time.monotonic()
        usage = requests.get(f"http://{host}/api/usage?user=alice", timeout=60)
        assert usage.status_code == 503 and usage.json()["error"] == "unavailable"
        assert requests.get(f"http://{host}/healthz", timeout=60).status_code == 503
        assert time.monotonic() - t0 < 6 * 1 + 3
    finally:
        server.shutdown()
