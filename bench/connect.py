"""Connect benchmark: warm connect latency with 100 concurrent users, cold connect time and
its overhead above the model load, time from a breached buffer to the scale-up decision and
to the provision task starting, and admissions per second.

    python bench/connect.py [--load-s 10] [--rounds 5] [--json]

Warm figures: `warm_connect_ms_*` are for 100 users who open the lobby in the same
instant (from a separate client process); `*_at_100_per_s` for 100 users arriving 10 ms
apart. Everything runs on the real stack, `voicectl run` in its own processes (webapp, Celery
worker with beat, Flower) on a Redis of ours; the cold path boots a worker_node process
through the local libcloud driver. The warm path measures the lobby (lock, queue, atomic
assign, ticket) against ready nodes whose heartbeats the benchmark writes itself: a warm
connect never talks to the node, so 25 real node processes would only add noise on a
2-core machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import threading
import time
from typing import Any

import numpy as np
from simple_websocket import Client

from common.config import load_config
from provisioner.state import State, connect, slots_key
from voicectl import procs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import report  # noqa: E402


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def lobby(ws_url: str, query: str) -> tuple[float, list[dict[str, Any]]]:
    """Seconds from opening the lobby to `ready` (or error), and the messages."""
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


def _burst(ws_url: str, users: int, tag: str, spacing_s: float) -> tuple[list[float], float]:
    """In a separate process (the clients are browsers elsewhere, not in the server's GIL):
    `users` lobbies opened at once (spacing 0) or `spacing_s` apart; latencies and rate."""
    got: list[float] = []
    barrier = threading.Barrier(users)

    def one(i: int) -> None:
        barrier.wait()
        time.sleep(i * spacing_s)
        elapsed, msgs = lobby(ws_url, f"user={tag}-{i}&model=miku&region=us-west")
        assert msgs[-1]["type"] == "ready", msgs
        got.append(elapsed)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got, users / (time.perf_counter() - t0)


def warm(state: State, ws_url: str, rounds: int, users: int) -> dict[str, Any]:
    nodes = [f"warm-{i}" for i in range(users // 4)]
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            for node_id in nodes:
                state.heartbeat({"id": node_id, "provider": "local", "region": "us-west",
                                 "model": "miku", "version": "1", "state": "ready",
                                 "capacity": 4, "url": "ws://127.0.0.1:9/ws"}, time.time())
            stop.wait(0.5)

    def reset(tag: str) -> None:
        for node_id in nodes:                      # free every slot for the next round
            state.r.delete(slots_key(node_id))
        for i in range(users):
            state.release_lock(f"{tag}-{i}", state.lock_holder(f"{tag}-{i}") or "")

    threading.Thread(target=beat, daemon=True).start()
    time.sleep(0.3)
    out: dict[str, Any] = {}
    ctx = multiprocessing.get_context("spawn")
    try:
        with ctx.Pool(1) as pool:
            for mode, spacing in (("burst", 0.0), ("steady", 0.01)):
                latencies: list[float] = []
                rates = []
                for r in range(rounds):
                    log(f"warm {mode} round {r + 1}/{rounds}: {users} users "
                        + ("open the lobby at once" if not spacing else
                           f"arrive {1000 * spacing:g} ms apart") + " ...")
                    got, rate = pool.apply(_burst, (ws_url, users, f"{mode}{r}", spacing))
                    latencies += got
                    rates.append(rate)
                    reset(f"{mode}{r}")
                p50 = round(1000 * float(np.percentile(latencies, 50)), 2)
                p99 = round(1000 * float(np.percentile(latencies, 99)), 2)
                if mode == "burst":
                    out.update(warm_connect_ms_p50=p50, warm_connect_ms_p99=p99,
                               admissions_per_s=round(float(np.median(rates)), 1))
                else:
                    out.update(warm_connect_ms_p50_at_100_per_s=p50,
                               warm_connect_ms_p99_at_100_per_s=p99)
    finally:
        stop.set()
        for node_id in nodes:
            state.forget_node(node_id)
    out.update(warm_users=users, warm_rounds=rounds)
    return out


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load-s", type=float, default=10.0, help="MODEL_LOAD_SECONDS")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    url, redis_proc = procs.start_redis()
    port, flower = procs.free_port(), procs.free_port()
    env = {**os.environ, "REDIS_URL": url, "MODEL_LOAD_SECONDS": str(args.load_s),
           "DATABASE_URL": "sqlite:///" + str(procs.ROOT / "var" / "bench.sqlite")}
    log(f"starting the real stack: voicectl run on port {port} (Redis {url}) ...")
    stack = procs.spawn([sys.executable, "-m", "voicectl", "run", "--port", str(port),
                         "--flower-port", str(flower)], env=env,
                        log=procs.ROOT / "var" / "logs" / "bench-connect.log")
    state = State(connect(url))
    cfg = load_config(env)
    figures: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 60
        while procs.port_free("127.0.0.1", port):   # until the webapp listens
            if time.monotonic() > deadline or stack.poll() is not None:
                raise RuntimeError("voicectl run did not start; see var/logs/bench-connect.log")
            time.sleep(0.1)
        time.sleep(2.0)   # the Celery worker connects
        ws_url = f"ws://127.0.0.1:{port}"
        figures.update(cold(state, ws_url, args.load_s, cfg.provider("local").boot_s))
        figures.update(warm(state, ws_url, args.rounds, args.users))
    finally:
        procs.stop([stack], timeout_s=30)
        procs.stop([redis_proc])
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
