"""One thread reads and answers every node's heartbeat socket (`WS /api/nodes/beat`).

Why: with a handler thread and a reader thread per socket, a thousand nodes were two
thousand threads, and every beat crossed two of them, each crossing a wait for the GIL:
5.8 ms of the webapp's CPU per beat, and lobbies queued behind them (bench/scale.py). Here a
socket's request thread authenticates the node and hands the socket over; the hub thread
reads reports, records those of the last 20 ms in one Redis round trip and writes the
orders. Under werkzeug (`voicectl run`) the request thread then ends: the hub owns the
connection (wsclose.take_over), so a thousand nodes hold no thread and no request objects
(whose garbage collection paused the process for 50-150 ms). Elsewhere the request thread
waits on an event until the hub has closed the socket.
"""

from __future__ import annotations

import json
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import redis
from flask import Response
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from common import wsclose
from common.config import Config
from provisioner import membership
from provisioner.errors import BadReport, JoinError
from provisioner.state import State

log = logging.getLogger("webapp.beat_hub")

IDLE_S = 60.0                 # a heartbeat socket silent this long is closed (it reconnects)
MAX_REPORT_BYTES = 256 * 1024  # far above a full node's report
MAX_BACKLOG_BYTES = 64 * 1024  # orders a node has not read: it is not listening, drop it
RECV_BYTES = 65536
# Reports are answered in batches, one Redis round trip each: a beat waits at most BATCH_S
# for others to join it (nodes beat every 2 s; per beat, a batch of 10 costs a fifth of a
# batch of one), and a batch holds at most MAX_BATCH.
BATCH_S = 0.02
MAX_BATCH = 64
# A stamp of the beat path (stamp_beat_path) lapses after this many intervals without one: a
# shorter gap than a node's timeout (three), so nodes silenced by it never look dead.
STAMP_GAP_BEATS = 1.5

Outcome = tuple[int, str] | None   # close code and reason; None: the node closed already


class Detached(Response):
    """The answer to a request whose socket the hub took: werkzeug must not write to it
    (a dropped connection is what it ends quietly on)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionAbortedError("the socket was handed to the heartbeat hub")


@dataclass(eq=False)
class Beater:
    """One node's heartbeat socket, owned by the hub from `adopt` until it is closed."""

    sock: socket.socket
    wsc: Any                       # the wsproto connection, past its handshake
    node_id: str
    credential: str
    owned: bool                    # the hub closes the socket itself (taken from werkzeug)
    deadline: float = 0.0
    partial: list[str] = field(default_factory=list)
    partial_bytes: int = 0
    backlog: bytearray = field(default_factory=bytearray)
    done: threading.Event = field(default_factory=threading.Event)


