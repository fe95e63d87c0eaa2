"""The deployed shape under a crowd: nginx (deploy/nginx.conf) in front of gunicorn's gevent
worker (2 processes, webapp.wsgi:deployed()), a Celery worker with beat, real nodes that
heartbeat through the proxy. While 5,000 lobbies from 50 addresses wait (in a region that
boots nothing) and 1,000 sockets from one address send half a TLS hello and stall (reopened
as the proxy drops them), it measures /healthz through the proxy against the same stack
idle, how long a new user in another region takes to be placed, and the nodes' failed
heartbeats. Every address is on 127.0.0.0/8.

    python bench/crowd.py [--lobbies 5000] [--addresses 50] [--slow 1000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import os
import re
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import websockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from connect import WAIT_REGION, log  # noqa: E402

from billing.ledger import Ledger  # noqa: E402
from common.config import load_config  # noqa: E402
from common.identity import mint_token  # noqa: E402
from provisioner import membership  # noqa: E402
from provisioner.state import State, connect  # noqa: E402
from voicectl import procs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECRET, USER_SECRET = "t" * 64, "u" * 64
SETTINGS = {"trusted_proxies": 1, "lobby_limit_exempt": [], "lobby_attempts_per_client": 0,
            "lobby_attempts_per_user": 0, "lobby_sockets_per_client": 0}


def config(tmp: Path) -> Path:
    """default.toml with the proxy believed, the crowd's attempts unlimited (users behind
    50 NATs), and a region where nothing boots for the waiting crowd."""
    text = (ROOT / "common" / "default.toml").read_text()
    for key, value in SETTINGS.items():
        text = re.sub(rf"^{key} = .*$", f"{key} = {json.dumps(value)}", text, flags=re.M)
    (tmp / "voice.toml").write_text(text + WAIT_REGION)
    return tmp / "voice.toml"


def healthz_ms(port: int, ctx: ssl.SSLContext, n: int) -> list[float]:
    """n sequential GET /healthz through the proxy on one kept-alive connection, from an
    address of its own."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30,
                                       source_address=("127.0.0.2", 0))
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        resp.read()
        out.append(1000 * (time.perf_counter() - t0))
        time.sleep(0.01)
    conn.close()
    return out


def p99(xs: list[float]) -> float:
    return round(float(np.percentile(xs, 99)), 2)


async def _crowd(port: int, cert: str, lobbies: int, addresses: int, slow: int,
                 opened: Any, stop: Any) -> None:
    ctx = ssl.create_default_context(cafile=cert)
    sem = asyncio.Semaphore(64)   # handshakes at once
    held: list[Any] = []

    async def lobby(i: int) -> None:
        token = mint_token(f"crowd{i}", USER_SECRET, now=time.time(), ttl_s=3600)
        async with sem:
            try:
                ws = await websockets.connect(
                    f"wss://127.0.0.1:{port}/ws/session?token={token}&model=miku"
                    "&region=nowhere", ssl=ctx, open_timeout=60, close_timeout=1,
                    compression=None, local_addr=(f"127.0.3.{1 + i % addresses}", 0))
                await ws.recv()
                held.append(ws)
            except Exception:  # noqa: BLE001  counted: the crowd is what got in
                pass

    await asyncio.gather(*(lobby(i) for i in range(lobbies)))

    async def stall() -> None:   # half a TLS hello, then nothing; again when dropped
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=("127.0.4.1", 0))
                writer.write(b"\x16\x03\x01")
                await reader.read()          # until the proxy's header timeout closes it
                writer.close()
            except OSError:
                await asyncio.sleep(0.5)

    stalls = [asyncio.create_task(stall()) for _ in range(slow)]
    await asyncio.sleep(3.0)
    opened.value = len(held)
    while not stop.is_set():
        await asyncio.sleep(0.2)
    for task in stalls:
        task.cancel()
    for ws in held:
        await ws.close()


