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
from sim.spot import SpotOffer

__all__ = ["SIM_PROVIDERS", "SIM_SPOT", "SPOT_INTERRUPTIONS_PER_HOUR", "SPOT_REFUSAL", "Session",
           "TraceError", "builtin_trace", "bursty_trace", "load_trace", "sim_config",
           "write_trace"]


# The local driver boots in 1 s, which would hide what an autoscaler is for: by default
# the default regions run on cloud-like providers instead, one of them billing whole hours.
SIM_PROVIDERS = (
    Provider("cloud-minute", Decimal("1.10"), billing_increment_s=60, boot_s=90.0),
    Provider("cloud-hour", Decimal("0.90"), billing_increment_s=3600, boot_s=120.0),
)
SIM_REGION_PROVIDER = {"ap-northeast": "cloud-hour"}   # every other region: cloud-minute
# Spot offers of the simulated providers (`voicectl simulate --spot`, `sim.spot`): 35 % of
# the on-demand price; interruptions per node-hour (an assumption, not a measurement: about
# one node in twenty is taken back within its first hour) and the share of spot requests
# refused for want of spot capacity (booted on-demand instead).
SPOT_INTERRUPTIONS_PER_HOUR = 0.05
SPOT_REFUSAL = 0.1
SIM_SPOT = {p.name: SpotOffer(p.price_per_hour * Decimal("0.35"), SPOT_INTERRUPTIONS_PER_HOUR,
                              SPOT_REFUSAL) for p in SIM_PROVIDERS}
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
# Bursty trace (issue 11): 10-minute bursts at 4x the rate, lognormal sessions with a
# 6-minute median capped at 3 h, Zipf model popularity, regional evening peaks.
BURST_S = 600.0
BURST_FACTOR = 4.0
BURSTS_PER_REGION_DAY = 8.0
BURSTY_MEDIAN_SESSION_S = 360.0
BURSTY_SESSION_SIGMA = 1.0
BURSTY_MAX_SESSION_S = 3 * 3600.0
ZIPF_S = 1.1
PEAK_BASE_SHARE = 0.6      # a region peaks at this share of its part of peak_sessions, bursts aside
# `bursty_trace(spread=True)`: users at the world's big cities instead of around the
# regions (lat, lon, metro population in millions), each city with its own evening peak and
# bursts; every city's users wait in the queue of the nearest region.
WORLD_CITIES = (
    (35.7, 139.7, 37), (28.6, 77.2, 32), (31.2, 121.5, 28), (-23.5, -46.6, 22),
    (19.4, -99.1, 22), (30.0, 31.2, 21), (19.1, 72.9, 21), (39.9, 116.4, 21),
    (23.8, 90.4, 22), (34.7, 135.5, 19), (40.7, -74.0, 19), (24.9, 67.0, 17),
    (-34.6, -58.4, 15), (41.0, 29.0, 15), (6.5, 3.4, 15), (14.6, 121.0, 14),
    (-22.9, -43.2, 13), (34.1, -118.2, 12), (55.8, 37.6, 12), (48.9, 2.35, 11),
    (-6.2, 106.8, 11), (13.8, 100.5, 11), (37.6, 127.0, 10), (51.5, -0.1, 9),
    (-12.0, -77.0, 11), (41.9, -87.6, 9), (-33.9, 151.2, 5), (-26.2, 28.0, 6),
    (43.7, -79.4, 6), (37.8, -122.4, 5), (52.5, 13.4, 4), (40.4, -3.7, 6),
)


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


