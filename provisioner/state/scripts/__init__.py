"""The Lua scripts, one `.lua` file each beside this loader (dramatiq keeps its Lua this way).

Anything that must be atomic is one script; every key it touches is in KEYS, and each file's
header says what KEYS and ARGV hold. Shared Lua functions live in `fn_<name>.lua` (one
`local function <name>` each). A file whose first line is `-- requires: a, b` gets
`fn_a.lua` and `fn_b.lua` put in front of it, each once and its own requirements first:
Redis runs a script as one chunk, so composing by text is how scripts share functions.

    fn_has_room                     a node can take a session
    fn_assign    requires has_room  hand waiting sessions to candidates with room
    fn_take_lock                    the user's single-stream lock
    fn_arrive                       a pool's arrival-rate EWMA
    assign       requires assign         admit  requires assign, take_lock, arrive
    take_lock    requires take_lock      arrive requires arrive

The constants below are the composed sources, built once at import (a missing file fails
then, not at the first call); `State` registers each with redis.
"""

from __future__ import annotations

from importlib import resources

_REQUIRES = "-- requires:"


def _read(filename: str) -> str:
    return resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")


def _requires(text: str) -> list[str]:
    """The function names on a `-- requires: a, b` first line (none without one)."""
    first = text.split("\n", 1)[0]
    if not first.startswith(_REQUIRES):
        return []
    return [name.strip() for name in first[len(_REQUIRES):].split(",") if name.strip()]


def compose(name: str) -> str:
    """The source of `name`.lua behind the shared functions it requires, dependencies first."""
    parts: list[str] = []
    seen: set[str] = set()

    def include(fn: str) -> None:
        if fn in seen:
            return
        seen.add(fn)
        text = _read(f"fn_{fn}.lua")
        for dep in _requires(text):
            include(dep)
        parts.append(text)

    text = _read(f"{name}.lua")
    for dep in _requires(text):
        include(dep)
    return "".join(parts) + text


ASSIGN = compose("assign")
TAKE_LOCK = compose("take_lock")
ARRIVE = compose("arrive")
ADMIT = compose("admit")
REFRESH_LOCKS = compose("refresh_locks")
SYNC_LIVE = compose("sync_live")
ABANDON = compose("abandon")
TAKE_ASSIGNMENTS = compose("take_assignments")
LAND = compose("land")
RELEASE_LOCK = compose("release_lock")
REPORT_USAGE = compose("report_usage")
SETTLE_USAGE = compose("settle_usage")
RETIRE = compose("retire")
CAS = compose("cas")
HEALTH = compose("health")
BEAT = compose("beat")
FLEET = compose("fleet")
RENEW = compose("renew")
REPORT_LOST = compose("report_lost")
MOVE_WAITING = compose("move_waiting")
WAITING = compose("waiting")
ATTEMPT = compose("attempt")
SAVE_SESSION = compose("save_session")
