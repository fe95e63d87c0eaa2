"""The node's HTTP and WebSocket server: `/healthz` and the audio stream `/ws?ticket=T`.

Protocol (docs/protocol.md): text `start` -> text `started` -> binary Int16 frames both
ways, same length, in order -> `stop` -> close 1000. Close codes: 4401 ticket, 4409 taken
over, 4503 full/loading/draining, 4400 malformed (after a text error), 1011 model failed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import numpy as np
from flask import Flask, jsonify, request
from flask_sock import ConnectionClosed, Sock

from common import wsclose
from common.errors import TicketError
from common.tickets import Ticket, verify
from worker_node.runtime import NodeRuntime, Stream
from worker_node.shifter import PitchShifter, Processor

log = logging.getLogger("worker_node")

MIN_RATE_HZ, MAX_RATE_HZ = 8000, 48000
MIN_FRAME_S, MAX_FRAME_S = 0.010, 0.100
START_TIMEOUT_S = 10.0      # a client that connects but never says start is dropped
IDLE_TIMEOUT_S = 30.0       # a stream that sends nothing for this long is closed
MAX_MESSAGE_BYTES = 1024 * 1024


class Malformed(Exception):
    """A client frame or message breaks the protocol; the text says what and how to fix it."""


def create_app(node: NodeRuntime, secret: str,
               make_processor: Callable[[int], Processor] | None = None,
               on_open: Callable[[Stream], None] = lambda s: None,
               on_close: Callable[[Stream, bool], None] = lambda s, current: None,
               admit: Callable[[Stream], str | None] = lambda s: None) -> Flask:
    """The node app. `on_open`/`on_close` let the agent mirror streams into Redis; `admit`
    may refuse a stream whose user's lock belongs to another session (4409)."""
    app = Flask(__name__)
    # Far above a legal frame (100 ms at 48 kHz is 9,600 bytes), so an oversized frame gets
    # our 4400 with a message instead of simple_websocket's bare 1009.
    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": MAX_MESSAGE_BYTES}
    sock = Sock(app)
    processor_for = make_processor or (lambda rate: PitchShifter(rate, node.semitones))

    @app.get("/healthz")
    def healthz():  # type: ignore[no-untyped-def]
        return jsonify(node.snapshot())

    @sock.route("/ws")
    def stream(ws):  # type: ignore[no-untyped-def]
        try:
            ticket = verify(request.args.get("ticket", ""), secret, node=node.id, now=time.time())
            _check_ticket(node, ticket)
        except TicketError as e:
            wsclose.close(ws, 4401, str(e))
            return
        entry = Stream(ticket.session, ticket.user, ticket.fence,
                       kick=lambda code, why: wsclose.close(ws, code, why))
        refused = _take_over(node, entry)
        if refused:
            wsclose.close(ws, 4401, refused)
            return
        refused = admit(entry)
        if refused:
            wsclose.close(ws, 4409, refused)
            return
        refused = node.open(entry)
        if refused:
            wsclose.close(ws, 4503, refused)
            return
        outcome: tuple[int, str] | None = (1000, "stopped")
        try:
            on_open(entry)
            _serve(ws, node, entry, processor_for)
        except Malformed as e:
            _error(ws, "bad_request", str(e))
            outcome = (4400, str(e))
        except ConnectionClosed:
            outcome = None
        except Exception as e:  # process boundary: the model failed, tell the client
            log.exception("model failed on session %s", entry.session_id)
            outcome = (1011, f"model failed: {e}; resume through the lobby")
        finally:
            # Slot, lock and last seconds settle before the client hears the close, so a
            # page that reconnects at once finds them free.
            on_close(entry, node.close(entry))
        if outcome is not None:
            wsclose.close(ws, *outcome)

    return app


def _check_ticket(node: NodeRuntime, t: Ticket) -> None:
    if (t.model, t.version) != (node.model, node.version):
        raise TicketError(f"ticket is for model {t.model} v{t.version}, this node serves "
                          f"{node.model} v{node.version}; reconnect through the lobby")


