"""What every part of `State` shares: the redis client and the registered scripts."""

from __future__ import annotations

import redis
from redis.sentinel import SentinelConnectionPool

from provisioner.state import scripts


class StateBase:
    """Typed access to the live state. Construct with a redis client (decode_responses=True)."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        # replicas that writes which must survive a failover wait for (Sentinel: one)
        self.replicas = 1 if isinstance(r.connection_pool, SentinelConnectionPool) else 0
        self._assign = r.register_script(scripts.ASSIGN)
        self._take_lock = r.register_script(scripts.TAKE_LOCK)
        self._refresh_locks = r.register_script(scripts.REFRESH_LOCKS)
        self._release_lock = r.register_script(scripts.RELEASE_LOCK)
        self._arrive = r.register_script(scripts.ARRIVE)
        self._retire = r.register_script(scripts.RETIRE)
        self._cas = r.register_script(scripts.CAS)
        self._health = r.register_script(scripts.HEALTH)
        self._report_usage = r.register_script(scripts.REPORT_USAGE)
        self._settle_usage = r.register_script(scripts.SETTLE_USAGE)
        self._admit = r.register_script(scripts.ADMIT)
        self._sync_live = r.register_script(scripts.SYNC_LIVE)
        self._abandon = r.register_script(scripts.ABANDON)
        self._take_assignments = r.register_script(scripts.TAKE_ASSIGNMENTS)
        self._land = r.register_script(scripts.LAND)
        self._beat = r.register_script(scripts.BEAT)
        self._fleet = r.register_script(scripts.FLEET)
        self._renew = r.register_script(scripts.RENEW)
        self._report_lost = r.register_script(scripts.REPORT_LOST)
        self._move_waiting = r.register_script(scripts.MOVE_WAITING)
        self._waiting = r.register_script(scripts.WAITING)
        self._attempt = r.register_script(scripts.ATTEMPT)
