"""Faults bench (issue 20): the control plane's own faults, each injected into a real stack
while page-like users stream through it; what users hear and what is billed.

    python bench/faults.py [--load-s 2] [--boot-s 1] [--json]

Two stacks, one after the other, each `voicectl run` in a temporary folder (webapp under
gunicorn with 2 gevent workers, the provisioning Celery worker with beat, the billing
worker, Flower, local-driver nodes), MODEL_LOAD_SECONDS=--load-s, the local provider's
boot_s=--boot-s, users named by ?user= (VOICE_DEV_USERS=1). The users are
bench/faults_clients.py: they stream 20 ms frames in real time and behave as the page
does (a 1.5 s no-audio watchdog, resume with backoff, make-before-break moves).

1. The main stack: embedded Redis; billing in PostgreSQL (a database of its own on the
   machine's server, --pg-url) reached through a TCP proxy of ours that can hang (accept
   connections, forward nothing either way, then go on: a database that stops answering).
   A cold user below is a user of a model in a local region where no node of that model
   is (`cold_pool`): lobby opened to `ready`. The faults, in this order:
   - `webapp_killed_waiting_resume_s`: a user waits in a region whose quota is 0
     (`nowhere`); the gunicorn worker holding that lobby's socket is SIGKILLed; the user
     resumes as the page does (1 s after the lobby closed, `resume=` the session id of its
     `queued`). Kill to `queued` again in the same session.
   - `clock_skew_refused_tickets`: two own machines (`voicectl byo-token`, the `byo`
     driver) run real nodes with `--clock-skew-s 120` and `-120`; two users per node open the
     lobby while it loads and are placed the moment it is ready, stream 12 s; node streams
     closed 4401 (or refused at start) are counted.
   - Then 4 users stream on miku in us-west and 4 on teto in us-east, each model's live
     version a pass-through package pushed for the bench whose model call a file turns
     slow or stalled, one node at a time (its pid names the file).
   - `cold_user_s_baseline`: a cold user, everything healthy, just before:
   - `db_hung_cold_user_s`: the database hangs for --db-hang-s (90 s); 3 s in, a cold user
     arrives. `db_hung_healthz`, `db_hung_api_usage`: what /healthz and /api/usage, asked
     then, answered and how long they took.
   - `slow_node_moved_s`: the busiest teto node's model then answers 50-100 ms late: each
     processing turn, at most once per 20 ms of work, first waits U(50, 100) ms, so an
     answer is 0-100 ms late (a client's round trip p95 about 80 ms, `slow_node_rtt_ms_p95`;
     the node could keep up); per user on it, from then until its stream moved
     (make-before-break done) or resumed elsewhere; the worst. `slow_node_drained_s`: until
     the control plane marked it suspect; `slow_node_move_notices`: the `move` notices and
     what came of them.
   - `model_stall_gap_s`: at second 45-50 of a minute, the busiest miku node's model call
     blocks 25 s (its heartbeats go on, the stall crosses the minute); per user on it, the
     longest time between two answers (any node); the worst.
   The stall and the slow node happen while the database still hangs (it matters only to
   billing, which must come out right when it is back); the cold user is measured first.
   - `worker_killed_cold_user_s` (last: when the kill catches the scale lease, boots stop
     for its TTL): a cold user; the provisioning Celery worker (with its beat) is SIGKILLed
     as soon as the node for it is recorded `requested` (`worker_killed_holding_scale_lease`
     says whether the dead worker held the autoscaler's lease; `..._region_marked_down_at_s`
     when its region was seen marked down, as in an outage); `voicectl run` restarts it.
2. The Sentinel stack: Redis as a primary, a replica and three sentinels (tests/sentinels.py:
   Debian's redis-server and redis-sentinel, down-after 1 s), REDIS_URL=sentinel://...,
   SQLite billing; 4 users stream on miku in us-west; the primary is SIGKILLed.
   `redis_failover_gap_s`: the later of `redis_failover_lobby_back_s` (the first of fresh
   lobby attempts, 0.25 s apart, to get `ready`) and `redis_failover_heartbeat_back_s`
   (a streaming node's heartbeat recorded after the kill); `redis_failover_stream_gap_s`:
   the longest silence a streaming user heard around it, `redis_failover_drops` its drops.

Over both: `billing_error_s_max`, per user |seconds billed (usage_minutes, once settlement
stopped changing) - frames answered x 20 ms|, the worst user; `lost_sessions` (resumes
refused or answered with another session, drops never resumed); `orphans` (processes of the
runs alive after `voicectl run` stopped: every descendant seen, the node VMs, anything
naming its ports, the bench's own nodes). A figure that cannot be measured is null with a
`<key>_note` saying why.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil
import websockets.sync.client

from provisioner.state.keys import flight_key, node_key
from voicectl import procs

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(os.path.dirname(BENCH), "tests"))
from chaos import settle  # noqa: E402
from connect import log  # noqa: E402
from faults_clients import FRAME_S, Loop, User  # noqa: E402
from faults_stack import (  # noqa: E402
    SLOW_S,
    STALL_S,
    USERS_PER_FAULT,
    FaultStack,
    HangingProxy,
    ask,
    booted_for,
    busiest,
    cold_pool,
    cold_user,
    fleet_config,
    pct,
    pg_database,
    push_faulty,
    since_lobby,
    streaming,
    wait,
)
from report import report  # noqa: E402


def worker_killed(loop: Loop, stack: FaultStack, tag: str,
                  timeout_s: float = 130.0) -> tuple[dict[str, Any], User]:
    model, region = cold_pool(stack)
    log(f"worker killed: a cold user ({model} in {region}); kill -9 the provisioning worker "
        "as soon as its node is requested ...")
    worker = stack.child("provision@")
    known = set(stack.state.node_ids())
    u = loop.start(User(stack.ws_url, f"faults-{tag}-worker", f"model={model}&region={region}"))

    def requested() -> Any:   # cheap: new ids, then only their home
        for node_id in set(stack.state.node_ids()) - known:
            known.add(node_id)
            if stack.state.r.hget(node_key(node_id), "home") == region:
                return stack.state.node(node_id)
        return None
    node = wait(requested, 30, 0.002)
    out: dict[str, Any] = {}
    if node is None or worker is None:
        out["worker_killed_cold_user_s_note"] = ("no node was requested for the cold user"
                                                 if node is None else "no provisioning worker")
    else:
        lease = bool(stack.state.r.exists(flight_key("scale")))
        worker.kill()
        out["worker_killed_node_state_at_kill"] = node.state.value
        out["worker_killed_holding_scale_lease"] = lease
        log(f"killed the provisioning worker (pid {worker.pid}) with node {node.id} "
            f"{node.state.value}{' and the scale lease held' if lease else ''}")
    down: list[float] = []   # when the cold user's region was seen marked down (an outage)

    def served() -> bool:
        if not down and region in stack.state.regions_down(time.time()):
            down.append(time.monotonic() - u.first_lobby if u.first_lobby else 0.0)
        return bool(u.first_answer)
    if wait(served, timeout_s, 0.05):
        out["worker_killed_user_booted_for"] = booted_for(stack, u)
        time.sleep(2.0)
    out["worker_killed_region_marked_down_at_s"] = round(down[0], 1) if down else None
    u.stop()
    out["worker_killed_cold_user_s"] = since_lobby(u)
    out["worker_killed_placed"] = [f"{n} in {r}" for _, n, r in u.placed][:3]
    if u.first_ready is None:
        out["worker_killed_cold_user_s_note"] = (
            f"not ready {timeout_s:g} s after the kill; told: "
            + ", ".join(sorted({m.get("note", m["type"])[:100] for _, m in u.queued})))
    return out, u


def webapp_killed(stack: FaultStack, tag: str) -> dict[str, Any]:
    log("webapp killed: a user waits (quota 0); kill -9 the gunicorn worker holding its "
        "lobby ...")
    user = f"faults-{tag}-waiting"
    query = f"{stack.ws_url}/ws/session?user={user}&model=kaito&region=nowhere"
    out: dict[str, Any] = {"webapp_killed_waiting_resume_s": None}
    with websockets.sync.client.connect(query, compression=None, open_timeout=10) as ws:
        queued = json.loads(ws.recv(timeout=10))
        if queued.get("type") != "queued":
            out["webapp_killed_waiting_resume_s_note"] = f"the user did not wait: {queued}"
            return out
        here = ws.socket.getsockname()[1]
        master = stack.child("gunicorn")
        holder = None
        for worker in master.children() if master else []:
            with suppress(psutil.Error):
                if any(c.raddr and c.raddr.port == here for c in worker.net_connections("tcp")):
                    holder = worker
        if holder is None:
            out["webapp_killed_waiting_resume_s_note"] = "no gunicorn worker holds the lobby"
            return out
        holder.kill()
        killed = time.monotonic()
        with suppress(Exception):
            while True:
                ws.recv(timeout=10)
        seen = time.monotonic()
    out["webapp_killed_lobby_closed_s"] = round(seen - killed, 3)
    # the page: the lobby lost while holding a session -> nodeLost -> resume 1, 2, 4 s later
    session, answer, refusals = queued["session_id"], None, []
    for delay in (1.0, 2.0, 4.0, 8.0):
        time.sleep(max(0.0, seen + delay - time.monotonic()))
        try:
            with websockets.sync.client.connect(f"{query}&resume={session}",
                                                compression=None, open_timeout=10) as again:
                answer = json.loads(again.recv(timeout=10))
        except Exception as e:  # noqa: BLE001  a refused or failed lobby: the page retries
            answer = {"type": "error", "code": type(e).__name__}
        seen = time.monotonic()
        if answer.get("type") == "queued":
            break
        refusals.append(answer.get("code"))
    back = time.monotonic() - killed
    ok = answer is not None and answer.get("type") == "queued"
    out["webapp_killed_waiting_resume_s"] = round(back, 3) if ok else None
    out["webapp_killed_same_session"] = bool(ok and answer["session_id"] == session)
    out["webapp_killed_refusals"] = refusals
    if not ok:
        out["webapp_killed_waiting_resume_s_note"] = f"never resumed: {answer}"
    log(f"the waiting user resumed {back:.2f} s after the kill: {answer}")
    return out


def clock_skew(loop: Loop, stack: FaultStack, tag: str) -> tuple[dict[str, Any], list[User],
                                                                   list[Any]]:
    log("clock skew: own machines with clocks at +120 s and -120 s; users placed the moment "
        "they are ready ...")
    users: list[User] = []
    nodes: list[Any] = []
    ids: dict[str, str] = {}
    for region, skew in (("skew-ahead", 120.0), ("skew-behind", -120.0)):
        known = {n.id for n in stack.state.nodes()}
        said = stack.voicectl("byo-token", "--region", region, "--model", "robot", "--json")
        token = json.loads(said.splitlines()[-1])["token"]
        nodes.append(procs.spawn([sys.executable, "-m", "worker_node", "--join",
                                  f"http://127.0.0.1:{stack.port}", "--token", token,
                                  "--clock-skew-s", str(skew), "--drain-s", "1"],
                                 env={"PATH": os.environ["PATH"]},
                                 log=stack.tmp / f"byo-{region}.log"))
        rec = wait(lambda known=known, region=region: next(
            (n for n in stack.state.nodes() if n.id not in known and n.region == region),
            None), 30, 0.02)
        if rec is not None:
            ids[region] = rec.id
        users += [loop.start(User(stack.ws_url, f"faults-{tag}-{region}-{i}",
                                  f"model=robot&region={region}")) for i in range(2)]
    streaming(users, 30)
    placed = sum(u.node in ids.values() for u in users)
    time.sleep(12.0)
    for u in users:
        u.stop()
    refused = sum(u.refused_tickets for u in users)
    out: dict[str, Any] = {"clock_skew_refused_tickets": refused,
                           "clock_skew_users_on_skewed_nodes": f"{placed}/{len(users)}",
                           "clock_skew_streamed_s": round(sum(u.answered for u in users)
                                                          * FRAME_S, 1)}
    if placed < len(users):
        out["clock_skew_refused_tickets_note"] = (f"only {placed} of {len(users)} users were "
                                                  "placed on the skewed nodes")
    log(f"clock skew: {refused} tickets refused, {placed}/{len(users)} users on skewed nodes")
    return out, users, nodes


def slow_node(stack: FaultStack, users: list[User], trigger: Path) -> dict[str, Any]:
    node = busiest(users)
    if node is None:
        return {"slow_node_moved_s": None,
                "slow_node_moved_s_note": "no teto node was streaming"}
    on = [u for u in users if u.streaming_on() == node]
    Path(f"{trigger}-{stack.node_pid(node)}").write_text(f"slow {SLOW_S}")
    t0 = time.monotonic()
    log(f"slow node: {node} ({len(on)} users) answers 50-100 ms late from now")

    def moved(u: User) -> float | None:
        for m in u.moves:
            if m["from"] == node and m.get("done") and m["notice"] >= t0:
                return float(m["done"]) - t0
        for d in u.drops:   # no move: left through a drop, back once another node answers
            if d["node"] == node and d["t"] >= t0:
                after = [t for t in u.answers if t > d["t"]]
                return after[0] - t0 if after and u.node != node else None
        return None

    suspect = wait(lambda: (r := stack.state.node(node)) is not None and r.suspect, 25, 0.05)
    detected = time.monotonic() - t0 if suspect else None
    wait(lambda: all(moved(u) is not None for u in on), max(5.0, t0 + 25.0 - time.monotonic()),
         0.1)
    times = [moved(u) for u in on]
    rtts = [r * 1000 for u in on for t, n, r in u.rtt if n == node and t > t0 + 0.5]
    out = {"slow_node_moved_s": (round(max(t for t in times if t is not None), 3)
                                 if times and all(t is not None for t in times) else None),
           "slow_node_users": len(on),
           "slow_node_users_moved": sum(t is not None for t in times),
           "slow_node_move_notices": [f"{n['t'] - t0:.2f} s: {n['outcome']}" for u in on
                                      for n in u.notices if n["from"] == node],
           "slow_node_left_by": [d["why"] for u in on for d in u.drops
                                 if d["node"] == node and d["t"] >= t0],
           "slow_node_moves_make_before_break": sum(
               any(m["from"] == node and m.get("done") for m in u.moves) for u in on),
           "slow_node_rtt_ms_p50": pct(rtts, 50), "slow_node_rtt_ms_p95": pct(rtts, 95),
           "slow_node_drained_s": round(detected, 3) if detected is not None else None,
           "slow_node_suspect": suspect or ""}
    if out["slow_node_moved_s"] is None:
        out["slow_node_moved_s_note"] = (f"{out['slow_node_users_moved']} of {len(on)} users "
                                         "left the slow node within 25 s")
    log(f"slow node: moved {times}, rtt p95 {out['slow_node_rtt_ms_p95']} ms, "
        f"suspect {out['slow_node_suspect']!r}")
    return out


def model_stall(stack: FaultStack, users: list[User], trigger: Path) -> dict[str, Any]:
    while not 45 <= time.time() % 60 < 50:   # 25 s from here crosses a minute
        time.sleep(0.1)
    node = busiest(users)
    if node is None:
        return {"model_stall_gap_s": None, "model_stall_gap_s_note": "no miku node streamed"}
    on = [u for u in users if u.streaming_on() == node]
    Path(f"{trigger}-{stack.node_pid(node)}").write_text(f"stall {STALL_S}")
    t0, wall = time.monotonic(), time.time()
    log(f"model stall: {node} ({len(on)} users) blocks {STALL_S:g} s from "
        f"{time.strftime('%H:%M:%S', time.localtime(wall))}")
    suspect = wait(lambda: (r := stack.state.node(node)) is not None and r.suspect, 10, 0.1)
    detected = time.monotonic() - t0 if suspect else None
    time.sleep(max(0.0, t0 + STALL_S + 8.0 - time.monotonic()))
    gaps = [u.longest_gap(since=t0 - 2.0) for u in on]
    left = [d for u in on for d in u.drops if d["node"] == node and d["t"] >= t0]
    back = [min([t for t in u.answers if t > d["t"]], default=float("nan")) - d["t"]
            for u in on for d in u.drops if d["node"] == node and d["t"] >= t0]
    out = {"model_stall_gap_s": round(max(gaps), 3) if gaps else None,
           "model_stall_users": len(on),
           "model_stall_user_gaps_s": [round(g, 3) for g in gaps],
           "model_stall_started": time.strftime("%H:%M:%S", time.localtime(wall)),
           "model_stall_left_s": [round(d["t"] - t0, 3) for d in left],
           "model_stall_resumed_after_leaving_s": [round(b, 3) for b in back],
           "model_stall_drained_s": round(detected, 3) if detected is not None else None,
           "model_stall_suspect": suspect or "",
           "model_stall_closed_4400": sum(u.closes.get("4400", 0) for u in on)}
    log(f"model stall: gaps {out['model_stall_user_gaps_s']}, drained after "
        f"{out['model_stall_drained_s']} s ({suspect!r})")
    return out


# --- the runs -----------------------------------------------------------------------------

def main_stack(loop: Loop, args: argparse.Namespace, tag: str, tmp: Path
               ) -> tuple[dict[str, Any], list[User], str | None, list[str]]:
    out: dict[str, Any] = {}
    users: list[User] = []
    db_name = f"faults_{tag}"
    admin = args.pg_url
    try:
        pg_database(admin, db_name)
        host_port = admin.split("@", 1)[1].split("/", 1)[0]
        upstream = (host_port.rsplit(":", 1)[0], int(host_port.rsplit(":", 1)[1]))
        proxy: HangingProxy | None = HangingProxy(upstream)
        user_part = admin.split("://", 1)[1].split("@", 1)[0]
        stack_db = f"postgresql+psycopg://{user_part}@127.0.0.1:{proxy.port}/{db_name}"
        direct_db = f"postgresql+psycopg://{user_part}@{host_port}/{db_name}"
    except Exception as e:  # noqa: BLE001  no PostgreSQL: the rest on SQLite
        log(f"no PostgreSQL at {admin} ({e}); billing on SQLite, no database hang")
        proxy, db_name = None, ""
        stack_db = direct_db = f"sqlite:///{tmp / 'billing.sqlite'}"
    log(f"starting the main stack: voicectl run in {tmp} (load {args.load_s:g} s, boot "
        f"{args.boot_s:g} s, billing {'PostgreSQL through a proxy' if proxy else 'SQLite'}) ...")
    stack = FaultStack(tmp, {"DATABASE_URL": stack_db, "MODEL_LOAD_SECONDS": str(args.load_s),
                             "VOICE_CONFIG": str(fleet_config(tmp, args.boot_s))})
    byo: list[Any] = []
    orphans: list[str] = []
    try:
        trigger = tmp / "trigger"
        out["faulty_versions"] = {m: push_faulty(stack, m, trigger) for m in ("miku", "teto")}

        time.sleep(5.0)   # the Celery workers start after the webapp listens
        out.update(webapp_killed(stack, tag))

        got, skewed, byo = clock_skew(loop, stack, tag)
        out.update(got)
        users += skewed

        log(f"{USERS_PER_FAULT} users stream on miku (us-west), {USERS_PER_FAULT} on teto "
            "(us-east) ...")
        stall_users = [loop.start(User(stack.ws_url, f"faults-{tag}-stall{i}",
                                       "model=miku&region=us-west"))
                       for i in range(USERS_PER_FAULT)]
        slow_users = [loop.start(User(stack.ws_url, f"faults-{tag}-slow{i}",
                                      "model=teto&region=us-east"))
                      for i in range(USERS_PER_FAULT)]
        users += stall_users + slow_users
        streaming(stall_users + slow_users)
        time.sleep(5.0)   # the warm buffer boots
        log("baseline: a cold user with the database healthy ...")
        u = cold_user(loop, stack, f"faults-{tag}-cold")
        users.append(u)
        out["cold_user_s_baseline"] = since_lobby(u)
        out["cold_user_baseline_booted_for"] = u.booted
        log(f"baseline cold user: ready in {out['cold_user_s_baseline']} s")
        hang_end = None
        if proxy is not None:
            proxy.flowing.clear()
            hung = time.monotonic()
            hang_end = hung + args.db_hang_s
            log(f"the database hangs for {args.db_hang_s:g} s ...")
            time.sleep(3.0)
            asked = [ask(stack, "/healthz", args.db_hang_s + 20, out, "db_hung_healthz"),
                     ask(stack, f"/api/usage?user=faults-{tag}-cold", args.db_hang_s + 20, out,
                         "db_hung_api_usage")]
            log("a cold user arrives while the database hangs ...")
            u = cold_user(loop, stack, f"faults-{tag}-dbcold")
            users.append(u)
            out["db_hung_cold_user_s"] = since_lobby(u)
            out["db_hung_cold_user_booted_for"] = u.booted
            out["db_hung_s"] = args.db_hang_s
            log(f"database hung: cold user ready in {out['db_hung_cold_user_s']} s")
        else:
            out["db_hung_cold_user_s"] = None
            out["db_hung_cold_user_s_note"] = f"no PostgreSQL server at {admin} to hang"
        out.update(slow_node(stack, slow_users, trigger))
        out.update(model_stall(stack, stall_users, trigger))
        for u in stall_users + slow_users:
            u.stop()
        if proxy is not None and hang_end is not None:
            time.sleep(max(0.0, hang_end - time.monotonic()))
            proxy.flowing.set()
            log("the database answers again")
            for t in asked:
                t.join(25.0)
        # last: a kill that catches the scale lease stops boots in its region for minutes
        got, u = worker_killed(loop, stack, tag)
        out.update(got)
        users.append(u)
        log(f"worker killed: cold user ready in {out['worker_killed_cold_user_s']} s")
        log("waiting for settlement ...")
        time.sleep(4.0)   # the last beats of closed streams
        billed = settle(direct_db, [u.user for u in users], timeout_s=60.0)
        out["main_billed"] = billed
        for p in byo:
            procs.stop([p], timeout_s=10)
    finally:
        log("stopping the main stack and looking for orphans ...")
        orphans = stack.stop()
        for p in byo:
            if p.poll() is None:
                orphans.append(f"{p.pid} byo node")
                p.kill()
        if proxy is not None:
            proxy.close()
            with suppress(Exception):
                pg_database(admin, db_name, drop=True)
    return out, users, direct_db, orphans


def redis_failover(loop: Loop, args: argparse.Namespace, tag: str, tmp: Path
                   ) -> tuple[dict[str, Any], list[User], list[str]]:
    from sentinels import SENTINEL, sentinel_redis

    if SENTINEL is None:
        return ({"redis_failover_gap_s": None,
                 "redis_failover_gap_s_note": "Debian's redis-sentinel is not installed"},
                [], [])
    out: dict[str, Any] = {}
    with sentinel_redis(tmp / "sentinels") as deployment:
        db = f"sqlite:///{tmp / 'billing.sqlite'}"
        log("starting the Sentinel stack: a primary, a replica, three sentinels, voicectl run "
            "on REDIS_URL=sentinel://... ...")
        (tmp / "stack").mkdir()
        stack = FaultStack(tmp / "stack", {
            "REDIS_URL": deployment.url, "DATABASE_URL": db,
            "MODEL_LOAD_SECONDS": str(args.load_s),
            "VOICE_CONFIG": str(fleet_config(tmp, args.boot_s))})
        users: list[User] = []
        try:
            users = [loop.start(User(stack.ws_url, f"faults-{tag}-ha{i}",
                                     "model=miku&region=us-west"))
                     for i in range(USERS_PER_FAULT)]
            streaming(users)
            time.sleep(5.0)
            node = busiest(users)
            stack.state.r.execute_command("WAIT", 1, 1000)
            deployment.primary.kill()
            killed, killed_wall = time.monotonic(), time.time()
            log("killed the Redis primary; probing the lobby and the heartbeats ...")
            beat_back = lobby_back = None
            probe = f"{stack.ws_url}/ws/session?user=faults-{tag}-probe&model=miku&region=us-west"
            while time.monotonic() - killed < 30 and (beat_back is None or lobby_back is None):
                if lobby_back is None:
                    try:
                        with websockets.sync.client.connect(probe, open_timeout=2) as ws:
                            while (m := json.loads(ws.recv(timeout=3)))["type"] not in (
                                    "ready", "error"):
                                pass
                        if m["type"] == "ready":
                            lobby_back = time.monotonic() - killed
                    except Exception:  # noqa: BLE001, S110  not back yet
                        pass
                if beat_back is None and node is not None:
                    with suppress(Exception):
                        rec = stack.state.node(node)
                        if rec is not None and rec.last_seen > killed_wall:
                            beat_back = time.monotonic() - killed
                time.sleep(0.25)
            time.sleep(max(0.0, killed + 15.0 - time.monotonic()))
            gaps = [u.longest_gap(since=killed - 1.0) for u in users]
            drops = sum(1 for u in users for d in u.drops if d["t"] > killed - 1.0)
            for u in users:
                u.stop()
            out.update({
                "redis_failover_gap_s": (round(max(lobby_back, beat_back), 3)
                                         if lobby_back is not None and beat_back is not None
                                         else None),
                "redis_failover_lobby_back_s": round(lobby_back, 3) if lobby_back else None,
                "redis_failover_heartbeat_back_s": round(beat_back, 3) if beat_back else None,
                "redis_failover_stream_gap_s": round(max(gaps), 3) if gaps else None,
                "redis_failover_drops": drops,
                "redis_failover_primary_now": deployment.current_primary(),
                "redis_failover_primary_was": deployment.primary_port})
            if out["redis_failover_gap_s"] is None:
                out["redis_failover_gap_s_note"] = "the lobby or the heartbeats not back in 30 s"
            log(f"failover: lobby back {lobby_back} s, heartbeats back {beat_back} s, "
                f"streams' longest silence {max(gaps) if gaps else None} s, {drops} drops")
            time.sleep(4.0)
            out["ha_billed"] = settle(db, [u.user for u in users], timeout_s=45.0)
        finally:
            log("stopping the Sentinel stack and looking for orphans ...")
            orphans = stack.stop()
    return out, users, orphans


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load-s", type=float, default=2.0, help="MODEL_LOAD_SECONDS")
    p.add_argument("--boot-s", type=float, default=1.0, help="the local provider's boot_s")
    p.add_argument("--db-hang-s", type=float, default=90.0)
    p.add_argument("--pg-url", default=os.environ.get(
        "FAULTS_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL server where the bench may create a database (FAULTS_PG_URL)")
    p.add_argument("--skip-failover", action="store_true", help="the main stack only")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    tag = f"{int(time.time()) % 100000}{random.randint(0, 99):02d}"
    began = time.monotonic()
    loop = Loop()
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "main").mkdir()
        out, users, _, orphans = main_stack(loop, args, tag, tmp / "main")
        billed = out.pop("main_billed", {})
        if not args.skip_failover:
            (tmp / "ha").mkdir()
            ha, ha_users, ha_orphans = redis_failover(loop, args, tag, tmp / "ha")
            billed.update(ha.pop("ha_billed", {}))
            out.update(ha)
            users += ha_users
            orphans += ha_orphans
        else:
            out["redis_failover_gap_s"] = None
            out["redis_failover_gap_s_note"] = "--skip-failover"
    errors = {u.user: round(abs(billed.get(u.user, 0.0) - u.answered * FRAME_S), 3)
              for u in users}
    unresumed = sum(1 for u in users for d in u.drops if not any(t > d["t"] for t in u.answers))
    refused = sum(u.refused_resumes for u in users)
    load, boot = args.load_s, args.boot_s
    figures: dict[str, Any] = {
        "model_stall_gap_s": out.pop("model_stall_gap_s", None), "model_stall_gap_s_target": 3,
        "slow_node_moved_s": out.pop("slow_node_moved_s", None), "slow_node_moved_s_target": 10,
        "db_hung_cold_user_s": out.pop("db_hung_cold_user_s", None),
        "cold_user_s_baseline": out.pop("cold_user_s_baseline", None),
        "db_hung_cold_user_s_bound": round(load + boot + 3, 3),
        "worker_killed_cold_user_s": out.pop("worker_killed_cold_user_s", None),
        "worker_killed_cold_user_s_bound": round(load + boot + 10, 3),
        "webapp_killed_waiting_resume_s": out.pop("webapp_killed_waiting_resume_s", None),
        "webapp_killed_waiting_resume_s_target": 3,
        "clock_skew_refused_tickets": out.pop("clock_skew_refused_tickets", None),
        "clock_skew_refused_tickets_target": 0,
        "redis_failover_gap_s": out.pop("redis_failover_gap_s", None),
        "redis_failover_gap_s_target": 10,
        "billing_error_s_max": max(errors.values()) if errors else None,
        "billing_error_s_target": 2,
        "lost_sessions": refused + unresumed, "orphans": len(orphans),
        "model_load_s": load, "vm_boot_s": boot,
        **out,
        "billing_errors_s": errors,
        "billed_s_total": round(sum(billed.values()), 2),
        "streamed_s_total": round(sum(u.answered for u in users) * FRAME_S, 2),
        "resumes_refused": refused, "drops_unresumed": unresumed,
        "drops": sum(len(u.drops) for u in users), "moves": sum(len(u.moves) for u in users),
        "page_would_give_up": [f"{u.user}: {g}" for u in users for g in u.page_gave_up][:10],
        "orphan_processes": orphans[:10],
        "run_s": round(time.monotonic() - began, 1),
    }
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
