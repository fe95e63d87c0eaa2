"""The lobby's front door: who a client is, and the limits on its open lobby sockets and on
a user's and a client's lobby attempts (docs/architecture.md, "Limits at the front door").

Attempt limits are token buckets in Redis shared by every webapp process; the open-socket
cap protects this process's threads, so this process counts it. A refused client hears why
once over the lobby protocol; until its retry time is up, this process answers its lobby
requests before the WebSocket handshake (HTTP 429, no Redis).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import random
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from flask import Request, Response, jsonify

from common.config import Config
from provisioner.state import Limit, State, Throttled
from webapp.requests import Refused

log = logging.getLogger("webapp.frontdoor")

# A client at its socket cap is told to retry after this long: lobbies close as soon as
# their users are placed, within seconds when nodes have room.
SOCKET_RETRY_S = 5.0
IPV6_PREFIX = 64
MAX_QUERY_BYTES = 2048   # a lobby's query is a hundred bytes or so; a longer one is not parsed
HOLD_MAX_S = 2.0         # the most a 429 waits under werkzeug before it is sent
HOLD_MIN_S = 1.0         # and the least, even when the client may retry sooner
MAX_REMEMBERED = 10_000  # refused clients remembered in this process; past it, expired go
RETRY_SPREAD = 0.25      # a refused client waits up to this share longer (see _remember)

Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


class RateLimited(Refused):
    """A lobby attempt over a limit (code `rate_limited`); `retry_after_s` says when one is
    allowed again."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__("rate_limited", message)
        self.retry_after_s = round(retry_after_s, 1)


@dataclass(frozen=True)
class Client:
    """Who opened a lobby socket: `address` as connected (or as a trusted proxy says), `key`
    what its limits count (the address; for IPv6 its /64)."""

    address: str
    key: str
    exempt: bool = False


