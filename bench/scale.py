"""Scale benchmark: N simulated node agents heartbeating through the real join/heartbeat API
of one webapp process while lobby users arrive; lobby latency with and without them.

    python bench/scale.py [--nodes 1000] [--users 400] [--rate 20] [--json]

Processes (everything real, each in its own process, as in production):
- our own redis-server, and the webapp alone served as `voicectl run` serves it
  (bench/scale_server.py: `create_app`, werkzeug with a thread per connection);
- 3 real worker nodes (`python -m worker_node --join URL --token T`) serving miku in
  us-west, so every lobby gets `ready`;
- the simulated agents: one asyncio process standing for N machines elsewhere, one
  connection each. Each was recorded as the control plane records a node it boots (a node
  record plus `membership.join_token_for`, as tests/conftest.py's Fleet.enroll does), POSTs
  /api/nodes/join with its token (keep-alive HTTP/1.1), then, like worker_node/agent.py,
  opens its heartbeat socket `WS /api/nodes/beat` with its credential, sends a report,
  reads its orders, waits the real interval (2 s) and beats again. Reports: state ready,
  `serving`, and for every fourth node two live streams and their usage counters of the
  current minute. They serve teto and kaito in every region,
  so they are not candidates for the miku/us-west lobbies: the lobby still reads and
  filters all of them, but its users land on the real nodes;
- the users: one asyncio process (bench/connect.py's client), Poisson arrivals, each
  timed from opening the lobby to `ready`. A thread here frees the real nodes' slot
  reservations (a user never uses the ticket), so users never wait for a slot.

Phases, in one run: `idle` (users only), `nodes_only` (N agents heartbeating after a
warm-up, no users: `heartbeat_cpu_ms_per_beat` is the webapp's CPU over the beats
answered), `with_nodes` (users while the N agents heartbeat), and `nodes_silent` (users,
the N node records still there, the agents stopped): the last separates what a big fleet
costs the lobby (reading its records) from what handling the heartbeats costs. CPU is each
process's own (psutil user + system) over each phase, in cores. A lobby not `ready` within
10 s counts as failed; a percentile that falls on a failure is null, and so is the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from common.config import Config, load_config
from provisioner import membership
from provisioner.state import State, connect, slots_key
from voicectl import procs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from connect import _open  # noqa: E402
from report import report  # noqa: E402
from scale_agents import agents_main  # noqa: E402

REAL_NODES = 3
SIM_MODELS = ("teto", "kaito")     # not the lobby's model: its users go to the real nodes
NODES_ONLY_S = 10.0                # heartbeats alone, no users: their cost, measured clean
LOBBY_TIMEOUT_S = 10.0             # a lobby not ready by then counts as failed


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --- the control plane side ---------------------------------------------------------------

def enroll(state: State, cfg: Config, model: str, region: str) -> tuple[str, str]:
    """Record a node as the control plane does when it boots one; its join token
    (the same steps as tests/conftest.py Fleet.enroll)."""
    node_id = f"n-{uuid.uuid4().hex[:8]}"
    entry, r = state.model_entry(model), cfg.region(region)
    if entry is None or r is None:
        raise RuntimeError(f"model {model!r} or region {region!r} is not in the config")
    m = entry.versions[entry.live]
    provider = cfg.provider(r.provider)
    now = time.time()
    state.add_node({"id": node_id, "home": region, "region": region,
                    "provider": provider.name, "model": m.model, "version": m.version,
                    "digest": m.digest, "state": "booting", "requested_at": now,
                    "deadline": now + 600, "capacity": m.streams_per_gpu,
                    "price_per_hour": provider.price_per_hour})
    return node_id, membership.join_token_for(state, cfg, node_id)


def _users(ws_url: str, tag: str, arrivals: list[float]) -> list[float | None]:
    """bench/connect.py's users (one asyncio task each, opening the lobby at its arrival
    time), but a lobby that fails, or is not ready within LOBBY_TIMEOUT_S, counts as an
    error (None) instead of ending the run."""
    async def one(i: int, at: float, t_start: float) -> float | None:
        try:
            return await asyncio.wait_for(
                _open(ws_url, f"user={tag}-{i}&model=miku&region=us-west", at, t_start),
                at + t_start - time.perf_counter() + LOBBY_TIMEOUT_S)
        except Exception as e:  # process boundary: any failure is one failed lobby
            why = f"{type(e).__name__}: {str(e)[:120]}"
            failures[why] = failures.get(why, 0) + 1
            return None

    async def all_users() -> list[float | None]:
        t_start = time.perf_counter() + 0.05
        return await asyncio.gather(*(one(i, at, t_start) for i, at in enumerate(arrivals)))

    failures: dict[str, int] = {}
    got = asyncio.run(all_users())
    if failures:
        print(f"bench: {tag}: failed lobbies: {failures}", file=sys.stderr, flush=True)
    return got


class Meter:
    """CPU seconds of some processes between two instants, as cores."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}

    def read(self) -> tuple[float, dict[str, float]]:
        return time.monotonic(), {n: sum(p.cpu_times()[:2]) for n, p in self.procs.items()}

    @staticmethod
    def cores(a: tuple[float, dict[str, float]], b: tuple[float, dict[str, float]],
              ) -> dict[str, float]:
        return {n: round((b[1][n] - a[1][n]) / (b[0] - a[0]), 3) for n in a[1]}


