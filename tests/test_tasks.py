"""The Celery tasks as production runs them: a lease renewed while a slow step holds it, a
tick whose failing step (a provider's outage) never stops reaping or billing, the bills of
nodes that vanished with the live state closed, and billing on its own queue."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

from conftest import fleet_config, make_config
from test_clouds import CONFIG

from billing.ledger import Ledger
from billing.math import epoch, node_cost
from provisioner import membership
from provisioner.state import State
from provisioner.tasks import lease, make_celery


def test_a_held_lease_is_renewed_and_released(state: State) -> None:
    with lease(state, "scale", ttl_s=0.3) as held:
        assert held
        time.sleep(1.0)                       # three lease lives: renewed, still ours
        with lease(state, "scale", ttl_s=0.3) as again:
            assert not again
    with lease(state, "scale", ttl_s=0.3) as after:   # released at the end of the block
        assert after


def test_a_providers_outage_stops_neither_reaping_nor_billing(redis_url: str, state: State,
                                                              tmp_path: Path) -> None:
    """The EC2 API is unreachable (every call raises): the tick still reaps the dead local
    node, and still settles the minutes streamed."""
    cfg = fleet_config(redis_url, tmp_path, CONFIG.format(image="ami-x",
                                                          endpoint="http://127.0.0.1:9"),
                       database_url=f"sqlite:///{tmp_path / 'b.sqlite'}")
    now = time.time()
    state.add_node({"id": "n-dead", "home": "us-west", "region": "us-west",
                    "provider": "local", "model": "miku", "version": "1", "digest": "",
                    "state": "ready", "requested_at": now - 120, "started_at": now - 120,
                    "last_seen": now - 60, "capacity": 4, "price_per_hour": "1.10"})
    minute = int(now // 60 * 60) - 120
    state.report_usage([(minute, "u1|s1:ab|n-dead|miku|us-west", 42.0)])
    state.stamp_beat_path(now - 60, gap_s=60)   # a webapp took heartbeats all along
    app = make_celery(cfg)
    app.tasks["provisioner.tick"].apply().get()
    assert state.node("n-dead") is None                     # reaped
    app.tasks["billing.tick"].apply().get()
    ledger = Ledger.open(cfg.database_url)
    assert [r.seconds for r in ledger.usage("u1")] == [42.0]   # settled
    assert [r["stopped_at"] is not None for r in ledger.node_costs()] == [True]   # its bill
    ledger.engine.dispose()


def test_the_bills_of_nodes_that_vanished_with_the_live_state_are_closed(
        redis_url: str, db_url: str, state: State) -> None:
    """Redis lost two node records (a flush, a restart without its data): nothing would stop
    their meters. The tick stops one at its last heartbeat on record, the other (never
    seen) at the tick; a live node's meter runs on. SQLite, and PostgreSQL if configured."""
    cfg = make_config(redis_url, DATABASE_URL=db_url)
    app = make_celery(cfg)
    now = time.time()
    last = now - 2 * cfg.heartbeat_interval_s      # missed one beat: alive, not reaped
    for node_id, seen in (("n-live", now), ("n-gone", last), ("n-booting", 0.0)):
        state.add_node({"id": node_id, "home": "us-west", "region": "us-west",
                        "provider": "local", "model": "miku", "version": "1", "digest": "",
                        "state": "booting" if not seen else "ready", "requested_at": now - 600,
                        "started_at": now - 600, "deadline": now + 600, "capacity": 4,
                        "price_per_hour": "3.60", **({"last_seen": seen} if seen else {})})
    app.tasks["billing.tick"].apply().get()
    ledger = Ledger.open(cfg.database_url)
    assert {r["node_id"]: r["stopped_at"] for r in ledger.node_costs()} == {
        "n-live": None, "n-gone": None, "n-booting": None}
    state.forget_node("n-gone")                       # vanished, bill open
    state.forget_node("n-booting")
    before = time.time()
    app.tasks["billing.tick"].apply().get()
    bills = {r["node_id"]: r for r in ledger.node_costs()}
    assert bills["n-live"]["stopped_at"] is None
    gone = bills["n-gone"]
    assert gone["stopped_at"] is not None and bills["n-booting"]["stopped_at"] is not None
    assert abs(epoch(gone["stopped_at"]) - last) < 0.01            # its last heartbeat
    assert gone["cost"] == node_cost(now - 600, last, Decimal("3.60"),
                                     membership.increment_s(cfg, "local"))
    assert before <= epoch(bills["n-booting"]["stopped_at"]) <= time.time()   # never seen
    app.tasks["billing.tick"].apply().get()                     # closed once
    assert {r["node_id"]: r["stopped_at"] for r in ledger.node_costs()} == {
        k: v["stopped_at"] for k, v in bills.items()}
    ledger.engine.dispose()
    app.voice.ledger.engine.dispose()   # type: ignore[attr-defined]


def test_billing_runs_on_its_own_queue() -> None:
    """A hung database holds the billing worker, never the provisioning one."""
    app = make_celery(make_config("redis://127.0.0.1:9/0"))
    route = app.amqp.router.route({}, "billing.tick")
    assert route["queue"].name == "billing"
    assert app.amqp.router.route({}, "provisioner.tick")["queue"].name == "celery"
    assert app.amqp.router.route({}, "billing.settle")["queue"].name == "billing"
    assert {e["task"] for e in app.conf.beat_schedule.values()} == {"provisioner.tick",
                                                                    "billing.tick"}
