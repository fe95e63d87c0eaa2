"""Live state in Redis: the one module that spells keys and holds the Lua scripts.

Key schema (prefix `vc:`; times are unix seconds passed in by the caller):

    vc:nodes                  SET    ids of every node the control plane knows
    vc:node:{id}              HASH   id provider region model version state progress url
                                     capacity started_at requested_at deadline last_seen
                                     price_per_hour eta_ready semitones home cred join_token.
                                     `home`: the region whose queue it serves (it may run in
                                     another region nearby, on a cheaper provider). `cred`: the
                                     hash of its credential. `state` is written by the control
                                     plane until the node heartbeats, then reported by the node.
                                     Orders the node never writes: drain_deadline (old version:
                                     no new sessions), retired (being stopped), retarget.
    vc:node:{id}:slots        ZSET   session id -> reservation expiry; +inf once the stream is
                                     live on the node. ZCARD = slots taken (never > capacity).
    vc:session:{sid}          HASH   user model version region node fence created_at
    vc:assigned               HASH   session id -> node id, written by the assign script for a
                                     waiting lobby to pick up
    vc:queue:{model}|{version}|{region}
                              ZSET   waiting session id -> enqueue time (resumes: 0, first)
    vc:queues                 SET    "{model}|{version}|{region}" of every queue ever used
    vc:arrivals:{model}|{version}|{region}
                              HASH   rate (EWMA arrivals/s) t (last update)
    vc:lock:{user}            HASH   session fence model region node since; expires unless a
                                     lobby or the node streaming it refreshes it
    vc:fence:{user}           STRING the user's last fencing token (INCR)
    vc:models                 HASH   model name -> JSON {"live": {version, semitones},
                                     "draining": [{version, semitones, deadline}]}
    vc:vm:{id}                HASH   local cloud driver: pid, name, region, image, created_at
    vc:vms                    SET    ids of local driver VMs
    vc:scale-kick             STRING set NX for a moment so bursts trigger one scale task
    vc:flight:{name}          STRING a token while one worker runs `name` (scale+reap):
                                     two overlapping runs would boot twice
    vc:region-down            HASH   region -> unix time until which placement avoids it (its
                                     nodes all died or failed to boot)
    vc:usage:{minute_s}       HASH   "{user}|{session}|{node}|{model}|{region}" -> cumulative
                                     seconds streamed in that UTC minute (only ever grows)
    vc:usage-minutes          ZSET   minute_s -> minute_s of every usage hash not yet expired
    vc:join:{sha256(token)}   STRING one-time join token -> JSON {"node": id} (a node we
                                     booted) or {"byo": region, "model": name}; expires
    vc:cred:{sha256(cred)}    STRING a joined node's credential -> node id (revoked: deleted;
                                     the node hash keeps the hash in `cred`)
    vc:constrained            HASH   region -> JSON {"until", "reason"}: the provider refused
                                     to create there (capacity, quota); boots go elsewhere

Anything that must be atomic is one Lua script below; every key it touches is in KEYS.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from provisioner.placement import NodeView
from provisioner.states import NodeState

PREFIX = "vc:"
NODES = PREFIX + "nodes"
ASSIGNED = PREFIX + "assigned"
QUEUES = PREFIX + "queues"
MODELS = PREFIX + "models"
VMS = PREFIX + "vms"
REGION_DOWN = PREFIX + "region-down"
SCALE_KICK = PREFIX + "scale-kick"
USAGE_MINUTES = PREFIX + "usage-minutes"
USAGE_KEEP_S = 3600     # usage counters stay this long, so late reports can be re-settled


def node_key(node_id: str) -> str:
    return f"{PREFIX}node:{node_id}"


def slots_key(node_id: str) -> str:
    return f"{PREFIX}node:{node_id}:slots"


def session_key(session_id: str) -> str:
    return f"{PREFIX}session:{session_id}"


def pool_id(model: str, version: str, region: str) -> str:
    return f"{model}|{version}|{region}"


def queue_key(pool: str) -> str:
    return f"{PREFIX}queue:{pool}"


def arrivals_key(pool: str) -> str:
    return f"{PREFIX}arrivals:{pool}"


def lock_key(user: str) -> str:
    return f"{PREFIX}lock:{user}"


def fence_key(user: str) -> str:
    return f"{PREFIX}fence:{user}"


def usage_key(minute_s: int) -> str:
    return f"{PREFIX}usage:{minute_s}"


def vm_key(vm_id: str) -> str:
    return f"{PREFIX}vm:{vm_id}"


def join_key(token: str) -> str:
    return f"{PREFIX}join:{digest(token)}"


def cred_key(credential: str) -> str:
    return f"{PREFIX}cred:{digest(credential)}"


def digest(secret: str) -> str:
    """Secrets are stored hashed: a read of Redis does not hand out working tokens."""
    return hashlib.sha256(secret.encode()).hexdigest()


CONSTRAINED = PREFIX + "constrained"


# A node can take a session when it is ready, alive, not draining or retired, and has room.
# Expired reservations (tickets never used) are dropped first.
_HAS_ROOM = """
local function has_room(node_key, slots_key, now, timeout)
  local n = redis.call('HMGET', node_key, 'state', 'capacity', 'last_seen', 'drain_deadline',
                       'retired')
  if n[1] ~= 'ready' or (n[4] and n[4] ~= '') or n[5] then return false end
  if tonumber(n[3] or 0) < now - timeout then return false end
  redis.call('ZREMRANGEBYSCORE', slots_key, '-inf', '(' .. now)
  return redis.call('ZCARD', slots_key) < tonumber(n[2])
