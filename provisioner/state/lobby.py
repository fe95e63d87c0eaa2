"""The lobby's side: slots on nodes, the per-pool queues, assignment, arrival rates."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from provisioner.state.base import StateBase
from provisioner.state.keys import (
    ASSIGNED,
    LOBBY_WAKE,
    QUEUES,
    SCALE_KICK,
    UNSCALED,
    UNSCALED_KEEP_S,
    arrivals_key,
    fence_key,
    lock_key,
    node_key,
    pool_id,
    queue_key,
    slots_key,
)
from provisioner.state.records import Admitted, Lock, Rates, Taken


class Lobby(StateBase):
    """State's verbs on slots and the queue (a mixin)."""

    def enqueue(self, pool: str, session_id: str, now: float, first: bool = False) -> int:
        """Put a session in its pool's queue (a resume goes first); returns its position."""
        pipe = self.r.pipeline(transaction=True)
        pipe.zadd(queue_key(pool), {session_id: 0 if first else now}, nx=True)
        pipe.sadd(QUEUES, pool)
        pipe.zrank(queue_key(pool), session_id)
        rank = pipe.execute()[-1]
        return int(rank) + 1

    def take_assignments(self, waiters: Sequence[tuple[str, str, int]]) -> dict[str, str]:
        """The nodes the assign script gave these (user, session, fence) waiters, taken once;
        a session a newer fence of it holds (a resume elsewhere) is left for that one."""
        if not waiters:
            return {}
        got = self._take_assignments(keys=[ASSIGNED, *(lock_key(u) for u, _, _ in waiters)],
                                     args=[x for _, sid, fence in waiters for x in (sid, fence)])
        return dict(zip(got[::2], got[1::2], strict=True))

    def queues(self, pools: Sequence[str]) -> dict[str, list[str]]:
        """The waiting session ids of each pool, in order (one round trip)."""
        pipe = self.r.pipeline(transaction=False)
        for pool in pools:
            pipe.zrange(queue_key(pool), 0, -1)
        return dict(zip(pools, (list(q) for q in pipe.execute()), strict=True))

    def wake_lobbies(self) -> None:
        """Room may have appeared (a node ready, a slot freed): waiting lobbies look now."""
        self.r.publish(LOBBY_WAKE, "1")

    def lobby_wake_subscription(self) -> object:
        """A pub/sub on the lobbies' wake-up channel (the client has no socket timeout)."""
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(LOBBY_WAKE)
        return pubsub

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
              resume: bool, tau_s: float, hold_s: float, heartbeat_timeout_s: float,
              scales: bool = True) -> Admitted | Lock:
        """A lobby request in one atomic step: lock, arrival, queue, assign (admit.lua).

        `scales` False: the user is served from free capacity only; neither the arrival nor
        the wait counts as demand for the autoscaler (`waiting`)."""
        pool = pool_id(model, version, region)
        keys = [lock_key(user), fence_key(user), arrivals_key(pool), queue_key(pool), QUEUES,
                ASSIGNED, UNSCALED]
        keys += [k for node_id in candidates for k in (node_key(node_id), slots_key(node_id))]
        res = self._admit(keys=keys, args=[session_id, model, region, now, lock_ttl_s,
                                           int(takeover), tau_s, int(resume), pool,
                                           now + hold_s, heartbeat_timeout_s, int(scales),
                                           UNSCALED_KEEP_S, *candidates])
        if int(res[0]) == 0:
            return Lock(session=res[1], model=res[2], region=res[3], since=float(res[4] or 0))
        return Admitted(Taken(int(res[1]), res[2] or None, res[3] or None), res[4] or None,
                        int(res[5]))

    def report_lost(self, node_id: str, now: float) -> bool:
        """A client lost its stream on this node (a resume): nobody is placed there until
        it heartbeats after `now` (report_lost.lua). False if it beat since, or is gone."""
        return bool(self._report_lost(keys=[node_key(node_id)], args=[now]))

    def move_waiting(self, session_id: str, old_pool: str, new_pool: str) -> bool:
        """Move a waiting session to another pool's queue, keeping its turn; False if it
        was given a node meanwhile (or is not waiting)."""
        return bool(self._move_waiting(keys=[queue_key(old_pool), queue_key(new_pool), QUEUES,
                                             ASSIGNED], args=[session_id, new_pool]))

    def abandon(self, pool: str, session_id: str, user: str, fence: int) -> None:
        """A waiting lobby left: leave the queue, give back a node it was just handed, and
        release the lock; nothing if a resume of the session took them over (abandon.lua)."""
        node_id = self._abandon(keys=[queue_key(pool), ASSIGNED, lock_key(user)],
                                args=[session_id, fence])
        self.r.zrem(UNSCALED, session_id)
        if node_id:
            self.r.zrem(slots_key(node_id), session_id)   # a reservation, never yet live
            self.wake_lobbies()

    def sync_live(self, node_id: str, sessions: Sequence[str]) -> None:
        """The node's streams are exactly these (run under the node's own lock)."""
        self._sync_live(keys=[slots_key(node_id)], args=list(sessions))

    def queue_lengths(self) -> dict[str, int]:
        pools = sorted(self.r.smembers(QUEUES))
        pipe = self.r.pipeline(transaction=False)
        for pool in pools:
            pipe.zcard(queue_key(pool))
        return dict(zip(pools, (int(n) for n in pipe.execute()), strict=True))

    def waiting(self) -> dict[str, tuple[int, int]]:
        """Per pool: (sessions waiting, those that count as demand for the autoscaler)."""
        pools = sorted(self.r.smembers(QUEUES))
        got = self._waiting(keys=[UNSCALED, *(queue_key(p) for p in pools)])
        return {p: (int(got[2 * i]), int(got[2 * i + 1])) for i, p in enumerate(pools)}

    def arrive(self, pool: str, now: float, tau_s: float) -> float:
        """Count an arrival in the pool's arrival-rate average (time constant tau_s)."""
        return float(self._arrive(keys=[arrivals_key(pool)], args=[now, tau_s]))

    def arrivals(self, pools: Iterable[str]) -> dict[str, Rates]:
        """Each pool's arrival averages as stored (`inputs.Arrivals` decays them)."""
        pools = list(pools)
        pipe = self.r.pipeline(transaction=False)
        for pool in pools:
            pipe.hmget(arrivals_key(pool), "rate", "fast", "t")
        return {pool: Rates(float(rate or 0), float(fast or 0), float(t or 0))
                for pool, (rate, fast, t) in zip(pools, pipe.execute(), strict=True)}

    def drop_expired(self, node_id: str, now: float) -> int:
        """Free the slots of tickets that were never used before they expired."""
        return int(self.r.zremrangebyscore(slots_key(node_id), "-inf", f"({now}"))

    def release_slot(self, node_id: str, session_id: str) -> None:
        self.r.zrem(slots_key(node_id), session_id)

    def live_sessions(self, node_id: str) -> list[str]:
        return list(self.r.zrangebyscore(slots_key(node_id), "+inf", "+inf"))

    def kick_scaler(self, hold_s: float = 0.2) -> bool:
        """True for the first caller in a short window: bursts trigger one scale task."""
        return bool(self.r.set(SCALE_KICK, "1", nx=True, px=int(hold_s * 1000)))
