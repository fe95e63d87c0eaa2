"""Model versions: push, canary, promote, rollback and automatic rollback, as pure functions.

A model's `Entry` (one JSON value in Redis, changed by compare-and-set) holds its versions
(each a package digest), the live one, an optional canary with its share of new sessions,
and the order versions were live in. A version that stops being live or canary drains until
its deadline; a failed one drains at once (its users move make-before-break). Nothing here
reads a clock or Redis: callers pass `now` and apply the result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

FAILED_DRAIN_S = 0.0   # a failed version's users are told to move at once (2 s to do it)
HISTORY = 20           # versions kept listed (drained ones past this are forgotten)


class VersionState(StrEnum):
    LIVE = "live"
    CANARY = "canary"
    DRAINING = "draining"
    FAILED = "failed"
    RETIRED = "retired"    # drained out: no longer listed


@dataclass(frozen=True)
class Version:
    """One pushed package of a model: what nodes fetch and how many streams a GPU takes."""

    model: str
    version: str
    digest: str
    streams_per_gpu: int = 4
    description: str = ""
    pushed_at: float = 0.0
    deadline: float | None = None    # draining until then (no longer live or canary)
    failed: str = ""                 # why it was rolled back by itself ("" = not failed)


@dataclass(frozen=True)
class Entry:
    model: str
    versions: dict[str, Version] = field(default_factory=dict)
    live: str = ""
    canary: str = ""
    canary_percent: int = 0
    history: tuple[str, ...] = ()    # versions in the order they were live, latest last

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["history"] = list(self.history)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        versions = {k: Version(**v) for k, v in data.get("versions", {}).items()}
        return cls(data["model"], versions, data.get("live", ""), data.get("canary", ""),
                   int(data.get("canary_percent", 0)), tuple(data.get("history", ())))

    def state(self, version: str, now: float) -> VersionState:
        v = self.versions.get(version)
        if v is None:
            return VersionState.RETIRED
        if v.failed:
            return VersionState.FAILED
        if version == self.live:
            return VersionState.LIVE
        if version == self.canary:
            return VersionState.CANARY
        if v.deadline is not None and v.deadline > now:
            return VersionState.DRAINING
        return VersionState.RETIRED

    def serving(self) -> list[Version]:
        """The versions new sessions go to: live, and the canary if any."""
        return [self.versions[v] for v in (self.live, self.canary) if v in self.versions]

    def for_new_session(self, count: int) -> Version:
        """The version of the `count`-th new session (1, 2, ...): the canary for exactly its
        share, spread evenly and from the first session on (a running count, not a coin:
        40 sessions at 25 % give 10, the 1st, 5th, 9th ...)."""
        p = self.canary_percent if self.canary else 0
        if p and -(-count * p // 100) > -(-(count - 1) * p // 100):
            return self.versions[self.canary]
        return self.versions[self.live]

    def for_resume(self, version: str, count: int) -> Version:
        """A resume stays on its version while new sessions may still get it; one whose
        version failed or no longer serves goes where a new session would."""
        if version in (self.live, self.canary) and version in self.versions:
            return self.versions[version]
        return self.for_new_session(count)


def _drain(entry: Entry, version: str, deadline: float) -> dict[str, Version]:
    versions = dict(entry.versions)
    if version and version in versions:
        versions[version] = replace(versions[version], deadline=deadline)
    return versions


def _trim(entry: Entry) -> Entry:
    keep = set(entry.history[-HISTORY:]) | {entry.live, entry.canary}
    keep |= set(sorted(entry.versions, key=int)[-HISTORY:])
    return replace(entry, versions={k: v for k, v in entry.versions.items() if k in keep})


def push(entry: Entry | None, model: str, digest: str, streams_per_gpu: int, description: str,
         now: float, drain_s: float, canary_percent: int | None = None) -> tuple[Entry, Version]:
    """Register the next version of `model`. Without a canary share it is live at once (the
    live version and any canary drain); with one it takes that share of new sessions. The
    same digest as the live version or canary registers nothing new."""
    entry = entry or Entry(model)
    for v in entry.serving():
        if v.digest == digest and not v.failed:
            return entry, v
    number = str(max((int(k) for k in entry.versions), default=0) + 1)
    new = Version(model, number, digest, streams_per_gpu, description, now)
    versions = _drain(entry, entry.canary, now + drain_s)
    versions[number] = new
    if canary_percent is None or not entry.live:
        versions = _drain(replace(entry, versions=versions), entry.live, now + drain_s)
        changed = replace(entry, versions=versions, live=number, canary="", canary_percent=0,
                          history=(*entry.history, number))
    else:
        changed = replace(entry, versions=versions, canary=number,
                          canary_percent=canary_percent)
    return _trim(changed), new


def promote(entry: Entry, now: float, drain_s: float) -> Entry:
    """The canary takes every new session; the old live version drains."""
    if not entry.canary:
        raise ValueError(f"{entry.model} has no canary to promote; push one with --canary P")
    versions = _drain(entry, entry.live, now + drain_s)
    versions[entry.canary] = replace(versions[entry.canary], deadline=None)
    return replace(entry, versions=versions, live=entry.canary, canary="", canary_percent=0,
                   history=(*entry.history, entry.canary))


def deploy(entry: Entry, version: str, now: float, drain_s: float) -> Entry:
    """Make a pushed version live again by number (`voicectl deploy`); it clears a failure."""
    if version not in entry.versions:
        raise ValueError(f"{entry.model} has no version {version!r}; known: "
                         f"{sorted(entry.versions, key=int)} (push a package for a new one)")
    if version == entry.live:
        return entry
    versions = _drain(entry, entry.live, now + drain_s)
    versions = _drain(replace(entry, versions=versions), entry.canary, now + drain_s)
    versions[version] = replace(versions[version], deadline=None, failed="")
    return replace(entry, versions=versions, live=version, canary="", canary_percent=0,
                   history=(*entry.history, version))


def rollback(entry: Entry, now: float, drain_s: float, failed: str = "") -> Entry:
    """New sessions go back to the last good version. With a canary, the canary drains;
    without, the live version gives way to the one live before it. `failed` (a reason):
    it rolled back by itself, so its users move at once."""
    bad = entry.canary or entry.live
    deadline = now + (FAILED_DRAIN_S if failed else drain_s)
    versions = _drain(entry, bad, deadline)
    if failed:
        versions[bad] = replace(versions[bad], failed=failed)
    if entry.canary:
        return replace(entry, versions=versions, canary="", canary_percent=0)
    good = next((v for v in reversed(entry.history)
                 if v != bad and v in versions and not versions[v].failed), None)
    if good is None:
        raise ValueError(f"{entry.model} v{bad} has no earlier good version to roll back to")
    versions[good] = replace(versions[good], deadline=None)
    return replace(entry, versions=versions, live=good, history=(*entry.history, good))


@dataclass(frozen=True)
class Health:
    """What nodes reported of one version: streams started and failed (closed 1011), loads
    done and failed."""

    started: int = 0
    failed: int = 0
    loaded: int = 0
    load_failed: int = 0


MIN_FAILED_STREAMS = 3      # fewer could be one flaky machine or one bad client
FAILED_SHARE = 0.2          # at least this share of its streams failed ...
TIMES_THE_GOOD = 3.0        # ... and this many times the last good version's share


def failure(candidate: Health, good: Health) -> str:
    """Why a new version should roll back by itself, or "" to keep it.

    Loads: a package that loaded in the push check but fails on nodes is broken there;
    two failed loads (one may be a bad machine), or one before any node loaded it.
    Streams: at least MIN_FAILED_STREAMS closed 1011, and a share of FAILED_SHARE and
    TIMES_THE_GOOD times the last good version's. A canary failing every stream rolls back
    at its third failure; one failing half as often as the old version never does.
    """
    if candidate.load_failed >= 2 or (candidate.load_failed and not candidate.loaded):
        return f"{candidate.load_failed} node(s) failed to load it"
    if candidate.failed < MIN_FAILED_STREAMS:
        return ""
    share = candidate.failed / max(candidate.started, candidate.failed)
    good_share = good.failed / good.started if good.started else 0.0
    if share >= FAILED_SHARE and share >= TIMES_THE_GOOD * good_share:
        return (f"{candidate.failed} of {max(candidate.started, candidate.failed)} streams "
                f"failed ({share:.0%}; the last good version: {good_share:.0%})")
    return ""
