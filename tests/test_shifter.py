"""Table tests for the streaming pitch shifter (pure numpy, no I/O).

The spec: the right pitch, no clicks (no high-frequency leak, no second-difference
spikes, no RMS dropouts), as many samples out as in on every call, output independent
of chunking, a fixed declared latency equal to the measured one, a bit-exact bypass,
int16 clipping without wrap-around. A negative control proves the measures catch the
clicks of per-chunk `librosa.effects.pitch_shift`.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt
import pytest

from worker_node.quality import (
    NaiveChunkShifter,
    cents,
    d2_ratio,
    harmonic_tone,
    hf_leak_db,
    measure_latency_samples,
    pitch_hz,
    reference_sine,
    run_processor,
    sine,
    steady,
    worst_rms_dip_db,
)
from worker_node.shifter import PitchShifter, Processor, warm_up

RATES_HZ = (48000, 16000)
SHIFTS = (-5.0, 4.0, 7.0, 0.0)
TONE_F0_HZ = 150.0
SINE_HZ = 220.0
SECONDS = 1.0
ODD_CHUNKINGS = ([128], [441], [4800], [1, 7, 1000, 3, 0, 333])

MAX_PITCH_ERROR_CENTS = 25.0
MAX_HF_LEAK_DB = -60.0
MAX_D2_RATIO = 3.0
MIN_RMS_DIP_DB = -6.0

Int16Array = npt.NDArray[np.int16]


def frame_20ms(sr: int) -> int:
    return sr // 50


def hf_cutoff_hz(sr: int) -> float:
    """8 kHz at 48 kHz, the same fraction of the band (the top two thirds) elsewhere.

    A click is broadband, so the share of its energy above sr/6 does not depend on the
    rate; at 16 kHz that is 2.67 kHz, still 8x above the highest output pitch (330 Hz).
    A fixed 8 kHz would be Nyquist at 16 kHz, and min(8000, 0.4 sr) would only look at
    the top fifth of the band, a weaker test.
    """
    return min(8000.0, sr / 6.0)


@functools.cache
def shifted(kind: str, sr: int, semitones: float, chunking: tuple[int, ...] = ()) -> Int16Array:
    """The shifter's output for a test signal, computed once per table row."""
    signal = (
        harmonic_tone(TONE_F0_HZ, sr, SECONDS) if kind == "tone" else sine(SINE_HZ, sr, SECONDS)
    )
    sizes = list(chunking) or [frame_20ms(sr)]
    return run_processor(PitchShifter(sr, semitones), signal, sizes)


table = pytest.mark.parametrize(("sr", "semitones"), [(sr, st) for sr in RATES_HZ for st in SHIFTS])


@table
def test_pitch_of_harmonic_tone_is_within_25_cents(sr: int, semitones: float) -> None:
    target = TONE_F0_HZ * 2.0 ** (semitones / 12.0)
    error = cents(pitch_hz(shifted("tone", sr, semitones), sr), target)
    assert abs(error) <= MAX_PITCH_ERROR_CENTS, f"{error:+.1f} cents off {target:.1f} Hz"


@table
def test_sine_has_no_high_frequency_leak(sr: int, semitones: float) -> None:
    leak = hf_leak_db(shifted("sine", sr, semitones), sr, cutoff_hz=hf_cutoff_hz(sr))
    assert leak <= MAX_HF_LEAK_DB, f"{leak:.1f} dB above {hf_cutoff_hz(sr):.0f} Hz"


@table
def test_sine_second_difference_is_within_3x_a_clean_sine(sr: int, semitones: float) -> None:
    out = shifted("sine", sr, semitones)
    clean = reference_sine(out, sr, SINE_HZ * 2.0 ** (semitones / 12.0))
    ratio = d2_ratio(steady(out, sr), clean)
    assert ratio <= MAX_D2_RATIO, f"largest second difference {ratio:.2f}x a clean sine's"


@table
def test_sine_has_no_rms_dip(sr: int, semitones: float) -> None:
    dip = worst_rms_dip_db(shifted("sine", sr, semitones), sr)
    assert dip >= MIN_RMS_DIP_DB, f"2.5 ms RMS dips {dip:.1f} dB below the median"


@table
def test_odd_chunkings_give_the_same_output_as_20ms(sr: int, semitones: float) -> None:
    reference = shifted("tone", sr, semitones)
    for chunking in ODD_CHUNKINGS:
        out = shifted("tone", sr, semitones, tuple(chunking))
        assert np.array_equal(out, reference), f"chunking {chunking} changed the output"


