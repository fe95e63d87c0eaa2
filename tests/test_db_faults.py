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
