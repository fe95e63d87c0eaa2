"""Token buckets of lobby attempts: per user and per client, taken together atomically."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from provisioner.state.base import StateBase
from provisioner.state.keys import attempts_key
from provisioner.state.records import Limit, Throttled


class Attempts(StateBase):
    """State's verbs on lobby attempt limits (a mixin)."""

    def take_attempt(self, limits: Sequence[Limit], now: float) -> Throttled | None:
        """One attempt against every limit at once, in order: None when each gave a token;
        else the first limit that refused and when it gives one again (of the limits before
        it, only those marked `always` gave a token). Let through with the first limit's
        last token: that limit, `let_through`, and when it has one again."""
        if not limits:
            return None
        args: list[Any] = [repr(now)]
        for limit in limits:
            args += [limit.capacity, repr(limit.per_window / limit.window_s),
                     int(limit.always)]
        got = self._attempt(keys=[attempts_key(x.kind, x.who) for x in limits], args=args)
        if int(got[0]) == 1:
            return Throttled(limits[0], float(got[2]), let_through=True) if len(got) > 1 \
                else None
        return Throttled(limits[int(got[1]) - 1], float(got[2]))
