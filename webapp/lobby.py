"""The lobby: turn a session request into a node and a ticket, telling the user what happens.

A user with room on a ready node is placed at once; one without waits in the process's
waiting room (webapp.waiting) and sees `queued` / `booting` with a position and an ETA from
the real progress of the node that will take them (docs/architecture.md, "Waiting lobbies").
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import redis
from flask_sock import ConnectionClosed

from common import wsclose
from common.config import Config, Region
from common.states import NodeState
from common.tickets import Ticket, node_key, sign
from provisioner import catalog, orders
from provisioner.placement import candidates_for, home_region, near_regions, rank_regions
from provisioner.state import Admitted, Lock, NodeRecord, State, pool_id
from provisioner.versions import Entry, Version
from webapp import notes
from webapp.fleetview import FleetCache, FleetView
from webapp.requests import LobbyRequest, Refused
from webapp.waiting import WAITING_LOCK_TTL_S, Waiter, WaitingRoom

log = logging.getLogger("webapp.lobby")

# A waiting lobby sleeps until the waiting room has news for it (a node, its position, a
# take-over, an outage, a refusal, a new version), its client sends or leaves, or this long:
# a second while it shows an ETA that counts down, else ten (the wait limit's granularity).
ETA_TICK_S = 1.0
LOOK_S = 10.0
WAIT_LIMIT_S = 300.0  # after this long without a node the user is told no_capacity


def run(ws, state: State, cfg: Config, req: LobbyRequest,  # type: ignore[no-untyped-def]
        kick_scaler: Callable[[], None], fleet: FleetCache, room: WaitingRoom) -> None:
    """Drive one lobby socket until the user has a node, an error, or leaves."""
    try:
        _run(ws, state, cfg, req, kick_scaler, fleet, room)
    except Refused as e:
        error(ws, e.code, str(e))
        with contextlib.suppress(redis.RedisError):   # a failover: the user hears why anyway
            state.count("voice_lobby_errors", code=e.code)
    except ConnectionClosed:
        pass   # the user left; the finally blocks below cleaned up
    except redis.RedisError as e:
        log.warning("lobby for %s: Redis failed: %s", req.user, e)
        error(ws, "unavailable", "the control plane cannot reach its state store right now; "
                                 "try again in a few seconds")


def _run(ws, state: State, cfg: Config, req: LobbyRequest,  # type: ignore[no-untyped-def]
         kick_scaler: Callable[[], None], fleet: FleetCache, room: WaitingRoom) -> None:
    started = now = time.time()
    # nothing boots for this user: no reason to wake the autoscaler
    kick_scaler = kick_scaler if req.scales else (lambda: None)
    view = fleet.get()
    session_id, previous = _session_id(state, req)
    # one read: a push counts at once; a resume keeps its version while it still serves
    model = catalog.for_session(state, req.model, previous.get("version") if previous else None)
    if model is None:
        known = ", ".join(sorted(view.models))
        raise Refused("unknown_model", f"unknown model {req.model[:64]!r}; available: {known}")
    lost_node = previous.get("node") or None
    moving = _planned_move(state, lost_node, previous, now)
    # a recall follows its region's recovery by milliseconds: read outages fresh for a move
    down = state.regions_down(now) if moving else view.down
    home = home_region(cfg, req.lat, req.lon, only=req.region, avoid=down, measured=req.rtts)
    if lost_node and not moving:   # the client lost it: its slots stop counting as room
        state.report_lost(lost_node, now)
    got = state.admit(req.user, session_id, model.model, model.version, home.name, now,
                      candidates_for(cfg, model.model, model.version, home.name,
                                     view.records(model.model), now),
                      lock_ttl_s=min(cfg.ticket_ttl_s, WAITING_LOCK_TTL_S), takeover=req.takeover,
                      resume=req.resume is not None, tau_s=cfg.arrival_tau_s,
                      hold_s=cfg.ticket_ttl_s, heartbeat_timeout_s=cfg.heartbeat_timeout_s,
                      scales=req.scales)
    fence = _locked(state, cfg, req, session_id, got, moving)
    if req.resume is not None:
        state.count("voice_resumes", kind="planned" if moving else "lost")
    if isinstance(got, Admitted) and got.node is not None:      # room at once
        state.count("voice_admissions", outcome="placed")
        state.observe_wait(time.time() - started)   # before the user hears: counted once seen
        _ready(ws, state, cfg, req, session_id, fence, _node(state, got.node), now, down)
        return
    state.count("voice_admissions", outcome="queued")
    waiter = Waiter(req.user, session_id, fence, pool_id(model.model, model.version, home.name),
                    model, home.name,
                    position=got.position if isinstance(got, Admitted) else 1,
                    wake=ws.event.set)   # the socket's own event: the same wait serves both
    # waiting is a session too: the page may resume it through any webapp if this one dies
    state.note_waiting(session_id, {"user": req.user, "model": model.model,
                                    "version": model.version, "region": home.name,
                                    "fence": fence, "created_at": now})
    room.enter(waiter)
    kick_scaler()   # event-driven scale-up: no slot for this user right now
    placed = False
    try:
        last: tuple[object, ...] = ()
        while True:
            if waiter.lost:
                raise Refused("already_streaming", "this session was taken over from "
                              "another tab or device")
            view = room.view or fleet.get()   # the room's last read: no Redis per lobby
            if waiter.node_id is not None:
                state.observe_wait(time.time() - started)
                _ready(ws, state, cfg, req, session_id, fence,
                       _node(state, waiter.node_id), now, view.down)
                placed = True
                return
            new_version = _follow_version(state, waiter, view)
            moved = _leave_down_region(state, cfg, req, waiter, home, view.down)
            if new_version or moved is not home:   # wait in the live version's or the
                home = moved                       # nearest healthy region's queue instead
                room.poke()
                kick_scaler()
            model = waiter.model
            eta = _eta_s(cfg, model, home.name, view.records(model.model), waiter.position,
                         now, view.down)
            note = notes.waiting(cfg, req, home.name, view)
            # told again when it changes: an ETA by the half second, a position, a note
            seen = (("booting", round(eta * 2) / 2) if eta is not None
                    else ("queued", waiter.position), home.name, note)
            if seen != last:
                last = seen
                if eta is not None:
                    send(ws, type="booting", session_id=session_id, region=home.name,
                         eta_s=round(eta, 1), position=waiter.position,
                         version=model.version, **note)
                else:   # no ETA where nothing boots for the user: a slot must free up
                    boot = round(cfg.provider(home.provider).boot_s + cfg.model_load_s, 1)
                    send(ws, type="queued", session_id=session_id, region=home.name,
                         position=waiter.position, version=model.version,
                         **({"eta_s": boot} if req.scales else {}), **note)
            if now - started > WAIT_LIMIT_S:
                raise Refused("no_capacity", f"no node became free within {WAIT_LIMIT_S:.0f} s;"
                              " try again in a few minutes")
            _sleep(ws, ETA_TICK_S if eta is not None else LOOK_S)
            now = time.time()
    finally:
        given = room.leave(waiter)
        if not placed:
            if given:
                state.release_slot(given, session_id)
            state.abandon(waiter.pool, session_id, req.user, fence)


def _sleep(ws, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    """Until the room wakes this lobby, its client sends or leaves, or `timeout_s`: all set
    the socket's event (a greenlet's wait, no poll). ConnectionClosed if the user left."""
    if ws.event.wait(timeout_s):
        ws.event.clear()
    if ws.input_buffer:
        # Nothing is read from the client: a flood would only queue up in memory.
        raise Refused("bad_request", "the lobby takes no messages from the client; wait for "
                      "ready or an error, or close the lobby to leave")
    if not ws.connected:
        raise ConnectionClosed(ws.close_reason, ws.close_message)


def _node(state: State, node_id: str) -> NodeRecord:
    """The node a session was given, read now (the shared view may predate its join)."""
    node = state.node(node_id)
    if node is None:
        raise Refused("unavailable", f"node {node_id} vanished as it was given to you; "
                      "reconnect to try again")
    return node


def _leave_down_region(state: State, cfg: Config, req: LobbyRequest, waiter: Waiter,
                       home: Region, down: frozenset[str]) -> Region:
    """A waiting user whose region went down joins the queue of the nearest healthy region,
    keeping its turn; `home` itself if the user named it, none is healthy, or a node was
    given meanwhile."""
    if req.region is not None or home.name not in down:
        return home
    to = home_region(cfg, req.lat, req.lon, avoid=down, measured=req.rtts)
    pool = pool_id(waiter.model.model, waiter.model.version, to.name)
    if to.name in down or not state.move_waiting(waiter.session_id, waiter.pool, pool):
        return home
    log.info("session %s leaves down region %s for %s", waiter.session_id, home.name, to.name)
    waiter.pool, waiter.home = pool, to.name
    return to


def _follow_version(state: State, waiter: Waiter, view: FleetView) -> bool:
    """A waiting user whose version no longer takes new sessions (a push, a rollback, a
    failure) waits in the queue of the live version instead, keeping its turn."""
    def serves(entry: Entry | None) -> bool:
        return entry is None or not entry.live or waiter.model.version in (entry.live,
                                                                           entry.canary)
    if serves(view.models.get(waiter.model.model)):   # the shared view: no Redis
        return False
    entry = state.model_entry(waiter.model.model)      # it may be older than the lobby
    if entry is None or serves(entry):
        return False
    to = entry.versions[entry.live]
    pool = pool_id(to.model, to.version, waiter.home)
    if not state.move_waiting(waiter.session_id, waiter.pool, pool):
        return False
    log.info("session %s now waits for %s v%s", waiter.session_id, to.model, to.version)
    waiter.pool, waiter.model = pool, to
    return True


def _session_id(state: State, req: LobbyRequest) -> tuple[str, dict[str, str]]:
    """A new session id, or the resumed one and its record (the node it was on)."""
    if req.resume is None:
        return f"s-{uuid.uuid4().hex[:16]}", {}
    previous = state.session(req.resume)
    if previous.get("user") != req.user:
        raise Refused("bad_request", f"session {req.resume!r} is not a session of user "
                      f"{req.user!r}; start a new one without resume")
    return req.resume, previous


def _planned_move(state: State, node_id: str | None, session: dict[str, str],
                  now: float) -> bool:
    """A resume from a draining node, or of a session recalled to its nearest region, is a
    planned move (the node told the page to move): the node is alive and its stream plays
    on until the page has the new one playing (make-before-break), so it is neither
    reported lost nor cut."""
    if not node_id:
        return False
    rec = state.node(node_id)
    if rec is None or rec.reported_lost:
        return False   # gone: whatever it was told, the client lost it
    return (float(session.get("recall_by") or 0) > now or rec.drain_deadline is not None
            or rec.state is NodeState.DRAINING)


def _locked(state: State, cfg: Config, req: LobbyRequest, session_id: str,
            got: Admitted | Lock, moving: bool = False) -> int:
    """The fencing token; a refusal says where the user's stream is and what to do."""
    if isinstance(got, Lock):
        since = datetime.fromtimestamp(got.since, UTC).strftime("%H:%M:%S UTC")
        raise Refused("already_streaming",
                      f"user {req.user} is already streaming {got.model} in {got.region} "
                      f"since {since} (session {got.session}); stop that stream first, or "
                      "take it over from here (reconnect with takeover=1)")
    taken = got.lock
    if taken.previous_session and taken.previous_node and not (
            moving and taken.previous_session == session_id):
        # A take-over, or a resume of a session whose old connection still streams: the
        # old stream closes now (its node would find its fence stale within a beat anyway).
        rec = state.node(taken.previous_node)
        if rec is not None:
            orders.kick(cfg, rec, taken.previous_session, taken.fence)
    return taken.fence


