"""bench/faults.py's users: asyncio clients that behave as the page does (webapp/static),
in an event loop of their own thread, recording what a person would hear.

Each user opens the lobby (`user=`, `model=`, `region=`), streams 20 ms frames of 16-bit
PCM at 16 kHz at real-time pace to the node `ready` names, and keeps each answer's arrival
time (the longest silence it heard), its round trip (frames are answered in order) and the
node that answered. As the page does:
- no answer for STALL_S (1.5 s) while sending: leave the node (close, no stop) and resume;
- a stream closed (any code but 4409, 4401 and 4400, which the page takes as fatal) or a
  stall: resume with `resume=SESSION` after 1, 2, 4, 8 s (reset after 10 s of streaming);
- `move`: make-before-break (the lobby with `resume`, the new stream, frames to both, `stop`
  to the old stream once the new one answered);
- the lobby's `unavailable`, or no lobby at all: try again 1, 2, 4 ... 15 s apart; a lobby
  lost while holding a session: resume it after the node-loss backoff.
Where the page would give up (4401, 4400, a refused resume) the bench counts it and goes on.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter, deque
from contextlib import suppress
from typing import Any

import numpy as np
import websockets

RATE, FRAME_S = 16000, 0.02
STALL_S = 1.5          # webapp/static/state.js STALL_MS
STABLE_S = 10.0        # state.js STABLE_MS: streaming this long resets the retry count
FATAL = {4401: "ticket refused", 4409: "taken over", 4400: "audio rejected"}
_FRAME = (6000 * np.sin(2 * np.pi * 150.0 * np.arange(int(RATE * FRAME_S)) / RATE)
          ).astype("<i2").tobytes()


class Loop:
    """An asyncio loop in a daemon thread: users run there, the bench waits in its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="users").start()

    def start(self, user: User) -> User:
        user.future = asyncio.run_coroutine_threadsafe(user.run(), self.loop)
        return user


class Conn:
    """One node stream: its socket, node, and the send times of frames it owes."""

    def __init__(self, ws: Any, node: str) -> None:
        self.ws, self.node = ws, node
        self.owed: deque[float] = deque()
        self.last_answer = time.monotonic()
        self.answers = 0


