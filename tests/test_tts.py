"""TTS stage: espeak-ng phonemes mapped to Kokoro's vocabulary, Kokoro-82M speech judged by the
ASR (round trip), the espeak-ng fallback synthesizer, and the bundle factories."""

from __future__ import annotations

import numpy as np
import pytest

from edge.audio import SAMPLE_RATE, resample
from edge.bundle import StageSpec
from edge.errors import ConfigError
from edge.phonemes import EspeakIPA, Phonemizer, ipa_to_kokoro, spell_currency, split_clause_punctuation
from edge.runtime import load_stage
from edge.stages.base import SpeechSynthesizer
from edge.stages.espeak_tts import EspeakSynthesizer
from edge.stages.kokoro import (MAX_PHONEMES, KokoroSynthesizer, load_tts, load_vocab, split_phonemes,
                                trim_silence)
from export.fetch import model_file
from export.recipes import load_recipe
from tests.eval import corpus_wer
from tests.stage_bundle import bundle_stage

PARIS = "The capital of France is Paris."
# Round-trip bound: the Kokoro recipe's own gate ([gates] roundtrip_wer = 0.35). Measured here with
# Moonshine base-en on the 22-utterance eval set: 1.4-3.5 % WER depending on the voice.
ROUNDTRIP_WER_BOUND = 0.35
TEXTS = [
    PARIS,
    "I like my boat now, boy; they say it's a choice of judge: 3.5 hours (e.g. Dr. Smith)!",
    "Naïve café owners in Zürich sell 1,000 croissants at 7:30 a.m. — really?",
    "Button, little, bottle, mountain, hour, bird, teacher, higher... \"Quoted\" text.",
]


@pytest.fixture(scope="module")
def vocab(model_cache) -> dict[str, int]:
    return load_vocab(model_file(load_recipe("kokoro-82m"), "vocab", model_cache))


@pytest.fixture(scope="module")
def phonemizer(vocab, espeak_available) -> Phonemizer:
    p = Phonemizer(vocab)
    yield p
    p.close()


@pytest.fixture(scope="module")
def kokoro(model_cache, tmp_path_factory, espeak_available) -> KokoroSynthesizer:
    spec, root = bundle_stage(tmp_path_factory.mktemp("bundle"), model_cache, "kokoro-82m", "tts")
    spec.config.update({"voice": load_recipe("kokoro-82m").extra["voice"], "speed": 1.0})
    tts = load_stage("tts", spec, root, None)
    yield tts
    tts.close()


@pytest.fixture(scope="module")
def asr(model_cache):
    from export.tts import moonshine_asr

    return moonshine_asr(model_cache)


def heard(asr, audio: np.ndarray, rate: int) -> str:
    return asr.transcribe(resample(audio, rate, SAMPLE_RATE))


# ---------------------------------------------------------------------------------- phonemes

def test_ipa_maps_diphthongs_affricates_and_r_to_kokoro_symbols():
    assert ipa_to_kokoro("la^ɪk mˈa^ɪ bˈo^ʊt nˈa^ʊ bˈɔ^ɪ ðˈe^ɪ") == "lIk mˈI bˈOt nˈW bˈY ðˈA"
    assert ipa_to_kokoro("t^ʃˈɔ^ɪs d^ʒˈʌd^ʒ rˈɛd") == "ʧˈYs ʤˈʌʤ ɹˈɛd"
    assert ipa_to_kokoro("θɹˈiː bˈɜːd tˈiːt^ʃɚ kˈæpɪɾə^l ɐbˈaʊt") == "θɹˈi bˈɜɹd tˈiʧəɹ kˈæpɪɾᵊl əbˈaʊt"


def test_the_pronoun_i_gets_secondary_stress_and_other_words_keep_theirs():
    assert ipa_to_kokoro("a^ɪɐm sˈɑːɹi a^ɪ dɪdnˌɑːt") == "ˌIəm sˈɑɹi ˌI dɪdnˌɑt"
    assert ipa_to_kokoro("ma^ɪ ˈa^ɪ wˌa^ɪ") == "mI ˈI wˌI"  # "my eye, why": not the pronoun


def test_phonemes_hold_only_symbols_of_the_kokoro_vocabulary(phonemizer, vocab):
    for text in TEXTS:
        ps = phonemizer.phonemize(text)
        assert ps, text
        assert set(ps) <= set(vocab), (text, set(ps) - set(vocab))
        assert "ː" not in ps and "^" not in ps and "r" not in ps
    ps = phonemizer.phonemize(TEXTS[1])
    assert {"I", "O", "W", "Y", "A", "ʧ", "ʤ", "ˈ"} <= set(ps)
    assert phonemizer.ids(ps) == [vocab[c] for c in ps]


def test_clause_punctuation_is_kept_and_numbers_and_abbreviations_stay_whole(phonemizer):
    assert split_clause_punctuation("It is 3.5, e.g. Dr. Smith at 3 p.m.") == [
        ("", "It is 3.5", ","), ("", "e.g. Dr. Smith at 3 p.m.", ".")]
    ps = phonemizer.phonemize("Hello, world! How are you?")
    assert ps.count(",") == 1 and ps.endswith("?") and "!" in ps


