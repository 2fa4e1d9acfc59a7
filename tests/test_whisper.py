"""Whisper tiny.en rebuilt from CTranslate2 weights: the weight mapping, the numpy features, transcripts
against faster-whisper, and the exported ONNX int8 stage on the edge runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edge.audio import SAMPLE_RATE, resample, to_mono
from edge.bundle import FileEntry, StageSpec
from edge.errors import ModelFileError
from edge.stages.base import SpeechRecognizer
from edge.stages.whisper import DecodeRules, greedy_decode, log_mel, mel_filters
from export.whisper_ct2 import Ct2Model, hf_state_dict, read_ct2_model
from tests.eval import normalize, synthesize

#: three utterances, three espeak-ng voices (the rebuilt model and faster-whisper must agree on each)
UTTERANCES = (("What is the capital of France?", "en-us"), ("Set a timer for ten minutes.", "en-us+f3"),
              ("Turn off the lights in the kitchen, please.", "en-gb+m3"))


@pytest.fixture(scope="module")
def ct2_dir(model_cache) -> Path:
    return model_cache / "models" / "whisper-tiny-en"


@pytest.fixture(scope="module")
def shipped(ct2_dir) -> Ct2Model:
    return read_ct2_model(ct2_dir / "model.bin")


# ---------------------------------------------------------------------------------------- weight mapping (fast)


@pytest.mark.models
def test_every_shipped_ctranslate2_variable_lands_on_a_whisper_parameter(shipped):
    assert shipped.spec_name == "WhisperSpec" and shipped.weight_dtypes() == {"float16"}
    shape, sd = hf_state_dict(shipped)
    assert (shape.d_model, shape.encoder_layers, shape.decoder_layers, shape.encoder_heads, shape.vocab_size,
            shape.num_mel_bins) == (384, 4, 4, 6, 51864, 80)
    # 4 encoder layers x 15 + 4 decoder layers x 24 + convs, positions, norms, embedding, head
    assert len(sd) == 4 * 15 + 4 * 24 + 4 + 2 + 4 + 1 + 1
    fused = shipped.variables["encoder/layer_2/self_attention/linear_0/weight"].astype(np.float32)
    np.testing.assert_array_equal(sd["model.encoder.layers.2.self_attn.k_proj.weight"], fused[384:768])
    np.testing.assert_array_equal(sd["model.encoder.layers.2.self_attn.v_proj.weight"], fused[768:])
    kv = shipped.variables["decoder/layer_1/attention/linear_1/bias"].astype(np.float32)
    np.testing.assert_array_equal(sd["model.decoder.layers.1.encoder_attn.v_proj.bias"], kv[384:])
    assert "model.decoder.layers.1.encoder_attn.k_proj.bias" not in sd  # Whisper's k has no bias
    assert sd["proj_out.weight"] is sd["model.decoder.embed_tokens.weight"]


@pytest.mark.models
def test_a_variable_the_mapping_does_not_know_or_a_k_bias_is_refused(shipped):
    extra = dict(shipped.variables, **{"encoder/layer_0/self_attention/rotary": np.zeros(3, np.float16)})
    with pytest.raises(ModelFileError, match="not mapped.*rotary"):
        hf_state_dict(Ct2Model(shipped.spec_name, 6, 3, extra, shipped.aliases, shipped.dtypes))
    biased = dict(shipped.variables)
    b = biased["decoder/layer_3/self_attention/linear_0/bias"].copy()
    b[400] = 0.5  # inside the k third
    biased["decoder/layer_3/self_attention/linear_0/bias"] = b
    with pytest.raises(ModelFileError, match="non-zero bias"):
        hf_state_dict(Ct2Model(shipped.spec_name, 6, 3, biased, shipped.aliases, shipped.dtypes))


def test_a_truncated_model_bin_is_refused_with_its_name(ct2_dir, tmp_path):
    head = (ct2_dir / "model.bin").open("rb").read(4096)
    (tmp_path / "model.bin").write_bytes(head)
    with pytest.raises(ModelFileError, match="model.bin is truncated"):
        read_ct2_model(tmp_path / "model.bin")


@pytest.mark.parametrize("quantization, rel_tol", [("float16", 1e-3), ("int8", 1e-2)])
def test_weights_written_by_the_ctranslate2_converter_map_back_to_the_original(ct2_dir, tmp_path, quantization,
                                                                               rel_tol):
    """A small random Whisper through CTranslate2's own converter (int8: with per-row scales) and back."""
    import ctranslate2
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperTokenizerFast

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=51864, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        decoder_start_token_id=50257, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # no zero biases or unit norms: every variable distinct, none deduplicated
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "hf")
    WhisperTokenizerFast(tokenizer_file=str(ct2_dir / "tokenizer.json")).save_pretrained(tmp_path / "hf")
    ctranslate2.converters.TransformersConverter(str(tmp_path / "hf")).convert(str(tmp_path / "ct2"),
                                                                               quantization=quantization)
    ct2 = read_ct2_model(tmp_path / "ct2" / "model.bin")
    assert ("int8" in ct2.weight_dtypes()) == (quantization == "int8")
    shape, sd = hf_state_dict(ct2)
    ref = model.state_dict()
    assert set(sd) == set(ref)
    for name, value in sd.items():
        want = ref[name].numpy()
        scale = float(np.abs(want).max())
        assert np.abs(value - want).max() <= rel_tol * scale, name


