"""The node's server in process: real sockets on its asyncio loop, the node's runtime built
directly (no Redis), processors injected through `make_processor`."""

from __future__ import annotations

import base64
import gc
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import requests
from conftest import closed_code
from simple_websocket import Client

from common.tickets import Ticket, sign, sign_control
from provisioner.states import NodeState
from worker_node import priority, server
from worker_node.package import Processor
from worker_node.runtime import NodeRuntime, Stream
from worker_node.server import NodeServer
from worker_node.splice import SpliceShifter

SECRET = "loop-secret"
RATE, FRAME = 48000, 960


class Recording:
    """Wraps a processor; notes which thread ran each call."""

    threads: list[str] = []

    def __init__(self, inner: Processor, fail_after: int | None = None) -> None:
        self.inner, self.fail_after, self.calls = inner, fail_after, 0
        self.sample_rate, self.latency_samples = inner.sample_rate, inner.latency_samples

    def process(self, frames: np.ndarray) -> np.ndarray:
        Recording.threads.append(threading.current_thread().name)
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated model failure")
        return self.inner.process(frames)


def serve_node(make_processor: Callable[[int], Processor],
               closed: list[Stream] | None = None,
               orders: list[dict[str, object]] | None = None) -> tuple[str, NodeServer]:
    node = NodeRuntime(id="n-loop", model="miku", version="1", region="us-west",
                       provider="local", digest="", capacity=8, load_s=0.0,
                       state=NodeState.READY)
    srv = NodeServer(node, SECRET, make_processor=make_processor,
                     on_close=lambda s, current: (closed if closed is not None else []).append(s),
                     on_order=(orders if orders is not None else []).append)
    port = srv.start("127.0.0.1", 0)
    return f"ws://127.0.0.1:{port}/ws", srv


@pytest.fixture
def shifting() -> Iterator[tuple[str, NodeServer, list[Stream]]]:
    Recording.threads = []
    closed: list[Stream] = []
    url, srv = serve_node(
        lambda rate: Recording(SpliceShifter(rate, 4.0), fail_after=3 if rate == 16000 else None),
        closed)
    yield url, srv, closed
    srv.stop()
    assert srv.stopped.wait(10)


def open_stream(url: str, user: str, rate: int = RATE) -> Client:
    tok = sign(Ticket(user, f"s-{user}", "n-loop", "miku", "1", 1, time.time() + 60), SECRET)
    ws = Client.connect(f"{url}?ticket={tok}")
    ws.send(json.dumps({"type": "start", "sample_rate": rate}))
    assert json.loads(ws.receive(timeout=5))["type"] == "started"
    return ws


