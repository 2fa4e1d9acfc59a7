"""Moonshine base-en ASR stage: real .ort models, espeak-ng speech, the recorded Beckett sample, WER."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from edge.audio import SAMPLE_RATE, resample, to_mono
from edge.errors import ModelFileError
from edge.stages.base import SpeechRecognizer
from edge.stages.moonshine import BinTokenizer, MoonshineRecognizer, load_asr
from export.fetch import model_file
from tests.eval import corpus_wer, evaluate, load_eval_set, normalize, synthesize, wer
from tests.stage_bundle import bundle_stage

pytestmark = pytest.mark.models

# The eval subset this test runs: the first six utterances of the set, in file order (not picked).
SUBSET = 6
# Bounds on corpus WER of the subset. Measured with onnxruntime 1.32 on the whole 22-utterance set
# (`tests/eval.py`): en-us 4.9 %, en-us+f3 9.9 %, en-us at 20 dB SNR white noise 25.4 %; on this subset
# 0 %, 5.7 %, 5.7 %. The bounds leave room for one more word wrong per utterance in a clean voice and
# about 1.5x the full-set noisy figure; a broken decoder (lost cache, wrong token map) scores near 100 %.
CLEAN_WER_BOUND = 0.15
NOISY_WER_BOUND = 0.35
BECKETT = "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better."


@pytest.fixture(scope="module")
def asr(model_cache, tmp_path_factory) -> MoonshineRecognizer:
    spec, root = bundle_stage(tmp_path_factory.mktemp("bundle"), model_cache, "moonshine-base-en", "asr")
    spec.config.update({"bos_id": 1, "eos_id": 2, "max_tokens_per_s": 6.5})
    return load_asr(spec, root, ["CPUExecutionProvider"], 2)


def test_wer_normalizes_case_punctuation_and_numbers_before_counting_words():
    assert normalize("Set a timer for 10 minutes.") == "set a timer for ten minutes".split()
    assert normalize("Wake me at 7:30, or 3:00!") == "wake me at seven thirty or three oclock".split()
    assert normalize("Twenty-five % of 1,144") == "twenty five percent of one thousand one hundred forty four".split()
    assert wer("What is the capital of France?", "what is the capital of france") == 0.0
    assert wer("turn off the lights", "turn of the light") == pytest.approx(2 / 4)
    assert wer("stop", "") == 1.0
    assert corpus_wer([("a b c d", "a b c d"), ("e f", "e x f y")]) == pytest.approx(2 / 6)


def test_the_bundle_factory_builds_a_speech_recognizer(asr):
    assert isinstance(asr, SpeechRecognizer)


def test_the_tokenizer_file_holds_the_sentencepiece_vocabulary_with_bos_and_eos(model_cache, asr):
    tok = BinTokenizer(model_file("moonshine-base-en", "tokenizer", model_cache))
    assert len(tok) == 32000
    assert tok.pieces[asr.bos_id] == b"<s>" and tok.pieces[asr.eos_id] == b"</s>"
    assert [tok.pieces[3 + b] for b in (0, 65, 255)] == [b"\x00", b"A", b"\xff"]  # byte fallback
    assert tok.decode([tok.pieces.index("\u2581capital".encode()), tok.pieces.index("\u2581of".encode())]) == "capital of"


def test_token_lengths_of_128_bytes_and_more_take_two_length_bytes():
    long_piece = b"x" * 300
    blob = bytes([3]) + b"abc" + bytes([0]) + bytes([(300 & 0x7F) | 0x80, 300 >> 7]) + long_piece + bytes([1]) + b"z"
    assert BinTokenizer.parse(blob) == [b"abc", b"", long_piece, b"z"]
    with pytest.raises(ModelFileError, match="truncated"):
        BinTokenizer.parse(blob[:-1])


def test_a_spoken_question_about_france_is_transcribed(asr, espeak_available):
    audio = synthesize("What is the capital of France?", "en-us")
    text = asr.transcribe(audio)
    rtf = asr.last_compute_s / asr.last_audio_s
    print(f"\nASR {asr.last_audio_s:.2f} s audio in {asr.last_compute_s:.3f} s (RTF {rtf:.3f}): {text!r}")
    assert "capital" in text.lower() and "france" in text.lower()
    assert asr.last_tokens and asr.last_compute_s > 0


def test_the_recorded_beckett_sample_gives_its_english_text(asr, model_cache):
    audio, rate = sf.read(str(model_file("moonshine-base-en", "sample", model_cache)), dtype="float32")
    audio = resample(to_mono(audio), rate, SAMPLE_RATE)
    text = asr.transcribe(audio)
    print(f"\nbeckett.wav ({asr.last_audio_s:.1f} s, RTF {asr.last_compute_s / asr.last_audio_s:.3f}): {text!r}")
    assert wer(BECKETT, text) <= 0.25


def test_silence_and_very_short_audio_return_empty_text_without_running_the_models(asr):
    assert asr.transcribe(np.zeros(2 * SAMPLE_RATE, dtype=np.float32)) == ""
    assert asr.last_compute_s == 0.0 and asr.last_tokens == []
    loud_but_short = np.random.default_rng(1).uniform(-0.5, 0.5, int(0.09 * SAMPLE_RATE)).astype(np.float32)
    assert asr.transcribe(loud_but_short) == ""
    assert asr.last_compute_s == 0.0
    assert asr.transcribe(np.zeros(0, dtype=np.float32)) == ""


def test_decoding_always_stops_within_the_token_budget_for_the_audio_length(asr):
    noise = np.random.default_rng(2).uniform(-0.3, 0.3, SAMPLE_RATE).astype(np.float32)
    asr.transcribe(noise)
    assert asr.last_compute_s > 0
    assert len(asr.last_tokens) <= asr.max_new_tokens(SAMPLE_RATE) == 7


def test_wer_on_the_eval_subset_stays_under_the_measured_bounds(asr, espeak_available):
    utterances = load_eval_set()[:SUBSET]
    conditions = {
        "en-us": dict(voice="en-us"),
        "en-us+f3": dict(voice="en-us+f3"),
        "en-us 20dB SNR": dict(voice="en-us", snr_db=20.0, seed=3),
    }
    results = {}
    for name, cond in conditions.items():
        res = evaluate(asr.transcribe, utterances, **cond)
        results[name] = res.wer
        wrong = [f"{r!r} -> {h!r}" for r, h in res.pairs if wer(r, h) > 0]
        print(f"\nWER {name}: {res.wer:.3f} over {len(res.pairs)} utterances (RTF {res.rtf:.3f})"
              + "".join(f"\n  {w}" for w in wrong))
    assert results["en-us"] <= CLEAN_WER_BOUND
    assert results["en-us+f3"] <= CLEAN_WER_BOUND
    assert results["en-us 20dB SNR"] <= NOISY_WER_BOUND
