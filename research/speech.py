"""Speech quality measures for stream processors: synthetic voices, voicing, frame-wise pitch.

Tests and the benchmark judge a voice model on speech, not only tones:

- `voice(name, sr)`: three short English sentences spoken by espeak-ng at a known pitch
  (`VOICES`: a low male about 80 Hz, a male about 102 Hz, a female about 219 Hz),
  resampled to `sr`. Needs the `espeak-ng` program (`have_espeak()`); cached per process.
- `librosa_offline(signal, sr, semitones)`: the reference, librosa's offline
  `effects.pitch_shift` on the whole utterance (no latency, no streaming).
- `pitch_track(signal, sr)`: librosa.pyin frame by frame (F0 and a voiced flag).
- `compare(inp, out, sr, delay, semitones)`: voiced frames kept (voiced frames in the
  output over voiced frames in the input) and the frame-wise shift in cents, measured
  on frames voiced in both signals after aligning the output by `delay` samples (a
  ratio of two medians would be skewed when the output loses voiced frames).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "VOICES",
    "PitchTrack",
    "SpeechScore",
    "Voice",
    "compare",
    "have_espeak",
    "librosa_offline",
    "pitch_track",
    "voice",
]

FloatArray = npt.NDArray[np.float64]
Int16Array = npt.NDArray[np.int16]
BoolArray = npt.NDArray[np.bool_]

# Three short sentences (about 7 s): enough voiced frames that one phrase pyin calls
# unvoiced on a whim moves the share kept by a few percent, not ten.
SENTENCE = (
    "The quick brown fox jumps over the lazy dog. We were away a year ago. "
    "How are you today, my dear old friend?"
)
WORDS_PER_MINUTE = 170
ANALYSIS_SR_HZ = 16000  # pyin runs at 16 kHz: 9x cheaper than at 48 kHz, same F0 range
PYIN_FMIN_HZ = 40.0  # a low voice shifted down 5 semitones dips below 50 Hz
PYIN_FMAX_HZ = 700.0
PYIN_FRAME = 2048  # 128 ms: yin's 64 ms window holds two periods of 40 Hz (1024 does not)
PYIN_HOP = 320
PYIN_RESOLUTION = 0.2  # semitones per pitch bin: 4x faster than 0.1; shifts are whole bins


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice and pitch setting, with the median F0 it speaks at."""

    name: str
    espeak_voice: str
    espeak_pitch: int  # espeak-ng -p, 0..99
    median_f0_hz: float  # as pyin measures SENTENCE (recorded for the docs and checks)


VOICES: tuple[Voice, ...] = (
    Voice("low-male", "en-us", 28, 80.0),
    Voice("male", "en-us", 54, 102.0),
    Voice("female", "en-us+f3", 60, 219.0),
)


def have_espeak() -> bool:
    """True when the espeak-ng program is on PATH."""
    return shutil.which("espeak-ng") is not None


@functools.cache
def voice(name: str, sr: int) -> Int16Array:
    """SENTENCE spoken by the voice `name` of VOICES, int16 mono at `sr`, peak -6 dBFS."""
    import librosa  # imported late: the node never needs it

    spec = next((v for v in VOICES if v.name == name), None)
    if spec is None:
        raise ValueError(f"voice {name!r} is unknown: expected one of {[v.name for v in VOICES]}")
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng is not installed: apt-get install espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "say.wav"
        subprocess.run(
            [exe, "-v", spec.espeak_voice, "-p", str(spec.espeak_pitch),
             "-s", str(WORDS_PER_MINUTE), "-w", str(path), SENTENCE],
            check=True, capture_output=True, timeout=30,
        )
        with wave.open(str(path), "rb") as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    x = librosa.resample(pcm.astype(np.float64), orig_sr=rate, target_sr=sr)
    x *= 0.5 * 32767.0 / max(float(np.max(np.abs(x))), 1.0)
    out: Int16Array = np.clip(np.rint(x), -32768, 32767).astype(np.int16)
    return out


def librosa_offline(signal: Int16Array, sr: int, semitones: float) -> Int16Array:
    """librosa.effects.pitch_shift on the whole signal at once, int16 (the reference)."""
    import librosa

    y = librosa.effects.pitch_shift(signal.astype(np.float64) / 32768.0, sr=sr, n_steps=semitones)
    out: Int16Array = np.clip(np.rint(32768.0 * y), -32768, 32767).astype(np.int16)
    return out


@dataclass(frozen=True)
class PitchTrack:
    """pyin's answer, one entry per 20 ms frame."""

    f0_hz: FloatArray  # NaN where unvoiced
    voiced: BoolArray


def pitch_track(signal: npt.NDArray[np.generic], sr: int) -> PitchTrack:
    """librosa.pyin F0 and voiced flags of `signal` (resampled to 16 kHz), 20 ms frames."""
    import librosa

    x = np.asarray(signal, dtype=np.float64) / 32768.0
    if sr != ANALYSIS_SR_HZ:
        x = librosa.resample(x, orig_sr=sr, target_sr=ANALYSIS_SR_HZ)
    f0, voiced, _ = librosa.pyin(
        x, fmin=PYIN_FMIN_HZ, fmax=PYIN_FMAX_HZ, sr=ANALYSIS_SR_HZ,
        frame_length=PYIN_FRAME, hop_length=PYIN_HOP, resolution=PYIN_RESOLUTION,
    )
    return PitchTrack(np.asarray(f0, dtype=np.float64), np.asarray(voiced, dtype=np.bool_))


@dataclass(frozen=True)
class SpeechScore:
    """How a processed utterance compares with the original."""

    voicing_kept: float  # voiced frames out / voiced frames in (can exceed 1)
    shift_cents: float  # median frame-wise shift over frames voiced in both
    shift_error_cents: float  # shift_cents minus the requested shift
    frames_compared: int  # frames voiced in both


def compare(
    inp: Int16Array, out: Int16Array, sr: int, delay_samples: int, semitones: float,
    *, inp_track: PitchTrack | None = None,
) -> SpeechScore:
    """Voicing kept and frame-wise shift of `out` against `inp`, `out` delayed by `delay`.

    The output is cut to out[delay:], so its frames line up with the input's from the
    start; frames past the shorter signal are ignored. Pass `inp_track` (the input's
    `pitch_track`) to reuse it across outputs.
    """
    n = min(inp.shape[0], out.shape[0]) - delay_samples
    ta = inp_track if inp_track is not None else pitch_track(inp, sr)
    tb = pitch_track(out[delay_samples : delay_samples + n], sr)
    frames = min(ta.voiced.shape[0], tb.voiced.shape[0])
    va, vb = ta.voiced[:frames], tb.voiced[:frames]
    both = va & vb
    kept = float(np.sum(vb)) / max(float(np.sum(va)), 1.0)
    if np.any(both):
        ratio = tb.f0_hz[:frames][both] / ta.f0_hz[:frames][both]
        shift = float(np.median(1200.0 * np.log2(ratio)))
    else:
        shift = float("nan")
    return SpeechScore(kept, shift, shift - 100.0 * semitones, int(np.sum(both)))
