"""Offline audio figures for the stream processor: latency, CPU per chunk, quality, speech.

`offline_figures()` is a plain function (no global side effects unless given paths)
that `bench/audio.py` imports and extends with WebSocket round-trip figures. Run on its
own it also draws docs/voicing-vs-latency.png and writes docs/samples/*.wav:

    python bench/audio_offline.py          # human table
    python bench/audio_offline.py --json   # the table, then one JSON object last line

Tone figures are the worst over the shifts -5, +4, +7 semitones at 48 kHz (0 is a
bit-exact bypass), for the node's streaming shifter and for the naive per-chunk
`librosa.effects.pitch_shift` (the negative control: it clicks at every chunk; its
pitch error is huge because yin locks onto the 50 Hz buzz of the 20 ms chunk clicks).
CPU per 20 ms chunk is measured for our shifter, the old phase vocoder and the naive
per-chunk librosa call on the same chunks, interleaved chunk by chunk in one run.
Speech figures (bench/audio_speech.py): voicing kept and frame-wise shift on espeak-ng
voices, beside librosa's offline pitch_shift on the same speech.
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
    from worker_node.package import Processor

_REPO_ROOT = Path(__file__).resolve().parent.parent
CHART_PATH = _REPO_ROOT / "docs" / "voicing-vs-latency.png"
SAMPLES_DIR = _REPO_ROOT / "docs" / "samples"

SR_HZ = 48000
CHUNK_MS = 20
CPU_SHIFT = 4.0
CPU_SECONDS = 60.0  # 3000 chunks of 20 ms
SHIFTS = (-5.0, 4.0, 7.0)
TONE_F0_HZ = 150.0
SINE_HZ = 220.0
QUALITY_SECONDS = 1.0
HF_CUTOFF_HZ = 8000.0


def offline_figures(chart: Path | None = None, samples: Path | None = None) -> dict[str, Any]:
    """Measure the shifter (and the naive control) offline; return a flat dict of figures.

    Keys: algorithmic_latency_ms (the declared mean delay), max_latency_ms (the most any
    output sample is delayed), measured_latency_ms, cpu_ms_per_chunk_p50/_p99 (wall time
    per 20 ms chunk at 48 kHz, +4 semitones, speech-like input), the same with vocoder_
    and librosa_ prefixes (the 20 ms phase vocoder; per-chunk librosa pitch_shift, on the
    same chunks), cpu_of_librosa (our p50 over librosa's), cpu_process_ms_per_chunk_mean
    (process CPU time), pitch_error_cents, hf_leak_db, d2_ratio, rms_dip_db, the same four
    with a naive_ prefix, and the speech figures of `audio_speech.speech_figures` (chart
    and samples written only when their paths are given).
    """
    # Imported here, not at the top: run as a script, main() first puts the repo root
    # on sys.path; imported by bench/audio.py, this module must have no side effects.
    from audio_speech import speech_figures

    from research.quality import NaiveChunkShifter, measure_delay_samples
    from worker_node.splice import SpliceShifter as PitchShifter

    chunk = SR_HZ * CHUNK_MS // 1000
    figures: dict[str, Any] = {
        "sample_rate_hz": SR_HZ,
        "chunk_ms": CHUNK_MS,
        "shifts_semitones": list(SHIFTS),
    }

    shifter = PitchShifter(SR_HZ, CPU_SHIFT)
    figures["algorithmic_latency_ms"] = round(shifter.latency_ms, 3)
    figures["max_latency_ms"] = round(shifter.max_latency_ms, 3)
    delays = [measure_delay_samples(partial(PitchShifter, SR_HZ, st), SR_HZ) for st in SHIFTS]
    worst_delay = max(delays, key=lambda d: abs(d - shifter.latency_samples))
    figures["measured_latency_ms"] = round(1000.0 * worst_delay / SR_HZ, 3)

    figures.update(_cpu_figures(shifter, chunk))
    figures.update(_quality_figures(lambda st: PitchShifter(SR_HZ, st), chunk, prefix=""))

    figures.update(_quality_figures(lambda st: NaiveChunkShifter(SR_HZ, st), chunk, "naive_"))
    figures.update(speech_figures(SHIFTS, chart=chart, samples=samples))
    return figures


def _cpu_figures(shifter: Processor, chunk: int) -> dict[str, float]:
    """Per-chunk wall time (p50, p99) and mean process CPU time, in ms, side by side.

    Our shifter, the 20 ms phase vocoder and per-chunk librosa pitch_shift each process
    every chunk in turn, so all three see the same machine load (timings on a shared
    machine vary 2-4x between runs: compare within one run).
    """
    from research.quality import NaiveChunkShifter, chunked, speech_like
    from research.vocoder import PhaseVocoderShifter

    chunks = [c for c in chunked(speech_like(SR_HZ, CPU_SECONDS), [chunk]) if len(c) == chunk]
    processors: dict[str, Processor] = {
        "": shifter,
        "vocoder_": PhaseVocoderShifter(SR_HZ, CPU_SHIFT),
        "librosa_": NaiveChunkShifter(SR_HZ, CPU_SHIFT),
    }
    processors["librosa_"].process(chunks[0])  # librosa's first call costs about 1.3 s
    wall_s = {p: np.empty(len(chunks)) for p in processors}
    cpu_s = dict.fromkeys(processors, 0.0)
    for i, c in enumerate(chunks):
        for prefix, processor in processors.items():
            cpu_start = time.process_time()
            start = time.perf_counter()
            processor.process(c)
            wall_s[prefix][i] = time.perf_counter() - start
            cpu_s[prefix] += time.process_time() - cpu_start
    figures: dict[str, float] = {"cpu_chunks": len(chunks)}
    for prefix in processors:
        figures[f"{prefix}cpu_ms_per_chunk_p50"] = round(
            1000.0 * float(np.percentile(wall_s[prefix], 50)), 4
        )
        figures[f"{prefix}cpu_ms_per_chunk_p99"] = round(
            1000.0 * float(np.percentile(wall_s[prefix], 99)), 4
        )
        figures[f"{prefix}cpu_process_ms_per_chunk_mean"] = round(
            1000.0 * cpu_s[prefix] / len(chunks), 4
        )
    figures["cpu_of_librosa"] = round(
        figures["cpu_ms_per_chunk_p50"] / figures["librosa_cpu_ms_per_chunk_p50"], 3
    )
    return figures


def _quality_figures(
    make: Callable[[float], Processor], chunk: int, prefix: str
) -> dict[str, float]:
    """Worst pitch error, HF leak, d2 ratio and RMS dip over SHIFTS for one processor."""
    from research import quality as q

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
        ("algorithmic latency (declared mean)", "algorithmic_latency_ms", "ms", None),
        ("algorithmic latency, most", "max_latency_ms", "ms", None),
        ("measured latency (worst shift)", "measured_latency_ms", "ms", None),
        ("CPU per 20 ms chunk, p50", "cpu_ms_per_chunk_p50", "ms", "librosa_cpu_ms_per_chunk_p50"),
        ("CPU per 20 ms chunk, p99", "cpu_ms_per_chunk_p99", "ms", "librosa_cpu_ms_per_chunk_p99"),
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
    if "voicing_kept_min" not in figures:
        lines.append(f"speech: {figures.get('speech', 'not measured')}")
        return "\n".join(lines)
    lines.append("")
    lines.append("speech, voiced frames kept (pyin) / frame-wise shift error: ours (splice), "
                 "20 ms phase vocoder, librosa offline")
    for key in sorted(k.removeprefix("voicing_kept_") for k in figures
                      if k.startswith("voicing_kept_") and k[-1].isdigit()):
        cells = [f"{figures[f'{p}voicing_kept_{key}']:.2f} / "
                 + _signed(figures[f"{p}shift_error_cents_{key}"])
                 for p in ("", "vocoder_", "librosa_")]
        lines.append(f"  {key:18} " + "   ".join(f"{c:>14}" for c in cells))
    for key in ("voicing_kept_min", "vocoder_voicing_kept_min", "librosa_voicing_kept_min",
                "voicing_kept_of_librosa_min", "shift_error_cents_worst"):
        lines.append(f"  {key:34} {figures[key]}")
    return "\n".join(lines)


def _signed(cents: float | None) -> str:
    return "unmeasurable" if cents is None else f"{cents:+.0f}c"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="also print one JSON line last")
    parser.add_argument("--no-artifacts", action="store_true",
                        help=f"do not write {CHART_PATH.name} and the WAV samples to docs/")
    args = parser.parse_args(argv)
    if str(_REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(_REPO_ROOT))
    if args.no_artifacts:
        figures = offline_figures()
    else:
        figures = offline_figures(chart=CHART_PATH, samples=SAMPLES_DIR)
    print(f"{SR_HZ} Hz, {CHUNK_MS} ms chunks, shifts {list(SHIFTS)} semitones")
    print(_table(figures))
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
