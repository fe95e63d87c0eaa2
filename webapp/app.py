"""Flask app factory: the page, the JSON API and the lobby socket.

`create_app` takes everything it needs, so tests build it directly; `kick_scaler` asks the
control plane to scale now (a Celery task in the real stack).
"""

from __future__ import annotations

import gc
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import redis
from flask import Flask, Response, jsonify, request, send_from_directory
from flask_sock import Sock
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.middleware.proxy_fix import ProxyFix

from billing.ledger import Ledger
from common.config import Config
from common.errors import IdentityError
from common.identity import COOKIE, HOW_TO, read_cookie, sign_cookie
from common.tickets import LEEWAY_S
from provisioner import catalog, metrics
from provisioner.placement import candidates_for
from provisioner.state import State
from webapp import lobby, nodes_api
from webapp.fleetview import FleetCache
from webapp.frontdoor import FrontDoor, RateLimited, json_error
from webapp.nodes_api import stamp_beat_path
from webapp.requests import USER_RE, BadRequest, check_origin, parse_lobby, parse_since, parse_user
from webapp.waiting import BACKSTOP_S, WaitingRoom

log = logging.getLogger("webapp")

STATIC = Path(__file__).with_name("static")
COOKIE_MAX_AGE_S = 365 * 86400


def create_app(cfg: Config, state: State, kick_scaler: Callable[[], None] = lambda: None,
               ledger: Ledger | None = None, waiting_backstop_s: float = BACKSTOP_S) -> Flask:
    """`ledger` (the billing database) serves /api/usage and joins /healthz;
    `waiting_backstop_s`: how often waiting lobbies look for room without being woken."""
    try:   # the config's model packages are version 1 of models the state lacks
        catalog.seed(state, cfg)
    except redis.RedisError as e:   # the lobby says `unavailable` until Redis is back
        log.warning("models not seeded: Redis failed (%s)", e)
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    if cfg.trusted_proxies:   # behind TLS proxies: the scheme and host the browser used, so
        # the uid cookie is Secure (the client address is frontdoor's, from the same hops)
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=0, x_proto=cfg.trusted_proxies,  # type: ignore[method-assign]
                                x_host=cfg.trusted_proxies)
    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": 65536}   # a node's report fits
    sock = Sock(app)
    fleet = FleetCache(state)
    room = WaitingRoom(state, cfg, lambda: fleet.get(fresh=True), candidates_for,
                       waiting_backstop_s)
    app.register_blueprint(nodes_api.blueprint(cfg, state))
    door = FrontDoor(cfg, state)

    def kick() -> None:
        if state.kick_scaler():
            try:
                kick_scaler()
            except Exception as e:  # the broker's boundary (a failover): the tick scales too
                log.warning("could not kick the scaler (%s); the next tick scales", e)

    def operator() -> bool:
        """The request carries the operator token (VOICE_ADMIN_TOKEN; none: no operator)."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return bool(cfg.admin_token) and scheme == "Bearer" and hmac.compare_digest(
            token.encode(), cfg.admin_token.encode())

    @app.before_request
    def utf8_query() -> None:
        """Browsers percent-encode every byte outside ASCII; a raw one that is not UTF-8 makes
        werkzeug raise as a view reads the query, so it is refused before any view runs."""
        try:
            request.query_string.decode()
        except UnicodeDecodeError:
            raise BadRequest("the query string is not UTF-8: percent-encode it (%XX)") from None

    @app.get("/")
    def index() -> Response:
        """The page; a browser without a uid cookie this server signed gets a new one (an
        id chosen here: the page itself never names its user)."""
        resp = send_from_directory(STATIC, "index.html", max_age=0)
        try:
            read_cookie(request.cookies.get(COOKIE, ""), cfg.user_token_secret)
        except IdentityError:
            resp.set_cookie(COOKIE, sign_cookie(f"u-{secrets.token_hex(8)}",
                                                cfg.user_token_secret),
                            max_age=COOKIE_MAX_AGE_S, samesite="Lax", httponly=True,
                            secure=request.is_secure)
        return resp

    @app.get("/api/me")
    def me() -> Response:
        """Who this request is: what the page shows as its user."""
        who = parse_user(request.args, request.cookies, cfg)
        return jsonify({"user": who.user, "via": who.via.value,
                        "authenticated": who.authenticated})

    @app.get("/api/models")
    def models() -> Response:
        return jsonify(catalog.listing(state, time.time()))

    @app.get("/api/regions")
    def regions() -> Response:
        down = state.regions_down(time.time())
        return jsonify([{"name": r.name, "provider": r.provider, "lat": r.lat, "lon": r.lon,
                         "state": "down" if r.name in down else "up",
                         "beacon_url": r.beacon_url or (
                             f"/beacon/{r.name}" if r.beacon_delay_ms else None)}
                        for r in cfg.regions])

    @app.get("/beacon/<name>")
    def beacon(name: str) -> Response:
        """A region's beacon as a local run plays geography: it answers `beacon_delay_ms`
        late (a deployment's beacons are `beacon_url`s inside each region)."""
        region = cfg.region(name)
        if region is None or not region.beacon_delay_ms:
            return Response(f"no beacon for region {name[:64]!r} here", 404)
        time.sleep(region.beacon_delay_ms / 1000)   # a greenlet's sleep under gevent
        return Response(status=204, headers={"Cache-Control": "no-store",
                                             "Access-Control-Allow-Origin": "*"})

    @app.get("/api/cluster")
    def cluster() -> Response:
        now = time.time()
        nodes = [n for n in state.nodes() if n.alive(now, cfg.heartbeat_timeout_s)]
        queues = [dict(zip(("model", "version", "region"), pool.split("|"), strict=True),
                       waiting=waiting)
                  for pool, waiting in state.queue_lengths().items() if waiting]
        return jsonify({
            "nodes": [{"id": n.id, "provider": n.provider, "region": n.region,
                       "model": n.model, "version": n.version, "state": n.state.value,
                       "sessions": n.sessions, "capacity": n.capacity, "url": n.url,
                       "started_at": n.started_at or n.requested_at, "progress": n.progress,
                       "eta_ready": n.eta_ready, "reports_dropped": n.dropped,
                       **({"suspect": n.suspect} if n.suspect else {}),
                       "market": "spot" if n.spot else "on-demand",
                       **({"drain_reason": n.drain_reason} if n.drain_reason else {}),
                       **({"interrupt_at": n.interrupt_at} if n.interrupt_at else {}),
                       **({"clock_offset_s": n.clock_offset_s}
                          if abs(n.clock_offset_s) > LEEWAY_S else {}),
                       "price_per_hour": float(n.price_per_hour)} for n in nodes],
            "queues": queues,
            "cost_per_hour": float(sum((Decimal(n.price_per_hour) for n in nodes), Decimal(0))),
        })

    scrape = metrics.registry(state)

    @app.get("/metrics")
    def prometheus() -> Response:
        """The fleet, queues, streams, cost, settlement lag, counters (Prometheus)."""
        return Response(generate_latest(scrape), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        checks = {}
        try:
            state.r.ping()
            checks["redis"] = "ok"
        except redis.RedisError as e:
            checks["redis"] = f"unreachable: {e}"
        if ledger is not None:
            checks["database"] = ledger.check()
        ok = all(v == "ok" for v in checks.values())
        return jsonify({"ok": ok, **checks}), 200 if ok else 503

    @app.get("/api/usage")
    def usage() -> Response:
        """The caller's usage; `?user=U` names whose (another's: operators, dev users)."""
        named = request.args.get("user") or None
        since = parse_since(request.args.get("since"))
        if named is not None and not USER_RE.match(named):
            raise BadRequest(f"user={named[:80]!r} is not a user id: use 1-64 characters "
                             "of A-Z a-z 0-9 _ . -")
        if named is not None and (cfg.dev_users or operator()):
            user = named
        else:
            try:
                user = parse_user(request.args, request.cookies, cfg, named=False).user
            except BadRequest:
                if named is None:
                    raise
                user = ""   # nobody, asking for someone's usage
            if named not in (None, user):
                return json_error(403, "forbidden", f"the usage of {named!r} is for that user "
                                  f"only: ask as that user ({HOW_TO}), or as an operator with "
                                  "Authorization: Bearer $VOICE_ADMIN_TOKEN")
        if ledger is None:
            return json_error(503, "unavailable", "no billing database is configured")
        try:
            rows = ledger.usage(user, since)
        except SQLAlchemyError as e:
            log.warning("usage of %s: the billing database failed: %s", user, e)
            return json_error(503, "unavailable", "the billing database cannot be reached "
                              "right now; usage is kept and billed once it is back: try again "
                              "in a minute")
        return jsonify({
            "user": user, "seconds": round(sum(r.seconds for r in rows), 3),
            "minutes": [{"minute": r.minute.strftime("%Y-%m-%dT%H:%M:00Z"), "model": r.model,
                         "region": r.region, "seconds": r.seconds} for r in rows]})

    @app.errorhandler(BadRequest)
    def bad_request(e: BadRequest) -> Response:
        return json_error(400, e.code, str(e))

    @app.errorhandler(ConnectionError)
    def dropped(e: ConnectionError) -> tuple[str, int]:
        """The client left mid-request, such as a lobby dropped during its handshake: no
        one to answer, and no traceback in the log per dropped socket."""
        return "", 400

    @app.errorhandler(redis.RedisError)
    def state_store_away(e: redis.RedisError) -> Response:
        """The state store is away (a failover takes seconds): say so, and when to retry."""
        log.warning("%s %s: Redis failed: %s", request.method, request.path, e)
        return json_error(503, "unavailable", "the control plane cannot reach its state "
                          "store right now; retry in a few seconds")

    @app.before_request
    def front_door() -> Response | None:   # cheap refusals, before the WebSocket handshake
        return door.early(request) if request.path == "/ws/session" else None

    @sock.route("/ws/session")
    def session(ws):  # type: ignore[no-untyped-def]
        client = door.client(request.environ)
        try:
            with door.socket(client):   # a client's open lobbies are capped (RateLimited)
                try:
                    check_origin(request.headers.get("Origin"),   # (a socket's scheme is ws)
                                 f"{'https' if request.is_secure else 'http'}://{request.host}",
                                 cfg)
                    req = parse_lobby(request.args, request.cookies, cfg)
                except BadRequest:
                    door.bad_request(client, time.time())   # spends the client's attempts
                    raise
                door.attempt(req.user, client, time.time())   # per user and per client
                lobby.run(ws, state, cfg, req, kick, fleet, room)
        except RateLimited as e:
            lobby.error(ws, e.code, str(e), retry_after_s=e.retry_after_s)
        except lobby.Refused as e:   # BadRequest too
            lobby.error(ws, e.code, str(e))

    return app


def before_serving(cfg: Config, state: State) -> threading.Event:
    """Start what a serving process runs beside its requests; set the event returned to stop it.

    It stamps the beat path (while no webapp serves, the reaper does not take the nodes'
    silence for death), and freezes the start-up heap out of the collector, whose full passes
    otherwise stall every open lobby. (A shorter GIL switch interval than Python's 5 ms cut
    the lobbies' tail latency but halved a burst's admissions per second.)"""
    stop = threading.Event()
    stamp_beat_path(cfg, state, stop)
    gc.freeze()
    return stop
