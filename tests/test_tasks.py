"""The Celery tasks as production runs them: a lease renewed while a slow step holds it, and
a tick whose failing step (a provider's outage) never stops reaping or billing."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import fleet_config
from test_clouds import CONFIG

from billing.ledger import Ledger
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
                    "provider": "local", "model": "miku", "version": "1", "semitones": 4,
                    "state": "ready", "requested_at": now - 120, "started_at": now - 120,
                    "last_seen": now - 60, "capacity": 4, "price_per_hour": "1.10"})
    minute = int(now // 60 * 60) - 120
    state.report_usage([(minute, "u1|s1:ab|n-dead|miku|us-west", 42.0)])
    app = make_celery(cfg)
    app.tasks["provisioner.tick"].apply().get()
    assert state.node("n-dead") is None                     # reaped
    ledger = Ledger.open(cfg.database_url)
    assert [r.seconds for r in ledger.usage("u1")] == [42.0]   # settled
    ledger.engine.dispose()
