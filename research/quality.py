"""Objective audio quality measures for stream processors (tests, benchmark, research).

Every measure skips `skip_s` (default 50 ms) at both ends: the start-up transient
(latency plus one analysis window: 40 ms for our shifter at 48 kHz) and the tail, so
it judges the steady state of a stream; pass a larger `skip_s` for slower models.
Signals may be int16 or float; they are compared in their own units (a d2 ratio or a
dB figure is unit-free).

What each one catches:

- `pitch_hz` / `cents`: the shift lands on the right note (librosa.yin median).
- `hf_leak_db`: clicks and crackle; a clean low tone has no energy up high, a click is
  broadband.
- `d2_ratio`: clicks and steps, sample-exact; the largest second difference against a
  clean sine of the same pitch and amplitude (a smooth tone has a small one).
- `worst_rms_dip_db`: dropouts and phasing holes; deepest 2.5 ms RMS dip.
- `measure_latency_samples`: the real delay of a processor, from tone bursts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import numpy.typing as npt

from worker_node.package import Processor

__all__ = [
    "NaiveChunkShifter",
    "cents",
    "chunked",
    "d2_ratio",
    "harmonic_tone",
    "hf_leak_db",
    "max_abs_d2",
    "measure_delay_samples",
    "measure_latency_samples",
    "pitch_hz",
    "reference_sine",
    "run_processor",
    "sine",
    "speech_like",
    "steady",
    "worst_rms_dip_db",
]

FloatArray = npt.NDArray[np.float64]
Int16Array = npt.NDArray[np.int16]

PITCH_FMIN_HZ = 50.0
PITCH_FMAX_HZ = 1000.0
STEADY_SKIP_S = 0.05  # start-up transient and tail skipped by `steady` (> latency + window)
_TINY = 1e-20


def sine(f_hz: float, sr: int, seconds: float, amplitude: float = 0.5) -> Int16Array:
    """A sine at `amplitude` of int16 full scale, rounded to int16."""
    t = np.arange(round(seconds * sr)) / sr
    return _to_int16(amplitude * 32767.0 * np.sin(2.0 * np.pi * f_hz * t))


def harmonic_tone(
    f0: float,
    sr: int,
    seconds: float,
    n_harmonics: int = 12,
    amplitude: float = 0.5,
) -> Int16Array:
    """A voiced-like tone: harmonics k*f0 (below Nyquist) at 1/k, peak `amplitude` FS.

    Harmonic phases are fixed and spread (k^2 rule) so the peak factor is speech-like.
    """
    t = np.arange(round(seconds * sr)) / sr
    out = np.zeros_like(t)
    for k in range(1, n_harmonics + 1):
        if k * f0 >= sr / 2:
            break
        out += np.sin(2.0 * np.pi * k * f0 * t + np.pi * k * k / n_harmonics) / k
    return _to_int16(amplitude * 32767.0 * out / np.max(np.abs(out)))


def speech_like(sr: int, seconds: float, seed: int = 0) -> Int16Array:
    """A deterministic voice-like test signal: gliding F0, formants, syllables, breath.

    F0 wanders 90-260 Hz, harmonics are shaped by three fixed formants, a 4 Hz syllable
    envelope has short pauses, and a little noise stands in for breath and fricatives.
    For CPU figures on realistic spectra; not for pitch measures.
    """
    rng = np.random.default_rng(seed)
    n = round(seconds * sr)
    t = np.arange(n) / sr
    # A slow random walk plus vibrato, smoothed so F0 glides like intonation.
    knots = rng.uniform(90.0, 260.0, size=int(seconds * 3) + 2)
    f0 = np.interp(t, np.linspace(0.0, seconds, knots.shape[0]), knots)
    f0 *= 1.0 + 0.01 * np.sin(2.0 * np.pi * 5.5 * t)
    phase = 2.0 * np.pi * np.cumsum(f0) / sr
    voiced = np.zeros(n)
    formants = ((700.0, 130.0), (1200.0, 170.0), (2600.0, 250.0))
    for k in range(1, 40):
        freq = k * f0
        gain = sum(np.exp(-0.5 * ((freq - fc) / bw) ** 2) for fc, bw in formants)
        voiced += np.where(freq < 0.45 * sr, (0.05 + gain) / k, 0.0) * np.sin(k * phase)
    syllables = np.clip(np.sin(2.0 * np.pi * 4.0 * t) * 1.5 + 0.3, 0.0, 1.0)
    noise = rng.normal(0.0, 0.02, n)
    x = voiced * syllables + noise * (1.0 - syllables) + 0.005 * rng.normal(0.0, 1.0, n)
    return _to_int16(0.3 * 32767.0 * x / np.max(np.abs(x)))


def chunked(signal: npt.NDArray[np.int16], sizes: Iterable[int]) -> list[Int16Array]:
    """Split `signal` into consecutive chunks cycling through `sizes` (last may be short)."""
    pattern = list(sizes)
    if sum(pattern) <= 0 or min(pattern) < 0:
        raise ValueError(f"chunk sizes {pattern} must be >= 0 with a positive total")
    chunks: list[Int16Array] = []
    start, i = 0, 0
    while start < signal.shape[0]:
        size = pattern[i % len(pattern)]
        chunks.append(signal[start : start + size])
        start += size
        i += 1
    return chunks


def run_processor(
    processor: Processor, signal: Int16Array, chunk_sizes: Iterable[int]
) -> Int16Array:
    """Stream `signal` through `processor` chunk by chunk; check every call's length."""
    outs = []
    for chunk in chunked(signal, chunk_sizes):
        out = processor.process(chunk)
        if out.shape != chunk.shape or out.dtype != np.int16:
            raise AssertionError(
                f"processor returned {out.shape} {out.dtype} for a {chunk.shape} int16 chunk"
            )
        outs.append(out)
    return np.concatenate(outs) if outs else np.zeros(0, dtype=np.int16)


