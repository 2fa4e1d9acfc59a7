"""Wake word stage: the real microWakeWord ``okay_nabu`` TFLite model on espeak-ng speech."""

from __future__ import annotations

import numpy as np
import pytest

from edge.audio import FRAME_SAMPLES, SAMPLE_RATE, float_to_int16
from edge.errors import AudioInputError
from edge.stages.wakeword import WakeWordDetector, interpreter_class, load_wakeword
from tests.speech import espeak, silence
from tests.stage_bundle import bundle_stage

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def detector(model_cache, tmp_path_factory) -> WakeWordDetector:
    spec, root = bundle_stage(tmp_path_factory.mktemp("bundle"), model_cache, "microwakeword", "wake")
    return load_wakeword(spec, root)


def stream(detector: WakeWordDetector, audio: np.ndarray) -> list[int]:
    """Reset, feed ``audio`` frame by frame as the loop does; the indices of frames that triggered."""
    detector.reset()
    pcm = float_to_int16(np.concatenate([silence(0.5), audio, silence(0.5)]))
    return [i // FRAME_SAMPLES for i in range(0, len(pcm), FRAME_SAMPLES) if detector.process(pcm[i:i + FRAME_SAMPLES])]


def test_a_tflite_interpreter_imports_and_the_bundle_factory_reads_the_models_json(detector):
    cls, name = interpreter_class()
    assert name in ("ai-edge-litert", "tflite-runtime") and cls.__name__ == "Interpreter"
    assert detector.wake_word == "Okay Nabu"
    assert detector.config.probability_cutoff == pytest.approx(0.85)
    assert detector.config.sliding_window_size == 5
    assert detector.stride == 3


@pytest.mark.parametrize("voice,speed", [("en-us", 130), ("en-gb+m3", 160), ("en-us+m7", 160)])
def test_okay_nabu_spoken_by_espeak_triggers_it_while_it_is_said(detector, espeak_available, voice, speed):
    phrase = espeak("okay nabu", voice, speed)
    hits = stream(detector, phrase)
    assert hits, f"not triggered; max smoothed probability {detector.max_probability:.3f}"
    first_s = hits[0] * FRAME_SAMPLES / SAMPLE_RATE
    assert 0.5 < first_s < 0.5 + len(phrase) / SAMPLE_RATE + 0.4  # during (or right after) the phrase


def test_ordinary_sentences_and_noise_do_not_trigger_it(detector, espeak_available):
    rng = np.random.default_rng(3)
    others = [espeak(t, v) for t, v in [("What is the capital of France?", "en-us"),
                                        ("Set a timer for ten minutes.", "en-gb+m3"),
                                        ("Okay, turn off the lights in the kitchen.", "en-us+f3"),
                                        ("I read a book about Nepal on the bus.", "en-us+m7")]]
    others.append((rng.standard_normal(3 * SAMPLE_RATE) * 0.01).astype(np.float32))
    for audio in others:
        assert stream(detector, audio) == []
        assert detector.max_probability < 0.5


def test_reset_makes_the_same_audio_score_the_same(detector, espeak_available):
    phrase = espeak("okay nabu", "en-us", 150)
    stream(detector, phrase)
    first = detector.max_probability
    stream(detector, espeak("Play some music.", "en-us"))
    stream(detector, phrase)
    assert detector.max_probability == pytest.approx(first, abs=1e-6)


def test_float_samples_are_refused_with_a_clear_error(detector):
    with pytest.raises(AudioInputError, match="int16"):
        detector.process(np.zeros(FRAME_SAMPLES, np.float32))
