"""Models as packages, measured on the real stack (`voicectl run`, 10 s model load):

1. push to first session: a miku node serving v1 is warm and busy; `voicectl models push`
   of v2 (its check in a child process), then a new user's lobby, until their first
   answered frame on v2;
2. canary share: v3 pushed with --canary 30, 40 new sessions (in a region that boots
   nothing, so they only queue), the share that got v3; then rolled back;
3. automatic rollback: a canary that passes the push check but fails every 16 kHz stream
   after 100 ms (1011), at 50 %, six
   users streaming and resuming through the lobby as the page does, warm capacity of the
   good version; the 1011s clients saw before the control plane marked it failed, and the
   longest silence any user heard from their first frame on;
4. the batch step against per-stream calls on the shipped pitch voice, 4 streams, side by
   side in one run (bench/batch_cpu.py).

    python bench/models.py [--json] [--load-s 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from simple_websocket import Client, ConnectionClosed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from batch_cpu import measure  # noqa: E402
from connect import lobby, log, real_stack  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FRAME = np.zeros(320, np.int16).tobytes()   # 20 ms at 16 kHz
# Passes the push check (48 kHz), fails every 16 kHz stream after 100 ms: a bug the check
# cannot see, which only service shows.
FAILING = '''
from worker_node.splice import make as _make

class Failing:
    def __init__(self, inner, rate):
        self.inner, self.rate, self.calls = inner, rate, 0
        self.latency_samples = inner.latency_samples

    def process(self, frames):
        self.calls += 1
        if self.rate == 16000 and self.calls > 5:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.inner.process(frames)

def make(sample_rate, params, files):
    return Failing(_make(sample_rate, params, files), sample_rate)
'''


def package(tmp: Path, name: str, semitones: int, failing: bool = False) -> Path:
    """A new miku package: other params (a new digest), or a failing model."""
    where = tmp / name
    shutil.copytree(ROOT / "models" / "miku", where, ignore=shutil.ignore_patterns("__py*"))
    toml = (where / "model.toml").read_text().replace("semitones = 4", f"semitones = {semitones}")
    if failing:
        (where / "pitch.py").write_text(FAILING)
        toml = toml.replace('batch = "pitch:process_batch"\n', "")
    (where / "model.toml").write_text(toml)
    return where


def voicectl(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "voicectl", *args, "--json"], env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"voicectl {' '.join(args)}: {done.stderr}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


class User(threading.Thread):
    """Streams 20 ms frames in real time; resumes through the lobby after a drop (1011, a
    4503 move), as the page does. Keeps the times of answers and of each 1011."""

    def __init__(self, ws_url: str, name: str, until: float, region: str = "us-west"):
        super().__init__(daemon=True)
        self.ws_url, self.name, self.until, self.region = ws_url, name, until, region
        self.answers: list[float] = []
        self.failures: list[tuple[float, str]] = []
        self.versions: list[str] = []
        self.session = ""

    def run(self) -> None:
        while time.time() < self.until:
            query = f"user={self.name}&model=miku&region={self.region}"
            _, msgs = lobby(self.ws_url, query + (f"&resume={self.session}"
                                                  if self.session else ""))
            ready = msgs[-1]
            if ready["type"] != "ready":
                time.sleep(0.2)
                continue
            self.session = ready["session_id"]
            self.versions.append(ready["version"])
            self._stream(ready)

    def _stream(self, ready: dict[str, Any]) -> None:
        ws = Client.connect(f"{ready['node_url']}?ticket={ready['ticket']}")
        try:
            ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
            ws.receive(timeout=5)
            tick = time.perf_counter()
            while time.time() < self.until:
                ws.send(FRAME)
                got = ws.receive(timeout=2)
                while isinstance(got, str):   # a move notice: the drop that follows resumes
                    got = ws.receive(timeout=2)
                if got is not None:
                    self.answers.append(time.time())
                tick += 0.02
                time.sleep(max(0.0, tick - time.perf_counter()))
            ws.send(json.dumps({"type": "stop"}))
        except ConnectionClosed as e:
            if e.reason == 1011:
                self.failures.append((time.time(), ready["version"]))

    def longest_gap_s(self) -> float:
        return max(np.diff(self.answers), default=0.0) if len(self.answers) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--load-s", type=float, default=10.0, help="MODEL_LOAD_SECONDS")
    p.add_argument("--users", type=int, default=6, help="users in the rollback phase")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-models-"))
    out: dict[str, Any] = {"model_load_s": args.load_s}
    with real_stack("models", load_s=args.load_s, no_boot=("eu-west",)) as stack:
        env = {**os.environ, "REDIS_URL": stack.redis_url,
               "VOICE_CONFIG": str(ROOT / "var" / "bench-models.toml")}
        out["vm_boot_s"] = stack.cfg.provider("local").boot_s
        log("warming a miku v1 node with a streaming user ...")
        warm = User(stack.ws_url, "warm-v1", time.time() + 3600)
        warm.start()
        while not warm.answers:
            time.sleep(0.1)
        log("pushing miku v2 and opening a new user's session on it ...")
        t0 = time.time()
        pushed = voicectl(env, "models", "push", str(package(tmp, "v2", 5)))
        out["push_check_s"] = round(time.time() - t0, 3)
        first = User(stack.ws_url, "first", time.time() + 3600)
        first.start()
        while not first.answers:
            time.sleep(0.01)
        out["push_to_first_session_s"] = round(first.answers[0] - t0, 3)
        out["push_to_first_session_version"] = first.versions[0]
        assert pushed["version"] == first.versions[0] == "2", (pushed, first.versions)
        log("warm capacity of v2 for the rollback phase ...")
        spare = [User(stack.ws_url, f"spare{i}", time.time() + 3600) for i in range(4)]
        for u in spare:
            u.start()
        while not all(u.answers for u in spare):
            time.sleep(0.1)
        for u in spare:
            u.until = 0.0   # they stop: their node stays warm for its idle grace
        log("canary v3 at 30 %: 40 new sessions ...")
        voicectl(env, "models", "push", str(package(tmp, "v3", 6)), "--canary", "30")
        seen = []
        for i in range(40):
            ws = Client.connect(f"{stack.ws_url}/ws/session?user=share{i}&model=miku"
                                "&region=eu-west")
            seen.append(json.loads(ws.receive(timeout=10))["version"])
            ws.close()
        out["canary_share_asked"] = 0.3
        out["canary_share_seen"] = round(seen.count("3") / len(seen), 3)
        voicectl(env, "models", "rollback", "miku")
        log(f"a failing canary at 50 %: {args.users} users streaming for 40 s ...")
        voicectl(env, "models", "push", str(package(tmp, "v4", 3, failing=True)),
                 "--canary", "50")
        users = [User(stack.ws_url, f"r{i}", time.time() + 40) for i in range(args.users)]
        for u in users:
            u.start()
        failed_at = None
        while any(u.is_alive() for u in users):
            entry = stack.state.model_entry("miku")
            if failed_at is None and entry is not None and "4" in entry.versions and \
                    entry.versions["4"].failed:
                failed_at = time.time()
                out["rollback_reason"] = entry.versions["4"].failed
            time.sleep(0.02)
        fails = sorted(t for u in users for t, v in u.failures if v == "4")
        out["rollback_after_failed_streams"] = (
            sum(t <= failed_at for t in fails) if failed_at else None)
        out["failed_streams_total"] = len(fails)
        on_canary = [u for u in users if "4" in u.versions]
        out["failed_version_users"] = len(on_canary)
        out["failed_users_gap_s_max"] = round(max((u.longest_gap_s() for u in on_canary),
                                                  default=0.0), 3)
        out["users_gap_s_max"] = round(max(u.longest_gap_s() for u in users), 3)
        for u in (warm, first):
            u.until = 0.0
    log("batch step vs per-stream calls, miku, 4 streams ...")
    cpu = measure(ROOT / "models" / "miku", streams=4, seconds=5.0)
    out["batch_cpu_ms_per_stream"] = cpu["batch_cpu_ms_per_stream"]
    out["single_cpu_ms_per_stream"] = cpu["single_cpu_ms_per_stream"]
    out["batch_over_single"] = cpu["ratio"]
    for key, value in out.items():
        print(f"{key:34s} {value}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
