"""How each stream keeps up: frames in and out, the frame it owes, and how late its answers
go out, including the time a frame waited unread (a loop too slow to keep up never sees
that otherwise). A real-time client's frames arrive one frame's audio apart: how far the
reads run behind that clock, beyond the least they did over the last LAG_WINDOW_S, is
that wait; a read that had to wait for its frame is on time (a client's pause or jitter is
not the node's)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

LAG_WINDOW_S, MIN_LAGS = 3.0, 25   # lateness is judged over this many recent answers
IDLE_READ_S = 0.002   # a read that waited this long found no frame queued: it came on time


@dataclass(eq=False)
class Pace:
    """One stream's. `read` when a frame is read, `answered` when its answer went out."""

    frames_in: int = 0
    frames_out: int = 0
    owed_since: float | None = None   # monotonic: the frame read and not answered yet
    audio_s: float = 0.0              # audio read before this frame
    behind: deque[tuple[float, float]] = field(default_factory=deque)   # (read, offset)
    waited: float = 0.0               # the frame owed waited this long unread

    def read(self, now: float, frame_s: float, idle_s: float) -> None:
        """A frame of `frame_s` audio read at `now`, after waiting `idle_s` for it."""
        self.frames_in += 1
        self.owed_since = now
        offset = now - self.audio_s
        self.audio_s += frame_s
        if idle_s > IDLE_READ_S:
            self.behind.clear()
        self.behind.append((now, offset))
        while self.behind[0][0] < now - LAG_WINDOW_S:
            self.behind.popleft()
        self.waited = offset - min(o for _, o in self.behind)

    def answered(self, now: float) -> float:
        """Its answer went out at `now`: how late (seconds since it came)."""
        assert self.owed_since is not None
        late = now - self.owed_since + self.waited
        self.frames_out += 1
        self.owed_since = None
        return late

    def row(self, session: str, now: float) -> list[object]:
        """[session, frames in, frames out, how long the frame owed has waited]."""
        owed = 0.0 if self.owed_since is None else round(now - self.owed_since, 3)
        return [session, self.frames_in, self.frames_out, owed]


def p95_ms(lags: deque[tuple[float, float]], now: float) -> float | None:
    """The 95th percentile of the (answered at, lateness) of the last LAG_WINDOW_S, in ms;
    None with too few answers to say."""
    recent = [late for at, late in list(lags) if at > now - LAG_WINDOW_S]
    return round(1000 * float(np.percentile(recent, 95)), 1) if len(recent) >= MIN_LAGS else None
