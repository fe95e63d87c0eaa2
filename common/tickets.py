"""Short-lived stream tickets: the control plane signs, the node verifies (HMAC-SHA256).

A ticket is `base64url(json payload) + "." + base64url(signature)`. The payload names the
user, the session, the node, the model and version, the user's lock fencing token and an
expiry (unix seconds). The clock is an argument.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import asdict, dataclass

from common.errors import TicketError


@dataclass(frozen=True)
class Ticket:
    user: str
    session: str
    node: str
    model: str
    version: str
    fence: int
    exp: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(ticket: Ticket, secret: str) -> str:
    body = _b64(json.dumps(asdict(ticket), separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


LEEWAY_S = 5.0   # clocks that agree to within this (nodes keep the control plane's: agent.py)


def verify(token: str, secret: str, *, node: str, now: float) -> Ticket:
    """Return the ticket if it is genuine, unexpired and meant for `node`; else TicketError."""
    body, dot, mac = (token or "").partition(".")
    if not dot or not body or not mac:
        raise TicketError("malformed ticket: expected BODY.SIGNATURE; get a new one from the lobby")
    want = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
    try:
        given = _unb64(mac)
    except ValueError:
        raise TicketError("malformed ticket signature; get a new one from the lobby") from None
    if not hmac.compare_digest(want, given):
        raise TicketError("forged ticket: the signature does not match; get one from the lobby")
    try:
        ticket = Ticket(**json.loads(_unb64(body)))
    except (ValueError, TypeError):
        raise TicketError("malformed ticket payload; get a new one from the lobby") from None
    if ticket.exp + LEEWAY_S < now:
        raise TicketError(f"ticket expired {now - ticket.exp:.0f} s ago; "
                          "reconnect through the lobby")
    if ticket.node != node:
        raise TicketError(f"ticket is for node {ticket.node!r}, this is {node!r}; "
                          "reconnect through the lobby")
    return ticket


def node_key(secret: str, node_id: str) -> str:
    """The ticket key of one node, derived from the control plane's secret: a node holds
    only its own, so a compromised node can forge tickets for itself alone."""
    return hmac.new(secret.encode(), f"node-ticket-key:{node_id}".encode(),
                    hashlib.sha256).hexdigest()


def sign_control(body: bytes, key: str) -> str:
    """The signature of an order from the control plane to a node (kick, wake)."""
    return hmac.new(key.encode(), b"control:" + body, hashlib.sha256).hexdigest()


def verify_control(body: bytes, signature: str, key: str) -> bool:
    return hmac.compare_digest(sign_control(body, key), signature or "")
