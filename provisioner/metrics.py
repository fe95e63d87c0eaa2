"""What /metrics shows (Prometheus text format): the fleet, queues, streams, cost and the
settlement lag read from the live state at each scrape, and the counters and the wait
histogram every process adds to in Redis (state/metrics.py). The webapp serves it at
/metrics; a Celery worker started with VOICE_METRICS_PORT serves it there too."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from provisioner.state import State
from provisioner.state.metrics import WAIT_BUCKETS_S

HELP = {"voice_admissions": "Lobby requests admitted, by outcome (placed at once, queued)",
        "voice_resumes": "Sessions resumed, by kind (lost: a dropped stream; planned: a move)",
        "voice_lobby_errors": "Lobby requests refused, by code",
        "voice_nodes_ended": "Nodes that left the fleet, by reason (dead: a crash detected)",
        "voice_model_rollbacks": "Model versions rolled back by themselves"}


class FleetCollector:
    """Reads the live state when scraped: what every process sees alike."""

    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        nodes = self.state.nodes()
        by = Counter((n.state.value, n.region, n.model, n.provider) for n in nodes)
        g = GaugeMetricFamily("voice_nodes", "Nodes by state, region, model and provider",
                              labels=["state", "region", "model", "provider"])
        for labels, n in sorted(by.items()):
            g.add_metric(list(labels), n)
        yield g
        yield GaugeMetricFamily("voice_streams", "Streams live on nodes",
                                value=sum(n.live for n in nodes))
        yield GaugeMetricFamily("voice_slots", "Stream slots of serving nodes",
                                value=sum(n.capacity for n in nodes if n.state.serving))
        yield GaugeMetricFamily("voice_cost_per_hour_dollars", "The fleet's GPU bill per hour",
                                value=float(sum((Decimal(n.price_per_hour) for n in nodes),
                                                Decimal(0))))
        dropped = GaugeMetricFamily("voice_node_reports_dropped",
                                    "Reports a node made of sessions not placed on it",
                                    labels=["node", "suspect"])
        for n in nodes:
            if n.dropped:
                dropped.add_metric([n.id, "yes" if n.suspect else "no"], n.dropped)
        yield dropped
        waiting = GaugeMetricFamily("voice_waiting_users", "Users waiting for a node",
                                    labels=["model", "version", "region"])
        for pool, (count, _) in sorted(self.state.waiting().items()):
            waiting.add_metric(pool.split("|"), count)
        yield waiting
        oldest = self.state.dirty_minutes(now - 60, 1)
        yield GaugeMetricFamily("voice_settlement_lag_seconds",
                                "Age of the oldest usage not billed yet (0: all billed)",
                                value=max(0.0, now - oldest[0] - 60) if oldest else 0.0)
        yield from self._counters()
        waits = self.state.waits()
        yield HistogramMetricFamily(
            "voice_wait_seconds", "Seconds from opening the lobby to a node",
            buckets=[(repr(b), waits.get(repr(b), 0.0)) for b in WAIT_BUCKETS_S]
            + [("+Inf", waits.get("+Inf", 0.0))], sum_value=waits.get("sum", 0.0))

    def _counters(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily] = {}
        for (name, labels), value in sorted(self.state.counts().items()):
            if name not in families:
                families[name] = CounterMetricFamily(name, HELP.get(name, name),
                                                     labels=[k for k, _ in labels])
            families[name].add_metric([v for _, v in labels], value)
        yield from families.values()


def registry(state: State) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(FleetCollector(state))   # type: ignore[arg-type]
    return reg


def serve(state: State, port: int) -> None:
    """/metrics on `port` in this process (a Celery worker)."""
    start_http_server(port, registry=registry(state))