# ---------------------------------------------------------------------------------------- features (fast)


def test_numpy_mel_filters_are_the_slaney_bank_transformers_uses():
    from transformers import WhisperFeatureExtractor

    ref = WhisperFeatureExtractor(feature_size=80).mel_filters
    assert mel_filters(80).shape == ref.shape == (201, 80)
    np.testing.assert_allclose(mel_filters(80), ref, atol=1e-7)


def test_numpy_log_mel_matches_faster_whisper_and_transformers_on_the_speech_frames(espeak_available):
    from faster_whisper.feature_extractor import FeatureExtractor
    from transformers import WhisperFeatureExtractor

    audio = synthesize("Remind me to call my sister at six.", "en-us+m7")
    ours = log_mel(audio, mel_filters(80))
    assert ours.shape == (80, 3000)
    content = len(audio) // 160
    # faster-whisper (Whisper's transcribe loop): the audio's frames, then zeros in feature space
    fw = FeatureExtractor(80)(audio)[:, :content]
    assert float(np.abs(ours[:, :content] - fw).max()) < 1e-4
    assert not ours[:, content:].any()
    # transformers pads the audio itself with 30 s of silence: the speech frames agree
    ref = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=SAMPLE_RATE, return_tensors="np")
    assert float(np.abs(ours[:, :content - 2] - ref.input_features[0][:, :content - 2]).max()) < 1e-3
    # over 30 s: only the first 30 s count, as one Whisper window
    long = np.tile(audio, int(np.ceil(31 * SAMPLE_RATE / len(audio))))
    np.testing.assert_array_equal(log_mel(long, mel_filters(80)), log_mel(long[:30 * SAMPLE_RATE], mel_filters(80)))


def test_greedy_decoding_never_picks_suppressed_or_timestamp_tokens_and_always_ends():
    rules = DecodeRules(sot=7, eot=2, no_timestamps=9, prompt=(7, 9), suppress=(4,), suppress_begin=(2, 5),
                        max_tokens=5, max_tokens_per_s=1.0)
    fed = []

    def step(ids, i, eot_at=3):
        fed.append(list(ids))
        logits = np.zeros(12, np.float32)
        logits[[10, 4, 5, 3, 2]] = [9, 8, 6, 1, -1]  # a timestamp > suppressed 4 > begin-suppressed 5 > 3 > eot
        if i == eot_at:
            logits[2] = 100.0
        return logits

    # step 0: 10 (timestamp), 4, 2 and 5 are banned -> 3; then 5 is allowed; the EOT at step 3 ends it
    assert greedy_decode(step, rules, 5 * SAMPLE_RATE) == [3, 5, 5]
    assert fed[:2] == [[7, 9], [3]]
    # an EOT that never comes: the budget (max_tokens = 5) ends the decode
    assert greedy_decode(lambda ids, i: step(ids, i, eot_at=-1), rules, 5 * SAMPLE_RATE) == [3, 5, 5, 5, 5]
    assert rules.budget(SAMPLE_RATE) == 5 and DecodeRules(1, 2, 3, (1, 3), max_tokens=224).budget(SAMPLE_RATE) == 18


