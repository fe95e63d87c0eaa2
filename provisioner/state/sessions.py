"""Session records: who streams which model where, with its fence."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from provisioner.state.base import StateBase
from provisioner.state.keys import session_key


class Sessions(StateBase):
    """State's verbs on sessions (a mixin)."""

    def save_session(self, session_id: str, fields: Mapping[str, Any], ttl_s: int) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(session_key(session_id), mapping={k: str(v) for k, v in fields.items()})
        pipe.expire(session_key(session_id), ttl_s)
        pipe.execute()

    def session(self, session_id: str) -> dict[str, str]:
        return dict(self.r.hgetall(session_key(session_id)))