def steady(signal: npt.NDArray[np.generic], sr: int, skip_s: float = STEADY_SKIP_S) -> FloatArray:
    """The part of a processed signal after the start-up transient and before the tail."""
    skip = round(skip_s * sr)
    x = np.asarray(signal, dtype=np.float64)
    if x.shape[0] <= 3 * skip:
        raise ValueError(
            f"signal of {x.shape[0]} samples is too short to skip {skip} at each end; "
            f"use at least {3 * skip / sr:.2f} s"
        )
    return x[skip:-skip]


def pitch_hz(signal: npt.NDArray[np.generic], sr: int, *, skip_s: float = STEADY_SKIP_S) -> float:
    """Median librosa.yin F0 over the steady part, in Hz (50-1000 Hz search range)."""
    import librosa  # imported late: the shifter itself must not need it

    x = steady(signal, sr, skip_s)
    # Two periods of the lowest pitch per yin frame, power of two for the FFT.
    frame_length = 1 << int(np.ceil(np.log2(2.0 * sr / PITCH_FMIN_HZ)))
    f0 = librosa.yin(
        x,  # yin is scale-free: int16 units and [-1, 1] floats give the same answer
        fmin=PITCH_FMIN_HZ,
        fmax=PITCH_FMAX_HZ,
        sr=sr,
        frame_length=frame_length,
        center=False,
    )
    return float(np.median(f0))


def cents(a_hz: float, b_hz: float) -> float:
    """Interval from b to a in cents (positive when a is higher)."""
    return float(1200.0 * np.log2(a_hz / b_hz))


def hf_leak_db(
    signal: npt.NDArray[np.generic],
    sr: int,
    cutoff_hz: float = 8000.0,
    *,
    skip_s: float = STEADY_SKIP_S,
) -> float:
    """Energy above `cutoff_hz` relative to the total energy of the steady part, in dB.

    Hann-windowed periodogram of the mean-removed signal, so a test tone's own leakage
    stays far below -100 dB and a DC offset does not count as energy.
    """
    x = steady(signal, sr, skip_s)
    x = x - np.mean(x)
    power = np.abs(np.fft.rfft(x * np.hanning(x.shape[0]))) ** 2
    freqs = np.fft.rfftfreq(x.shape[0], 1.0 / sr)
    above = float(np.sum(power[freqs >= cutoff_hz]))
    total = float(np.sum(power))
    return float(10.0 * np.log10(max(above, _TINY) / max(total, _TINY)))


def max_abs_d2(signal: npt.NDArray[np.generic]) -> float:
    """Largest absolute second difference x[n+1] - 2 x[n] + x[n-1]."""
    x = np.asarray(signal, dtype=np.float64)
    return float(np.max(np.abs(np.diff(x, n=2))))


def d2_ratio(signal: npt.NDArray[np.generic], reference: npt.NDArray[np.generic]) -> float:
    """Largest |second difference| of `signal` over that of the clean `reference`.

    Pass the steady part of the output and a clean sine at the output pitch with the
    same amplitude (`reference_sine`). A click or a step is a large second difference,
    so this catches a single bad sample that energy measures average away.
    """
    return max_abs_d2(signal) / max(max_abs_d2(reference), _TINY)


def reference_sine(
    signal: npt.NDArray[np.generic], sr: int, f_hz: float, *, skip_s: float = STEADY_SKIP_S
) -> Int16Array:
    """A clean int16 sine at `f_hz` with the RMS amplitude of `signal`'s steady part.

    As long as `steady(signal)`, rounded to int16 like the output so both carry the same
    quantisation noise.
    """
    x = steady(signal, sr, skip_s)
    amplitude = float(np.sqrt(2.0 * np.mean(x * x)))
    t = np.arange(x.shape[0]) / sr
    return _to_int16(amplitude * np.sin(2.0 * np.pi * f_hz * t))