# ---------------------------------------------------------------------------------------- transcripts (models)


@pytest.fixture(scope="module")
def clips(espeak_available, model_cache):
    audio = [synthesize(text, voice) for text, voice in UTTERANCES]
    wav, rate = sf.read(str(model_cache / "models" / "moonshine-base-en" / "beckett.wav"), dtype="float32")
    return audio, resample(to_mono(wav), rate, SAMPLE_RATE)


@pytest.fixture(scope="module")
def decode_config(ct2_dir):
    from export.whisper import decode_config as make
    from export.whisper_ct2 import special_tokens

    return make(special_tokens(ct2_dir / "tokenizer.json"), json.loads((ct2_dir / "config.json").read_text()))


def _faster_whisper(ct2_dir: Path, compute_type: str):
    from faster_whisper import WhisperModel

    model = WhisperModel(str(ct2_dir), device="cpu", compute_type=compute_type, cpu_threads=2)

    def transcribe(audio: np.ndarray) -> str:
        segments, _ = model.transcribe(audio, language="en", beam_size=1, temperature=0.0, without_timestamps=True,
                                       condition_on_previous_text=False, vad_filter=False)
        return "".join(s.text for s in segments).strip()

    return model, transcribe


@pytest.mark.models
def test_decoding_suppresses_exactly_what_faster_whisper_suppresses(ct2_dir, decode_config):
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import get_suppressed_tokens

    model, _ = _faster_whisper(ct2_dir, "int8")
    tok = Tokenizer(model.hf_tokenizer, False, task="transcribe", language="en")
    assert list(get_suppressed_tokens(tok, [-1])) == decode_config["suppress"]
    assert decode_config["prompt"] == [tok.sot, tok.no_timestamps] and decode_config["eot"] == tok.eot


@pytest.mark.models
def test_the_rebuilt_transformers_model_transcribes_like_faster_whisper(ct2_dir, clips, decode_config):
    import torch

    from edge.stages.whisper import WhisperTokenizer
    from export.whisper_ct2 import build_hf_model

    model = build_hf_model(ct2_dir)
    rules, tok, filters = DecodeRules.from_config(decode_config), WhisperTokenizer(ct2_dir / "tokenizer.json"), mel_filters()
    _, reference = _faster_whisper(ct2_dir, "float32")

    def rebuilt(audio: np.ndarray) -> str:
        with torch.no_grad():
            enc = model.model.encoder(torch.from_numpy(log_mel(audio, filters)[None])).last_hidden_state
            past = {}

            def step(ids, i):
                out = model(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([ids]),
                            past_key_values=past.get("kv"), use_cache=True)
                past["kv"] = out.past_key_values
                return out.logits[0, -1].numpy()

            return tok.decode(greedy_decode(step, rules, len(audio)))

    speech, beckett = clips
    for audio in [*speech, beckett]:
        ours, theirs = rebuilt(audio), reference(audio)
        print(f"\nrebuilt {ours!r}\nfaster-whisper {theirs!r}")
        assert normalize(ours) == normalize(theirs) and normalize(ours)
    assert normalize(rebuilt(beckett)) == normalize("Ever tried, ever failed. No matter, try again. Fail again. "
                                                    "Fail better.")


# ---------------------------------------------------------------------------------------- ONNX export + edge
# The ONNX export (~25 s the first time) is cached under the sottovoce cache's export/whisper, shared by
# these tests, bench/asr.py and the bundle builder; the full gated export (about 2 more minutes of WER
# measurement on 44 utterances and three int8 plans the first time) is marked slow.