class User:
    def __init__(self, ws_url: str, user: str, query: str) -> None:
        self.ws_url, self.user, self.query = ws_url, user, query
        self.session: str | None = None
        self.stopping = False              # set by the bench: stop, then end
        self.future: Any = None
        self.node: str | None = None       # the node of the current stream
        self.answers: list[float] = []     # monotonic arrival of every answer, any stream
        self.answered = 0                  # frames answered (the seconds nodes bill / 0.02)
        self.rtt: list[tuple[float, str, float]] = []   # (arrival, node, round trip)
        self.drops: list[dict[str, Any]] = []
        self.moves: list[dict[str, Any]] = []
        self.closes: Counter[str] = Counter()
        self.lobby_errors: Counter[str] = Counter()
        self.refused_tickets = 0
        self.refused_resumes = 0
        self.page_gave_up: list[str] = []  # where the page would have stopped (fatal)
        self.first_lobby: float | None = None
        self.first_lobby_wall: float | None = None
        self.booted: bool | None = None     # the bench's: was a node booted for it
        self.first_ready: float | None = None
        self.first_answer: float | None = None
        self.queued: list[tuple[float, dict[str, Any]]] = []
        self.placed: list[tuple[float, str, str]] = []   # every `ready`: when, node, region
        self.notices: list[dict[str, Any]] = []   # every `move`: when, from, what came of it
        self._next: dict[str, Any] | None = None  # a move's `ready` that came after the close

    # --- what the bench reads -------------------------------------------------------

    def streaming_on(self) -> str | None:
        return self.node if self.answers and time.monotonic() - self.answers[-1] < 0.5 else None

    def longest_gap(self, since: float = 0.0, until: float = float("inf")) -> float:
        ts = [t for t in self.answers if since <= t <= until]
        return float(np.diff(ts).max()) if len(ts) > 1 else 0.0

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop streaming (`stop`, the node's last answers); a user still waiting in the
        lobby leaves it."""
        self.stopping = True
        if self.future is not None:
            try:
                self.future.result(timeout_s)
            except (TimeoutError, asyncio.CancelledError):
                self.future.cancel()

    # --- the page ---------------------------------------------------------------------

    async def lobby(self, resume: str | None) -> dict[str, Any]:
        """The lobby until `ready` or `error`; `queued`/`booting` name the session."""
        query = f"user={self.user}&{self.query}" + (f"&resume={resume}" if resume else "")
        async with websockets.connect(f"{self.ws_url}/ws/session?{query}", compression=None,
                                      open_timeout=10, close_timeout=1) as ws:
            async for raw in ws:
                msg = json.loads(raw)
                if msg.get("session_id") and msg["type"] in ("queued", "booting"):
                    self.session = self.session or msg["session_id"]
                    self.queued.append((time.monotonic(), msg))
                if msg["type"] in ("ready", "error"):
                    return dict(msg)
        raise ConnectionError("the lobby closed without ready or error")

    async def run(self) -> None:
        retries, lobby_retries = 0, 0
        while not self.stopping:
            asked = self.session
            if self.first_lobby is None:
                self.first_lobby, self.first_lobby_wall = time.monotonic(), time.time()
            try:
                msg, self._next = self._next or await self.lobby(asked), None
            except (OSError, ConnectionError, TimeoutError, websockets.WebSocketException) as e:
                self.lobby_errors[f"lobby {type(e).__name__}"] += 1
                if self.session:      # node.js nodeLost: rejoin the session we hold
                    retries += 1
                    await asyncio.sleep(min(8.0, 2.0 ** (retries - 1)))
                else:                 # lobby.js retryLater
                    lobby_retries += 1
                    await asyncio.sleep(min(15.0, 2.0 ** (lobby_retries - 1)))
                continue
            if msg["type"] == "error":
                self.lobby_errors[msg["code"]] += 1
                if msg["code"] == "unavailable":
                    lobby_retries += 1
                    await asyncio.sleep(min(15.0, 2.0 ** (lobby_retries - 1)))
                    continue
                if asked and msg["code"] == "bad_request":   # "not a session of user": lost
                    self.refused_resumes += 1
                    self.session = None
                self.page_gave_up.append(f"lobby {msg['code']}: {msg.get('message', '')}"[:120])
                await asyncio.sleep(1.0)
                continue
            lobby_retries = 0
            if asked and msg["session_id"] != asked:
                self.refused_resumes += 1      # resumed as another session: lost
            self.session = msg["session_id"]
            self.placed.append((time.monotonic(), msg["node_id"], msg["region"]))
            self.first_ready = self.first_ready or time.monotonic()
            if self.drops and "ready" not in self.drops[-1]:
                self.drops[-1]["ready"] = time.monotonic()
            began = time.monotonic()
            why = await self.stream(msg)
            if why == "end":
                return
            self.drops.append({"t": time.monotonic(), "why": why, "node": msg["node_id"]})
            if self._next is not None:
                continue      # the move's new node: no backoff
            if time.monotonic() - began > STABLE_S:
                retries = 0
            retries += 1
            await asyncio.sleep(min(8.0, 2.0 ** (retries - 1)))

    async def _open(self, ready: dict[str, Any]) -> Conn:
        ws = await websockets.connect(f"{ready['node_url']}?ticket={ready['ticket']}",
                                      compression=None, open_timeout=5, close_timeout=1)
        await ws.send(json.dumps({"type": "start", "sample_rate": RATE}))
        try:
            started = json.loads(await asyncio.wait_for(ws.recv(), 5))
        except websockets.ConnectionClosed:
            if ws.close_code == 4401:
                self.refused_tickets += 1
            raise
        if started.get("type") != "started":
            await ws.close()
            raise ValueError(f"refused by node: {started}")
        return Conn(ws, ready["node_id"])

    async def _read(self, conn: Conn, moving: list[Any]) -> None:
        async for msg in conn.ws:
            now = time.monotonic()
            if isinstance(msg, bytes):
                conn.last_answer = now
                conn.answers += 1
                self.answered += 1
                self.answers.append(now)
                self.first_answer = self.first_answer or now
                if conn.owed:
                    self.rtt.append((now, conn.node, now - conn.owed.popleft()))
            elif json.loads(msg).get("type") == "move" and not moving and conn.node == self.node:
                self.notices.append({"t": now, "from": conn.node, "outcome": "pending"})
                moving.append({"notice": now, "from": conn.node, "record": self.notices[-1],
                               "lobby": asyncio.create_task(self.lobby(self.session))})

    async def stream(self, ready: dict[str, Any]) -> str:
        """Stream until stopped ("end") or until the stream breaks (why)."""
        try:
            cur = await self._open(ready)
        except websockets.ConnectionClosed as e:
            self.closes[str(e.rcvd.code if e.rcvd else "none")] += 1
            return f"open: closed {e.rcvd.code if e.rcvd else 'none'}"
        except (OSError, TimeoutError, ValueError, websockets.WebSocketException) as e:
            return f"open: {type(e).__name__}"
        self.node = cur.node
        moving: list[dict[str, Any]] = []
        old: tuple[Conn, asyncio.Task[None]] | None = None    # a move's old stream
        reader = asyncio.create_task(self._read(cur, moving))
        next_t = time.monotonic()
        try:
            while not self.stopping and not reader.done():
                now = time.monotonic()
                for c in ([cur] + ([old[0]] if old else [])):
                    try:
                        await c.ws.send(_FRAME)
                        c.owed.append(now)
                    except websockets.ConnectionClosed:
                        pass
                if moving and moving[0]["lobby"].done():
                    move = moving.pop()
                    new = None
                    try:
                        got = move["lobby"].result()
                        move["record"]["outcome"] = f"lobby {got.get('code', got['type'])}"
                        if got["type"] == "ready":
                            new = await self._open(got)
                    except (OSError, ConnectionError, TimeoutError, ValueError,
                            websockets.WebSocketException) as e:
                        move["record"]["outcome"] = f"failed: {type(e).__name__}"
                        new = None
                    if new is not None:    # make-before-break: both until the new answers
                        move["record"]["outcome"] = "moved"
                        old = (cur, reader)
                        cur, self.node = new, new.node
                        reader = asyncio.create_task(self._read(cur, moving))
                        move["to"] = new.node
                        self.moves.append(move)
                if old and (cur.answers or old[1].done()):
                    self._retire(*old)
                    if self.moves and "done" not in self.moves[-1]:
                        self.moves[-1]["done"] = time.monotonic()
                    old = None
                if not old and not moving and now - cur.last_answer > STALL_S:
                    # as the page's ws.close(): no waiting for a hung node's close frame
                    reader.cancel()
                    self.closes["stalled"] += 1
                    return "no audio for 1.5 s"
                next_t = max(next_t + FRAME_S, time.monotonic() - 0.2)
                await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            if reader.done() and moving:
                # node.js: closed before the new node was ready; the move's lobby goes on
                move = moving.pop()
                move["record"]["outcome"] = "old stream closed first"
                with suppress(OSError, ConnectionError, TimeoutError,
                              websockets.WebSocketException):
                    got = await asyncio.wait_for(move["lobby"], 60)
                    if got["type"] == "ready":
                        self._next = got
            if reader.done():
                code = cur.ws.close_code
                self.closes[str(code)] += 1
                if code in FATAL:
                    self.page_gave_up.append(f"node {cur.node}: {code} {FATAL[code]}")
                    if code == 4401:
                        self.refused_tickets += 1
                return f"closed {code}"
            await cur.ws.send(json.dumps({"type": "stop"}))
            try:
                await asyncio.wait_for(reader, 5)
            except (TimeoutError, websockets.WebSocketException):
                pass
            self.closes[str(cur.ws.close_code)] += 1
            return "end"
        finally:
            reader.cancel()
            for m in moving:
                m["lobby"].cancel()
            if old:
                self._retire(*old)
            asyncio.get_running_loop().create_task(cur.ws.close())   # the page's close()

    def _retire(self, conn: Conn, reader: asyncio.Task[None]) -> None:
        async def go() -> None:
            try:
                await conn.ws.send(json.dumps({"type": "stop"}))
                await asyncio.wait_for(reader, 2)
            except (TimeoutError, websockets.WebSocketException):
                pass
            finally:
                reader.cancel()
                await conn.ws.close()
        asyncio.get_running_loop().create_task(go())

    def figures(self) -> dict[str, Any]:
        return {"user": self.user, "answered_s": round(self.answered * FRAME_S, 2),
                "longest_gap_s": round(self.longest_gap(), 3), "drops": len(self.drops),
                "moves": len(self.moves), "closes": dict(self.closes),
                "refused_tickets": self.refused_tickets,
                "refused_resumes": self.refused_resumes,
                "lobby_errors": dict(self.lobby_errors), "page_gave_up": self.page_gave_up}
