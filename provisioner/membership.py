"""Nodes join and heartbeat over HTTP: the control plane's side of node membership.

A node holds no Redis or database credentials. It joins with a one-time token (minted when
we boot its VM, or by `voicectl byo-token` for an own machine), gets a per-node credential
that can be revoked and its own ticket key, and then reports only its own health, load and
usage; what the control plane decided (model, region, capacity, price) stays ours. Orders
that cannot wait for the next heartbeat are pushed (provisioner/orders.py). Views in
webapp/nodes_api.py are thin adapters around these functions.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import replace
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

from common.config import NAME_RE, NODE_PORT, Config, Provider
from common.grant import Grant
from common.jsonobj import json_object
from common.tickets import node_key
from provisioner import catalog, spot
from provisioner.errors import BadReport, JoinError
from provisioner.packages import PackageStore
from provisioner.placement import home_region
from provisioner.state import Beat, NodeRecord, Orders, State
from provisioner.states import NodeState

log = logging.getLogger("provisioner.membership")

NODE_STATES = {NodeState.LOADING.value, NodeState.READY.value, NodeState.DRAINING.value,
               NodeState.DEAD.value}
CONN_RE = re.compile(r"^[0-9a-f]{1,16}$")
URL_RE = re.compile(r"^wss?://[A-Za-z0-9.\-\[\]:]+(:\d+)?(/[A-Za-z0-9_./\-]*)?$")
MAX_COUNTERS = 2000          # per heartbeat: a node with 4 streams reports a handful
STALL_S = 2.0               # a model call hung this long: the node's users move (a frame: ms)
SLOW_MS = 40.0              # answers this late (p95 over the node's last seconds): they move too
MAX_INT = 2**53             # fences and minutes: exact in Lua's doubles (and JSON's)
MAX_CLOCK_OFFSET_S = 10 * 365 * 86400.0   # a node's clock off by more is not a clock
MAX_STREAMS = 64             # per heartbeat: far above any node's capacity


def user_data(cfg: Config, provider: Provider, token: str, note: str = "") -> str:
    """The boot script of a node VM: install the project if needed, then join. A cloud VM
    announces its public address from the instance metadata service and the provider's
    `node_port` (0: any free port, for several "VMs" on one dev machine); a `local` one
    listens on loopback."""
    where = "" if provider.driver == "local" else (
        f" --public-url auto --port {int(provider.options.get('node_port', NODE_PORT))}")
    return "\n".join([
        "#!/bin/sh",
        f"# voice changer node{': ' + note if note else ''}",
        "set -e",
        "if ! command -v voicectl >/dev/null 2>&1; then",
        f"  python3 -m pip install --quiet '{pinned(cfg.node_package)}'",
        "fi",
        f"exec voicectl node --join {cfg.public_url} --token {token}{where}",
        "",
    ])


def pinned(package: str) -> str:
    """The node installs the control plane's own version of the project (its protocol and
    package loader), not whatever is newest; a requirement that names a version, a URL or
    a path is taken as it is."""
    if any(c in package for c in "=<>@/~ "):
        return package
    try:
        return f"{package}=={metadata.version('voicechanger')}"
    except metadata.PackageNotFoundError:   # running from a source tree: unpinned
        return package


def join_token_for(state: State, cfg: Config, node_id: str) -> str:
    """The join token for a node we are booting; the same one if asked again (retries)."""
    token = state.node_join_token(node_id)
    if token is None:
        token = state.mint_join({"node": node_id}, cfg.join_token_ttl_s)
        state.set_node(node_id, join_token=token)
    return token


def byo_token(state: State, cfg: Config, region: str, model: str | None, ttl_s: float) -> str:
    """A join token for one own machine in `region` (its provider must be `byo`)."""
    r = cfg.region(region)
    if r is None:
        raise JoinError(f"unknown region {region!r}; known: {[x.name for x in cfg.regions]}")
    if cfg.provider(r.provider).driver != "byo":
        byo = [x.name for x in cfg.regions if cfg.provider(x.provider).driver == "byo"]
        raise JoinError(f"region {region!r} is served by provider {r.provider!r}, not an own "
                        f"machine provider (driver = \"byo\"); byo regions: {byo or 'none'}; "
                        "add one to the config")
    name = model or cfg.models[0].name
    if state.model_entry(name) is None:
        raise JoinError(f"unknown model {name!r}; known: {sorted(state.model_entries())}")
    return state.mint_join({"byo": region, "model": name}, ttl_s)


def join(state: State, cfg: Config, token: str, url: str, now: float) -> Grant:
    """Redeem a join token: the node gets its id, model, credential and ticket key."""
    if not URL_RE.match(url or ""):
        raise JoinError(f"node url {url[:100]!r} is not ws://HOST:PORT/PATH or wss://...; "
                        "pass --public-url as browsers reach this machine")
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "wss" else 80)
    except ValueError:
        port = -1
    if parts.scheme not in cfg.node_url_schemes or (
            cfg.node_url_ports and port not in cfg.node_url_ports):
        raise JoinError(f"node url {url[:100]!r}: this control plane takes nodes at "
                        f"{' or '.join(s + '://' for s in cfg.node_url_schemes)}HOST"
                        + (f" on port {', '.join(map(str, cfg.node_url_ports))}"
                           if cfg.node_url_ports else "")
                        + "; pass a --public-url like that")
    grant = state.redeem_join(token or "")
    if grant is None:
        raise JoinError("join token unknown, expired or already used; a node joins once per "
                        "token: ask for a new one (voicectl byo-token --region R)")
    if "node" in grant:
        node_id = grant["node"]
        rec = state.node(node_id)
        if rec is None or rec.retired:
            raise JoinError(f"node {node_id} is no longer wanted (stopped before it joined); "
                            "this machine should shut down")
        fields: dict[str, Any] = {"url": url, "started_at": now}
    else:
        node_id, rec = f"b-{uuid.uuid4().hex[:10]}", None
        region = cfg.region(grant["byo"])
        assert region is not None, "byo_token checked the region"
        provider = cfg.provider(region.provider)
        v = catalog.for_session(state, grant["model"])
        if v is None:
            raise JoinError(f"model {grant['model']!r} is no longer served; ask for a new "
                            "token (voicectl byo-token --region R --model M)")
        home = home_region(cfg, region.lat, region.lon).name
        fields = {"id": node_id, "provider": provider.name, "region": region.name,
                  "home": home, "model": v.model, "version": v.version,
                  "digest": v.digest, "state": NodeState.LOADING.value,
                  "requested_at": now, "started_at": now, "deadline": now + 3600,
                  "capacity": v.streams_per_gpu, "price_per_hour": provider.price_per_hour,
                  "url": url, "last_seen": now}
    credential = state.enroll(node_id, fields)
    rec = state.node(node_id)
    assert rec is not None
    log.info("node %s joined from %s (%s v%s in %s)", node_id, url, rec.model, rec.version,
             rec.region)
    return Grant(node_id, credential, node_key(cfg.ticket_secret, node_id), rec.model,
                 rec.version, rec.digest, rec.capacity, rec.region, rec.provider,
                 cfg.heartbeat_interval_s, cfg.model_load_s, cfg.crash_rate)


def authenticate(state: State, credential: str) -> str:
    node_id = state.node_for_credential(credential)
    if node_id is None:
        raise JoinError("unknown or revoked node credential; this node is not part of the "
                        "fleet (rejoin with a new join token)")
    return node_id


def parse_report(raw: str | bytes) -> dict[str, Any]:
    """A node's request body or heartbeat message as a JSON object, or BadReport."""
    try:
        return json_object(raw)
    except ValueError as e:
        raise BadReport(f"the report is {e}; send one JSON object") from None


