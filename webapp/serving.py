"""The local run's server (`voicectl run`): werkzeug's, with a gate on each client's new
connections.

Werkzeug serves each connection in a thread of its own, so a client that reconnects as fast
as it is answered (an HTTP flood, or junk the app never sees, such as a request line past
64 KB that werkzeug refuses itself) keeps the process busy whatever the app refuses, and
every other request waits for the GIL. The gate counts each client address's new
connections in a token bucket (`client_connections_burst`, refilled at
`client_connections_per_s`); a connection over it gets no thread and no answer: it is
parked until the client has a token again (at most PARK_S), then reset, so a client that
reconnects at once stalls instead of looping. Addresses in `lobby_limit_exempt` pass; behind
trusted proxies the peer is a proxy, so nothing is gated here. Deployments (gunicorn) put
this limit in the proxy in front of them (docs/architecture.md, "Limits at the front door").
"""

from __future__ import annotations

import heapq
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from common.config import Config
from webapp.frontdoor import Networks, exempt_networks, is_exempt

PARK_S = 5.0               # the longest a connection over the limit waits before its reset
MAX_PARKED = 1000          # sockets parked at once (file descriptors); past it, reset at once
MAX_PARKED_PER_CLIENT = 64
MAX_CLIENTS = 10_000       # buckets kept; past it, full ones are forgotten


@dataclass
class _Bucket:
    tokens: float
    at: float
    parked: int = 0


@dataclass
class ConnectionGate:
    """Per client address: may a new connection have a thread now? (No I/O; `clock` is
    an argument so tests drive it.)"""

    burst: int
    per_s: float
    exempt: Networks = ()
    clock: Callable[[], float] = monotonic
    buckets: dict[str, _Bucket] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Config) -> ConnectionGate | None:
        """The gate the config asks for; None when it gates nothing (no limit, or behind
        trusted proxies, where every peer is a proxy)."""
        if cfg.trusted_proxies or not cfg.client_connections_burst:
            return None
        return cls(cfg.client_connections_burst, cfg.client_connections_per_s,
                   exempt_networks(cfg))

    def admit(self, address: str) -> float:
        """0 when `address` may open a connection now (it spends a token), else the seconds
        until it may."""
        if is_exempt(address, self.exempt):
            return 0.0
        now = self.clock()
        b = self.buckets.get(address)
        if b is None:
            if len(self.buckets) >= MAX_CLIENTS:
                self._forget_full(now)
            b = self.buckets[address] = _Bucket(float(self.burst), now)
        b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.per_s)
        b.at = now
        if b.tokens >= 1:
            b.tokens -= 1
            return 0.0
        return (1 - b.tokens) / self.per_s if self.per_s > 0 else PARK_S

    def _forget_full(self, now: float) -> None:
        for key in [k for k, b in self.buckets.items()
                    if not b.parked and b.tokens + (now - b.at) * self.per_s >= self.burst]:
            del self.buckets[key]


class QuietHandler(WSGIRequestHandler):
    """werkzeug's handler, without its request log line when nobody reads it: it unquotes
    the whole request path first (a millisecond for a 60 KB query, at every request)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if logging.getLogger("werkzeug").isEnabledFor(logging.INFO):
            super().log_request(code, size)


class GatedServer(ThreadedWSGIServer):
    """werkzeug's threaded server; new connections pass `gate` first (see the module)."""

    def __init__(self, host: str, port: int, app: Any, gate: ConnectionGate | None) -> None:
        super().__init__(host, port, app, handler=QuietHandler)
        self.gate = gate
        self._parked: list[tuple[float, int, socket.socket, str]] = []   # a heap by release

    def process_request(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0]) if isinstance(client_address, tuple) else ""
        wait = self.gate.admit(address) if self.gate is not None else 0.0
        if not wait:
            super().process_request(request, client_address)
            return
        self._release(monotonic())
        bucket = self.gate.buckets.get(address) if self.gate is not None else None
        if bucket is None or bucket.parked >= MAX_PARKED_PER_CLIENT \
                or len(self._parked) >= MAX_PARKED:
            _reset(request)
            return
        bucket.parked += 1
        heapq.heappush(self._parked, (monotonic() + min(wait, PARK_S), request.fileno(),
                                      request, address))

    def service_actions(self) -> None:
        """Called by serve_forever about twice a second: reset what has waited its time."""
        super().service_actions()
        self._release(monotonic())

    def _release(self, now: float) -> None:
        while self._parked and self._parked[0][0] <= now:
            _, _, sock, address = heapq.heappop(self._parked)
            bucket = self.gate.buckets.get(address) if self.gate is not None else None
            if bucket is not None:
                bucket.parked -= 1
            _reset(sock)

    def server_close(self) -> None:
        self._release(float("inf"))
        super().server_close()


def _reset(sock: socket.socket) -> None:
    """Close with a reset: no FIN handshake, no TIME_WAIT left on our side."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def make_server(host: str, port: int, app: Any, cfg: Config) -> GatedServer:
    return GatedServer(host, port, app, ConnectionGate.from_config(cfg))