class BeatHub:
    """`adopt(ws, node_id, credential)` hands a node's accepted socket to the hub thread."""

    def __init__(self, cfg: Config, state: State) -> None:
        self.cfg, self.state = cfg, state
        self.beaters: set[Beater] = set()
        self._added: deque[Beater] = deque()
        self._sel = selectors.DefaultSelector()
        self._wake_r: socket.socket | None = None   # made with the thread, by the first node
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._batch: list[tuple[Beater, str]] = []   # reports read, not answered yet
        self._batch_at = 0.0                         # when the first of them came
        self._batch_wall = 0.0                       # the same, on the wall clock

    def adopt(self, ws: Any, node_id: str, credential: str) -> Beater:
        """Take the socket of `ws` (a simple_websocket.Server accepted without a reader
        thread). Under werkzeug the hub takes the connection over and the request ends at
        once (answer it with `Detached`); elsewhere wait for `done` before returning."""
        with self._start_lock:
            if self._thread is None:
                self._wake_r, self._wake_w = socket.socketpair()
                for s in (self._wake_r, self._wake_w):
                    s.setblocking(False)
                self._sel.register(self._wake_r, selectors.EVENT_READ, None)
                self._thread = threading.Thread(target=self._run, name="beat-hub", daemon=True)
                self._thread.start()
        owned = ws.mode == "werkzeug"
        sock = wsclose.take_over(ws.sock) if owned else ws.sock
        beater = Beater(sock, ws.ws, node_id, credential, owned)
        self._added.append(beater)
        assert self._wake_w is not None
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass   # the wake-up pipe is full: the hub is awake anyway
        return beater

    # ---- the hub thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                self._turn()
            except Exception:  # process boundary: one bad turn must not stop every node
                log.exception("heartbeat hub turn failed")

    def _turn(self) -> None:
        batch = self._batch
        wait = 1.0 if not batch else max(0.0, self._batch_at + BATCH_S - time.monotonic())
        for key, events in self._sel.select(wait):
            b = key.data
            if b is None:
                self._drain_wake()
                continue
            if events & selectors.EVENT_WRITE and b in self.beaters:
                self._guard(b, partial(self._flush, b))
            if events & selectors.EVENT_READ and b in self.beaters:
                if not batch:
                    self._batch_at, self._batch_wall = time.monotonic(), time.time()
                self._guard(b, partial(self._read, b, batch))
        if batch and (len(batch) >= MAX_BATCH
                      or time.monotonic() >= self._batch_at + BATCH_S):
            self._batch = []
            self._answer([(b, text) for b, text in batch if b in self.beaters],
                         self._batch_wall)
        while self._added:
            self._add(self._added.popleft())
        now = time.monotonic()
        for b in [b for b in self.beaters if b.deadline <= now]:
            self._end(b, (1000, f"no heartbeat for {IDLE_S:.0f} s; reconnect"))

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _add(self, b: Beater) -> None:
        try:
            b.sock.setblocking(False)
            b.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sel.register(b.sock, selectors.EVENT_READ, b)
        except (OSError, ValueError):   # the node left before its turn came
            self._end(b, None)
            return
        b.deadline = time.monotonic() + IDLE_S
        self.beaters.add(b)

    def _guard(self, b: Beater, step: Callable[[], None]) -> None:
        """One node's step; its failure ends that node's socket only."""
        try:
            step()
        except OSError:   # the node went away mid-send or mid-read
            self._dropped(b)
        except Exception as e:  # process boundary: this node's beat failed, not the hub
            log.exception("heartbeat socket of node %s failed", b.node_id)
            self._end(b, (1011, f"heartbeat failed: {e}; reconnect"))

    def _read(self, b: Beater, batch: list[tuple[Beater, str]]) -> None:
        data = b.sock.recv(RECV_BYTES)
        if not data:
            self._dropped(b)
            return
        wsc = b.wsc
        wsc.receive_data(data)
        for event in wsc.events():
            if isinstance(event, TextMessage):
                b.partial.append(event.data)
                b.partial_bytes += len(event.data)
                if b.partial_bytes > MAX_REPORT_BYTES:
                    self._refuse(b, "bad_request", f"report larger than {MAX_REPORT_BYTES} "
                                 "bytes; send only this node's own streams and counters", 1009)
                    return
                if event.message_finished:
                    batch.append((b, "".join(b.partial)))
                    b.partial, b.partial_bytes = [], 0
                    b.deadline = time.monotonic() + IDLE_S
            elif isinstance(event, BytesMessage):
                self._refuse(b, "bad_request", "a heartbeat report is a JSON text message, "
                             "not binary", 4400)
            elif isinstance(event, CloseConnection):
                self._send(b, wsc.send(event.response()))
                self._end(b, None)
            elif isinstance(event, Ping):
                self._send(b, wsc.send(event.response()))
            if b not in self.beaters:
                return

    def _dropped(self, b: Beater) -> None:
        """The socket closed without a close frame: the node's process died (its kernel
        closed the socket) or its network went. Nobody is placed there until it beats again
        (as when a client reports its stream lost), so a crash is seen at once, not after
        three missed beats; a node that only lost its connection reconnects and beats."""
        if b in self.beaters:
            try:
                self.state.report_lost(b.node_id, time.time())
            except redis.RedisError as e:   # the reaper still sees the silence
                log.warning("node %s dropped its heartbeat socket; not recorded: %s",
                            b.node_id, e)
        self._end(b, None)

    def _answer(self, batch: list[tuple[Beater, str]], received: float) -> None:
        """Reports in, orders out (as POST /api/nodes/heartbeat), every report of the batch
        recorded in one Redis round trip as seen at `received` (when the first came: never
        later than a report really arrived, so a beat sent before a node was reported lost
        cannot clear that report); the beat script checks each credential, so a revoked
        node stops at its next beat."""
        reports: list[tuple[Beater, dict[str, Any]]] = []
        for b, text in batch:
            try:
                data = membership.parse_report(text)
            except BadReport as e:
                self._refuse(b, "bad_request", f"malformed node report: {e}", 4400)
                continue
            reports.append((b, data))
        if not reports:
            return
        try:
            got = membership.heartbeats(self.state, self.cfg,
                                        [(b.node_id, b.credential, d) for b, d in reports],
                                        received)
        except redis.RedisError as e:
            log.warning("%d heartbeats not recorded: %s", len(reports), e)
            for b, _ in reports:
                self._end(b, (1011, "the control plane cannot reach its state store; "
                                    "reconnect in a few seconds"))
            return
        for (b, _), orders in zip(reports, got, strict=True):
            if isinstance(orders, JoinError):
                self._refuse(b, "refused", str(orders), 4401)
            elif isinstance(orders, ValueError):
                self._refuse(b, "bad_request", f"malformed node report: {orders}", 4400)
            elif b in self.beaters:
                answer = json.dumps(membership.orders_json(orders))
                self._guard(b, partial(self._send_text, b, answer))

    def _refuse(self, b: Beater, code: str, message: str, close: int) -> None:
        """Say why, then close with `close` (the text first: the node logs it)."""
        try:
            self._send_text(b, json.dumps({"error": code, "message": message}))
        except OSError:
            pass   # gone already; the close below finds that out too
        self._end(b, (close, message))

    def _send_text(self, b: Beater, text: str) -> None:
        self._send(b, b.wsc.send(TextMessage(data=text)))

    # ---- writing ------------------------------------------------------------------------

    def _send(self, b: Beater, data: bytes) -> None:
        if not b.backlog:
            try:
                data = data[b.sock.send(data):]
            except BlockingIOError:
                pass
        if data:
            b.backlog += data
            self._watch(b)

    def _flush(self, b: Beater) -> None:
        try:
            del b.backlog[:b.sock.send(b.backlog)]
        except BlockingIOError:
            pass
        self._watch(b)

    def _watch(self, b: Beater) -> None:
        if len(b.backlog) > MAX_BACKLOG_BYTES:
            self._end(b, (1008, "orders not read; reconnect"))
        elif b in self.beaters:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if b.backlog else 0)
            self._sel.modify(b.sock, events, b)

    def _end(self, b: Beater, outcome: Outcome) -> None:
        """The socket is done: close it (with `outcome`'s code after the answers still
        queued) in a thread of its own, since a close lingers (see common/wsclose.py)."""
        if b in self.beaters:
            self.beaters.discard(b)
            try:
                self._sel.unregister(b.sock)
            except (KeyError, ValueError):
                pass
        threading.Thread(target=_close, args=(b, outcome), name="beat-close",
                         daemon=True).start()


