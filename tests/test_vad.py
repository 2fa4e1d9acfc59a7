"""Silero VAD v6 stage: real model, espeak-ng speech, silence and low noise."""

from __future__ import annotations

import numpy as np
import pytest

from edge.audio import FRAME_SAMPLES, float_to_int16
from edge.errors import AudioInputError
from edge.stages.base import VoiceActivityDetector
from edge.stages.vad import SileroVad, load_vad
from tests.speech import espeak, silence
from tests.stage_bundle import bundle_stage

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def vad(model_cache, tmp_path_factory) -> SileroVad:
    spec, root = bundle_stage(tmp_path_factory.mktemp("bundle"), model_cache, "silero-vad", "vad")
    return load_vad(spec, root, ["CPUExecutionProvider"], 2)


@pytest.fixture(scope="module")
def question(espeak_available) -> np.ndarray:
    """1 s silence, a spoken question, 1 s silence (float32, 16 kHz)."""
    return np.concatenate([silence(1.0), espeak("What is the capital of France?"), silence(1.0)])


def frame_rms(audio: np.ndarray) -> np.ndarray:
    n = len(audio) // FRAME_SAMPLES
    return np.sqrt(np.mean(audio[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES) ** 2, axis=1))


def test_the_bundle_factory_builds_a_voice_activity_detector(vad):
    assert isinstance(vad, VoiceActivityDetector)
    assert vad.frame_samples == 512


def test_speech_frames_score_high_and_the_silence_around_them_low(vad, question):
    vad.reset()
    probs = vad.probabilities(float_to_int16(question))
    rms = frame_rms(question)
    voiced = rms > 0.02  # frames where espeak is clearly sounding
    lead = slice(0, int(1.0 * 16000) // FRAME_SAMPLES)
    print(f"\nVAD {vad.mean_ms:.3f} ms per 32 ms frame; voiced frames >0.5: {np.mean(probs[voiced] > 0.5):.2f}")
    assert voiced.sum() > 20
    assert np.mean(probs[voiced] > 0.5) >= 0.8
    assert probs.max() > 0.95
    assert probs[lead].max() < 0.1
    # after the hangover of the model itself (~0.3 s), the trailing silence is low again
    tail = probs[-int(0.5 * 16000) // FRAME_SAMPLES:]
    assert tail.max() < 0.1


def test_low_background_noise_is_not_speech(vad):
    vad.reset()
    rng = np.random.default_rng(7)
    noise = (rng.standard_normal(3 * 16000) * 0.003).astype(np.float32)  # about -50 dBFS white noise
    probs = vad.probabilities(float_to_int16(noise))
    assert probs.max() < 0.3
    assert np.median(probs) < 0.05


def test_reset_forgets_context_and_state(vad, question):
    clip = float_to_int16(question[16000: 16000 + 40 * FRAME_SAMPLES])
    vad.reset()
    first = vad.probabilities(clip)
    carried = vad.probabilities(clip)  # same audio again, but after speech: state carried over
    vad.reset()
    again = vad.probabilities(clip)
    np.testing.assert_allclose(again, first, atol=1e-6)
    assert np.abs(carried - first).max() > 1e-3


def test_int16_and_float_frames_give_the_same_probability(vad, question):
    frame = question[32000: 32000 + FRAME_SAMPLES]
    vad.reset()
    p_int = vad.probability(float_to_int16(frame))
    vad.reset()
    p_float = vad.probability(float_to_int16(frame).astype(np.float32) / 32768.0)
    assert p_int == pytest.approx(p_float, abs=1e-6)


def test_a_frame_of_the_wrong_length_is_refused_with_an_audio_error(vad):
    with pytest.raises(AudioInputError, match="512"):
        vad.probability(np.zeros(480, dtype=np.int16))
