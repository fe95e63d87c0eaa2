"""voicectl as a user runs it: real subprocesses, real Redis, real database."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import Fleet, Webapp, closed_code, lobby, push_version, start_stream, wait_for
from simple_websocket import Client
from test_outage import stream_audio

from billing.ledger import Ledger
from voicectl import procs

VOICECTL = [sys.executable, "-m", "voicectl"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(VOICECTL + list(args), capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_usage_table_csv_json(state, db_url: str) -> None:
    ledger = Ledger.open(db_url)
    minute = 1_800_000_000 // 60 * 60
    state.report_usage([(minute, "ann|s1|n1|miku|us-west", 30.0),
                        (minute + 60, "ann|s1|n1|miku|us-west", 45.0),
                        (minute, "bob|s2|n1|teto|us-west", 12.5)])
    ledger.settle_from(state, minute + 300)
    env = {"DATABASE_URL": db_url}
    rows = json.loads(run("usage", "--json", env=env).stdout)
    assert rows == [{"user": "ann", "day": "2027-01-15", "seconds": 75.0, "minutes": 1.25},
                    {"user": "bob", "day": "2027-01-15", "seconds": 12.5, "minutes": 0.21}]
    got = list(csv.DictReader(io.StringIO(run("usage", "--csv", "--user", "bob",
                                              env=env).stdout)))
    assert got == [{"user": "bob", "day": "2027-01-15", "minutes": "0.21", "seconds": "12.5"}]
    table = run("usage", env=env).stdout
    assert "ann" in table and "75.0" in table
    assert "no usage" in run("usage", "--since", "2030-01-01", env=env).stdout
    bad = run("usage", "--since", "soon", env=env)
    assert bad.returncode == 2 and "ISO-8601" in bad.stderr
    ledger.engine.dispose()


def test_nodes_models_deploy(webapp: Webapp, fleet: Fleet) -> None:
    node_id = fleet.start("miku")
    nodes = json.loads(run("nodes", "--json", "--url", webapp.base_url).stdout)
    assert [n["id"] for n in nodes["nodes"]] == [node_id]
    assert node_id in run("nodes", "--url", webapp.base_url).stdout
    env = {"REDIS_URL": webapp.config.redis_url or ""}
    push_version(webapp.state, webapp.config, "miku", semitones=5)   # v2 live, v1 drains
    out = json.loads(run("deploy", "miku", "--version", "1", "--json", env=env).stdout)
    assert out["live"] == "1" and out["canary"] == ""   # v1 again; v2 drains
    models = json.loads(run("models", "--json", "--url", webapp.base_url).stdout)
    assert {(m["name"], m["version"], m["state"]) for m in models} >= {
        ("miku", "1", "live"), ("miku", "2", "draining")}
    assert all(len(m["digest"]) == 64 and m["streams_per_gpu"] == 4 for m in models)
    new = run("deploy", "miku-dev", "--version", "1", env=env)
    assert new.returncode == 2 and "unknown model 'miku-dev'" in new.stderr
    bad = run("deploy", "miku", "--version", "9", env=env)
    assert bad.returncode == 2 and "no version '9'" in bad.stderr
    missing = run("nodes", "--url", "http://127.0.0.1:9")
    assert missing.returncode == 2 and "voicectl run" in missing.stderr


def start_run(tmp_path: Path, port: int | None = None) -> tuple[int, subprocess.Popen[str]]:
    """`voicectl run` as a user starts it (embedded Redis, SQLite), its output piped."""
    port, flower = port or procs.free_port(), procs.free_port()
    env = {**os.environ, "MODEL_LOAD_SECONDS": "0.3", "VOICE_DEV_USERS": "1",
           "DATABASE_URL": f"sqlite:///{tmp_path / 'b.sqlite'}"}
    env.pop("REDIS_URL", None)
    return port, subprocess.Popen(VOICECTL + ["run", "--port", str(port), "--flower-port",
                                              str(flower), "--data", str(tmp_path / "redis")],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)


def test_run_serves_the_page_and_ctrl_c_leaves_no_orphans(tmp_path: Path) -> None:
    port, proc = start_run(tmp_path)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "open http://" in line:
                break
        from simple_websocket import Client

        ws = Client.connect(f"ws://127.0.0.1:{port}/ws/session?user=cli&model=miku&region=us-west")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = json.loads(ws.receive(timeout=30))
            if msg["type"] in ("ready", "error"):
                break
        assert msg["type"] == "ready", msg
        children = psutil.Process(proc.pid).children(recursive=True)
        # The node's "VM" ran its user-data, which joins this control plane.
        vms = [c for c in psutil.process_iter(["cmdline"])
               if f"node --join http://127.0.0.1:{port} " in " ".join(c.info["cmdline"] or [])]
        assert len(children) >= 3 and vms          # redis, celery, flower; the node's VM
        _the_local_stack_keeps_its_secrets(tmp_path, children, "".join(lines))
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    text = "".join(lines) + out
    assert "starting embedded Redis" in text and "stopped" in text
    assert proc.returncode == 0
    deadline = time.monotonic() + 5   # exiting, not orphaned: on a loaded machine it takes time
    while (gone := [c for c in children + vms
                    if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone == [], [c.cmdline() for c in gone]


def _the_local_stack_keeps_its_secrets(tmp: Path, children: list[psutil.Process],
                                       output: str) -> None:
    """The embedded Redis wants its password, which no process argument or console line
    shows; var/ is the owner's alone, its secrets 0600; Flower answers only with its
    password (a web page the developer visits cannot queue tasks)."""
    import re

    import redis
    import requests

    password = (tmp / "redis" / "password").read_text().strip()
    server = next(c for c in children if "redis-server" in " ".join(c.cmdline()))
    assert all(password not in " ".join(c.cmdline()) for c in children)
    assert password not in output
    port = next(c.laddr.port for c in server.net_connections() if c.status == "LISTEN")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()
    var = procs.ROOT / "var"
    assert var.stat().st_mode & 0o777 == 0o700
    for secret in ("run.json", "flower-password", "user-token-secret"):
        assert (var / secret).stat().st_mode & 0o777 == 0o600, secret
    found = re.search(r"Flower on http://127.0.0.1:(\d+)", output)
    assert found is not None, output
    flower = int(found.group(1))
    url = f"http://127.0.0.1:{flower}/api/workers"
    wait_for(lambda: _answers(url), 30, "Flower never answered")
    assert requests.get(url, timeout=5).status_code == 401
    auth = ("voice", (var / "flower-password").read_text().strip())
    assert requests.get(url, auth=auth, timeout=5).status_code == 200


def _answers(url: str) -> bool:
    import requests
    try:
        requests.get(url, timeout=2)
        return True
    except requests.RequestException:
        return False


def test_run_restarts_what_dies_and_redis_keeps_its_data(tmp_path: Path) -> None:
    """kill -9 the Celery worker (and so its beat) and the embedded Redis: `voicectl run`
    says so and starts them again; Redis comes back with its data; users still get nodes;
    and at the end nothing of the first worker outlives the run."""
    import redis
    from simple_websocket import Client

    port, proc = start_run(tmp_path)
    lines: list[str] = []
    assert proc.stdout is not None
    out = proc.stdout

    def until(needle: str, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = out.readline()
            lines.append(line)
            if needle in line:
                return line
        raise AssertionError(f"no {needle!r} from voicectl run:\n{''.join(lines)}")

    def ready(user: str) -> None:
        ws = Client.connect(f"ws://127.0.0.1:{port}/ws/session?user={user}&model=miku"
                            "&region=us-west")
        while True:
            msg = json.loads(ws.receive(timeout=60))
            if msg["type"] in ("ready", "error"):
                break
        assert msg["type"] == "ready", msg

    def child(word: str) -> psutil.Process:
        [found] = [c for c in psutil.Process(proc.pid).children()
                   if word in " ".join(c.cmdline())]
        return found

    first_worker: list[psutil.Process] = []
    try:
        shown = until("Redis ready at").rsplit(" ", 1)[1].strip()   # its password as ***
        url = shown.replace("***", (tmp_path / "redis" / "password").read_text().strip())
        until("open http://")
        r = redis.Redis.from_url(url)
        r.set("test:kept", "yes")
        ready("alice")
        worker = child("provision@")
        first_worker = [worker, *(c for c in worker.children(recursive=True)   # its beat
                                  if "celery" in " ".join(c.cmdline()))]
        assert len(first_worker) >= 2, "no beat process under the Celery worker"
        worker.kill()
        until("celery worker exited")
        until("celery worker restarted")
        time.sleep(0.5)
        assert not [p for p in first_worker if p.is_running()
                    and p.status() != psutil.STATUS_ZOMBIE], "the old worker's beat lives on"
        time.sleep(1.2)   # the append-only file is synced every second
        child("redis-server").kill()
        until("redis exited")
        until("redis restarted")
        assert r.get("test:kept") == b"yes"
        ready("bob")      # a new user gets a node: the new worker scales, Redis serves
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + rest
    time.sleep(0.5)
    children = [p for p in first_worker if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
    assert children == []


@pytest.mark.parametrize("args, needle", [(["kill-node", "n-nope"], "no VM"),
                                          (["kill-region", "mars"], "unknown region")])
def test_kill_commands_say_what_is_wrong(redis_url: str, args: list[str], needle: str) -> None:
    bad = run(*args, env={"REDIS_URL": redis_url})
    assert bad.returncode == 2 and needle in bad.stderr


def test_whole_stack_sigkilled_and_restarted_streams_on_resumes_and_bills(
        tmp_path: Path) -> None:
    """kill -9 `voicectl run` mid-stream (its Redis, worker and beat die with it; the node's
    machine does not) and start it again: the stream goes on throughout, the node re-joins
    the fleet, the session can still be resumed, and what is billed is within 2 s of what
    was streamed."""
    def up(proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "open http://" in line:
                return
        raise AssertionError("voicectl run never served")

    port, run = start_run(tmp_path)
    node_pids: list[int] = []
    try:
        up(run)
        ready = lobby(f"ws://127.0.0.1:{port}", "user=ks&model=miku&region=us-west")[-1]
        assert ready["type"] == "ready", ready
        node_pids = [p.pid for p in psutil.process_iter(["cmdline"])
                     if ready["node_id"] in " ".join(p.info["cmdline"] or [])]
        ws = start_stream(ready)
        streamed = stream_audio(ws, 2.0)
        run.kill()                            # the whole stack, without a word
        run.wait()
        streamed += stream_audio(ws, 2.0)     # the node streams on alone
        port, run = start_run(tmp_path, port)
        up(run)
        streamed += stream_audio(ws, 2.0)
        ws.send(json.dumps({"type": "stop"}))
        assert closed_code(ws)[0] == 1000
        ledger = Ledger.open(f"sqlite:///{tmp_path / 'b.sqlite'}")
        billed = wait_for(lambda: (s := sum(r.seconds for r in ledger.usage("ks"))) >= (
            streamed - 2.0) and s, 30, "the stream's seconds to be settled")
        time.sleep(3)                         # a last settle: nothing is counted twice
        billed = sum(r.seconds for r in ledger.usage("ks"))
        ledger.engine.dispose()
        print(f"streamed {streamed:.2f} s, billed {billed:.2f} s")
        assert abs(billed - streamed) <= 2.0, (billed, streamed)
        again = lobby(f"ws://127.0.0.1:{port}",
                      f"user=ks&model=miku&region=us-west&resume={ready['session_id']}")[-1]
        assert again["type"] == "ready" and again["session_id"] == ready["session_id"], again
        Client.connect(f"{again['node_url']}?ticket={again['ticket']}").close()
    finally:
        run.send_signal(signal.SIGINT)
        run.communicate(timeout=60)
        for pid in node_pids:                 # in case the second run never adopted it
            if psutil.pid_exists(pid):
                psutil.Process(pid).kill()
