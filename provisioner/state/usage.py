"""Usage counters: cumulative seconds streamed per minute, as nodes report them.

A counter that grows makes its minute dirty in the same script (report_usage.lua, beat.lua),
and a dirty minute's hash never expires: settlement walks the dirty minutes however old,
bills them, and only then marks them clean (settle_usage.lua), after which the hash expires.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from provisioner.state.base import StateBase
from provisioner.state.keys import (
    NODE_ENDS,
    USAGE_DIRTY,
    USAGE_KEEP_S,
    USAGE_REJECTED,
    USAGE_REJECTED_KEEP,
    usage_key,
)


class Usage(StateBase):
    """State's verbs on usage counters (a mixin)."""

    def report_usage(self, counters: Iterable[tuple[int, str, float]]) -> None:
        """(minute_s, "user|session|node|model|region", cumulative seconds) per counter."""
        counters = list(counters)
        if not counters:
            return
        args: list[Any] = []
        for minute_s, field, seconds in counters:
            args += [field, repr(seconds), minute_s]
        self._report_usage(keys=[USAGE_DIRTY] + [usage_key(m) for m, _, _ in counters],
                           args=args)

    def dirty_minutes(self, until_s: float, limit: int) -> list[int]:
        """Minutes with counters not settled yet that started before `until_s`, oldest
        first, at most `limit`."""
        return [int(float(m)) for m in self.r.zrangebyscore(
            USAGE_DIRTY, "-inf", f"({until_s}", start=0, num=limit)]

    def usage_counters(self, minute_s: int) -> dict[str, float]:
        return {k: float(v) for k, v in self.r.hgetall(usage_key(minute_s)).items()}

    def record_rejected(self, what: list[str]) -> None:
        """Counters settlement skipped (malformed), newest first, the last USAGE_REJECTED
        kept for an operator (`voicectl usage --rejected`)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.lpush(USAGE_REJECTED, *what)
        pipe.ltrim(USAGE_REJECTED, 0, USAGE_REJECTED_KEEP - 1)
        pipe.execute()

    def rejected(self) -> list[str]:
        return list(self.r.lrange(USAGE_REJECTED, 0, -1))

    def mark_settled(self, minute_s: int, billed: Mapping[str, float]) -> bool:
        """The minute's counters `billed` (as usage_counters read them) are in the billing
        database: clean it, unless a report changed them since (False: it stays dirty)."""
        args: list[Any] = [USAGE_KEEP_S, minute_s]
        for field, seconds in billed.items():
            args += [field, repr(seconds)]
        return bool(self._settle_usage(keys=[USAGE_DIRTY, usage_key(minute_s)], args=args))

    def note_node_end(self, row: Mapping[str, Any], ended_s: float, increment_s: int) -> None:
        """A node stopped or died at `ended_s`: its GPU bill closes at that time, written by
        the billing worker (provisioning never waits for the database)."""
        self.r.rpush(NODE_ENDS, json.dumps({"node": dict(row), "ended_s": ended_s,
                                            "increment_s": increment_s}))

    def node_ends(self, limit: int) -> list[dict[str, Any]]:
        """The oldest `limit` node ends not written to the bill yet."""
        return [json.loads(e) for e in self.r.lrange(NODE_ENDS, 0, limit - 1)]

    def drop_node_ends(self, count: int) -> None:
        """The oldest `count` node ends are in the bill."""
        self.r.ltrim(NODE_ENDS, count, -1)
