"""The records the live state hands out: typed views of Redis hashes and script replies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from provisioner.states import NodeState


class Rates(NamedTuple):
    """A pool's arrival averages as stored (`vc:arrivals:*`, fn_arrive.lua): per second,
    over the slow and fast time constants, as of `at`."""

    rate: float
    fast: float
    at: float


@dataclass(frozen=True)
class Beat:
    """What a node reports in one heartbeat (validated by the control plane first)."""

    state: str
    progress: float
    eta_ready: float | None
    ready_at: float | None
    serving: str                                     # "model:version" it has loaded
    streams: Sequence[tuple[str, str, int]] = ()     # (user, session, fence) per live stream
    usage: Sequence[tuple[int, str, float]] = ()     # (minute_s, "user|session:conn", seconds)
    closed: Sequence[tuple[str, str]] = ()           # (user, session) of streams that ended
    started: int = 0       # streams started since it loaded what it serves (cumulative)
    failed: int = 0        # of those, closed because the model failed (1011)
    load_error: str = ""   # why the model did not load (state dead)
    stalled_s: float = 0.0  # the longest a frame has waited for its answer (a hung GPU)
    lag_ms: float | None = None   # how late answers go out (p95 of its last seconds)
    clock_offset_s: float = 0.0   # the control plane's clock minus the node's machine's
    interrupt_at: float | None = None   # its provider takes it back then (a spot notice)


@dataclass(frozen=True)
class Limit:
    """At most `per_window` lobby attempts per `window_s` for `who` (a user id, or a client
    address), refilled evenly, at most `burst` of them at once (0: `per_window`); `always`:
    an attempt spends a token here even when a later limit refuses it."""

    kind: str          # "user" or "client"
    who: str
    per_window: int
    window_s: float
    burst: int = 0
    always: bool = False

    @property
    def capacity(self) -> int:
        """The most tokens its bucket holds."""
        return min(self.burst, self.per_window) if self.burst else self.per_window


@dataclass(frozen=True)
class Throttled:
    """An attempt refused by `limit`, which allows one again in `retry_after_s`; or, when
    `let_through`, one that took the last token `limit` had until then."""

    limit: Limit
    retry_after_s: float
    let_through: bool = False


@dataclass(frozen=True)
class Orders:
    """The control plane's answer to a heartbeat."""

    drain_deadline: float | None
    retarget: str | None                         # "model:version:digest:streams_per_gpu"
    lost: tuple[str, ...]                            # sessions another session took over
    was: str = ""                                    # the node's state before this beat
    dropped: int = 0                                 # reports refused: not placed there


@dataclass(frozen=True)
class NodeRecord:
    """A node as the control plane sees it in Redis."""

    id: str
    provider: str
    region: str
    model: str
    version: str
    state: NodeState
    progress: float
    url: str
    capacity: int
    sessions: int
    live: int
    started_at: float
    requested_at: float
    deadline: float
    last_seen: float
    price_per_hour: str
    eta_ready: float | None
    drain_deadline: float | None
    retired: bool
    digest: str                # the package it serves (nodes fetch it by this)
    ready_at: float | None
    idle_since: float | None
    home: str = ""           # the region whose queue it was booted for (policy's pool)
    lost_at: float | None = None   # a client reported its stream here lost (a resume)
    consolidating: bool = False    # drained to move its users into its pool, not to stop
    dropped: int = 0               # reports refused: of sessions never placed on it
    suspect: str = ""              # why it was drained for lying (beat.lua), or ""
    sent_at: float | None = None   # its provision task was last sent then (fleet.resend_lost)
    spot: bool = False             # a spot machine: cheaper, and its provider may take it back
    drain_reason: str = ""         # why it drains, when it is not obvious: "spot"
    interrupt_at: float | None = None   # its provider takes it back then (a spot notice)
    clock_offset_s: float = 0.0   # its machine's clock is this far behind ours (it keeps ours)

    def alive(self, now: float, timeout_s: float) -> bool:
        """Heartbeating recently, or still coming up within its provisioning deadline."""
        if self.state in (NodeState.REQUESTED, NodeState.BOOTING) and self.last_seen == 0:
            return now <= self.deadline
        return self.last_seen >= now - timeout_s

    @property
    def reported_lost(self) -> bool:
        """A client reported its stream here lost and the node has not heartbeated since:
        no room here for anyone (fn_has_room.lua agrees), nobody's capacity to the scaler."""
        return self.lost_at is not None and self.lost_at > self.last_seen

    def placeable(self, now: float, timeout_s: float) -> bool:
        """May be offered to the assign scripts: alive, not retired, not reported lost."""
        return not self.retired and not self.reported_lost and self.alive(now, timeout_s)


@dataclass(frozen=True)
class Lock:
    """Who holds a user's single-stream lock."""

    session: str
    model: str
    region: str
    since: float


@dataclass(frozen=True)
class Taken:
    """The lock is ours: its fencing token, and whom we took it from (take-over)."""

    fence: int
    previous_session: str | None
    previous_node: str | None


@dataclass(frozen=True)
class Admitted:
    """The lobby request holds the lock; it got a node, or waits at a queue position."""

    lock: Taken
    node: str | None
    position: int


def _float(h: Mapping[str, str], key: str) -> float:
    raw = h.get(key) or ""
    return float(raw) if raw else 0.0


def _record(h: Mapping[str, str], sessions: int, live: int) -> NodeRecord:
    state = NodeState(h["state"])
    drain = h.get("drain_deadline") or ""
    if drain and state is NodeState.READY:
        state = NodeState.DRAINING
    eta = h.get("eta_ready") or ""
    return NodeRecord(
        id=h["id"], provider=h.get("provider", ""), region=h.get("region", ""),
        model=h.get("model", ""), version=h.get("version", ""), state=state,
        progress=_float(h, "progress"), url=h.get("url", ""),
        capacity=int(h.get("capacity") or 0), sessions=sessions, live=live,
        started_at=_float(h, "started_at"), requested_at=_float(h, "requested_at"),
        deadline=_float(h, "deadline"), last_seen=_float(h, "last_seen"),
        price_per_hour=h.get("price_per_hour") or "0", eta_ready=float(eta) if eta else None,
        drain_deadline=float(drain) if drain else None, retired=bool(h.get("retired")),
        digest=h.get("digest", ""), ready_at=_float(h, "ready_at") or None,
        idle_since=_float(h, "idle_since") or None,
        home=h.get("home") or h.get("region", ""), lost_at=_float(h, "lost_at") or None,
        consolidating=bool(h.get("consolidating")), dropped=int(h.get("dropped") or 0),
        suspect=h.get("suspect") or "", sent_at=_float(h, "sent_at") or None,
        spot=bool(h.get("spot")), drain_reason=h.get("drain_reason") or "",
        interrupt_at=_float(h, "interrupt_at") or None,
        clock_offset_s=_float(h, "clock_off") or 0.0)



# What a node row holds (State.node_rows): the record fields a reader of the whole fleet
# needs, in this order, then slots taken and slots live, joined by the unit separator.
ROW_FIELDS = ("id", "provider", "region", "model", "version", "state", "progress", "url",
              "capacity", "started_at", "requested_at", "deadline", "last_seen",
              "price_per_hour", "eta_ready", "drain_deadline", "retired", "digest",
              "ready_at", "idle_since", "home", "lost_at", "consolidating", "dropped",
              "suspect", "sent_at", "spot", "drain_reason", "interrupt_at")


def row_record(row: str) -> NodeRecord:
    *values, taken, live = row.split("\x1f")
    return _record(dict(zip(ROW_FIELDS, values, strict=True)), int(taken), int(live))
