"""The user's single-stream lock, with a fencing token per take."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from provisioner.state.base import StateBase
from provisioner.state.keys import fence_key, lock_key
from provisioner.state.records import Lock, Taken


class UserLock(StateBase):
    """State's verbs on the user's single-stream lock (a mixin)."""

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