def client_of(environ: Mapping[str, Any], trusted_proxies: int) -> Client:
    """The client of a request (a WSGI environ). An X-Forwarded-For shorter than the proxy
    count came past the proxies: the peer address counts then, as for a bad entry."""
    peer = str(environ.get("REMOTE_ADDR") or "")
    address = peer
    if trusted_proxies > 0:
        hops = [h.strip() for h in str(environ.get("HTTP_X_FORWARDED_FOR") or "").split(",")]
        if len(hops) >= trusted_proxies and hops[-trusted_proxies]:
            address = hops[-trusted_proxies]
    ip = _ip(address)
    if ip is None:
        address, ip = peer, _ip(peer)
    if ip is None:   # a unix socket, or a server that does not say
        return Client(address or "unknown", "unknown")
    if isinstance(ip, ipaddress.IPv6Address):
        net = ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False)
        return Client(str(ip), str(net))
    return Client(str(ip), str(ip))


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class FrontDoor:
    """The limits of one webapp process: `client(environ)`, then `socket(client)` around the
    lobby and `attempt(user, client, now)` once the request names its user."""

    def __init__(self, cfg: Config, state: State) -> None:
        self.cfg, self.state = cfg, state
        self._exempt: Networks = tuple(ipaddress.ip_network(n, strict=False)
                                       for n in cfg.lobby_limit_exempt)
        self._open: dict[str, int] = {}   # client key -> lobby sockets open in this process
        self._lock = threading.Lock()
        # client key -> its last refusal, and until when (monotonic) it is refused here
        self._refused: dict[str, tuple[Throttled, float]] = {}
        self._told: set[str] = set()   # of those, told why over the lobby protocol already

    def client(self, environ: Mapping[str, Any]) -> Client:
        got = client_of(environ, self.cfg.trusted_proxies)
        ip = _ip(got.address)
        exempt = ip is not None and any(ip.version == n.version and ip in n
                                        for n in self._exempt)
        return Client(got.address, got.key, exempt)

    @contextmanager
    def socket(self, client: Client) -> Iterator[None]:
        """Hold one of the client's lobby sockets while the block runs; RateLimited at once
        when the client holds `lobby_sockets_per_client` already."""
        cap = self.cfg.lobby_sockets_per_client
        if not cap or client.exempt:
            yield
            return
        with self._lock:
            held = self._open.get(client.key, 0)
            if held >= cap:
                raise RateLimited(_at_cap(client.key, held), SOCKET_RETRY_S)
            self._open[client.key] = held + 1
        try:
            yield
        finally:
            with self._lock:
                self._open[client.key] -= 1
                if not self._open[client.key]:
                    del self._open[client.key]

    def limits(self, user: str, client: Client) -> list[Limit]:
        """The limits an attempt of `user` from `client` counts against: the client's
        first, spent by every attempt (a client flooding as one user runs out too), then
        the user's, spent by those let through."""
        if client.exempt:
            return []
        window, burst = self.cfg.lobby_attempts_window_s, self.cfg.lobby_attempts_burst
        limits = [Limit("client", client.key, self.cfg.lobby_attempts_per_client, window,
                        burst, always=True),
                  Limit("user", user, self.cfg.lobby_attempts_per_user, window, burst)]
        return [x for x in limits if x.per_window > 0]

    def attempt(self, user: str, client: Client, now: float) -> None:
        """Count one lobby attempt; RateLimited (nothing counted) when a limit is spent."""
        try:
            got = self.state.take_attempt(self.limits(user, client), now)
        except redis.RedisError as e:
            raise Refused("unavailable", "the control plane cannot reach its state store "
                          f"right now ({e}); try again in a few seconds") from None
        if got is not None:
            got = self._remember(client, got)
            if not got.let_through:
                raise RateLimited(refusal(got), got.retry_after_s)

    def bad_request(self, client: Client, now: float) -> None:
        """Count a bad request against the client's attempts (its refusal says why: this
        only makes a stream of them cheap to refuse)."""
        limits = self.limits("", client)[:1] if self.cfg.lobby_attempts_per_client else []
        try:
            got = self.state.take_attempt(limits, now)
        except redis.RedisError as e:
            log.warning("a bad lobby request from %s not counted: %s", client.key, e)
            return
        if got is not None:
            self._remember(client, got)

    def _remember(self, client: Client, got: Throttled) -> Throttled:
        """A client out of attempts is refused here, cheaply, until it has one again: a
        little longer, at random (up to RETRY_SPREAD more), so clients refused in one
        instant do not all come back in one. Returns `got` with the retry time it keeps."""
        if got.limit.kind != "client":
            return got
        got = Throttled(got.limit, got.retry_after_s * random.uniform(1.0, 1 + RETRY_SPREAD),
                        got.let_through)
        with self._lock:
            now = time.monotonic()
            if len(self._refused) >= MAX_REMEMBERED:
                for key in [k for k, (_, until) in self._refused.items() if until <= now]:
                    del self._refused[key]
                    self._told.discard(key)
            self._refused[client.key] = got, now + got.retry_after_s
            if got.let_through:   # its next attempt is refused over the lobby protocol
                self._told.discard(client.key)
            else:
                self._told.add(client.key)
        return got

    def early(self, request: Request) -> Response | None:
        """The answer to a lobby request that is refused before its WebSocket handshake, or
        None to serve it."""
        size = len(request.environ.get("QUERY_STRING") or "")
        if size > MAX_QUERY_BYTES:   # no browser sends one: held like a 429 (below)
            _hold(HOLD_MAX_S)
            resp = json_error(414, "bad_request", f"the query is {size} bytes; a lobby query "
                              f"takes at most {MAX_QUERY_BYTES} (user, model, region or lat "
                              "and lon, resume, takeover)")
            resp.headers["Connection"] = "close"
            return resp
        client = self.client(request.environ)
        if client.exempt:
            return None
        got, until = self._refused.get(client.key, (None, 0.0))
        wait = until - time.monotonic()
        cap = self.cfg.lobby_sockets_per_client
        if wait > 0 and client.key not in self._told:
            with self._lock:   # one of its requests goes on, to hear why over the lobby
                tell = client.key not in self._told
                self._told.add(client.key)
            if tell:
                return None
        if wait > 0 and got is not None:
            message = refusal(Throttled(got.limit, wait))
        elif cap and self._open.get(client.key, 0) >= cap:
            wait, message = SOCKET_RETRY_S, _at_cap(client.key, cap)
        else:
            return None
        wait = max(0.1, wait - _hold(min(max(wait, HOLD_MIN_S), HOLD_MAX_S)))
        resp = json_error(429, "rate_limited", message, retry_after_s=round(wait, 1))
        resp.headers.update({"Connection": "close", "Retry-After": str(math.ceil(wait))})
        return resp


def _hold(wait_s: float) -> float:
    """A refusal waits before it is sent (a greenlet's or thread's sleep), so a client that
    reconnects at once cannot loop faster: between half and all of `wait_s`, at random, so
    clients refused in one instant do not all come back in one. Returns the time waited."""
    held = wait_s * random.uniform(0.5, 1.0)
    time.sleep(held)
    return held


def _at_cap(key: str, held: int) -> str:
    return (f"{key} has {held} lobby sockets open already, the most one client may; close one "
            f"(a lobby closes once its user is placed) and try again in {SOCKET_RETRY_S:.0f} s")


def json_error(status: int, code: str, message: str, **fields: object) -> Response:
    """The JSON refusal the webapp's endpoints answer with."""
    resp = jsonify({"error": code, "message": message, **fields})
    resp.status_code = status
    return resp


def refusal(got: Throttled) -> str:
    """What a throttled client is told: the limit, whose it is, and when to retry."""
    limit = got.limit
    whose = f"user {limit.who}" if limit.kind == "user" else f"client {limit.who}"
    burst = f", {limit.capacity} at once" if limit.capacity < limit.per_window else ""
    return (f"too many lobby attempts by {whose}: at most {limit.per_window} per "
            f"{limit.window_s:g} s{burst}; try again in {max(0.1, got.retry_after_s):.1f} s")