def bursty_trace(config: Config, hours: float = 24.0, seed: int = 0,
                 peak_sessions: float = 600.0, spread: bool = False) -> list[Session]:
    """A bursty, heavy-tailed day over the config's regions and models, deterministic per seed.

    Each region's base concurrency follows its own evening peak (local time, shifted by up
    to two hours) and share of `peak_sessions`; bursts start at random (Poisson,
    BURSTS_PER_REGION_DAY per region) and multiply a region's arrival rate by BURST_FACTOR
    for BURST_S. Models are picked by Zipf popularity (exponent ZIPF_S, in config order);
    sessions are lognormal (median BURSTY_MEDIAN_SESSION_S, capped); users scatter around
    their region. Like the built-in day it starts WARMUP_S early, unmeasured. With `spread`,
    the places are WORLD_CITIES (shares by population) instead of the regions.
    """
    rng = np.random.default_rng(seed)
    models = [m.name for m in config.models]
    popularity = 1.0 / np.arange(1, len(models) + 1) ** ZIPF_S
    popularity /= popularity.sum()
    places = [(r.lat, r.lon) for r in config.regions]
    weights = 1.0 + rng.random(len(config.regions))
    if spread:
        places = [(lat, lon) for lat, lon, _ in WORLD_CITIES]
        weights = np.array([float(w) for _, _, w in WORLD_CITIES])
    weights /= weights.sum()
    mean_s = BURSTY_MEDIAN_SESSION_S * math.exp(BURSTY_SESSION_SIGMA ** 2 / 2)
    bins = np.arange(-WARMUP_S, hours * 3600.0, 60.0)
    out: list[Session] = []
    for (lat, lon), weight in zip(places, weights, strict=True):
        peak_h = PEAK_LOCAL_HOUR + rng.uniform(-2.0, 2.0)
        local_h = ((bins + 30.0) / 3600.0 + lon / 15.0) % 24.0
        shape = TROUGH_SHARE + (1 - TROUGH_SHARE) * (
            1 + np.cos(2 * np.pi * (local_h - peak_h) / 24.0)) / 2
        factor = np.ones_like(bins)
        span = hours * 3600.0 + WARMUP_S
        for start in rng.uniform(-WARMUP_S, hours * 3600.0,
                                 rng.poisson(BURSTS_PER_REGION_DAY * span / 86400.0)):
            factor[(bins >= start) & (bins < start + BURST_S)] = BURST_FACTOR
        rate_per_min = peak_sessions * weight * PEAK_BASE_SHARE * shape * factor \
            * 60.0 / mean_s
        counts = rng.poisson(rate_per_min)
        total = int(counts.sum())
        arrivals = np.repeat(bins, counts) + rng.random(total) * 60.0
        durations = np.minimum(rng.lognormal(math.log(BURSTY_MEDIAN_SESSION_S),
                                             BURSTY_SESSION_SIGMA, total), BURSTY_MAX_SESSION_S)
        picks = rng.choice(len(models), size=total, p=popularity)
        lats = np.clip(lat + rng.normal(0, USER_SPREAD_DEG[0], total), -89.0, 89.0)
        lons = lon + rng.normal(0, USER_SPREAD_DEG[1], total)
        if spread:   # Sydney's neighbours, or Tokyo's, may cross the antimeridian
            lons = (lons + 180.0) % 360.0 - 180.0
        out.extend(Session(float(a), float(max(d, 1.0)), models[m], float(la), float(lo))
                   for a, d, m, la, lo in zip(arrivals, durations, picks, lats, lons,
                                              strict=True))
    out.sort(key=lambda s: (s.arrival_s, s.model, s.lat, s.lon))
    return out


def write_trace(sessions: list[Session], path: Path) -> None:
    """Write sessions as a trace CSV (arrival_s, duration_s, model, lat, lon) that
    `load_trace` reads back; arrivals before 0 (the warm-up) are left out."""
    try:
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["arrival_s", "duration_s", "model", "lat", "lon"])
            w.writerows([f"{s.arrival_s:.3f}", f"{s.duration_s:.3f}", s.model, f"{s.lat:.4f}",
                         f"{s.lon:.4f}"] for s in sessions if s.arrival_s >= 0)
    except OSError as e:
        raise TraceError(f"cannot write trace {str(path)!r}: {e}; pass a writable path") from None
