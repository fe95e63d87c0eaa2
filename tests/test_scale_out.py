"""Scale-out as deployed: two webapp processes under gunicorn (gevent) and two Celery
workers plus one beat, all separate processes sharing one Redis, the way docker-compose.yml
runs them. Users arriving at both webapps at once are all placed, never more than a node's
capacity on a node, and no node is booted twice."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LOAD_S, SECRET, USER_SECRET, lobby, start_stream, wait_for

from billing.ledger import Ledger
from common.config import Config, load_config
from common.identity import mint_token
from provisioner import clouds
from provisioner.state import State, connect
from provisioner.tasks import make_celery
from voicectl import procs

BIN = Path(sys.executable).parent
CONFIG = """
[settings]
idle_grace_s = 60
ticket_ttl_s = 30
lobby_limit_exempt = ["127.0.0.1"]   # twelve users at once from this machine

[providers.local]
price_per_hour = "1.10"
billing_increment_s = 60
boot_s = 0.2

[[regions]]
name = "us-west"
provider = "local"
lat = 37.8
lon = -122.4

[[models]]
package = "models/miku"
"""
USERS_PER_WEBAPP = 6


def up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.fixture
def deployment(redis_url: str, tmp_path: Path) -> Iterator[tuple[Config, list[str]]]:
    """Two gunicorn webapps, two Celery workers and a beat on one Redis; nodes join the
    first webapp (VOICE_PUBLIC_URL), as a deployment's join behind one public URL."""
    (tmp_path / "voice.toml").write_text(CONFIG)
    ports = [procs.free_port(), procs.free_port()]
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "REDIS_URL": redis_url,
           "DATABASE_URL": f"sqlite:///{tmp_path / 'billing.sqlite'}", "TICKET_SECRET": SECRET,
           "USER_TOKEN_SECRET": USER_SECRET,
           "VOICE_PUBLIC_URL": f"http://127.0.0.1:{ports[0]}",
           "VOICE_CONFIG": str(tmp_path / "voice.toml"), "MODEL_LOAD_SECONDS": str(LOAD_S)}
    cfg = load_config(env)
    Ledger.open(cfg.database_url).engine.dispose()     # `voicectl migrate`
    celery = [str(BIN / "celery"), "-A", "provisioner.worker"]
    children = [procs.spawn([str(BIN / "gunicorn"), "-k", "gevent", "--bind",
                             f"127.0.0.1:{port}", "webapp.wsgi:deployed()"],
                            env=env, log=tmp_path / f"web-{port}.log") for port in ports]
    children += [procs.spawn(celery + ["worker", "--pool", "threads", "--concurrency", "4",
                                       "-n", f"w{i}@%h", "--loglevel", "WARNING"],
                             env=env, log=tmp_path / f"worker-{i}.log") for i in (1, 2)]
    children.append(procs.spawn(celery + ["beat", "--schedule", str(tmp_path / "beat-schedule"),
                                          "--loglevel", "WARNING"],
                                env=env, log=tmp_path / "beat.log"))
    urls = [f"127.0.0.1:{port}" for port in ports]
    control = make_celery(cfg).control
    try:
        for url in urls:
            wait_for(lambda url=url: up(f"http://{url}"), 60, f"webapp {url} not up")
        wait_for(lambda: len(control.ping(timeout=0.5)) == 2, 60, "Celery workers not up")
        yield cfg, urls
    finally:
        procs.stop(children)
        for region in clouds.machine_regions(cfg):
            for vm in clouds.list_ours(cfg, region):
                clouds.destroy(cfg, region, vm)


def test_two_gunicorn_webapps_and_two_workers_share_one_redis(
        deployment: tuple[Config, list[str]]) -> None:
    cfg, urls = deployment
    state = State(connect(cfg.redis_url or ""))
    ready: dict[str, dict[str, Any]] = {}
    streams: list[Any] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(urls) * USERS_PER_WEBAPP)

    def user(url: str, name: str) -> None:
        try:
            barrier.wait()
            token = mint_token(name, USER_SECRET, now=time.time(), ttl_s=600)   # no dev users
            got = lobby(f"ws://{url}", f"token={token}&model=miku&region=us-west", 60)[-1]
            assert got["type"] == "ready", got
            ready[name] = got
            streams.append(start_stream(got))        # held open: every slot stays taken
        except BaseException as e:  # noqa: BLE001  reported below
            errors.append(e)

    threads = [threading.Thread(target=user, args=(url, f"u{w}-{i}"))
               for w, url in enumerate(urls) for i in range(USERS_PER_WEBAPP)]
    for t in threads:
        t.start()
    # Scale steps asked for on both workers at once (kicks of lobbies in two processes and
    # the beat's tick can coincide): each must see the nodes the others booked.
    app = make_celery(cfg)
    wait_for(lambda: sum(state.queue_lengths().values()) > 0, 30, "nobody queued")
    for _ in range(16):
        app.send_task("provisioner.scale")
    for t in threads:
        t.join(90)
    assert errors == [], errors
    by_webapp = Counter(name.split("-")[0] for name in ready)
    assert by_webapp == {"u0": USERS_PER_WEBAPP, "u1": USERS_PER_WEBAPP}   # both lobbies
    per_node = Counter(r["node_id"] for r in ready.values())
    assert max(per_node.values()) <= cfg.streams_per_gpu("miku"), per_node          # no over-commit
    assert all(state.node(n).sessions <= cfg.streams_per_gpu("miku") for n in per_node)  # type: ignore
    vms = [vm["name"] for vm in state.vms()]
    assert sorted(vms) == sorted(set(vms)), vms                           # one VM per node
    assert {n.id for n in state.nodes()} == set(vms)
    # Twelve users need three nodes; the warm buffer adds one (measured: always 4). Scale
    # steps overlapping on one snapshot book the same users' nodes again (measured with
    # the single-flight lock removed: 11 and 13 VMs).
    assert len(vms) <= math.ceil(len(ready) / cfg.streams_per_gpu("miku")) + 2, vms
    for ws in streams:
        ws.send(json.dumps({"type": "stop"}))
