"""Every Redis key of the live state: the one module that spells keys (scripts/ holds the Lua).

Key schema (prefix `vc:`; times are unix seconds passed in by the caller):

    vc:nodes                  SET    ids of every node the control plane knows
    vc:node:{id}              HASH   id provider region model version state progress url
                                     capacity started_at requested_at deadline last_seen
                                     price_per_hour eta_ready digest home cred join_token
                                     seen_started seen_failed (health.lua).
                                     `home`: the region whose queue it serves (it may run in
                                     another region nearby, on a cheaper provider). `cred`: the
                                     hash of its credential. `state` is written by the control
                                     plane until the node heartbeats, then reported by the node.
                                     Orders the node never writes: drain_deadline (old version:
                                     no new sessions), retired (being stopped), retarget.
                                     `lost_at`: a client reported its stream there lost (a
                                     resume); no placement while last_seen < lost_at.
                                     `dropped`, `dropped_why`: reports of it refused (not
                                     placed there); `suspect`: why it was drained for it.
                                     `spot`: "1" for a spot machine (priced at the spot
                                     price); `interrupt_at`: its provider takes it back
                                     then (a spot notice), with `drain_reason` "spot".
    vc:node:{id}:placed       HASH   session id -> "user|fence|placed_at": every session the
                                     lobby gave this node a ticket for (the highest fence);
                                     what the node reports is checked against it (beat.lua)
    vc:node:{id}:slots        ZSET   session id -> reservation expiry; +inf once the stream is
                                     live on the node. ZCARD = slots taken (never > capacity).
    vc:session:{sid}          HASH   user model version region node fence created_at, and
                                     away_from (placed away from that nearest region while
                                     it was down), recall_by (told to move back there by then)
    vc:displaced              SET    session ids with away_from, until recalled or re-placed
    vc:assigned               HASH   session id -> node id, written by the assign script for a
                                     waiting lobby to pick up
    vc:queue:{model}|{version}|{region}
                              ZSET   waiting session id -> enqueue time (resumes: 0, first)
    vc:queues                 SET    "{model}|{version}|{region}" of every queue ever used
    vc:unscaled               ZSET   waiting session id -> when it was queued, for sessions
                                     whose demand the autoscaler does not count (anonymous
                                     users when `anonymous_demand_scales` is off); a mark
                                     outlives its wait, it is dropped after UNSCALED_KEEP_S
    vc:arrivals:{model}|{version}|{region}
                              HASH   rate (EWMA arrivals/s, tau arrival_tau_s) fast (the same
                                     with a tenth of it: sees a burst) t (last update)
    vc:lock:{user}            HASH   session fence model region node since; expires unless a
                                     lobby or the node streaming it refreshes it
    vc:fence:{user}           STRING the user's last fencing token (INCR)
    vc:models                 HASH   model name -> JSON of its versions.Entry: versions
                                     (package digest, streams per GPU, drain deadline,
                                     failure), live, canary and its percent, history
    vc:canary-count:{model}   STRING new sessions so far (INCR): spreads them over a canary
    vc:health:{model}|{version}
                              HASH   started failed loaded load_failed: what nodes reported
                                     of that version (automatic rollback reads it)
    vc:vm:{id}                HASH   local cloud driver: pid, name, region, image, created_at
    vc:vms                    SET    ids of local driver VMs
    vc:scale-kick             STRING set NX for a moment so bursts trigger one scale task
    vc:flight:{name}          STRING a token while one worker runs `name` (scale+reap):
                                     two overlapping runs would boot twice
    vc:region-down            HASH   region -> unix time until which placement avoids it (its
                                     nodes all died or failed to boot)
    vc:usage:{minute_s}       HASH   "{user}|{session}|{node}|{model}|{region}" -> cumulative
                                     seconds streamed in that UTC minute (only ever grows).
                                     No expiry while the minute is dirty; USAGE_KEEP_S once
                                     settled (a later report recreates it: settling merges)
    vc:usage-dirty            ZSET   minute_s -> minute_s of every usage hash with counters
                                     not settled yet: written by the same script as the
                                     counter, removed only by the settle step that billed it
    vc:usage-rejected         LIST   counters settlement skipped as malformed (what, why),
                                     newest first, the last USAGE_REJECTED_KEEP
    vc:node-ends              LIST   JSON {"node": bill row, "ended_s", "increment_s"} of nodes
                                     stopped or dead whose GPU bill the billing worker has not
                                     closed yet (it may be away with the database), oldest first
    vc:metrics                HASH   "name|k=v,..." -> count: /metrics' counters, shared by
                                     every process (admissions, resumes, lobby errors, ...)
    vc:metrics:wait           HASH   the wait histogram: bucket bound -> count, "+Inf", "sum"
    vc:join:{sha256(token)}   STRING one-time join token -> JSON {"node": id} (a node we
                                     booted) or {"byo": region, "model": name}; expires
    vc:cred:{sha256(cred)}    STRING a joined node's credential -> node id (revoked: deleted;
                                     the node hash keeps the hash in `cred`)
    vc:lobby-wake             PUBSUB a node turned ready or freed a slot: every webapp's
                                     waiting room runs its assign step now
    vc:constrained            HASH   region -> JSON {"until", "reason"}: the provider refused
                                     to create there (capacity, quota); boots go elsewhere
    vc:beat-path              STRING since when some webapp has taken heartbeats without a
                                     gap (each stamps it every beat; it expires after a gap)
    vc:beat-path-last         STRING when a webapp last stamped vc:beat-path (no expiry)
    vc:attempts:{kind}:{who}  HASH   tokens t: a token bucket of lobby attempts (attempt.lua);
                                     kind `user` (a user id) or `client` (an address, IPv6 a
                                     /64); expires once it would be full again

Anything that must be atomic is one Lua script in scripts/; every key it touches is in KEYS.
"""

