"""The attacks of issue 18 against the real stack, each with what one own machine's join
token (a node credential), a web page or a local user could do; each says held or not.
bench/hostile.py runs them and prints `attacks`, `held` and each one's verdict."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import requests
from simple_websocket import Client, ConnectionClosed

from common.tickets import Ticket, sign
from provisioner import membership
from provisioner.errors import JoinError
from provisioner.state import lock_key
from voicectl import procs

ROOT = Path(__file__).resolve().parent.parent


def _node(stack: Any) -> tuple[str, str]:
    """A machine that joined honestly (as an own machine does): its id and credential."""
    state, cfg = stack.state, stack.cfg
    node_id, now = f"n-evil-{uuid.uuid4().hex[:6]}", time.time()
    state.add_node({"id": node_id, "home": "us-west", "region": "us-west", "provider": "local",
                    "model": "miku", "version": "1", "state": "booting", "requested_at": now,
                    "deadline": now + 600, "capacity": 4, "price_per_hour": "1.10"})
    token = membership.join_token_for(state, cfg, node_id)
    got = requests.post(f"http://127.0.0.1:{stack.port}/api/nodes/join", timeout=10,
                        json={"token": token, "url": "ws://127.0.0.1:9/ws"})
    return node_id, got.json()["credential"]


def _beat(stack: Any, cred: str, **report: Any) -> requests.Response:
    body = {"state": "ready", "progress": 1.0, "serving": "miku:1", "streams": [],
            "usage": [], **report}
    return requests.post(f"http://127.0.0.1:{stack.port}/api/nodes/heartbeat", json=body,
                         headers={"Authorization": f"Bearer {cred}"}, timeout=10)


def stream_takeover(stack: Any) -> bool:
    state = stack.state
    state.save_session("s-victim", {"user": "victim", "node": "n-honest", "fence": 3,
                                    "created_at": time.time()}, ttl_s=600)
    state.r.hset(lock_key("victim"), mapping={"session": "s-victim", "fence": 3,
                                              "node": "n-honest"})
    _, cred = _node(stack)
    _beat(stack, cred, streams=[["victim", "s-evil", 10**15, "ab"],
                                ["victim", "s-victim", 10**15, "ab"]])
    return state.r.hget(lock_key("victim"), "node") == "n-honest"


def bill_anyone(stack: Any) -> bool:
    _, cred = _node(stack)
    minute = int(time.time() // 60) * 60
    _beat(stack, cred, usage=[[minute, "erin", "s-x", "ab", 60],
                              [978307200, "erin", "s-x", "ab", 60]])
    return not any("erin" in k for m in (minute, 978307200)
                   for k in stack.state.usage_counters(m))


def billing_stops_for_everyone(stack: Any) -> bool:
    """A counter no datetime holds sits first in line; later minutes must bill anyway."""
    from billing.ledger import Ledger
    minute = int(time.time() // 60) * 60 - 120
    user = f"billed-{uuid.uuid4().hex[:8]}"   # the bench's database outlives a run
    stack.state.report_usage([(-6 * 10**12, "u|s:ab|n|miku|us-west", 5.0),
                              (minute, f"{user}|s:ab|n|miku|us-west", 42.0)])
    ledger = Ledger.open(stack.cfg.database_url)
    deadline = time.monotonic() + 20   # the beat's tick settles every 2 s
    try:
        while time.monotonic() < deadline:
            if [r.seconds for r in ledger.usage(user)] == [42.0]:
                return True
            time.sleep(0.5)
        return False
    finally:
        ledger.engine.dispose()


def bad_report_fails_others(stack: Any) -> bool:
    _, bad = _node(stack)
    _, good = _node(stack)
    refused = _beat(stack, bad, usage=[[6 * 10**400, "u", "s", "ab", 1]])
    return 400 <= refused.status_code < 500 and _beat(stack, good).status_code == 200


def lying_node_not_drained(stack: Any) -> bool:
    node_id, cred = _node(stack)
    for i in range(25):
        _beat(stack, cred, streams=[[f"u{i}", f"s{i}", 1, "ab"]])
    rec = stack.state.node(node_id)
    return rec is not None and bool(rec.suspect) and rec.drain_deadline is not None


def ticket_replay_and_logs(stack: Any) -> tuple[bool, bool]:
    """A standalone node: a ticket used twice (live, then after stop); is it in the log?"""
    key, port = "k" * 32, procs.free_port()
    log = ROOT / "var" / "logs" / "bench-hostile-node.log"
    node = procs.spawn([sys.executable, "-m", "worker_node", "--standalone", "--package",
                        str(ROOT / "models" / "miku"), "--ticket-key", key, "--node-id",
                        "n-solo", "--port", str(port), "--load-s", "0"], log=log)
    try:
        deadline = time.monotonic() + 60
        while procs.port_free("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)   # the model loads
        ticket = sign(Ticket("u", "s-1", "n-solo", "miku", "1", 1, time.time() + 60), key)
        url = f"ws://127.0.0.1:{port}/ws?ticket={ticket}"
        first = Client.connect(url)
        first.send(json.dumps({"type": "start", "sample_rate": 16000}))
        first.receive(timeout=10)
        again = Client.connect(url)
        try:
            again.receive(timeout=5)
            held = False
        except ConnectionClosed as e:
            held = e.reason == 4401
        first.close()
        time.sleep(0.3)
        return held, ticket not in log.read_text()
    finally:
        procs.stop([node])


def slow_sockets_freeze(stack: Any) -> bool:
    held = [socket.create_connection(("127.0.0.1", stack.port), source_address=(
        "127.0.9.1", 0)) for _ in range(300)]
    for s in held:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")   # never finished
    try:
        t0 = time.monotonic()
        ok = all(requests.get(f"http://127.0.0.1:{stack.port}/healthz", timeout=5).ok
                 for _ in range(20))
        return ok and time.monotonic() - t0 < 5
    finally:
        for s in held:
            s.close()


def flower_open(stack: Any) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            got = requests.get(f"http://127.0.0.1:{stack.flower_port}/api/workers", timeout=5)
            return got.status_code == 401
        except requests.RequestException:
            time.sleep(0.5)
    return False


def cross_site_lobby(stack: Any) -> bool:
    ws = Client.connect(f"ws://127.0.0.1:{stack.port}/ws/session?user=x&model=miku"
                        "&region=us-west", headers={"Origin": "https://evil.example"})
    msg = json.loads(ws.receive(timeout=10))
    return msg.get("code") == "bad_request"


def dev_users_deployed(stack: Any) -> bool:
    from common.errors import ConfigError
    from webapp import wsgi
    env = {"REDIS_URL": "redis://r/0", "DATABASE_URL": "postgresql://x/y",
           "TICKET_SECRET": "t" * 64, "USER_TOKEN_SECRET": "u" * 64,
           "VOICE_PUBLIC_URL": "https://v.example", "VOICE_DEV_USERS": "1"}
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        wsgi._deployment()
        return False
    except ConfigError:
        return True
    finally:
        os.environ.clear()
        os.environ.update(saved)


def redis_open(stack: Any) -> bool:
    port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])
    try:
        redis.Redis(port=port, socket_timeout=5).ping()
        return False
    except redis.AuthenticationError:
        return True


def var_readable(stack: Any) -> bool:
    var = ROOT / "var"
    private = stat.S_IMODE(var.stat().st_mode) == 0o700
    return private and all(stat.S_IMODE((var / f).stat().st_mode) == 0o600
                           for f in ("run.json", "flower-password", "user-token-secret")
                           if (var / f).exists())


def node_url_any_host(stack: Any) -> bool:
    cfg = stack.cfg.with_overrides(node_url_ports=(8765,))
    node_id, now = f"n-url-{uuid.uuid4().hex[:6]}", time.time()
    stack.state.add_node({"id": node_id, "home": "us-west", "region": "us-west",
                          "provider": "local", "model": "miku", "version": "1",
                          "state": "booting", "requested_at": now, "deadline": now + 60,
                          "capacity": 4, "price_per_hour": "1.10"})
    token = membership.join_token_for(stack.state, cfg, node_id)
    try:
        membership.join(stack.state, cfg, token, "ws://10.0.0.1:6379/ws", now)
        return False
    except JoinError:
        return True


ATTACKS: dict[str, Callable[[Any], bool]] = {
    "stream_takeover": stream_takeover, "bill_anyone": bill_anyone,
    "billing_stops_for_everyone": billing_stops_for_everyone,
    "bad_report_fails_others": bad_report_fails_others,
    "lying_node_not_drained": lying_node_not_drained,
    "slow_sockets_freeze_the_webapp": slow_sockets_freeze, "flower_open": flower_open,
    "cross_site_lobby": cross_site_lobby, "dev_users_in_a_deployment": dev_users_deployed,
    "redis_without_password": redis_open, "var_files_readable": var_readable,
    "node_url_names_any_host": node_url_any_host,
}


def run_all(stack: Any) -> dict[str, bool]:
    out = {name: bool(attack(stack)) for name, attack in ATTACKS.items()}
    out["ticket_replay"], out["ticket_in_node_log"] = ticket_replay_and_logs(stack)
    return out
