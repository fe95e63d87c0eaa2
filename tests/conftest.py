"""Shared fixtures: a real redis-server (ours, on a free port), real node processes, the
real webapp on a free port. Nothing here mocks Redis, sockets or processes."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import redis
import testenv  # noqa: F401  first: this process's own numba cache and database
from helpers import (  # noqa: F401  (re-exported)
    RUNNING,
    live_state,
    local_webapp,
    place,
    push_version,
    thread_stacks,
)
from simple_websocket import Client, ConnectionClosed
from werkzeug.serving import make_server

from billing.ledger import Ledger
from common.config import Config, load_config
from provisioner import catalog, membership
from provisioner.state import State, connect
from voicectl import procs
from webapp.app import create_app
from webapp.nodes_api import stamp_beat_path

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-" + uuid.uuid4().hex
HEARTBEAT_S = 1.0
USER_SECRET = "test-user-secret-" + uuid.uuid4().hex   # signs uid cookies and user tokens
logging.getLogger("werkzeug").setLevel(logging.WARNING)   # no line per heartbeat
log = logging.getLogger("tests")
LOAD_S = 0.3


_EXIT_STATUS = [0]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS[0] = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    """A failed test may leave a WebSocket client open, whose reader thread (not a daemon)
    would keep the finished run from ever exiting: give such threads a moment, then exit."""
    stuck = [t for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    for t in stuck:
        t.join(timeout=1.0)
    if any(t.is_alive() for t in stuck):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[0])


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    url, proc = procs.start_redis()
    yield url
    procs.stop([proc])


@pytest.fixture(scope="session")
def moto() -> Iterator[str]:
    """A local EC2 API (moto) for the whole run: our child on a free port."""
    from voicectl import devcloud

    endpoint, proc = devcloud.start_moto()
    yield endpoint
    procs.stop([proc])


@pytest.fixture(scope="session")
def image(moto: str) -> str:
    from voicectl import devcloud

    return devcloud.default_image(moto, "us-west-2")


@pytest.fixture
def redis_url(redis_server: str) -> str:
    redis.Redis.from_url(redis_server).flushall()
    return redis_server


def wait_for(what: Any, timeout_s: float = 10.0, msg: str = "") -> Any:
    """Poll `what` until it returns something true; its value, or AssertionError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s: {msg}")


def make_config(redis_url: str, **env: str) -> Config:
    base = {"REDIS_URL": redis_url, "MODEL_LOAD_SECONDS": str(LOAD_S), "TICKET_SECRET": SECRET,
            "USER_TOKEN_SECRET": USER_SECRET,
            "VOICE_DEV_USERS": "1"}   # tests name their users with ?user=
    # a short heartbeat (3 s to declare a node dead, not 6): tests that wait out a crash
    # wait half as long; the real default stays 2 s
    return load_config({**base, **env}).with_overrides(heartbeat_interval_s=HEARTBEAT_S)


def fleet_config(redis_url: str, tmp: Path, toml: str, **overrides: Any) -> Config:
    """A control-plane config from TOML text (other providers, regions), fast clocks."""
    path = tmp / "voice.toml"
    path.write_text(toml)
    return control_plane_config(redis_url, VOICE_CONFIG=str(path), **overrides)


DATABASES = ["sqlite"] + (["postgresql"] if os.environ.get("TEST_DATABASE_URL") else [])


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh billing database: SQLite, and PostgreSQL when TEST_DATABASE_URL is set."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'billing.sqlite'}"
    url = os.environ["TEST_DATABASE_URL"]
    from sqlalchemy import create_engine, text

    from billing.tables import metadata

    engine = create_engine(url)
    metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'billing.sqlite'}"


@pytest.fixture
def cfg(redis_url: str, sqlite_url: str) -> Config:
    return make_config(redis_url, DATABASE_URL=sqlite_url)


@pytest.fixture
def state(redis_url: str) -> State:
    return State(connect(redis_url))


