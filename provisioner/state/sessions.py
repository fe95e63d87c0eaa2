"""Session records: who streams which model where, with its fence."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from provisioner.state import scripts
from provisioner.state.base import StateBase
from provisioner.state.keys import DISPLACED, placed_key, session_key

# A placement is on the replica before the user hears `ready` (a failover then keeps it,
# else its node's reports would be dropped as not placed); a replica that does not answer
# within this costs each placement this long, and the placement stands on the primary.
REPLICA_WAIT_MS = 200


class Sessions(StateBase):
    """State's verbs on sessions (a mixin)."""

    def save_session(self, session_id: str, fields: Mapping[str, Any], ttl_s: int,
                     away_from: str | None = None) -> None:
        """A session placed on a node (again): `fields` has user, node, fence, created_at;
        the node's placed hash records it (what the node may report, beat.lua).
        `away_from`: the nearest region, down when it was placed elsewhere (the session
        is displaced until recalled there). With a replica (Sentinel), returns once the
        replica has it (WAIT)."""
        placement = f"{fields['user']}|{int(fields['fence'])}|{float(fields['created_at'])!r}"
        pairs = [x for k, v in fields.items() for x in (k, str(v))]
        # one connection: WAIT covers the writes of the connection that made them
        pipe = self.r.pipeline(transaction=False)
        pipe.eval(scripts.SAVE_SESSION, 3, session_key(session_id),
                  placed_key(str(fields["node"])), DISPLACED,
                  session_id, placement, ttl_s, away_from or "", *pairs)
        if self.replicas:
            pipe.wait(self.replicas, REPLICA_WAIT_MS)
        pipe.execute()

    def note_waiting(self, session_id: str, fields: Mapping[str, Any]) -> None:
        """A session waiting for a node (user, model, version, region, fence, created_at):
        resumable through any webapp (its lobby's webapp may die); placing it adds the
        node (save_session)."""
        key = session_key(session_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
        pipe.expire(key, 86400)
        pipe.execute()

    def displaced(self) -> list[str]:
        """Sessions placed away from their nearest region while it was down."""
        return sorted(self.r.smembers(DISPLACED))

    def recalled(self, session_id: str, by: float | None) -> None:
        """No longer displaced: told to move back by `by` (None: it ended, or moved)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(DISPLACED, session_id)
        if by is not None:
            pipe.hset(session_key(session_id), "recall_by", repr(by))
        pipe.execute()

    def session(self, session_id: str) -> dict[str, str]:
        return dict(self.r.hgetall(session_key(session_id)))

    def sessions(self, session_ids: list[str]) -> list[dict[str, str]]:
        """Several sessions in one round trip (a region's displaced users, say)."""
        pipe = self.r.pipeline(transaction=False)
        for sid in session_ids:
            pipe.hgetall(session_key(sid))
        return [dict(got) for got in pipe.execute()]
