"""What the lobby tells a user beside their place: a region down near them, a provider
out of capacity, and whether capacity boots for them at all."""

from __future__ import annotations

from common.config import Config
from provisioner.placement import boot_regions, home_region, rank_regions
from webapp.fleetview import FleetView
from webapp.requests import LobbyRequest


def waiting(cfg: Config, req: LobbyRequest, home: str, view: FleetView) -> dict[str, str]:
    """What a waiting user should know: outages and refusals near them, and whether
    capacity boots for them at all."""
    notes = [n for n in (region_down(cfg, req, home, view.down),
                         capacity_refused(cfg, home, view.constrained),
                         None if req.scales else ANONYMOUS_NOTE) if n]
    return {"note": " ".join(notes)} if notes else {}


ANONYMOUS_NOTE = ("no capacity is booted for anonymous users: you keep your place and get "
                  "the first slot that frees up; sign in (open the page through your login, "
                  "or pass ?token= from your login system) to have a node started for you")


def region_down(cfg: Config, req: LobbyRequest, home: str, down: frozenset[str]) -> str | None:
    """Tell the user when the region nearest them, or the one they named, is down."""
    if req.region is not None:
        if req.region not in down:
            return None
        others = [f"{r.name} ({rtt:.0f} ms)"
                  for r, rtt in rank_regions(cfg.regions, req.lat, req.lon, measured=req.rtts)
                  if r.name not in down]
        return (f"region {req.region} is down (an outage): you keep your place and get a node "
                "there when it recovers" + (f"; or leave and choose another region: "
                                            f"{', '.join(others[:3])}" if others else ""))
    nearest = home_region(cfg, req.lat, req.lon, measured=req.rtts)
    region = cfg.region(home)
    if nearest.name not in down or nearest.name == home or region is None:
        return None
    rtt = rank_regions([region], req.lat, req.lon, measured=req.rtts)[0][1]
    return (f"region {nearest.name} is down (an outage): you are placed in {home} instead, "
            f"about {rtt:.0f} ms away")


def capacity_refused(cfg: Config, home: str, constrained: dict[str, str]) -> str | None:
    """Tell waiting users when a provider near them refused to boot nodes."""
    region = cfg.region(home)
    if region is None or not constrained:
        return None
    near = [r for r, _ in rank_regions(cfg.regions, region.lat, region.lon)
            if r.name in constrained]
    if not near:
        return None
    names = ", ".join(r.name for r in near[:3])
    if not boot_regions(cfg, home, frozenset(constrained)):
        return (f"out of GPU capacity in {names}, and no other region within reach can boot "
                "one: you keep your place and get the first slot that frees up")
    return (f"out of GPU capacity in {names}: booting in the next cheapest region within "
            "reach, which may take longer")
