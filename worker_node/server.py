"""The node's server: audio streams on `/ws?ticket=T` (docs/protocol.md), `/healthz`, and
the control plane's signed orders on `/control`, on one asyncio loop in one thread.

The frames that arrive in one turn of the loop are processed together in the next, through
the model's batch step where it has one (what a GPU wants). What blocks (the agent's
heartbeat when a stream opens or closes) runs in worker threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from common.errors import TicketError
from common.jsonobj import json_object
from common.tickets import verify, verify_control
from common.wsclose import REFUSAL_GAP_S, fit
from worker_node import priority, protocol
from worker_node.pace import Pace, p95_ms
from worker_node.package import Processor
from worker_node.protocol import MAX_MESSAGE_BYTES, Malformed
from worker_node.runtime import NodeRuntime, Stream

log = logging.getLogger("worker_node")
logging.getLogger("websockets").setLevel(logging.WARNING)   # one line per connection, else

STALL_S = 1.0   # a model call this long is a stall, not work (a 20 ms frame takes < 1 ms)
SWITCH_INTERVAL_S = 0.0005    # a woken thread waits at most this for the GIL (default 5 ms)
CLOSE_TIMEOUT_S = 2.0         # for the client's answer to our close frame
Outcome = tuple[int, str] | None   # close code and reason; None: the client closed


@dataclass(eq=False)
class Conn:
    """One stream's socket and where its coroutine is."""

    ws: ServerConnection
    task: asyncio.Task[None]
    stream: Stream | None = None
    processor: Processor | None = None
    deadline: float = 0.0             # loop time: the start or idle timeout
    serving: bool = False             # between start and end: a kick cancels the task
    kicked: tuple[int, str] | None = None
    pace: Pace = field(default_factory=Pace)
    idle_s: float = 0.0               # how long the last read waited for its frame


