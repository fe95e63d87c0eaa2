"""Parse and validate what a browser sends the lobby and the API; errors say what to fix."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

from common.config import NAME_RE, Config
from common.errors import IdentityError, VoiceError
from common.identity import COOKIE, Identity, identify

USER_RE = NAME_RE   # user ids, session ids: the names of the whole system
MAX_RTTS, MAX_RTT_MS = 64, 10_000.0   # a measured round trip per region, at most


class Refused(VoiceError):
    """The webapp cannot serve a request; `code` is the error code the client is told."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class BadRequest(Refused):
    """The request is malformed (code `bad_request` unless given); the message says why."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(code, message)


@dataclass(frozen=True)
class LobbyRequest:
    user: str
    model: str
    lat: float
    lon: float
    region: str | None        # the user named a region: only that one is considered
    resume: str | None
    takeover: bool
    scales: bool = True       # waiting counts as demand the autoscaler boots nodes for
    rtts: Mapping[str, float] = field(default_factory=dict)   # region -> ms the page timed


def parse_user(args: Mapping[str, str], cookies: Mapping[str, str], cfg: Config,
               now: float | None = None, *, named: bool = True) -> Identity:
    """Who the request is (common.identity.identify): `?token=`, the uid cookie, or `?user=`
    when `named` (where `?user=` names someone else, /api/usage, pass False). `now`: the
    wall clock unless given."""
    try:
        return identify(token=args.get("token") or None, cookie=cookies.get(COOKIE) or None,
                        named=(args.get("user") or None) if named else None, cfg=cfg,
                        now=time.time() if now is None else now)
    except IdentityError as e:
        raise BadRequest(str(e)) from None


def _coord(args: Mapping[str, str], key: str, limit: float) -> float:
    raw = args.get(key, "")
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{key}={raw[:40]!r} is not a number; give {key} in degrees") from None
    if not -limit <= value <= limit:
        raise BadRequest(f"{key}={value} is out of range -{limit}..{limit}")
    return value


def parse_lobby(args: Mapping[str, str], cookies: Mapping[str, str],
                cfg: Config, now: float | None = None) -> LobbyRequest:
    who = parse_user(args, cookies, cfg, now)
    name = args.get("model", "")
    if not name:
        raise BadRequest(f"no model: pass ?model=NAME, one of {[m.name for m in cfg.models]}")
    if not USER_RE.match(name):
        raise BadRequest(f"model {name[:64]!r} is not a model name", code="unknown_model")
    region_name = args.get("region") or None
    if region_name is not None:
        region = cfg.region(region_name)
        if region is None:
            raise BadRequest(f"unknown region {region_name[:64]!r}; available: "
                             f"{', '.join(r.name for r in cfg.regions)}")
        lat, lon = region.lat, region.lon
    elif "lat" in args or "lon" in args:
        lat, lon = _coord(args, "lat", 90.0), _coord(args, "lon", 180.0)
    else:
        raise BadRequest("no location: pass ?region=NAME or ?lat=..&lon=..")
    resume = args.get("resume") or None
    if resume is not None and not USER_RE.match(resume):
        raise BadRequest(f"resume={resume[:64]!r} is not a session id")
    takeover = args.get("takeover", "") in ("1", "true", "yes")
    return LobbyRequest(who.user, name, lat, lon, region_name, resume, takeover,
                        scales=who.scales(cfg), rtts=_rtts(args.get("rtt", ""), cfg))


def _rtts(raw: str, cfg: Config) -> dict[str, float]:
    """`?rtt=us-west:23.5,us-east:81`: the round trips (ms) the page timed to each region's
    beacon; placement prefers them to the estimate from lat/lon."""
    out: dict[str, float] = {}
    for item in filter(None, raw.split(",")[:MAX_RTTS + 1]):
        name, _, ms = item.partition(":")
        try:
            value = float(ms)
        except ValueError:
            value = math.nan
        if cfg.region(name) is None or not 0.0 <= value <= MAX_RTT_MS or len(out) == MAX_RTTS:
            raise BadRequest(f"rtt item {item[:60]!r} is not REGION:MS for a known region and "
                             f"0-{MAX_RTT_MS:.0f} ms; send rtt=us-west:23.5,us-east:81 (at "
                             f"most {MAX_RTTS}) or leave it out")
        out[name] = value
    return out


def check_origin(origin: str | None, host_url: str, cfg: Config) -> None:
    """A browser's lobby from another site is refused: the page that opens /ws/session
    must be ours (the public URL's origin, or the host it connected to). Clients that are
    not browsers send no Origin and are judged by who they are, like any other."""
    if origin is None:
        return
    allowed = {f"{u.scheme}://{u.netloc}" for u in map(urlsplit, (cfg.public_url, host_url))}
    if origin.rstrip("/") not in allowed:
        raise BadRequest(f"origin {origin[:100]!r} may not open the lobby; open the page at "
                         f"{cfg.public_url} (pages on other sites cannot start sessions)")


def parse_since(raw: str | None) -> datetime | None:
    """An ISO-8601 date or time (UTC); returns a naive UTC datetime."""
    if not raw:
        return None
    try:
        t = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t
    except (ValueError, OverflowError):   # OverflowError: in UTC, before year 1 or after 9999
        raise BadRequest(f"since={raw[:40]!r} is not an ISO-8601 date such as 2026-11-27 or "
                         "2026-11-27T10:00:00Z") from None
