"""Speech figures for the stream processor: voicing kept and pitch shift on espeak-ng voices.

`speech_figures()` is a plain function that `bench/audio_offline.py` calls (and through
it `bench/audio.py`): for every voice of `research.speech.VOICES` and every shift,
streamed in 20 ms chunks at 48 kHz, the share of voiced frames (pyin) kept and the
frame-wise pitch shift, for the node's shifter, for the 20 ms phase vocoder it replaced
and for librosa's offline `pitch_shift` on the whole utterance (the reference). Given
paths it also draws voicing kept against algorithmic latency for each method (phase
vocoders of several window lengths, the splice shifter, librosa offline as a line) and
writes short before/after WAV samples of each voice.
"""

from __future__ import annotations

import wave
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

SR_HZ = 48000
CHUNK = SR_HZ // 50
VOCODER_WINDOWS_MS = (10, 20, 30, 40)
SAMPLE_SECONDS = 2.8  # the first sentence
SAMPLE_RATE_HZ = 24000  # espeak-ng speaks below 11 kHz; halves the files' size
SAMPLE_VOCODER_VOICE, SAMPLE_VOCODER_SHIFT = "low-male", 4.0  # the old model, to compare


def _key(name: str, semitones: float) -> str:
    return f"{name.replace('-', '_')}_{semitones:+g}"


def _cents(value: float) -> float | None:
    """Rounded cents; None (JSON null) when no frame was voiced in both signals."""
    return None if np.isnan(value) else round(value, 1)


def speech_figures(
    shifts: tuple[float, ...], chart: Path | None = None, samples: Path | None = None
) -> dict[str, Any]:
    """Voicing kept and shift error per voice and shift, per method; a flat dict.

    Keys: voicing_kept_min, librosa_voicing_kept_min, vocoder_voicing_kept_min (the
    lowest over voices and shifts), voicing_kept_of_librosa_min (the lowest ratio),
    shift_error_cents_worst (largest magnitude; null when some shift was unmeasurable),
    and per voice and shift voicing_kept_<voice>_<shift>,
    librosa_voicing_kept_..., vocoder_voicing_kept_..., shift_error_cents_...; the
    median F0 of each voice. Without espeak-ng: {"speech": "skipped ..."}.
    """
    from research.quality import run_processor
    from research.speech import VOICES, compare, have_espeak, librosa_offline, pitch_track
    from research.speech import voice as speak
    from research.vocoder import PhaseVocoderShifter
    from worker_node.splice import SpliceShifter

    if not have_espeak():
        return {"speech": "skipped: espeak-ng is not installed (apt-get install espeak-ng)"}
    makers: dict[str, Any] = {"splice": SpliceShifter, **{
        f"vocoder{w}": partial(PhaseVocoderShifter, window_ms=float(w))
        for w in VOCODER_WINDOWS_MS}}
    methods = [*makers, "librosa"]
    kept: dict[str, dict[str, float]] = {m: {} for m in methods}
    error: dict[str, dict[str, float]] = {m: {} for m in methods}
    latency_ms: dict[str, float] = {}
    max_latency_ms: dict[str, float] = {}
    figures: dict[str, Any] = {}
    outputs: dict[tuple[str, str, float], np.ndarray] = {}
    for spec in VOICES:
        speech = speak(spec.name, SR_HZ)
        track = pitch_track(speech, SR_HZ)
        f0 = float(np.median(track.f0_hz[track.voiced]))
        figures[f"voice_median_f0_hz_{spec.name.replace('-', '_')}"] = round(f0, 1)
        for st in shifts:
            for method in methods:
                if method == "librosa":
                    out, delay = librosa_offline(speech, SR_HZ, st), 0
                else:
                    shifter = makers[method](SR_HZ, st)
                    out, delay = run_processor(shifter, speech, [CHUNK]), shifter.latency_samples
                    latency_ms[method] = shifter.latency_ms
                    max_latency_ms[method] = float(
                        getattr(shifter, "max_latency_ms", shifter.latency_ms)
                    )
                outputs[(method, spec.name, st)] = out[delay:]
                score = compare(speech, out, SR_HZ, delay, st, inp_track=track)
                kept[method][_key(spec.name, st)] = score.voicing_kept
                error[method][_key(spec.name, st)] = score.shift_error_cents

    prefixes = {"splice": "", "vocoder20": "vocoder_", "librosa": "librosa_"}
    for method, prefix in prefixes.items():
        for key, value in kept[method].items():
            figures[f"{prefix}voicing_kept_{key}"] = round(value, 3)
            figures[f"{prefix}shift_error_cents_{key}"] = _cents(error[method][key])
        figures[f"{prefix}voicing_kept_min"] = round(min(kept[method].values()), 3)
        # Unmeasurable (no frame voiced in both) counts as the worst.
        errors = [abs(e) if not np.isnan(e) else np.inf for e in error[method].values()]
        figures[f"{prefix}shift_error_cents_worst"] = (
            None if np.isinf(max(errors)) else round(max(errors), 1)
        )
    figures["voicing_kept_of_librosa_min"] = round(
        min(kept["splice"][k] / kept["librosa"][k] for k in kept["splice"]), 3
    )
    for method in methods[:-1]:
        figures[f"chart_{method}_latency_ms"] = round(latency_ms[method], 2)
        figures[f"chart_{method}_voicing_kept_min"] = round(min(kept[method].values()), 3)
    if chart is not None:
        draw_chart(chart, kept, latency_ms, max_latency_ms)
    if samples is not None:
        write_samples(samples, shifts, outputs)
    return figures


