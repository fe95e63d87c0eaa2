"""Robot voice: a short metallic comb, then ring modulation by a low carrier.

    y[n] = (x[n] + g x[n - D]) / sqrt(1 + g^2) * ((1 - mix) + mix cos(omega n))

The comb (delay D = comb_ms) adds resonances every 1000 / comb_ms Hz, the tin-can ring; the
carrier (omega = 2 pi carrier_hz / rate) turns every harmonic f into f +- carrier_hz, the
inharmonic buzz of a robot. Nothing looks ahead, so latency_samples = 0 is honest. The
carrier's phase is computed from the count of samples seen, never accumulated, so any
chunking gives the same samples.

`process_batch` is the pattern for a batched (GPU) model: one frame of every stream
concatenated, each stream's constants spread to one value per sample (np.repeat), the
arithmetic done once over them all, split back. Per sample it runs the same float operations
as `process`, so its outputs equal per-stream calls for any mix of frame lengths and rates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class Robot:
    """One stream's processor."""

    latency_samples = 0                      # causal: output n depends on inputs up to n

    def __init__(self, sample_rate: int, carrier_hz: float, mix: float, comb_ms: float,
                 comb_gain: float) -> None:
        self.omega = 2 * np.pi * carrier_hz / sample_rate      # carrier radians per sample
        self.mix = mix
        # divided by sqrt(1 + g^2), not 1 + g: speech keeps its loudness; rare peaks clip
        self.direct, self.echo = 1 / np.hypot(1, comb_gain), comb_gain / np.hypot(1, comb_gain)
        self.n = 0                                              # samples seen: the phase
        self.history = np.zeros(max(1, round(sample_rate * comb_ms / 1000)))  # last D inputs

    def process(self, frames: np.ndarray) -> np.ndarray:
        d = len(self.history)
        x = np.concatenate([self.history, frames])
        comb = self.direct * x[d:] + self.echo * x[:-d]
        carrier = np.cos(self.omega * np.arange(self.n, self.n + len(frames)))
        self.history, self.n = x[-d:], self.n + len(frames)
        return _int16(comb * ((1 - self.mix) + self.mix * carrier))


def make(sample_rate: int, params: dict[str, Any], files: Path) -> Robot:
    """The package's entry: one processor per stream, configured by model.toml's [params]."""
    return Robot(sample_rate, float(params.get("carrier_hz", 60.0)),
                 float(params.get("mix", 0.8)), float(params.get("comb_ms", 4.0)),
                 float(params.get("comb_gain", 0.6)))


def process_batch(procs: list[Robot], frames: list[np.ndarray]) -> list[np.ndarray]:
    """One frame of each stream in one pass: what `[p.process(f) for ...]` returns."""
    if not procs:
        return []
    lens = [len(f) for f in frames]
    starts = np.cumsum(lens) - lens          # where each stream's frame begins in the output
    # x holds each stream's history then its frame; stream i's part begins at x[at[i]]
    x = np.concatenate([a for p, f in zip(procs, frames, strict=True) for a in (p.history, f)])
    sizes = [len(p.history) + m for p, m in zip(procs, lens, strict=True)]
    at = (np.cumsum(sizes) - sizes).tolist()
    now = np.concatenate(frames)                                        # x[n]
    delayed = np.concatenate([x[a:a + m] for a, m in zip(at, lens, strict=True)])    # x[n - D]
    # per-stream constants spread to one value per sample; n: each stream's own sample count
    consts = [[p.omega, p.mix, p.direct, p.echo] for p in procs]
    omega, mix, direct, echo = np.repeat(np.transpose(consts), lens, axis=1)
    n = np.arange(len(now)) + np.repeat([p.n for p in procs] - starts, lens)
    comb = direct * now + echo * delayed
    out = _int16(comb * ((1 - mix) + mix * np.cos(omega * n)))
    for p, a, m in zip(procs, at, lens, strict=True):
        p.history, p.n = x[a + m:a + m + len(p.history)], p.n + m
    return np.split(out, starts[1:])


def _int16(y: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.clip(np.rint(y), -32768, 32767).astype(np.int16)
    return out