def _eta_s(cfg: Config, model: Version, region: str, records: list[NodeRecord], position: int,
           now: float, down: frozenset[str] = frozenset()) -> float | None:
    """When the node that will take this user is ready, from its real boot/load progress.

    None when no coming node has a slot for this position (the user is queued). A node
    coming in a region that is down is not coming (its machine died with the region).
    """
    coming = sorted((n for n in records if n.state.coming and not n.retired
                     and n.region not in down
                     and (n.model, n.version, n.home) == (model.model, model.version, region)),
                    key=lambda n: n.eta_ready or now)
    index = math.ceil(position / model.streams_per_gpu) - 1
    if index >= len(coming):
        return None
    return max(0.0, (coming[index].eta_ready or now) - now)


def _ready(ws, state: State, cfg: Config, req: LobbyRequest,  # type: ignore[no-untyped-def]
           session_id: str, fence: int, node: NodeRecord, now: float,
           down: frozenset[str] = frozenset()) -> None:
    """Give the session its node: a ticket for it. A user placed beyond the latency budget
    of the nearest region, because it is down, is marked displaced: recalled there once it
    serves again (a node within the budget is where placement may put anyone)."""
    # the lock now waits for the node's stream to take it: a ticket's life, not a lobby's
    if state.refresh_locks(node.id, [(req.user, session_id, fence)], cfg.ticket_ttl_s):
        # taken meanwhile (a resume of this session, another tab's take-over): the session
        # record and the node are theirs now
        raise Refused("already_streaming", "this session was taken over from another tab "
                      "or device")
    nearest = home_region(cfg, req.lat, req.lon, measured=req.rtts)
    away = (req.region is None and nearest.name in down
            and node.region not in near_regions(cfg, nearest.name))
    state.save_session(session_id, {"user": req.user, "model": node.model,
                                    "version": node.version, "region": node.region,
                                    "node": node.id, "fence": fence, "created_at": now},
                       ttl_s=7 * 86400, away_from=nearest.name if away else None)
    note = notes.region_down(cfg, req, node.home, down)
    ticket = sign(Ticket(user=req.user, session=session_id, node=node.id, model=node.model,
                         version=node.version, fence=fence, exp=now + cfg.ticket_ttl_s),
                  node_key(cfg.ticket_secret, node.id))
    region = cfg.region(node.region)
    rtt = rank_regions([region], req.lat, req.lon, measured=req.rtts)[0][1] if region else 0.0
    send(ws, type="ready", session_id=session_id, node_url=node.url, ticket=ticket,
         region=node.region, node_id=node.id, rtt_ms=round(rtt, 1), version=node.version,
         **({"note": note} if note else {}))
    wsclose.close(ws, 1000, "ready")


def send(ws, **msg: object) -> None:  # type: ignore[no-untyped-def]
    ws.send(json.dumps(msg))


def error(ws, code: str, message: str, **fields: object) -> None:  # type: ignore[no-untyped-def]
    """Send a lobby error (with `fields` beside code and message) and close; a client that
    already left is fine."""
    wsclose.after_handshake()
    try:
        send(ws, type="error", code=code, message=message, **fields)
    except ConnectionClosed:
        return
    wsclose.close(ws, 1000, code)
