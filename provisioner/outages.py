"""Region outages: a region whose serving nodes all went at once is avoided for a while,
and the users placed away from it while it was down move back once it serves again
(recall: ~60 sessions per outage on the simulator's days, each back from ~100 ms farther
for its remaining minutes; bench/features.py)."""

from __future__ import annotations

import logging

from common.config import RECALL_MOVE_S, Config
from provisioner import orders
from provisioner.state import NodeRecord, State
from provisioner.states import NodeState

log = logging.getLogger("provisioner")

REGION_COOLOFF_S = 60.0    # a region whose nodes all failed is avoided this long


def mark_down(state: State, cfg: Config, records: list[NodeRecord], dead: list[str],
              now: float) -> dict[str, float]:
    """Mark regions down where `dead` leaves no serving node; returns the regions down
    before (region -> until when), for the caller to mark up where a node turned ready
    since."""
    down = state.regions_down_until(now)
    for region in lost_regions(cfg, records, dead, now):
        log.warning("region %s lost all its nodes: avoided for %.0f s", region,
                    REGION_COOLOFF_S)
        state.mark_region_down(region, now + REGION_COOLOFF_S)
        state.wake_lobbies()   # its waiting users move to the nearest healthy region
    return down


def recall(state: State, cfg: Config, records: list[NodeRecord], now: float) -> list[str]:
    """Users placed away from their nearest region while it was down move back once a node
    serves there again: their node tells each page to move, and it plays on there until it
    streams in its own region (make-before-break; a node may have to boot for it there).
    Returns the sessions recalled."""
    displaced = state.displaced()
    if not displaced:
        return []
    down = state.regions_down_until(now)
    serving = {r.region for r in records if r.state is NodeState.READY
               and answering(cfg, r, now) and r.region not in down}
    by_id = {r.id: r for r in records}
    by_node: dict[str, list[str]] = {}
    for sid, session in zip(displaced, state.sessions(displaced), strict=True):
        rec = by_id.get(session.get("node", ""))
        if rec is None:   # its node went: the page resumes, and is placed anew
            state.recalled(sid, None)
        elif session.get("away_from") in serving:
            by_node.setdefault(rec.id, []).append(sid)
    recalled = []
    for node_id, sids in by_node.items():
        live = set(state.live_sessions(node_id))
        moving = [sid for sid in sids if sid in live]
        if moving and not orders.recall(cfg, by_id[node_id], moving):
            continue   # still displaced: the next tick tries again
        for sid in sids:   # one that is not live there ended: nothing to move
            state.recalled(sid, now + RECALL_MOVE_S if sid in live else None)
        if moving:
            log.info("sessions %s recalled from %s", moving, by_id[node_id].region)
            recalled += moving
    return recalled


def lost_regions(cfg: Config, records: list[NodeRecord], dead: list[str], now: float) -> set[str]:
    """Regions where `dead` leaves no serving node and two or more went at once: an outage.
    One node dying alone is a crash (its users resume, a node boots there again); a region
    whose provider is really down shows it when that boot fails (`poll`). A node that missed
    its last beat or that a client reported lost counts as gone: the nodes of a region that
    failed at once time out up to a beat apart, across two reaps."""
    out = set()
    for region in {r.region for r in records if r.id in dead}:
        serving = [r for r in records if r.region == region and r.state.serving]
        gone = [r for r in serving if r.id in dead or not answering(cfg, r, now)]
        if len(serving) >= 2 and len(gone) == len(serving):
            out.add(region)
    return out


def answering(cfg: Config, rec: NodeRecord, now: float) -> bool:
    """Beat within the last one and a half intervals, and no client reported it lost since."""
    return not rec.reported_lost and rec.last_seen >= now - 1.5 * cfg.heartbeat_interval_s