def parse_beat(body: Mapping[str, Any]) -> Beat:
    """Validate a node's report, or BadReport naming what is wrong (the beat script keys its
    usage counters by what the control plane knows of the node: its id, model and region,
    never by what the node says)."""
    st = body.get("state")
    if not isinstance(st, str) or st not in NODE_STATES:
        raise BadReport(f"state {str(st)[:40]!r} is not one of {sorted(NODE_STATES)}")
    streams = _rows(body, "streams", 4, MAX_STREAMS, "[user, session, fence, conn]")
    usage = _rows(body, "usage", 5, MAX_COUNTERS, "[minute_s, user, session, conn, seconds]")
    closed = _rows(body, "closed", 2, MAX_COUNTERS, "[user, session]")
    progress = _rows(body, "stream_progress", 4, MAX_STREAMS,
                     "[session, frames_in, frames_out, owed_s]")
    owed_s = max((_float(row[3], "owed_s") for row in progress), default=0.0)
    lag = body.get("lag_ms")
    clock = _float(body.get("clock_offset_s") or 0, "clock_offset_s")   # optional (v3)
    if abs(clock) > MAX_CLOCK_OFFSET_S:
        raise BadReport(f"clock_offset_s {clock} is not an offset in seconds between clocks")
    live = []
    for user, session, fence, _conn in streams:
        fence = _int(fence, "fence")
        if not 0 < fence < MAX_INT:
            raise BadReport(f"fence {fence} is not a fencing token the lobby issued")
        live.append((_name(user, "user"), _name(session, "session"), fence))
    counters = []
    for minute, user, session, conn, seconds in usage:
        _name(user, "user")
        _name(session, "session")
        if not isinstance(conn, str) or not CONN_RE.match(conn):
            raise BadReport(f"connection id {str(conn)[:20]!r} is not 1-16 hex digits")
        minute, seconds = _int(minute, "usage minute"), _float(seconds, "usage seconds")
        if minute % 60 or not 0 <= minute < MAX_INT or not 0.0 <= seconds <= 60.0:
            raise BadReport(f"usage minute {minute} / {seconds} s is not a UTC minute with "
                            "0-60 s streamed")
        counters.append((minute, f"{user}|{session}:{conn}", round(seconds, 4)))
    ended = [(_name(user, "user"), _name(session, "session")) for user, session in closed]
    eta = body.get("eta_ready_s")
    ready_at = body.get("ready_at")
    counts = body.get("counts") or {}
    interrupt = body.get("interruption_at")   # optional (v4): its spot notice's time
    if interrupt is not None and not 0 < _float(interrupt, "interruption_at") < MAX_INT:
        raise BadReport(f"interruption_at {interrupt!r} is not a unix time in seconds")
    if not isinstance(counts, dict):
        raise BadReport("counts must be an object {\"started\": N, \"failed\": M}")
    return Beat(state=str(st),
                progress=min(1.0, max(0.0, _float(body.get("progress") or 0, "progress"))),
                eta_ready=None if eta is None else _float(eta, "eta_ready_s"),
                ready_at=_float(ready_at, "ready_at") if ready_at else None,
                serving=str(body.get("serving") or "")[:200], streams=live, usage=counters,
                closed=ended, started=max(0, _int(counts.get("started", 0), "started")),
                failed=max(0, _int(counts.get("failed", 0), "failed")),
                load_error=str(body.get("load_error") or "")[:500],
                stalled_s=max(0.0, owed_s, _float(body.get("stalled_s") or 0, "stalled_s")),
                lag_ms=None if lag is None else max(0.0, _float(lag, "lag_ms")),
                interrupt_at=None if interrupt is None else float(interrupt),
                clock_offset_s=clock)


