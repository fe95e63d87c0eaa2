"""Connect benchmark: warm connect latency with 100 concurrent users, cold connect time and
its overhead above the model load, time from a breached buffer to the scale-up decision and
to the provision task starting, and admissions per second.

    python bench/connect.py [--load-s 10] [--rounds 5] [--users 100] [--rate 100] [--json]

Warm figures (lobby opened to `ready` received, one asyncio client process standing for
the users' browsers):
- `warm_connect_ms_*`: 100 concurrent users. They arrive as a Poisson process at 100 per
  second (far above the ~0.2/s that 100 concurrent users with 10-minute sessions make) and
  keep their sessions, so the last ones are placed while the others hold their slots.
- `warm_burst_ms_*` and `admissions_per_s`: all 100 open the lobby in the same instant.
- `warm_connect_floor_ms_*`, `warm_burst_floor_ms_*`: the same arrivals against an empty
  flask-sock handler on the same server (bench/floor_server.py), i.e. what they cost before
  any lobby code runs; `*_over_floor` is ours over the floor, p99 to p99 (absolute times on
  shared 2-core machines vary two- to fourfold between runs; the ratio far less).
- `waiting_*`: CPU of the webapp process and Redis commands per second (every client's,
  the Celery worker's included) while `--waiting` (200) lobbies wait in a region whose
  provider cannot boot, beside the same stack idle (`idle_*`) just before, and the
  difference (`*_over_idle`). Measured before the warm phase, beside the cold phase's one
  node: the warm users' many sessions would weigh on both figures.

Everything runs on the real stack, `voicectl run` in its own processes (webapp, Celery
worker with beat, Flower) on a Redis of ours; the cold path boots a worker_node process
through the local libcloud driver. The warm path measures the lobby (lock, queue, atomic
assign, ticket) against ready nodes whose heartbeats the benchmark writes itself: a warm
connect never talks to the node, so 25 real node processes would only add noise on a
2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import websockets
from simple_websocket import Client

from common.config import Config, load_config
from provisioner.state import State, connect, slots_key
from voicectl import procs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import report  # noqa: E402


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def lobby(ws_url: str, query: str) -> tuple[float, list[dict[str, Any]]]:
    """Seconds from opening the lobby to `ready` (or error), and the messages (cold path)."""
    t0 = time.perf_counter()
    ws = Client.connect(f"{ws_url}/ws/session?{query}")
    msgs = []
    while True:
        raw = ws.receive(timeout=120)
        if raw is None:
            raise RuntimeError(f"no answer from the lobby: {msgs}")
        msgs.append(json.loads(raw))
        if msgs[-1]["type"] in ("ready", "error"):
            elapsed = time.perf_counter() - t0
            try:
                ws.close()
            except Exception:
                pass
            return elapsed, msgs


async def _open(ws_url: str, query: str, at: float, t_start: float,
                source: str | None = None) -> float:
    """One user: wait until `at` seconds after `t_start`, open the lobby (from the address
    `source`, a loopback one of its own), read to `ready`."""
    await asyncio.sleep(max(0.0, t_start + at - time.perf_counter()))
    t0 = time.perf_counter()
    async with websockets.connect(f"{ws_url}/ws/session?{query}", compression=None,
                                  open_timeout=60, close_timeout=1,
                                  local_addr=(source, 0) if source else None) as ws:
        async for raw in ws:
            msg = json.loads(raw)
            if msg["type"] == "ready":
                return time.perf_counter() - t0
            if msg["type"] == "error":
                raise RuntimeError(f"lobby refused {query}: {msg}")
    raise RuntimeError(f"lobby closed without ready for {query}")


def _users(ws_url: str, tag: str, arrivals: list[float],
           sources: list[str] | None = None) -> tuple[list[float], float]:
    """In a separate process (the users are browsers elsewhere, not in the server's GIL),
    one asyncio task per user, each opening its lobby at its arrival time (from
    `sources[i]`, else 127.0.0.1); latencies and admissions per second over the round."""
    async def all_users() -> list[float]:
        t_start = time.perf_counter() + 0.05
        return await asyncio.gather(*(
            _open(ws_url, f"user={tag}-{i}&model=miku&region=us-west", at, t_start,
                  sources[i] if sources else None)
            for i, at in enumerate(arrivals)))

    t0 = time.perf_counter()
    got = asyncio.run(all_users())
    return got, len(arrivals) / (time.perf_counter() - t0 - 0.05)


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(latencies, [50, 99])
    return round(1000 * float(p50), 2), round(1000 * float(p99), 2)


@contextmanager
def ready_nodes(state: State, nodes: list[str], region: str = "us-west",
                model: str = "miku") -> Iterator[None]:
    """Ready nodes of `model` in `region` (4 slots each) as the lobby sees them: their
    heartbeats written here, twice a second, and forgotten after the block."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            for node_id in nodes:
                state.heartbeat({"id": node_id, "provider": "local", "region": region,
                                 "model": model, "version": "1", "state": "ready",
                                 "capacity": 4, "url": "ws://127.0.0.1:9/ws"}, time.time())
            stop.wait(0.5)

    threading.Thread(target=beat, daemon=True).start()
    time.sleep(0.3)
    try:
        yield
    finally:
        stop.set()
        for node_id in nodes:
            state.forget_node(node_id)


def free(state: State, nodes: list[str], tag: str, users: int) -> None:
    """Free every slot of `nodes` and the locks of users `{tag}-0..`, for the next round."""
    for node_id in nodes:
        state.r.delete(slots_key(node_id))
    for i in range(users):
        state.release_lock(f"{tag}-{i}", state.lock_holder(f"{tag}-{i}") or "")


@dataclass
class RealStack:
    """`voicectl run` in its own processes on a Redis of ours (see `real_stack`)."""

    proc: Any
    port: int
    redis_url: str
    state: State
    cfg: Config
    redis_proc: Any = None
    flower_port: int = 0

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@contextmanager
def real_stack(name: str, load_s: float = 10.0, extra_config: str = "",
               env: dict[str, str] | None = None,
               no_boot: tuple[str, ...] = ()) -> Iterator[RealStack]:
    """The real stack as users meet it: `voicectl run` (webapp, Celery worker with beat,
    Flower) on the default fleet plus `extra_config`, on a Redis of ours; its log in
    var/logs/bench-NAME.log. Regions in `no_boot` get a quota of 0 nodes: in production
    the nodes the autoscaler boots run on other machines, here they would share the
    webapp's two cores (a dozen node processes starting at once) and drown its figures."""
    url, redis_proc = procs.start_redis()
    port, flower = procs.free_port(), procs.free_port()
    var = procs.ROOT / "var"
    var.mkdir(exist_ok=True)
    config = var / f"bench-{name}.toml"
    text = (procs.ROOT / "common" / "default.toml").read_text()
    for region in no_boot:
        line = f'name = "{region}"\n'
        assert line in text, f"no region {region} in default.toml"
        text = text.replace(line, line + "max_nodes = 0\n")
    config.write_text(text + extra_config)
    env = {**os.environ, "REDIS_URL": url, "MODEL_LOAD_SECONDS": str(load_s),
           "VOICE_CONFIG": str(config), "DATABASE_URL": "sqlite:///" + str(var / "bench.sqlite"),
           "VOICE_DEV_USERS": "1", **(env or {})}   # users named by ?user=, as in tests
    logfile = procs.ROOT / "var" / "logs" / f"bench-{name}.log"
    log(f"starting the real stack: voicectl run on port {port} (Redis {procs.redacted(url)}) ...")
    stack = procs.spawn([sys.executable, "-m", "voicectl", "run", "--port", str(port),
                         "--flower-port", str(flower)], env=env, log=logfile)
    try:
        deadline = time.monotonic() + 60
        while procs.port_free("127.0.0.1", port):   # until the webapp listens
            if time.monotonic() > deadline or stack.poll() is not None:
                raise RuntimeError(f"voicectl run did not start; see {logfile}")
            time.sleep(0.1)
        time.sleep(2.0)   # the Celery worker connects
        yield RealStack(stack, port, url, State(connect(url)), load_config(env), redis_proc,
                        flower)
    finally:
        procs.stop([stack], timeout_s=30)
        procs.stop([redis_proc])


def warm(state: State, ws_url: str, rounds: int, users: int, rate: float) -> dict[str, Any]:
    """`users` users on ready nodes with exactly enough room, two ways: arriving as a Poisson
    process at `rate` per second and keeping their sessions (so the last ones are admitted
    while the others hold theirs: `users` concurrent users), and all opening the lobby in
    the same instant (a stress beyond any real arrival process)."""
    nodes = [f"warm-{i}" for i in range(math.ceil(users / 4))]

    def reset(tag: str) -> None:
        free(state, nodes, tag, users)

    rng = np.random.default_rng(7)
    out: dict[str, Any] = {}
    with ready_nodes(state, nodes), multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.apply(_users, (ws_url, "warmup", [0.0]))   # imports, first connection
        reset("warmup")
        for mode in ("poisson", "burst"):
            latencies: list[float] = []
            rates = []
            for r in range(rounds):
                if mode == "poisson":
                    arrivals = list(np.cumsum(rng.exponential(1 / rate, users)))
                    what = f"arrive as a Poisson process at {rate:g}/s and stay"
                else:
                    arrivals, what = [0.0] * users, "open the lobby in the same instant"
                log(f"warm {mode} round {r + 1}/{rounds}: {users} users {what} ...")
                got, per_s = pool.apply(_users, (ws_url, f"{mode}{r}", arrivals))
                latencies += got
                rates.append(per_s)
                reset(f"{mode}{r}")
            p50, p99 = _percentiles(latencies)
            if mode == "poisson":
                out.update(warm_connect_ms_p50=p50, warm_connect_ms_p99=p99,
                           warm_connect_ms_max=round(1000 * max(latencies), 2))
            else:
                out.update(warm_burst_ms_p50=p50, warm_burst_ms_p99=p99,
                           admissions_per_s=round(float(np.median(rates)), 1))
    out.update(warm_users=users, warm_arrivals_per_s=rate, warm_rounds=rounds)
    return out


def floor(rounds: int, users: int, rate: float) -> dict[str, Any]:
    """The same arrivals (Poisson, then bursts) against Flask + flask-sock with an empty
    handler (bench/floor_server.py): the part of the figures no lobby code can remove."""
    port = procs.free_port()
    server = procs.spawn([sys.executable, "-m", "gunicorn", "-k", "gevent", "--workers", "1",
                          "--worker-connections", "10000", "--bind", f"127.0.0.1:{port}",
                          "--chdir", str(Path(__file__).parent), "floor_server:app"],
                         log=procs.ROOT / "var" / "logs" / "bench-floor.log")
    latencies: list[float] = []
    poisson: list[float] = []
    rng = np.random.default_rng(7)      # the same arrival times as the warm measure
    try:
        while procs.port_free("127.0.0.1", port):
            if server.poll() is not None:
                raise RuntimeError("the floor server did not start; see var/logs/bench-floor.log")
            time.sleep(0.05)
        log(f"framework floor: {rounds} rounds of {users} against an empty flask-sock handler ...")
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pool.apply(_users, (f"ws://127.0.0.1:{port}", "warmup", [0.0]))
            for r in range(rounds):
                arrivals = list(np.cumsum(rng.exponential(1 / rate, users)))
                poisson += pool.apply(_users, (f"ws://127.0.0.1:{port}", f"floorp{r}",
                                               arrivals))[0]
            for r in range(rounds):
                latencies += pool.apply(_users, (f"ws://127.0.0.1:{port}", f"floor{r}",
                                                 [0.0] * users))[0]
    finally:
        procs.stop([server])
    p50, p99 = _percentiles(latencies)
    f50, f99 = _percentiles(poisson)
    return {"warm_connect_floor_ms_p50": f50, "warm_connect_floor_ms_p99": f99,
            "warm_burst_floor_ms_p50": p50, "warm_burst_floor_ms_p99": p99}


def cold(state: State, ws_url: str, load_s: float, boot_s: float) -> dict[str, Any]:
    log(f"cold connect: no node anywhere, model load {load_s:g} s, VM boot {boot_s:g} s ...")
    t0 = time.perf_counter()
    marks: dict[str, float] = {}

    def watch() -> None:
        while "vm" not in marks:
            if "decided" not in marks and state.nodes():
                marks["decided"] = time.perf_counter() - t0
            if state.vms():
                marks["vm"] = time.perf_counter() - t0
            time.sleep(0.002)

    threading.Thread(target=watch, daemon=True).start()
    elapsed, msgs = lobby(ws_url, "user=cold&model=kaito&region=ap-northeast")
    assert msgs[-1]["type"] == "ready", msgs
    return {"cold_connect_s": round(elapsed, 3),
            "cold_connect_overhead_s": round(elapsed - load_s, 3),
            "cold_connect_overhead_above_boot_and_load_s": round(elapsed - load_s - boot_s, 3),
            "scale_up_decision_s": round(marks.get("decided", float("nan")), 4),
            "provision_started_s": round(marks.get("vm", float("nan")), 4),
            "model_load_s": load_s, "vm_boot_s": boot_s}


WAIT_REGION = """
[[regions]]
name = "nowhere"           # the bench's: its provider can never boot a node (quota 0)
provider = "local"
lat = -45.0
lon = 170.0
max_nodes = 0
"""


def webapp_processes(proc: Any) -> list[Any]:
    """The webapp's processes under `voicectl run` (gunicorn's master and gevent worker)."""
    import psutil

    out = []
    for c in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "gunicorn" in " ".join(c.cmdline()):
                out.append(c)
        except psutil.Error:
            pass
    return out


def _load(proc: Any, redis_url: str, seconds: float) -> tuple[float, float]:
    """CPU cores the webapp's processes used and Redis commands per second, over
    `seconds`."""
    r = State(connect(redis_url)).r
    web = webapp_processes(proc)

    def cpu_s() -> float:
        return sum(t.user + t.system for t in (p.cpu_times() for p in web))
    c0, n0, t0 = cpu_s(), int(r.info("stats")["total_commands_processed"]), time.time()
    time.sleep(seconds)
    c1, n1, t1 = cpu_s(), int(r.info("stats")["total_commands_processed"]), time.time()
    return round((c1 - c0) / (t1 - t0), 3), round((n1 - n0 - 2) / (t1 - t0), 1)


def waiting(stack: Any, redis_url: str, ws_url: str, lobbies: int) -> dict[str, Any]:
    """`lobbies` users waiting where no node can boot, beside the same stack idle."""
    log("idle: webapp CPU and Redis commands for 5 s ...")
    time.sleep(2.0)   # the stack settles after its start
    idle_cpu, idle_cmds = _load(stack, redis_url, 5.0)
    log(f"{lobbies} lobbies waiting in a region whose provider cannot boot ...")
    sockets = [Client.connect(f"{ws_url}/ws/session?user=wait{i}&model=miku&region=nowhere")
               for i in range(lobbies)]
    try:
        for ws in sockets:
            ws.receive(timeout=30)
        time.sleep(2.0)
        cpu, cmds = _load(stack, redis_url, 5.0)
        notes = []   # what the first user was told since (a booting node may come first)
        while (raw := sockets[0].receive(timeout=2)) and not any(notes):
            notes.append(json.loads(raw).get("note", ""))
    finally:
        for ws in sockets:
            ws.close()
    return {"waiting_lobbies": lobbies, "waiting_cpu_cores": cpu,
            "waiting_redis_cmds_per_s": cmds, "idle_cpu_cores": idle_cpu,
            "idle_redis_cmds_per_s": idle_cmds,
            "waiting_cpu_cores_over_idle": round(cpu - idle_cpu, 3),
            "waiting_redis_cmds_per_s_over_idle": round(cmds - idle_cmds, 1),
            "waiting_told": any(notes)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load-s", type=float, default=10.0, help="MODEL_LOAD_SECONDS")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--rate", type=float, default=100.0, help="Poisson arrivals per second")
    p.add_argument("--waiting", type=int, default=200, help="lobbies waiting for a node")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    figures: dict[str, Any] = {}
    # The warm users' nodes are the benchmark's own (us-west); its region and those near it
    # boot nothing. The cold user's region (ap-northeast) boots its one node.
    with real_stack("connect", args.load_s, WAIT_REGION,
                    no_boot=("us-west", "us-east", "eu-west")) as stack:
        figures.update(cold(stack.state, stack.ws_url, args.load_s,
                            stack.cfg.provider("local").boot_s))
        figures.update(waiting(stack.proc, stack.redis_url, stack.ws_url, args.waiting))
        figures.update(warm(stack.state, stack.ws_url, args.rounds, args.users, args.rate))
    figures.update(floor(args.rounds, args.users, args.rate))
    figures["warm_connect_p99_over_floor"] = round(
        figures["warm_connect_ms_p99"] / figures["warm_connect_floor_ms_p99"], 2)
    figures["warm_burst_p99_over_floor"] = round(
        figures["warm_burst_ms_p99"] / figures["warm_burst_floor_ms_p99"], 2)
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