def _recv(ctl: Connection, agents: Any, want: str, timeout_s: float) -> Any:
    """The agents' next message, which must be `want`; fails if their process died."""
    deadline = time.monotonic() + timeout_s
    while not ctl.poll(0.2):
        if not agents.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the simulated agents did not report {want!r} (exit code "
                               f"{agents.exitcode}); see the traceback above")
    kind, value = ctl.recv()
    if kind != want:
        raise RuntimeError(f"the simulated agents said {kind!r}, expected {want!r}")
    return value


def _ms(values: Sequence[float | None], q: float) -> float | None:
    """A percentile in ms; a failed lobby (None) counts as slower than every success, so a
    percentile that falls on a failure is None."""
    if not values:
        return None
    got = float(np.percentile([float("inf") if v is None else v for v in values], q,
                              method="higher"))
    return round(1000 * got, 2) if got != float("inf") else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=1000, help="simulated node agents")
    p.add_argument("--users", type=int, default=400, help="lobby users per phase")
    p.add_argument("--rate", type=float, default=20.0, help="Poisson arrivals per second")
    p.add_argument("--warmup-s", type=float, default=6.0,
                   help="heartbeats before the with-nodes phase is measured")
    p.add_argument("--py-spy", metavar="FILE", help="profile the webapp during one phase "
                   "with py-spy (if installed), collapsed stacks to FILE")
    p.add_argument("--py-spy-phase", default="with_nodes",
                   choices=("idle", "with_nodes", "nodes_silent"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    url, redis_proc = procs.start_redis()
    port = procs.free_port()
    base_url, ws_url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"
    env = {**os.environ, "REDIS_URL": url, "MODEL_LOAD_SECONDS": "0.2",
           "VOICE_DEV_USERS": "1",   # users named with ?user=
           "TICKET_SECRET": "bench-" + uuid.uuid4().hex, "VOICE_PUBLIC_URL": base_url,
           "DATABASE_URL": f"sqlite:///{tmp / 'billing.sqlite'}"}
    cfg = load_config(env)
    state = State(connect(url))
    log(f"webapp on port {port} (Redis {procs.redacted(url)}); logs in {tmp}")
    server = procs.spawn([sys.executable, str(Path(__file__).with_name("scale_server.py")),
                          str(port)], env=env, log=tmp / "webapp.log")
    children = [server]
    figures: dict[str, Any] = {"nodes": args.nodes}
    ctx = multiprocessing.get_context("spawn")
    stop_sweep = threading.Event()
    try:
        deadline = time.monotonic() + 60
        while procs.port_free("127.0.0.1", port):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"the webapp did not start; see {tmp / 'webapp.log'}")
            time.sleep(0.05)

        log(f"{REAL_NODES} real worker nodes join (miku, us-west) ...")
        real = []
        for _ in range(REAL_NODES):
            node_id, token = enroll(state, cfg, "miku", "us-west")
            real.append(node_id)
            children.append(procs.spawn(
                [sys.executable, "-m", "worker_node", "--join", base_url, "--token", token,
                 "--load-s", "0.2"], env={"PATH": os.environ["PATH"]},
                log=tmp / f"{node_id}.log"))
        deadline = time.monotonic() + 60
        while not all((n := state.node(i)) is not None and n.state.value == "ready"
                      for i in real):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the real nodes are not ready; see their logs in {tmp}")
            time.sleep(0.1)

        def sweep() -> None:   # the users never use their tickets: free their slots
            while not stop_sweep.wait(0.05):
                for node_id in real:
                    state.r.zremrangebyscore(slots_key(node_id), "-inf", "(+inf")

        threading.Thread(target=sweep, daemon=True).start()
        meter = Meter({"webapp": server.pid, "redis": redis_proc.pid})
        rng = np.random.default_rng(7)

        with ctx.Pool(1) as users:
            meter.procs["users"] = psutil.Process(users.apply(os.getpid))
            users.apply(_users, (ws_url, "warmup", [0.0] * 5))

            def phase(name: str) -> tuple[list[float | None], dict[str, float], float, float]:
                arrivals = list(np.cumsum(rng.exponential(1 / args.rate, args.users)))
                log(f"phase {name}: {args.users} users arrive at {args.rate:g}/s ...")
                spy = None
                if args.py_spy and args.py_spy_phase == name:
                    spy = procs.spawn([str(Path(sys.executable).with_name("py-spy")),
                                       "record", "-p", str(server.pid), "-f", "raw",
                                       "-o", args.py_spy, "-d", str(int(args.users / args.rate)),
                                       "--nonblocking"], log=tmp / "py-spy.log")
                a = meter.read()
                got = users.apply(_users, (ws_url, name, arrivals))
                b = meter.read()
                if spy is not None:   # sampling a thousand threads can lag: stop it, it writes
                    spy.send_signal(signal.SIGINT)
                    spy.wait(30)
                return got, Meter.cores(a, b), a[0], b[0]

            idle, cpu_idle, _, _ = phase("idle")

            log(f"{args.nodes} simulated nodes: recorded, join tokens minted ...")
            enrolled = [enroll(state, cfg, SIM_MODELS[i % 2], cfg.regions[i % 4].name)
                        for i in range(args.nodes)]
            tokens = [token for _, token in enrolled]
            for i, (node_id, _) in enumerate(enrolled):   # the sessions agents report, placed
                for k in range(2 if i % 4 == 0 else 0):   # there as the lobby places them
                    state.save_session(f"s-sim{i}-{k}", {
                        "user": f"sim{i}-{k}", "node": node_id, "fence": 1,
                        "created_at": time.time() - 120}, ttl_s=3600)
            ctl, child_ctl = ctx.Pipe()
            agents = ctx.Process(target=agents_main, args=(base_url, tokens, child_ctl),
                                 daemon=True)
            agents.start()
            meter.procs["agents"] = psutil.Process(agents.pid)
            join_s = _recv(ctl, agents, "joined", 120)
            log(f"{args.nodes} joined over HTTP in {join_s:.1f} s; heartbeating, "
                f"warm-up {args.warmup_s:g} s ...")
            time.sleep(args.warmup_s)
            log(f"phase nodes_only: heartbeats without users for {NODES_ONLY_S:g} s ...")
            a = meter.read()
            time.sleep(NODES_ONLY_S)
            b = meter.read()
            cpu_nodes_only, n0, n1 = Meter.cores(a, b), a[0], b[0]
            busy, cpu_busy, t0, t1 = phase("with_nodes")
            ctl.send("stop")
            beats = _recv(ctl, agents, "done", 60)
            agents.join(10)
            meter.procs.pop("agents")
            time.sleep(2 * cfg.heartbeat_interval_s)   # the last beats are answered
            silent, cpu_silent, _, _ = phase("nodes_silent")
    finally:
        stop_sweep.set()
        procs.stop(children[1:])
        procs.stop([server], timeout_s=10)
        procs.stop([redis_proc])

    def window(start: float, end: float) -> tuple[list[float], int, float]:
        """Heartbeats answered in [start, end]: round trips of the good ones, the errors,
        good ones per second."""
        got = [(rtt, status) for at, rtt, status in beats if start <= at <= end]
        good = [rtt for rtt, status in got if status == 200]
        return good, len(got) - len(good), len(good) / (end - start)

    rtts, errors, per_s = window(t0, t1)
    alone, _, alone_per_s = window(n0, n1)
    figures.update(
        heartbeats_per_s=round(per_s, 1),
        heartbeat_errors=errors,
        heartbeat_ms_p50=_ms(rtts, 50), heartbeat_ms_p99=_ms(rtts, 99),
        heartbeats_per_s_nodes_only=round(alone_per_s, 1),
        heartbeat_ms_p50_nodes_only=_ms(alone, 50), heartbeat_ms_p99_nodes_only=_ms(alone, 99),
        webapp_cpu_cores_nodes_only=cpu_nodes_only["webapp"],
        heartbeat_cpu_ms_per_beat=(round(1000 * cpu_nodes_only["webapp"] / alone_per_s, 3)
                                   if alone_per_s else None),
        redis_cpu_cores_nodes_only=cpu_nodes_only["redis"],
        agents_cpu_cores_nodes_only=cpu_nodes_only["agents"],
        join_s=round(join_s, 2),
        webapp_cpu_cores_idle=cpu_idle["webapp"], webapp_cpu_cores_with_nodes=cpu_busy["webapp"],
        webapp_cpu_cores_nodes_silent=cpu_silent["webapp"],
        redis_cpu_cores_idle=cpu_idle["redis"], redis_cpu_cores_with_nodes=cpu_busy["redis"],
        agents_cpu_cores=cpu_busy["agents"], users_cpu_cores_with_nodes=cpu_busy["users"],
        lobby_ms_p50_idle=_ms(idle, 50), lobby_ms_p99_idle=_ms(idle, 99),
        lobby_ms_p50_with_nodes=_ms(busy, 50), lobby_ms_p99_with_nodes=_ms(busy, 99),
        lobby_ms_p50_nodes_silent=_ms(silent, 50), lobby_ms_p99_nodes_silent=_ms(silent, 99),
        lobby_errors_idle=idle.count(None), lobby_errors_with_nodes=busy.count(None),
        lobby_errors_nodes_silent=silent.count(None),
    )
    with_nodes, idle_p99 = figures["lobby_ms_p99_with_nodes"], figures["lobby_ms_p99_idle"]
    figures["lobby_p99_ratio"] = (round(with_nodes / idle_p99, 2) if with_nodes and idle_p99
                                  else None)
    if with_nodes is None and idle_p99:   # the p99 lobby failed or took over the timeout
        figures["lobby_p99_ratio_at_least"] = round(1000 * LOBBY_TIMEOUT_S / idle_p99, 1)
    figures.update(lobby_users_per_phase=args.users, lobby_arrivals_per_s=args.rate,
                   heartbeat_interval_s=cfg.heartbeat_interval_s,
                   load_average_1m=round(os.getloadavg()[0], 2))
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
