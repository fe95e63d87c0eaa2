"""Chaos benchmark: N real-time clients stream through the whole local stack for M minutes
while nodes crash, a region dies, the Celery worker and Redis are killed; invariants are
checked throughout and billed seconds are compared with streamed ones at the end.

    python bench/chaos.py [--minutes 10] [--clients 8] [--crash-rate 0.3] [--load-s 2] [--json]

The stack is `voicectl run` (embedded Redis with its append-only file, SQLite billing, the
local cloud driver) in a temporary folder, with VOICE_DEV_USERS=1, MODEL_LOAD_SECONDS and
CRASH_RATE (each node's chance to crash in a given minute). The clients run in a process
of their own (they stand for browsers elsewhere): each opens the lobby (half in us-west,
half in us-east), streams 20 ms frames of 16-bit PCM at 16 kHz at real-time pace to the
node named by `ready`, and after any close or error resumes through the lobby with
`resume=SESSION` (docs/protocol.md). Faults, at fixed fractions of the run (the last fifth
is calm, so every drop has time to resume): `voicectl kill-node` on the busiest node
(15%), kill -9 of the Celery worker with its beat (30%), `voicectl kill-region` on the
busiest region (45%), kill -9 of the embedded Redis (65%); crashes from CRASH_RATE come
throughout.

Figures:
- `crashes`: node processes that died without being retired first (CRASH_RATE, kill-node,
  kill-region), seen by polling each VM's pid every 0.05 s; `crash_causes` splits them.
- `detect_s_max`: crash to the first sign in Redis that the control plane knows: a
  client's resume reported the node lost, or the reaper marked it dead or removed it
  (`detected_by` counts which; `detect_s_max_reaper` is the worst the reaper alone did).
- `sessions_affected`: sessions whose stream dropped at least once; `drops` counts drops.
- `resumed_fraction`, `resume_s_p50`, `resume_s_p95`: drops followed by audio flowing
  again in the same session, and the seconds from the client seeing the drop to the first
  answered frame after it; `resumed_within_2s_fraction` of all drops. The target (95%
  within 2 s) holds "with warm capacity": `warm_drops` are the drops resumed on a node that
  was already serving when the stream dropped (no boot was waited for), and
  `resumed_within_2s_fraction_warm`, `resume_s_p95_warm` are theirs.
- `lost_sessions`: sessions whose resume was refused (the client had to start a new one),
  plus drops still not resumed 60 s after they happened when the run ended.
- `invariant_violations`: distinct breaches seen by the checker (every 0.25 s, reading
  Redis through provisioner.state): more slots taken on a node than its capacity, a
  negative or shrinking usage counter, a fencing token going back, two live sessions of
  one user on live nodes; and at the end, a lock or a live slot still held by a client
  that stopped (`leaked_locks`, `leaked_slots`). `violations` lists the first ten.
- `billing_error_s_max`: per client, |seconds billed (usage_minutes, as `voicectl usage`
  reads it, once settlement stopped changing) - seconds streamed (frames the node
  answered, 20 ms each)|, the worst client; `billing_error_s_per_drop_max` divides each
  client's by the drops it went through (the tolerance is per crash).
- `orphans`: processes of the run (every descendant of `voicectl run` seen during it, every
  node VM, anything naming its ports) still alive after `voicectl run` stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import redis
import websockets

from billing.ledger import Ledger, day_totals
from provisioner.local_driver import pid_alive
from provisioner.state import State, connect, fence_key
from provisioner.states import NodeState
from voicectl import procs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from connect import log  # noqa: E402
from report import report  # noqa: E402

RATE, FRAME_S = 16000, 0.02
MODEL = "miku"
# Clients say where they are, as the page does when nobody picks a region: the control plane
# chooses the region and may move them (a user who names one with region= pins it, and
# waits there through an outage).
LOCATIONS = {"us-west": (37.7, -122.3), "us-east": (38.9, -77.4)}
FAULTS = ((0.15, "kill-node"), (0.30, "celery-worker"), (0.45, "kill-region"),
          (0.65, "redis"))
LOST_AFTER_S = 60.0     # a drop not resumed this long before the end is a lost session
CHECK_S, DEATH_S = 0.25, 0.05   # invariants; node pids and the control plane's detection
VOICECTL = [sys.executable, "-m", "voicectl"]


# --- clients (their own process) -------------------------------------------------------

def _frame() -> bytes:
    t = np.arange(int(RATE * FRAME_S)) / RATE
    return (6000 * np.sin(2 * np.pi * 150.0 * t)).astype("<i2").tobytes()


async def _lobby(ws_url: str, query: str) -> dict[str, Any]:
    """Open the lobby and read until `ready` or `error`."""
    async with websockets.connect(f"{ws_url}/ws/session?{query}", compression=None,
                                  open_timeout=10, close_timeout=1) as ws:
        async for raw in ws:
            msg = json.loads(raw)
            if msg["type"] in ("ready", "error"):
                return dict(msg)
    raise ConnectionError("the lobby closed without ready or error")


async def _stream(ready: dict[str, Any], c: dict[str, Any], end_at: float) -> str:
    """Stream real-time frames to the node until `end_at` (then stop: "end") or until the
    stream breaks (a reason). Counts answered frames in c["answered"]."""
    frame = _frame()
    async with websockets.connect(f"{ready['node_url']}?ticket={ready['ticket']}",
                                  compression=None, open_timeout=5, close_timeout=1) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": RATE}))
        started = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if started.get("type") != "started":
            return f"refused by node: {started}"

        async def read() -> None:
            async for msg in ws:
                if isinstance(msg, bytes):
                    c["answered"] += 1
                    drop = c["drops"][-1] if c["drops"] else None
                    if drop and drop["t_streaming"] is None:
                        drop["t_streaming"] = time.time()

        reader = asyncio.create_task(read())
        next_t = time.monotonic()
        try:
            while time.time() < end_at and not reader.done():
                await ws.send(frame)
                next_t = max(next_t + FRAME_S, time.monotonic() - 0.2)  # no burst after a stall
                await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            if reader.done():
                reader.result()      # raises what broke it
                return f"closed {ws.close_code}"
            await ws.send(json.dumps({"type": "stop"}))
            await asyncio.wait_for(reader, 5)   # the node answers the rest, then closes 1000
            c["stopped_clean"] = ws.close_code == 1000
            return "end"
        finally:
            reader.cancel()


async def _client(i: int, ws_url: str, tag: str, end_at: float) -> dict[str, Any]:
    near = list(LOCATIONS)[i % len(LOCATIONS)]
    lat, lon = LOCATIONS[near]
    c: dict[str, Any] = {"user": f"chaos-{tag}-{i}", "near": near, "answered": 0,
                         "sessions": [], "drops": [], "refused_resumes": 0, "errors": Counter(),
                         "stopped_clean": False}
    session: str | None = None
    while time.time() < end_at:
        query = f"user={c['user']}&model={MODEL}&lat={lat}&lon={lon}"
        if session:
            query += f"&resume={session}"
        try:
            msg = await asyncio.wait_for(_lobby(ws_url, query), max(1.0, end_at - time.time()))
        except (TimeoutError, OSError, ValueError, websockets.WebSocketException) as e:
            c["errors"][f"lobby {type(e).__name__}"] += 1
            await asyncio.sleep(0.5)
            continue
        if msg["type"] == "error":
            c["errors"][f"lobby {msg['code']}"] += 1
            if session and msg["code"] == "bad_request":   # "not a session of user": lost
                log(f"client {i}: resume of {session} refused ({msg['message']}); new session")
                c["refused_resumes"] += 1
                session = None
            await asyncio.sleep(0.5)
            continue
        if session is not None and msg["session_id"] != session:   # resumed as another: lost
            log(f"client {i}: resume of {session} answered with session {msg['session_id']}")
            c["refused_resumes"] += 1
        if session is None or msg["session_id"] != session:
            session = msg["session_id"]
            c["sessions"].append(session)
        drop = c["drops"][-1] if c["drops"] else None
        if drop and drop["t_ready"] is None:
            drop["t_ready"] = time.time()
        if drop and drop["t_streaming"] is None:
            drop["resumed_on"] = msg["node_id"]
        try:
            why = await _stream(msg, c, end_at)
        except (TimeoutError, OSError, ValueError, websockets.WebSocketException) as e:
            why = f"{type(e).__name__}: {e}"[:80]
        if why == "end":
            break
        if not c["drops"] or c["drops"][-1]["t_streaming"] is not None:   # a new drop
            c["drops"].append({"session": session, "node": msg["node_id"], "why": why,
                               "t_drop": time.time(), "t_ready": None, "t_streaming": None})
            log(f"client {i}: stream on {msg['node_id']} dropped ({why}); resuming")
        await asyncio.sleep(0.05)
    c["t_end"] = time.time()
    c["errors"] = dict(c["errors"])
    return c


def run_clients(ws_url: str, n: int, tag: str, end_at: float) -> list[dict[str, Any]]:
    async def everyone() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(_client(i, ws_url, tag, end_at) for i in range(n))))

    return asyncio.run(everyone())


# --- the stack, its processes and the faults -------------------------------------------

class Stack:
    """`voicectl run` in `tmp`, its log followed (progress lines), its processes recorded."""

    def __init__(self, tmp: Path, load_s: float, crash_rate: float) -> None:
        self.tmp, self.port = tmp, procs.free_port()
        self.db_url = f"sqlite:///{tmp / 'billing.sqlite'}"
        self.env = {**os.environ, "MODEL_LOAD_SECONDS": str(load_s),
                    "CRASH_RATE": str(crash_rate), "VOICE_DEV_USERS": "1",
                    "DATABASE_URL": self.db_url}
        self.env.pop("REDIS_URL", None)
        self.logfile = tmp / "voicectl-run.log"
        self.lines: list[str] = []
        self.seen: dict[int, tuple[float, str]] = {}    # pid -> (create_time, cmdline)
        self.proc = procs.spawn(VOICECTL + ["run", "--port", str(self.port), "--flower-port",
                                            str(procs.free_port()), "--data", str(tmp / "redis")],
                                env=self.env, log=self.logfile)
        self._done = threading.Event()
        threading.Thread(target=self._follow, daemon=True).start()
        self.redis_url = self._wait_line("Redis ready at").rsplit(" ", 1)[1].strip()
        self._wait_line("open http://")
        self.env["REDIS_URL"] = self.redis_url     # for voicectl kill-node / kill-region

    def _follow(self) -> None:
        with open(self.logfile, errors="replace") as f:
            while not self._done.is_set():
                line = f.readline()
                if not line:
                    time.sleep(0.1)
                    continue
                self.lines.append(line)
                if any(w in line for w in ("exited", "restarted", "killed", "stopp", "Redis")):
                    log(f"stack: {line.strip()}")

    def _wait_line(self, needle: str, timeout_s: float = 90.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines:
                if needle in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"voicectl run never said {needle!r}; see {self.logfile}")

    def record(self, extra_pids: tuple[int, ...] = ()) -> None:
        """Remember every process of the run, to look for orphans after it stopped."""
        try:
            ps = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return
        for p in [*ps, *(psutil.Process(pid) for pid in extra_pids if psutil.pid_exists(pid))]:
            try:
                self.seen.setdefault(p.pid, (p.create_time(), " ".join(p.cmdline())[:120]))
            except psutil.Error:
                pass

    def child(self, word: str) -> psutil.Process | None:
        for p in psutil.Process(self.proc.pid).children():
            try:
                if word in " ".join(p.cmdline()):
                    return p
            except psutil.Error:
                pass
        return None

    def voicectl(self, *args: str) -> str:
        out = subprocess.run(VOICECTL + list(args), env=self.env, capture_output=True,
                             text=True, timeout=60, cwd=procs.ROOT)
        return (out.stdout + out.stderr).strip()

    def stop(self) -> list[str]:
        """Stop `voicectl run` as Ctrl-C would; the processes of the run it left alive
        (which we then kill, by pid, not to leave them on a shared machine)."""
        self.record()
        self.proc.send_signal(2)   # SIGINT
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            log("voicectl run did not stop within 60 s")
        time.sleep(1.0)
        left: list[psutil.Process] = []
        for pid, (created, _) in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except psutil.Error:
                pass
        redis_port = self.redis_url.rsplit(":", 1)[1].split("/")[0]
        marks = (f"127.0.0.1:{self.port}", f"127.0.0.1:{redis_port}", f"--port {redis_port}")
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["pid"] not in self.seen and any(m in cmd for m in marks):
                left.append(p)
        found = []
        for p in left:
            try:
                found.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
                p.kill()
            except psutil.Error:
                pass
        procs.stop([self.proc], timeout_s=1)
        self._done.set()
        return found


class Watch:
    """Every CHECK_S: node deaths (and when the control plane knew) and the invariants."""

    def __init__(self, stack: Stack, users: list[str]) -> None:
        self.stack, self.users = stack, users
        self.state = State(connect(stack.redis_url))
        self.state.r.connection_pool.connection_kwargs["socket_timeout"] = 2
        self.vms: dict[str, tuple[int, str]] = {}         # node id -> (pid, started)
        self.records: dict[str, Any] = {}                 # node id -> last NodeRecord
        self.ready_at: dict[str, float] = {}              # node id -> first seen serving
        self.deaths: dict[str, dict[str, Any]] = {}       # node id -> death
        self.injected: dict[str, str] = {}                # node id -> fault that killed it
        self.violations: dict[tuple[str, str], dict[str, Any]] = {}
        self.counters: dict[tuple[int, str], float] = {}
        self.fences: dict[str, int] = {}
        self.session_user: dict[str, str] = {}
        self.redis_errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def violate(self, kind: str, key: str, detail: str) -> None:
        if (kind, key) not in self.violations:
            log(f"INVARIANT VIOLATED: {kind} {key}: {detail}")
            self.violations[kind, key] = {"kind": kind, "key": key, "detail": detail,
                                          "t": time.time()}

    def _run(self) -> None:
        """Pids and detection every DEATH_S (cheap), the invariants every CHECK_S."""
        n = 0
        while not self._stop.wait(DEATH_S):
            now = time.time()
            n += 1
            try:
                self._deaths(now)
                if n % round(CHECK_S / DEATH_S) == 0:
                    self._check(now)
            except redis.RedisError:
                self.redis_errors += 1
            if n % round(2.0 / DEATH_S) == 0:
                self.stack.record(tuple(pid for pid, _ in self.vms.values()))

    def _deaths(self, now: float) -> None:
        for node_id, (pid, started) in self.vms.items():
            if node_id in self.deaths or pid_alive(pid, started):
                continue
            rec = self.records.get(node_id)
            cause = self.injected.get(node_id) or (
                "stopped" if rec is not None and rec.retired else "crash_rate")
            self.deaths[node_id] = {"t": now, "cause": cause, "detected": None}
            if cause != "stopped":
                log(f"node {node_id} died ({cause})")
        for node_id, d in self.deaths.items():
            if d["detected"] is None:
                rec = self.state.node(node_id)
                if rec is None or rec.state == NodeState.DEAD or rec.reported_lost:
                    d["detected"] = now
                    d["by"] = "client" if rec is not None and rec.reported_lost else "reaper"

    def _check(self, now: float) -> None:
        st = self.state
        for vm in st.vms():
            self.vms.setdefault(vm["name"], (int(vm["pid"]), vm.get("started", "")))
        nodes = {n.id: n for n in st.nodes()}
        self.records.update(nodes)
        timeout_s = 6.0
        live_of: dict[str, set[str]] = {}
        for rec in nodes.values():
            if rec.state == NodeState.READY:
                self.ready_at.setdefault(rec.id, rec.ready_at or now)
            if rec.sessions > rec.capacity:
                self.violate("over_capacity", rec.id, f"{rec.sessions} > {rec.capacity}")
            if rec.sessions < 0 or rec.live < 0:
                self.violate("negative_count", rec.id, f"{rec.sessions} {rec.live}")
            if rec.reported_lost or not rec.alive(now, timeout_s):
                continue
            for sid in st.live_sessions(rec.id):
                if sid not in self.session_user:
                    user = st.session(sid).get("user")
                    if user is None:
                        continue      # its record expired: whose it is cannot be told
                    self.session_user[sid] = user
                live_of.setdefault(self.session_user[sid], set()).add(sid)
        for user, sids in live_of.items():
            if len(sids) > 1:
                self.violate("two_streams", user, ",".join(sorted(sids)))
        for minute in st.dirty_minutes(now + 60, 100):
            for field, v in st.usage_counters(minute).items():
                before = self.counters.get((minute, field), 0.0)
                if v < 0 or v < before - 1e-6:
                    self.violate("usage_counter", f"{minute}|{field}", f"{before} -> {v}")
                self.counters[minute, field] = max(before, v)
        for user in self.users:
            raw = st.r.get(fence_key(user))
            if raw is not None:
                fence = int(raw)
                if fence < 0 or fence < self.fences.get(user, 0):
                    self.violate("fence", user, f"{self.fences.get(user)} -> {fence}")
                self.fences[user] = max(fence, self.fences.get(user, 0))


def inject(fault: str, stack: Stack, watch: Watch) -> str | None:
    """One fault, now; what was done (None: no target yet)."""
    if fault in ("celery-worker", "redis"):
        p = stack.child(" worker " if fault == "celery-worker" else "redis-server")
        if p is None:
            return f"{fault}: no such process to kill"
        p.kill()
        return f"kill -9 {fault} (pid {p.pid})"
    nodes = [n for n in watch.records.values() if n.id in watch.vms
             and n.id not in watch.deaths and n.state == NodeState.READY]
    if not nodes or max(n.live for n in nodes) == 0:
        return None
    if fault == "kill-node":
        target = max(nodes, key=lambda n: n.live)
        watch.injected[target.id] = fault
        return f"kill-node {target.id} ({target.live} streams): " + stack.voicectl(
            "kill-node", target.id)
    per_region = Counter({n.region: 0 for n in nodes})
    per_region.update({n.region: n.live for n in nodes})
    region = per_region.most_common(1)[0][0]
    for n in nodes:
        if n.region == region:
            watch.injected[n.id] = fault
    return f"kill-region {region}: " + stack.voicectl("kill-region", region, "--json")


# --- the run ---------------------------------------------------------------------------

def billed_seconds(db_url: str, users: list[str]) -> dict[str, float]:
    """Seconds billed per user, as `voicectl usage --json` adds them up."""
    ledger = Ledger.open(db_url)
    try:
        rows = [r for r in ledger.usage() if r.user_id in users]
        out = {u: 0.0 for u in users}
        for row in day_totals(rows):
            out[row["user"]] += row["seconds"]
        return out
    finally:
        ledger.engine.dispose()


def settle(db_url: str, users: list[str], timeout_s: float = 45.0) -> dict[str, float]:
    """Billed seconds once three reads 2 s apart agree (the beat settles every tick)."""
    deadline, last, same = time.monotonic() + timeout_s, None, 0
    while time.monotonic() < deadline:
        time.sleep(2.0)
        got = billed_seconds(db_url, users)
        same = same + 1 if got == last else 0
        if same >= 2:
            break
        last = got
    return billed_seconds(db_url, users)


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 3) if xs else None


def figures(clients: list[dict[str, Any]], watch: Watch, billed: dict[str, float],
            leaks: dict[str, list[str]], orphans: list[str], faults: list[str],
            minutes: float, t_end: float) -> dict[str, Any]:
    drops = [d for c in clients for d in c["drops"]]
    resumed = [d["t_streaming"] - d["t_drop"] for d in drops if d["t_streaming"]]
    warm = [d for d in drops if d["t_streaming"]
            and watch.ready_at.get(d.get("resumed_on", ""), t_end) < d["t_drop"]]
    resumed_warm = [d["t_streaming"] - d["t_drop"] for d in warm]
    stale = [d for d in drops if not d["t_streaming"] and t_end - d["t_drop"] > LOST_AFTER_S]
    waiting = [d for d in drops if not d["t_streaming"] and d not in stale]
    crashes = {k: d for k, d in watch.deaths.items() if d["cause"] != "stopped"}
    detect = [d["detected"] - d["t"] for d in crashes.values() if d["detected"]]
    reaped = [d["detected"] - d["t"] for d in crashes.values() if d.get("by") == "reaper"]
    streamed = {c["user"]: c["answered"] * FRAME_S for c in clients}
    errors = [abs(billed.get(u, 0.0) - s) for u, s in streamed.items()]
    per_drop = [abs(billed.get(c["user"], 0.0) - streamed[c["user"]]) / max(1, len(c["drops"]))
                for c in clients]
    violations = list(watch.violations.values())
    violations += [{"kind": k, "key": u} for k, us in leaks.items() for u in us]
    return {
        "minutes": minutes, "clients": len(clients),
        "crashes": len(crashes),
        "crash_causes": dict(Counter(d["cause"] for d in crashes.values())),
        "crashes_undetected": len(crashes) - len(detect),
        "detect_s_max": round(max(detect), 3) if detect else None,
        "detected_by": dict(Counter(d.get("by") for d in crashes.values() if d["detected"])),
        "detect_s_max_reaper": round(max(reaped), 3) if reaped else None,
        "drops": len(drops),
        "sessions_affected": len({(d["session"]) for d in drops}),
        "resumed_fraction": round(len(resumed) / len(drops), 4) if drops else 1.0,
        "resume_s_p50": pct(resumed, 50), "resume_s_p95": pct(resumed, 95),
        "resume_s_max": round(max(resumed), 3) if resumed else None,
        "resumed_within_2s_fraction": (round(sum(r <= 2.0 for r in resumed) / len(drops), 4)
                                       if drops else 1.0),
        "warm_drops": len(warm),
        "resume_s_p95_warm": pct(resumed_warm, 95),
        "resumed_within_2s_fraction_warm": (
            round(sum(r <= 2.0 for r in resumed_warm) / len(warm), 4) if warm else 1.0),
        "lost_sessions": sum(c["refused_resumes"] for c in clients) + len(stale),
        "resumes_refused": sum(c["refused_resumes"] for c in clients),
        "unresumed_at_end": len(waiting),
        "invariant_violations": len(violations),
        "leaked_locks": len(leaks["leaked_lock"]), "leaked_slots": len(leaks["leaked_slot"]),
        "violations": [f"{v['kind']} {v['key']} {v.get('detail', '')}".strip()
                       for v in violations[:10]],
        "streamed_s_total": round(sum(streamed.values()), 2),
        "billed_s_total": round(sum(billed.values()), 2),
        "billing_error_s_max": round(max(errors), 3) if errors else None,
        "billing_error_s_per_drop_max": round(max(per_drop), 3) if per_drop else None,
        "orphans": len(orphans), "orphan_processes": orphans[:10],
        "clients_stopped_clean": sum(c["stopped_clean"] for c in clients),
        "client_errors": dict(sum((Counter(c["errors"]) for c in clients), Counter())),
        "redis_unreachable_checks": watch.redis_errors,
        "faults": faults,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long the clients stream")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--crash-rate", type=float, default=0.3, help="CRASH_RATE, per node-minute")
    p.add_argument("--load-s", type=float, default=2.0, help="MODEL_LOAD_SECONDS")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    tag = f"{int(time.time()) % 100000}"
    users = [f"chaos-{tag}-{i}" for i in range(args.clients)]
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        log(f"starting the stack: voicectl run in {tmp} (load {args.load_s:g} s, "
            f"CRASH_RATE {args.crash_rate:g}) ...")
        stack = Stack(Path(tmp), args.load_s, args.crash_rate)
        watch = Watch(stack, users)
        faults: list[str] = []
        try:
            t0 = time.time()
            end_at = t0 + 60 * args.minutes
            log(f"{args.clients} clients near {', '.join(LOCATIONS)} stream for {args.minutes:g} "
                "min; faults at "
                + ", ".join(f"{f} {frac * 60 * args.minutes:.0f} s" for frac, f in FAULTS))
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                job = pool.apply_async(run_clients, (f"ws://127.0.0.1:{stack.port}",
                                                     args.clients, tag, end_at))
                pending = list(FAULTS)
                next_progress = t0 + 15
                while not job.ready():
                    now = time.time()
                    if pending and now >= t0 + pending[0][0] * 60 * args.minutes:
                        what = inject(pending[0][1], stack, watch)
                        if what is None:      # nothing to kill yet: try again in a second
                            pending[0] = (pending[0][0] + 1 / (60 * args.minutes), pending[0][1])
                        else:
                            pending.pop(0)
                            faults.append(f"{now - t0:.1f} s: {what}"[:200])
                            log(f"fault at {now - t0:.1f} s: {what}"[:200])
                    if now >= next_progress:
                        live = sum(n.live for n in watch.records.values()
                                   if n.id not in watch.deaths)
                        log(f"{now - t0:.0f}/{60 * args.minutes:.0f} s: {live} live streams, "
                            f"{len(watch.deaths)} nodes gone, "
                            f"{len(watch.violations)} violations")
                        next_progress += 15
                    job.wait(0.2)
                clients = job.get()
            faults += [f"{f}: not injected (no node with streams to kill)" for _, f in pending]
            log("clients stopped; checking locks and slots, waiting for settlement ...")
            time.sleep(3.0)   # "released at once"; a heartbeat's grace for the slot sync
            leaks: dict[str, list[str]] = {"leaked_lock": [], "leaked_slot": []}
            ours = {s for c in clients for s in c["sessions"]}
            try:
                leaks["leaked_lock"] = [u for u in users if watch.state.lock_holder(u)]
                leaks["leaked_slot"] = [s for n in watch.state.node_ids()
                                        if n not in watch.deaths
                                        for s in watch.state.live_sessions(n) if s in ours]
            except redis.RedisError as e:
                log(f"could not read locks and slots ({e})")
            billed = settle(stack.db_url, users)
        finally:
            watch.stop()
            log("stopping voicectl run and looking for orphans ...")
            orphans = stack.stop()
    out = figures(clients, watch, billed, leaks, orphans, faults, args.minutes, end_at)
    report(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
