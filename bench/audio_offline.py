"""Offline audio figures for the stream processor: latency, CPU per chunk, quality.

`offline_figures()` is a plain function (no global side effects) that `bench/audio.py`
imports and extends with WebSocket round-trip figures. Run on its own:

    python bench/audio_offline.py          # human table
    python bench/audio_offline.py --json   # the table, then one JSON object last line

Quality figures are the worst over the shifts -5, +4, +7 semitones at 48 kHz (0 is a
bit-exact bypass), for our streaming shifter and for the naive per-chunk
`librosa.effects.pitch_shift` (the negative control: it clicks at every chunk; its
pitch error is huge because yin locks onto the 50 Hz buzz of the 20 ms chunk clicks).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from worker_node.shifter import Processor

_REPO_ROOT = Path(__file__).resolve().parent.parent

SR_HZ = 48000
CHUNK_MS = 20
CPU_SHIFT = 4.0
CPU_SECONDS = 60.0  # 3000 chunks of 20 ms
SHIFTS = (-5.0, 4.0, 7.0)
TONE_F0_HZ = 150.0
SINE_HZ = 220.0
QUALITY_SECONDS = 1.0
HF_CUTOFF_HZ = 8000.0


def offline_figures() -> dict[str, Any]:
    """Measure the shifter (and the naive control) offline; return a flat dict of figures.

    Keys: algorithmic_latency_ms, measured_latency_ms, cpu_ms_per_chunk_p50/_p99 (wall
    time per 20 ms chunk at 48 kHz, +4 semitones, speech-like input),
    cpu_process_ms_per_chunk_mean (process CPU time), pitch_error_cents, hf_leak_db,
    d2_ratio, rms_dip_db, and the same four with a naive_ prefix.
    """
    # Imported here, not at the top: run as a script, main() first puts the repo root
    # on sys.path; imported by bench/audio.py, this module must have no side effects.
    from worker_node.quality import NaiveChunkShifter, measure_delay_samples
    from worker_node.shifter import PitchShifter, warm_up

    warm_up(SR_HZ)
    chunk = SR_HZ * CHUNK_MS // 1000
    figures: dict[str, Any] = {
        "sample_rate_hz": SR_HZ,
        "chunk_ms": CHUNK_MS,
        "shifts_semitones": list(SHIFTS),
    }

    shifter = PitchShifter(SR_HZ, CPU_SHIFT)
    figures["algorithmic_latency_ms"] = round(shifter.latency_ms, 3)
    delays = [measure_delay_samples(partial(PitchShifter, SR_HZ, st), SR_HZ) for st in SHIFTS]
    worst_delay = max(delays, key=lambda d: abs(d - shifter.latency_samples))
    figures["measured_latency_ms"] = round(1000.0 * worst_delay / SR_HZ, 3)

    figures.update(_cpu_figures(shifter, chunk))
    figures.update(_quality_figures(lambda st: PitchShifter(SR_HZ, st), chunk, prefix=""))

    figures.update(_quality_figures(lambda st: NaiveChunkShifter(SR_HZ, st), chunk, "naive_"))
    return figures


def _cpu_figures(shifter: Processor, chunk: int) -> dict[str, float]:
    """Per-chunk wall time (p50, p99) and mean process CPU time, in ms."""
    from worker_node.quality import chunked, speech_like

    chunks = [c for c in chunked(speech_like(SR_HZ, CPU_SECONDS), [chunk]) if len(c) == chunk]
    wall_s = np.empty(len(chunks))
    cpu_start = time.process_time()
    for i, c in enumerate(chunks):
        start = time.perf_counter()
        shifter.process(c)
        wall_s[i] = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    return {
        "cpu_chunks": len(chunks),
        "cpu_ms_per_chunk_p50": round(1000.0 * float(np.percentile(wall_s, 50)), 4),
        "cpu_ms_per_chunk_p99": round(1000.0 * float(np.percentile(wall_s, 99)), 4),
        "cpu_process_ms_per_chunk_mean": round(1000.0 * cpu_s / len(chunks), 4),
    }


def _quality_figures(
    make: Callable[[float], Processor], chunk: int, prefix: str
) -> dict[str, float]:
    """Worst pitch error, HF leak, d2 ratio and RMS dip over SHIFTS for one processor."""
    from worker_node import quality as q

    pitch: list[float] = []
    leak: list[float] = []
    d2: list[float] = []
    dip: list[float] = []
    tone = q.harmonic_tone(TONE_F0_HZ, SR_HZ, QUALITY_SECONDS)
    sine = q.sine(SINE_HZ, SR_HZ, QUALITY_SECONDS)
    for st in SHIFTS:
        ratio = 2.0 ** (st / 12.0)
        out_tone = q.run_processor(make(st), tone, [chunk])
        pitch.append(q.cents(q.pitch_hz(out_tone, SR_HZ), TONE_F0_HZ * ratio))
        out = q.run_processor(make(st), sine, [chunk])
        leak.append(q.hf_leak_db(out, SR_HZ, cutoff_hz=HF_CUTOFF_HZ))
        d2.append(q.d2_ratio(q.steady(out, SR_HZ), q.reference_sine(out, SR_HZ, SINE_HZ * ratio)))
        dip.append(q.worst_rms_dip_db(out, SR_HZ))
    worst_pitch: float = max(pitch, key=abs)
    return {
        f"{prefix}pitch_error_cents": round(worst_pitch, 2),
        f"{prefix}hf_leak_db": round(max(leak), 2),
        f"{prefix}d2_ratio": round(max(d2), 3),
        f"{prefix}rms_dip_db": round(min(dip), 2),
    }


def _table(figures: dict[str, Any]) -> str:
    rows = [
        ("algorithmic latency (declared)", "algorithmic_latency_ms", "ms", None),
        ("measured latency (worst shift)", "measured_latency_ms", "ms", None),
        ("CPU per 20 ms chunk, p50", "cpu_ms_per_chunk_p50", "ms", None),
        ("CPU per 20 ms chunk, p99", "cpu_ms_per_chunk_p99", "ms", None),
        ("process CPU per chunk, mean", "cpu_process_ms_per_chunk_mean", "ms", None),
        ("pitch error, worst", "pitch_error_cents", "cents", "naive_pitch_error_cents"),
        ("energy above 8 kHz, worst", "hf_leak_db", "dB", "naive_hf_leak_db"),
        ("max |d2| / clean sine, worst", "d2_ratio", "x", "naive_d2_ratio"),
        ("2.5 ms RMS dip, worst", "rms_dip_db", "dB", "naive_rms_dip_db"),
    ]
    lines = [f"{'figure':34} {'shifter':>12} {'naive':>12}  unit"]
    for label, key, unit, naive_key in rows:
        naive = f"{figures[naive_key]:>12}" if naive_key else f"{'':>12}"
        lines.append(f"{label:34} {figures[key]:>12} {naive}  {unit}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="also print one JSON line last")
    args = parser.parse_args(argv)
    if str(_REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(_REPO_ROOT))
    figures = offline_figures()
    print(f"{SR_HZ} Hz, {CHUNK_MS} ms chunks, shifts {list(SHIFTS)} semitones")
    print(_table(figures))
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
