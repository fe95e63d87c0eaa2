"""Orders pushed to a node that cannot wait for its next heartbeat: close a taken-over
stream, move streams back to their nearest region, beat now. Sent to the node's
`GET /control` (the http(s) twin of its ws(s) URL) with the order in `X-Order`, signed
with the node's key; the next heartbeat is the backstop where one carries the order."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from typing import Any

import requests

from common.config import RECALL_MOVE_S, Config
from common.tickets import node_key, sign_control
from provisioner.state import NodeRecord

log = logging.getLogger("provisioner.orders")

NOTIFY_TIMEOUT_S = 1.0


def control_url(node_url: str) -> str:
    """ws://host:port/ws -> http://host:port/control (wss -> https)."""
    scheme, _, rest = node_url.partition("://")
    host = rest.split("/", 1)[0]
    return f"{'https' if scheme == 'wss' else 'http'}://{host}/control"


def notify(cfg: Config, rec: NodeRecord, payload: Mapping[str, Any],
           wait: bool = False) -> bool:
    """Push an order to a node now. Best effort, in the background, where its next
    heartbeat is the backstop (kick, wake); with `wait`, whether the node took it."""
    if not rec.url:
        return False
    body = json.dumps(dict(payload)).encode()
    sig = sign_control(body, node_key(cfg.ticket_secret, rec.id))

    def send() -> bool:
        try:
            return requests.get(control_url(rec.url), timeout=NOTIFY_TIMEOUT_S,
                                headers={"X-Order": body.decode(), "X-Signature": sig},
                                verify=cfg.node_ca_file or True).ok
        except requests.RequestException as e:
            log.info("order to node %s not delivered (%s)", rec.id, e)
            return False
    if wait:
        return send()
    threading.Thread(target=send, name="notify", daemon=True).start()
    return True


def recall(cfg: Config, rec: NodeRecord, session_ids: list[str]) -> bool:
    """Tell these streams to move to their users' nearest region (make-before-break): they
    play on here for up to RECALL_MOVE_S while the page gets a node there. No heartbeat
    carries a recall: False if the node did not take it (the caller tries again)."""
    return notify(cfg, rec, {"recall": list(session_ids), "within_s": RECALL_MOVE_S},
                  wait=True)


def kick(cfg: Config, rec: NodeRecord, session_id: str, fence: int) -> None:
    """Close a stream now (its user took it over, or resumed it, elsewhere) and heartbeat at
    once: a live node that a resuming client reported lost is placeable again at once. Only
    its connections under `fence`, the new holder's (a resume may reach this node first)."""
    notify(cfg, rec, {"kick": [session_id], "below": fence, "wake": True})


def wake(cfg: Config, rec: NodeRecord) -> None:
    """Heartbeat now and so read new orders (a retarget)."""
    notify(cfg, rec, {"wake": True})
