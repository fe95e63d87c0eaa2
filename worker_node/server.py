"""The node's HTTP and WebSocket server: `/healthz` and the audio stream `/ws?ticket=T`.

Protocol (docs/protocol.md): text `start` -> text `started` -> binary Int16 frames both
ways, same length, in order -> `stop` -> close 1000. Close codes: 4401 ticket, 4409 taken
over, 4503 full/loading/draining, 4400 malformed (after a text error), 1011 model failed.

A socket's request thread checks the ticket and admits the stream; from `start` to the end
the node's one audio thread (worker_node/audio_loop.py) reads, processes and answers it.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask, Response, jsonify, request

from common import wsclose
from common.errors import TicketError
from common.tickets import Ticket, verify
from worker_node.audio_loop import AudioLoop
from worker_node.package import Processor
from worker_node.protocol import (  # noqa: F401  re-exported: the protocol's limits
    IDLE_TIMEOUT_S,
    MAX_FRAME_S,
    MAX_MESSAGE_BYTES,
    MAX_RATE_HZ,
    MIN_FRAME_S,
    MIN_RATE_HZ,
    START_TIMEOUT_S,
    Malformed,
)
from worker_node.runtime import NodeRuntime, Stream


def _refuse(ws, code: int, reason: str) -> None:  # type: ignore[no-untyped-def]
    wsclose.after_handshake()
    wsclose.close(ws, code, reason)


def create_app(node: NodeRuntime, secret: str,
               make_processor: Callable[[int], Processor] | None = None,
               on_open: Callable[[Stream], None] = lambda s: None,
               on_close: Callable[[Stream, bool], None] = lambda s, current: None,
               admit: Callable[[Stream], str | None] = lambda s: None) -> Flask:
    """The node app. `on_open`/`on_close` let the agent mirror streams into Redis; `admit`
    may refuse a stream whose user's lock belongs to another session (4409)."""
    app = Flask(__name__)
    loop = AudioLoop(node, make_processor or node.make_processor)
    node.stalled = loop.stalled_s   # reported in every heartbeat (a hung GPU call)
    app.extensions["audio_loop"] = loop

    @app.get("/healthz")
    def healthz():  # type: ignore[no-untyped-def]
        return jsonify(node.snapshot())

    @app.route("/ws", websocket=True)
    def stream() -> Response:
        ws = wsclose.accept(request.environ, MAX_MESSAGE_BYTES)
        _stream(ws, node, secret, loop, on_open, on_close, admit)
        # werkzeug writes this response after the handler; wsclose shut the socket first.
        return Response()

    return app


def _stream(ws, node: NodeRuntime, secret: str,  # type: ignore[no-untyped-def]
            loop: AudioLoop, on_open: Callable[[Stream], None],
            on_close: Callable[[Stream, bool], None],
            admit: Callable[[Stream], str | None]) -> None:
    try:
        ticket = verify(request.args.get("ticket", ""), secret, node=node.id, now=node.now())
        _check_ticket(node, ticket)
    except TicketError as e:
        _refuse(ws, 4401, str(e))
        return
    conn = loop.connection(ws)
    entry = Stream(ticket.session, ticket.user, ticket.fence, kick=conn.kick,
                   notify=conn.notify)
    refused = _take_over(node, entry)
    if refused:
        _refuse(ws, 4401, refused)
        return
    refused = admit(entry)
    if refused:
        _refuse(ws, 4409, refused)
        return
    refused = node.open(entry)
    if refused:
        _refuse(ws, 4503, refused)
        return
    outcome: tuple[int, str] | None = None
    try:
        on_open(entry)
        outcome = loop.serve(conn, entry)
    except Exception as e:  # process boundary: the model failed, tell the client
        outcome = (1011, f"model failed: {e}; resume through the lobby")
    finally:
        loop.settle(conn)
        if outcome is not None and outcome[0] == 1011:
            node.model_failed()   # in the close's heartbeat: a failing version rolls back
        # Slot, lock and last seconds settle before the client hears the close, so a
        # page that reconnects at once finds them free.
        on_close(entry, node.close(entry))
    if outcome is not None:
        wsclose.close(ws, *outcome)
    else:
        wsclose.close(ws, 1000, "")   # already closed: only end the TCP stream


def _check_ticket(node: NodeRuntime, t: Ticket) -> None:
    if (t.model, t.version) != (node.model, node.version):
        raise TicketError(f"ticket is for model {t.model} v{t.version}, this node serves "
                          f"{node.model} v{node.version}; reconnect through the lobby")
    if not node.use_ticket(t.session, t.fence, t.exp, node.now()):
        raise TicketError("this ticket was used already (a ticket opens one stream); "
                          "reconnect through the lobby for a new one")


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