def _rows(body: Mapping[str, Any], key: str, width: int, most: int,
          shape: str) -> list[list[Any]]:
    rows = body.get(key) or []
    if not isinstance(rows, list) or len(rows) > most or not all(
            isinstance(r, list) and len(r) == width for r in rows):
        raise BadReport(f"{key} must be a list of at most {most} {shape}")
    return rows


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise BadReport(f"{what} {str(value)[:70]!r} must be 1-64 of [A-Za-z0-9_.-]")
    return value


def _float(value: object, what: str) -> float:
    """A finite number (JSON numbers, or their text)."""
    try:
        got = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        got = math.nan
    if isinstance(value, bool) or not math.isfinite(got):
        raise BadReport(f"{what} {str(value)[:40]!r} is not a finite number")
    return got


def _int(value: object, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(_float(value, what))


def heartbeat(state: State, cfg: Config, node_id: str, credential: str,
              body: Mapping[str, Any], now: float) -> Orders:
    """Record one heartbeat of the node whose credential this is (see heartbeats)."""
    got = heartbeats(state, cfg, [(node_id, credential, body)], now)[0]
    if isinstance(got, Exception):
        raise got
    return got


def heartbeats(state: State, cfg: Config, reports: list[tuple[str, str, Mapping[str, Any]]],
               now: float) -> list[Orders | JoinError | ValueError]:
    """Record the heartbeats of many nodes (node id, credential, report) in one round trip:
    each one script call that also checks the credential, so a thousand nodes' beats stay
    cheap and a revoked node's stop. Per report: its orders, or why it was refused."""
    out: list[Orders | JoinError | ValueError] = []
    good: list[tuple[int, str, str, Beat]] = []
    for node_id, credential, body in reports:
        try:
            beat = parse_beat(body)
        except BadReport as e:
            out.append(e)
            continue
        if beat.eta_ready is not None:   # the node says "in N s"; the fleet keeps times
            beat = replace(beat, eta_ready=now + beat.eta_ready if beat.eta_ready > 0 else None)
        good.append((len(out), node_id, credential, beat))
        out.append(ValueError("not recorded"))
    recorded = state.beats([(n, c, b) for _, n, c, b in good], now,
                           cfg.heartbeat_timeout_s) if good else []
    wake = False
    failing: set[str] = set()
    for (i, node_id, _, beat), orders in zip(good, recorded, strict=True):
        if orders is True:
            out[i] = JoinError(f"node {node_id}'s credential was revoked; rejoin with a new "
                               "join token")
        elif orders is False:
            out[i] = JoinError(f"node {node_id} was removed from the fleet (no heartbeat in "
                               "time, or stopped); this node should shut down")
        elif isinstance(orders, Exception):
            log.warning("node %s: report not recorded (%s)", node_id, orders)
            out[i] = BadReport(f"the report could not be recorded ({orders}); send numbers "
                               "and names in their ranges (docs/protocol.md)")
        else:
            if orders.dropped:
                log.warning("node %s: %d report(s) dropped: not placed there", node_id,
                            orders.dropped)
            if beat.interrupt_at is not None:   # this answer carries the drain already
                orders = replace(orders, drain_deadline=spot.noticed(
                    state, node_id, beat.interrupt_at, now) or orders.drain_deadline)
            out[i] = orders
            loaded = beat.state == NodeState.READY.value and orders.was != beat.state
            wake = wake or bool(beat.closed) or loaded
            load_failed = beat.state == NodeState.DEAD.value and orders.was != beat.state
            if (beat.started or loaded or load_failed) and state.report_health(
                    node_id, beat.serving, beat.started, beat.failed, loaded, load_failed):
                failing.add(beat.serving.partition(":")[0])   # judged now, not next tick
            why = (f"its model call has hung for {beat.stalled_s:.1f} s"
                   if beat.stalled_s > STALL_S else
                   f"it answers {beat.lag_ms:.0f} ms late (p95; over {SLOW_MS:.0f} ms is slow)"
                   if beat.lag_ms is not None and beat.lag_ms > SLOW_MS else "")
            if why and not state.node_suspect(node_id):
                log.warning("node %s: %s: drained, its users move", node_id, why)
                state.mark_suspect(node_id, why, now)
                wake = True
            if load_failed:
                log.warning("node %s could not load %s: %s", node_id, beat.serving,
                            beat.load_error or "no reason given")
    if failing:
        catalog.roll_back_failures(state, cfg, now, only=failing)
    if wake:
        state.wake_lobbies()   # room appeared: waiting lobbies look now, not at the backstop
    return out


def orders_json(orders: Orders, now: float) -> dict[str, Any]:
    """The answer to a heartbeat: the orders, and the control plane's clock (`now`), which
    the node keeps its own by (tickets, drain deadlines and usage minutes are ours)."""
    return {"drain_deadline": orders.drain_deadline, "retarget": orders.retarget,
            "lost": list(orders.lost), "now": now}


def package_for(state: State, store: PackageStore, node_id: str, digest: str) -> bytes:
    """The package a node was given, by digest; never another one (JoinError)."""
    rec = state.node(node_id)
    if rec is None or rec.digest != digest:
        serves = f"{rec.model} v{rec.version} ({rec.digest})" if rec else "nothing"
        raise JoinError(f"node {node_id} serves {serves}; it may fetch only that package, "
                        f"not {digest[:80]!r}")
    return store.get(digest)


def bill_row(rec: NodeRecord) -> dict[str, object]:
    """What the GPU bill records of a node: the configured price, never a node's word."""
    return {"id": rec.id, "provider": rec.provider, "region": rec.region, "model": rec.model,
            "started_s": rec.requested_at or rec.started_at, "price_per_hour": rec.price_per_hour,
            "last_seen_s": rec.last_seen or None}


def increment_s(cfg: Config, provider: str) -> int:
    return next((p.billing_increment_s for p in cfg.providers if p.name == provider), 1)


def leave(state: State, cfg: Config, node_id: str, now: float) -> NodeRecord | None:
    """A node leaves (an own machine drained on SIGTERM): note its bill's end (the billing
    worker writes it), revoke it and forget it."""
    rec = state.node(node_id)
    if rec is not None:
        state.note_node_end(bill_row(rec), now, increment_s(cfg, rec.provider))
    state.revoke(node_id)
    state.forget_node(node_id)
    return rec
