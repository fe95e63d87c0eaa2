"""Hostile input at the front door, against the real webapp as `voicectl run` serves it
(gunicorn's gevent worker, webapp.wsgi:local) with a real node: while sockets that never
read, never send, are dropped by the dozen, carry junk or flood from one client are open,
/healthz answers and a normal lobby places its user. No timings are asserted
(bench/hostile.py measures them)."""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Fleet, lobby, local_webapp

from common.config import Config
from provisioner.state import State
from voicectl import procs

ROOT = Path(__file__).resolve().parent.parent


def handshake(target: bytes) -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key
            + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")


def connect(port: int, source: str, data: bytes = b"") -> socket.socket:
    """A connection from `source` (any 127.x address is this machine), `data` sent."""
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    if data:
        s.sendall(data)
    return s


def drop(s: socket.socket) -> None:
    """Gone without a word: a reset."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def answer(s: socket.socket) -> bytes:
    """Everything the server says until it closes (a reset: what came before it)."""
    s.settimeout(10)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except OSError:
        pass
    finally:
        s.close()
    return got


@pytest.fixture
def served(cfg: Config, state: State, tmp_path: Path) -> Iterator[tuple[int, Fleet]]:
    """The webapp as `voicectl run` serves it, one ready node; a client may make 20 lobby
    attempts a minute."""
    port, proc = local_webapp(cfg, tmp_path, lobby_attempts_per_client=20)
    fleet = Fleet(cfg, state, tmp_path, f"http://127.0.0.1:{port}")
    try:
        fleet.start("miku", region="us-west")
        yield port, fleet
    finally:
        procs.stop([*fleet.procs, proc])


def test_webapp_serves_others_while_hostile_sockets_are_open(
        served: tuple[int, Fleet]) -> None:
    port, _ = served
    wait = b"/ws/session?user=%s&model=miku&region=ap-northeast"   # no node there: waits
    hostile: list[socket.socket] = []
    # Lobbies that wait and are never read, from addresses of their own (10 each).
    for i in range(40):
        s = connect(port, f"127.0.1.{1 + i // 10}", handshake(wait % f"deaf{i}".encode()))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hostile.append(s)
    # Connections that never send a byte, or half a request line.
    for i in range(20):
        hostile.append(connect(port, f"127.0.2.{1 + i // 10}", b"GET /ws/sess" if i % 2 else b""))
    # Lobbies opened and dropped by the dozen.
    for i in range(60):
        drop(connect(port, f"127.0.3.{1 + i // 10}", handshake(wait % f"churn{i}".encode())))
    # Junk: a 60 KB query, raw bytes that are not UTF-8, bad escapes, 15,000 parameters, a
    # request line past the server's limit.
    junk = [b"/ws/session?user=" + b"x" * 60_000 + b"&model=miku&region=us-west",
            b"/ws/session?user=\xff\xfe\x80&model=miku&region=us-west",
            b"/ws/session?user=%ff%fe&model=%c3%28&region=us-west",
            b"/ws/session?" + b"a=b&" * 15_000,
            b"/ws/session?user=" + b"y" * 70_000]
    answers = [answer(connect(port, "127.0.4.1", handshake(target))) for target in junk]
    for got in (answers[0], answers[3], answers[4]):   # refused before any lobby code runs
        assert b" 414 " in got or b" 400 " in got, got[:200]
    for got in answers[1:3]:   # a lobby error over the lobby protocol, or gunicorn's 400
        assert (b"101 Switching" in got and b'"bad_request"' in got) or b" 400 " in got, \
            got[:300]
    # One client flooding: lobbies one after another, each sent messages once it answers.
    said = []
    t0 = time.monotonic()
    for i in range(30):
        s = connect(port, "127.0.5.1", handshake(wait % f"flood{i}".encode()))
        s.settimeout(10)
        first = s.recv(65536)
        if b"101 Switching" in first:
            s.sendall(b"\x81\x85\0\0\0\0hello" * 20)   # masked text frames
        said.append(first + answer(s))
    assert b'"bad_request"' in said[0] and b"takes no messages" in said[0], said[0]
    # Past its attempts (10 at once, then one per 3 s) it is refused, saying so.
    let_in = sum(b'"queued"' in x for x in said)
    assert let_in <= 10 + (time.monotonic() - t0) / 3 + 1, let_in
    assert any(b"rate_limited" in x for x in said[10:])

    status = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).status
    assert status == 200
    ready = lobby(f"ws://127.0.0.1:{port}", "user=normal&model=miku&region=us-west")[-1]
    assert ready["type"] == "ready", ready
    for s in hostile:
        drop(s)


def test_silent_sockets_cost_the_webapp_no_thread(served: tuple[int, Fleet]) -> None:
    """500 connections from one address that never finish their headers, and 200 lobbies
    that wait: with a greenlet per socket (gevent), /healthz and a new user are served as
    before (under a thread per socket, 45 such sockets froze a 40-thread worker)."""
    port, _ = served
    wait = b"/ws/session?user=%s&model=miku&region=ap-northeast"
    held = [connect(port, "127.0.6.1", b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            for _ in range(500)]
    held += [connect(port, f"127.0.7.{1 + i // 20}", handshake(wait % f"w{i}".encode()))
             for i in range(200)]
    try:
        t0 = time.monotonic()
        status = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).status
        assert status == 200 and time.monotonic() - t0 < 5
        ready = lobby(f"ws://127.0.0.1:{port}", "user=fresh&model=miku&region=us-west")[-1]
        assert ready["type"] == "ready", ready
    finally:
        for s in held:
            drop(s)
