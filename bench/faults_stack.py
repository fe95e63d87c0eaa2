"""bench/faults.py's stack: a `voicectl run` with a faulty model package, a database
proxy that can hang, the bench's own regions, and the small helpers its scenarios share."""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np

from common.config import load_config
from provisioner.state import State, connect
from voicectl import procs

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(os.path.dirname(BENCH), "tests"))
from chaos_stack import VOICECTL, Stack  # noqa: E402
from connect import log  # noqa: E402
from faults_clients import Loop, User  # noqa: E402
from helpers import push_version  # noqa: E402  (tests/helpers.py)

STALL_S, SLOW_S = 25.0, 30.0
USERS_PER_FAULT = 4
EXTRA_CONFIG = """
[[regions]]
name = "nowhere"           # the bench's: quota 0, a user waits there
provider = "local"
lat = -45.0
lon = 170.0
max_nodes = 0

[[regions]]
name = "cold-a"   # cold users, one each: >3000 km (60 ms) from other regions (Nairobi)
provider = "local"
lat = -1.3
lon = 36.8

[[regions]]
name = "cold-b"   # Honolulu
provider = "local"
lat = 21.3
lon = -157.9

[[regions]]
name = "cold-c"   # Singapore
provider = "local"
lat = 1.35
lon = 103.8

[[regions]]
name = "cold-d"   # Cape Town
provider = "local"
lat = -33.9
lon = 18.4

[[regions]]
name = "cold-e"   # Anchorage
provider = "local"
lat = 61.2
lon = -149.9

[providers.own]
driver = "byo"
price_per_hour = "0"

[[regions]]
name = "skew-ahead"
provider = "own"
lat = -33.9
lon = 151.2

[[regions]]
name = "skew-behind"
provider = "own"
lat = -23.5
lon = -46.6
"""
FAULTY = '''"""Pass-through audio whose model call a file turns slow or stalled (bench/faults.py):
the file TRIGGER-PID (this node's pid) says `stall SECONDS` or `slow SECONDS`."""
import os
import random
import time

_at = {"checked": 0.0, "slow_until": 0.0, "slept": 0.0}


class Faulty:
    latency_samples = 0

    def __init__(self, trigger):
        self.flag = f"{trigger}-{os.getpid()}"

    def process(self, frames):
        now = time.monotonic()
        if now - _at["checked"] > 0.1:
            _at["checked"] = now
            try:
                with open(self.flag) as f:
                    what = f.read().split()
                os.unlink(self.flag)
            except OSError:
                what = []
            if what[:1] == ["stall"]:
                time.sleep(float(what[1]))          # a hung GPU call: heartbeats go on
            elif what[:1] == ["slow"]:
                _at["slow_until"] = now + float(what[1])
        if now < _at["slow_until"] and now - _at["slept"] > 0.02:
            time.sleep(random.uniform(0.05, 0.10))  # this turn's answers go out late
            _at["slept"] = time.monotonic()
        return frames


def make(sample_rate, params, files):
    return Faulty(params["trigger"])
'''


# --- the stack, the database ------------------------------------------------------------

class FaultStack(Stack):
    """bench/chaos_stack.Stack with our environment: VOICE_CONFIG, DATABASE_URL, and
    REDIS_URL when Redis is not the embedded one (a Sentinel deployment)."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:   # noqa: D107
        self.tmp, self.port = tmp, procs.free_port()
        self.db_url = env["DATABASE_URL"]
        self.env = {**os.environ, "VOICE_DEV_USERS": "1", "CRASH_RATE": "0", **env}
        external = env.get("REDIS_URL")
        if not external:
            self.env.pop("REDIS_URL", None)
        self.logfile = tmp / "voicectl-run.log"
        self.lines: list[str] = []
        self.seen: dict[int, tuple[float, str]] = {}
        self.proc = procs.spawn(VOICECTL + ["run", "--port", str(self.port), "--flower-port",
                                            str(procs.free_port()), "--data", str(tmp / "redis")],
                                env=self.env, log=self.logfile)
        self._done = threading.Event()
        threading.Thread(target=self._follow, daemon=True).start()
        if external:
            self._wait_line("using Redis at")
            self.redis_url = external
        else:
            shown = self._wait_line("Redis ready at").rsplit(" ", 1)[1].strip()
            self.redis_url = shown.replace("***", (tmp / "redis" / "password").read_text()
                                           .strip())
        self._wait_line("open http://")
        self.env["REDIS_URL"] = self.redis_url
        self.state = State(connect(self.redis_url))
        self.cfg = load_config(self.env)
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self._recording = threading.Event()
        threading.Thread(target=self._record, daemon=True).start()

    def _record(self) -> None:
        """Every process of the run, the node VMs included, for the orphan count."""
        while not self._recording.wait(1.0):
            with suppress(Exception):   # Redis away (a failover): next time
                self.record(tuple(int(vm["pid"]) for vm in self.state.vms()))

    def node_pid(self, node_id: str) -> int:
        return next(int(vm["pid"]) for vm in self.state.vms() if vm["name"] == node_id)

    def stop(self) -> list[str]:
        self._recording.set()
        if self.redis_url.startswith("sentinel://"):   # its ports are the deployment's
            self.redis_url = "redis://127.0.0.1:1/0"
        return super().stop()


class HangingProxy:
    """A TCP proxy to the database that can hang: while hung it accepts connections and
    forwards nothing either way, as a database that stopped answering; then it goes on."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.socks.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self.flowing.wait()
        try:
            up = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        self.socks.append(up)
        threading.Thread(target=self._pump, args=(up, client), daemon=True).start()
        self._pump(client, up)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self.closed:
                self.flowing.wait()
                if not select.select([src], [], [], 0.2)[0]:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                self.flowing.wait()
                dst.sendall(data)
        except (OSError, ValueError):   # ValueError: the other direction closed it
            pass
        for s in (src, dst):
            with suppress(OSError):
                s.close()

    def close(self) -> None:
        self.closed = True
        self.flowing.set()
        for s in [self.listener, *self.socks]:
            with suppress(OSError):
                s.close()


