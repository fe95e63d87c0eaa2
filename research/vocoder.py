"""The phase-vocoder pitch shifter the node served before `worker_node.splice`: a research
baseline for the tests and benches, never served.

Exact on tones, but its 20 ms window cannot resolve the harmonics of a low voice, which
then loses its voicing (tests/test_speech.py keeps that as a negative control; the bench's
voicing-against-latency chart runs it at other window lengths via `window_ms`).
Pure numpy.

Phase vocoder (Laroche and Dolson 1999, "New phase-vocoder techniques for pitch-shifting"):
a short-time Fourier transform with a 20 ms periodic Hann window, a 5 ms hop and a
zero-padded power-of-two FFT. Each frame's magnitude peaks split the spectrum into
regions of influence; each region moves by a whole number of bins towards its peak's
shifted frequency and is rotated by a phase that accumulates the exact frequency offset
from frame to frame (so the partial lands on the exact target frequency), with every
bin of the region keeping its phase relative to the peak (identity phase locking: no
phasiness on harmonic tones). No resampler. The same Hann window is applied again on
synthesis and frames are overlap-added.

Streaming: input and output FIFOs, the previous frame's spectrum and per-bin phase
rotation and the overlap-add tail persist across calls, so the output does not depend
on how the input is chunked and there is no discontinuity at chunk boundaries.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from worker_node.pcm import checked, delayed

__all__ = ["PhaseVocoderShifter"]

Int16Array = npt.NDArray[np.int16]
FloatArray = npt.NDArray[np.float64]
ComplexArray = npt.NDArray[np.complex128]
IntArray = npt.NDArray[np.intp]

MIN_SAMPLE_RATE_HZ = 8000
MAX_SAMPLE_RATE_HZ = 48000
WINDOW_MS = 20.0  # 20 ms resolves harmonics of voices down to about 100 Hz
HOP_MS = 5.0  # a quarter of the window: Hann analysis x Hann synthesis sums to a constant
ZERO_PAD = 4  # FFT size = 4x the window's power of two: fine bins, small shift rounding
_INT16_MIN = -32768
_INT16_MAX = 32767


class PhaseVocoderShifter:
    """Stateful streaming phase-vocoder pitch shifter with a fixed latency.

    Output sample t is the shifted input around t - `latency_samples` (window length
    minus one: 959 samples at 48 kHz). At 0 semitones the output is the input delayed
    by the same latency, bit-exact. Deterministic; not thread-safe (one per stream).
    """

    def __init__(
        self,
        sample_rate: int,
        semitones: float,
        *,
        window_ms: float = WINDOW_MS,
        hop_ms: float = HOP_MS,
    ) -> None:
        if not MIN_SAMPLE_RATE_HZ <= sample_rate <= MAX_SAMPLE_RATE_HZ:
            raise ValueError(
                f"sample_rate={sample_rate!r} Hz is out of range: expected "
                f"{MIN_SAMPLE_RATE_HZ}..{MAX_SAMPLE_RATE_HZ} Hz; resample the stream first"
            )
        if not -24.0 <= semitones <= 24.0:
            raise ValueError(
                f"semitones={semitones!r} is out of range: expected -24..24 (two octaves)"
            )
        hop = max(1, round(hop_ms * sample_rate / 1000.0))
        overlap = max(2, round(window_ms / hop_ms))
        if overlap % 2:
            raise ValueError(
                f"window_ms/hop_ms={window_ms}/{hop_ms} must be an even whole number "
                "(Hann analysis and synthesis windows overlap-add to a constant only then)"
            )
        self.sample_rate = int(sample_rate)
        self.semitones = float(semitones)
        self.ratio = float(2.0 ** (self.semitones / 12.0))
        self.hop_samples = hop
        self.window_samples = hop * overlap
        fft_size = ZERO_PAD
        while fft_size < ZERO_PAD * self.window_samples:
            fft_size *= 2
        self.fft_size = fft_size
        # An output sample is final once the last frame covering it has been synthesised;
        # for the worst chunk boundary that frame ends window - 1 samples later.
        self.latency_samples = self.window_samples - 1

        n = np.arange(self.window_samples)
        window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / self.window_samples)
        self._window: FloatArray = window
        # Periodic Hann squared overlap-adds to 3/8 * overlap; fold 1/that into synthesis.
        self._synthesis_window: FloatArray = window / (0.375 * overlap)
        bins = fft_size // 2 + 1
        self._bins = bins
        self._bin_index: IntArray = np.arange(bins)
        self._bin_rad: FloatArray = 2.0 * np.pi * np.arange(bins) / fft_size
        self._rad_per_bin = 2.0 * np.pi / fft_size
        self.reset()

    @property
    def latency_ms(self) -> float:
        """Declared latency in milliseconds (constant for the life of the instance)."""
        return 1000.0 * self.latency_samples / self.sample_rate

    @property
    def bypass(self) -> bool:
        """True at 0 semitones: the output is the delayed input, bit-exact."""
        return self.semitones == 0.0

    def reset(self) -> None:
        """Forget the stream: silence in every FIFO, fresh phases."""
        # The latency is split between the FIFOs: window - hop zeros of input so the first
        # frame ends with the first hop of real input, and the other hop - 1 as output.
        pre_in = self.window_samples - self.hop_samples
        self._in_fifo: FloatArray = np.zeros(pre_in)
        self._out_fifo: FloatArray = np.zeros(self.latency_samples - pre_in)
        self._ola: FloatArray = np.zeros(self.window_samples)
        self._prev_spectrum: ComplexArray = np.zeros(self._bins, dtype=np.complex128)
        self._prev_rotation: FloatArray = np.zeros(self._bins)
        self._delay_line: Int16Array = np.zeros(self.latency_samples, dtype=np.int16)

    def process(self, frames: Int16Array) -> Int16Array:
        """Shift one chunk: int16 mono in, as many int16 samples out, `latency` later."""
        samples = checked(frames)
        count = samples.shape[0]
        if self.bypass:
            passed, self._delay_line = delayed(self._delay_line, samples)
            return passed

        self._in_fifo = np.concatenate((self._in_fifo, samples.astype(np.float64)))
        n_frames = (self._in_fifo.shape[0] - self.window_samples) // self.hop_samples + 1
        if n_frames > 0:
            self._out_fifo = np.concatenate((self._out_fifo, self._run_frames(n_frames)))
            self._in_fifo = self._in_fifo[n_frames * self.hop_samples :]
        out = self._out_fifo[:count]
        self._out_fifo = self._out_fifo[count:]
        return np.clip(np.rint(out), _INT16_MIN, _INT16_MAX).astype(np.int16)

    def _run_frames(self, n_frames: int) -> FloatArray:
        """Analyse, shift and overlap-add `n_frames` frames; return the finished samples."""
        size, hop, fft_size = self.window_samples, self.hop_samples, self.fft_size
        half = size // 2
        starts = np.arange(n_frames) * hop
        grains = self._in_fifo[starts[:, None] + np.arange(size)] * self._window
        # Zero-phase framing: the frame centre sits at index 0, so phases refer to it.
        padded = np.zeros((n_frames, fft_size))
        padded[:, :half] = grains[:, half:]
        padded[:, fft_size - half :] = grains[:, :half]
        spectra = np.fft.rfft(padded, axis=1)
        shifted = np.empty_like(spectra)
        for i in range(n_frames):
            shifted[i] = self._shift_frame(spectra[i])
        synth = np.fft.irfft(shifted, n=fft_size, axis=1)
        grains_out = np.concatenate((synth[:, fft_size - half :], synth[:, :half]), axis=1)
        grains_out *= self._synthesis_window
        done = n_frames * hop
        acc = np.zeros(done - hop + size)
        acc[:size] = self._ola
        for i in range(n_frames):
            acc[i * hop : i * hop + size] += grains_out[i]
        self._ola = np.zeros(size)
        self._ola[: size - hop] = acc[done:]
        return acc[:done]

    def _shift_frame(self, spectrum: ComplexArray) -> ComplexArray:
        """Move each peak's region of influence to the shifted frequency (one frame)."""
        magnitude = np.abs(spectrum)
        # Bins 0..K-2 with their neighbours; the spectrum mirrors at 0 Hz, so bin 0's
        # left neighbour is bin 1 and a DC offset is a peak like any other partial.
        inner = magnitude[:-1]
        left = np.concatenate((magnitude[1:2], magnitude[:-2]))
        right = magnitude[1:]
        peaks = np.flatnonzero((inner > left) & (inner >= right))
        valleys = (inner <= left) & (inner < right)
        previous = self._prev_spectrum
        self._prev_spectrum = spectrum
        if peaks.shape[0] == 0:
            if not magnitude.any():  # digital silence: start phases afresh afterwards
                self._prev_rotation = np.zeros(self._bins)
                return np.zeros(self._bins, dtype=np.complex128)
            # A flat magnitude (an impulse at the frame centre) has no strict peak.
            peaks = np.array([int(np.argmax(magnitude))], dtype=np.intp)

        hop = self.hop_samples
        # Instantaneous frequency of each peak from the phase advance over one hop.
        advance = np.angle(spectrum[peaks] * np.conj(previous[peaks]))
        deviation = advance - self._bin_rad[peaks] * hop
        deviation -= 2.0 * np.pi * np.rint(deviation / (2.0 * np.pi))
        freq_rad = self._bin_rad[peaks] + deviation / hop
        offset_rad = (self.ratio - 1.0) * freq_rad
        bin_shift = np.rint(offset_rad / self._rad_per_bin).astype(np.intp)
        # The whole-bin move leaves the partial up to half a bin off; the rotation makes
        # the phase advance by exactly the shifted frequency from frame to frame. A peak
        # continues the rotation of whichever region held its bin in the previous frame.
        rotation = self._prev_rotation[peaks] + offset_rad * hop
        rotation -= 2.0 * np.pi * np.rint(rotation / (2.0 * np.pi))
        if peaks[0] == 0:  # DC stays DC: unmoved, and bin 0 must stay real
            bin_shift[0] = 0
            rotation[0] = 0.0

        # Regions of influence: each peak owns the bins between the magnitude valleys
        # around it, so a partial's whole main lobe moves as one piece. Peaks and valleys
        # alternate; a peakless stretch at either end goes to the nearest peak.
        owner = np.zeros(self._bins, dtype=np.intp)
        np.cumsum(valleys, out=owner[:-1])
        owner[-1] = owner[-2]
        if valleys.any() and np.argmax(valleys) < peaks[0]:
            owner -= 1
        np.clip(owner, 0, peaks.shape[0] - 1, out=owner)
        self._prev_rotation = rotation[owner]
        moved = spectrum * np.exp(1j * rotation)[owner]
        # Scatter-add the moved bins (regions overlap when shifting down); the offset
        # keeps negative targets in range and the slice drops what falls off either end.
        offset = max(0, -int(bin_shift.min()))
        target = self._bin_index + (bin_shift[owner] + offset)
        length = offset + self._bins
        real = np.bincount(target, weights=moved.real, minlength=length)[offset:length]
        imag = np.bincount(target, weights=moved.imag, minlength=length)[offset:length]
        return real + 1j * imag
