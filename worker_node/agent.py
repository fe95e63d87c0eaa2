"""The node agent: heartbeats the node's state into Redis and obeys the control flags.

Each beat writes state, load progress and the streamed seconds of every live stream, keeps
the users' single-stream locks alive, and reads back the control plane's flags: a drain
deadline (take no new streams; at the deadline tell live ones to resume elsewhere) and
take-overs (a stream whose lock another session took is closed with 4409). A node never
needs to be told anything to die safely: if its heartbeats stop, the control plane frees its
slots and re-places its users; if Redis stays unreachable, the node exits by itself.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from decimal import Decimal

from provisioner.state import WAKE, State
from provisioner.states import NodeState
from worker_node.runtime import NodeRuntime, Stream

log = logging.getLogger("worker_node.agent")

ORPHAN_AFTER_S = 15.0   # no Redis for this long: the control plane is gone, so exit


class Agent:
    def __init__(self, node: NodeRuntime, state: State, interval_s: float,
                 price_per_hour: Decimal, crash_rate_per_min: float = 0.0,
                 lock_ttl_s: float = 6.0, rng: random.Random | None = None,
                 warm_up: Callable[[], None] = lambda: None) -> None:
        self.warm_up = warm_up
        self.node, self.state, self.interval_s = node, state, interval_s
        self.price = price_per_hour
        self.crash_rate = crash_rate_per_min
        self.lock_ttl_s = lock_ttl_s
        self.rng = rng or random.Random()
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._last_ok = time.monotonic()

    def fields(self, now: float) -> dict[str, object]:
        snap = self.node.snapshot()
        eta = float(snap["eta_ready_s"])  # type: ignore[arg-type]
        return {
            "id": snap["id"], "provider": snap["provider"], "region": snap["region"],
            "model": snap["model"], "version": snap["version"],
            "state": NodeState.READY.value if snap["state"] == "draining" else snap["state"],
            "progress": snap["progress"], "url": snap["url"], "capacity": snap["capacity"],
            "started_at": snap["started_at"], "ready_at": snap["ready_at"] or "",
            "price_per_hour": self.price, "semitones": self.node.semitones,
            "eta_ready": now + eta if eta > 0 else "",
        }

    def beat(self) -> None:
        now = time.time()
        flags = self.state.node_flags(self.node.id)
        if flags["retarget"]:
            model, version, semitones = flags["retarget"].split(":")
            if self.node.retarget(model, version, float(semitones), self.warm_up, self.poke):
                log.info("retargeted to %s v%s: loading", model, version)
        self.state.heartbeat(self.fields(now), now)
        self.state.report_usage(self.node.usage())
        # Under the node's lock, so a stream that closes meanwhile is neither re-marked
        # live nor has its released lock re-created.
        with self.node.lock:
            live = [(s.user, s.session_id, s.fence) for s in self.node.streams.values()]
            self.state.sync_live(self.node.id, [sid for _, sid, _ in live])
            lost = self.state.refresh_locks(self.node.id, live, self.lock_ttl_s)
        for sid in lost:
            self.node.kick(sid, 4409, "this user started streaming elsewhere; this stream "
                                      "was taken over")
        if flags["retarget"]:
            self.state.finish_retarget(self.node.id)
        if flags["drain_deadline"]:
            self.node.drain(float(flags["drain_deadline"]), now)
        else:
            self.node.undrain()

    def on_open(self, stream: Stream) -> None:
        self.state.mark_live(self.node.id, stream.session_id)

    def on_close(self, stream: Stream, current: bool) -> None:
        """Bill the last seconds; free the slot and the user's lock at once, unless a newer
        connection of the same session took this one's place. Each step is best effort:
        the next heartbeat's slot sync and lock expiry repair what fails here."""
        steps = [lambda: self.state.report_usage(self.node.usage([stream]))]
        if current:
            steps += [lambda: self.state.release_slot(self.node.id, stream.session_id),
                      lambda: self.state.release_lock(stream.user, stream.session_id)]
        for step in steps:
            try:
                step()
            except Exception:  # process boundary: Redis away; the heartbeat repairs it
                log.exception("releasing session %s failed", stream.session_id)

    def admit(self, stream: Stream) -> str | None:
        holder = self.state.lock_holder(stream.user)
        if holder is not None and holder != stream.session_id:
            return ("this user's stream now belongs to another session (taken over); "
                    "reconnect through the lobby")
        return None

    def listen_for_kicks(self) -> None:
        """Close at once a stream whose user took over elsewhere (pub/sub from the lobby)."""
        while not self._stop.is_set():
            try:
                sub = self.state.kick_subscription(self.node.id)
                for msg in sub.listen():
                    if msg["data"] == WAKE:
                        self.poke()   # new control flags (a retarget): act now
                        continue
                    self.node.kick(str(msg["data"]), 4409, "this user started streaming "
                                   "elsewhere; this stream was taken over")
            except Exception:  # process boundary: resubscribe after a Redis hiccup
                log.exception("kick subscription lost; resubscribing")
                self._stop.wait(1.0)

    def maybe_crash(self, dt_s: float) -> None:
        """CRASH_RATE is the chance of dying in a given minute; scale it to this tick."""
        if self.crash_rate > 0 and self.rng.random() < 1 - (1 - self.crash_rate) ** (dt_s / 60):
            log.error("simulated GPU crash (CRASH_RATE=%s): node %s exits now",
                      self.crash_rate, self.node.id)
            os._exit(70)

    def run(self) -> None:
        """Beat until stopped; faster while loading so the lobby's ETA stays fresh."""
        while not self._stop.is_set():
            try:
                self.beat()
                self._last_ok = time.monotonic()
            except Exception:  # process boundary: Redis may be briefly away; keep beating
                log.exception("heartbeat failed; retrying")
                if time.monotonic() - self._last_ok > ORPHAN_AFTER_S:
                    log.error("no control plane for %.0f s: exiting", ORPHAN_AFTER_S)
                    os._exit(0)
            if self.node.state is NodeState.DEAD:
                log.error("the model could not load: node %s exits", self.node.id)
                os._exit(71)
            loading = self.node.state is NodeState.LOADING
            self.maybe_crash(self.interval_s)
            self._poke.wait(min(self.interval_s, 0.5) if loading else self.interval_s)
            self._poke.clear()

    def poke(self) -> None:
        """Beat now (the model just loaded), not at the next interval."""
        self._poke.set()

    def start(self) -> threading.Thread:
        threading.Thread(target=self.listen_for_kicks, name="kicks", daemon=True).start()
        t = threading.Thread(target=self.run, name="agent", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()
        self._poke.set()