@dataclass
class Fleet:
    """Starts real worker_node processes that join the control plane (`control_url`, the
    webapp) with a one-time token, as every node does, and waits for them in Redis."""

    cfg: Config
    state: State
    tmp: Path
    control_url: str
    procs: list[Any] = field(default_factory=list)

    def enroll(self, model: str = "miku", region: str = "us-west",
               node_id: str | None = None) -> tuple[str, str]:
        """Record a node as the control plane does when it boots one; its join token."""
        node_id = node_id or f"n-{uuid.uuid4().hex[:8]}"
        entry = self.state.model_entry(model)
        assert entry is not None, model
        m = entry.versions[entry.live]
        r = self.cfg.region(region)
        assert r is not None, region
        provider = self.cfg.provider(r.provider)
        now = time.time()
        self.state.add_node({"id": node_id, "home": region, "region": region,
                             "provider": provider.name, "model": m.model, "version": m.version,
                             "digest": m.digest, "state": "booting", "requested_at": now,
                             "deadline": now + 120, "capacity": m.streams_per_gpu,
                             "price_per_hour": provider.price_per_hour})
        return node_id, membership.join_token_for(self.state, self.cfg, node_id)

    def start(self, model: str = "miku", region: str = "us-west", node_id: str | None = None,
              load_s: float | None = None, wait: bool = True, crash_rate: float | None = None,
              ) -> str:
        node_id, token = self.enroll(model, region, node_id)
        self.join(token, node_id, load_s=load_s, crash_rate=crash_rate)
        if wait:
            self.wait_state(node_id, "ready")
        return node_id

    def join(self, token: str, log_name: str, *extra: str, load_s: float | None = None,
             crash_rate: float | None = None) -> Any:
        """`voicectl node --join` as a child process with nothing of our environment."""
        cmd = [sys.executable, "-m", "worker_node", "--join", self.control_url,
               "--token", token, *extra]
        if "--drain-s" not in extra:   # teardown leaves streams open: no 30 s drain to wait out
            cmd += ["--drain-s", "0.5"]
        cmd += ["--load-s", str(LOAD_S if load_s is None else load_s)]
        if crash_rate is not None:
            cmd += ["--crash-rate", str(crash_rate)]
        proc = procs.spawn(cmd, env={"PATH": os.environ["PATH"]},
                           log=self.tmp / f"{log_name}.log")
        self.procs.append(proc)
        return proc

    def wait_state(self, node_id: str, want: str, timeout_s: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            node = self.state.node(node_id)
            if node is not None and node.state.value == want:
                return node
            time.sleep(0.05)
        log = (self.tmp / f"{node_id}.log")
        raise AssertionError(f"node {node_id} not {want} in {timeout_s} s; log:\n"
                             + (log.read_text() if log.exists() else "(none)"))

    def url(self, node_id: str) -> str:
        node = self.state.node(node_id)
        assert node is not None
        return node.url


@pytest.fixture
def fleet(webapp: Webapp, tmp_path: Path) -> Iterator[Fleet]:
    """Nodes that join `webapp` (the control plane's node endpoints live there)."""
    f = Fleet(webapp.config, webapp.state, tmp_path, webapp.base_url)
    yield f
    procs.stop(f.procs)


@dataclass
class Webapp:
    base_url: str
    ws_url: str
    config: Config
    state: State


def serve(app: Any, port: int | None = None) -> tuple[str, Any]:
    port = port or procs.free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"127.0.0.1:{port}", server


@pytest.fixture
def webapp(cfg: Config, state: State) -> Iterator[Webapp]:
    """The webapp alone: nodes come from `fleet`, nothing scales."""
    host, server = serve(create_app(cfg, state, ledger=Ledger.open(cfg.database_url)))
    yield Webapp(f"http://{host}", f"ws://{host}", cfg, state)
    server.shutdown()


@dataclass
class ControlPlane(Webapp):
    celery: Any = None
    ledger: Any = None

    def settle(self, now: float) -> int:
        """Run the real settle task on the worker with an injected clock."""
        return int(self.celery.send_task("billing.settle", (now,)).get(timeout=30))

    def wait(self, what: Any, timeout_s: float = 30.0, msg: str = "") -> Any:
        return wait_for(what, timeout_s, msg)

    def live_nodes(self, model: str | None = None) -> list[Any]:
        return [n for n in self.state.nodes() if model in (None, n.model)]


def control_plane_config(redis_url: str, VOICE_CONFIG: str = "",  # noqa: N803
                         **overrides: Any) -> Config:
    """Fast clocks for tests: short load, boot, grace and ticket life."""
    cfg = make_config(redis_url, **({"VOICE_CONFIG": VOICE_CONFIG} if VOICE_CONFIG else {}))
    providers = tuple(replace(p, boot_s=0.2) for p in cfg.providers)
    base: dict[str, Any] = {"providers": providers, "idle_grace_s": 1.0, "ticket_ttl_s": 3.0,
                            "arrival_tau_s": 1.0}   # the warm buffer forgets arrivals fast
    return cfg.with_overrides(**{**base, **overrides})


@contextmanager
def running_control_plane(cfg: Config, tick_s: float = 0.5) -> Iterator[ControlPlane]:
    """A real Celery worker (threads pool) on our Redis, a beat thread sending `tick`, the
    webapp kicking the scaler by Celery task, and local-driver nodes cleaned up after."""
    import celery.contrib.testing.tasks  # noqa: F401  registers celery.ping
    from celery import bootsteps
    from celery.contrib.testing.worker import start_worker

    from provisioner import clouds
    from provisioner.tasks import BILLING_QUEUE, make_celery

    port = procs.free_port()
    cfg = cfg.with_overrides(public_url=f"http://127.0.0.1:{port}")   # where nodes join
    app = make_celery(cfg)
    state = State(connect(cfg.redis_url or ""))
    catalog.seed(state, cfg)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(tick_s):
            try:
                app.send_task("provisioner.tick")
                app.send_task("billing.tick")
            except Exception as e:  # noqa: BLE001  the broker fails over: as celery beat, go on
                log.warning("tick not sent (%s)", e)

    def worker(started: threading.Event) -> None:
        """One worker takes both queues (two in one process stop consuming after a broker
        failover). One that stops starts again, as compose and `voicectl run` restart it:
        kombu can crash one, closing a channel whose ack failed, in a broker failover."""
        while not stop.is_set():
            try:
                with start_worker(app, pool="threads", concurrency=4, perform_ping_check=True,
                                  loglevel="WARNING", queues=["celery", BILLING_QUEUE]) as w:
                    started.set()
                    while not stop.wait(0.1) and w.blueprint.state == bootsteps.RUN:
                        pass
                if not stop.is_set():
                    log.warning("the Celery worker stopped; starting it again")
            except Exception as e:  # noqa: BLE001  the broker is failing over: try again
                log.warning("the Celery worker did not start (%s); trying again", e)
                stop.wait(0.5)

    ledger = Ledger.open(cfg.database_url)
    host, server = serve(create_app(cfg, state, lambda: app.send_task("provisioner.scale"),
                                    ledger), port)
    RUNNING.append(state)
    started = threading.Event()
    workers = threading.Thread(target=worker, args=(started,), name="celery-worker", daemon=True)
    workers.start()
    assert started.wait(60), "the Celery worker never started (its log says why)"
    threading.Thread(target=beat, daemon=True).start()
    stamp_beat_path(cfg, state, stop)   # as a serving webapp does: the reaper may reap
    try:
        yield ControlPlane(f"http://{host}", f"ws://{host}", cfg, state, app, ledger)
    finally:
        stop.set()
        server.shutdown()
        workers.join(30)
        RUNNING.remove(state)
    # every VM at once: each one's shutdown grace runs beside the others'
    doomed = [(region, vm) for region in clouds.machine_regions(cfg)
              if cfg.provider(region.provider).driver == "local"
              for vm in clouds.list_ours(cfg, region)]
    with ThreadPoolExecutor(max_workers=max(1, len(doomed))) as pool:
        list(pool.map(lambda rv: clouds.destroy(cfg, *rv), doomed))
    ledger.engine.dispose()


@pytest.fixture
def control_plane(redis_url: str, sqlite_url: str) -> Iterator[ControlPlane]:
    with running_control_plane(control_plane_config(redis_url, database_url=sqlite_url)) as cp:
        yield cp


@dataclass
class Stack(Webapp):
    nodes: dict[str, str] = field(default_factory=dict)   # model name -> node id


@pytest.fixture
def stack(webapp: Webapp, fleet: Fleet) -> Stack:
    """The whole local system: webapp + one ready node per configured model."""
    ids = {m.name: fleet.start(m.name, wait=False) for m in webapp.config.models}
    for node_id in ids.values():
        fleet.wait_state(node_id, "ready")
    return Stack(webapp.base_url, webapp.ws_url, webapp.config, webapp.state, ids)


# --- WebSocket helpers ---------------------------------------------------------------

def closed_code(ws: Client, timeout_s: float = 5.0) -> tuple[int, str]:
    """Read until the server closes; return (close code, reason). Text before it is kept."""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ws.receive(timeout=0.2)
    except ConnectionClosed as e:
        return int(e.reason), str(e.message)
    raise AssertionError("server did not close the socket")


def lobby(ws_url: str, query: str, timeout_s: float = 30.0,
          headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Open the lobby, collect messages until ready or error; returns them all."""
    ws = Client.connect(f"{ws_url}/ws/session?{query}", headers=headers)
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            raw = ws.receive(timeout=0.5)
            if raw is None:
                continue
            out.append(json.loads(raw))
            if out[-1]["type"] in ("ready", "error"):
                return out
        stacks = live_state() + thread_stacks()   # while the lobby still waits
    except ConnectionClosed:
        return out
    finally:
        try:
            ws.close()
        except (ConnectionClosed, OSError):
            pass   # the server closed first
    raise AssertionError(f"lobby gave no ready/error in {timeout_s} s: {out}\n{stacks}")


@pytest.fixture
def cp_slow_grace(redis_url: str, sqlite_url: str) -> Iterator[ControlPlane]:
    """A control plane that keeps idle nodes for a minute (for packing tests)."""
    with running_control_plane(control_plane_config(redis_url, idle_grace_s=60.0,
                                                    ticket_ttl_s=30.0,
                                                    database_url=sqlite_url)) as cp:
        yield cp


@pytest.fixture
def cp_billing_keep(redis_url: str, db_url: str) -> Iterator[ControlPlane]:
    """Like cp_billing, but idle nodes stay a minute (a test reuses a node it left)."""
    with running_control_plane(control_plane_config(redis_url, database_url=db_url,
                                                    idle_grace_s=60.0)) as cp:
        yield cp


@pytest.fixture
def cp_billing(redis_url: str, db_url: str) -> Iterator[ControlPlane]:
    """A control plane billing into SQLite, and PostgreSQL when TEST_DATABASE_URL is set."""
    with running_control_plane(control_plane_config(redis_url, database_url=db_url)) as cp:
        yield cp


def start_stream(ready: dict[str, Any], rate: int = 16000) -> Any:
    """Connect to the node a lobby `ready` names and start a stream; `.started` holds the
    node's answer."""
    ws = Client.connect(f"{ready['node_url']}?ticket={ready['ticket']}")
    ws.send(json.dumps({"type": "start", "sample_rate": rate}))
    started = json.loads(ws.receive(timeout=5))
    assert started["type"] == "started", started
    ws.started = started
    return ws
