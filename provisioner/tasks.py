"""Celery tasks: thin adapters around provisioner.fleet. Pass ids, never driver objects.

Every task is idempotent, so it is acknowledged late (a worker that dies mid-task leaves it
to be delivered again) and a provider's error retries it with backoff. Countdowns are
seconds, far below the broker visibility timeout. The beat runs `tick` every couple of
seconds as the backstop; events (a user who found no slot, a node lost) call `scale` at
once. The scale step holds a lease it renews while it runs; the tick's steps fail alone.
Billing (`billing.*`: settle usage, keep the GPU bill) runs on its own queue and worker, so
a hung database never holds up provisioning: a node's end is noted in Redis at its death
and written to the bill when the database answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery, shared_task

from billing.ledger import Ledger
from common.config import Config
from common.errors import ConfigError
from provisioner import catalog, clouds, fleet, membership
from provisioner.inputs import TICK_S
from provisioner.state import State, connect

log = logging.getLogger("provisioner.tasks")

VISIBILITY_S = 600
BILLING_QUEUE = "billing"   # its own worker: provisioning never waits on the database
NODE_ENDS_PER_TICK = 500
SOFT_LIMIT_S = 120
RETRY = {"autoretry_for": clouds.PROVIDER_ERRORS, "retry_backoff": 2, "retry_backoff_max": 60,
         "retry_jitter": True, "max_retries": 6}   # ~2 min of a provider's errors


def _redis_url(cfg: Config) -> str:
    """The live-state Redis (Celery's broker too), or ConfigError when none is configured."""
    if not cfg.redis_url:
        raise ConfigError("REDIS_URL is unset: the Celery worker and beat need the live-state "
                          "Redis as their broker; set REDIS_URL=redis://HOST:6379/0 (`voicectl "
                          "run` starts an embedded one and sets it for its own workers)")
    return cfg.redis_url


def make_celery(cfg: Config) -> Celery:
    """The Celery app for this config: broker = the live-state Redis."""
    url = _redis_url(cfg)
    app = Celery("voice", broker=url, backend=url,
                 include=["provisioner.tasks"])
    app.conf.update(
        # A task a dead worker held comes back after this (tasks are idempotent; the tick
        # is the backstop for everything but a node's provisioning). With sentinel:// URLs
        # broker and results follow the primary named `master_name` through a failover.
        broker_transport_options={"visibility_timeout": VISIBILITY_S,
                                  "master_name": cfg.redis_master},
        result_backend_transport_options={"master_name": cfg.redis_master},
        broker_connection_retry_on_startup=True,
        result_expires=600,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,   # redelivered (idempotent)
        # Enforced by prefork workers (deployments); the local run's thread pool cannot
        # interrupt a thread, so every provider call also has its driver's own timeout.
        task_soft_time_limit=SOFT_LIMIT_S,
        task_time_limit=SOFT_LIMIT_S + 30,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        task_routes={"billing.*": {"queue": BILLING_QUEUE}},
        beat_schedule={"tick": {"task": "provisioner.tick", "schedule": TICK_S},
                       "billing": {"task": "billing.tick", "schedule": TICK_S}},
    )
    app.voice = Runtime(cfg)  # type: ignore[attr-defined]
    return app


class Runtime:
    """What tasks need, built once per worker process from the config."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.state = State(connect(_redis_url(cfg), cfg.redis_master))
        self._ledger: Ledger | None = None

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:   # lazily: a worker that never bills opens no database
            # Deployed workers only check the schema: `voicectl migrate` ran before them.
            self._ledger = Ledger.open(self.cfg.database_url, migrate=not self.cfg.deployed)
        return self._ledger

    def on_end(self, end: fleet.NodeEnd) -> None:
        """The node's bill closes at its end, from its request, in its provider's
        increments: noted now, written by the billing worker."""
        rec = end.record
        self.state.note_node_end(membership.bill_row(rec), end.ended_at,
                                 membership.increment_s(self.cfg, rec.provider))


def _rt(task: Any) -> Runtime:
    return task.app.voice  # type: ignore[no-any-return]


@shared_task(bind=True, ignore_result=True, name="provisioner.provision", **RETRY)
def provision(self: Any, node_id: str) -> None:
    rt = _rt(self)
    if fleet.provision(rt.state, rt.cfg, node_id, time.time()):
        self.app.send_task("provisioner.poll", (node_id,), countdown=fleet.POLL_S)


@shared_task(bind=True, ignore_result=True, name="provisioner.poll", **RETRY)
def poll(self: Any, node_id: str) -> None:
    rt = _rt(self)
    outcome = fleet.poll(rt.state, rt.cfg, node_id, time.time(), rt.on_end)
    if outcome == "waiting":
        self.app.send_task("provisioner.poll", (node_id,), countdown=fleet.POLL_S)
    elif outcome == "gone":
        self.app.send_task("provisioner.scale")


# A killed worker's scale lease frees itself after this (a live holder renews it every
# third): every tick skips scaling until then (bench/faults.py: 30 s held a cold user 98 s).
FLIGHT_TTL_S = 6.0


@contextmanager
def lease(state: State, name: str, ttl_s: float = FLIGHT_TTL_S) -> Iterator[bool]:
    """Hold `name` while the block runs (True), renewing it every third of `ttl_s` so a
    slow step (a provider taking its time) keeps it; False if someone else holds it."""
    token = state.single_flight(name, ttl_s)
    if token is None:
        yield False
        return
    done = threading.Event()

    def renew() -> None:
        while not done.wait(ttl_s / 3):
            if not state.renew_flight(name, token, ttl_s):
                log.warning("lease %s lost while held; another step may run", name)
                return

    threading.Thread(target=renew, name=f"lease-{name}", daemon=True).start()
    try:
        yield True
    finally:
        done.set()
        state.land(name, token)


def _step(what: str, fn: Callable[[], object]) -> None:
    """One step of the tick; its failure is logged and leaves the others to run."""
    try:
        fn()
    except Exception:  # a task's boundary: the next tick retries this step
        log.exception("tick: %s failed; the next tick retries", what)


def _scale(task: Any, reap: bool = False) -> bool:
    """One scale step (after reaping, on the tick), never two at once: two overlapping
    snapshots would both boot nodes for the same waiting users. False if one is running."""
    rt = _rt(task)
    with lease(rt.state, "scale") as held:
        if not held:
            return False
        if reap:
            _step("rolling back failed versions",
                  lambda: catalog.roll_back_failures(rt.state, rt.cfg, time.time()))
            _step("draining old versions",
                  lambda: fleet.drain_old_versions(rt.state, rt.cfg, time.time()))
            _step("reaping", lambda: fleet.reap(rt.state, rt.cfg, time.time(), rt.on_end))
            _step("re-sending lost provisions", lambda: fleet.resend_lost(
                rt.state, rt.cfg, time.time(),
                lambda node_id: task.app.send_task("provisioner.provision", (node_id,))))
        fleet.scale(rt.state, rt.cfg, time.time(),
                    lambda node_id: task.app.send_task("provisioner.provision", (node_id,)),
                    rt.on_end)
    return True


@shared_task(bind=True, ignore_result=True, name="provisioner.scale")
def scale(self: Any) -> None:
    """Event-driven scale-up; if a scale step is running, try again in a moment."""
    if not _scale(self):
        self.app.send_task("provisioner.scale", countdown=0.2)


@shared_task(bind=True, ignore_result=True, name="provisioner.tick")
def tick(self: Any) -> None:
    """The beat's backstop: reap the dead, drain old versions, scale."""
    _scale(self, reap=True)


@shared_task(bind=True, ignore_result=True, name="billing.tick")
def billing_tick(self: Any) -> None:
    """The billing worker's beat: keep the GPU bill, settle the usage; each step alone."""
    rt = _rt(self)
    _step("keeping the GPU bill", lambda: _bill_nodes(rt, time.time()))
    _step("settling usage", lambda: _settle(rt, time.time()))


def _settle(rt: Runtime, now: float) -> int:
    return rt.ledger.settle_from(rt.state, now)


def _bill_nodes(rt: Runtime, now: float) -> dict[str, float]:
    """Open a bill for every node in the fleet (noting its last heartbeat), close the bills
    of nodes that ended at their end, and stop the meters of nodes that vanished with the
    live state (nothing else would stop them)."""
    rt.ledger.open_nodes(membership.bill_row(n) for n in rt.state.nodes())
    bills = rt.ledger.open_bills()      # the bills first, then the fleet: a node that joins
    fleet_ids = set(rt.state.node_ids())   # between the two reads is in neither
    ends = rt.state.node_ends(NODE_ENDS_PER_TICK)   # after the fleet: a node is forgotten
    for end in ends:                                 # only after its end is noted
        rt.ledger.close_node(end["node"], float(end["ended_s"]), int(end["increment_s"]))
    rt.state.drop_node_ends(len(ends))
    ended = {str(end["node"]["id"]) for end in ends}
    return rt.ledger.close_vanished([b for b in bills if b[0] not in ended], fleet_ids, now,
                                    lambda provider: membership.increment_s(rt.cfg, provider))


@shared_task(bind=True, name="billing.settle")
def settle(self: Any, now: float | None = None) -> int:
    """Settle every unsettled minute started before `now` into usage_minutes, and keep the
    GPU bill; `now` may be given (tests, back-fills). Returns usage rows written."""
    rt = _rt(self)
    _bill_nodes(rt, time.time())
    return _settle(rt, time.time() if now is None else now)