def tone(hz: float, seconds: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (8000 * np.sin(2 * np.pi * hz * t)).astype("<i2")


def test_accepted_socket_has_nodelay(shifting: tuple[str, NodeServer, list[Stream]]) -> None:
    """Nagle off on the node's side: an answer never waits for the last one's ACK."""
    url, srv, _ = shifting
    ws = open_stream(url, "nagle")
    (conn,) = srv.conns
    sock = conn.ws.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    ws.send(json.dumps({"type": "stop"}))
    assert closed_code(ws)[0] == 1000


def test_a_loaded_model_leaves_the_heap_frozen() -> None:
    """What the node built while loading lives for the process: once loaded it is out of the
    collector's sight (no full passes of tens of ms on the audio thread), frozen by the
    loading thread before the first stream, not on the audio thread when it arrives."""
    node = NodeRuntime(id="n-load", model="miku", version="1", region="us-west",
                       provider="local", digest="", capacity=4, load_s=0.0)
    gc.unfreeze()
    node.load(lambda digest: object())  # type: ignore[arg-type,return-value]
    assert node.state is NodeState.READY and gc.get_freeze_count() > 0


def test_no_deflate_and_the_audio_thread_raised(
        shifting: tuple[str, NodeServer, list[Stream]]) -> None:
    """Chromium offers permessage-deflate; inflating and deflating every PCM frame in
    Python cost the old node CPU per frame for nothing."""
    url, _, _ = shifting
    port = int(url.split(":")[2].split("/")[0])
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    raw.sendall(f"GET /ws?ticket=x HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
                "\r\n".encode())
    head = raw.recv(4096).split(b"\r\n\r\n")[0].lower()
    raw.close()
    assert head.startswith(b"http/1.1 101") and b"sec-websocket-extensions" not in head
    ws = open_stream(url, "frozen")
    assert sys.getswitchinterval() == server.SWITCH_INTERVAL_S
    loop = shifting[1]   # with CAP_SYS_NICE: the audio thread raised, its helpers not
    assert loop.thread_id is not None      # with CAP_SYS_NICE: the audio thread, only it, raised
    if loop.scheduling.startswith("SCHED_RR"):
        assert os.sched_getscheduler(loop.thread_id) == os.SCHED_RR
        assert os.sched_getparam(loop.thread_id).sched_priority == \
            priority.AUDIO_THREAD_RT_PRIORITY
        assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER
    elif loop.scheduling.startswith("nice"):
        assert os.getpriority(os.PRIO_PROCESS, loop.thread_id) == priority.AUDIO_THREAD_NICE
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != \
            priority.AUDIO_THREAD_NICE
    else:
        assert loop.scheduling == "normal"
    ws.send(json.dumps({"type": "stop"}))
    assert closed_code(ws)[0] == 1000


def test_streams_share_one_loop_each_in_order_and_exact(
        shifting: tuple[str, NodeServer, list[Stream]]) -> None:
    """Four interleaved streams, one thread runs every processor, and each stream gets
    exactly what its own processor run directly on its frames gives, in order."""
    url, _, closed = shifting
    signals = [tone(150.0 * (k + 1), 0.4) for k in range(4)]
    sockets = [open_stream(url, f"u{k}") for k in range(4)]
    got: list[list[bytes]] = [[] for _ in range(4)]
    for i in range(0, len(signals[0]), FRAME):   # frames of all four in flight at once
        for k, ws in enumerate(sockets):
            ws.send(signals[k][i:i + FRAME].tobytes())
        for k, ws in enumerate(sockets):
            answer = ws.receive(timeout=5)
            assert isinstance(answer, bytes)
            got[k].append(answer)
    for k, ws in enumerate(sockets):
        ws.send(json.dumps({"type": "stop"}))
        assert closed_code(ws)[0] == 1000
        direct = SpliceShifter(RATE, 4.0)
        want = b"".join(direct.process(signals[k][i:i + FRAME]).astype("<i2").tobytes()
                        for i in range(0, len(signals[k]), FRAME))
        assert b"".join(got[k]) == want, f"stream {k} differs from a direct run"
    assert set(Recording.threads) == {"audio-loop"}
    assert sorted(round(s.seconds, 6) for s in closed) == [0.4] * 4   # every frame metered


def test_healthz_control_and_unknown_paths_over_plain_http() -> None:
    """The same port answers /healthz, takes the control plane's signed orders on /control
    (the order in a header: the WebSocket library parses GETs only), and refuses the rest."""
    orders: list[dict[str, object]] = []
    url, srv = serve_node(lambda rate: SpliceShifter(rate, 4.0), orders=orders)
    http = url.replace("ws://", "http://").removesuffix("/ws")
    try:
        health = requests.get(f"{http}/healthz", timeout=5)
        assert health.status_code == 200 and health.json()["state"] == "ready"
        order = json.dumps({"kick": ["s-x"]})
        ok = requests.get(f"{http}/control", timeout=5, headers={
            "X-Order": order, "X-Signature": sign_control(order.encode(), SECRET)})
        assert ok.status_code == 200 and orders == [{"kick": ["s-x"]}]
        forged = requests.get(f"{http}/control", timeout=5, headers={
            "X-Order": order, "X-Signature": sign_control(order.encode(), "not-the-key")})
        assert forged.status_code == 403 and "signature" in forged.json()["message"]
        assert orders == [{"kick": ["s-x"]}]
        junk = requests.get(f"{http}/control", timeout=5, headers={
            "X-Order": "[1]", "X-Signature": sign_control(b"[1]", SECRET)})
        assert junk.status_code == 400 and "JSON object" in junk.json()["message"]
        missing = requests.get(f"{http}/nothing", timeout=5)
        assert missing.status_code == 404 and "/ws?ticket" in missing.json()["message"]
    finally:
        srv.stop()


def test_a_kick_settles_before_the_close_and_a_notice_arrives(
        shifting: tuple[str, NodeServer, list[Stream]]) -> None:
    """Take-over and drain come from other threads: a notice reaches the page as text, and
    a kicked stream is settled (metered, slot freed) before its client hears the code."""
    url, srv, closed = shifting
    ws = open_stream(url, "kicked")
    ws.send(tone(200.0, 0.02).tobytes())
    assert len(ws.receive(timeout=5)) == 2 * FRAME
    stream = srv.node.streams["s-kicked"]
    threading.Thread(target=stream.notify, args=('{"type": "move"}',)).start()
    assert json.loads(ws.receive(timeout=5)) == {"type": "move"}
    threading.Thread(target=srv.node.kick, args=("s-kicked", 4409, "taken over")).start()
    code, reason = closed_code(ws)
    assert (code, reason) == (4409, "taken over")
    assert [round(s.seconds, 6) for s in closed] == [0.02] and not srv.node.streams


def test_a_stalled_model_does_not_blame_the_client(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A model call that hangs longer than the idle timeout: the silence was the node's, so
    the stream goes on afterwards instead of closing 4400 'no audio'."""
    monkeypatch.setattr("worker_node.protocol.IDLE_TIMEOUT_S", 0.5)
    stall = {"s": 1.5}

    class Hanging(SpliceShifter):
        def process(self, frames: np.ndarray) -> np.ndarray:
            time.sleep(stall.pop("s", 0.0))   # the first frame hangs, as a GPU driver can
            return super().process(frames)

    url, srv = serve_node(lambda rate: Hanging(rate, 4.0))
    try:
        ws = open_stream(url, "patient")
        ws.send(tone(200.0, 0.02).tobytes())
        ws.send(tone(200.0, 0.02).tobytes())   # waits out the stall in the socket
        assert len(ws.receive(timeout=5)) == 2 * FRAME
        assert len(ws.receive(timeout=5)) == 2 * FRAME
        ws.send(tone(200.0, 0.02).tobytes())
        assert len(ws.receive(timeout=5)) == 2 * FRAME
        ws.send(json.dumps({"type": "stop"}))
        assert closed_code(ws)[0] == 1000
    finally:
        srv.stop()


def test_failing_model_closes_its_stream_only(
        shifting: tuple[str, NodeServer, list[Stream]]) -> None:
    url, _, _ = shifting
    good = open_stream(url, "good")
    bad = open_stream(url, "bad", rate=16000)    # its processor fails on the 4th frame
    for _ in range(4):     # the 4th fails; a 5th send could race the close
        bad.send(tone(200.0, 0.02, 16000).tobytes())
    code, reason = closed_code(bad)
    assert code == 1011 and "model failed" in reason and "lobby" in reason
    for _ in range(10):
        good.send(tone(200.0, 0.02).tobytes())
        assert len(good.receive(timeout=5)) == 2 * FRAME
    good.send(json.dumps({"type": "stop"}))
    assert closed_code(good)[0] == 1000


def test_client_that_never_reads_does_not_stall_others(
        shifting: tuple[str, NodeServer, list[Stream]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends and never reads: its answers fill its own buffers, its
    coroutine waits to write and stops reading it (TCP then holds its sender back), every
    other stream flows meanwhile, and after the idle timeout the node lets it go."""
    monkeypatch.setattr("worker_node.protocol.IDLE_TIMEOUT_S", 3.0)
    url, srv, closed = shifting
    tok = sign(Ticket("deaf", "s-deaf", "n-loop", "miku", "1", 1, time.time() + 60), SECRET)
    deaf = Client.connect(f"{url}?ticket={tok}", thread_class=_NoThread)
    deaf.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf.send(json.dumps({"type": "start", "sample_rate": RATE}))
    frame100 = tone(180.0, 0.1).tobytes()        # 100 ms frames fill buffers fastest
    sent = [0]

    def flood() -> None:
        try:
            while sent[0] < 5000:
                deaf.send(frame100)
                sent[0] += 1
        except OSError:
            pass   # closed at the end of the test

    threading.Thread(target=flood, daemon=True).start()
    good = open_stream(url, "good")
    held_at, still = -1, 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and still < 20:
        good.send(tone(200.0, 0.02).tobytes())   # flows all along
        assert len(good.receive(timeout=5)) == 2 * FRAME
        still = still + 1 if sent[0] == held_at else 0
        held_at = sent[0]
        time.sleep(0.01)
    assert still >= 20 and sent[0] < 5000, "the deaf sender was never held back"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "s-deaf" not in [c.session_id for c in closed]:
        good.send(tone(200.0, 0.02).tobytes())
        assert len(good.receive(timeout=5)) == 2 * FRAME
    assert "s-deaf" in [c.session_id for c in closed], "the deaf client holds its slot"
    good.send(json.dumps({"type": "stop"}))
    assert closed_code(good)[0] == 1000
    deaf.sock.close()


class _NoThread:
    """A client that reads nothing: no reader thread at all."""

    def __init__(self, target: Callable[[], None]) -> None:
        self.name = "deaf"

    def start(self) -> None:
        pass


def test_lateness_counts_frames_that_waited_unread_not_a_clients_pauses() -> None:
    """A real-time client, 20 ms frames: a model that takes 30 ms a frame falls behind and
    its frames wait unread, which the node's lateness (p95, reported in its beats) shows;
    a fast model's client that pauses 300 ms, then sends a burst, is not late."""
    def lateness(model_s: float, pause: bool) -> float | None:
        class Model(SpliceShifter):
            def process(self, frames: np.ndarray) -> np.ndarray:
                time.sleep(model_s)
                return super().process(frames)

        url, srv = serve_node(lambda rate: Model(rate, 4.0))
        try:
            ws = open_stream(url, "paced")
            next_at = time.monotonic()
            for i in range(60):
                if pause and i == 30:
                    next_at += 0.3                   # the client's own hiccup
                time.sleep(max(0.0, next_at - time.monotonic()))
                ws.send(tone(200.0, 0.02).tobytes())
                next_at += 0.02
            for _ in range(60):
                assert len(ws.receive(timeout=10)) == 2 * FRAME
            late = srv.progress()[1]
            ws.send(json.dumps({"type": "stop"}))
            closed_code(ws)
            return late
        finally:
            srv.stop()

    slow = lateness(0.03, pause=False)
    assert slow is not None and slow > 100, slow     # ~10 ms more behind each frame
    fine = lateness(0.0, pause=True)
    assert fine is not None and fine < 40, fine
