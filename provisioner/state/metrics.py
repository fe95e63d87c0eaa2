"""Counters and the wait histogram that /metrics shows, kept in Redis: every webapp and
worker process adds to the same ones, and any of them answers a scrape."""

from __future__ import annotations

from provisioner.state.base import StateBase
from provisioner.state.keys import METRIC_COUNTS, METRIC_WAIT

# Seconds from opening the lobby to `ready` (a warm slot is milliseconds; a cold node is a
# boot plus a model load).
WAIT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0)


class Metrics(StateBase):
    """State's verbs on metrics (a mixin)."""

    def count(self, name: str, n: int = 1, **labels: str) -> None:
        """Add `n` to counter `name` with these labels (field "name|k=v,k=v")."""
        field = name + "|" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        self.r.hincrby(METRIC_COUNTS, field, n)

    def counts(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], int]:
        out = {}
        for field, value in self.r.hgetall(METRIC_COUNTS).items():
            name, _, raw = field.partition("|")
            labels = tuple(tuple(kv.split("=", 1)) for kv in raw.split(",") if "=" in kv)
            out[(name, labels)] = int(value)   # type: ignore[index]
        return out

    def observe_wait(self, seconds: float) -> None:
        """One user's wait for a node, into the histogram (cumulative buckets)."""
        pipe = self.r.pipeline(transaction=False)
        for bound in WAIT_BUCKETS_S:
            if seconds <= bound:
                pipe.hincrby(METRIC_WAIT, repr(bound), 1)
        pipe.hincrby(METRIC_WAIT, "+Inf", 1)
        pipe.hincrbyfloat(METRIC_WAIT, "sum", seconds)
        pipe.execute()

    def waits(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.r.hgetall(METRIC_WAIT).items()}
