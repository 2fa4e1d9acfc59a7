"""Non-LLM stage exporters: Silero VAD int8 behind its gate, targets, wake word import, Kokoro validation."""

from __future__ import annotations

import pytest

from edge.boards import load_board
from edge.bundle import FileEntry, StageSpec
from edge.stages.vad import load_vad
from export.calibration import CalibrationError, speech_set
from export.recipes import load_recipe
from export.targets import describe_target_differences, stage_plan, tensorrt_options
from export.vad import export_vad

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def vad_x86(model_cache, tmp_path_factory, espeak_available):
    return export_vad(load_recipe("silero-vad"), model_cache, load_board("x86-dev"),
                      tmp_path_factory.mktemp("work"), quantize=True)


def test_export_vad_for_x86_ships_int8_only_when_gate_and_size_favour_it(vad_x86):
    q, d, r = vad_x86.quantization, vad_x86.drift, vad_x86.report
    print(f"\nVAD x86-dev: {q['scheme']} F1 {d['frame_f1_vs_float']:.4f}, {d['int8_bytes']} vs {d['float_bytes']} B, "
          f"{r['int8_ms_per_frame']:.3f} vs {r['float_ms_per_frame']:.3f} ms/frame; {r.get('verdict') or q.get('reason')}")
    assert "int8_ms_per_frame" not in d  # timings never reach the manifest (reproducible bundles)
    assert d["float_bytes"] == 2327524 and 0 < d["int8_bytes"] < d["float_bytes"] * 0.3
    gate = d["gates"][0]
    assert gate["metric"] == "frame_f1_vs_float" and gate["threshold"] == 0.98  # from the recipe's [gates]
    favourable = gate["passed"]
    if favourable:
        assert q["scheme"] == "static-qdq-s8s8+dynamic-lstm" and d["gate"] == "passed"
        assert q["calibration"]["utterances"] >= 8 and "DynamicQuantizeLSTM" in q["ops"]
    else:
        assert q["scheme"] == "none" and q["reason"]  # the manifest says why float ships


def test_the_shipped_vad_loads_in_the_runtime_and_hears_speech(vad_x86, tmp_path):
    import os

    import numpy as np

    name = vad_x86.roles["model"]
    (tmp_path / "vad").mkdir()
    os.symlink(vad_x86.files[name], tmp_path / "vad" / name)
    spec = StageSpec(kind="silero-vad", runtime="onnxruntime", files=[FileEntry(f"vad/{name}", "", 0)],
                     config={**vad_x86.config, "files": {"model": f"vad/{name}"}})
    vad = load_vad(spec, tmp_path, ["CPUExecutionProvider"], 1)
    clip = speech_set(1, seed=5, snr_db=(None,))[0]
    probs = vad.probabilities(clip.audio)
    assert probs.max() > 0.9 and probs[:5].max() < 0.2  # leading silence is not speech


def test_export_vad_without_quantization_ships_float_and_says_so(model_cache, tmp_path):
    art = export_vad(load_recipe("silero-vad"), model_cache, load_board("rpi4"), tmp_path, quantize=False)
    assert art.quantization["scheme"] == "none" and "not requested" in art.quantization["reason"]
    assert list(art.files) == ["silero_vad.onnx"]


def test_export_vad_refuses_a_calibration_set_that_is_too_small(model_cache, tmp_path, espeak_available):
    with pytest.raises(CalibrationError, match="vad calibration set is too small"):
        export_vad(load_recipe("silero-vad"), model_cache, load_board("x86-dev"), tmp_path, quantize=True,
                   calibration=speech_set(4, seed=2))


def test_targets_choose_scheme_and_providers_and_print_what_differs():
    jetson = stage_plan("jetson-orin-nano", "llm")
    assert jetson.scheme == "fp16" and jetson.providers[0] == "TensorrtExecutionProvider"
    assert jetson.provider_options["TensorrtExecutionProvider"]["trt_fp16_enable"] is True
    assert stage_plan("rpi5", "llm").scheme == "dynamic-int8" and tensorrt_options("rpi5") == {}
    rows = describe_target_differences(["rpi5", "rpi4", "jetson-orin-nano", "x86-dev"])
    assert rows[0] == ["setting", "rpi5", "rpi4", "jetson-orin-nano", "x86-dev"]
    keys = {r[0]: r[1:] for r in rows[1:]}
    assert "tensorrt options" in keys and keys["tensorrt options"][0] == "-"
    assert "trt_engine_cache_path=" in keys["tensorrt options"][2]
    assert "tflite runtime" in keys and "asr scheme" not in keys  # prebuilt everywhere: not a difference


def test_export_wake_imports_okay_nabu_and_passes_its_gates(model_cache, espeak_available):
    from export.wake import export_wake

    art = export_wake(load_recipe("microwakeword"), model_cache, load_board("rpi4"))
    assert art.runtime == "tflite" and art.roles == {"model": "okay_nabu.tflite", "config": "okay_nabu.json"}
    assert art.drift["gate"] == "passed", art.drift["gates"]
    assert art.config["tflite_runtime"] == "tflite-runtime" and art.config["probability_cutoff"] == 0.85


def test_export_tts_validates_kokoro_by_round_trip(model_cache, tmp_path, espeak_available):
    pytest.importorskip("edge.stages.kokoro", reason="the Kokoro runtime stage has not landed yet")
    from export.tts import export_tts

    art = export_tts(load_recipe("kokoro-82m"), model_cache, load_board("x86-dev"), tmp_path, levels=(),
                     sentences=("The capital of France is Paris.", "Set a timer for ten minutes."))
    print(f"\nKokoro round trip: {art.drift['gates'][-1]['detail']['transcripts']}")
    assert art.drift["gate"] == "passed" and art.drift["roundtrip_wer"] <= 0.35
    assert "paris" in art.drift["gates"][-1]["detail"]["transcripts"][0].lower()


@pytest.mark.slow
def test_export_tts_keeps_an_optimized_graph_only_when_it_measures_faster(model_cache, tmp_path, espeak_available):
    from export.tts import MIN_GAIN, export_tts

    art = export_tts(load_recipe("kokoro-82m"), model_cache, load_board("x86-dev"), tmp_path)
    tried = art.report["optimization_tried"]  # wall-clock figures: in the report, never in the manifest
    assert "optimization_tried" not in art.quantization
    assert set(tried) == {"basic", "extended"}
    kept = art.roles["model"] != "kokoro-v1.0.int8.onnx"
    if kept:
        level = art.roles["model"].split("opt-")[1].removesuffix(".onnx")
        t = tried[level]
        assert max(1 - t["optimized_run_s"] / t["original_run_s"], 1 - t["optimized_load_s"] / t["original_load_s"]) >= MIN_GAIN
    else:
        assert "original graph kept" in art.quantization["graph_note"]
