"""Live state in Redis: the one module that spells keys and holds the Lua scripts.

Key schema (prefix `vc:`):

    vc:nodes                  SET   ids of every registered node
    vc:node:{id}              HASH  id provider region model version state progress url
                                    capacity started_at last_seen price_per_hour eta_ready
    vc:node:{id}:slots        ZSET  session id -> reservation expiry (unix s); a stream that
                                    is live on the node has score +inf. ZCARD = slots taken.
    vc:session:{sid}          HASH  user model version region node fence created_at
    vc:fence:{user}           STRING the user's last fencing token (INCR): a node refuses
                                    tickets older than the newest it has seen

Anything that must be atomic is one Lua script here. Time is always an argument.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from provisioner.placement import NodeView
from provisioner.states import NodeState

PREFIX = "vc:"
NODES = PREFIX + "nodes"


def node_key(node_id: str) -> str:
    return f"{PREFIX}node:{node_id}"


def slots_key(node_id: str) -> str:
    return f"{PREFIX}node:{node_id}:slots"


def session_key(session_id: str) -> str:
    return f"{PREFIX}session:{session_id}"


# Claim one slot on the first node, in the given order, that is ready, alive and has room.
# KEYS: node hash and slot zset per candidate, interleaved. ARGV: session, now, reservation
# expiry, heartbeat timeout. Returns the 1-based index of the node claimed, or 0.
_CLAIM = """
for i = 1, #KEYS, 2 do
  local node = redis.call('HMGET', KEYS[i], 'state', 'capacity', 'last_seen')
  if node[1] == 'ready' and tonumber(node[3] or 0) >= tonumber(ARGV[2]) - tonumber(ARGV[4]) then
    redis.call('ZREMRANGEBYSCORE', KEYS[i + 1], '-inf', '(' .. ARGV[2])
    if redis.call('ZCARD', KEYS[i + 1]) < tonumber(node[2]) then
      redis.call('ZADD', KEYS[i + 1], ARGV[3], ARGV[1])
      return (i + 1) / 2
    end
  end
end
return 0
"""


@dataclass(frozen=True)
class NodeRecord:
    """A node as the control plane sees it in Redis."""

    id: str
    provider: str
    region: str
    model: str
    version: str
    state: NodeState
    progress: float
    url: str
    capacity: int
    sessions: int
    started_at: float
    last_seen: float
    price_per_hour: str
    eta_ready: float | None

    def view(self) -> NodeView:
        return NodeView(self.id, self.region, self.model, self.version, self.state,
                        self.sessions, self.capacity)

    def alive(self, now: float, timeout_s: float) -> bool:
        return self.last_seen >= now - timeout_s


class State:
    """Typed access to the live state. Construct with a redis client (decode_responses=True)."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self._claim = r.register_script(_CLAIM)

    # --- nodes ----------------------------------------------------------------------
    def heartbeat(self, fields: Mapping[str, Any], now: float) -> None:
        """Register or refresh a node: write its fields and last_seen in one step."""
        node_id = str(fields["id"])
        mapping = {k: ("" if v is None else str(v)) for k, v in fields.items()}
        mapping["last_seen"] = repr(now)
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(NODES, node_id)
        pipe.hset(node_key(node_id), mapping=mapping)
        pipe.execute()

    def nodes(self) -> list[NodeRecord]:
        ids = sorted(self.r.smembers(NODES))
        pipe = self.r.pipeline(transaction=False)
        for node_id in ids:
            pipe.hgetall(node_key(node_id))
            pipe.zcard(slots_key(node_id))
        raw = pipe.execute()
        out = []
        for h, taken in zip(raw[::2], raw[1::2], strict=True):
            if h and "state" in h:
                out.append(_record(h, int(taken)))
        return out

    def node(self, node_id: str) -> NodeRecord | None:
        h = self.r.hgetall(node_key(node_id))
        return _record(h, int(self.r.zcard(slots_key(node_id)))) if h else None

    def forget_node(self, node_id: str) -> None:
        """Remove a node and its slots (it stopped or died)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(NODES, node_id)
        pipe.delete(node_key(node_id), slots_key(node_id))
        pipe.execute()

    # --- slots ----------------------------------------------------------------------
    def claim_slot(self, candidates: Iterable[str], session_id: str, now: float,
                   hold_s: float, heartbeat_timeout_s: float) -> str | None:
        """Atomically reserve a slot on the first candidate with room; returns its id."""
        ids = list(candidates)
        if not ids:
            return None
        keys = [k for node_id in ids for k in (node_key(node_id), slots_key(node_id))]
        index = int(self._claim(keys=keys, args=[session_id, now, now + hold_s,
                                                 heartbeat_timeout_s]))
        return ids[index - 1] if index else None

    def mark_live(self, node_id: str, session_id: str) -> None:
        """The stream connected: its slot no longer expires."""
        self.r.zadd(slots_key(node_id), {session_id: "+inf"})

    def release_slot(self, node_id: str, session_id: str) -> None:
        self.r.zrem(slots_key(node_id), session_id)

    def live_sessions(self, node_id: str) -> list[str]:
        return list(self.r.zrangebyscore(slots_key(node_id), "+inf", "+inf"))

    # --- sessions -------------------------------------------------------------------
    def save_session(self, session_id: str, fields: Mapping[str, Any], ttl_s: int) -> None:
        self.r.hset(session_key(session_id), mapping={k: str(v) for k, v in fields.items()})
        self.r.expire(session_key(session_id), ttl_s)

    def next_fence(self, user: str) -> int:
        return int(self.r.incr(fence_key(user)))

    def session(self, session_id: str) -> dict[str, str]:
        return dict(self.r.hgetall(session_key(session_id)))


def _record(h: Mapping[str, str], sessions: int) -> NodeRecord:
    eta = h.get("eta_ready") or ""
    return NodeRecord(
        id=h["id"], provider=h.get("provider", ""), region=h.get("region", ""),
        model=h.get("model", ""), version=h.get("version", ""), state=NodeState(h["state"]),
        progress=float(h.get("progress") or 0.0), url=h.get("url", ""),
        capacity=int(h.get("capacity") or 0), sessions=sessions,
        started_at=float(h.get("started_at") or 0.0), last_seen=float(h.get("last_seen") or 0.0),
        price_per_hour=h.get("price_per_hour", "0"), eta_ready=float(eta) if eta else None)


def connect(url: str) -> redis.Redis:
    """A client for the live state; blocking reads get no socket timeout (see PITFALLS)."""
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=None,
                                health_check_interval=30)


def wait_for_redis(r: redis.Redis, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def fence_key(user: str) -> str:
    return f"{PREFIX}fence:{user}"