@table
def test_every_call_returns_as_many_samples_as_it_was_given(sr: int, semitones: float) -> None:
    shifter = PitchShifter(sr, semitones)
    rng = np.random.default_rng(7)
    for size in (0, 1, 128, 441, frame_20ms(sr), 4800, 5 * frame_20ms(sr), 3):
        chunk = rng.integers(-8000, 8000, size, dtype=np.int16)
        out = shifter.process(chunk)
        assert out.shape == (size,) and out.dtype == np.int16


@table
def test_measured_latency_equals_the_declared_one(sr: int, semitones: float) -> None:
    declared = PitchShifter(sr, semitones).latency_samples
    for chunking in ([frame_20ms(sr)], [441], [128]):
        measured = measure_latency_samples(lambda: PitchShifter(sr, semitones), sr, chunking)
        assert measured == declared, (
            f"chunking {chunking}: measured {measured}, declared {declared}"
        )


@pytest.mark.parametrize("sr", [8000, 11025, 16000, 22050, 44100, 48000])
def test_latency_is_fixed_and_at_most_20ms(sr: int) -> None:
    latencies = {PitchShifter(sr, st).latency_samples for st in (*SHIFTS, -12.0, 12.0, 0.5)}
    assert len(latencies) == 1, f"latency depends on the shift: {sorted(latencies)}"
    shifter = PitchShifter(sr, 4.0)
    assert shifter.latency_ms <= 20.0
    if sr == 48000:
        assert shifter.latency_samples <= 960


@pytest.mark.parametrize("sr", RATES_HZ)
def test_bypass_at_0_semitones_is_the_input_delayed_bit_exact(sr: int) -> None:
    rng = np.random.default_rng(3)
    signal = rng.integers(-32768, 32767, sr // 2, dtype=np.int16, endpoint=True)
    latency = PitchShifter(sr, 0.0).latency_samples
    expected = np.concatenate((np.zeros(latency, dtype=np.int16), signal[:-latency]))
    for chunking in ([frame_20ms(sr)], [128], [441]):
        out = run_processor(PitchShifter(sr, 0.0), signal, chunking)
        assert np.array_equal(out, expected), f"chunking {chunking}"


@table
def test_loud_input_clips_without_wrapping(sr: int, semitones: float) -> None:
    # A tone driven twice past full scale (flat-topped): its shifted peaks overshoot.
    loud = harmonic_tone(TONE_F0_HZ, sr, 0.5, amplitude=2.0)
    out = run_processor(PitchShifter(sr, semitones), loud, [frame_20ms(sr)]).astype(np.int32)
    assert out.max() == 32767 or out.min() == -32768, "the test did not reach the rails"
    # Wrap-around turns +32768 into -32768: a step of about the whole range.
    assert np.max(np.abs(np.diff(out))) < 32768


def test_naive_per_chunk_librosa_fails_the_click_criteria() -> None:
    """Negative control: the measures above catch the clicks of chunk-wise processing."""
    sr, semitones = 48000, 4.0
    out = run_processor(NaiveChunkShifter(sr, semitones), sine(SINE_HZ, sr, 0.4), [sr // 50])
    clean = reference_sine(out, sr, SINE_HZ * 2.0 ** (semitones / 12.0))
    assert hf_leak_db(out, sr, cutoff_hz=hf_cutoff_hz(sr)) > MAX_HF_LEAK_DB
    assert d2_ratio(steady(out, sr), clean) > MAX_D2_RATIO


def test_pitch_shifter_is_a_processor() -> None:
    assert isinstance(PitchShifter(48000, 4.0), Processor)


def test_reset_restores_the_fresh_state() -> None:
    sr = 16000
    tone = harmonic_tone(TONE_F0_HZ, sr, 0.3)
    shifter = PitchShifter(sr, 4.0)
    first = run_processor(shifter, tone, [320])
    shifter.reset()
    assert np.array_equal(run_processor(shifter, tone, [320]), first)


def test_other_rates_keep_length_and_chunking_invariance() -> None:
    for sr in (8000, 11025, 22050, 44100):
        tone = harmonic_tone(TONE_F0_HZ, sr, 0.3)
        a = run_processor(PitchShifter(sr, 7.0), tone, [frame_20ms(sr)])
        b = run_processor(PitchShifter(sr, 7.0), tone, [128, 441])
        assert np.array_equal(a, b), f"{sr} Hz"


def test_rejects_what_it_cannot_process() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        PitchShifter(96000, 4.0)
    with pytest.raises(TypeError, match="int16"):
        PitchShifter(48000, 4.0).process(np.zeros(960, dtype=np.float32))


def test_warm_up_runs() -> None:
    warm_up(16000)


def test_dc_offset_stays_a_dc_offset() -> None:
    sr = 48000
    out = run_processor(PitchShifter(sr, 4.0), np.full(sr // 2, 5000, dtype=np.int16), [960])
    assert np.all(np.abs(steady(out, sr) - 5000.0) <= 100.0)
