"""Usage counters: cumulative seconds streamed per minute, as nodes report them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from provisioner.state.base import StateBase
from provisioner.state.keys import USAGE_KEEP_S, USAGE_MINUTES, usage_key


class Usage(StateBase):
    """State's verbs on usage counters (a mixin)."""

    def report_usage(self, counters: Iterable[tuple[int, str, float]]) -> None:
        """(minute_s, "user|session|node|model|region", cumulative seconds) per counter."""
        counters = list(counters)
        if not counters:
            return
        args: list[Any] = [USAGE_KEEP_S]
        for minute_s, field, seconds in counters:
            args += [field, repr(seconds), minute_s]
        self._report_usage(keys=[USAGE_MINUTES] + [usage_key(m) for m, _, _ in counters],
                           args=args)

    def usage_minutes(self, until_s: float) -> list[int]:
        """Minutes with usage counters, started before `until_s`; forgets expired ones."""
        self.r.zremrangebyscore(USAGE_MINUTES, "-inf", f"({until_s - USAGE_KEEP_S}")
        return [int(float(m)) for m in self.r.zrangebyscore(USAGE_MINUTES, "-inf",
                                                             f"({until_s}")]

    def usage_counters(self, minute_s: int) -> dict[str, float]:
        return {k: float(v) for k, v in self.r.hgetall(usage_key(minute_s)).items()}
