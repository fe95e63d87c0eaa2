"""Models ship as packages (issue 17), through real processes: `voicectl models push` with
its check in a child process, the lobby's canary split, promote and rollback, automatic
rollback of a package that fails mid-stream or fails to load, and nodes that fetch their
own package by digest from the control plane (never another's, never a changed one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from conftest import (
    ControlPlane,
    Fleet,
    Webapp,
    closed_code,
    lobby,
    make_config,
    push_version,
    serve,
    start_stream,
    thread_stacks,
    wait_for,
)
from simple_websocket import Client

from common.package import pack, sha256
from provisioner import catalog
from provisioner.state import State, connect
from voicectl import procs
from webapp.app import create_app
from worker_node.package import run_check

ROOT = Path(__file__).resolve().parent.parent

# A model written outside the project: out[n] = in[n - 3] * numerator // denominator, the
# numerator from its params, the denominator from a file it ships (its "weights").
GAIN_PY = '''
import numpy as np

class Gain:
    latency_samples = 3

    def __init__(self, numerator, denominator):
        self.num, self.den = numerator, denominator
        self.tail = np.zeros(3, np.int16)

    def process(self, frames):
        x = np.concatenate([self.tail, frames])
        self.tail = x[-3:]
        return (x[:len(frames)].astype(np.int32) * self.num // self.den).astype(np.int16)

def make(sample_rate, params, files):
    return Gain(int(params["numerator"]), int((files / "weights.txt").read_text()))
'''


def write_package(where: Path, name: str = "gain", body: str = GAIN_PY,
                  toml_extra: str = "") -> Path:
    where.mkdir(parents=True, exist_ok=True)
    (where / "model.toml").write_text(
        f'name = "{name}"\nentry = "gain:make"\nstreams_per_gpu = 2\n{toml_extra}'
        '[params]\nnumerator = 3\n')
    (where / "gain.py").write_text(body)
    (where / "weights.txt").write_text("4")
    return where


def voicectl(cfg: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": cfg.redis_url or "",
           "VOICE_PACKAGE_STORE": cfg.package_store}
    return subprocess.run([sys.executable, "-m", "voicectl", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def first_message(ws_url: str, query: str) -> dict[str, Any]:
    """Open a lobby, read its first message, leave."""
    ws = Client.connect(f"{ws_url}/ws/session?{query}")
    try:
        raw = ws.receive(timeout=30)   # under two test processes' load, seen over 10 s
        assert raw is not None, f"{query}: no first message in 30 s\n{thread_stacks()}"
        return dict(json.loads(raw))
    finally:
        ws.close()


def test_a_package_written_outside_streams_exactly_what_its_code_computes(
        control_plane: ControlPlane, tmp_path: Path) -> None:
    cp = control_plane
    done = voicectl(cp.config, "models", "push", str(write_package(tmp_path / "gain")),
                    "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["model"], out["version"], len(out["digest"])) == ("gain", "1", 64)
    listed = {(m["name"], m["state"], m["streams_per_gpu"], m["digest"])
              for m in requests.get(f"{cp.base_url}/api/models", timeout=5).json()}
    assert ("gain", "live", 2, out["digest"]) in listed
    ready = lobby(cp.ws_url, "user=pk&model=gain&region=us-west", timeout_s=60)[-1]
    assert ready["type"] == "ready" and ready["version"] == "1", ready
    ws = start_stream(ready)
    assert ws.started["latency_ms"] == round(1000 * 3 / 16000, 3)
    rng = np.random.default_rng(7)
    sent = rng.integers(-20000, 20000, 16000).astype(np.int16)
    got = []
    for i in range(0, len(sent), 320):
        ws.send(sent[i:i + 320].tobytes())
        got.append(np.frombuffer(ws.receive(timeout=5), dtype="<i2"))
    delayed = np.concatenate([np.zeros(3, np.int16), sent])[:len(sent)]
    expected = (delayed.astype(np.int32) * 3 // 4).astype(np.int16)
    assert np.array_equal(np.concatenate(got), expected)   # exactly its code's output
    node = cp.state.node(ready["node_id"])
    assert node is not None and node.capacity == 2 and node.digest == out["digest"]
    ws.send(json.dumps({"type": "stop"}))
    assert closed_code(ws)[0] == 1000


@pytest.mark.parametrize("body, needle", [
    (GAIN_PY.replace("return Gain(", "raise FileNotFoundError('weights robot.bin missing')\n"
                     "    return Gain("), "weights robot.bin missing"),
    (GAIN_PY.replace("x[:len(frames)]", "x[:len(frames) - 1]"), "returned 959 samples"),
    (GAIN_PY.replace("return (x[:len(frames)]", "return np.full(len(frames), np.nan)\n"
                     "        return (x[:len(frames)]"), "NaN"),
    (GAIN_PY.replace("x = np.concatenate", "import time; time.sleep(0.03)\n"
                     "        x = np.concatenate"), "slower than real time"),
    ("import torch_that_is_not_installed\n" + GAIN_PY, "ModuleNotFoundError"),
])
def test_the_check_refuses_with_the_packages_own_error(tmp_path: Path, body: str,
                                                       needle: str) -> None:
    from common.errors import PackageError
    with pytest.raises(PackageError, match=needle):
        run_check(write_package(tmp_path / "p", body=body))


def test_a_refused_push_says_why_and_registers_nothing(webapp: Webapp, tmp_path: Path) -> None:
    broken = GAIN_PY.replace("return Gain(", "raise ValueError('the weights are for 44.1 kHz "
                             "only')\n    return Gain(")
    before = webapp.state.model_entries()
    done = voicectl(webapp.config, "models", "push",
                    str(write_package(tmp_path / "bad", name="miku", body=broken)))
    assert done.returncode == 2
    assert "the weights are for 44.1 kHz only" in done.stderr and "nothing registered" in \
        done.stderr, done.stderr
    assert webapp.state.model_entries() == before
    bad_toml = voicectl(webapp.config, "models", "push",
                        str(write_package(tmp_path / "bad2", toml_extra="streams_per_gpu2 = 1\n")))
    assert bad_toml.returncode == 2 and "unknown keys" in bad_toml.stderr


def test_canary_split_promote_and_rollback(webapp: Webapp, tmp_path: Path) -> None:
    """40 new sessions with a 25 % canary: 10 get it, spread over the run; promote sends the
    next one to it, rollback back to the version before."""
    pkg = tmp_path / "miku2"
    shutil.copytree(ROOT / "models" / "miku", pkg, ignore=shutil.ignore_patterns("__py*"))
    (pkg / "model.toml").write_text((pkg / "model.toml").read_text().replace(
        "semitones = 4", "semitones = 5"))
    done = voicectl(webapp.config, "models", "push", str(pkg), "--canary", "25", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version"] == "2"
    models = requests.get(f"{webapp.base_url}/api/models", timeout=5).json()
    miku = {m["version"]: m for m in models if m["name"] == "miku"}
    assert (miku["1"]["state"], miku["2"]["state"], miku["2"]["canary_percent"]) == (
        "live", "canary", 25)
    seen = [first_message(webapp.ws_url, f"user=c{i}&model=miku&region=us-west")
            for i in range(40)]
    assert all(m["type"] == "queued" for m in seen), seen[:3]
    versions = [m["version"] for m in seen]
    assert abs(versions.count("2") / 40 - 0.25) <= 0.15 and versions.count("2") == 10
    assert "2" in versions[:8] and "2" in versions[-8:]   # spread, not bunched
    assert voicectl(webapp.config, "models", "promote", "miku").returncode == 0
    assert first_message(webapp.ws_url, "user=p1&model=miku&region=us-west")["version"] == "2"
    rb = voicectl(webapp.config, "models", "rollback", "miku")
    assert rb.returncode == 0, rb.stderr
    assert first_message(webapp.ws_url, "user=p2&model=miku&region=us-west")["version"] == "1"
    states = {m["version"]: m["state"] for m in requests.get(
        f"{webapp.base_url}/api/models", timeout=5).json() if m["name"] == "miku"}
    assert states == {"1": "live", "2": "draining"}
    none = voicectl(webapp.config, "models", "promote", "miku")
    assert none.returncode == 2 and "no canary" in none.stderr


FAILING_AFTER_5 = '''
from worker_node.splice import make as _make

class Failing:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.latency_samples = inner.latency_samples

    def process(self, frames):
        self.calls += 1
        if self.calls > 5:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.inner.process(frames)

def make(sample_rate, params, files):
    return Failing(_make(sample_rate, params, files))
'''


def test_a_canary_that_fails_mid_stream_rolls_back_by_itself(
        control_plane: ControlPlane, tmp_path: Path) -> None:
    cp = control_plane
    pkg = tmp_path / "failing"
    shutil.copytree(ROOT / "models" / "miku", pkg, ignore=shutil.ignore_patterns("__py*"))
    (pkg / "pitch.py").write_text(FAILING_AFTER_5)
    (pkg / "model.toml").write_text((pkg / "model.toml").read_text().replace(
        'batch = "pitch:process_batch"\n', ""))
    push_version(cp.state, cp.config, "miku", canary=50, package=pkg)
    failed, failed_sessions = 0, []
    for i in range(10):
        entry = cp.state.model_entry("miku")
        assert entry is not None
        if entry.versions["2"].failed:
            break
        ready = lobby(cp.ws_url, f"user=f{i}&model=miku&region=us-west", timeout_s=60)[-1]
        assert ready["type"] == "ready", ready
        ws = start_stream(ready)
        frame = np.zeros(320, np.int16).tobytes()
        if ready["version"] == "1":
            for _ in range(8):
                ws.send(frame)
                assert ws.receive(timeout=5) is not None
            ws.send(json.dumps({"type": "stop"}))
            assert closed_code(ws)[0] == 1000
            continue
        for _ in range(6):   # the sixth frame fails
            ws.send(frame)
        code, reason = closed_code(ws, timeout_s=10)
        assert code == 1011 and "CUDA error" in reason, (code, reason)
        failed += 1
        failed_sessions.append(ready["session_id"])
        time.sleep(0.3)   # the close's own heartbeat carries the failure
    entry = wait_for(lambda: (e := cp.state.model_entry("miku")) and e.versions["2"].failed
                     and e, 15, "the failing canary was not rolled back")
    assert 3 <= failed <= 10 and "streams failed" in entry.versions["2"].failed
    listed = {m["version"]: m for m in requests.get(f"{cp.base_url}/api/models",
                                                     timeout=5).json() if m["name"] == "miku"}
    assert listed["2"]["state"] == "failed" and "streams failed" in listed["2"]["reason"]
    # its users resume on the last good version; new sessions go there too
    resumed = lobby(cp.ws_url, f"user=f0&model=miku&region=us-west&resume="
                    f"{failed_sessions[0]}", timeout_s=60)[-1]
    fresh = lobby(cp.ws_url, "user=new&model=miku&region=us-west", timeout_s=60)[-1]
    assert resumed["version"] == "1" and fresh["version"] == "1", (resumed, fresh)


def test_a_version_whose_nodes_cannot_load_it_fails_and_its_waiters_move(
        control_plane: ControlPlane, tmp_path: Path) -> None:
    """A package that passed its check elsewhere but cannot import on the node (a missing
    driver): the node says why and exits, the version is failed, and the user waiting for
    it is placed on the last good version instead."""
    cp = control_plane
    pkg = tmp_path / "noload"
    shutil.copytree(ROOT / "models" / "teto", pkg, ignore=shutil.ignore_patterns("__py*"))
    (pkg / "pitch.py").write_text("raise ImportError('libcudnn.so.9: cannot open shared "
                                  "object file')\n")
    push_version(cp.state, cp.config, "teto", canary=99, package=pkg)
    got = lobby(cp.ws_url, "user=w&model=teto&region=us-west", timeout_s=60)
    assert got[0]["version"] == "2" and got[-1]["type"] == "ready", got
    assert got[-1]["version"] == "1", got
    entry = cp.state.model_entry("teto")
    assert entry is not None and "failed to load" in entry.versions["2"].failed
    assert cp.state.version_health("teto", "2").load_failed >= 1


@pytest.fixture
def own_store(redis_url: str, tmp_path: Path) -> Iterator[tuple[Webapp, Fleet]]:
    """A webapp and nodes with a package store of their own (this test corrupts it)."""
    cfg = make_config(redis_url, DATABASE_URL=f"sqlite:///{tmp_path / 'b.sqlite'}",
                      VOICE_PACKAGE_STORE=str(tmp_path / "store"))
    state = State(connect(redis_url))
    host, server = serve(create_app(cfg, state))
    fleet = Fleet(cfg, state, tmp_path, f"http://{host}")
    yield Webapp(f"http://{host}", f"ws://{host}", cfg, state), fleet
    procs.stop(fleet.procs)
    server.shutdown()


def test_nodes_fetch_only_their_own_package_and_check_its_digest(
        own_store: tuple[Webapp, Fleet], tmp_path: Path) -> None:
    webapp, fleet = own_store
    miku, teto = (webapp.state.model_entry(m) for m in ("miku", "teto"))
    assert miku is not None and teto is not None
    d_miku, d_teto = miku.versions["1"].digest, teto.versions["1"].digest
    node_id, token = fleet.enroll("miku")
    grant = requests.post(f"{webapp.base_url}/api/nodes/join", timeout=5,
                          json={"token": token, "url": "ws://127.0.0.1:9/ws"}).json()
    assert grant["digest"] == d_miku and grant["capacity"] == 4
    auth = {"Authorization": f"Bearer {grant['credential']}"}
    own = requests.get(f"{webapp.base_url}/api/nodes/package/{d_miku}", headers=auth,
                       timeout=5)
    assert own.status_code == 200 and sha256(own.content) == d_miku
    other = requests.get(f"{webapp.base_url}/api/nodes/package/{d_teto}", headers=auth,
                         timeout=5)
    assert other.status_code == 403 and "may fetch only that package" in other.json()["message"]
    anon = requests.get(f"{webapp.base_url}/api/nodes/package/{d_miku}", timeout=5)
    assert anon.status_code == 401
    # the stored archive changed after the push: a node refuses it and says so
    _, other_bytes, _ = pack(ROOT / "models" / "kaito")
    (tmp_path / "store" / f"{d_miku}.tar.gz").write_bytes(other_bytes)
    node_id = fleet.start("miku", wait=False)
    wait_for(lambda: (tmp_path / f"{node_id}.log").exists()
             and "digest mismatch" in (tmp_path / f"{node_id}.log").read_text(), 30,
             "the node did not refuse a package whose digest does not match")
    wait_for(lambda: webapp.state.version_health("miku", "1").load_failed == 1, 10)
    assert catalog.version(webapp.state, "miku", "1") is not None


def test_packages_in_an_s3_bucket_reach_the_node(redis_url: str, moto: str,
                                                 tmp_path: Path) -> None:
    """Deployments keep packages in an S3-compatible bucket (here moto's S3): the control
    plane stores the config's packages there and the node fetches its own through it."""
    import boto3
    boto3.client("s3", endpoint_url=moto, region_name="us-east-1", aws_access_key_id="t",
                 aws_secret_access_key="t").create_bucket(Bucket="models")
    store = f"s3://models/v1?endpoint_url={moto}&region=us-east-1"
    cfg = make_config(redis_url, DATABASE_URL=f"sqlite:///{tmp_path / 'b.sqlite'}",
                      VOICE_PACKAGE_STORE=store, AWS_ACCESS_KEY_ID="t",
                      AWS_SECRET_ACCESS_KEY="t")
    state = State(connect(redis_url))
    host, server = serve(create_app(cfg, state))
    fleet = Fleet(cfg, state, tmp_path, f"http://{host}")
    try:
        digest = catalog.version(state, "robot", "1").digest   # type: ignore[union-attr]
        assert catalog.store(cfg).has(digest)
        node_id = fleet.start("robot")
        node = state.node(node_id)
        assert node is not None and node.digest == digest
    finally:
        procs.stop(fleet.procs)
        server.shutdown()
