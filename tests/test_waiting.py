"""Waiting costs nothing: one waiting room per webapp process polls for every waiting lobby,
woken by events (a node turning ready, a slot freed), and tells waiters the truth."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import Fleet, lobby, serve
from simple_websocket import Client

from billing.ledger import Ledger
from common.config import Config
from provisioner import catalog, fleet
from provisioner.state import State
from webapp.app import create_app


@pytest.fixture
def slow_backstop(cfg: Config, state: State, tmp_path: Path) -> Iterator[tuple[str, Fleet]]:
    """A webapp whose waiting room looks for room on its own only every 60 s."""
    host, server = serve(create_app(cfg, state, ledger=Ledger.open(cfg.database_url),
                                    waiting_backstop_s=60.0))
    fleet = Fleet(cfg, state, tmp_path, f"http://{host}")
    yield f"ws://{host}", fleet
    server.shutdown()
    from voicectl import procs
    procs.stop(fleet.procs)


def test_a_node_turning_ready_wakes_waiting_lobbies_at_once(
        slow_backstop: tuple[str, Fleet]) -> None:
    ws_url, fleet = slow_backstop
    got: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: got.extend(
        lobby(ws_url, "user=w1&model=miku&region=us-west", timeout_s=40)))
    t.start()
    time.sleep(1.0)                          # queued: no node anywhere
    fleet.start("miku", region="us-west")   # its first ready heartbeat publishes a wake-up
    t.join(40)
    assert got and got[0]["type"] == "queued" and got[-1]["type"] == "ready", got


def test_many_waiting_lobbies_cost_few_redis_commands(webapp: Any) -> None:
    """50 lobbies waiting for a node that no one boots (no scaler here): Redis serves the
    room's few calls a second, not a poll per lobby (50 lobbies polling every 50 ms made
    about 6,000 commands a second)."""
    r = redis.Redis.from_url(webapp.config.redis_url)
    sockets = [Client.connect(f"{webapp.ws_url}/ws/session?user=q{i}&model=miku"
                              f"&region=us-west") for i in range(50)]
    try:
        first = [json.loads(ws.receive(timeout=30)) for ws in sockets]
        assert {m["type"] for m in first} == {"queued"}
        time.sleep(0.5)
        before = int(r.info("stats")["total_commands_processed"])
        time.sleep(3.0)
        per_s = (int(r.info("stats")["total_commands_processed"]) - before - 1) / 3.0
        assert per_s < 150, f"{per_s:.0f} Redis commands/s for 50 waiting lobbies"
        latest = [_latest(ws, m) for ws, m in zip(sockets, first, strict=True)]
        assert sorted(m["position"] for m in latest) == list(range(1, 51))   # the room's
    finally:
        for ws in sockets:
            ws.close()



def test_users_waiting_where_nothing_can_boot_cost_the_scaler_nothing_each(
        state: State, cfg: Config, caplog: pytest.LogCaptureFixture) -> None:
    """Every region is out of capacity: one scale step asks where to boot once for the
    pool, not once for every node its waiting users would want (200 users waiting made
    ~100 Redis reads and 50 warnings a step), so a waiting crowd costs Redis nothing more."""
    catalog.seed(state, cfg)
    for region in cfg.regions:
        state.mark_constrained(region.name, time.time() + 600, "out of capacity")

    def step_with(waiting: int) -> tuple[int, int]:
        for i in range(waiting):
            state.admit(f"c{waiting}-{i}", f"c{waiting}-{i}", "miku", "1", "us-west",
                        time.time(), [], lock_ttl_s=60, takeover=False, resume=False,
                        tau_s=600, hold_s=60, heartbeat_timeout_s=6)
        caplog.clear()
        before = int(state.r.info("stats")["total_commands_processed"])
        decisions = fleet.scale(state, cfg, time.time(), provision=lambda _: None,
                                on_end=lambda _: None)
        used = int(state.r.info("stats")["total_commands_processed"]) - before
        assert len(decisions.boot) >= waiting // 4   # it wants them all
        assert state.nodes() == []                                     # and none is asked
        return used, sum("no region may boot" in r.message for r in caplog.records)

    caplog.set_level(logging.WARNING, logger="provisioner")
    few, warned = step_with(8)
    assert warned == 1
    many, warned = step_with(200)
    assert warned == 1
    assert many - few < 20, f"{few} Redis commands a step for 8 waiting, {many} for 208"


def _latest(ws: Client, msg: dict[str, Any]) -> dict[str, Any]:
    while (raw := ws.receive(timeout=0.05)) is not None:
        msg = json.loads(raw)
    return msg
