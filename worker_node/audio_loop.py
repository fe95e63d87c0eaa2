"""One audio thread serves every stream of the node: it reads all the sockets, runs every
stream's processor and writes the answers, the way a GPU model serves its streams in
batches.

Why one thread: with a reader and a handler thread per socket, each frame crossed two
threads; every crossing waits for the GIL, and a thread that holds it (another stream's
numpy, the heartbeat's Redis reply, a full garbage collection of the start-up heap) can
make it wait for a switch interval (5 ms) or a whole collection (tens of ms). That was the
round-trip tail. Here a frame goes recv -> parse -> process -> send in one thread with no
hand-off; the socket's request thread only checks the ticket, then waits for the outcome.

The loop thread runs at real-time priority where the process may raise it. It never blocks
on a client: sockets are non-blocking, an unread answer waits in the
stream's own backlog (above `MAX_BACKLOG_BYTES` the loop stops reading that client until
it catches up), and metering skips a turn rather than wait for the heartbeat's lock.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import selectors
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from worker_node import protocol
from worker_node.package import Processor
from worker_node.priority import raise_priority
from worker_node.protocol import Malformed
from worker_node.runtime import NodeRuntime, Stream

log = logging.getLogger("worker_node")

MAX_BACKLOG_BYTES = 192_000   # ~2 s of 48 kHz answers a client has not read yet
RECV_BYTES = 65536
SWITCH_INTERVAL_S = 0.0005    # a woken thread waits at most this for the GIL (default 5 ms)
Outcome = tuple[int, str] | None   # close code and reason; None: the socket is closed already


STALL_S = 1.0   # a model call this long is a stall, not work (a 20 ms frame takes < 1 ms)


@dataclass(eq=False)
class Conn:
    """One stream's socket as the loop sees it. Made by the request thread; owned by the
    loop thread between `AudioLoop.serve` and `done`."""

    ws: Any                                   # simple_websocket.Server with no reader thread
    loop: AudioLoop
    stream: Stream | None = None
    rate: int = 0
    bounds: tuple[int, int] = (0, 0)
    processor: Processor | None = None
    deadline: float = 0.0                     # monotonic: start or idle timeout
    backlog: bytearray = field(default_factory=bytearray)
    reading: bool = True
    partial: list[bytes | str] = field(default_factory=list)   # a fragmented message
    partial_bytes: int = 0
    unmetered: list[tuple[float, float]] = field(default_factory=list)  # (seconds, time)
    kicked: tuple[int, str] | None = None
    outcome: Outcome = (1000, "stopped")
    done: threading.Event = field(default_factory=threading.Event)

    def kick(self, code: int, reason: str) -> None:
        """End this stream from any thread (take-over, drain): the loop hands it back to
        its request thread, which settles it and closes with `code`."""
        self.loop.post(("kick", self, (code, reason)))

    def notify(self, text: str) -> None:
        """Send this stream a text message from any thread (a planned move's notice)."""
        self.loop.post(("text", self, text))


Pending = tuple["Conn", np.ndarray, int, float]   # a frame read: its stream, samples, size, when


class AudioLoop:
    """The node's audio thread. `serve(conn, stream)` blocks the calling request thread
    until the stream ends and returns how to close it."""

    def __init__(self, node: NodeRuntime, processor_for: Callable[[int], Processor],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node, self.processor_for, self.clock = node, processor_for, clock
        self.conns: set[Conn] = set()
        self._commands: deque[tuple[str, Conn, Any]] = deque()
        self._pending: list[Pending] = []   # frames read this turn
        self.busy_since: float | None = None   # a model call runs since (the loop's clock)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.thread_id: int | None = None      # the audio thread's native id, once running
        self.scheduling = "normal"             # what the audio thread got: see raise_priority

    def connection(self, ws: Any) -> Conn:
        return Conn(ws, self)

    def serve(self, conn: Conn, stream: Stream) -> Outcome:
        """Hand the socket to the loop; wait until its stream stopped, failed or closed."""
        self._ensure_started()
        conn.stream = stream
        self.post(("add", conn, None))
        conn.done.wait()
        return conn.outcome

    def post(self, command: tuple[str, Conn, Any]) -> None:
        self._commands.append(command)
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass   # the wake-up pipe is full: the loop is awake anyway

    def _ensure_started(self) -> None:
        with self._start_lock:
            if self._thread is not None:
                return
            # The first stream comes after the model loaded: what exists now lives for the
            # process, so move it out of the collector's sight. Full collections then scan
            # only what streams allocate (milliseconds, not the ~40 ms of the start-up heap).
            gc.collect()
            gc.freeze()
            sys.setswitchinterval(SWITCH_INTERVAL_S)
            self._thread = threading.Thread(target=self._run, name="audio-loop", daemon=True)
            self._thread.start()

    # ---- the loop thread ------------------------------------------------------------

    def _run(self) -> None:
        self.thread_id = threading.get_native_id()
        self.scheduling = raise_priority(self.thread_id)
        while True:
            try:
                self._turn()
            except Exception:  # process boundary: one bad turn must not stop every stream
                log.exception("audio loop turn failed")

    def _turn(self) -> None:
        timeout = 1.0
        if self.conns:
            timeout = max(0.0, min(min(c.deadline for c in self.conns) - self.clock(), 1.0))
        for key, events in self._sel.select(timeout):
            conn = key.data
            if conn is None:
                self._drain_wake()
                continue
            if conn not in self.conns:
                continue   # finished earlier in this turn
            if events & selectors.EVENT_WRITE:
                self._guard(conn, self._flush)
            if events & selectors.EVENT_READ and conn in self.conns:
                self._guard(conn, self._read)
        self._process_pending()
        while self._commands:
            what, conn, arg = self._commands.popleft()
            if what == "add":
                self._add(conn)
            elif what == "kick":
                self._kick(conn, arg)
            elif what == "text" and conn in self.conns:
                self._guard(conn, functools.partial(self._send_text, text=arg))
        now = self.clock()
        for conn in [c for c in self.conns if c.deadline <= now]:
            self._guard(conn, self._expire)
        for conn in self.conns:
            if conn.unmetered:
                self._meter(conn, blocking=False)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _add(self, conn: Conn) -> None:
        if conn.kicked is not None:   # kicked before it got here
            self._end(conn, conn.kicked)
            return
        sock = conn.ws.sock
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sel.register(sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError):   # the client left before its turn came
            self._end(conn, None)
            return
        conn.deadline = self.clock() + protocol.START_TIMEOUT_S
        self.conns.add(conn)

    def _kick(self, conn: Conn, why: tuple[int, str]) -> None:
        """Its request thread settles the stream, then closes with `why`."""
        if conn in self.conns:
            self._end(conn, why)
        elif not conn.done.is_set():
            conn.kicked = why

    def _guard(self, conn: Conn, step: Callable[[Conn], None]) -> None:
        """Run one step of one stream; its failure ends that stream only."""
        try:
            step(conn)
        except Malformed as e:
            self._send_text(conn, json.dumps({"type": "error", "code": "bad_request",
                                              "message": str(e)}))
            self._end(conn, (4400, str(e)))
        except OSError:   # the client went away mid-send or mid-read
            self._end(conn, None)
        except Exception as e:  # process boundary: the model failed, tell the client
            session = conn.stream.session_id if conn.stream else "?"
            log.exception("model failed on session %s", session)
            self._end(conn, (1011, f"model failed: {e}; resume through the lobby"))

    def _expire(self, conn: Conn) -> None:
        if conn.processor is None:
            raise Malformed(f"no start message within {protocol.START_TIMEOUT_S:.0f} s; send "
                            '{"type": "start", "sample_rate": 48000} first')
        raise Malformed(f"no audio for {protocol.IDLE_TIMEOUT_S:.0f} s; stream frames or "
                        "send stop")

    def _read(self, conn: Conn) -> None:
        data = conn.ws.sock.recv(RECV_BYTES)
        if not data:
            self._end(conn, None)
            return
        wsc = conn.ws.ws
        wsc.receive_data(data)
        for event in wsc.events():
            if isinstance(event, (BytesMessage, TextMessage)):
                conn.partial.append(bytes(event.data) if isinstance(event.data, bytearray)
                                    else event.data)
                conn.partial_bytes += len(event.data)
                if conn.partial_bytes > protocol.MAX_MESSAGE_BYTES:
                    self._end(conn, (1009, "message is too big; frames must be 10-100 ms"))
                    return
                if not event.message_finished:
                    continue
                parts, conn.partial, conn.partial_bytes = conn.partial, [], 0
                msg: bytes | str = parts[0] if len(parts) == 1 else (
                    b"".join(parts) if isinstance(event, BytesMessage)   # type: ignore[arg-type]
                    else "".join(parts))                                 # type: ignore[arg-type]
                self._on_message(conn, msg)
                if conn not in self.conns:
                    return
            elif isinstance(event, CloseConnection):
                self._send(conn, wsc.send(event.response()))
                self._end(conn, None)
                return
            elif isinstance(event, Ping):
                self._send(conn, wsc.send(event.response()))

    def _on_message(self, conn: Conn, msg: bytes | str) -> None:
        conn.deadline = self.clock() + protocol.IDLE_TIMEOUT_S
        if conn.processor is None:
            self._start(conn, protocol.parse_start(msg))
        elif isinstance(msg, bytes):
            n = protocol.check_frame(len(msg), conn.rate, conn.bounds)
            # metered at the time it came, not when processed: a stalled model's backlog
            # never lands in one minute
            self._pending.append((conn, np.frombuffer(msg, dtype="<i2"), n, self.node.now()))
        else:
            protocol.check_text(msg)
            self._process_pending()   # the frames it sent before its stop
            if conn in self.conns:
                self._end(conn, (1000, "stopped"))   # the request thread flushes, closes

    def _process_pending(self) -> None:
        """The frames read this turn, in rounds of one frame per stream: one call of the
        model's batch step per round where it has one (what a GPU wants), else a call per
        frame. A batch that fails is retried per stream, so only the failing stream ends."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        served = self.node.served
        batch = served.batch if served is not None else None
        self.busy_since = started = self.clock()
        while pending:
            first: list[Pending] = []
            later: list[Pending] = []
            for item in pending:
                (later if any(item[0] is c for c, *_ in first) else first).append(item)
            pending = later
            now = [item for item in first if item[0] in self.conns]
            outs: list[np.ndarray | None] = [None] * len(now)
            if batch is not None and len(now) > 1:
                try:
                    got = list(batch([c.processor for c, *_ in now], [f for _, f, *_ in now]))
                    if len(got) == len(now):
                        outs = list(got)
                except Exception:  # process boundary: find the failing stream per stream
                    log.exception("batch step failed; processing per stream")
            for (conn, frames, n, at), out in zip(now, outs, strict=True):
                if conn in self.conns:
                    self._guard(conn, functools.partial(self._answer, frames=frames, n=n,
                                                        at=at, out=out))
        self.busy_since = None
        took = self.clock() - started
        if took > STALL_S:   # the model stalled: nobody's silence meanwhile was the client's
            log.warning("the model stalled for %.1f s", took)
            for c in self.conns:
                c.deadline += took

    def stalled_s(self) -> float:
        """How long the model call now running has run (0: none runs): a GPU hang leaves
        the process and its heartbeats alive, and only this shows it."""
        since = self.busy_since
        return 0.0 if since is None else max(0.0, self.clock() - since)

    def _answer(self, conn: Conn, frames: np.ndarray, n: int, at: float,
                out: np.ndarray | None) -> None:
        assert conn.processor is not None
        self._send_audio(conn, conn.processor.process(frames) if out is None else out)
        conn.unmetered.append((n / conn.rate, at))

    def _start(self, conn: Conn, rate: int) -> None:
        processor = self.processor_for(rate)
        conn.rate, conn.bounds, conn.processor = rate, protocol.frame_bounds(rate), processor
        node, stream = self.node, conn.stream
        assert stream is not None
        self._send_text(conn, json.dumps({
            "type": "started", "session_id": stream.session_id, "model": node.model,
            "version": node.version,
            "latency_ms": round(1000.0 * processor.latency_samples / rate, 3)}))

    # ---- writing ------------------------------------------------------------------------

    def _send_text(self, conn: Conn, text: str) -> None:
        self._send(conn, conn.ws.ws.send(TextMessage(data=text)))

    def _send_audio(self, conn: Conn, out: np.ndarray) -> None:
        """One binary frame, header and samples in one syscall without joining them."""
        pcm = out if out.dtype == np.dtype("<i2") else out.astype("<i2")
        payload = memoryview(np.ascontiguousarray(pcm).data).cast("B")
        n = len(payload)
        header = (bytes((0x82, n)) if n < 126 else b"\x82\x7e" + n.to_bytes(2, "big")
                  if n < 65536 else b"\x82\x7f" + n.to_bytes(8, "big"))
        if conn.backlog:
            conn.backlog += header
            conn.backlog += payload
            self._check_backlog(conn)
            return
        try:
            sent = conn.ws.sock.sendmsg((header, payload))
        except BlockingIOError:
            sent = 0
        if sent < len(header) + n:
            conn.backlog += (header + payload.tobytes())[sent:]
            self._check_backlog(conn)

    def _send(self, conn: Conn, data: bytes) -> None:
        if conn.backlog:
            conn.backlog += data
            self._check_backlog(conn)
            return
        try:
            sent = conn.ws.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            conn.backlog += data[sent:]
            self._check_backlog(conn)

    def _flush(self, conn: Conn) -> None:
        try:
            sent = conn.ws.sock.send(conn.backlog)
        except BlockingIOError:
            sent = 0
        del conn.backlog[:sent]
        self._check_backlog(conn)

    def _check_backlog(self, conn: Conn) -> None:
        """Watch for room to write while answers wait; stop reading a client that does
        not read its answers (TCP then slows its sender) until it catches up."""
        if conn not in self.conns:
            return
        conn.reading = len(conn.backlog) < MAX_BACKLOG_BYTES
        events = (selectors.EVENT_READ if conn.reading else 0) | \
            (selectors.EVENT_WRITE if conn.backlog else 0)
        self._sel.modify(conn.ws.sock, events, conn)

    # ---- ending -----------------------------------------------------------------------

    def _end(self, conn: Conn, outcome: Outcome) -> None:
        """The stream is over: hand it back to its request thread to settle and close."""
        self._finish(conn, outcome)
        if outcome is None:
            conn.ws.connected = False   # closed by the client: no close frame of ours
        conn.done.set()

    def _finish(self, conn: Conn, outcome: Outcome) -> None:
        if conn in self.conns:
            self.conns.discard(conn)
            self._sel.unregister(conn.ws.sock)
        conn.outcome = outcome

    def _meter(self, conn: Conn, blocking: bool) -> None:
        """Count streamed seconds; without `blocking`, skip a turn while the heartbeat
        holds the node's lock instead of stalling every stream behind its Redis calls."""
        stream = conn.stream
        while conn.unmetered and stream is not None:
            seconds, at = conn.unmetered[0]
            if not self.node.add_seconds(stream, seconds, at, blocking=blocking):
                return
            conn.unmetered.pop(0)

    def settle(self, conn: Conn) -> None:
        """In the request thread after the stream ended: meter the last frames and send
        the answers the client has not taken yet (a stop flushes everything)."""
        self._meter(conn, blocking=True)
        if conn.backlog and conn.outcome is not None:
            try:
                conn.ws.sock.setblocking(True)
                conn.ws.sock.settimeout(2.0)
                conn.ws.sock.sendall(conn.backlog)
            except OSError:
                pass
            conn.backlog.clear()
        try:
            conn.ws.sock.setblocking(True)
            conn.ws.sock.settimeout(2.0)
        except OSError:
            pass

