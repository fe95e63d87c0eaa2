"""Own machines: a join token from `voicectl byo-token`, a node that joins from anywhere
with --public-url, takes sessions (first, since it costs nothing), is never destroyed by
the autoscaler, and drains and leaves on SIGTERM with its bill closed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import (
    ControlPlane,
    Fleet,
    closed_code,
    fleet_config,
    lobby,
    running_control_plane,
    start_stream,
)

from voicectl import procs

CONFIG = """
[settings]
latency_budget_ms = 60

[providers.cloud]
price_per_hour = "1.10"
billing_increment_s = 60
boot_s = 0.2

[providers.own]
driver = "byo"
price_per_hour = "0"
boot_s = 0

[[regions]]
name = "us-west"
provider = "cloud"
lat = 37.8
lon = -122.4

[[regions]]
name = "home-lab"
provider = "own"
lat = 37.7
lon = -122.3

[[models]]
package = "models/miku"
"""


@pytest.fixture
def cp(redis_url: str, sqlite_url: str, tmp_path: Path) -> Iterator[ControlPlane]:
    cfg = fleet_config(redis_url, tmp_path, CONFIG, database_url=sqlite_url, idle_grace_s=1.0)
    with running_control_plane(cfg) as cp:
        yield cp


def voicectl(cp: ControlPlane, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": cp.config.redis_url or "",
           "VOICE_CONFIG": str(tmp / "voice.toml"), "VOICE_PUBLIC_URL": cp.base_url}
    return subprocess.run([sys.executable, "-m", "voicectl", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_own_machine_joins_serves_first_stays_and_leaves(cp: ControlPlane,
                                                         tmp_path: Path) -> None:
    fleet = Fleet(cp.config, cp.state, tmp_path, cp.base_url)
    try:
        paid = fleet.start("miku", region="us-west", node_id="n-paid")
        first = lobby(cp.ws_url, "user=u1&model=miku&lat=37.8&lon=-122.4")[-1]
        assert first["node_id"] == paid            # the only node: it holds one stream now
        ws1 = start_stream(first)

        out = voicectl(cp, tmp_path, "byo-token", "--region", "home-lab")
        assert out.returncode == 0, out.stderr
        token = out.stdout.splitlines()[0]
        assert f"voicectl node --join {cp.base_url} --token {token}" in out.stdout
        refused = voicectl(cp, tmp_path, "byo-token", "--region", "us-west")
        assert refused.returncode == 2 and "byo" in refused.stderr   # not an own-machine region

        port = procs.free_port()
        proc = fleet.join(token, "byo", "--public-url", f"ws://127.0.0.1:{port}",
                          "--drain-s", "1")
        byo = cp.wait(lambda: next((n for n in requests.get(
            f"{cp.base_url}/api/cluster", timeout=5).json()["nodes"]
            if n["provider"] == "own" and n["state"] == "ready"), None), 30, "byo not ready")
        assert byo["url"] == f"ws://127.0.0.1:{port}/ws" and byo["price_per_hour"] == 0
        assert byo["region"] == "home-lab"
        listed = voicectl(cp, tmp_path, "nodes", "--url", cp.base_url, "--json")
        assert byo["id"] in {n["id"] for n in json.loads(listed.stdout)["nodes"]}
        reused = fleet.join(token, "byo-again")
        assert reused.wait(timeout=30) == 3          # the token worked once

        # Free and near: preferred over the paid node that already holds a stream.
        second = lobby(cp.ws_url, "user=u2&model=miku&lat=37.8&lon=-122.4")[-1]
        assert second["node_id"] == byo["id"], second
        ws2 = start_stream(second)
        ws1.send(json.dumps({"type": "stop"}))
        assert closed_code(ws1)[0] == 1000

        # The paid node empties and stops after the idle grace; the own machine never does.
        cp.wait(lambda: cp.state.node(paid) is None, 20, "idle paid node not stopped")
        time.sleep(cp.config.idle_grace_s + 2 * cp.config.heartbeat_interval_s)
        assert cp.state.node(byo["id"]) is not None and proc.poll() is None

        # SIGTERM: no new streams, the live one is told to resume elsewhere, then it leaves.
        proc.send_signal(signal.SIGTERM)
        code, reason = closed_code(ws2, timeout_s=15)
        assert code == 4503 and "resume" in reason
        assert proc.wait(timeout=20) == 0
        assert cp.state.node(byo["id"]) is None
        bill = cp.wait(lambda: (b := {r["node_id"]: r for r in cp.ledger.node_costs()}[
            byo["id"]])["stopped_at"] is not None and b, 10, "its bill never closed")
        assert bill["provider"] == "own"   # closed by the billing worker at the leave
        assert bill["cost"] == 0
    finally:
        procs.stop(fleet.procs)
