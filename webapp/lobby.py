"""The lobby: turn a session request into a node and a ticket, telling the user what happens.

`place()` is the one seam between the lobby and the fleet: it reads the live state, asks
the placement policy for an order, and claims a slot atomically.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from flask_sock import ConnectionClosed

from common.config import Config
from common.tickets import Ticket, sign
from provisioner.placement import claim_order, rank_regions, regions_in_budget
from provisioner.state import NodeRecord, State
from provisioner.states import NodeState
from webapp.requests import LobbyRequest

POLL_S = 0.1          # how often a waiting lobby re-tries placement
WAIT_LIMIT_S = 300.0  # after this long without a node the user is told no_capacity


@dataclass(frozen=True)
class Ready:
    node: NodeRecord
    rtt_ms: float


@dataclass(frozen=True)
class Booting:
    region: str
    eta_s: float


@dataclass(frozen=True)
class Unplaceable:
    code: str
    message: str


Placement = Ready | Booting | Unplaceable


def place(state: State, cfg: Config, req: LobbyRequest, session_id: str, now: float) -> Placement:
    """Claim a slot for the session on the best ready node, or say why it must wait."""
    regions = [cfg.region(req.region)] if req.region else cfg.regions
    ranked = rank_regions([r for r in regions if r], req.lat, req.lon)
    nodes = [n for n in state.nodes() if n.alive(now, cfg.heartbeat_timeout_s)
             and n.model == req.model.name and n.version == req.model.version]
    near = dict((r.name, rtt) for r, rtt in regions_in_budget(ranked, cfg.latency_budget_ms))
    if not any(n.region in near for n in nodes):
        near = dict((r.name, rtt) for r, rtt in ranked)   # nothing close: any region will do
    order = claim_order([n.view() for n in nodes], req.model.name, req.model.version, near)
    claimed = state.claim_slot(order, session_id, now, cfg.ticket_ttl_s, cfg.heartbeat_timeout_s)
    if claimed is not None:
        node = next(n for n in nodes if n.id == claimed)
        return Ready(node, near[node.region])
    coming = [n for n in nodes if n.state is NodeState.LOADING and n.region in near]
    if coming:
        first = min(coming, key=lambda n: n.eta_ready or now)
        return Booting(first.region, max(0.0, (first.eta_ready or now) - now))
    if any(n.state is NodeState.READY for n in nodes if n.region in near):
        return Unplaceable("no_capacity", f"every {req.model.name} node is full "
                           f"({cfg.node_capacity} streams each); try again in a minute")
    return Unplaceable("no_capacity", f"no node serves {req.model.name} right now; "
                       "try again in a minute or pick another model")


def issue_ticket(cfg: Config, req: LobbyRequest, session_id: str, node: NodeRecord,
                 fence: int, now: float) -> str:
    return sign(Ticket(user=req.user, session=session_id, node=node.id, model=node.model,
                       version=node.version, fence=fence, exp=now + cfg.ticket_ttl_s),
                cfg.ticket_secret)


def run(ws, state: State, cfg: Config, req: LobbyRequest) -> None:  # type: ignore[no-untyped-def]
    """Drive one lobby socket until the user has a node, an error, or leaves."""
    session_id = req.resume or f"s-{uuid.uuid4().hex[:16]}"
    started = time.time()
    last_eta: int | None = None
    while True:
        now = time.time()
        outcome = place(state, cfg, req, session_id, now)
        if isinstance(outcome, Ready):
            node = outcome.node
            fence = state.next_fence(req.user)
            state.save_session(session_id, {"user": req.user, "model": node.model,
                                            "version": node.version, "region": node.region,
                                            "node": node.id, "fence": fence,
                                            "created_at": now}, ttl_s=86400)
            send(ws, type="ready", session_id=session_id, node_url=node.url,
                 ticket=issue_ticket(cfg, req, session_id, node, fence, now),
                 region=node.region, node_id=node.id, rtt_ms=round(outcome.rtt_ms, 1))
            return
        if isinstance(outcome, Unplaceable) or now - started > WAIT_LIMIT_S:
            message = (outcome.message if isinstance(outcome, Unplaceable)
                       else f"no node became free within {WAIT_LIMIT_S:.0f} s; try again later")
            error(ws, "no_capacity", message)
            return
        if round(outcome.eta_s) != last_eta:
            last_eta = round(outcome.eta_s)
            send(ws, type="booting", session_id=session_id, region=outcome.region,
                 eta_s=round(outcome.eta_s, 1))
        if ws.receive(timeout=POLL_S) is not None:
            pass  # the client has nothing to say while waiting; ignore chatter


def send(ws, **msg: object) -> None:  # type: ignore[no-untyped-def]
    ws.send(json.dumps(msg))


def error(ws, code: str, message: str) -> None:  # type: ignore[no-untyped-def]
    """Send a lobby error and close; a client that already left is fine."""
    try:
        send(ws, type="error", code=code, message=message)
        ws.close(1000, code)
    except ConnectionClosed:
        pass
