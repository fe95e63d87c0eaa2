"""/metrics (Prometheus text format) from the running stack (issue 20): the fleet, queues,
streams, cost, settlement lag and counters every process adds to, as Prometheus reads it."""

from __future__ import annotations

import os
import sys
import time
import urllib.request

from conftest import ControlPlane, closed_code, lobby, start_stream, wait_for
from prometheus_client.parser import text_string_to_metric_families

from voicectl import procs


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)], as Prometheus parses the answer."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def value(m: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for got, v in m.get(name, []) if labels.items() <= got.items())


def test_metrics_from_the_running_stack(control_plane: ControlPlane) -> None:
    cp = control_plane
    ready = lobby(cp.ws_url, "user=m1&model=miku&region=us-west", timeout_s=60)[-1]
    assert ready["type"] == "ready"
    ws = start_stream(ready)
    bad = lobby(cp.ws_url, "user=m2&model=nope&region=us-west")[-1]
    assert bad["code"] == "unknown_model"
    m = wait_for(lambda: (got := scrape(f"{cp.base_url}/metrics"))
                 and value(got, "voice_streams") == 1
                 and value(got, "voice_lobby_errors_total") == 1 and got, 15,
                 "no live stream shown")
    assert value(m, "voice_nodes", state="ready", region="us-west", model="miku") >= 1
    assert value(m, "voice_admissions_total") >= 1
    assert value(m, "voice_lobby_errors_total", code="unknown_model") == 1
    assert value(m, "voice_wait_seconds_count") >= 1 and value(m, "voice_wait_seconds_sum") > 0
    assert value(m, "voice_cost_per_hour_dollars") > 0 and "voice_settlement_lag_seconds" in m
    ws.send('{"type": "stop"}')
    assert closed_code(ws)[0] == 1000


def test_the_worker_serves_metrics_too(control_plane: ControlPlane, tmp_path) -> None:  # noqa: ANN001
    cfg, port = control_plane.config, procs.free_port()
    env = {"PATH": os.environ["PATH"], "REDIS_URL": cfg.redis_url or "",
           "DATABASE_URL": cfg.database_url, "TICKET_SECRET": cfg.ticket_secret,
           "USER_TOKEN_SECRET": cfg.user_token_secret, "VOICE_PUBLIC_URL": cfg.public_url,
           "VOICE_METRICS_PORT": str(port)}
    worker = procs.spawn([sys.executable, "-m", "celery", "-A", "provisioner.worker", "worker",
                          "--pool", "threads", "--concurrency", "1", "-Q", "nothing",
                          "--loglevel", "WARNING"], env=env, log=tmp_path / "worker.log")
    try:
        t0 = time.monotonic()
        while True:
            try:
                m = scrape(f"http://127.0.0.1:{port}/metrics")
                break
            except OSError:
                assert time.monotonic() - t0 < 60, (tmp_path / "worker.log").read_text()
                time.sleep(0.3)
        assert "voice_streams" in m and "voice_wait_seconds_bucket" in m   # the same state
    finally:
        procs.stop([worker])


def test_the_dashboard_reads_only_metrics_we_serve() -> None:
    """docs/grafana-dashboard.json (provisioned by compose) asks for series /metrics has."""
    import json
    import re
    from pathlib import Path

    from provisioner.metrics import HELP

    root = Path(__file__).resolve().parent.parent
    dash = json.loads((root / "docs" / "grafana-dashboard.json").read_text())
    asked = {m for p in dash["panels"] for t in p["targets"]
             for m in re.findall(r"voice_[a-z_]+", t["expr"])}
    served = set((root / "provisioner" / "metrics.py").read_text().split('"')) | set(HELP)
    for name in asked:
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert base in served, f"the dashboard asks for {name}, which /metrics does not serve"
