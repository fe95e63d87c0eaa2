"""The shipped robot voice (models/robot), loaded the way a node loads it.

The spec for any package's processor, shown on one that is not a pitch shift: it passes the
push check; as many int16 samples out as in, for any chunk size; the same output however the
input is chunked; its batch step gives exactly what per-stream calls give (mixed frame
lengths and sample rates); it really transforms the voice (new sidebands, low correlation
with the input); an impulse comes out exactly `latency_samples` later.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker_node.package import Loaded, load, run_check
from worker_node.package import test_audio as voice_audio  # not collected as a test

ROBOT_DIR = Path(__file__).resolve().parent.parent / "models" / "robot"


@pytest.fixture(scope="module")
def robot() -> Loaded:
    return load(ROBOT_DIR)


def stream(proc: object, audio: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Feed `audio` through `proc.process` in chunks of `sizes` (cycled); the output."""
    outs, at, i = [], 0, 0
    while at < len(audio):
        frames = audio[at:at + sizes[i % len(sizes)]]
        out = proc.process(frames)  # type: ignore[attr-defined]
        assert len(out) == len(frames) and out.dtype == np.int16
        outs.append(out)
        at, i = at + len(frames), i + 1
    return np.concatenate(outs)


def test_push_check_passes() -> None:
    report = run_check(ROBOT_DIR)
    assert report["name"] == "robot" and report["batch"] is True
    assert report["streams_per_gpu"] == 4 and report["latency_ms"] == 0.0


@pytest.mark.parametrize("size", [1, 7, 161, 441, 959, 4801])
def test_output_length_matches_input_for_odd_chunks(robot: Loaded, size: int) -> None:
    audio = voice_audio(44100, 0.3)
    assert len(stream(robot.make(44100), audio, [size])) == len(audio)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_output_does_not_depend_on_chunking(robot: Loaded, rate: int) -> None:
    audio = voice_audio(rate, 2.0)
    rng = np.random.default_rng(rate)
    sizes = [int(rate * ms / 1000) for ms in rng.uniform(10, 100, 200)]
    whole = robot.make(rate).process(audio)
    chunked = stream(robot.make(rate), audio, sizes)
    assert np.max(np.abs(whole.astype(np.int32) - chunked)) <= 1


def test_batch_step_equals_per_stream_calls(robot: Loaded) -> None:
    assert robot.batch is not None
    rates = [48000, 16000, 48000, 16000]
    batched, alone = [robot.make(r) for r in rates], [robot.make(r) for r in rates]
    audios = [np.roll(voice_audio(r, 1.5), 977 * i) for i, r in enumerate(rates)]
    at, rng = [0] * 4, np.random.default_rng(7)
    for _ in range(40):
        frames = []
        for i, rate in enumerate(rates):       # each stream its own 10-100 ms chunk
            size = int(rate * rng.uniform(0.01, 0.1))
            frames.append(audios[i][at[i]:at[i] + size])
            at[i] += size
        outs = robot.batch(batched, frames)
        assert len(outs) == 4
        for out, proc, f in zip(outs, alone, frames, strict=True):
            assert out.dtype == np.int16 and np.array_equal(out, proc.process(f))


def test_output_is_really_transformed(robot: Loaded) -> None:
    rate = 48000
    audio = voice_audio(rate)                    # 150 Hz and its harmonics
    out = robot.make(rate).process(audio)
    assert out.dtype == np.int16 and np.all(np.isfinite(out.astype(np.float64)))
    assert np.corrcoef(audio, out)[0, 1] < 0.9
    # ring modulation by 60 Hz: a strong sideband at 150 - 60 = 90 Hz the input lacks
    spectrum_in, spectrum_out = (np.abs(np.fft.rfft(a.astype(np.float64))) for a in (audio, out))
    hz_90 = 90 * len(audio) // rate
    assert spectrum_out[hz_90] > 10 * spectrum_in[hz_90]
    assert np.sqrt(np.mean(out.astype(np.float64) ** 2)) > 0.2 * np.sqrt(
        np.mean(audio.astype(np.float64) ** 2))     # transformed, not silenced


@pytest.mark.parametrize("at", [0, 333, 1234])
def test_impulse_comes_out_latency_samples_later(robot: Loaded, at: int) -> None:
    proc = robot.make(48000)
    impulse = np.zeros(4800, dtype=np.int16)
    impulse[at] = 20000
    out = stream(proc, impulse, [480, 97])
    assert np.flatnonzero(out)[0] == at + proc.latency_samples
