"""The node agent: heartbeats the node's own health, load and usage to the control plane
over HTTP, and obeys the orders in the answer.

Each beat reports state, load progress, the live streams (user, session, fence), their
per-minute streamed seconds, and the streams that closed since the last beat; the answer
carries the control plane's orders: a drain deadline (take no new streams; at the deadline
tell live ones to resume elsewhere), a retarget (reload another model), and the streams
whose user's lock another session took (closed with 4409). A spot notice from the instance
metadata (`interrupted`) rides in every beat from then on (`interruption_at`): the control
plane drains the node so its users move before the machine goes. Orders that cannot wait arrive
on `/control`, signed with the node's key. A node never needs to be told anything to die
safely: if its heartbeats stop, the control plane frees its slots and re-places its users;
if the control plane forgot the node, or stays unreachable while the node neither streams
nor owes usage, the node exits by itself. Audio never needs the control plane: while it
is away, live streams go on (up to ORPHAN_SERVING_S), and the node keeps every per-minute
counter it has not delivered yet (the usage ledger) and reports it once a beat gets through
again; counters are cumulative and keyed by node, session, connection and minute, so a
report received twice changes nothing.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from common.config import ORPHAN_SERVING_S, RECALL_MOVE_S
from common.states import NodeState
from common.tickets import LEEWAY_S
from worker_node.control import ControlClient, ControlError, Refused
from worker_node.package import Loaded
from worker_node.runtime import NodeRuntime, Stream

log = logging.getLogger("worker_node.agent")

ORPHAN_AFTER_S = 15.0   # no control plane for this long, nothing streamed or owed: exit
MAX_REPORTED = 1000     # counters per beat (the control plane takes 2000); the rest next beat
METER_LAG_S = 10.0      # a minute's counter is final this long after the minute ends
TAKEN_OVER = "this user started streaming elsewhere; this stream was taken over"


def _no_loader(digest: str) -> Loaded:
    raise RuntimeError("this node was started without a package loader")


class Agent:
    def __init__(self, node: NodeRuntime, control: ControlClient, interval_s: float,
                 crash_rate_per_min: float = 0.0, rng: random.Random | None = None,
                 warm_up: Callable[[str], Loaded] | None = None,
                 exit: Callable[[int], None] = os._exit, orphan_s: float = ORPHAN_AFTER_S,
                 ) -> None:
        self.node, self.control, self.interval_s = node, control, interval_s
        self.orphan_s = orphan_s
        self.warm_up = warm_up or _no_loader
        self.crash_rate = crash_rate_per_min
        self.rng = rng or random.Random()
        self.exit = exit
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._beating = threading.Lock()
        self._closed: list[tuple[str, str]] = []
        # The usage ledger: counters of closed minutes already delivered (live streams'), and
        # those of closed streams not delivered yet: (minute, user, session, conn) -> seconds.
        self._delivered: set[tuple[int, str, str, str]] = set()
        self._owed: dict[tuple[int, str, str, str], float] = {}
        self.leaving = False   # SIGTERM: draining to leave; orders never undrain it
        self.interrupt_at: float | None = None   # a spot notice: the provider takes us back
        self._last_ok = time.monotonic()

    def report(self) -> dict[str, Any]:
        """What this node says of itself: nothing the control plane decides."""
        snap = self.node.snapshot()
        progress, lag_ms = self.node.stream_progress()
        with self.node.lock:
            streams = list(self.node.streams.values())
            live = [[s.user, s.session_id, s.fence, s.conn] for s in streams]
            closed = list(self._closed)
            counts = {"started": self.node.started, "failed": self.node.failed}
        return {"state": snap["state"], "progress": snap["progress"],
                "eta_ready_s": snap["eta_ready_s"], "ready_at": snap["ready_at"],
                "serving": f"{self.node.model}:{self.node.version}", "streams": live,
                "usage": self._usage(streams), "closed": [list(c) for c in closed],
                "counts": counts, "stalled_s": round(self.node.stalled(), 2),
                "stream_progress": progress, **({"lag_ms": lag_ms} if lag_ms is not None else {}),
                **({"clock_offset_s": round(self.node.clock_offset_s, 1)}
                   if abs(self.node.clock_offset_s) > LEEWAY_S else {}),
                **({"interruption_at": self.interrupt_at}
                   if self.interrupt_at is not None else {}),
                **({"load_error": self.node.load_error}
                                     if self.node.load_error else {})}

    def _usage(self, streams: list[Stream]) -> list[list[Any]]:
        """Counters not delivered yet: every minute of a live stream not reported closed
        in a beat that got through, and the closed streams' counters owed (oldest first)."""
        with self.node.lock:
            due = [[m, s.user, s.session_id, s.conn, round(secs, 4)]
                   for s in streams for m, secs in s.minutes.items()
                   if (m, s.user, s.session_id, s.conn) not in self._delivered]
            due += [[m, user, session, conn, round(secs, 4)]
                    for (m, user, session, conn), secs in self._owed.items()]
        due.sort(key=lambda c: c[0])
        return due[:MAX_REPORTED]

    def beat(self) -> None:
        """One heartbeat and its orders (serialised: on_close and the loop both beat)."""
        with self._beating:
            report = self.report()
            sent = self.node.local_clock()
            orders = self.control.beat(report)
            self._keep_time(orders, sent, self.node.local_clock())
            self._got_through(report)
        if orders.get("retarget"):
            model, version, digest, capacity = str(orders["retarget"]).split(":")
            if self.node.retarget(model, version, digest, int(capacity), self.warm_up,
                                  self.poke):
                log.info("retargeted to %s v%s: loading", model, version)
                self.poke()
        reported = {str(s[1]): int(s[2]) for s in report["streams"]}
        for sid in orders.get("lost") or []:
            if not self.node.moving(str(sid)):   # a moving stream's lock went ahead to its
                # new connection: not a take-over; nor is a resume that replaced it here since
                self.node.kick(str(sid), 4409, TAKEN_OVER,
                               below=reported.get(str(sid), -1) + 1)
        if orders.get("drain_deadline"):   # closes the streams told to move, time up, too
            self.node.drain(float(orders["drain_deadline"]), self.node.now())
        else:
            if not self.leaving:
                self.node.undrain()
            self.node.close_moved(self.node.now())   # recalled streams whose time is up

    def _keep_time(self, orders: dict[str, Any], sent: float, got: float) -> None:
        """Keep the control plane's clock: its `now` was read about halfway through the
        round trip. A machine clock off by more than the ticket leeway is said once."""
        try:
            offset = float(orders["now"]) - (sent + got) / 2
        except (KeyError, TypeError, ValueError):
            return
        if abs(offset) > LEEWAY_S and abs(offset - self.node.clock_offset_s) > LEEWAY_S:
            log.warning("this machine's clock is %+.1f s off the control plane's; "
                        "keeping the control plane's (fix NTP here)", -offset)
        self.node.clock_offset_s = offset

    def _got_through(self, report: dict[str, Any]) -> None:
        """The control plane has this report: its closed streams and its counters of
        closed minutes (final) are delivered."""
        # Minutes closed when it was made, with a margin for frames metered late.
        closed_before = int((self.node.now() - METER_LAG_S) // 60) * 60 - 60
        with self.node.lock:
            sent = {tuple(c) for c in report["closed"]}
            self._closed = [c for c in self._closed if c not in sent]
            live = {(s.session_id, s.conn) for s in self.node.streams.values()}
            for minute, user, session, conn, _ in report["usage"]:
                key = (minute, user, session, conn)
                if key in self._owed:
                    del self._owed[key]     # a closed stream's counters are final
                elif minute <= closed_before:
                    self._delivered.add(key)
            self._delivered = {k for k in self._delivered if (k[2], k[3]) in live}

    def on_open(self, stream: Stream) -> None:
        """Tell the control plane at once: the slot is live, and a stream whose lock
        another session holds (a take-over elsewhere) is closed right away."""
        self._safe_beat()

    def on_close(self, stream: Stream, current: bool) -> None:
        """Bill the last seconds; free the slot and the user's lock before the client hears
        the close, unless a newer connection of the same session took this one's place."""
        with self.node.lock:
            if current:
                self._closed.append((stream.user, stream.session_id))
            for minute, secs in stream.minutes.items():   # owed until a beat gets through
                key = (minute, stream.user, stream.session_id, stream.conn)
                if key not in self._delivered:
                    self._owed[key] = round(secs, 4)
        self._safe_beat()

    def _safe_beat(self) -> None:
        try:
            self.beat()
            self._last_ok = time.monotonic()
        except Refused:
            self._forgotten()
        except ControlError as e:  # the loop retries; lock expiry repairs what fails here
            log.warning("heartbeat failed: %s", e)

    def control_order(self, order: dict[str, Any]) -> None:
        """An order pushed to /control (already verified): kick streams, or beat now."""
        below = order.get("below")   # the connections under the new holder's fence only
        for sid in order.get("kick") or []:
            self.node.kick(str(sid), 4409, TAKEN_OVER,
                           below=int(below) if isinstance(below, int) else None)
        for sid in order.get("recall") or []:   # back to its nearest region, make-before-break
            self.node.recall(str(sid), self.node.now(),
                             float(order.get("within_s") or RECALL_MOVE_S))
        if order.get("wake"):
            self.poke()

    def interrupted(self, at: float) -> None:
        """The provider takes this machine back at `at` (a spot notice from the instance
        metadata): every beat from now says so, the first one at once; the control plane
        drains us (its answer carries the deadline) and our users move."""
        log.warning("spot notice: this machine is taken back in %.0f s", at - self.node.now())
        self.interrupt_at = at
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
        checked = time.monotonic()
        while not self._stop.is_set():
            try:
                self.beat()
                self._last_ok = time.monotonic()
            except Refused:
                self._forgotten()
            except ControlError as e:  # the control plane may be briefly away; keep beating
                log.warning("heartbeat failed: %s; retrying", e)
                away = time.monotonic() - self._last_ok
                busy = bool(self.node.streams or self._owed)   # streaming, or owing usage
                if away > (ORPHAN_SERVING_S if busy else self.orphan_s):
                    log.error("no control plane for %.0f s: exiting", away)
                    self.exit(0)
            if self.node.state is NodeState.DEAD:
                try:   # the control plane hears why (automatic rollback counts it)
                    self.beat()
                except ControlError:
                    pass
                log.error("the model could not load (%s): node %s exits",
                          self.node.load_error, self.node.id)
                self.exit(71)
            loading = self.node.state is NodeState.LOADING
            now = time.monotonic()   # passes come faster than the interval (loading, orders)
            self.maybe_crash(now - checked)
            checked = now
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
