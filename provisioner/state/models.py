"""Models: each model's versions (one JSON `Entry`, changed by compare-and-set), the running
count that spreads new sessions over a canary, and what nodes reported of each version."""

from __future__ import annotations

import json
from collections.abc import Callable

from provisioner.state.base import StateBase
from provisioner.state.keys import MODELS, canary_count_key, health_key, node_key
from provisioner.versions import Entry, Health

CAS_TRIES = 20


class Models(StateBase):
    """State's verbs on models (a mixin)."""

    def model_entries(self) -> dict[str, Entry]:
        return {name: Entry.from_json(json.loads(raw))
                for name, raw in sorted(self.r.hgetall(MODELS).items())}

    def model_entry(self, name: str) -> Entry | None:
        raw = self.r.hget(MODELS, name)
        return Entry.from_json(json.loads(raw)) if raw else None

    def change_model(self, name: str, change: Callable[[Entry | None], Entry]) -> Entry:
        """Apply a pure change to a model's entry atomically (retried if another writer
        changed it in between); `change` may raise to refuse."""
        for _ in range(CAS_TRIES):
            old = self.r.hget(MODELS, name) or ""
            new = change(Entry.from_json(json.loads(old)) if old else None)
            if self._cas(keys=[MODELS], args=[name, old, json.dumps(new.to_json())]):
                return new
        raise RuntimeError(f"model {name} kept changing under {CAS_TRIES} tries; try again")

    def next_session_count(self, name: str) -> int:
        """1, 2, 3 ... per model: spreads new sessions over the canary evenly."""
        return int(self.r.incr(canary_count_key(name)))

    def version_health(self, model: str, version: str) -> Health:
        h = self.r.hgetall(health_key(model, version))
        return Health(*(int(h.get(k) or 0) for k in ("started", "failed", "loaded",
                                                      "load_failed")))

    def report_health(self, node_id: str, serving: str, started: int, failed: int,
                      loaded: bool, load_failed: bool) -> bool:
        """A node's cumulative stream counts for the version it serves, "model:version"
        (the increase since its last report is added), and a load that finished or failed;
        ignored unless that is the version the node was given. True if a failure was added."""
        model, _, version = serving.partition(":")
        return 1 == self._health(keys=[node_key(node_id), health_key(model, version)],
                     args=[started, failed, int(loaded), int(load_failed), serving])
