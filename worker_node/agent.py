"""The node agent: heartbeats the node's state into Redis and mirrors its streams' slots.

A node never needs to be told anything to die safely: if its heartbeats stop, the
control plane frees its slots and re-places its users.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from decimal import Decimal

from provisioner.state import State
from worker_node.runtime import NodeRuntime, Stream

log = logging.getLogger("worker_node.agent")


class Agent:
    def __init__(self, node: NodeRuntime, state: State, interval_s: float,
                 price_per_hour: Decimal, crash_rate_per_min: float = 0.0,
                 rng: random.Random | None = None) -> None:
        self.node, self.state, self.interval_s = node, state, interval_s
        self.price = price_per_hour
        self.crash_rate = crash_rate_per_min
        self.rng = rng or random.Random()
        self._stop = threading.Event()

    def fields(self, now: float) -> dict[str, object]:
        snap = self.node.snapshot()
        eta = float(snap["eta_ready_s"])  # type: ignore[arg-type]
        return {
            "id": snap["id"], "provider": snap["provider"], "region": snap["region"],
            "model": snap["model"], "version": snap["version"], "state": snap["state"],
            "progress": snap["progress"], "url": snap["url"], "capacity": snap["capacity"],
            "started_at": snap["started_at"], "price_per_hour": self.price,
            "eta_ready": now + eta if eta > 0 else "",
        }

    def beat(self) -> None:
        self.state.heartbeat(self.fields(time.time()), time.time())

    def on_open(self, stream: Stream) -> None:
        self.state.mark_live(self.node.id, stream.session_id)

    def on_close(self, stream: Stream) -> None:
        self.state.release_slot(self.node.id, stream.session_id)

    def maybe_crash(self, dt_s: float) -> None:
        """CRASH_RATE is the chance of dying in a given minute; scale it to this tick."""
        if self.crash_rate > 0 and self.rng.random() < 1 - (1 - self.crash_rate) ** (dt_s / 60):
            log.error("simulated GPU crash (CRASH_RATE=%s): node %s exits now",
                      self.crash_rate, self.node.id)
            os._exit(70)

    def run(self) -> None:
        """Beat until stopped; a faster first beat while loading so progress shows early."""
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception:  # process boundary: Redis may be briefly away; keep beating
                log.exception("heartbeat failed; retrying")
            self.maybe_crash(self.interval_s)
            loading = self.node.progress < 1
            self._stop.wait(min(self.interval_s, 0.5) if loading else self.interval_s)

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="agent", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()