end
"""

# Hand waiting sessions, oldest first, to candidates with room (re-checked here, so a stale
# order is harmless). Node hash + slot zset per candidate from KEYS[first]; their ids from
# ARGV[first_id]. Returns the number assigned.
_ASSIGN_FN = _HAS_ROOM + """
local function assign(queue, assigned, first, first_id, now, expiry, timeout)
  local n = 0
  while true do
    local head = redis.call('ZRANGE', queue, 0, 0)[1]
    if not head then return n end
    local placed = false
    for i = first, #KEYS, 2 do
      if has_room(KEYS[i], KEYS[i + 1], now, timeout) then
        redis.call('ZADD', KEYS[i + 1], expiry, head)
        redis.call('ZREM', queue, head)
        redis.call('HSET', assigned, head, ARGV[first_id + (i - first) / 2])
        n = n + 1
        placed = true
        break
      end
    end
    if not placed then return n end
  end
end
"""

# KEYS[1] queue, KEYS[2] vc:assigned, then candidates. ARGV: now, expiry, timeout, ids...
_ASSIGN = _ASSIGN_FN + """
return assign(KEYS[1], KEYS[2], 3, 4, tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]))
"""

# Take the user's single-stream lock unless another session holds it and this is no
# take-over. Returns {1, fence, previous session, its node} or {0, holder session, model,
# region, since}.
_LOCK_FN = """
local function take_lock(lock, fence_key, session, model, region, now, ttl_s, takeover)
  local cur = redis.call('HGET', lock, 'session')
  if cur and cur ~= session and takeover ~= '1' then
    local h = redis.call('HMGET', lock, 'model', 'region', 'since')
    return {0, cur, h[1] or '', h[2] or '', h[3] or ''}
  end
  local since = now
  local prev_node = redis.call('HGET', lock, 'node') or ''
  if cur == session then since = redis.call('HGET', lock, 'since') or now end
  local fence = redis.call('INCR', fence_key)
  redis.call('DEL', lock)
  redis.call('HSET', lock, 'session', session, 'fence', fence, 'model', model,
             'region', region, 'since', since)
  redis.call('PEXPIRE', lock, math.floor(tonumber(ttl_s) * 1000))
  return {1, tostring(fence), cur or '', prev_node}
end
"""

# KEYS: lock, fence. ARGV: session, model, region, now, ttl_s, takeover (1/0).
_TAKE_LOCK = _LOCK_FN + """
return take_lock(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
"""

# Update a pool's arrival-rate EWMA (time constant tau_s).
_ARRIVE_FN = """
local function arrive(key, now, tau)
  local h = redis.call('HMGET', key, 'rate', 't')
  local rate, t = tonumber(h[1] or 0), tonumber(h[2] or now)
  rate = rate * math.exp(-math.max(0, now - t) / tau) + 1 / tau
  redis.call('HSET', key, 'rate', rate, 't', now)
  return rate
end
"""

# KEYS: arrivals hash. ARGV: now, tau_s.
_ARRIVE = _ARRIVE_FN + """
return tostring(arrive(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])))
"""

# A lobby request in one step: take the lock, count the arrival (not for a resume), join
# the queue (a resume first), assign, and pick up this session's node if it got one.
# KEYS: lock, fence, arrivals, queue, vc:queues, vc:assigned, then candidates.
# ARGV: session, model, region, now, lock ttl, takeover, tau, resume (1/0), pool,
# reservation expiry, heartbeat timeout, candidate ids...
# Returns the lock refusal, or {1, fence, previous session, its node, node or '', position}.
_ADMIT = _ASSIGN_FN + _LOCK_FN + _ARRIVE_FN + """
local now = tonumber(ARGV[4])
local lock = take_lock(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
if lock[1] == 0 then return lock end
if ARGV[8] ~= '1' then arrive(KEYS[3], now, tonumber(ARGV[7])) end
redis.call('ZADD', KEYS[4], 'NX', ARGV[8] == '1' and 0 or now, ARGV[1])
redis.call('SADD', KEYS[5], ARGV[9])
assign(KEYS[4], KEYS[6], 7, 12, now, ARGV[10], tonumber(ARGV[11]))
local node = redis.call('HGET', KEYS[6], ARGV[1])
if node then
  redis.call('HDEL', KEYS[6], ARGV[1])
  return {1, lock[2], lock[3], lock[4], node, 0}
end
return {1, lock[2], lock[3], lock[4], '', redis.call('ZRANK', KEYS[4], ARGV[1]) + 1}
"""

# Keep the locks of live streams alive; report streams whose lock another session, or a
# newer connection of the same session (a resume: new fence), took.
# KEYS: lock per stream. ARGV: ttl_s, node id, then session and fence per stream.
_REFRESH_LOCKS = """
local lost = {}
for i = 1, #KEYS do
  local sid, fence = ARGV[2 * i + 1], ARGV[2 * i + 2]
  local cur = redis.call('HMGET', KEYS[i], 'session', 'fence')
  if cur[1] == sid and cur[2] == fence then
    redis.call('HSET', KEYS[i], 'node', ARGV[2])
    redis.call('PEXPIRE', KEYS[i], math.floor(tonumber(ARGV[1]) * 1000))
  elseif cur[1] then
    table.insert(lost, sid)
  else
    -- expired while Redis was away: nobody else holds it, so this stream keeps it
    redis.call('HSET', KEYS[i], 'session', sid, 'fence', fence, 'node', ARGV[2])
    redis.call('PEXPIRE', KEYS[i], math.floor(tonumber(ARGV[1]) * 1000))
  end
end
return lost
"""

# Make the live (+inf) slots exactly the node's own streams: a failed mark or release is
# repaired at the next heartbeat. KEYS: slot zset. ARGV: the node's live session ids.
_SYNC_LIVE = """
local mine = {}
for _, sid in ipairs(ARGV) do
  mine[sid] = true
  redis.call('ZADD', KEYS[1], '+inf', sid)
end
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '+inf', '+inf')) do
  if not mine[sid] then redis.call('ZREM', KEYS[1], sid) end
