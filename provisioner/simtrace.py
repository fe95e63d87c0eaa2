"""Simulator inputs: the built-in diurnal trace, trace CSVs, and the simulated fleet config.

A trace is a list of `Session`s sorted by arrival. The CSV format (docs/protocol.md) has
a header and one session per row: `arrival_s`, `duration_s`, `model`, and either
`region` (the user sits at the region) or `lat` and `lon`; rows may come in any order,
and a row that names a region as well as lat/lon goes by the region.
"""

from __future__ import annotations

import csv
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

import numpy as np

from common.config import DEFAULT_CONFIG_PATH, Config, Provider, parse_config
from common.errors import ConfigError, VoiceError

__all__ = ["SIM_PROVIDERS", "Session", "TraceError", "builtin_trace", "load_trace",
           "sim_config"]


# The local driver boots in 1 s, which would hide what an autoscaler is for: by default
# the default regions run on cloud-like providers instead, one of them billing whole hours.
SIM_PROVIDERS = (
    Provider("cloud-minute", Decimal("1.10"), billing_increment_s=60, boot_s=90.0),
    Provider("cloud-hour", Decimal("0.90"), billing_increment_s=3600, boot_s=120.0),
)
SIM_REGION_PROVIDER = {"ap-northeast": "cloud-hour"}   # every other region: cloud-minute
# Built-in trace: evening peak in each region's local time (longitude / 15 h), a trough
# at TROUGH_SHARE of the peak; lognormal sessions with mean MEAN_SESSION_S.
REGION_PEAK_SESSIONS = {"us-west": 90, "us-east": 120, "eu-west": 110, "ap-northeast": 100}
DEFAULT_PEAK_SESSIONS = 100
PEAK_LOCAL_HOUR = 21.0
TROUGH_SHARE = 0.15
MODEL_SHARES = (0.6, 0.4)
MEAN_SESSION_S = 600.0
SESSION_SIGMA = 0.9
MAX_SESSION_S = 4 * 3600.0
WARMUP_S = 3600.0           # the built-in day starts an hour early, unmeasured: a warm fleet
USER_SPREAD_DEG = (2.0, 3.0)  # users scatter this much (lat, lon) around their region


class TraceError(VoiceError):
    """A trace CSV is unreadable or a row is malformed; the message names file and line."""


@dataclass(frozen=True, slots=True)
class Session:
    arrival_s: float
    duration_s: float
    model: str
    lat: float
    lon: float


def sim_config(path: Path | None = None) -> Config:
    """The config a simulation runs on: `path` as is, or default.toml on cloud-like providers."""
    if path is not None:
        try:
            return parse_config(tomllib.loads(path.read_text()), str(path))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config {str(path)!r}: {e}") from None
    cfg = parse_config(tomllib.loads(DEFAULT_CONFIG_PATH.read_text()), str(DEFAULT_CONFIG_PATH))
    regions = tuple(replace(r, provider=SIM_REGION_PROVIDER.get(r.name, "cloud-minute"))
                    for r in cfg.regions)
    return replace(cfg, providers=SIM_PROVIDERS, regions=regions)