def worst_rms_dip_db(
    signal: npt.NDArray[np.generic],
    sr: int,
    window_s: float = 0.0025,
    *,
    skip_s: float = STEADY_SKIP_S,
) -> float:
    """Deepest sliding `window_s` RMS over the steady part relative to the median, in dB.

    0 dB for a constant envelope. A clean sine scores below 0 when the window is shorter
    than its period: about -0.4 dB at 220 Hz, -1.6 dB at 150 Hz, -4.4 dB at 100 Hz for
    2.5 ms. A dropout or a phase cancellation scores far below.
    """
    x = steady(signal, sr, skip_s)
    width = max(1, round(window_s * sr))
    energy = np.concatenate(([0.0], np.cumsum(x * x)))
    mean_square = (energy[width:] - energy[:-width]) / width
    median = float(np.median(mean_square))
    return float(10.0 * np.log10(max(float(mean_square.min()), _TINY) / max(median, _TINY)))


def measure_latency_samples(
    processor_factory: Callable[[], Processor],
    sr: int,
    chunk_sizes: Sequence[int] | None = None,
) -> int:
    """`measure_delay_samples`, rounded to a whole number of samples."""
    return int(round(measure_delay_samples(processor_factory, sr, chunk_sizes)))


def measure_delay_samples(
    processor_factory: Callable[[], Processor],
    sr: int,
    chunk_sizes: Sequence[int] | None = None,
) -> float:
    """Measured delay of a fresh processor, in samples, from isolated tone bursts.

    A phase vocoder gives arbitrary output phase, so waveforms cannot be correlated.
    Instead each burst's energy centroid is compared before and after: a Hann-shaped
    440 Hz burst comes out as a burst at another pitch, with the same centroid plus
    the delay. Bursts start at several offsets against any internal frame grid; the
    median delay is returned (fractional). `chunk_sizes` sets the feeding (default 20 ms).
    """
    burst_len = round(0.04 * sr)
    spacing = round(0.5 * sr)  # room for delays up to about 0.3 s
    n_bursts = 6
    t = np.arange(burst_len) / sr
    burst = np.hanning(burst_len) * np.sin(2.0 * np.pi * 440.0 * t) * 0.5 * 32767.0
    # Offsets 0, 37, 74, ... samples against the spacing: no two bursts share a grid phase.
    starts = [spacing // 4 + k * (spacing + 37) for k in range(n_bursts)]
    signal = np.zeros(starts[-1] + spacing)
    for start in starts:
        signal[start : start + burst_len] = burst
    pcm = _to_int16(signal)
    sizes = list(chunk_sizes) if chunk_sizes else [sr // 50]
    out = run_processor(processor_factory(), pcm, sizes).astype(np.float64)

    energy_in = pcm.astype(np.float64) ** 2
    energy_out = out**2
    idx = np.arange(signal.shape[0], dtype=np.float64)
    delays = []
    for start in starts:
        span = slice(start - spacing // 4, start + 3 * spacing // 4)
        c_in = np.sum(idx[span] * energy_in[span]) / np.sum(energy_in[span])
        out_energy = max(float(np.sum(energy_out[span])), _TINY)
        c_out = np.sum(idx[span] * energy_out[span]) / out_energy
        delays.append(c_out - c_in)
    return float(np.median(delays))


def _to_int16(x: npt.NDArray[np.floating]) -> Int16Array:
    """Round and clip to int16 (no wrap-around)."""
    out: Int16Array = np.clip(np.rint(x), -32768, 32767).astype(np.int16)
    return out


class NaiveChunkShifter:
    """Negative control: `librosa.effects.pitch_shift` applied to each chunk on its own.

    This is what not to ship: every chunk restarts the phase vocoder and the resampler,
    so the output clicks at every chunk boundary. The tests and the benchmark run it to
    prove the quality measures catch that. Latency 0 (it cheats by having no state).
    """

    def __init__(self, sample_rate: int, semitones: float) -> None:
        self.sample_rate = sample_rate
        self.semitones = semitones
        self.latency_samples = 0

    def process(self, frames: Int16Array) -> Int16Array:
        import librosa

        n = frames.shape[0]
        # Largest power-of-two FFT that fits the chunk: librosa warns when n_fft > chunk.
        n_fft = 1 << int(np.floor(np.log2(max(n, 16))))
        shifted = librosa.effects.pitch_shift(
            frames.astype(np.float64) / 32768.0,
            sr=self.sample_rate,
            n_steps=self.semitones,
            n_fft=n_fft,
            hop_length=n_fft // 4,
        )
        return _to_int16(32768.0 * shifted[:n])

    def reset(self) -> None:
        """Stateless: nothing to forget."""