def pg_database(admin_url: str, name: str, drop: bool = False) -> None:
    import psycopg
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        if drop:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            conn.execute(f'CREATE DATABASE "{name}"')


def fleet_config(tmp: Path, boot_s: float) -> Path:
    text = (procs.ROOT / "common" / "default.toml").read_text()
    text = text.replace("boot_s = 1.0 ", f"boot_s = {boot_s} ", 1)
    assert f"boot_s = {boot_s} " in text, "common/default.toml's local boot_s moved"
    path = tmp / "voice.toml"
    path.write_text(text + EXTRA_CONFIG)
    return path


def push_faulty(stack: FaultStack, model: str, trigger: Path) -> str:
    pkg = stack.tmp / f"faulty-{model}"
    pkg.mkdir()
    (pkg / "model.toml").write_text(f'name = "{model}"\nentry = "faulty:make"\n\n'
                                    f'[params]\ntrigger = "{trigger}"\n')
    (pkg / "faulty.py").write_text(FAULTY)
    return push_version(stack.state, stack.cfg, model, package=pkg).version


# --- helpers ------------------------------------------------------------------------------

def wait(what: Any, timeout_s: float, step_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(step_s)
    return None


def streaming(users: list[User], timeout_s: float = 60.0) -> bool:
    return bool(wait(lambda: all(u.streaming_on() for u in users), timeout_s, 0.1))


def busiest(users: list[User]) -> str | None:
    on = [u.streaming_on() for u in users]
    nodes = [n for n in on if n]
    return max(set(nodes), key=nodes.count) if nodes else None


def since_lobby(u: User) -> float | None:
    return (round(u.first_ready - u.first_lobby, 3)
            if u.first_ready is not None and u.first_lobby is not None else None)


def cold_pool(stack: FaultStack) -> tuple[str, str]:
    """kaito in a region of the bench's own where no node is at all (none booting, none
    idle that could be retargeted): a user there needs a boot."""
    nodes = stack.state.nodes()
    for region in ("cold-a", "cold-b", "cold-c", "cold-d", "cold-e"):
        if not any(region in (n.region, n.home) for n in nodes):
            return "kaito", region
    raise RuntimeError("no cold region left")


def booted_for(stack: FaultStack, u: User) -> bool | None:
    """Was the node `u` was placed on requested after `u` opened the lobby (a boot)?"""
    rec = stack.state.node(u.placed[0][1]) if u.placed else None
    return None if rec is None or u.first_lobby_wall is None else (
        rec.requested_at >= u.first_lobby_wall - 0.5)


def cold_user(loop: Loop, stack: FaultStack, user: str, timeout_s: float = 60.0) -> User:
    """A user who needs a boot: opened to ready (and 2 s of streaming, to be billed)."""
    model, region = cold_pool(stack)
    log(f"a cold user ({model} in {region}) ...")
    u = loop.start(User(stack.ws_url, user, f"model={model}&region={region}"))
    wait(lambda: u.first_answer, timeout_s, 0.02)
    u.booted = booted_for(stack, u)
    time.sleep(2.0)
    u.stop()
    return u


def ask(stack: FaultStack, path: str, timeout_s: float, into: dict[str, Any], key: str
        ) -> threading.Thread:
    """GET `path` in a thread: `into[key]` = its status and body, and how long it took."""
    import urllib.error
    import urllib.request

    def go() -> None:
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{stack.port}{path}",
                                        timeout=timeout_s) as r:
                body = f"{r.status} {r.read().decode()}"
        except urllib.error.HTTPError as e:
            body = f"{e.code} {e.read().decode()}"
        except OSError as e:
            body = f"no answer ({type(e).__name__})"
        into[key] = f"{' '.join(body.split())[:150]} ({time.monotonic() - t0:.1f} s)"
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 1) if xs else None


# --- the faults -------------------------------------------------------------------------
