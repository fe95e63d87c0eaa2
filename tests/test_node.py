"""The worker node through real WebSockets: a real node process, real tickets, real Redis."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from conftest import SECRET, Fleet, closed_code, place, wait_for
from simple_websocket import Client

from common.states import NodeState
from common.tickets import Ticket, node_key, sign
from provisioner.state import State
from research.quality import cents, harmonic_tone, pitch_hz
from voicectl import procs
from worker_node.agent import Agent
from worker_node.control import ControlClient
from worker_node.runtime import NodeRuntime

RATE = 48000
FRAME = 960  # 20 ms


def ticket(node_id: str, user: str = "alice", session: str | None = None, model: str = "miku",
           version: str = "1", fence: int = 1, exp_in_s: float = 60.0,
           secret: str = SECRET, state: State | None = None) -> str:
    """A ticket as the lobby signs one; with `state`, the session is placed on the node as
    the lobby places it (what the node reports of it is then believed)."""
    session = session or f"s-{user}-{fence}"
    if state is not None:
        place(state, node_id, user, session, fence)
    return sign(Ticket(user=user, session=session, node=node_id, model=model,
                       version=version, fence=fence, exp=time.time() + exp_in_s),
                node_key(secret, node_id))


def open_stream(url: str, tok: str, rate: int = RATE) -> tuple[Client, dict]:
    ws = Client.connect(f"{url}?ticket={tok}")
    ws.send(json.dumps({"type": "start", "sample_rate": rate}))
    started = json.loads(ws.receive(timeout=5))
    assert started["type"] == "started", started
    return ws, started


def stream_tone(ws: Client, signal: np.ndarray, frame: int = FRAME) -> np.ndarray:
    pcm = (signal * 12000).astype("<i2")
    out = []
    for i in range(0, len(pcm) - frame + 1, frame):
        ws.send(pcm[i:i + frame].tobytes())
        got = ws.receive(timeout=5)
        assert isinstance(got, bytes) and len(got) == 2 * frame
        out.append(np.frombuffer(got, dtype="<i2"))
    return np.concatenate(out).astype(np.float64) / 12000


@pytest.fixture
def node(fleet: Fleet) -> tuple[Fleet, str]:
    return fleet, fleet.start("miku", node_id="n-miku")


def test_four_streams_shifted_and_fifth_refused(node: tuple[Fleet, str]) -> None:
    fleet, node_id = node
    url = fleet.url(node_id)
    streams = [open_stream(url, ticket(node_id, state=fleet.state, user=f"u{i}"))[0]
               for i in range(4)]
    fifth = Client.connect(f"{url}?ticket={ticket(node_id, state=fleet.state, user='u5')}")
    code, reason = closed_code(fifth)
    assert code == 4503 and "full" in reason
    assert len(fleet.state.live_sessions(node_id)) == 4

    tone = harmonic_tone(150.0, RATE, 1.0)
    outputs: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        outputs[i] = stream_tone(streams[i], tone)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(outputs) == 4
    for ws in streams:
        ws.send(json.dumps({"type": "stop"}))
        assert closed_code(ws)[0] == 1000
    # Pitch after the streams stop: a cold process's first librosa call (numba compiling)
    # may take longer than the node's 30 s idle limit.
    target = 150.0 * 2 ** (4 / 12)   # miku shifts +4 semitones
    for out in outputs.values():
        assert abs(cents(pitch_hz(out[RATE // 4:], RATE), target)) < 25
    deadline = time.monotonic() + 5
    while fleet.state.live_sessions(node_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fleet.state.live_sessions(node_id) == []   # stop released every slot


def test_refused_while_loading(fleet: Fleet) -> None:
    node_id = fleet.start("miku", load_s=30, wait=False)
    node = fleet.wait_state(node_id, "loading")
    ws = Client.connect(f"{node.url}?ticket={ticket(node_id, state=fleet.state)}")
    code, reason = closed_code(ws)
    assert code == 4503 and "loading" in reason


@pytest.mark.parametrize("case", ["forged", "expired", "foreign_node", "foreign_model",
                                  "garbage", "missing"])
def test_bad_tickets_get_4401(node: tuple[Fleet, str], case: str) -> None:
    fleet, node_id = node
    tok = {
        "forged": ticket(node_id, state=fleet.state, secret="not-the-secret"),
        "expired": ticket(node_id, state=fleet.state, exp_in_s=-5),
        "foreign_node": ticket("n-other"),
        "foreign_model": ticket(node_id, state=fleet.state, model="teto"),
        "garbage": "abc.def",
        "missing": "",
    }[case]
    code, reason = closed_code(Client.connect(f"{fleet.url(node_id)}?ticket={tok}"))
    assert code == 4401, (code, reason)
    assert "lobby" in reason   # every refusal says what to do next


@pytest.mark.parametrize("first, bad, needle", [
    ('{"type": "start", "sample_rate": 48000}', b"\x01\x02\x03", "odd length"),
    ('{"type": "start", "sample_rate": 48000}', b"\x00\x00" * 100, "10-100 ms"),
    ('{"type": "start", "sample_rate": 48000}', b"\x00\x00" * 9600, "10-100 ms"),
    ('{"type": "start", "sample_rate": 48000}', "not json", "not JSON"),
    ('{"type": "start", "sample_rate": 48000}', '{"type": "dance"}', "dance"),
    ('{"type": "start", "sample_rate": 96000}', None, "8000-48000"),
    ('{"type": "hello"}', None, "start"),
    ("[1, 2]", None, "JSON object"),
])
def test_malformed_input_gets_error_and_4400_others_unharmed(
        node: tuple[Fleet, str], first: str, bad: bytes | str | None, needle: str) -> None:
    fleet, node_id = node
    url = fleet.url(node_id)
    good, _ = open_stream(url, ticket(node_id, state=fleet.state, user="good"))
    ws = Client.connect(f"{url}?ticket={ticket(node_id, state=fleet.state, user='bad')}")
    ws.send(first)
    if bad is not None:
        assert json.loads(ws.receive(timeout=5))["type"] == "started"
        ws.send(bad)
    err = json.loads(ws.receive(timeout=5))
    assert err["type"] == "error" and needle in err["message"], err
    assert closed_code(ws)[0] == 4400
    out = stream_tone(good, harmonic_tone(150.0, RATE, 0.3))   # the other stream goes on
    assert len(out) == int(0.3 * RATE) // FRAME * FRAME


def test_stale_ticket_refused_and_newer_takes_over(node: tuple[Fleet, str]) -> None:
    fleet, node_id = node
    url = fleet.url(node_id)
    old, _ = open_stream(url, ticket(node_id, state=fleet.state, user="carol", fence=5))
    new, _ = open_stream(url, ticket(node_id, state=fleet.state, user="carol", fence=6))
    code, reason = closed_code(old)
    assert code == 4409 and "taken over" in reason
    stale = ticket(node_id, state=fleet.state, user="carol", fence=4)
    code, reason = closed_code(Client.connect(f"{url}?ticket={stale}"))
    assert code == 4401 and "stale" in reason
    assert len(stream_tone(new, harmonic_tone(150.0, RATE, 0.1))) > 0


def test_started_reports_latency_and_odd_rates_work(node: tuple[Fleet, str]) -> None:
    fleet, node_id = node
    ws, started = open_stream(fleet.url(node_id), ticket(node_id, state=fleet.state), rate=16000)
    assert 0 < started["latency_ms"] <= 20 and started["model"] == "miku"
    out = stream_tone(ws, harmonic_tone(150.0, 16000, 0.5), frame=320)
    assert len(out) == 8000


def test_healthz_reports_load_progress(fleet: Fleet) -> None:
    import urllib.request

    node_id = fleet.start("teto", load_s=3, wait=False)
    node = fleet.wait_state(node_id, "loading")
    http = node.url.replace("ws://", "http://").replace("/ws", "/healthz")
    seen = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        snap = json.load(urllib.request.urlopen(http, timeout=2))
        seen.append((snap["state"], snap["progress"]))
        if snap["state"] == "ready":
            break
        time.sleep(0.2)
    assert seen[-1] == ("ready", 1.0)
    progress = [p for s, p in seen if s == "loading"]
    assert progress == sorted(progress) and any(0 < p < 1 for p in progress)


def test_crash_rate_one_kills_the_node_within_a_beat(fleet: Fleet) -> None:
    node_id = fleet.start("miku", wait=False, crash_rate=1.0)
    proc = fleet.procs[-1]
    wait_for(lambda: (rec := fleet.state.node(node_id)) and rec.url, 20, "node never joined")
    joined = time.monotonic()
    assert proc.wait(timeout=20) == 70     # the simulated GPU crash exit code
    assert time.monotonic() - joined <= fleet.cfg.heartbeat_interval_s + 1.0   # its 1st beat


class _Draws:
    """The same draw every time: whether a pass crashes depends on its chance alone."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def test_crash_chance_follows_the_clock_not_the_passes() -> None:
    """CRASH_RATE is a chance per minute: a node passing its loop often (loading, orders)
    must not die more often. Each pass is charged the time it really took: 40 passes in
    0.4 s survive a draw of 0.01 (0.87 s of a 50%/min chance reaches it); a pass that waited
    the whole 1 s interval does not."""
    exits: list[int] = []
    node = NodeRuntime(id="n-crash", model="miku", version="1", region="us-west",
                       provider="local", digest="", capacity=4, load_s=0.0,
                       state=NodeState.READY)
    agent = Agent(node, ControlClient(f"http://127.0.0.1:{procs.free_port()}"), 1.0,
                  crash_rate_per_min=0.5, rng=_Draws(0.01),  # type: ignore[arg-type]
                  exit=exits.append)
    agent.start()
    try:
        for _ in range(40):
            agent.poke()
            time.sleep(0.01)
        assert exits == []
        wait_for(lambda: exits, 5, "a pass of a whole interval never crashed")
        assert exits[0] == 70
    finally:
        agent.stop()