def builtin_trace(config: Config, hours: float = 24.0, seed: int = 0) -> list[Session]:
    """A diurnal day over the config's regions and first two models, deterministic per seed.

    Arrivals are Poisson per minute at rate concurrency(t) / MEAN_SESSION_S, where each
    region's concurrency follows a cosine peaking at PEAK_LOCAL_HOUR local time. Sessions
    start from -WARMUP_S so the measured window [0, hours) opens on a warm fleet.
    """
    rng = np.random.default_rng(seed)
    models = [m.name for m in config.models[:len(MODEL_SHARES)]]
    shares = MODEL_SHARES[:len(models)]
    bins = np.arange(-WARMUP_S, hours * 3600.0, 60.0)
    mu = math.log(MEAN_SESSION_S) - SESSION_SIGMA ** 2 / 2
    out: list[Session] = []
    for region in config.regions:
        local_h = ((bins + 30.0) / 3600.0 + region.lon / 15.0) % 24.0
        shape = TROUGH_SHARE + (1 - TROUGH_SHARE) * (
            1 + np.cos(2 * np.pi * (local_h - PEAK_LOCAL_HOUR) / 24.0)) / 2
        concurrency = REGION_PEAK_SESSIONS.get(region.name, DEFAULT_PEAK_SESSIONS) * shape
        for model, share in zip(models, shares, strict=True):
            counts = rng.poisson(concurrency * share / sum(shares) * 60.0 / MEAN_SESSION_S)
            total = int(counts.sum())
            arrivals = np.repeat(bins, counts) + rng.random(total) * 60.0
            durations = np.clip(rng.lognormal(mu, SESSION_SIGMA, total), 5.0, MAX_SESSION_S)
            lats = np.clip(region.lat + rng.normal(0, USER_SPREAD_DEG[0], total), -89.0, 89.0)
            lons = region.lon + rng.normal(0, USER_SPREAD_DEG[1], total)
            out.extend(Session(float(a), float(d), model, float(la), float(lo))
                       for a, d, la, lo in zip(arrivals, durations, lats, lons, strict=True))
    out.sort(key=lambda s: (s.arrival_s, s.model, s.lat, s.lon))
    return out


def load_trace(path: Path, config: Config) -> list[Session]:
    """Sessions from a CSV: arrival_s, duration_s, model, and region or lat and lon."""
    def number(row: Mapping[str, str | None], col: str, line: int, lo: float, hi: float,
               what: str) -> float:
        raw = (row.get(col) or "").strip()
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (lo <= value <= hi) or (col == "duration_s" and value <= 0):
            raise TraceError(f"{path}:{line}: {col}={raw!r} is not {what}; fix or drop the row")
        return value

    regions = {r.name: r for r in config.regions}
    models = {m.name for m in config.models}
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            cols = set(reader.fieldnames or ())
            if not {"arrival_s", "duration_s", "model"} <= cols or not (
                    "region" in cols or {"lat", "lon"} <= cols):
                raise TraceError(
                    f"{path}:1: header {sorted(cols)} lacks columns; expected arrival_s, "
                    "duration_s, model, and region or lat and lon")
            sessions: list[Session] = []
            for row in reader:
                line = reader.line_num
                arrival = number(row, "arrival_s", line, 0.0, 1e9, "seconds >= 0")
                duration = number(row, "duration_s", line, 0.0, 1e7, "seconds > 0")
                model = (row.get("model") or "").strip()
                if model not in models:
                    raise TraceError(f"{path}:{line}: model={model!r} is not configured; "
                                     f"known models: {sorted(models)}")
                region_name = (row.get("region") or "").strip()
                if region_name:
                    region = regions.get(region_name)
                    if region is None:
                        raise TraceError(f"{path}:{line}: region={region_name!r} is unknown; "
                                         f"known regions: {sorted(regions)}")
                    lat, lon = region.lat, region.lon
                elif (row.get("lat") or "").strip() or (row.get("lon") or "").strip():
                    lat = number(row, "lat", line, -90.0, 90.0, "a latitude in -90..90")
                    lon = number(row, "lon", line, -180.0, 180.0, "a longitude in -180..180")
                else:
                    raise TraceError(f"{path}:{line}: no region and no lat/lon; give one")
                sessions.append(Session(arrival, duration, model, lat, lon))
    except OSError as e:
        raise TraceError(f"cannot read trace {str(path)!r}: {e}") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: not a readable CSV: {e}") from None
    if not sessions:
        raise TraceError(f"{path}: no sessions; expected a header and one row per session")
    sessions.sort(key=lambda s: (s.arrival_s, s.model, s.lat, s.lon))
    return sessions
