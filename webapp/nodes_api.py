"""Where nodes join, heartbeat and leave: `/api/nodes/*` (see docs/protocol.md).

Thin views over provisioner.membership. A node authenticates every heartbeat with the
credential it got at join (`Authorization: Bearer ...`); refusals are JSON errors that say
what was wrong and what the node should do (401: rejoin or shut down; 400: fix the report).
"""

from __future__ import annotations

import json
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request
from flask_sock import ConnectionClosed, Sock

from billing.ledger import Ledger
from common import wsclose
from common.config import Config
from provisioner import membership
from provisioner.errors import JoinError
from provisioner.state import State

BEAT_IDLE_S = 60.0   # a heartbeat socket silent this long is closed (the node reconnects)


def beat_stream(sock: Sock, cfg: Config, state: State) -> None:
    """`WS /api/nodes/beat`: the heartbeat on one socket per node (what nodes use): each
    text message is a report as for POST /api/nodes/heartbeat, each answer its orders. One
    authentication per connection and no HTTP request per beat: a thousand nodes' beats
    stay cheap for one webapp process."""
    @sock.route("/api/nodes/beat")
    def beat(ws):  # type: ignore[no-untyped-def]
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        try:
            node_id = membership.authenticate(state, credential if scheme == "Bearer" else "")
        except JoinError as e:
            _refuse(ws, "refused", str(e), 4401)
            return
        while True:
            try:
                raw = ws.receive(timeout=BEAT_IDLE_S)
            except ConnectionClosed:
                return
            if raw is None:
                wsclose.close(ws, 1000, "no heartbeat for a minute; reconnect")
                return
            try:
                data = json.loads(raw)
                if not isinstance(data, dict):
                    raise ValueError("a report must be a JSON object")
                if membership.authenticate(state, credential) != node_id:   # revoked since
                    raise JoinError(f"node {node_id}'s credential was revoked")
                orders = membership.heartbeat(state, cfg, node_id, data, time.time())
            except JoinError as e:
                _refuse(ws, "refused", str(e), 4401)
                return
            except (ValueError, TypeError) as e:
                _refuse(ws, "bad_request", f"malformed node report: {e}", 4400)
                return
            ws.send(json.dumps(membership.orders_json(orders)))


def _refuse(ws, code: str, message: str, close: int) -> None:  # type: ignore[no-untyped-def]
    wsclose.after_handshake()
    try:
        ws.send(json.dumps({"error": code, "message": message}))
    except ConnectionClosed:
        return
    wsclose.close(ws, close, message)


def blueprint(cfg: Config, state: State, ledger: Ledger | None) -> Blueprint:
    bp = Blueprint("nodes", __name__, url_prefix="/api/nodes")

    def body() -> dict[str, Any]:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object")
        return data

    def node_id() -> str:
        auth = request.headers.get("Authorization", "")
        scheme, _, credential = auth.partition(" ")
        if scheme != "Bearer" or not credential:
            raise JoinError("no node credential: send Authorization: Bearer CREDENTIAL (the "
                            "one the join answered)")
        return membership.authenticate(state, credential)

    @bp.errorhandler(JoinError)
    def refused(e: JoinError) -> tuple[Response, int]:
        return jsonify({"error": "refused", "message": str(e)}), 401

    @bp.errorhandler(ValueError)
    @bp.errorhandler(TypeError)
    def malformed(e: Exception) -> tuple[Response, int]:
        return jsonify({"error": "bad_request", "message": f"malformed node request: {e}"}), 400

    @bp.post("/join")
    def join() -> Response:
        data = body()
        grant = membership.join(state, cfg, str(data.get("token") or ""),
                                str(data.get("url") or ""), time.time())
        return jsonify(grant.to_json())

    @bp.post("/heartbeat")
    def heartbeat() -> Response:
        orders = membership.heartbeat(state, cfg, node_id(), body(), time.time())
        return jsonify(membership.orders_json(orders))

    @bp.post("/leave")
    def leave() -> Response:
        rec = membership.leave(state, node_id())
        if rec is not None and ledger is not None:
            ledger.close_node(membership.bill_row(rec), time.time(),
                              membership.increment_s(cfg, rec.provider))
        return jsonify({"left": rec.id if rec else None})

    return bp