def _take_over(node: NodeRuntime, entry: Stream) -> str | None:
    """Fencing: refuse a stale ticket; a newer one closes the user's older stream (4409)."""
    with node.lock:
        seen = node.fences.get(entry.user, 0)
        if entry.fence < seen:
            return (f"stale ticket: fence {entry.fence} < {seen}; the user has a newer "
                    "session, reconnect through the lobby")
        node.fences[entry.user] = entry.fence
        older = [s for s in node.streams.values()
                 if s.user == entry.user and s.session_id != entry.session_id]
    for s in older:
        if s.kick:
            s.kick(4409, "this user started streaming elsewhere; this stream was taken over")
    return None


def _serve(ws, node: NodeRuntime, entry: Stream,  # type: ignore[no-untyped-def]
           processor_for: Callable[[int], Processor]) -> None:
    msg = ws.receive(timeout=START_TIMEOUT_S)
    if msg is None:
        raise Malformed(f"no start message within {START_TIMEOUT_S:.0f} s; send "
                        '{"type": "start", "sample_rate": 48000} first')
    rate = _parse_start(msg)
    processor = processor_for(rate)
    ws.send(json.dumps({"type": "started", "session_id": entry.session_id,
                        "model": node.model, "version": node.version,
                        "latency_ms": round(1000.0 * processor.latency_samples / rate, 3)}))
    lo, hi = int(rate * MIN_FRAME_S), int(np.ceil(rate * MAX_FRAME_S))
    while True:
        msg = ws.receive(timeout=IDLE_TIMEOUT_S)
        if msg is None:
            raise Malformed(f"no audio for {IDLE_TIMEOUT_S:.0f} s; stream frames or send stop")
        if isinstance(msg, bytes):
            if len(msg) % 2:
                raise Malformed(f"binary frame of {len(msg)} bytes is not 16-bit PCM "
                                "(odd length); send mono Int16 little-endian samples")
            n = len(msg) // 2
            if not lo <= n <= hi:
                raise Malformed(f"frame of {n} samples is {1000 * n / rate:.1f} ms at {rate} Hz;"
                                f" frames must be 10-100 ms ({lo}-{hi} samples)")
            out = processor.process(np.frombuffer(msg, dtype="<i2"))
            ws.send(out.astype("<i2", copy=False).tobytes())
            node.add_seconds(entry, n / rate, time.time())
            continue
        kind = _parse_json(msg).get("type")
        if kind == "stop":
            return   # the caller releases everything, then closes 1000
        raise Malformed(f"unexpected message type {kind!r} while streaming; "
                        'send binary audio frames or {"type": "stop"}')


def _parse_json(msg: str) -> dict[str, object]:
    try:
        data = json.loads(msg)
    except ValueError:
        raise Malformed(f"text message is not JSON: {msg[:40]!r}") from None
    if not isinstance(data, dict):
        raise Malformed("text message must be a JSON object with a 'type'")
    return data


def _parse_start(msg: str | bytes) -> int:
    if isinstance(msg, bytes):
        raise Malformed('expected {"type": "start", "sample_rate": N} before audio frames')
    data = _parse_json(msg)
    if data.get("type") != "start":
        raise Malformed(f"first message must be type 'start', got {data.get('type')!r}")
    rate = data.get("sample_rate")
    if isinstance(rate, bool) or not isinstance(rate, int) \
            or not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
        raise Malformed(f"sample_rate {rate!r} is not an integer in "
                        f"{MIN_RATE_HZ}-{MAX_RATE_HZ} Hz")
    return rate


def _error(ws, code: str, message: str) -> None:  # type: ignore[no-untyped-def]
    try:
        ws.send(json.dumps({"type": "error", "code": code, "message": message}))
    except ConnectionClosed:
        pass