class NodeServer:
    """`start(host, port)` serves in a thread of its own; `on_open`/`on_close` (run in
    worker threads) let the agent mirror streams to the control plane; `on_order` takes
    a verified order pushed to /control."""

    def __init__(self, node: NodeRuntime, secret: str,
                 make_processor: Callable[[int], Processor] | None = None,
                 on_open: Callable[[Stream], None] = lambda s: None,
                 on_close: Callable[[Stream, bool], None] = lambda s, current: None,
                 on_order: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.node, self.secret = node, secret
        self.make_processor = make_processor or node.make_processor
        self.on_open, self.on_close, self.on_order = on_open, on_close, on_order
        self.conns: set[Conn] = set()
        self.thread_id: int | None = None
        self.scheduling = "normal"     # what the loop's thread got: see priority.py
        self.busy_since: float | None = None   # a model call runs since (monotonic)
        self._pending: list[tuple[Conn, np.ndarray, asyncio.Future[np.ndarray]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._lags: deque[tuple[float, float]] = deque(maxlen=1000)   # (answered, lag s)
        self.stopped = threading.Event()   # set once the server has stopped
        node.stalled = self.stalled_s   # reported in every heartbeat (a hung GPU call)
        node.stream_progress = self.progress   # ... and each stream's progress, answers' lateness

    # ---- running --------------------------------------------------------------------

    def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Serve from a new thread; returns the port once listening."""
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        listening: Future[int] = Future()

        def run() -> None:
            self.thread_id = threading.get_native_id()
            self.scheduling = priority.raise_priority(self.thread_id)
            try:
                asyncio.run(self._main(host, port, ssl_context, listening))
            except BaseException as e:  # thread boundary: say why it never listened
                if not listening.done():
                    listening.set_exception(e)
            finally:
                self.stopped.set()
        threading.Thread(target=run, name="audio-loop", daemon=True).start()
        return listening.result()

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)

    async def _main(self, host: str, port: int, ssl_context: ssl.SSLContext | None,
                    listening: Future[int]) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        # The agent's heartbeats run here, at the normal priority, not the loop's.
        self._loop.set_default_executor(ThreadPoolExecutor(
            8, "settle", initializer=priority.normal))
        async with serve(self._handler, host, port, ssl=ssl_context,
                         process_request=self._http, compression=None, ping_interval=None,
                         max_size=MAX_MESSAGE_BYTES, close_timeout=CLOSE_TIMEOUT_S) as server:
            listening.set_result(int(next(iter(server.sockets)).getsockname()[1]))
            await self._stop.wait()
            for conn in self.conns:   # a client that reads nothing would hold up the close
                conn.ws.transport.abort()

    # ---- plain HTTP: /healthz, /control -----------------------------------------------

    def _http(self, ws: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        log.info('"GET %s"', path)   # never the query: a stream's URL carries its ticket
        if path == "/ws":
            return None   # the WebSocket handshake goes on
        if path == "/healthz":
            return _json(ws, HTTPStatus.OK, **self.node.snapshot())
        if path == "/control":
            return self._control(ws, request)
        return _json(ws, HTTPStatus.NOT_FOUND, error="not_found",
                     message=f"no {path}; streams connect to /ws?ticket=T")

    def _control(self, ws: ServerConnection, request: Request) -> Response:
        """An order the control plane pushes (kick, recall, wake): its JSON in `X-Order`,
        signed with our key in `X-Signature`."""
        body = request.headers.get("X-Order", "").encode()
        if not verify_control(body, request.headers.get("X-Signature", ""), self.secret):
            return _json(ws, HTTPStatus.FORBIDDEN, error="forbidden",
                         message="bad or missing signature")
        try:
            order = json_object(body.decode())
        except ValueError as e:
            return _json(ws, HTTPStatus.BAD_REQUEST, error="bad_request", message=f"X-Order is {e}")
        if self.on_order is not None:
            self.on_order(order)
        return _json(ws, HTTPStatus.OK, ok=True)

    # ---- a stream ---------------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = Conn(ws, task)
        node = self.node
        query = parse_qs(urlsplit(ws.request.path if ws.request else "").query)
        try:
            ticket = verify((query.get("ticket") or [""])[0], self.secret, node=node.id,
                            now=node.now())
            node.check_ticket(ticket)
        except TicketError as e:
            await _refuse(ws, 4401, str(e))
            return
        entry = conn.stream = Stream(
            ticket.session, ticket.user, ticket.fence,
            kick=lambda code, why: self._threadsafe(self._kick, conn, code, why),
            notify=lambda text: self._threadsafe(self._notify, conn, text))
        if refused := node.open(entry):
            await _refuse(ws, 4503, refused)
            return
        loop = asyncio.get_running_loop()
        outcome: Outcome = None
        self.conns.add(conn)
        try:
            await loop.run_in_executor(None, self.on_open, entry)
            outcome = conn.kicked   # kicked while the agent heard of it: never serves
            if outcome is None:
                conn.serving = True
                outcome = await self._stream(conn)
        except asyncio.CancelledError:
            if conn.kicked is None:
                raise
            conn.task.uncancel()
            outcome = conn.kicked
        except Malformed as e:
            await _bounded(ws, ws.send(json.dumps(
                {"type": "error", "code": "bad_request", "message": str(e)})))
            outcome = (4400, str(e))
        except ConnectionClosed:
            pass   # the client left
        except Exception as e:  # process boundary: the model failed, tell the client
            log.exception("model failed on session %s", entry.session_id)
            outcome = (1011, f"model failed: {e}; resume through the lobby")
        finally:
            conn.serving = False
            self.conns.discard(conn)
            if outcome is not None and outcome[0] == 1011:
                node.model_failed()   # in the close's heartbeat: a failing version rolls back
            # Slot, lock and last seconds settle before the client hears the close, so a
            # page that reconnects at once finds them free.
            await loop.run_in_executor(None, self.on_close, entry, node.close(entry))
        if outcome is not None:
            await _bounded(ws, ws.close(outcome[0], fit(outcome[1])))

    async def _stream(self, conn: Conn) -> Outcome:
        node, stream, ws = self.node, conn.stream, conn.ws
        assert stream is not None
        rate = protocol.parse_start(await self._receive(conn, protocol.START_TIMEOUT_S))
        bounds = protocol.frame_bounds(rate)
        processor = conn.processor = self.make_processor(rate)
        await ws.send(json.dumps({
            "type": "started", "session_id": stream.session_id, "model": node.model,
            "version": node.version,
            "latency_ms": round(1000.0 * processor.latency_samples / rate, 3)}))
        while True:
            msg = await self._receive(conn, protocol.IDLE_TIMEOUT_S)
            if isinstance(msg, str):
                protocol.check_text(msg)
                return (1000, "stopped")
            n = protocol.check_frame(len(msg), rate, bounds)
            # metered at the time it came, not when processed: a stalled model's backlog
            # never lands in one minute
            at = node.now()
            conn.pace.read(time.monotonic(), n / rate, conn.idle_s)
            out = await self._process(conn, np.frombuffer(msg, dtype="<i2"))
            try:   # a client that does not read its answers is held back (TCP), then let go
                async with asyncio.timeout_at(conn.deadline):
                    await ws.send(np.ascontiguousarray(out, dtype="<i2").tobytes())
            except TimeoutError:
                raise Malformed(f"answers unread for {protocol.IDLE_TIMEOUT_S:.0f} s; read "
                                "the frames the node sends back") from None
            answered = time.monotonic()
            self._lags.append((answered, conn.pace.answered(answered)))
            node.add_seconds(stream, n / rate, at)

    async def _receive(self, conn: Conn, timeout_s: float) -> str | bytes:
        """The next message, or Malformed once the client was silent `timeout_s` (a
        stall of the model moves the deadline: that silence was not the client's)."""
        loop = asyncio.get_running_loop()
        conn.deadline = loop.time() + timeout_s
        while True:
            try:
                async with asyncio.timeout_at(conn.deadline):
                    asked = loop.time()
                    msg = await conn.ws.recv()
                    conn.idle_s = loop.time() - asked
                    return msg
            except TimeoutError:
                if loop.time() < conn.deadline:
                    continue
                if conn.processor is None:
                    raise Malformed(f"no start message within {timeout_s:.0f} s; send "
                                    '{"type": "start", "sample_rate": 48000} first') from None
                raise Malformed(f"no audio for {timeout_s:.0f} s; stream frames or send "
                                "stop") from None

    # ---- processing: a round per turn ---------------------------------------------------

    def _process(self, conn: Conn, frames: np.ndarray) -> asyncio.Future[np.ndarray]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((conn, frames, future))
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._process_pending)
        return future

    def _process_pending(self) -> None:
        """Every stream's frame of this turn: one call of the model's batch step where it
        has one, else a call per stream. A batch that fails is retried per stream, so only
        the failing stream ends."""
        pending, self._pending = self._pending, []
        served = self.node.served
        batch = served.batch if served is not None else None
        self.busy_since = started = time.monotonic()
        outs: list[np.ndarray | None] = [None] * len(pending)
        if batch is not None and len(pending) > 1:
            try:
                got = list(batch([c.processor for c, *_ in pending], [f for _, f, _ in pending]))
                if len(got) == len(pending):
                    outs = list(got)
            except Exception:  # process boundary: find the failing stream per stream
                log.exception("batch step failed; processing per stream")
        for (conn, frames, future), out in zip(pending, outs, strict=True):
            if future.done():
                continue   # its stream was kicked meanwhile
            try:
                assert conn.processor is not None
                future.set_result(conn.processor.process(frames) if out is None else out)
            except Exception as e:  # the model failed on this stream: its handler says 1011
                future.set_exception(e)
        self.busy_since = None
        took = time.monotonic() - started
        if took > STALL_S:   # the model stalled: nobody's silence meanwhile was the client's
            log.warning("the model stalled for %.1f s", took)
            for c in self.conns:
                c.deadline += took

    def progress(self) -> tuple[list[list[Any]], float | None]:
        """Each stream's progress row and the p95 lateness of answers (worker_node/pace.py):
        a slow node, not only a hung one, moves its users."""
        now = time.monotonic()
        return ([c.pace.row(c.stream.session_id, now) for c in list(self.conns)
                 if c.stream is not None], p95_ms(self._lags, now))

    def stalled_s(self) -> float:
        """How long the model call now running has run (0: none runs): a GPU hang leaves
        the process and its heartbeats alive, and only this shows it."""
        since = self.busy_since
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    # ---- from other threads -------------------------------------------------------------

    def _threadsafe(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _kick(self, conn: Conn, code: int, reason: str) -> None:
        """End a stream (take-over, drain): its handler settles it, then closes with code."""
        if conn.kicked is None and conn in self.conns:
            conn.kicked = (code, reason)
            if conn.serving:
                conn.task.cancel()

    def _notify(self, conn: Conn, text: str) -> None:
        """A text message to one stream (a planned move's notice)."""
        if conn.serving:
            task = asyncio.ensure_future(_bounded(conn.ws, conn.ws.send(text)))
            self._background.add(task)
            task.add_done_callback(self._background.discard)


async def _bounded(ws: ServerConnection, sending: Any) -> None:
    """Send or close, giving up on a client that does not read: the library's write waits
    for the socket to drain without a limit."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await sending
    except TimeoutError:
        ws.transport.abort()
    except ConnectionClosed:
        pass   # the client left: its handler settles the stream


async def _refuse(ws: ServerConnection, code: int, reason: str) -> None:
    await asyncio.sleep(REFUSAL_GAP_S)
    await _bounded(ws, ws.close(code, fit(reason)))


def _json(ws: ServerConnection, status: HTTPStatus, **body: object) -> Response:
    response = ws.respond(status, json.dumps(body))
    response.headers["Content-Type"] = "application/json"
    return response