end
return #ARGV
"""

# A lobby that leaves: out of the queue, and back with any node the assign script had
# already given it (its reservation, never a live stream's slot). KEYS: queue, vc:assigned.
# ARGV: session. Returns the node id it had been given, or ''.
_ABANDON = """
redis.call('ZREM', KEYS[1], ARGV[1])
local node = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return node or ''
"""

# Release a single-flight token only if it is still ours. KEYS: flight key. ARGV: token.
_LAND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Release the lock only if this session still holds it. KEYS: lock. ARGV: session.
_RELEASE_LOCK = """
if redis.call('HGET', KEYS[1], 'session') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Report cumulative usage counters; a counter only grows, so a stale or repeated report
# never lowers or double counts. KEYS: vc:usage-minutes, then the usage hash per counter.
# ARGV: keep_s, then field, seconds, minute_s per counter.
_REPORT_USAGE = """
for i = 2, #KEYS do
  local field, secs, minute = ARGV[3 * i - 4], tonumber(ARGV[3 * i - 3]), ARGV[3 * i - 2]
  local cur = tonumber(redis.call('HGET', KEYS[i], field) or 0)
  if secs > cur then redis.call('HSET', KEYS[i], field, ARGV[3 * i - 3]) end
  redis.call('EXPIRE', KEYS[i], ARGV[1])
  redis.call('ZADD', KEYS[1], minute, minute)
end
return #KEYS - 1
"""

# Mark an empty node retired so nothing new lands on it; refuses a node with sessions.
# KEYS: node hash, slot zset. ARGV: now. Returns 1 if retired (0 if it already was).
_RETIRE = """
if redis.call('HEXISTS', KEYS[1], 'retired') == 1 then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1])
if redis.call('ZCARD', KEYS[2]) > 0 then return 0 end
redis.call('HSET', KEYS[1], 'retired', ARGV[1])
return 1
"""

# Deploy a model version: it becomes live, the old live version drains until the deadline.
# KEYS: vc:models. ARGV: model, version, semitones, drain deadline.
_DEPLOY = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local entry = raw and cjson.decode(raw) or {live = false, draining = {}}
local draining = {}
for _, d in ipairs(entry.draining or {}) do
  if d.version ~= ARGV[2] then table.insert(draining, d) end
end
if entry.live and entry.live.version ~= ARGV[2] then
  table.insert(draining, {version = entry.live.version, semitones = entry.live.semitones,
                          deadline = tonumber(ARGV[4])})