def draw_chart(
    path: Path,
    kept: dict[str, dict[str, float]],
    latency_ms: dict[str, float],
    max_latency_ms: dict[str, float],
) -> None:
    """Voicing kept (lowest and mean over voices and shifts) against algorithmic latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    vocoders = [f"vocoder{w}" for w in VOCODER_WINDOWS_MS]
    xs = [latency_ms[m] for m in vocoders]
    ax.plot(xs, [min(kept[m].values()) for m in vocoders], "o-", color="tab:blue",
            label="phase vocoder, window 10/20/30/40 ms: lowest")
    ax.plot(xs, [float(np.mean(list(kept[m].values()))) for m in vocoders], "o--",
            color="tab:blue", mfc="none", label="phase vocoder: mean")
    lo, mean = min(kept["splice"].values()), float(np.mean(list(kept["splice"].values())))
    spread = [[0.0], [max_latency_ms["splice"] - latency_ms["splice"]]]
    ax.errorbar([latency_ms["splice"]], [lo], xerr=spread, fmt="s", color="tab:red",
                capsize=4, label="splice (node default): lowest; bar to its 20 ms maximum")
    ax.plot([latency_ms["splice"]], [mean], "s", color="tab:red", mfc="none",
            label="splice: mean")
    ref_lo = min(kept["librosa"].values())
    ref_mean = float(np.mean(list(kept["librosa"].values())))
    ax.axhline(ref_lo, color="gray", ls="-", lw=1,
               label="librosa offline (whole utterance): lowest")
    ax.axhline(ref_mean, color="gray", ls="--", lw=1, label="librosa offline: mean")
    ax.axvline(20.0, color="black", ls=":", lw=1)
    ax.text(20.3, 1.19, "20 ms budget", fontsize=8)
    ax.set_xlabel("algorithmic latency (ms) at 48 kHz")
    ax.set_ylabel("voiced frames kept (pyin), out / in")
    ax.set_title("Voicing kept on espeak-ng speech (80, 102, 219 Hz; -5, +4, +7 st)", fontsize=10)
    ax.set_ylim(0.0, 1.25)
    ax.set_xlim(0.0, 45.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_samples(
    folder: Path, shifts: tuple[float, ...], outputs: dict[tuple[str, str, float], np.ndarray]
) -> None:
    """<voice>.wav (the input) and <voice>_<shift>.wav (the node's shifter), 16-bit mono."""
    import librosa

    from research.speech import VOICES
    from research.speech import voice as speak

    folder.mkdir(parents=True, exist_ok=True)
    n = round(SAMPLE_SECONDS * SR_HZ)

    def save(name: str, signal: np.ndarray) -> None:
        x = librosa.resample(signal[:n].astype(np.float64), orig_sr=SR_HZ,
                             target_sr=SAMPLE_RATE_HZ)
        pcm = np.clip(np.rint(x), -32768, 32767).astype("<i2")
        with wave.open(str(folder / f"{name}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SAMPLE_RATE_HZ)
            w.writeframes(pcm.tobytes())

    for spec in VOICES:
        save(spec.name, speak(spec.name, SR_HZ))
        for st in shifts:
            save(f"{spec.name}_{st:+g}", outputs[("splice", spec.name, st)])
    old = outputs[("vocoder20", SAMPLE_VOCODER_VOICE, SAMPLE_VOCODER_SHIFT)]
    save(f"{SAMPLE_VOCODER_VOICE}_{SAMPLE_VOCODER_SHIFT:+g}_old-vocoder", old)
