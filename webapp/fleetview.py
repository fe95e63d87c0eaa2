"""The fleet as the lobbies of one webapp process see it: one shared view, read from Redis
at most every few hundred ms, so a hundred lobbies do not each read every node."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import redis

from provisioner.state import NodeRecord, State, row_record
from provisioner.versions import Entry

log = logging.getLogger("webapp.fleetview")

MAX_AGE_S = 0.25      # an older view is served while one background read replaces it
STALE_LIMIT_S = 1.0   # a view older than this is read again before it is used
READ_SHARE_INVERSE = 10   # a view is read again after at least 10x the last read's time


@dataclass(frozen=True)
class FleetView:
    """The fleet as last read: node rows grouped by model, made into records only for the
    models a lobby asks about (a thousand nodes' records cost the process tens of ms)."""

    rows: dict[str, list[str]]     # model -> its nodes' packed rows (State.node_rows)
    models: dict[str, Entry]       # model name -> its versions
    down: frozenset[str]
    constrained: dict[str, str]    # region -> why its provider refused to create nodes
    _built: dict[str, list[NodeRecord]] = field(default_factory=dict)

    def records(self, model: str) -> list[NodeRecord]:
        """The nodes serving or loading `model`."""
        got = self._built.get(model)
        if got is None:   # two threads may both build it: the same list either way
            got = self._built[model] = [row_record(r) for r in self.rows.get(model, ())]
        return got


class FleetCache:
    """The fleet, live models and regions in outage as last read, shared by every lobby of
    this process. No lobby waits for a read of a thousand nodes while lobbies keep coming
    (a background read replaces a view past MAX_AGE_S), and nothing is read while none asks.
    Staleness only affects the order candidates are tried in (the admit and assign scripts
    re-check them) and the ETA; the waiting room reads it fresh when a node changed."""

    def __init__(self, state: State) -> None:
        self.state = state
        self._lock = threading.Lock()
        self._view: FleetView | None = None
        self._read_at = float("-inf")
        self._reading = False
        self._read_s = 0.0

    def _read(self) -> FleetView:
        started = time.monotonic()
        models = self.state.model_entries()
        now = time.time()
        rows: dict[str, list[str]] = {}
        for model, row in self.state.node_rows():
            rows.setdefault(model, []).append(row)
        view = FleetView(rows, models, self.state.regions_down(now),
                         self.state.constrained(now))
        self._read_at = started
        self._read_s = time.monotonic() - started
        return view

    def get(self, fresh: bool = False) -> FleetView:
        """The view; `fresh`: read now (the waiting room, woken because a node changed)."""
        if fresh or self._view is None or time.monotonic() - self._read_at > STALE_LIMIT_S:
            asked = time.monotonic()
            with self._lock:   # one read for everyone who waited on it
                if fresh or self._view is None or self._read_at < asked - STALE_LIMIT_S:
                    self._view = self._read()
                return self._view
        age = time.monotonic() - self._read_at
        # Reading a big fleet takes the process's time from its lobbies: read at most so
        # often that reading takes a tenth of one core.
        if age > max(MAX_AGE_S, READ_SHARE_INVERSE * self._read_s):
            with self._lock:
                start, self._reading = not self._reading, True
            if start:
                threading.Thread(target=self._refresh, name="fleet-view", daemon=True).start()
        return self._view

    def _refresh(self) -> None:
        try:
            self._view = self._read()
        except redis.RedisError as e:   # a thread's boundary: keep the last view
            log.warning("fleet view not refreshed: %s", e)
        finally:
            self._reading = False
