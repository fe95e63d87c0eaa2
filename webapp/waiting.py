"""The waiting room: one poller per webapp process for every lobby that waits for a node.

A waiting lobby costs no Redis of its own: the room assigns, refreshes locks and reads
positions for all of them in a few script calls a step, and lobbies read their news from
their `Waiter` (docs/architecture.md, "Waiting lobbies").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from common.config import Config
from provisioner.state import NodeRecord, State
from provisioner.versions import Version

if TYPE_CHECKING:
    from webapp.fleetview import FleetView

log = logging.getLogger("webapp.waiting")

BACKSTOP_S = 1.0
LOCK_CHECK_S = 2.0   # how often waiters' locks are refreshed (and take-overs noticed)
# A waiting lobby's lock lives this long unrefreshed: the webapp holding it died, and its
# user (resuming through another) or another tab of theirs is not locked out for long.
WAITING_LOCK_TTL_S = 3 * LOCK_CHECK_S
# Waiters per Redis call and per stretch of the room's step: thousands waiting in one
# process otherwise hold Redis (one script over every lock) and the process (one loop)
# for tens of ms, and every request behind them waits.
CHUNK = 250


@dataclass(eq=False)
class Waiter:
    """One waiting lobby, as the room sees it; the room writes the last three fields."""

    user: str
    session_id: str
    fence: int
    pool: str
    model: Version
    home: str
    node_id: str | None = None   # assigned: its slot is reserved for this session
    lost: bool = False           # another session took the user's lock over
    position: int = 1
    wake: Callable[[], None] = lambda: None   # the lobby's: something above changed


Candidates = Callable[[Config, str, str, str, list[NodeRecord], float], list[str]]


class WaitingRoom:
    """A step runs when room may have appeared (pub/sub `LOBBY_WAKE` from any process, a
    lobby joined) and otherwise every `backstop_s`. `read` reads the fleet now (a cached view
    may not show the node that caused the event yet); waiters read `view`, the last step's."""

    def __init__(self, state: State, cfg: Config, read: Callable[[], FleetView],
                 candidates: Candidates, backstop_s: float = BACKSTOP_S) -> None:
        self.state, self.cfg = state, cfg
        self.read, self.candidates = read, candidates
        self.view: FleetView | None = None
        self.backstop_s = backstop_s
        self._lock = threading.Lock()
        self._waiters: dict[str, Waiter] = {}
        self._wake = threading.Event()
        self._started = False
        self._checked_at = float("-inf")
        self._lost: set[tuple[str, int]] = set()   # (session, fence) of taken locks
        self._news: object = None   # what every waiter hears of: outages, refusals, versions

    def enter(self, waiter: Waiter) -> None:
        with self._lock:
            old = self._waiters.get(waiter.session_id)
            if old is not None and old is not waiter:   # a resume of its session, here:
                # that lobby is done (its client went; it would wait on for minutes)
                old.lost = True
                old.wake()
            self._waiters[waiter.session_id] = waiter
            if not self._started:
                self._started = True
                threading.Thread(target=self._loop, name="waiting-room", daemon=True).start()
                threading.Thread(target=self._listen, name="waiting-wake", daemon=True).start()
        self.poke()

    def leave(self, waiter: Waiter) -> str | None:
        """Stop waiting; the node the room had just given it, if any (give its slot back)."""
        with self._lock:
            if self._waiters.get(waiter.session_id) is waiter:
                del self._waiters[waiter.session_id]
            return waiter.node_id

    def poke(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.backstop_s)
            self._wake.clear()
            try:
                self.step(time.time())
            except redis.RedisError as e:   # a thread's boundary: try again next step
                log.warning("waiting room: Redis failed: %s", e)
            except Exception:  # a thread's boundary: one bad step must not strand waiters
                log.exception("waiting room: step failed; trying again")

    def _listen(self) -> None:
        pause_s = 1.0
        while True:
            try:
                sub = self.state.lobby_wake_subscription()
                for _ in sub.listen():   # type: ignore[attr-defined]
                    pause_s = 1.0
                    self.poke()
            except redis.RedisError as e:   # a thread's boundary: resubscribe
                log.warning("waiting room: wake-ups lost (%s); resubscribing in %.0f s",
                            e, pause_s)
                time.sleep(pause_s)     # the backstop step still runs meanwhile
                pause_s = min(2 * pause_s, 30.0)

    def step(self, now: float) -> None:
        with self._lock:
            waiters = list(self._waiters.values())
        if not waiters:
            return
        if now - self._checked_at >= LOCK_CHECK_S:   # keep their locks; notice take-overs
            self._checked_at = now
            lost_now: set[tuple[str, int]] = set()
            for at in range(0, len(waiters), CHUNK):   # Redis is held a moment at a time
                chunk = waiters[at:at + CHUNK]
                taken = set(self.state.refresh_locks(
                    "lobby", [(w.user, w.session_id, w.fence) for w in chunk],
                    min(self.cfg.ticket_ttl_s, WAITING_LOCK_TTL_S)))
                lost_now.update((w.session_id, w.fence) for w in chunk if w.session_id in taken)
                time.sleep(0)   # (a greenlet's yield: requests between the chunks go on)
            self._lost = lost_now
        lost = self._lost
        pools: dict[str, Waiter] = {}
        for w in waiters:
            pools.setdefault(w.pool, w)
        self.view = view = self.read()
        coming = sorted((n.id, n.state.value) for m in {w.model.model for w in waiters}
                        for n in view.records(m) if n.state.coming)
        news = (view.down, tuple(sorted(view.constrained.items())),
                tuple((n, e.live, e.canary) for n, e in sorted(view.models.items())),
                tuple(coming))
        if news != self._news:   # a region down or back, a refusal, a version, a node
            # coming (an ETA to show): every waiter looks now
            self._news = news
            for w in waiters:
                w.wake()
        for pool, w in pools.items():
            if all((x.session_id, x.fence) in lost for x in waiters if x.pool == pool):
                continue
            self.state.assign(pool, self.candidates(self.cfg, w.model.model, w.model.version,
                                                    w.home, view.records(w.model.model), now),
                              now, self.cfg.ticket_ttl_s, self.cfg.heartbeat_timeout_s)
        got: dict[str, str] = {}
        for at in range(0, len(waiters), CHUNK):
            got.update(self.state.take_assignments([(w.user, w.session_id, w.fence)
                                                    for w in waiters[at:at + CHUNK]]))
            time.sleep(0)
        order = {pool: {sid: i + 1 for i, sid in enumerate(queue)}   # a lookup, not a scan:
                 for pool, queue in self.state.queues(list(pools)).items()}   # 5,000 wait
        with self._lock:
            for i, read in enumerate(waiters):
                if i % CHUNK == CHUNK - 1:
                    time.sleep(0)
                sid = read.session_id
                node = got.pop(sid, None)
                # its waiter now: a resume of the session in the same pool may have replaced
                # the one read above (the node is the resume's); if it left, or waits in
                # another pool's queue, the reserved slot goes back
                w = self._waiters.get(sid)
                if w is None or w.pool != read.pool:
                    if node:
                        self.state.release_slot(node, sid)
                    continue
                was = (w.lost, w.node_id, w.position)
                w.lost = (sid, w.fence) in lost
                if node:
                    w.node_id = node
                w.position = order.get(w.pool, {}).get(w.session_id, 1)
                if (w.lost, w.node_id, w.position) != was:
                    w.wake()   # its lobby acts now, not at its next look