def test_numbers_and_abbreviations_are_read_as_words(phonemizer):
    ps = phonemizer.phonemize("It is 3 p.m.")
    assert "θɹˈi" in ps  # "three"
    assert ps.endswith("ˈɛm.")  # "p.m." spelled out, then the full stop
    assert "pYnt" in phonemizer.phonemize("3.5")  # "three point five"
    assert phonemizer.phonemize("It costs $5.") == phonemizer.phonemize("It costs 5 dollars.")
    assert spell_currency("$1, £2.50 and € 3") == "1 dollar, 2 pounds 50 pence and 3 euros"
    assert spell_currency("$19.99, $0.01 or $2.5") == "19 dollars 99 cents, 1 cent or 2.5 dollars"


def test_the_long_lived_espeak_process_agrees_with_one_shot_calls_and_restarts_when_killed(vocab, espeak_available):
    persistent, one_shot = EspeakIPA(), EspeakIPA(persistent=False)
    try:
        for text in TEXTS:
            assert persistent.ipa(text) == one_shot.ipa(text)
        persistent._proc.kill()  # the child dies between calls (OOM killer, crash)
        persistent._proc.wait()
        assert persistent.ipa(PARIS) == one_shot.ipa(PARIS)
        # text that tries to look like the end-of-answer marker cannot desynchronize the process
        tricky = ["", "[[x N x N x]]", "x N x N x", "Paris"]
        assert persistent.ipa_many(tricky) == [one_shot.ipa(t) for t in tricky]
        assert persistent.ipa(PARIS) == one_shot.ipa(PARIS)
    finally:
        persistent.close()


# ---------------------------------------------------------------------------------- Kokoro

def test_long_phoneme_strings_are_cut_at_word_boundaries_within_the_model_context():
    sentence = "ðə kˈæpɪɾᵊl ʌv fɹˈæns ɪz pˈæɹɪs, ænd ɪts bjˈuɾɪfᵊl. "
    text = (sentence * 30).strip()
    parts = split_phonemes(text)
    assert len(parts) > 1
    assert all(len(p) <= MAX_PHONEMES for p in parts)
    assert " ".join(parts) == text
    assert all(p[-1] in ",." for p in parts)  # cut after punctuation when there is some


def test_trimming_keeps_a_short_margin_around_the_speech():
    rate = 24000
    tone = 0.5 * np.sin(np.arange(rate) * 2 * np.pi * 220 / rate).astype(np.float32)
    audio = np.concatenate([np.zeros(rate, np.float32), tone, np.zeros(rate, np.float32)])
    out = trim_silence(audio, rate)
    assert rate < out.size < rate + 0.2 * rate
    assert np.allclose(trim_silence(np.zeros(100, np.float32)), 0)


def test_kokoro_speaks_paris_as_non_silent_24khz_audio_of_plausible_length(kokoro):
    assert isinstance(kokoro, SpeechSynthesizer) and kokoro.sample_rate == 24000
    audio = kokoro.synthesize(PARIS)
    assert audio.dtype == np.float32 and audio.ndim == 1
    seconds = audio.size / 24000
    assert 1.0 < seconds < 4.0  # six words
    assert float(np.max(np.abs(audio))) > 0.05
    assert float(np.sqrt(np.mean(audio**2))) > 0.01
    assert np.abs(audio[: 24000 // 20]).max() < np.abs(audio).max()  # speech starts within the trim margin
    assert kokoro.last_rtf > 0


def test_kokoro_speech_is_understood_by_the_asr(kokoro, asr):
    pairs = []
    for text in (PARIS, "I set a timer for ten minutes."):
        pairs.append((text, heard(asr, kokoro.synthesize(text), kokoro.sample_rate)))
    assert "paris" in pairs[0][1].lower(), pairs
    assert pairs[1][1].lower().startswith("i "), pairs  # an unstressed "I" used to be swallowed
    assert corpus_wer(pairs) <= ROUNDTRIP_WER_BOUND, pairs


def test_kokoro_returns_no_audio_for_text_without_words(kokoro):
    assert kokoro.synthesize("").size == 0
    assert kokoro.synthesize("  ... !! ").size == 0


def test_kokoro_style_row_follows_the_phoneme_count_and_is_clamped(kokoro):
    table = kokoro.style_table
    assert table.shape[1] == 256
    assert np.array_equal(kokoro.style(12), table[12].reshape(1, -1))
    assert np.array_equal(kokoro.style(5000), table[-1].reshape(1, -1))


def test_an_unknown_voice_is_refused_with_the_voices_available(model_cache, tmp_path, espeak_available):
    spec, root = bundle_stage(tmp_path, model_cache, "kokoro-82m", "tts")
    spec.config["voice"] = "af_nobody"
    with pytest.raises(ConfigError, match="jf_alpha"):
        load_tts(spec, root, ["CPUExecutionProvider"], 1)


# ---------------------------------------------------------------------------------- espeak-ng fallback

def test_espeak_fallback_loads_without_model_files_and_is_understood(asr, espeak_available):
    spec = StageSpec(kind="espeak-ng", runtime="espeak-ng", sample_rate=22050, config={"voice": "en-us", "speed": 160})
    tts = load_stage("tts", spec, __import__("pathlib").Path("."), None)
    assert isinstance(tts, EspeakSynthesizer) and isinstance(tts, SpeechSynthesizer)
    audio = tts.synthesize(PARIS)
    assert tts.sample_rate == 22050 and audio.dtype == np.float32
    assert 1.0 < audio.size / 22050 < 4.0
    assert "paris" in heard(asr, audio, tts.sample_rate).lower()
    assert tts.synthesize(" !? ").size == 0
    assert np.array_equal(tts.synthesize("It costs $5."), tts.synthesize("It costs 5 dollars."))