def stamp_beat_path(cfg: Config, state: State, stop: threading.Event) -> threading.Thread:
    """Stamp, every heartbeat interval until `stop`, that this webapp takes heartbeats: the
    reaper takes a node's silence for death only after a whole heartbeat timeout of stamps
    (provisioner.fleet.silence_is_death). A thread of its own, started by a serving process
    (webapp.app.before_serving): the hub starts with the first node, and a webapp that comes
    back to a fleet of dead nodes must still stamp for them to be reaped."""
    gap_s = STAMP_GAP_BEATS * cfg.heartbeat_interval_s

    def run() -> None:
        while True:
            try:
                state.stamp_beat_path(time.time(), gap_s)
            except redis.RedisError as e:   # a thread's boundary: the reaper waits meanwhile
                log.warning("beat path not stamped: %s", e)
            if stop.wait(cfg.heartbeat_interval_s):
                return

    thread = threading.Thread(target=run, name="beat-path", daemon=True)
    thread.start()
    return thread


def _close(b: Beater, outcome: Outcome) -> None:
    try:
        b.sock.setblocking(True)
        b.sock.settimeout(2.0)
        if outcome is not None:
            code, reason = outcome
            b.sock.sendall(bytes(b.backlog) + b.wsc.send(CloseConnection(code,
                                                                        wsclose.fit(reason))))
            time.sleep(wsclose.CLOSE_LINGER_S)
        b.sock.shutdown(socket.SHUT_RDWR)
    except Exception:  # noqa: BLE001  a thread's boundary: the node is gone either way
        pass
    finally:
        if b.owned:
            b.sock.close()
        b.done.set()
