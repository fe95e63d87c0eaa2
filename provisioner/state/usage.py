"""Usage counters: cumulative seconds streamed per minute, as nodes report them.

A counter that grows makes its minute dirty in the same script (report_usage.lua, beat.lua),
and a dirty minute's hash never expires: settlement walks the dirty minutes however old,
bills them, and only then marks them clean (settle_usage.lua), after which the hash expires.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from provisioner.state.base import StateBase
from provisioner.state.keys import USAGE_DIRTY, USAGE_KEEP_S, usage_key


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

    def mark_settled(self, minute_s: int, billed: Mapping[str, float]) -> bool:
        """The minute's counters `billed` (as usage_counters read them) are in the billing
        database: clean it, unless a report changed them since (False: it stays dirty)."""
        args: list[Any] = [USAGE_KEEP_S, minute_s]
        for field, seconds in billed.items():
            args += [field, repr(seconds)]
        return bool(self._settle_usage(keys=[USAGE_DIRTY, usage_key(minute_s)], args=args))
