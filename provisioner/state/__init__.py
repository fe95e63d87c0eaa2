"""Live state in Redis: typed access for the control plane, one module per noun.

    keys.py      every key name, and the key schema in its docstring (nobody else spells one)
    scripts/     the Lua scripts, one .lua file each, and their loader
    records.py   the records handed out (NodeRecord, Lock, Admitted, Beat, Orders, ...)
    nodes.py, membership.py, lobby.py, lock.py, usage.py, sessions.py, models.py,
    regions.py, vms.py, attempts.py
                 the verbs per noun, composed here into one `State`

Callers import from here: `from provisioner.state import State, connect, pool_id, ...`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool

from provisioner.state.attempts import Attempts
from provisioner.state.keys import (
    ASSIGNED,
    CONSTRAINED,
    MODELS,
    NODES,
    PREFIX,
    QUEUES,
    REGION_DOWN,
    SCALE_KICK,
    USAGE_DIRTY,
    USAGE_KEEP_S,
    VMS,
    arrivals_key,
    attempts_key,
    cred_hash_key,
    cred_key,
    digest,
    fence_key,
    flight_key,
    join_key,
    lock_key,
    node_key,
    pool_id,
    queue_key,
    session_key,
    slots_key,
    usage_key,
    vm_key,
)
from provisioner.state.lobby import Lobby
from provisioner.state.lock import UserLock
from provisioner.state.membership import Membership
from provisioner.state.metrics import Metrics
from provisioner.state.models import Models
from provisioner.state.nodes import Nodes
from provisioner.state.records import (
    Admitted,
    Beat,
    Limit,
    Lock,
    NodeRecord,
    Orders,
    Taken,
    Throttled,
    row_record,
)
from provisioner.state.regions import RegionHealth
from provisioner.state.sessions import Sessions
from provisioner.state.usage import Usage
from provisioner.state.vms import LocalVMs

__all__ = [
    "ASSIGNED", "CONSTRAINED", "MODELS", "NODES", "PREFIX", "QUEUES", "REGION_DOWN",
    "SCALE_KICK", "USAGE_DIRTY", "USAGE_KEEP_S", "VMS",
    "arrivals_key", "attempts_key", "cred_hash_key", "cred_key", "digest", "fence_key",
    "flight_key", "join_key", "lock_key", "node_key", "pool_id", "queue_key", "session_key",
    "slots_key", "usage_key", "vm_key",
    "Admitted", "Beat", "Limit", "Lock", "NodeRecord", "Orders", "Taken",
    "Throttled", "row_record",
    "State", "connect",
]


class State(Nodes, Membership, Lobby, UserLock, Usage, Sessions, Models, RegionHealth,
            LocalVMs, Attempts, Metrics):
    """Typed access to the live state. Construct with a redis client (decode_responses=True)."""


MAX_CONNECTIONS = 256   # per process; more callers at once wait their turn (up to 10 s)
SENTINEL_TIMEOUT_S = 1.0   # asking a sentinel where the primary is


def connect(url: str, master: str = "voice") -> redis.Redis:
    """A client for the live state; blocking reads get no socket timeout (see PITFALLS).

    A thousand nodes' heartbeat threads may call at once: the pool makes them wait for a
    connection instead of failing with "Too many connections" (redis-py's plain pool).
    A `sentinel://` URL (Celery's form: `sentinel://[:PASSWORD@]HOST:PORT[/DB]`, one per
    sentinel, joined by `;`) follows the primary that the sentinels name `master` through
    a failover: a new connection asks them where it is."""
    if url.startswith("sentinel://"):
        return _sentinel_client(url, master)
    pool = redis.BlockingConnectionPool.from_url(
        url, decode_responses=True, socket_timeout=None, health_check_interval=30,
        max_connections=MAX_CONNECTIONS, timeout=10)
    return redis.Redis(connection_pool=pool)


class _BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """The sentinel's pool (where the primary is) with the blocking pool's waiting."""


def _sentinel_client(url: str, master: str) -> redis.Redis:
    parts = [urlsplit(u) for u in url.split(";")]
    hosts = [(p.hostname or "127.0.0.1", p.port or 26379) for p in parts]
    db = int(parts[0].path.strip("/") or 0)
    sentinel = Sentinel(hosts, socket_timeout=SENTINEL_TIMEOUT_S)
    return sentinel.master_for(
        master, connection_pool_class=_BlockingSentinelPool, decode_responses=True,
        password=parts[0].password, db=db, socket_timeout=None, health_check_interval=30,
        max_connections=MAX_CONNECTIONS, timeout=10)
