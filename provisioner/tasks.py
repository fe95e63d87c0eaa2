"""Celery tasks: thin adapters around provisioner.fleet. Pass ids, never driver objects.

Every task is idempotent; countdowns are seconds, far below the broker visibility timeout.
The beat runs `tick` every couple of seconds as the backstop; events (a user who found no
slot, a node lost) call `scale` at once.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery, shared_task

from billing.ledger import Ledger
from common.config import Config
from provisioner import fleet, membership
from provisioner.inputs import TICK_S
from provisioner.state import State, connect


def make_celery(cfg: Config) -> Celery:
    """The Celery app for this config: broker = the live-state Redis."""
    assert cfg.redis_url, "Celery needs REDIS_URL"
    app = Celery("voice", broker=cfg.redis_url, backend=cfg.redis_url,
                 include=["provisioner.tasks"])
    app.conf.update(
        broker_transport_options={"visibility_timeout": 3600},
        broker_connection_retry_on_startup=True,
        result_expires=600,
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        beat_schedule={"tick": {"task": "provisioner.tick", "schedule": TICK_S}},
    )
    app.voice = Runtime(cfg)  # type: ignore[attr-defined]
    return app


class Runtime:
    """What tasks need, built once per worker process from the config."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        assert cfg.redis_url
        self.state = State(connect(cfg.redis_url))
        self._ledger: Ledger | None = None

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:   # lazily: a worker that never bills opens no database
            # Deployed workers only check the schema: `voicectl migrate` ran before them.
            self._ledger = Ledger.open(self.cfg.database_url, migrate=not self.cfg.deployed)
        return self._ledger

    def on_end(self, end: fleet.NodeEnd) -> None:
        """Close the node's bill: from its request to now, in its provider's increments."""
        rec = end.record
        self.ledger.close_node(membership.bill_row(rec), end.ended_at,
                               membership.increment_s(self.cfg, rec.provider))


def _rt(task: Any) -> Runtime:
    return task.app.voice  # type: ignore[no-any-return]


@shared_task(bind=True, ignore_result=True, name="provisioner.provision")
def provision(self: Any, node_id: str) -> None:
    rt = _rt(self)
    if fleet.provision(rt.state, rt.cfg, node_id, time.time()):
        self.app.send_task("provisioner.poll", (node_id,), countdown=fleet.POLL_S)


@shared_task(bind=True, ignore_result=True, name="provisioner.poll")
def poll(self: Any, node_id: str) -> None:
    rt = _rt(self)
    outcome = fleet.poll(rt.state, rt.cfg, node_id, time.time(), rt.on_end)
    if outcome == "waiting":
        self.app.send_task("provisioner.poll", (node_id,), countdown=fleet.POLL_S)
    elif outcome == "gone":
        self.app.send_task("provisioner.scale")


FLIGHT_TTL_S = 30.0   # a crashed worker's scale lock frees itself after this


def _scale(task: Any, reap: bool = False) -> bool:
    """One scale step (after reaping, on the tick), never two at once: two overlapping
    snapshots would both boot nodes for the same waiting users. False if one is running."""
    rt = _rt(task)
    token = rt.state.single_flight("scale", FLIGHT_TTL_S)
    if token is None:
        return False
    try:
        now = time.time()
        if reap:
            fleet.drain_old_versions(rt.state, rt.cfg, now)
            fleet.reap(rt.state, rt.cfg, now, rt.on_end)
        fleet.scale(rt.state, rt.cfg, time.time(),
                    lambda node_id: task.app.send_task("provisioner.provision", (node_id,)),
                    rt.on_end)
    finally:
        rt.state.land("scale", token)
    return True


@shared_task(bind=True, ignore_result=True, name="provisioner.scale")
def scale(self: Any) -> None:
    """Event-driven scale-up; if a scale step is running, try again in a moment."""
    if not _scale(self):
        self.app.send_task("provisioner.scale", countdown=0.2)


@shared_task(bind=True, ignore_result=True, name="provisioner.tick")
def tick(self: Any) -> None:
    """The beat's backstop: reap the dead, drain old versions, scale, settle the bill."""
    _scale(self, reap=True)
    _settle(_rt(self), time.time())


def _settle(rt: Runtime, now: float) -> int:
    rt.ledger.open_nodes(membership.bill_row(n) for n in rt.state.nodes())
    return rt.ledger.settle_from(rt.state, now)


@shared_task(bind=True, name="billing.settle")
def settle(self: Any, now: float | None = None) -> int:
    """Settle closed minutes into usage_minutes; `now` may be given (tests, back-fills)."""
    return _settle(_rt(self), time.time() if now is None else now)
