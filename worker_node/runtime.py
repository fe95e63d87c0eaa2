"""The node's own view of itself: load state, live streams and their streamed time.

Thread-safe; one instance per worker_node process. It knows nothing of Redis or HTTP.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.config import RECALL_MOVE_S
from common.errors import TicketError
from common.states import NodeState
from common.tickets import Ticket
from worker_node.package import Loaded, Processor

# A planned move (drain deadline) is make-before-break: each live stream is told to move
# (text {"type": "move"}) MOVE_NOTICE_S before the deadline, so the page can open its new
# stream first and stop this one itself; a stream still here at the deadline is closed with
# 4503. A node that learns of a deadline late (a drain limit under MOVE_NOTICE_S, or beats
# that did not get through) still gives its streams MIN_MOVE_S after the notice: the
# control plane stops a draining node only a heartbeat timeout (3 beats) past its deadline.
MOVE_NOTICE_S = 10.0
MIN_MOVE_S = 2.0
MOVED = "this node was drained; resume through the lobby to continue on another node"
RECALLED = ("your nearest region serves again; resume through the lobby to continue there")


@dataclass
class Stream:
    session_id: str
    user: str
    fence: int
    seconds: float = 0.0          # cumulative audio seconds processed
    minutes: dict[int, float] = field(default_factory=dict)  # UTC minute -> seconds in it
    kick: Callable[[int, str], None] | None = None   # closes the socket from another thread
    notify: Callable[[str], None] | None = None      # sends it a text message from another thread
    move_by: float | None = None  # told to move: closed (4503) at this time (epoch s) if still here
    moved_why: str = MOVED        # the close reason then
    # One usage counter per connection: a session resumed on the same node in the same
    # minute starts a fresh counter instead of being hidden under the old one's maximum.
    conn: str = field(default_factory=lambda: uuid.uuid4().hex[:8])


@dataclass
class NodeRuntime:
    id: str
    model: str
    version: str
    region: str
    provider: str
    digest: str                   # the model package it serves
    capacity: int
    load_s: float
    started_at: float = field(default_factory=time.time)
    state: NodeState = NodeState.LOADING
    progress: float = 0.0
    url: str = ""
    ready_at: float | None = None
    drain_deadline: float | None = None
    streams: dict[str, Stream] = field(default_factory=dict)
    fences: dict[str, int] = field(default_factory=dict)   # highest fence seen per user
    lock: threading.Lock = field(default_factory=threading.Lock)
    served: Loaded | None = None  # the loaded package, once loaded
    used_tickets: dict[tuple[str, int], float] = field(default_factory=dict)   # -> expiry
    clock_offset_s: float = 0.0   # the control plane's clock minus ours (agent.py keeps it)
    local_clock: Callable[[], float] = time.time   # this machine's (tests skew it)
    stalled: Callable[[], float] = lambda: 0.0     # seconds the model call now running has run
    # per stream [session, frames in, out, age of the frame owed]; answers' p95 lateness (ms)
    stream_progress: Callable[[], tuple[list[list[Any]], float | None]] = lambda: ([], None)
    load_error: str = ""          # why it could not load (state DEAD)
    started: int = 0              # streams started since it loaded what it serves
    failed: int = 0               # of those, closed because the model failed (1011)

    def now(self) -> float:
        """The control plane's time as this node best knows it: tickets, drain deadlines
        and usage minutes are in it, whatever this machine's clock says."""
        return self.local_clock() + self.clock_offset_s

    def check_ticket(self, t: Ticket) -> None:
        """TicketError unless `t` is for what this node serves, unused (its session and
        fence are unique per lobby placement; remembered until it expires) and not stale
        (fencing). A newer ticket closes the user's older stream (4409)."""
        if (t.model, t.version) != (self.model, self.version):
            raise TicketError(f"ticket is for model {t.model} v{t.version}, this node serves "
                              f"{self.model} v{self.version}; reconnect through the lobby")
        now = self.now()
        with self.lock:
            self.used_tickets = {k: e for k, e in self.used_tickets.items() if e > now}
            if (t.session, t.fence) in self.used_tickets:
                raise TicketError("this ticket was used already (a ticket opens one stream); "
                                  "reconnect through the lobby for a new one")
            self.used_tickets[(t.session, t.fence)] = t.exp
            seen = self.fences.get(t.user, 0)
            if t.fence < seen:
                raise TicketError(f"stale ticket: fence {t.fence} < {seen}; the user has a "
                                  "newer session, reconnect through the lobby")
            self.fences[t.user] = t.fence
            older = [s for s in self.streams.values()
                     if s.user == t.user and s.session_id != t.session]
        for s in older:
            if s.kick:
                s.kick(4409, "this user started streaming elsewhere; this stream was taken over")

    def make_processor(self, rate: int) -> Processor:
        """A processor of the loaded model for one stream at `rate`."""
        served = self.served
        if served is None:
            raise RuntimeError(f"model {self.model} is not loaded")
        return served.make(rate)

    def load(self, warm_up: Callable[[str], Loaded],
             on_done: Callable[[], None] = lambda: None,
             clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> None:
        """Load the model: fetch, check and import its package and warm it up (`warm_up`),
        then wait out the rest of MODEL_LOAD_SECONDS with progress (the stand-in's load
        time); `on_done` runs once ready or dead (the agent reports it at once)."""
        start = clock()
        try:
            served = warm_up(self.digest)
        except Exception as e:  # the model cannot load: this node is dead (the agent exits)
            logging.getLogger("worker_node").exception("model %s failed to load", self.model)
            with self.lock:
                self.state, self.load_error = NodeState.DEAD, f"{type(e).__name__}: {e}"
            on_done()
            return
        self.served = served
        # What exists now lives for the process: full collections need not scan it again (tens
        # of ms each). Done here, off the audio thread, not when the first stream arrives.
        gc.collect()
        gc.freeze()
        while (elapsed := clock() - start) < self.load_s:
            self.progress = min(0.99, elapsed / self.load_s)
            sleep(min(0.1, self.load_s - elapsed))
        with self.lock:
            self.progress = 1.0
            if self.state is NodeState.LOADING:
                self.state = NodeState.READY
                self.ready_at = self.now()
        on_done()

    def retarget(self, model: str, version: str, digest: str, capacity: int,
                 warm_up: Callable[[str], Loaded], on_done: Callable[[], None]) -> bool:
        """Reload with another model (only when idle); False if already serving it."""
        with self.lock:
            if (model, version) == (self.model, self.version) or self.streams:
                return False
            self.model, self.version, self.digest = model, version, digest
            self.capacity, self.served, self.started, self.failed = capacity, None, 0, 0
            self.state, self.progress, self.ready_at = NodeState.LOADING, 0.0, None
        threading.Thread(target=self.load, args=(warm_up, on_done), daemon=True).start()
        return True

    def undrain(self) -> None:
        """No longer draining (a rollback, a consolidation over): take new streams again;
        streams the drain told to move may stay (a recalled one still moves)."""
        with self.lock:
            self.drain_deadline = None
            for s in self.streams.values():
                if s.move_by is not None and s.moved_why == MOVED:
                    s.move_by = None
            if self.state is NodeState.DRAINING:
                self.state = NodeState.READY

    def drain(self, deadline: float, now: float, min_move_s: float = MIN_MOVE_S) -> None:
        """Take no new streams; from MOVE_NOTICE_S before the deadline tell each live stream
        to move (make-before-break), and close those still here when their time is up: at
        the deadline, but not sooner than `min_move_s` after they were told."""
        told: list[tuple[Stream, float]] = []
        with self.lock:
            self.drain_deadline = deadline
            if self.state is NodeState.READY:
                self.state = NodeState.DRAINING
            if now >= deadline - MOVE_NOTICE_S:
                for s in self.streams.values():
                    if s.move_by is None:
                        s.move_by = max(deadline, now + min_move_s)
                        told.append((s, s.move_by - now))
        for s, left_s in told:
            _tell_move(s, "drain", "this node is draining (a new version replaces it, or its "
                       "users are gathered onto fewer nodes): moving you to another", left_s)
        self.close_moved(now)

    def recall(self, session_id: str, now: float, within_s: float = RECALL_MOVE_S) -> bool:
        """The control plane moves this stream back to its user's nearest region, which was
        down when it was placed here (make-before-break, as a drain's move). False if the
        stream is not here or was told to move already."""
        with self.lock:
            s = self.streams.get(session_id)
            if s is None or s.move_by is not None:
                return False
            s.move_by, s.moved_why = now + within_s, RECALLED
        _tell_move(s, "recall", "your nearest region serves again: moving you there",
                   within_s)
        return True

    def close_moved(self, now: float) -> None:
        """Close the streams told to move that are still here when their time is up."""
        with self.lock:
            late = [(sid, s.moved_why) for sid, s in self.streams.items()
                    if s.move_by is not None and now >= s.move_by]
        for sid, why in late:
            self.kick(sid, 4503, why)

    def moving(self, session_id: str) -> bool:
        """This stream was told to move: its session's newer connection elsewhere does not
        cut it (the page stops it once the new one plays, or it closes at `move_by`)."""
        with self.lock:
            stream = self.streams.get(session_id)
            return stream is not None and stream.move_by is not None

    def kick(self, session_id: str, code: int, reason: str, below: int | None = None) -> None:
        """Close one stream from outside its thread; with `below`, only a connection of the
        session under that fence (not the resume that replaced it here meanwhile)."""
        with self.lock:
            stream = self.streams.get(session_id)
        if stream is not None and stream.kick is not None and (below is None
                                                               or stream.fence < below):
            stream.kick(code, reason)

    def open(self, stream: Stream) -> str | None:
        """Admit a stream; returns None, or why it is refused (a 4503 reason).

        A second connection of a live session replaces the first (the page reconnected
        after a drop the node has not noticed yet); the old socket is closed."""
        with self.lock:
            old = self.streams.get(stream.session_id) if self.state.serving else None
            if old is None:
                if self.state is NodeState.LOADING:
                    return (f"model {self.model} is still loading ({self.progress:.0%}); "
                            "wait for the lobby's ready message")
                if self.state is not NodeState.READY:
                    return f"node is {self.state.value}; reconnect through the lobby"
                if len(self.streams) >= self.capacity:
                    return f"node full ({self.capacity} streams); reconnect through the lobby"
                self.started += 1
            self.streams[stream.session_id] = stream
        if old is not None and old.kick is not None:
            old.kick(4409, "this session reconnected; this connection was replaced")
        return None

    def model_failed(self) -> None:
        """A stream closed because the model failed (1011): counted for rollback."""
        with self.lock:
            self.failed += 1

    def close(self, stream: Stream) -> bool:
        """Forget the stream; False if a newer connection of its session replaced it."""
        with self.lock:
            if self.streams.get(stream.session_id) is stream:
                del self.streams[stream.session_id]
                return True
            return False

    def add_seconds(self, stream: Stream, seconds: float, now: float) -> None:
        """Meter audio processed at `now` into its UTC minute (a frame never spans two)."""
        minute = int(now // 60) * 60
        with self.lock:
            stream.seconds += seconds
            stream.minutes[minute] = stream.minutes.get(minute, 0.0) + seconds

    def usage(self, streams: list[Stream] | None = None) -> list[tuple[int, str, float]]:
        """Cumulative counters (minute, "user|session|node|model|region", seconds)."""
        with self.lock:
            chosen = list(self.streams.values()) if streams is None else streams
            return [(m, f"{s.user}|{s.session_id}:{s.conn}|{self.id}|{self.model}|{self.region}",
                     round(secs, 4))
                    for s in chosen for m, secs in s.minutes.items()]

    def snapshot(self) -> dict[str, object]:
        with self.lock:
            eta_s = (1.0 - self.progress) * self.load_s if self.state is NodeState.LOADING else 0
            return {
                "id": self.id, "model": self.model, "version": self.version,
                "region": self.region, "provider": self.provider, "state": self.state.value,
                "progress": round(self.progress, 3), "url": self.url,
                "capacity": self.capacity, "started_at": self.started_at,
                "ready_at": self.ready_at, "drain_deadline": self.drain_deadline,
                "eta_ready_s": round(max(0.0, eta_s), 2),
                "streams": {sid: round(s.seconds, 3) for sid, s in self.streams.items()},
            }


def _tell_move(s: Stream, reason: str, message: str, left_s: float) -> None:
    if s.notify is not None:
        s.notify(json.dumps({"type": "move", "reason": reason, "message": message,
                             "close_in_ms": round(1000 * left_s)}))
