"""The lobby's front door: who a client is, how many lobby sockets it holds open, and how
many lobby attempts a user and a client may make (docs/architecture.md, "Limits at the
front door").

A client is the peer address of the connection; behind `trusted_proxies` proxies, each of
which appends the address it was connected from to X-Forwarded-For, it is the entry that
many from the right (what the client itself wrote there is never believed). IPv6 clients
count per /64, what one host or home gets. Attempt limits are token buckets in Redis, shared
by every webapp process: one script takes a token from the user's and the client's bucket,
or from neither. The cap on open lobby sockets protects this process's threads, so this
process counts it. Addresses in `lobby_limit_exempt` are never limited.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from common.config import Config
from provisioner.state import Limit, State, Throttled
from webapp.lobby import Refused

# A client at its socket cap is told to retry after this long: lobbies close as soon as
# their users are placed, within seconds when nodes have room.
SOCKET_RETRY_S = 5.0
IPV6_PREFIX = 64


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
        self._exempt = tuple(ipaddress.ip_network(n, strict=False) for n in cfg.lobby_limit_exempt)
        self._open: dict[str, int] = {}   # client key -> lobby sockets open in this process
        self._lock = threading.Lock()

    def client(self, environ: Mapping[str, Any]) -> Client:
        got = client_of(environ, self.cfg.trusted_proxies)
        ip = _ip(got.address)
        exempt = ip is not None and any(ip.version == n.version and ip in n for n in self._exempt)
        return Client(got.address, got.key, exempt)

    def open_sockets(self, client: Client) -> int:
        return self._open.get(client.key, 0)

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
                raise RateLimited(
                    f"{client.key} has {held} lobby sockets open already, the most one client "
                    f"may; close one (a lobby closes once its user is placed) and try again in "
                    f"{SOCKET_RETRY_S:.0f} s", SOCKET_RETRY_S)
            self._open[client.key] = held + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._open[client.key] - 1
                if left:
                    self._open[client.key] = left
                else:
                    del self._open[client.key]

    def limits(self, user: str, client: Client) -> list[Limit]:
        """The limits an attempt of `user` from `client` counts against."""
        if client.exempt:
            return []
        window = self.cfg.lobby_attempts_window_s
        limits = [Limit("user", user, self.cfg.lobby_attempts_per_user, window),
                  Limit("client", client.key, self.cfg.lobby_attempts_per_client, window)]
        return [x for x in limits if x.capacity > 0]

    def attempt(self, user: str, client: Client, now: float) -> None:
        """Count one lobby attempt; RateLimited (nothing counted) when a limit is spent."""
        try:
            got = self.state.take_attempt(self.limits(user, client), now)
        except redis.RedisError as e:
            raise Refused("unavailable", "the control plane cannot reach its state store "
                          f"right now ({e}); try again in a few seconds") from None
        if got is not None:
            raise RateLimited(refusal(got), got.retry_after_s)


def refusal(got: Throttled) -> str:
    """What a throttled client is told: the limit, whose it is, and when to retry."""
    limit = got.limit
    whose = f"user {limit.who}" if limit.kind == "user" else f"client {limit.who}"
    return (f"too many lobby attempts by {whose}: at most {limit.capacity} per "
            f"{limit.window_s:g} s; try again in {max(0.1, got.retry_after_s):.1f} s")
