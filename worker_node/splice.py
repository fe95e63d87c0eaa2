"""Streaming pitch shifter for speech: a resampling delay line with pitch-synchronous splices.

The pitch voices' model (models/miku, teto, kaito; docs/models.md). Pure numpy. The output
reads the input at `ratio` input samples per output sample (cubic interpolation): every
frequency scales exactly and the output stays as periodic (so as voiced) as the input; a 20
ms phase vocoder cannot resolve a low voice's harmonics. Before the delay leaves its band
(4-20 ms around `latency_samples`, 12 ms) the read tap jumps by the whole number of pitch
periods that best correlates the signal with itself, the two taps cross-faded at constant
power for that correlation. Like TD-PSOLA it repeats or drops whole periods, without
glottal-pulse marks. Shifting up, the fading tap stops 3 samples behind the input, so no
output needs unseen input. Every decision is taken at an exact output index from earlier
input, so chunking does not change the output; at 0 semitones it is the input delayed,
bit-exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from worker_node.pcm import checked, delayed

__all__ = ["SpliceShifter"]

Int16Array = npt.NDArray[np.int16]
FloatArray = npt.NDArray[np.float64]

MIN_SAMPLE_RATE_HZ = 8000
MAX_SAMPLE_RATE_HZ = 48000
LATENCY_MS = 12.0  # mean delay; the delay stays within LATENCY_MS +- MAX_SPLICE_MS / 2
MAX_SPLICE_MS = 16.0  # longest jump: one period of 62.5 Hz, below a low male voice's dips
MIN_SPLICE_MS = 2.5  # shortest jump: one period of 400 Hz
CORR_BACK_MS = 10.0  # correlation window behind the tap (most of a low voice's period) ...
CORR_AHEAD_MS = 3.5  # ... and ahead of it (input the tap has not yet read, already here)
MAX_FADE_MS = 16.0  # cross-fades are as long as the splice rhythm allows, up to this
_INT16_MIN = -32768
_INT16_MAX = 32767


class SpliceShifter:
    """One stream's shifter, mean latency 12 ms. Deterministic; not thread-safe."""

    def __init__(self, sample_rate: int, semitones: float) -> None:
        if not MIN_SAMPLE_RATE_HZ <= sample_rate <= MAX_SAMPLE_RATE_HZ:
            raise ValueError(
                f"sample_rate={sample_rate!r} Hz is out of range: expected "
                f"{MIN_SAMPLE_RATE_HZ}..{MAX_SAMPLE_RATE_HZ} Hz; resample the stream first"
            )
        if not -24.0 <= semitones <= 24.0:
            raise ValueError(
                f"semitones={semitones!r} is out of range: expected -24..24 (two octaves)"
            )
        self.sample_rate = int(sample_rate)
        self.semitones = float(semitones)
        self.ratio = float(2.0 ** (self.semitones / 12.0))
        ms = self.sample_rate / 1000.0
        self.latency_samples = math.floor(LATENCY_MS * ms)  # floors: the sum stays <= 20 ms
        self.max_splice = float(math.floor(MAX_SPLICE_MS * ms))
        self.min_splice = float(round(MIN_SPLICE_MS * ms))
        self._back = round(CORR_BACK_MS * ms)
        self._ahead = round(CORR_AHEAD_MS * ms)
        # The old tap keeps reading during a cross-fade; shifting up its delay shrinks
        # from at least latency - max_splice / 2 and must stay >= 2 for interpolation.
        min_delay = self.latency_samples - self.max_splice / 2.0
        up = max(self.ratio - 1.0, 0.0)
        self._max_fade = int(min(MAX_FADE_MS * ms, (min_delay - 3.0) / up if up else math.inf))
        # History the taps and the correlation window may reach back to.
        self._history = int(self.latency_samples + 2 * self.max_splice + self._back + 8)
        self.reset()

    @property
    def latency_ms(self) -> float:
        """Declared (mean) latency in milliseconds, constant for the life of the instance."""
        return 1000.0 * self.latency_samples / self.sample_rate

    @property
    def max_latency_ms(self) -> float:
        """The largest delay any output sample can have, in milliseconds."""
        return 1000.0 * (self.latency_samples + self.max_splice / 2.0) / self.sample_rate

    def read_delay_samples(self) -> float:
        """How far behind the input the tap reads the next output sample (for tests)."""
        if self.bypass:
            return float(self.latency_samples)
        return self._n - (self._tap_r + self.ratio * (self._n - self._tap_n))

    @property
    def bypass(self) -> bool:
        """True at 0 semitones: the output is the delayed input, bit-exact."""
        return self.semitones == 0.0

    def reset(self) -> None:
        """Forget the stream: silence behind the taps, no splice history."""
        self._n = 0  # index of the next output (and input) sample
        self._x: FloatArray = np.zeros(self._history)  # input; _x[i] is sample i + _x0
        self._x0 = -self._history
        # The tap reads input position r(n) = _tap_r + ratio * (n - _tap_n).
        self._tap_n, self._tap_r = 0, float(-self.latency_samples)
        self._fade_n = -1  # start of the running cross-fade, or -1
        self._fade_len = 0
        self._fade_rho = 1.0  # correlation of the two taps being cross-faded
        self._old_n, self._old_r = 0, 0.0  # the tap being faded out
        self._splice = (self.min_splice + self.max_splice) / 2.0  # last jump, samples
        self._next_splice = self._due(0, -self.latency_samples)
        self._delay_line: Int16Array = np.zeros(self.latency_samples, dtype=np.int16)

    def process(self, frames: Int16Array) -> Int16Array:
        """Shift one chunk: int16 mono in, as many int16 samples out, `latency` later."""
        samples = checked(frames)
        count = samples.shape[0]
        if self.bypass:
            passed, self._delay_line = delayed(self._delay_line, samples)
            return passed

        self._x = np.concatenate((self._x, samples.astype(np.float64)))
        end = self._n + count
        out = np.empty(count)
        first = self._n
        while self._n < end:
            fade_end = self._fade_n + self._fade_len if self._fade_n >= 0 else end
            stop = min(end, fade_end, self._next_splice)
            out[self._n - first : stop - first] = self._render(self._n, stop)
            self._n = stop
            if self._fade_n >= 0 and stop == fade_end:
                self._fade_n = -1
            if stop == self._next_splice:
                self._start_splice(stop)
        keep = self._history
        if self._x.shape[0] > keep:
            self._x0 += self._x.shape[0] - keep
            self._x = self._x[-keep:]
        return np.clip(np.rint(out), _INT16_MIN, _INT16_MAX).astype(np.int16)

    def _render(self, start: int, stop: int) -> FloatArray:
        """Output samples start..stop-1 from the tap (and the fading tap, if any)."""
        n: FloatArray = np.arange(start, stop, dtype=np.float64)
        y = self._read(self._tap_r + self.ratio * (n - self._tap_n))
        if self._fade_n >= 0:
            old = self._read(self._old_r + self.ratio * (n - self._old_n))
            new = 0.5 - 0.5 * np.cos(np.pi * (n - self._fade_n + 0.5) / self._fade_len)
            # Keep the power of old * a + new * b constant for taps correlated by rho:
            # a = 1 - b for in-phase periods (rho 1), equal power for noise (rho 0).
            rho = self._fade_rho
            fade = -rho * new + np.sqrt(1.0 - new * new * (1.0 - rho * rho))
            y = fade * old + new * y
        return y

    def _read(self, positions: FloatArray) -> FloatArray:
        """The input at fractional positions (Catmull-Rom cubic interpolation)."""
        pos = positions - self._x0
        base = np.floor(pos)
        t = pos - base
        i = base.astype(np.intp)
        x = self._x
        xm1, x0, x1, x2 = x[i - 1], x[i], x[i + 1], x[i + 2]
        return x0 + 0.5 * t * (
            x1 - xm1 + t * (2.0 * xm1 - 5.0 * x0 + 4.0 * x1 - x2 + t * (3.0 * (x0 - x1) + x2 - xm1))
        )

    def _due(self, n: int, r: float) -> int:
        """First output index after n at which a tap reading r at n must splice."""
        delay = n - r
        if self.ratio > 1.0:  # the delay shrinks by ratio - 1 a sample
            room, speed = delay - (self.latency_samples - self._splice / 2.0), self.ratio - 1.0
        else:
            room, speed = self.latency_samples + self._splice / 2.0 - delay, 1.0 - self.ratio
        if speed <= 1e-12:
            return 1 << 62
        return n + max(1, math.ceil(room / speed))

    def _start_splice(self, n: int) -> None:
        """Jump the tap by a whole number of periods at output index n, fading over."""
        r = self._tap_r + self.ratio * (n - self._tap_n)
        # The delay after the jump stays within latency +- max_splice / 2.
        longest = min(self.max_splice, (self._splice + self.max_splice) / 2.0)
        # A jump under half the last one would be due again at once (and noise would
        # chain such jumps): pitch falls by at most an octave per splice.
        shortest = max(self.min_splice, self._splice / 2.0)
        jump, self._fade_rho = self._best_lag(n, math.floor(r), shortest, longest)
        self._splice = jump
        self._old_n, self._old_r = self._tap_n, self._tap_r
        self._tap_n = n
        self._tap_r = r - jump if self.ratio > 1.0 else r + jump
        self._next_splice = self._due(n, self._tap_r)
        self._fade_n = n
        self._fade_len = max(1, min(self._max_fade, self._next_splice - n))

    def _best_lag(
        self, n: int, tap: int, shortest: float, longest: float
    ) -> tuple[float, float]:
        """Lag in [shortest, longest] by which the signal around the tap best repeats.

        Normalised cross-correlation, by FFT, of the window input[tap - back : tap +
        ahead] with the same window `lag` samples earlier (shifting up: the new tap is
        behind) or later (down: ahead, as far as input before output index n allows;
        the windows move back when the latest lag would need input not yet seen). The
        peak is refined by a parabola. A silent or aperiodic window keeps the previous
        lag, clamped to the range. Returns the lag and its correlation (0 to 1).
        """
        lo, hi = math.ceil(shortest), int(longest)
        width = self._back + self._ahead
        lags = hi - lo + 1
        if self.ratio > 1.0:  # candidates behind the template: region then template
            start = tap - self._back - self._x0
            template = self._x[start : start + width]
            region = self._x[start - hi : start - lo + width]
        else:  # candidates ahead of it: template then region
            ref = min(tap, n - 3 - self._ahead - hi)
            start = ref - self._back - self._x0
            template = self._x[start : start + width]
            region = self._x[start + lo : start + hi + width]
        size = 1 << int(math.ceil(math.log2(region.shape[0] + width)))
        spectrum = np.fft.rfft(region, size) * np.conj(np.fft.rfft(template, size))
        corr = np.fft.irfft(spectrum, size)[:lags]
        power = np.concatenate(([0.0], np.cumsum(region * region)))
        energy = power[width : width + lags] - power[:lags]
        template_energy = float(np.dot(template, template))
        fallback = min(max(self._splice, float(lo)), float(hi))
        if template_energy <= 1e-6 * width:
            return fallback, 0.0
        rho = corr / np.sqrt(template_energy * np.maximum(energy, 1e-9 * template_energy))
        k = int(np.argmax(rho))
        peak = float(rho[k])
        if peak <= 0.0:
            return fallback, 0.0
        offset = 0.0
        if 0 < k < lags - 1:
            left, mid, right = float(rho[k - 1]), float(rho[k]), float(rho[k + 1])
            curve = left - 2.0 * mid + right
            if curve < 0.0:
                offset = 0.5 * (left - right) / curve
        # corr[k] compares the template with the window k samples into the region:
        # shifting up the region starts hi before the template, down lo after it.
        peak = min(peak, 1.0)
        if self.ratio > 1.0:
            return float(hi - (k + offset)), peak
        return float(lo + k + offset), peak


def make(sample_rate: int, params: dict[str, Any], files: Path) -> SpliceShifter:
    """One shifter per stream, `params["semitones"]` from the package's model.toml."""
    return SpliceShifter(sample_rate, float(params.get("semitones", 0.0)))


def process_batch(processors: Sequence[SpliceShifter],
                  frames: Sequence[np.ndarray]) -> list[np.ndarray]:
    """One frame of each stream in one call: the seam a GPU model batches behind. Each
    stream's splices fall where its own voice repeats, so the work stays per stream."""
    return [p.process(f) for p, f in zip(processors, frames, strict=True)]
