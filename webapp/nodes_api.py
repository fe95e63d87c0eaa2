"""Where nodes join, heartbeat and leave: `/api/nodes/*` (see docs/protocol.md).

Thin views over provisioner.membership. A node authenticates every heartbeat with the
credential it got at join (`Authorization: Bearer ...`); refusals are JSON errors that say
what was wrong and what the node should do (401: rejoin or shut down; 400: fix the report).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from flask import Blueprint, Response, jsonify, request

from common.config import Config
from common.errors import PackageError
from provisioner import catalog, membership
from provisioner.errors import JoinError
from provisioner.state import State

log = logging.getLogger("webapp.nodes_api")
MAX_REPORT_BYTES = 256 * 1024  # far above a full node's report
# A stamp of the beat path (stamp_beat_path) lapses after this many intervals without one: a
# shorter gap than a node's timeout (three), so nodes silenced by it never look dead.
STAMP_GAP_BEATS = 1.5


def stamp_beat_path(cfg: Config, state: State, stop: threading.Event) -> threading.Thread:
    """Stamp, every heartbeat interval until `stop`, that this webapp takes heartbeats: the
    reaper takes a node's silence for death only after a whole heartbeat timeout of stamps
    (provisioner.fleet.silence_is_death). Started by a serving process
    (webapp.app.before_serving): a webapp that comes back to a fleet of dead nodes must
    stamp for them to be reaped."""
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


def blueprint(cfg: Config, state: State) -> Blueprint:
    bp = Blueprint("nodes", __name__, url_prefix="/api/nodes")
    packages = catalog.store(cfg)

    def body() -> dict[str, Any]:
        request.max_content_length = MAX_REPORT_BYTES   # join is open to anyone: 413 past it
        return membership.parse_report(request.get_data(cache=False))

    def credential() -> str:
        auth = request.headers.get("Authorization", "")
        scheme, _, credential = auth.partition(" ")
        if scheme != "Bearer" or not credential:
            raise JoinError("no node credential: send Authorization: Bearer CREDENTIAL (the "
                            "one the join answered)")
        return credential

    def node_id() -> str:
        return membership.authenticate(state, credential())

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
        cred = credential()
        orders = membership.heartbeat(state, cfg, membership.authenticate(state, cred), cred,
                                      body(), time.time())
        return jsonify(membership.orders_json(orders, time.time()))

    @bp.get("/package/<digest>")
    def package(digest: str) -> tuple[Response, int] | Response:
        """The model package this node was given (its digest), for the node to check and
        load; another one is refused (403): a node sees only its own model's code."""
        who = node_id()
        try:
            data = membership.package_for(state, packages, who, digest)
        except JoinError as e:
            return jsonify({"error": "forbidden", "message": str(e)}), 403
        except PackageError as e:
            return jsonify({"error": "unavailable", "message": str(e)}), 503
        return Response(data, mimetype="application/gzip")

    @bp.post("/leave")
    def leave() -> Response:
        rec = membership.leave(state, cfg, node_id(), time.time())
        return jsonify({"left": rec.id if rec else None})

    return bp
