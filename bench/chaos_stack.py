"""bench/chaos.py's stack and watch: `voicectl run` in a temporary folder with its
processes recorded (for orphans), the faults injected into it, and the checker that polls
node pids (deaths, and when the control plane knew) and the invariants in Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import redis

from provisioner.clouds.local import pid_alive
from provisioner.state import State, connect, fence_key
from provisioner.states import NodeState
from voicectl import procs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from connect import log  # noqa: E402

CHECK_S, DEATH_S = 0.25, 0.05   # invariants; node pids and the control plane's detection
VOICECTL = [sys.executable, "-m", "voicectl"]


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
        shown = self._wait_line("Redis ready at").rsplit(" ", 1)[1].strip()   # password: ***
        self.redis_url = shown.replace("***", (tmp / "redis" / "password").read_text().strip())
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
