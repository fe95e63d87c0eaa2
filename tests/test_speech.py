"""Speech tests for the node's shifter: issue 12's targets on espeak-ng voices.

For every voice (a low male about 80 Hz, a male about 102 Hz, a female about 219 Hz)
and every shift a configured model uses, streamed in 20 ms chunks at 48 kHz: the
frame-wise pitch shift is within 25 cents of the requested one, the voiced frames
(pyin) kept are at least 0.9 of what librosa's offline pitch_shift keeps on the same
speech, and at least 0.9 absolute from 100 Hz up. A negative control shows the 20 ms
phase vocoder fails these targets on the low voice. Skipped without espeak-ng.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from common.config import load_config
from common.package import load_manifest
from research.quality import run_processor
from research.speech import (
    VOICES,
    PitchTrack,
    SpeechScore,
    compare,
    have_espeak,
    librosa_offline,
    pitch_track,
    voice,
)
from research.vocoder import PhaseVocoderShifter
from worker_node.splice import SpliceShifter

pytestmark = pytest.mark.skipif(
    not have_espeak(),
    reason="espeak-ng is not installed: the speech tests need it (apt-get install espeak-ng; "
    "CI installs it)",
)

SR_HZ = 48000
CHUNK = SR_HZ // 50
SHIFTS = tuple(sorted({float(s) for m in load_config({}).models  # the shipped pitch voices
                       if (s := load_manifest(m.package).params.get("semitones"))}))
MAX_SHIFT_ERROR_CENTS = 25.0
MIN_KEPT_OF_LIBROSA = 0.9
MIN_KEPT = 0.9
MIN_KEPT_FROM_HZ = 100.0
NAMES = [v.name for v in VOICES]
SHIFTERS = {"splice": SpliceShifter, "vocoder": PhaseVocoderShifter}   # the node's; the old one

every_voice_and_shift = pytest.mark.parametrize(
    ("name", "semitones"), [(n, st) for n in NAMES for st in SHIFTS]
)


@functools.cache
def input_track(name: str) -> PitchTrack:
    return pitch_track(voice(name, SR_HZ), SR_HZ)


@functools.cache
def score(name: str, semitones: float, method: str) -> SpeechScore:
    """Voicing kept and frame-wise shift of one method on one voice, computed once."""
    speech = voice(name, SR_HZ)
    if method == "librosa":
        out, delay = librosa_offline(speech, SR_HZ, semitones), 0
    else:
        shifter = SHIFTERS[method](SR_HZ, semitones)
        out, delay = run_processor(shifter, speech, [CHUNK]), shifter.latency_samples
    return compare(speech, out, SR_HZ, delay, semitones, inp_track=input_track(name))


def test_the_configured_shifts_are_the_ones_the_issue_names() -> None:
    assert SHIFTS == (-5.0, 4.0, 7.0)


@pytest.mark.parametrize("name", NAMES)
def test_each_voice_speaks_at_its_pitch(name: str) -> None:
    """The generator is what the figures claim: median F0 within a semitone."""
    track = input_track(name)
    median = float(np.median(track.f0_hz[track.voiced]))
    declared = next(v.median_f0_hz for v in VOICES if v.name == name)
    assert abs(1200.0 * np.log2(median / declared)) <= 100.0, f"{name}: {median:.1f} Hz"
    assert median >= 78.0, "the lowest voice must be a low male (about 80 Hz)"


@every_voice_and_shift
def test_frame_wise_shift_is_within_25_cents(name: str, semitones: float) -> None:
    got = score(name, semitones, "splice")
    assert abs(got.shift_error_cents) <= MAX_SHIFT_ERROR_CENTS, (
        f"{name} {semitones:+g} st: shifted {got.shift_cents:+.0f} cents over "
        f"{got.frames_compared} frames"
    )


@every_voice_and_shift
def test_voicing_kept_is_at_least_0_9_of_librosa_offline(name: str, semitones: float) -> None:
    ours, reference = score(name, semitones, "splice"), score(name, semitones, "librosa")
    assert ours.voicing_kept >= MIN_KEPT_OF_LIBROSA * reference.voicing_kept, (
        f"{name} {semitones:+g} st: kept {ours.voicing_kept:.2f}, "
        f"librosa offline {reference.voicing_kept:.2f}"
    )


@pytest.mark.parametrize(
    ("name", "semitones"),
    [(v.name, st) for v in VOICES if v.median_f0_hz >= MIN_KEPT_FROM_HZ for st in SHIFTS],
)
def test_voicing_kept_is_at_least_0_9_from_100_hz_up(name: str, semitones: float) -> None:
    """Below 100 Hz the voice is judged against librosa offline only (the issue's target)."""
    got = score(name, semitones, "splice")
    assert got.voicing_kept >= MIN_KEPT, f"{name} {semitones:+g} st: {got.voicing_kept:.2f}"


def test_the_20ms_phase_vocoder_fails_the_low_voice() -> None:
    """Negative control: the targets catch the old model's loss of voicing."""
    old, reference = score("low-male", 4.0, "vocoder"), score("low-male", 4.0, "librosa")
    assert old.voicing_kept < MIN_KEPT_OF_LIBROSA * reference.voicing_kept


@pytest.mark.parametrize("semitones", SHIFTS)
def test_speech_output_does_not_depend_on_chunking(semitones: float) -> None:
    speech = voice("low-male", SR_HZ)[: SR_HZ * 2]
    reference = run_processor(SpliceShifter(SR_HZ, semitones), speech, [CHUNK])
    for chunking in ([441], [1, 7, 1000, 3, 0, 333], [4800]):
        out = run_processor(SpliceShifter(SR_HZ, semitones), speech, chunking)
        assert np.array_equal(out, reference), f"chunking {chunking} changed the output"


def test_speech_at_0_semitones_is_the_input_delayed_bit_exact() -> None:
    speech = voice("male", SR_HZ)
    shifter = SpliceShifter(SR_HZ, 0.0)
    out = run_processor(shifter, speech, [CHUNK])
    latency = shifter.latency_samples
    assert np.array_equal(out[latency:], speech[:-latency])
    assert not out[:latency].any()


def test_latency_is_at_most_20ms() -> None:
    shifter = SpliceShifter(SR_HZ, 4.0)
    assert shifter.latency_ms <= 20.0 and shifter.max_latency_ms <= 20.0
