"""The node agent: heartbeats the node's own health, load and usage to the control plane
over HTTP, and obeys the orders in the answer.

Each beat reports state, load progress, the live streams (user, session, fence), their
per-minute streamed seconds, and the streams that closed since the last beat; the answer
carries the control plane's orders: a drain deadline (take no new streams; at the deadline
tell live ones to resume elsewhere), a retarget (reload another model), and the streams
whose user's lock another session took (closed with 4409). Orders that cannot wait arrive
on `/control`, signed with the node's key. A node never needs to be told anything to die
safely: if its heartbeats stop, the control plane frees its slots and re-places its users;
if the control plane stays unreachable, or forgot the node, the node exits by itself.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from common.states import NodeState
from worker_node.control import ControlClient, ControlError, Refused
from worker_node.runtime import NodeRuntime, Stream

log = logging.getLogger("worker_node.agent")

ORPHAN_AFTER_S = 15.0   # no control plane for this long: it is gone, so exit
REPORT_MINUTES_S = 300  # a closed minute's counter is final: re-reported this long, then not
TAKEN_OVER = "this user started streaming elsewhere; this stream was taken over"


class Agent:
    def __init__(self, node: NodeRuntime, control: ControlClient, interval_s: float,
                 crash_rate_per_min: float = 0.0, rng: random.Random | None = None,
                 warm_up: Callable[[], None] = lambda: None,
                 exit: Callable[[int], None] = os._exit) -> None:
        self.node, self.control, self.interval_s = node, control, interval_s
        self.warm_up = warm_up
        self.crash_rate = crash_rate_per_min
        self.rng = rng or random.Random()
        self.exit = exit
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._beating = threading.Lock()
        self._closed: list[tuple[str, str]] = []
        self.leaving = False   # SIGTERM: draining to leave; orders never undrain it
        self._last_ok = time.monotonic()

    def report(self) -> dict[str, Any]:
        """What this node says of itself: nothing the control plane decides."""
        snap = self.node.snapshot()
        with self.node.lock:
            streams = list(self.node.streams.values())
            live = [[s.user, s.session_id, s.fence, s.conn] for s in streams]
            closed = list(self._closed)
        return {"state": snap["state"], "progress": snap["progress"],
                "eta_ready_s": snap["eta_ready_s"], "ready_at": snap["ready_at"],
                "serving": f"{self.node.model}:{self.node.version}", "streams": live,
                "usage": self._usage(streams), "closed": [list(c) for c in closed]}

    def _usage(self, streams: list[Stream]) -> list[list[Any]]:
        """Counters of the last few minutes: older ones are final and were reported."""
        since = int(time.time() // 60) * 60 - REPORT_MINUTES_S
        with self.node.lock:
            return [[minute, s.user, s.session_id, s.conn, round(secs, 4)]
                    for s in streams for minute, secs in s.minutes.items() if minute >= since]

    def beat(self, extra_usage: list[Stream] | None = None) -> None:
        """One heartbeat and its orders (serialised: on_close and the loop both beat)."""
        with self._beating:
            report = self.report()
            if extra_usage:
                report["usage"] += self._usage(extra_usage)
            orders = self.control.beat(report)
            with self.node.lock:
                sent = {tuple(c) for c in report["closed"]}
                self._closed = [c for c in self._closed if c not in sent]
        if orders.get("retarget"):
            model, version, semitones = str(orders["retarget"]).split(":")
            if self.node.retarget(model, version, float(semitones), self.warm_up, self.poke):
                log.info("retargeted to %s v%s: loading", model, version)
                self.poke()
        for sid in orders.get("lost") or []:
            self.node.kick(str(sid), 4409, TAKEN_OVER)
        if orders.get("drain_deadline"):
            self.node.drain(float(orders["drain_deadline"]), time.time())
        elif not self.leaving:
            self.node.undrain()

    def on_open(self, stream: Stream) -> None:
        """Tell the control plane at once: the slot is live, and a stream whose lock
        another session holds (a take-over elsewhere) is closed right away."""
        self._safe_beat()

    def on_close(self, stream: Stream, current: bool) -> None:
        """Bill the last seconds; free the slot and the user's lock before the client hears
        the close, unless a newer connection of the same session took this one's place."""
        if current:
            with self.node.lock:
                self._closed.append((stream.user, stream.session_id))
        self._safe_beat([stream])

    def _safe_beat(self, extra_usage: list[Stream] | None = None) -> None:
        try:
            self.beat(extra_usage)
            self._last_ok = time.monotonic()
        except Refused:
            self._forgotten()
        except ControlError as e:  # the loop retries; lock expiry repairs what fails here
            log.warning("heartbeat failed: %s", e)

    def control_order(self, order: dict[str, Any]) -> None:
        """An order pushed to /control (already verified): kick streams, or beat now."""
        for sid in order.get("kick") or []:
            self.node.kick(str(sid), 4409, TAKEN_OVER)
        if order.get("wake"):
            self.poke()

    def maybe_crash(self, dt_s: float) -> None:
        """CRASH_RATE is the chance of dying in a given minute; scale it to this tick."""
        if self.crash_rate > 0 and self.rng.random() < 1 - (1 - self.crash_rate) ** (dt_s / 60):
            log.error("simulated GPU crash (CRASH_RATE=%s): node %s exits now",
                      self.crash_rate, self.node.id)
            self.exit(70)

    def _forgotten(self) -> None:
        log.error("the control plane no longer knows node %s: exiting", self.node.id)
        self.exit(0)

    def run(self) -> None:
        """Beat until stopped; faster while loading so the lobby's ETA stays fresh."""
        while not self._stop.is_set():
            try:
                self.beat()
                self._last_ok = time.monotonic()
            except Refused:
                self._forgotten()
            except ControlError as e:  # the control plane may be briefly away; keep beating
                log.warning("heartbeat failed: %s; retrying", e)
                if time.monotonic() - self._last_ok > ORPHAN_AFTER_S:
                    log.error("no control plane for %.0f s: exiting", ORPHAN_AFTER_S)
                    self.exit(0)
            if self.node.state is NodeState.DEAD:
                log.error("the model could not load: node %s exits", self.node.id)
                self.exit(71)
            loading = self.node.state is NodeState.LOADING
            self.maybe_crash(self.interval_s)
            self._poke.wait(min(self.interval_s, 0.5) if loading else self.interval_s)
            self._poke.clear()

    def poke(self) -> None:
        """Beat now (the model just loaded, or an order came), not at the next interval."""
        self._poke.set()

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="agent", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()
        self._poke.set()
