"""Table tests for the streaming pitch shifters (pure numpy, no I/O).

The spec, for each method (the node's "splice" and the older phase "vocoder", a research
baseline in research/vocoder.py): the
right pitch, no clicks (no high-frequency leak, no second-difference spikes, no RMS
dropouts), as many samples out as in on every call, output independent of chunking, a
fixed declared latency equal to the measured one (the splice method's delay wanders by
up to half a splice around it, by design), a bit-exact bypass, int16 clipping without
wrap-around. A negative control proves the measures catch the clicks of per-chunk
`librosa.effects.pitch_shift`. Speech is judged in tests/test_speech.py.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from research.quality import (
    NaiveChunkShifter,
    cents,
    chunked,
    d2_ratio,
    harmonic_tone,
    hf_leak_db,
    measure_latency_samples,
    pitch_hz,
    reference_sine,
    run_processor,
    sine,
    speech_like,
    steady,
    worst_rms_dip_db,
)
from research.vocoder import PhaseVocoderShifter
from worker_node import package
from worker_node.splice import SpliceShifter

MODELS = Path(__file__).resolve().parent.parent / "models"
SHIFTERS = {"splice": SpliceShifter, "vocoder": PhaseVocoderShifter}
METHODS = tuple(SHIFTERS)

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


def make_shifter(sr: int, semitones: float, method: str) -> SpliceShifter | PhaseVocoderShifter:
    return SHIFTERS[method](sr, semitones)


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
def shifted(
    method: str, kind: str, sr: int, semitones: float, chunking: tuple[int, ...] = ()
) -> Int16Array:
    """A shifter's output for a test signal, computed once per table row."""
    signal = (
        harmonic_tone(TONE_F0_HZ, sr, SECONDS) if kind == "tone" else sine(SINE_HZ, sr, SECONDS)
    )
    sizes = list(chunking) or [frame_20ms(sr)]
    return run_processor(make_shifter(sr, semitones, method), signal, sizes)


@functools.cache
def gliding_voice(sr: int) -> Int16Array:
    return speech_like(sr, 2.0)


table = pytest.mark.parametrize(
    ("method", "sr", "semitones"),
    [(m, sr, st) for m in METHODS for sr in RATES_HZ for st in SHIFTS],
)
each_method = pytest.mark.parametrize("method", METHODS)


@table
def test_pitch_of_harmonic_tone_is_within_25_cents(method: str, sr: int, semitones: float) -> None:
    target = TONE_F0_HZ * 2.0 ** (semitones / 12.0)
    error = cents(pitch_hz(shifted(method, "tone", sr, semitones), sr), target)
    assert abs(error) <= MAX_PITCH_ERROR_CENTS, f"{error:+.1f} cents off {target:.1f} Hz"


@table
def test_sine_has_no_high_frequency_leak(method: str, sr: int, semitones: float) -> None:
    leak = hf_leak_db(shifted(method, "sine", sr, semitones), sr, cutoff_hz=hf_cutoff_hz(sr))
    assert leak <= MAX_HF_LEAK_DB, f"{leak:.1f} dB above {hf_cutoff_hz(sr):.0f} Hz"


@table
def test_sine_second_difference_is_within_3x_a_clean_sine(
    method: str, sr: int, semitones: float
) -> None:
    out = shifted(method, "sine", sr, semitones)
    clean = reference_sine(out, sr, SINE_HZ * 2.0 ** (semitones / 12.0))
    ratio = d2_ratio(steady(out, sr), clean)
    assert ratio <= MAX_D2_RATIO, f"largest second difference {ratio:.2f}x a clean sine's"


@table
def test_sine_has_no_rms_dip(method: str, sr: int, semitones: float) -> None:
    dip = worst_rms_dip_db(shifted(method, "sine", sr, semitones), sr)
    assert dip >= MIN_RMS_DIP_DB, f"2.5 ms RMS dips {dip:.1f} dB below the median"


@table
def test_odd_chunkings_give_the_same_output_as_20ms(method: str, sr: int, semitones: float) -> None:
    reference = shifted(method, "tone", sr, semitones)
    for chunking in ODD_CHUNKINGS:
        out = shifted(method, "tone", sr, semitones, tuple(chunking))
        assert np.array_equal(out, reference), f"chunking {chunking} changed the output"


@table
def test_every_call_returns_as_many_samples_as_it_was_given(
    method: str, sr: int, semitones: float
) -> None:
    shifter = make_shifter(sr, semitones, method)
    rng = np.random.default_rng(7)
    for size in (0, 1, 128, 441, frame_20ms(sr), 4800, 5 * frame_20ms(sr), 3):
        chunk = rng.integers(-8000, 8000, size, dtype=np.int16)
        out = shifter.process(chunk)
        assert out.shape == (size,) and out.dtype == np.int16


@table
def test_measured_latency_equals_the_declared_one(method: str, sr: int, semitones: float) -> None:
    """Exact for the phase vocoder; within half a splice (the documented wander) else."""
    declared = make_shifter(sr, semitones, method).latency_samples
    shifter = make_shifter(sr, semitones, method)
    slack = shifter.max_splice / 2.0 if isinstance(shifter, SpliceShifter) else 0.0
    for chunking in ([frame_20ms(sr)], [441], [128]):
        measured = measure_latency_samples(
            lambda: make_shifter(sr, semitones, method), sr, chunking
        )
        assert abs(measured - declared) <= slack, (
            f"chunking {chunking}: measured {measured}, declared {declared} +- {slack:g}"
        )