end
entry.live = {version = ARGV[2], semitones = tonumber(ARGV[3])}
if #draining == 0 then entry.draining = cjson.decode('[]') else entry.draining = draining end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
return cjson.encode(entry)
"""


# A node's heartbeat in one step: its health, its live slots, its users' locks, its usage,
# and the locks of streams that closed since (released if still theirs, so the user may
# start again at once). Refused (returns {0}) for a node the control plane forgot. While a
# retarget is pending and the node does not serve the new model yet, its old state is not
# written (the record already says LOADING for the new model).
# KEYS: node hash, slot zset, vc:usage-minutes, then one lock per live stream, one usage
# hash per counter, one lock per closed stream.
# ARGV: now, state, progress, eta_ready, ready_at, lock ttl_s, node id, serving
# "model:version", usage keep_s, number of streams n, number of counters m, then session
# and fence per live stream, field, seconds, minute per counter, session per closed stream.
# Returns {1, drain_deadline, retarget, sessions whose lock another session took...}.
_BEAT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local n, m = tonumber(ARGV[10]), tonumber(ARGV[11])
local flags = redis.call('HMGET', KEYS[1], 'drain_deadline', 'retarget')
local pending = flags[2] and string.sub(flags[2], 1, #ARGV[8] + 1) ~= ARGV[8] .. ':'
if flags[2] and not pending then
  redis.call('HDEL', KEYS[1], 'retarget', 'retired', 'idle_since')
  flags[2] = false
end
if pending then
  redis.call('HSET', KEYS[1], 'last_seen', ARGV[1])
else
  redis.call('HSET', KEYS[1], 'state', ARGV[2], 'progress', ARGV[3], 'eta_ready', ARGV[4],
             'ready_at', ARGV[5], 'last_seen', ARGV[1])
end
local mine = {}
for i = 1, n do
  mine[ARGV[10 + 2 * i]] = true
  redis.call('ZADD', KEYS[2], '+inf', ARGV[10 + 2 * i])
end
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '+inf', '+inf')) do
  if not mine[sid] then redis.call('ZREM', KEYS[2], sid) end
end
local ttl = math.floor(tonumber(ARGV[6]) * 1000)
local out = {1, flags[1] or '', flags[2] or ''}
for i = 1, n do
  local lock, sid, fence = KEYS[3 + i], ARGV[10 + 2 * i], ARGV[11 + 2 * i]
  local cur = redis.call('HMGET', lock, 'session', 'fence')
  if cur[1] and (cur[1] ~= sid or cur[2] ~= fence) then
    table.insert(out, sid)
  else
    -- ours, or expired while the node could not report: nobody else holds it
    redis.call('HSET', lock, 'session', sid, 'fence', fence, 'node', ARGV[7])
    redis.call('PEXPIRE', lock, ttl)
  end
end
local base = 11 + 2 * n
for j = 1, m do
  local key = KEYS[3 + n + j]
  local field, secs, minute = ARGV[base + 3 * j - 2], ARGV[base + 3 * j - 1], ARGV[base + 3 * j]
  local cur = tonumber(redis.call('HGET', key, field) or 0)
  if tonumber(secs) > cur then redis.call('HSET', key, field, secs) end
  redis.call('EXPIRE', key, ARGV[9])
  redis.call('ZADD', KEYS[3], minute, minute)
end
base = base + 3 * m
for k = 1, #KEYS - 3 - n - m do
  local lock, sid = KEYS[3 + n + m + k], ARGV[base + k]
  if not mine[sid] and redis.call('HGET', lock, 'session') == sid then
    redis.call('DEL', lock)
  end
end
return out
"""


@dataclass(frozen=True)
class Beat:
    """What a node reports in one heartbeat (validated by the control plane first)."""

    state: str
    progress: float
    eta_ready: float | None
    ready_at: float | None
    serving: str                                     # "model:version" it has loaded
    streams: Sequence[tuple[str, str, int]] = ()     # (user, session, fence) per live stream
    usage: Sequence[tuple[int, str, float]] = ()     # (minute_s, field, cumulative seconds)
    closed: Sequence[tuple[str, str]] = ()           # (user, session) of streams that ended


@dataclass(frozen=True)
class Orders:
    """The control plane's answer to a heartbeat."""

    drain_deadline: float | None
    retarget: str | None                             # "model:version:semitones"
    lost: tuple[str, ...]                            # sessions another session took over


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
    live: int
    started_at: float
    requested_at: float
    deadline: float
    last_seen: float
    price_per_hour: str
    eta_ready: float | None
    drain_deadline: float | None
    retired: bool
    semitones: float
    ready_at: float | None
    idle_since: float | None
    home: str = ""           # the region whose queue it was booted for (policy's pool)

    def view(self) -> NodeView:
        return NodeView(self.id, self.region, self.model, self.version, self.state,
                        self.sessions, self.capacity, float(self.price_per_hour))

    def alive(self, now: float, timeout_s: float) -> bool:
        """Heartbeating recently, or still coming up within its provisioning deadline."""
        if self.state in (NodeState.REQUESTED, NodeState.BOOTING) and self.last_seen == 0:
            return now <= self.deadline
        return self.last_seen >= now - timeout_s


@dataclass(frozen=True)
class Lock:
    """Who holds a user's single-stream lock."""

    session: str
    model: str
    region: str
    since: float


@dataclass(frozen=True)
class Taken:
    """The lock is ours: its fencing token, and whom we took it from (take-over)."""

    fence: int
    previous_session: str | None
    previous_node: str | None


@dataclass(frozen=True)
class Admitted:
    """The lobby request holds the lock; it got a node, or waits at a queue position."""

    lock: Taken
    node: str | None
    position: int


@dataclass(frozen=True)
class LiveModel:
    name: str
    version: str
    semitones: float
    draining: tuple[dict[str, Any], ...]