def _as_stage(root: Path, models: Path, ct2_dir: Path, config: dict) -> StageSpec:
    """A bundle-shaped ``asr/`` directory (links) naming the files by role, as the builder writes it."""
    (root / "asr").mkdir(parents=True)
    names = {"encoder": ("encoder.onnx", models / "encoder_model.onnx"),
             "decoder": ("decoder.onnx", models / "decoder_model_merged.onnx"),
             "tokenizer": ("tokenizer.json", ct2_dir / "tokenizer.json")}
    for name, src in names.values():
        (root / "asr" / name).symlink_to(src)
    np.save(root / "asr" / "mel_filters.npy", mel_filters(80))
    names["mel_filters"] = ("mel_filters.npy", None)
    files = [FileEntry(f"asr/{name}", "", (root / "asr" / name).stat().st_size) for name, _ in names.values()]
    roles = {role: f"asr/{name}" for role, (name, _) in names.items()}
    return StageSpec(kind="whisper", runtime="onnxruntime", files=files, config=dict(config, files=roles))


@pytest.fixture(scope="module")
def float_models(model_cache):
    from export.whisper import float_models as build

    return build(cache=model_cache, workdir=model_cache / "export" / "whisper")


@pytest.mark.models
def test_the_edge_int8_recognizer_transcribes_a_question_about_france(float_models, clips, decode_config, tmp_path):
    """The harshest int8 plan (every MatMul of both graphs) on the edge runtime, loaded through ``load_asr``."""
    from edge.stages.whisper import load_asr
    from export.quantize import op_counts
    from export.whisper import INT8_PLANS, int8_models

    float_dir, ct2_dir = float_models
    spec = _as_stage(tmp_path, int8_models(INT8_PLANS[0], float_dir), ct2_dir, decode_config)
    asr = load_asr(spec, tmp_path, ["CPUExecutionProvider"], 2)
    assert isinstance(asr, SpeechRecognizer)
    for graph in ("encoder.onnx", "decoder.onnx"):
        assert op_counts(tmp_path / "asr" / graph).get("MatMulInteger", 0) > 0, graph
    text = asr.transcribe(clips[0][0])
    print(f"\nwhisper int8 {text!r} RTF {asr.last_compute_s / asr.last_audio_s:.3f}")
    assert "capital" in text.lower() and "france" in text.lower()
    assert asr.last_tokens and len(asr.last_tokens) <= asr.rules.budget(len(clips[0][0]))
    assert asr.transcribe(np.zeros(SAMPLE_RATE, np.float32)) == "" and asr.last_compute_s == 0.0


@pytest.mark.models
def test_the_float_onnx_export_transcribes_like_faster_whisper_float(float_models, clips, decode_config, tmp_path):
    from edge.stages.whisper import load_asr

    float_dir, ct2_dir = float_models
    asr = load_asr(_as_stage(tmp_path, float_dir, ct2_dir, decode_config), tmp_path, ["CPUExecutionProvider"], 2)
    _, reference = _faster_whisper(ct2_dir, "float32")
    speech, beckett = clips
    for audio in (speech[1], beckett):
        assert normalize(asr.transcribe(audio)) == normalize(reference(audio))


@pytest.mark.slow
@pytest.mark.models
def test_the_gated_int8_export_ships_the_first_plan_within_one_wer_point(model_cache, tmp_path):
    from export.whisper import export_whisper

    artifact = export_whisper(tmp_path / "asr", quantization="dynamic-int8", cache=model_cache,
                              workdir=model_cache / "export" / "whisper", measure_latency=False)
    assert artifact.kind == "whisper" and artifact.quantization["scheme"] == "dynamic-int8"
    assert artifact.drift["gate"] == "passed" and artifact.drift["wer_increase_points"] <= 1.0
    assert artifact.drift["int8_bytes"] < artifact.drift["float_bytes"]
    # the shipped plan is the first that passed: every plan tried before it failed its gate
    tried = artifact.drift["plans_tried"]
    assert tried[-1]["plan"] == artifact.quantization["plan"] and tried[-1]["passed"]
    assert not any(t["passed"] for t in tried[:-1])
    assert artifact.drift["gates"][0]["detail"]["utterances"] >= 40
    assert set(artifact.roles) == {"encoder", "decoder", "tokenizer", "mel_filters"}
    assert np.load(artifact.files["mel_filters.npy"]).shape == (201, 80)