from __future__ import annotations

import hashlib

PREFIX = "vc:"
NODES = PREFIX + "nodes"
ASSIGNED = PREFIX + "assigned"
QUEUES = PREFIX + "queues"
UNSCALED = PREFIX + "unscaled"
MODELS = PREFIX + "models"
VMS = PREFIX + "vms"
REGION_DOWN = PREFIX + "region-down"
SCALE_KICK = PREFIX + "scale-kick"
USAGE_DIRTY = PREFIX + "usage-dirty"
USAGE_REJECTED = PREFIX + "usage-rejected"
NODE_ENDS = PREFIX + "node-ends"
METRIC_COUNTS = PREFIX + "metrics"
METRIC_WAIT = PREFIX + "metrics:wait"
USAGE_REJECTED_KEEP = 1000
CONSTRAINED = PREFIX + "constrained"
LOBBY_WAKE = PREFIX + "lobby-wake"   # PUBSUB: room may have appeared; waiting lobbies look now
BEAT_PATH = PREFIX + "beat-path"
DISPLACED = PREFIX + "displaced"
BEAT_PATH_LAST = PREFIX + "beat-path-last"
USAGE_KEEP_S = 3600     # a settled minute's counters stay this long (to read; billing has them)
UNSCALED_KEEP_S = 3600  # far beyond a lobby's longest wait (webapp.lobby.WAIT_LIMIT_S)


def node_key(node_id: str) -> str:
    return f"{PREFIX}node:{node_id}"


def slots_key(node_id: str) -> str:
    return f"{PREFIX}node:{node_id}:slots"


def placed_key(node_id: str) -> str:
    return f"{PREFIX}node:{node_id}:placed"


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


def canary_count_key(model: str) -> str:
    return f"{PREFIX}canary-count:{model}"


def health_key(model: str, version: str) -> str:
    return f"{PREFIX}health:{model}|{version}"


def vm_key(vm_id: str) -> str:
    return f"{PREFIX}vm:{vm_id}"


def join_key(token: str) -> str:
    return f"{PREFIX}join:{digest(token)}"


def cred_key(credential: str) -> str:
    return f"{PREFIX}cred:{digest(credential)}"


def cred_hash_key(hashed: str) -> str:
    """The credential key from its stored hash (the node hash's `cred`), to revoke it."""
    return f"{PREFIX}cred:{hashed}"


def attempts_key(kind: str, who: str) -> str:
    return f"{PREFIX}attempts:{kind}:{who}"


def flight_key(name: str) -> str:
    return f"{PREFIX}flight:{name}"


def digest(secret: str) -> str:
    """Secrets are stored hashed: a read of Redis does not hand out working tokens."""
    return hashlib.sha256(secret.encode()).hexdigest()