def crowd(port: int, cert: str, lobbies: int, addresses: int, slow: int, opened: Any,
          stop: Any) -> None:
    asyncio.run(_crowd(port, cert, lobbies, addresses, slow, opened, stop))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lobbies", type=int, default=5000)
    p.add_argument("--addresses", type=int, default=50)
    p.add_argument("--slow", type=int, default=1000)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-crowd-"))
    cert = str(procs.self_signed(tmp))
    ctx = ssl.create_default_context(cafile=cert)
    redis_url, redis_proc = procs.start_redis()
    web, http_port, https = procs.free_port(), procs.free_port(), procs.free_port()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "REDIS_URL": redis_url,
           "DATABASE_URL": f"sqlite:///{tmp / 'billing.sqlite'}", "TICKET_SECRET": SECRET,
           "USER_TOKEN_SECRET": USER_SECRET, "VOICE_PUBLIC_URL": f"https://127.0.0.1:{https}",
           "VOICE_CONFIG": str(config(tmp)), "MODEL_LOAD_SECONDS": "1",
           "REQUESTS_CA_BUNDLE": cert}    # nodes trust the proxy's certificate
    cfg = load_config(env)
    Ledger.open(cfg.database_url).engine.dispose()   # `voicectl migrate`
    children = [redis_proc]
    try:
        log("starting gunicorn (gevent, 2 workers), nginx, a Celery worker with beat ...")
        children.append(procs.spawn(procs.webapp_command("127.0.0.1", web, "deployed()", 2),
                                    env=env, log=tmp / "webapp.log"))
        (tmp / "nginx.conf").write_text(procs.nginx_config(tmp, web, http_port, https))
        children.append(procs.spawn(["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"),
                                     "-e", str(tmp / "nginx.log"), "-g", "daemon off;"],
                                    log=tmp / "nginx.out"))
        children.append(procs.spawn([sys.executable, "-m", "celery", "-A", "provisioner.worker",
                                     "worker", "-B", "--pool", "threads", "--concurrency", "4",
                                     "--loglevel", "WARNING", "--schedule",
                                     str(tmp / "beat-schedule")], env=env,
                                    log=tmp / "celery.log"))
        _wait(lambda: _answers(https, ctx), 60, "the proxied webapp never answered")
        state = State(connect(redis_url))
        node_logs = _nodes(state, cfg, env, tmp, https, args.nodes, children)
        idle = healthz_ms(https, ctx, 300)
        log(f"idle /healthz p99 {p99(idle)} ms; opening {args.lobbies} lobbies from "
            f"{args.addresses} addresses and {args.slow} stalled sockets ...")
        beats_before = sum(_failed_beats(f) for f in node_logs)
        opened, stop = multiprocessing.Value("i", -1), multiprocessing.Event()
        clients = multiprocessing.Process(target=crowd, args=(
            https, cert, args.lobbies, args.addresses, args.slow, opened, stop), daemon=True)
        clients.start()
        _wait(lambda: opened.value >= 0, 600, "the crowd never finished opening")
        log(f"{opened.value} lobbies waiting; measuring ...")
        busy = healthz_ms(https, ctx, 300)
        t0 = time.perf_counter()
        placed = asyncio.run(_new_user(https, ctx))
        new_user_s = time.perf_counter() - t0
        beats_failed = sum(_failed_beats(f) for f in node_logs) - beats_before
        stop.set()
        clients.join(60)
        out = {"waiting_lobbies": opened.value, "slow_sockets": args.slow,
               "healthz_ms_p99_idle": p99(idle), "healthz_ms_p99_crowd": p99(busy),
               "healthz_p99_ratio": round(p99(busy) / max(p99(idle), 1e-9), 2),
               "healthz_ms_p50_idle": round(float(np.median(idle)), 2),
               "healthz_ms_p50_crowd": round(float(np.median(busy)), 2),
               "new_user_placed_s": round(new_user_s, 3), "new_user_ready": placed,
               "node_beats_failed": beats_failed, "nodes": args.nodes}
    finally:
        procs.stop(children[::-1])
    for key, value in out.items():
        print(f"{key:24s} {value}")
    if args.json:
        print(json.dumps(out))
    return 0


def _nodes(state: State, cfg: Any, env: dict[str, str], tmp: Path, https: int, n: int,
           children: list[Any]) -> list[Path]:
    """n ready nodes of miku in us-west that joined and heartbeat through the proxy."""
    import uuid

    entry = state.model_entry("miku")
    assert entry is not None
    v = entry.versions[entry.live]
    logs = []
    for _ in range(n):
        node_id = f"n-{uuid.uuid4().hex[:8]}"
        now = time.time()
        state.add_node({"id": node_id, "home": "us-west", "region": "us-west",
                        "provider": "local", "model": "miku", "version": v.version,
                        "digest": v.digest, "state": "booting", "requested_at": now,
                        "deadline": now + 600, "capacity": v.streams_per_gpu,
                        "price_per_hour": "1.10"})
        token = membership.join_token_for(state, cfg, node_id)
        logs.append(tmp / f"{node_id}.log")
        children.append(procs.spawn([sys.executable, "-m", "worker_node", "--join",
                                     f"https://127.0.0.1:{https}", "--token", token,
                                     "--load-s", "1"], env=env, log=logs[-1]))
        _wait(lambda nid=node_id: (r := state.node(nid)) is not None
              and r.state.value == "ready", 60, f"node {node_id} never became ready")
    return logs


async def _new_user(port: int, ctx: ssl.SSLContext) -> bool:
    token = mint_token("newcomer", USER_SECRET, now=time.time(), ttl_s=600)
    async with websockets.connect(f"wss://127.0.0.1:{port}/ws/session?token={token}"
                                  "&model=miku&region=us-west", ssl=ctx,
                                  local_addr=("127.0.0.5", 0)) as ws:
        async for raw in ws:
            if json.loads(raw)["type"] in ("ready", "error"):
                return bool(json.loads(raw)["type"] == "ready")
    return False


def _failed_beats(path: Path) -> int:
    return path.read_text().count("heartbeat failed") if path.exists() else 0


def _answers(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=2)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def _wait(what: Any, timeout_s: float, msg: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        if time.monotonic() > deadline:
            raise RuntimeError(msg)
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