@each_method
@pytest.mark.parametrize("sr", [8000, 11025, 16000, 22050, 44100, 48000])
def test_latency_is_fixed_and_at_most_20ms(method: str, sr: int) -> None:
    latencies = {
        make_shifter(sr, st, method).latency_samples for st in (*SHIFTS, -12.0, 12.0, 0.5)
    }
    assert len(latencies) == 1, f"latency depends on the shift: {sorted(latencies)}"
    shifter = make_shifter(sr, 4.0, method)
    assert shifter.latency_ms <= 20.0
    if sr == 48000:
        assert shifter.latency_samples <= 960
    if isinstance(shifter, SpliceShifter):  # not even one output sample is later than that
        assert shifter.max_latency_ms <= 20.0


@pytest.mark.parametrize("semitones", [-24.0, -12.0, -5.0, 4.0, 7.0, 12.0, 24.0])
def test_splice_delay_stays_within_its_band_on_a_gliding_voice(semitones: float) -> None:
    """The read tap stays between 2 samples and 20 ms behind; its mean is the declared one."""
    sr = 48000
    shifter = SpliceShifter(sr, semitones)
    signal = gliding_voice(sr)
    delays = []
    for chunk in chunked(signal, [441]):
        shifter.process(chunk)
        delays.append(shifter.read_delay_samples())
    assert min(delays) >= 2.0
    assert max(delays) <= shifter.latency_samples + shifter.max_splice / 2.0
    mean_ms = 1000.0 * float(np.mean(delays)) / sr
    assert abs(mean_ms - shifter.latency_ms) <= 0.5, f"mean delay {mean_ms:.2f} ms"


@each_method
@pytest.mark.parametrize("sr", RATES_HZ)
def test_bypass_at_0_semitones_is_the_input_delayed_bit_exact(method: str, sr: int) -> None:
    rng = np.random.default_rng(3)
    signal = rng.integers(-32768, 32767, sr // 2, dtype=np.int16, endpoint=True)
    latency = make_shifter(sr, 0.0, method).latency_samples
    expected = np.concatenate((np.zeros(latency, dtype=np.int16), signal[:-latency]))
    for chunking in ([frame_20ms(sr)], [128], [441]):
        out = run_processor(make_shifter(sr, 0.0, method), signal, chunking)
        assert np.array_equal(out, expected), f"chunking {chunking}"


@table
def test_loud_input_clips_without_wrapping(method: str, sr: int, semitones: float) -> None:
    # A tone driven twice past full scale (flat-topped): its shifted peaks overshoot.
    loud = harmonic_tone(TONE_F0_HZ, sr, 0.5, amplitude=2.0)
    shifter = make_shifter(sr, semitones, method)
    out = run_processor(shifter, loud, [frame_20ms(sr)]).astype(np.int32)
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


@each_method
def test_every_method_is_a_processor(method: str) -> None:
    """What `worker_node.package.Loaded.make` asks of a model's processor."""
    shifter = make_shifter(48000, 4.0, method)
    assert isinstance(shifter.latency_samples, int) and shifter.latency_samples >= 0
    assert callable(shifter.process)


def test_the_pitch_voices_serve_the_speech_shifter() -> None:
    """The shipped pitch voices (models/miku, teto, kaito) build the splice method."""
    for name in ("miku", "teto", "kaito"):
        assert isinstance(package.load(MODELS / name).make(48000), SpliceShifter), name
    longer = PhaseVocoderShifter(48000, 4.0, window_ms=40.0)
    assert longer.latency_samples == 1919


@each_method
def test_reset_restores_the_fresh_state(method: str) -> None:
    sr = 16000
    tone = harmonic_tone(TONE_F0_HZ, sr, 0.3)
    shifter = make_shifter(sr, 4.0, method)
    first = run_processor(shifter, tone, [320])
    shifter.reset()
    assert np.array_equal(run_processor(shifter, tone, [320]), first)


@each_method
def test_other_rates_keep_length_and_chunking_invariance(method: str) -> None:
    for sr in (8000, 11025, 22050, 44100):
        tone = harmonic_tone(TONE_F0_HZ, sr, 0.3)
        a = run_processor(make_shifter(sr, 7.0, method), tone, [frame_20ms(sr)])
        b = run_processor(make_shifter(sr, 7.0, method), tone, [128, 441])
        assert np.array_equal(a, b), f"{sr} Hz"


@each_method
def test_rejects_what_it_cannot_process(method: str) -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        make_shifter(96000, 4.0, method)
    with pytest.raises(ValueError, match="semitones"):
        make_shifter(48000, 30.0, method)
    with pytest.raises(TypeError, match="int16"):
        make_shifter(48000, 4.0, method).process(np.zeros(960, dtype=np.float32))


@each_method
def test_dc_offset_stays_a_dc_offset(method: str) -> None:
    sr = 48000
    dc = np.full(sr // 2, 5000, dtype=np.int16)
    out = run_processor(make_shifter(sr, 4.0, method), dc, [960])
    assert np.all(np.abs(steady(out, sr) - 5000.0) <= 100.0)