class State:
    """Typed access to the live state. Construct with a redis client (decode_responses=True)."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self._assign = r.register_script(_ASSIGN)
        self._take_lock = r.register_script(_TAKE_LOCK)
        self._refresh_locks = r.register_script(_REFRESH_LOCKS)
        self._release_lock = r.register_script(_RELEASE_LOCK)
        self._arrive = r.register_script(_ARRIVE)
        self._retire = r.register_script(_RETIRE)
        self._deploy = r.register_script(_DEPLOY)
        self._report_usage = r.register_script(_REPORT_USAGE)
        self._admit = r.register_script(_ADMIT)
        self._sync_live = r.register_script(_SYNC_LIVE)
        self._abandon = r.register_script(_ABANDON)
        self._land = r.register_script(_LAND)
        self._beat = r.register_script(_BEAT)

    # --- nodes ----------------------------------------------------------------------
    def add_node(self, fields: Mapping[str, Any]) -> None:
        """The control plane asks for a node: record it before any VM exists."""
        node_id = str(fields["id"])
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(NODES, node_id)
        pipe.hset(node_key(node_id), mapping={k: str(v) for k, v in fields.items()})
        pipe.execute()

    def set_node(self, node_id: str, **fields: Any) -> None:
        self.r.hset(node_key(node_id), mapping={k: str(v) for k, v in fields.items()})

    def heartbeat(self, fields: Mapping[str, Any], now: float) -> None:
        """A node reports its state (read its control flags first with node_flags)."""
        node_id = str(fields["id"])
        mapping = {k: ("" if v is None else str(v)) for k, v in fields.items()}
        mapping["last_seen"] = repr(now)
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(NODES, node_id)
        pipe.hset(node_key(node_id), mapping=mapping)
        pipe.execute()

    def node_flags(self, node_id: str) -> dict[str, str]:
        """The control plane's orders for a node: drain_deadline, retarget."""
        flags = self.r.hmget(node_key(node_id), "drain_deadline", "retarget")
        return {"drain_deadline": flags[0] or "", "retarget": flags[1] or ""}

    def finish_retarget(self, node_id: str) -> None:
        """The node has switched model: it may take sessions again once loaded."""
        self.r.hdel(node_key(node_id), "retarget", "retired", "idle_since")

    def touch_idle(self, rec: NodeRecord, now: float) -> float | None:
        """When the node last became empty (tracked for scale-down grace), None if busy."""
        if rec.state is NodeState.READY and rec.sessions == 0:
            if rec.idle_since is None:
                self.r.hset(node_key(rec.id), "idle_since", repr(now))
                return now
            return rec.idle_since
        if rec.idle_since is not None:
            self.r.hdel(node_key(rec.id), "idle_since")
        return None

    def node_ids(self) -> list[str]:
        return sorted(self.r.smembers(NODES))

    def nodes(self) -> list[NodeRecord]:
        ids = sorted(self.r.smembers(NODES))
        pipe = self.r.pipeline(transaction=False)
        for node_id in ids:
            pipe.hgetall(node_key(node_id))
            pipe.zcard(slots_key(node_id))
            pipe.zcount(slots_key(node_id), "+inf", "+inf")
        raw = pipe.execute()
        return [_record(h, int(taken), int(live))
                for h, taken, live in zip(raw[::3], raw[1::3], raw[2::3], strict=True)
                if h and "state" in h]

    def node(self, node_id: str) -> NodeRecord | None:
        h = self.r.hgetall(node_key(node_id))
        if not h or "state" not in h:
            return None
        return _record(h, int(self.r.zcard(slots_key(node_id))),
                       int(self.r.zcount(slots_key(node_id), "+inf", "+inf")))

    def forget_node(self, node_id: str) -> None:
        """Remove a node and its slots (it stopped or died)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(NODES, node_id)
        pipe.delete(node_key(node_id), slots_key(node_id))
        pipe.execute()

    def retire(self, node_id: str, now: float) -> bool:
        """Atomically mark an empty node as stopping; False if it has sessions."""
        return bool(self._retire(keys=[node_key(node_id), slots_key(node_id)], args=[now]))

    def drain(self, node_id: str, deadline: float) -> None:
        self.r.hset(node_key(node_id), "drain_deadline", repr(deadline))

    def undrain(self, node_id: str) -> None:
        self.r.hdel(node_key(node_id), "drain_deadline")

    def single_flight(self, name: str, ttl_s: float) -> str | None:
        """A token if this caller may run `name` now (nobody else holds it), else None."""
        token = uuid.uuid4().hex
        ok = self.r.set(f"{PREFIX}flight:{name}", token, nx=True, px=int(ttl_s * 1000))
        return token if ok else None

    def land(self, name: str, token: str) -> None:
        """Release a single_flight, if it is still ours."""
        self._land(keys=[f"{PREFIX}flight:{name}"], args=[token])

    # --- membership: join tokens, credentials, heartbeats --------------------------------
    def mint_join(self, grant: Mapping[str, str], ttl_s: float) -> str:
        """A one-time join token for a node we boot ({"node": id}) or an own machine
        ({"byo": region, "model": name}); only its hash is stored."""
        token = "j-" + secrets.token_urlsafe(24)
        self.r.set(join_key(token), json.dumps(dict(grant)), px=int(ttl_s * 1000))
        return token

    def node_join_token(self, node_id: str) -> str | None:
        """The join token minted for a node we boot, while it has not joined."""
        return self.r.hget(node_key(node_id), "join_token") or None

    def redeem_join(self, token: str) -> dict[str, str] | None:
        """The token's grant, once: a second use (or an expired token) gets None."""
        raw = self.r.getdel(join_key(token))
        return json.loads(raw) if raw else None

    def enroll(self, node_id: str, fields: Mapping[str, Any]) -> str:
        """Give a node its credential (a fresh one revokes the old) and record `fields`."""
        credential = "c-" + secrets.token_urlsafe(32)
        old = self.r.hget(node_key(node_id), "cred")
        pipe = self.r.pipeline(transaction=True)
        if old:
            pipe.delete(f"{PREFIX}cred:{old}")
        pipe.set(cred_key(credential), node_id)
        pipe.sadd(NODES, node_id)
        pipe.hset(node_key(node_id), mapping={**{k: str(v) for k, v in fields.items()},
                                              "cred": digest(credential)})
        pipe.hdel(node_key(node_id), "join_token")
        pipe.execute()
        return credential

    def node_for_credential(self, credential: str) -> str | None:
        return self.r.get(cred_key(credential)) if credential else None

    def revoke(self, node_id: str) -> bool:
        """The node's credential stops working at once; True if it had one."""
        old = self.r.hget(node_key(node_id), "cred")
        if not old:
            return False
        self.r.delete(f"{PREFIX}cred:{old}")
        self.r.hdel(node_key(node_id), "cred")
        return True

    def beat(self, node_id: str, beat: Beat, now: float, lock_ttl_s: float) -> Orders | None:
        """Record one heartbeat atomically (see _BEAT); None if the node is forgotten."""
        keys = [node_key(node_id), slots_key(node_id), USAGE_MINUTES]
        keys += [lock_key(user) for user, _, _ in beat.streams]
        keys += [usage_key(minute) for minute, _, _ in beat.usage]
        keys += [lock_key(user) for user, _ in beat.closed]
        args: list[Any] = [now, beat.state, beat.progress,
                           "" if beat.eta_ready is None else beat.eta_ready,
                           "" if beat.ready_at is None else beat.ready_at, lock_ttl_s,
                           node_id, beat.serving, USAGE_KEEP_S, len(beat.streams),
                           len(beat.usage)]
        for _, session, fence in beat.streams:
            args += [session, fence]
        for minute, field, seconds in beat.usage:
            args += [field, repr(seconds), minute]
        args += [session for _, session in beat.closed]
        res = self._beat(keys=keys, args=args)
        if int(res[0]) == 0:
            return None
        return Orders(float(res[1]) if res[1] else None, res[2] or None, tuple(res[3:]))

    def mark_constrained(self, region: str, until: float, reason: str) -> None:
        self.r.hset(CONSTRAINED, region, json.dumps({"until": until, "reason": reason}))

    def constrained(self, now: float) -> dict[str, str]:
        """Regions whose provider refused to create nodes lately -> the refusal."""
        out = {}
        for region, raw in self.r.hgetall(CONSTRAINED).items():
            entry = json.loads(raw)
            if float(entry["until"]) > now:
                out[region] = str(entry["reason"])
        return out

    # --- slots and the queue ----------------------------------------------------------
    def enqueue(self, pool: str, session_id: str, now: float, first: bool = False) -> int:
        """Put a session in its pool's queue (a resume goes first); returns its position."""
        pipe = self.r.pipeline(transaction=True)
        pipe.zadd(queue_key(pool), {session_id: 0 if first else now}, nx=True)
        pipe.sadd(QUEUES, pool)
        pipe.zrank(queue_key(pool), session_id)
        rank = pipe.execute()[-1]
        return int(rank) + 1

    def position(self, pool: str, session_id: str) -> int | None:
        rank = self.r.zrank(queue_key(pool), session_id)
        return None if rank is None else int(rank) + 1

    def assign(self, pool: str, candidates: Sequence[str], now: float, hold_s: float,
               heartbeat_timeout_s: float) -> int:
        """Atomically hand waiting sessions, in order, to candidates with room."""
        if not candidates:
            return 0
        keys = [queue_key(pool), ASSIGNED]
        keys += [k for node_id in candidates for k in (node_key(node_id), slots_key(node_id))]
        return int(self._assign(keys=keys, args=[now, now + hold_s, heartbeat_timeout_s,
                                                 *candidates]))

    def admit(self, user: str, session_id: str, model: str, version: str, region: str,
              now: float, candidates: Sequence[str], *, lock_ttl_s: float, takeover: bool,
              resume: bool, tau_s: float, hold_s: float, heartbeat_timeout_s: float
              ) -> Admitted | Lock:
        """A lobby request in one atomic step: lock, arrival, queue, assign (see _ADMIT)."""
        pool = pool_id(model, version, region)
        keys = [lock_key(user), fence_key(user), arrivals_key(pool), queue_key(pool), QUEUES,
                ASSIGNED]
        keys += [k for node_id in candidates for k in (node_key(node_id), slots_key(node_id))]
        res = self._admit(keys=keys, args=[session_id, model, region, now, lock_ttl_s,
                                           int(takeover), tau_s, int(resume), pool,
                                           now + hold_s, heartbeat_timeout_s, *candidates])
        if int(res[0]) == 0:
            return Lock(session=res[1], model=res[2], region=res[3], since=float(res[4] or 0))
        return Admitted(Taken(int(res[1]), res[2] or None, res[3] or None), res[4] or None,
                        int(res[5]))

    def abandon(self, pool: str, session_id: str) -> None:
        """A waiting lobby left: leave the queue, give back a node it was just handed."""
        node_id = self._abandon(keys=[queue_key(pool), ASSIGNED], args=[session_id])
        if node_id:
            self.r.zrem(slots_key(node_id), session_id)   # a reservation, never yet live

    def sync_live(self, node_id: str, sessions: Sequence[str]) -> None:
        """The node's streams are exactly these (run under the node's own lock)."""
        self._sync_live(keys=[slots_key(node_id)], args=list(sessions))

    def take_assignment(self, session_id: str) -> str | None:
        """The node the assign script gave this session, if any (read once)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hget(ASSIGNED, session_id)
        pipe.hdel(ASSIGNED, session_id)
        node_id = pipe.execute()[0]
        return str(node_id) if node_id else None

    def queue_lengths(self) -> dict[str, int]:
        pools = sorted(self.r.smembers(QUEUES))
        pipe = self.r.pipeline(transaction=False)
        for pool in pools:
            pipe.zcard(queue_key(pool))
        return dict(zip(pools, (int(n) for n in pipe.execute()), strict=True))

    def arrive(self, pool: str, now: float, tau_s: float) -> float:
        """Count an arrival in the pool's arrival-rate average (time constant tau_s)."""
        return float(self._arrive(keys=[arrivals_key(pool)], args=[now, tau_s]))

    def arrival_rates(self, pools: Iterable[str], now: float, tau_s: float
                      ) -> dict[str, float]:
        pools = list(pools)
        pipe = self.r.pipeline(transaction=False)
        for pool in pools:
            pipe.hmget(arrivals_key(pool), "rate", "t")
        out = {}
        for pool, (rate, t) in zip(pools, pipe.execute(), strict=True):
            out[pool] = (float(rate) * math.exp(-max(0.0, now - float(t)) / tau_s)
                         if rate else 0.0)
        return out

    def drop_expired(self, node_id: str, now: float) -> int:
        """Free the slots of tickets that were never used before they expired."""
        return int(self.r.zremrangebyscore(slots_key(node_id), "-inf", f"({now}"))

    def mark_live(self, node_id: str, session_id: str) -> None:
        """The stream connected: its slot no longer expires."""
        self.r.zadd(slots_key(node_id), {session_id: "+inf"})

    def release_slot(self, node_id: str, session_id: str) -> None:
        self.r.zrem(slots_key(node_id), session_id)

    def live_sessions(self, node_id: str) -> list[str]:
        return list(self.r.zrangebyscore(slots_key(node_id), "+inf", "+inf"))

    def kick_scaler(self, hold_s: float = 0.2) -> bool:
        """True for the first caller in a short window: bursts trigger one scale task."""
        return bool(self.r.set(SCALE_KICK, "1", nx=True, px=int(hold_s * 1000)))

    # --- the user's single-stream lock -------------------------------------------------
    def take_lock(self, user: str, session_id: str, model: str, region: str, now: float,
                  ttl_s: float, takeover: bool = False) -> Taken | Lock:
        """Taken (fence, and the session/node it took over from); else who holds it."""
        res = self._take_lock(keys=[lock_key(user), fence_key(user)],
                              args=[session_id, model, region, now, ttl_s, int(takeover)])
        if int(res[0]) == 1:
            return Taken(int(res[1]), res[2] or None, res[3] or None)
        return Lock(session=res[1], model=res[2], region=res[3], since=float(res[4] or 0))

    def refresh_locks(self, node_id: str, streams: Sequence[tuple[str, str, int]],
                      ttl_s: float) -> list[str]:
        """Keep live streams' locks; returns sessions whose lock another session took.

        `streams` is (user, session, fence) per live stream.
        """
        if not streams:
            return []
        args: list[Any] = [ttl_s, node_id]
        for _, sid, fence in streams:
            args += [sid, fence]
        return list(self._refresh_locks(keys=[lock_key(u) for u, _, _ in streams], args=args))

    def release_lock(self, user: str, session_id: str) -> bool:
        return bool(self._release_lock(keys=[lock_key(user)], args=[session_id]))

    def lock_holder(self, user: str) -> str | None:
        return self.r.hget(lock_key(user), "session")

    # --- usage counters -----------------------------------------------------------------
    def report_usage(self, counters: Iterable[tuple[int, str, float]]) -> None:
        """(minute_s, "user|session|node|model|region", cumulative seconds) per counter."""
        counters = list(counters)
        if not counters:
            return
        args: list[Any] = [USAGE_KEEP_S]
        for minute_s, field, seconds in counters:
            args += [field, repr(seconds), minute_s]
        self._report_usage(keys=[USAGE_MINUTES] + [usage_key(m) for m, _, _ in counters],
                           args=args)

    def usage_minutes(self, until_s: float) -> list[int]:
        """Minutes with usage counters, started before `until_s`; forgets expired ones."""
        self.r.zremrangebyscore(USAGE_MINUTES, "-inf", f"({until_s - USAGE_KEEP_S}")
        return [int(float(m)) for m in self.r.zrangebyscore(USAGE_MINUTES, "-inf",
                                                             f"({until_s}")]

    def usage_counters(self, minute_s: int) -> dict[str, float]:
        return {k: float(v) for k, v in self.r.hgetall(usage_key(minute_s)).items()}

    # --- sessions -----------------------------------------------------------------------
    def save_session(self, session_id: str, fields: Mapping[str, Any], ttl_s: int) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(session_key(session_id), mapping={k: str(v) for k, v in fields.items()})
        pipe.expire(session_key(session_id), ttl_s)
        pipe.execute()

    def session(self, session_id: str) -> dict[str, str]:
        return dict(self.r.hgetall(session_key(session_id)))

    # --- models -------------------------------------------------------------------------
    def seed_models(self, models: Iterable[tuple[str, str, float]]) -> None:
        """Config models become live unless a deploy already set them (first run wins)."""
        for name, version, semitones in models:
            entry = {"live": {"version": version, "semitones": semitones}, "draining": []}
            self.r.hsetnx(MODELS, name, json.dumps(entry))

    def deploy(self, model: str, version: str, semitones: float, deadline: float) -> LiveModel:
        raw = self._deploy(keys=[MODELS], args=[model, version, semitones, deadline])
        return _live_model(model, raw)

    def models(self) -> list[LiveModel]:
        return [_live_model(name, raw) for name, raw in sorted(self.r.hgetall(MODELS).items())]

    def model(self, name: str) -> LiveModel | None:
        raw = self.r.hget(MODELS, name)
        return _live_model(name, raw) if raw else None

    # --- region health ------------------------------------------------------------------
    def mark_region_down(self, region: str, until: float) -> None:
        self.r.hset(REGION_DOWN, region, repr(until))

    def mark_region_up(self, region: str) -> None:
        self.r.hdel(REGION_DOWN, region)

    def regions_down(self, now: float) -> frozenset[str]:
        return frozenset(r for r, until in self.r.hgetall(REGION_DOWN).items()
                         if float(until) > now)

    # --- local cloud driver VMs ---------------------------------------------------------
    def save_vm(self, vm_id: str, fields: Mapping[str, Any]) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(VMS, vm_id)
        pipe.hset(vm_key(vm_id), mapping={k: str(v) for k, v in fields.items()})
        pipe.execute()

    def vms(self) -> list[dict[str, str]]:
        ids = sorted(self.r.smembers(VMS))
        pipe = self.r.pipeline(transaction=False)
        for vm_id in ids:
            pipe.hgetall(vm_key(vm_id))
        return [dict(h) for h in pipe.execute() if h]

    def forget_vm(self, vm_id: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(VMS, vm_id)
        pipe.delete(vm_key(vm_id))
        pipe.execute()


def _live_model(name: str, raw: str) -> LiveModel:
    entry = json.loads(raw)
    return LiveModel(name, str(entry["live"]["version"]), float(entry["live"]["semitones"]),
                     tuple(entry.get("draining") or ()))


def _float(h: Mapping[str, str], key: str) -> float:
    raw = h.get(key) or ""
    return float(raw) if raw else 0.0


def _record(h: Mapping[str, str], sessions: int, live: int) -> NodeRecord:
    state = NodeState(h["state"])
    drain = h.get("drain_deadline") or ""
    if drain and state is NodeState.READY:
        state = NodeState.DRAINING
    eta = h.get("eta_ready") or ""
    return NodeRecord(
        id=h["id"], provider=h.get("provider", ""), region=h.get("region", ""),
        model=h.get("model", ""), version=h.get("version", ""), state=state,
        progress=_float(h, "progress"), url=h.get("url", ""),
        capacity=int(h.get("capacity") or 0), sessions=sessions, live=live,
        started_at=_float(h, "started_at"), requested_at=_float(h, "requested_at"),
        deadline=_float(h, "deadline"), last_seen=_float(h, "last_seen"),
        price_per_hour=h.get("price_per_hour") or "0", eta_ready=float(eta) if eta else None,
        drain_deadline=float(drain) if drain else None, retired=bool(h.get("retired")),
        semitones=_float(h, "semitones"), ready_at=_float(h, "ready_at") or None,
        idle_since=_float(h, "idle_since") or None,
        home=h.get("home") or h.get("region", ""))


def connect(url: str) -> redis.Redis:
    """A client for the live state; blocking reads get no socket timeout (see PITFALLS)."""
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=None,
                                health_check_interval=30)
