"""Accuracy gates on real models and real (espeak-ng) speech: they pass what is equal, fail what is damaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.stages.vad import SileroVad
from export.calibration import CalibrationError, Clip, noise_clips, speech_set
from export.gates import (
    GateFailed,
    GateResult,
    asr_wer_increase,
    enforce,
    gate_rows,
    tts_mel_distance,
    tts_roundtrip_wer,
    vad_frame_agreement_f1,
)
from export.vad import specialize_16k

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def silero(model_cache) -> Path:
    from export.fetch import model_file

    return model_file("silero-vad", "model", model_cache)


@pytest.fixture(scope="module")
def clips(espeak_available) -> list[Clip]:
    return speech_set(8, seed=0) + noise_clips(1)


@pytest.fixture(scope="module")
def damaged_vad(silero, tmp_path_factory) -> Path:
    """The 16 kHz graph with Gaussian noise (60 % of each tensor's spread) on the encoder conv weights."""
    import onnx
    from onnx import numpy_helper

    work = tmp_path_factory.mktemp("damaged")
    model = onnx.load(str(specialize_16k(silero, work / "vad16k.onnx")))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        if "encoder" in init.name and init.name.endswith("weight"):
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((w + rng.normal(0, 0.6 * w.std(), w.shape)).astype(w.dtype), init.name))
    onnx.save(model, str(work / "damaged.onnx"))
    return work / "damaged.onnx"


@pytest.fixture(scope="module")
def moonshine(model_cache):
    from export.tts import moonshine_asr

    return moonshine_asr(model_cache)


def test_vad_frame_f1_of_the_float_model_against_itself_is_one(silero, clips):
    result = vad_frame_agreement_f1(silero, silero, clips, threshold=0.5, min_f1=0.98)
    assert result.value == 1.0 and result.passed
    assert result.detail["flipped_frames"] == 0
    assert result.detail["speech_frames_float"] > 100  # the set really has speech in it


def test_the_16k_specialized_graph_gives_exactly_the_published_models_probabilities(silero, clips, tmp_path):
    spec = specialize_16k(silero, tmp_path / "vad16k.onnx")
    a, b = SileroVad(silero, threads=1), SileroVad(spec, threads=1)
    for clip in clips[:3]:
        a.reset(), b.reset()
        np.testing.assert_array_equal(a.probabilities(clip.audio), b.probabilities(clip.audio))
    assert spec.stat().st_size < silero.stat().st_size * 0.6  # the 8 kHz branch is gone


def test_a_damaged_vad_fails_the_f1_gate_and_enforce_raises_with_the_table(silero, damaged_vad, clips):
    result = vad_frame_agreement_f1(silero, damaged_vad, clips, threshold=0.5, min_f1=0.98)
    print(f"\ndamaged VAD F1 vs float: {result.value:.3f}")
    assert not result.passed and result.value < 0.98
    with pytest.raises(GateFailed) as err:
        enforce([result])
    assert err.value.code == "export.gate"
    assert "frame_f1_vs_float" in str(err.value)
    rows = gate_rows(err.value.results)
    assert rows[0][:2] == ["stage", "metric"] and rows[1][0] == "vad" and rows[1][-1] == "FAIL"


def test_a_calibration_set_that_is_too_small_is_refused_with_a_clear_error(silero, clips):
    with pytest.raises(CalibrationError, match="too small: 3 utterances") as err:
        vad_frame_agreement_f1(silero, silero, clips[:3])
    assert err.value.code == "export.calibration"
    short = [Clip(f"c{i}", c.audio[:512 * 10], c.text) for i, c in enumerate(clips)]  # 9 clips, 90 frames
    with pytest.raises(CalibrationError, match="90 frames"):
        vad_frame_agreement_f1(silero, silero, short)


def test_gate_results_judge_both_directions():
    assert GateResult.judge("llm", "top1", 0.95, 0.95, ">=").passed
    assert not GateResult.judge("llm", "ppl_ratio", 1.051, 1.05, "<=").passed
    with pytest.raises(ValueError):
        GateResult.judge("x", "y", 1.0, 1.0, "<")


def test_tts_round_trip_brings_back_paris(moonshine, espeak_available):
    from export.calibration import espeak

    sentences = ["The capital of France is Paris.", "Set a timer for ten minutes."]
    result = tts_roundtrip_wer(lambda text: espeak(text, "en-us", 150), moonshine, sentences, sample_rate=16000)
    print(f"\nround trip: {result.detail['transcripts']} WER {result.value:.2f}")
    assert "paris" in result.detail["transcripts"][0].lower()
    assert result.passed


def test_tts_mel_distance_is_zero_for_the_same_speech_and_fails_for_damaged_speech(espeak_available):
    from export.calibration import espeak

    sentences = ["What time is it?", "Play some quiet music."]
    same = tts_mel_distance(lambda t: espeak(t), lambda t: espeak(t), sentences, sample_rate=16000, max_db=1.0)
    assert same.value == pytest.approx(0.0, abs=1e-6) and same.passed
    rng = np.random.default_rng(0)

    def hissy(text: str) -> np.ndarray:
        audio = espeak(text)
        return (audio + rng.normal(0, 0.02, audio.shape)).astype(np.float32)

    damaged = tts_mel_distance(lambda t: espeak(t), hissy, sentences, sample_rate=16000, max_db=1.0)
    slower = tts_mel_distance(lambda t: espeak(t, speed=150), lambda t: espeak(t, speed=120), sentences,
                              sample_rate=16000, max_db=50.0)
    print(f"\nmel distance: hiss {damaged.value:.2f} dB, slower speech (DTW) {slower.value:.2f} dB")
    assert not damaged.passed and damaged.value > 3.0
    assert slower.detail["length_ratio_max"] > 1.1  # different lengths went through DTW


def test_asr_wer_increase_is_zero_for_the_same_model_and_large_for_a_truncated_input(moonshine, espeak_available):
    from export.calibration import espeak
    from export.evalset import load_eval_set

    utterances = load_eval_set()[:8]
    eval_clips = [Clip(u.id, np.concatenate([np.zeros(4000, np.float32), espeak(u.text), np.zeros(4000, np.float32)]),
                       u.text) for u in utterances]
    same = asr_wer_increase(moonshine, moonshine, eval_clips, max_increase_points=1.0)
    assert same.value == 0.0 and same.passed
    cut = asr_wer_increase(moonshine, lambda a: moonshine.transcribe(a[: len(a) // 2]), eval_clips)
    print(f"\nWER float {same.detail['wer_float']:.3f}; half the audio: +{cut.value:.1f} points")
    assert not cut.passed and cut.value > 20
