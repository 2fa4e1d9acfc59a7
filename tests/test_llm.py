"""The LLM stage on the real SmolLM2-135M-Instruct: GGUF -> ONNX export, the edge runtime, int8 gate.

The exports are cached under ``<model cache>/export/llm`` (the bundle builder uses the same place),
so only the first run pays for them.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edge.bundle import FileEntry, StageSpec
from edge.stages.base import ChatMessage, GenerationStats, LanguageModel
from edge.stages.llm_onnx import IncrementalDetokenizer, load_llm

SYSTEM = "You are a helpful voice assistant. Answer in one or two short sentences."


def _export(model_cache: Path, scheme: str):
    from export.llm import export_llm

    return export_llm("smollm2-135m-instruct", workdir=model_cache / "export" / "llm", quantization=scheme,
                      cache=model_cache, measure=False)


def _load(artifact):
    """The runtime built the way a board builds it: ``load_llm`` on a stage spec with file roles."""
    root = artifact.files["model.onnx"].parent
    spec = StageSpec(kind=artifact.kind, runtime=artifact.runtime,
                     files=[FileEntry(name, "", 0) for name in artifact.files],
                     config={**artifact.config, "files": dict(artifact.roles)})
    return load_llm(spec, root, ["CPUExecutionProvider"], 2)


@pytest.fixture(scope="module")
def float_artifact(model_cache):
    return _export(model_cache, "none")


@pytest.fixture(scope="module")
def llm(float_artifact):
    return _load(float_artifact)


@pytest.fixture(scope="module")
def int8_artifact(model_cache, float_artifact):
    return _export(model_cache, "dynamic-int8")


def _ask(lm, question: str, max_new_tokens: int = 40, **kw) -> tuple[list[str], GenerationStats]:
    stats = GenerationStats()
    pieces = list(lm.stream([ChatMessage("system", SYSTEM), ChatMessage("user", question)],
                            max_new_tokens=max_new_tokens, stats=stats, **kw))
    return pieces, stats


def test_exported_onnx_reproduces_torch_greedy_tokens(model_cache, float_artifact, llm):
    from export.llm import cache_key, resolve_source, torch_greedy

    assert float_artifact.drift["greedy_match_vs_torch"] == 1.0
    # a prompt the export did not check: torch float greedy vs the edge runtime, 32 new tokens
    src = resolve_source("smollm2-135m-instruct", model_cache)
    hf_dir = model_cache / "export" / "llm" / cache_key(src) / "hf"
    ids = llm.encode_chat([ChatMessage("system", SYSTEM), ChatMessage("user", "Name three colors of the rainbow.")])
    want = torch_greedy(hf_dir, [ids], 32, list(llm.config.eos_ids))[0]
    assert list(llm.generate_ids(ids, 32)) == want
    assert len(want) >= 8


def test_runtime_prompt_matches_transformers_chat_template(model_cache, float_artifact, llm):
    from transformers import AutoTokenizer

    from export.llm import cache_key, resolve_source

    hf_dir = model_cache / "export" / "llm" / cache_key(resolve_source("smollm2-135m-instruct", model_cache)) / "hf"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    msgs = [ChatMessage("system", SYSTEM), ChatMessage("user", "Hi, ça va? 🙂"),
            ChatMessage("assistant", "Yes, thanks."), ChatMessage("user", "Good.")]
    want = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in msgs],
                                   add_generation_prompt=True, tokenize=True)
    assert llm.encode_chat(msgs) == list(want)


def test_stage_config_names_stop_tokens_template_and_kv_layout(float_artifact):
    cfg = float_artifact.config
    assert 2 in cfg["eos_token_ids"]  # <|im_end|>
    assert "<|im_start|>" in cfg["chat_template"]
    assert cfg["system_prompt"] == SYSTEM
    assert (cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"]) == (30, 3, 64)
    assert len(cfg["past_inputs"]) == len(cfg["present_outputs"]) == 60
    assert float_artifact.drift["gate"] == "n/a" and float_artifact.quantization["scheme"] == "none"


def test_runtime_is_a_language_model_and_answers_capital_of_france_with_paris(llm):
    assert isinstance(llm, LanguageModel)
    pieces, stats = _ask(llm, "What is the capital of France?")
    reply = "".join(pieces)
    assert "Paris" in reply
    assert stats.stopped_by == "eos"
    assert stats.prompt_tokens > 20 and stats.new_tokens > 3
    assert stats.prefill_s > 0 and stats.decode_s > 0


def test_streaming_yields_many_pieces_that_join_to_the_decoded_reply(llm):
    pieces, stats = _ask(llm, "Tell me about the Moon.", max_new_tokens=24)
    assert len(pieces) >= 5
    ids = llm.encode_chat([ChatMessage("system", SYSTEM), ChatMessage("user", "Tell me about the Moon.")])
    assert "".join(pieces) == llm.decode(list(llm.generate_ids(ids, 24)))


def test_max_new_tokens_is_respected(llm):
    pieces, stats = _ask(llm, "Write a long story about a dragon.", max_new_tokens=5)
    assert stats.new_tokens == 5 and stats.stopped_by == "budget"
    assert 1 <= len(pieces) <= 5


def test_cancel_stops_generation_after_the_current_step(llm):
    cancel = threading.Event()
    stats = GenerationStats()
    got = []
    for piece in llm.stream([ChatMessage("user", "Write a long story about a dragon.")], max_new_tokens=60,
                            cancel=cancel, stats=stats):
        got.append(piece)
        cancel.set()
    assert stats.stopped_by == "cancel"
    assert stats.new_tokens <= 2 and len(got) == 1
    pre, pre_stats = [], GenerationStats()
    pre.extend(llm.stream([ChatMessage("user", "Hello")], max_new_tokens=10, cancel=cancel, stats=pre_stats))
    assert pre == [] and pre_stats.stopped_by == "cancel"


def test_incremental_detokenizer_never_emits_broken_utf8(llm):
    text = "Zürich 東京 🎉 naïve — café ☕ ok"
    ids = llm.tokenizer.encode(text, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(llm.tokenizer)
    pieces = [detok.push(t) for t in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert pieces.count("") >= 1  # some tokens only start a multi-byte character


def test_edge_runtime_imports_neither_torch_nor_transformers():
    code = ("import sys, edge.stages.llm_onnx, edge.chat; "
            "bad = [m for m in ('torch', 'transformers', 'optimum', 'export') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0


def test_int8_export_passes_its_gate_is_smaller_and_still_answers(int8_artifact, float_artifact):
    drift = int8_artifact.drift
    assert int8_artifact.quantization["scheme"] == "dynamic-int8"
    assert drift["gate"] == "passed"
    assert drift["top1_agreement"] >= 0.95 and drift["perplexity_ratio"] <= 1.05
    assert {g["metric"] for g in drift["gates"]} == {"top1_agreement", "perplexity_ratio"}
    int8_bytes = int8_artifact.files["model.onnx"].stat().st_size
    assert int8_bytes < 0.6 * float_artifact.quantization["float_bytes"]
    lm = _load(int8_artifact)
    pieces, _ = _ask(lm, "What is the capital of France?")
    assert "Paris" in "".join(pieces)


def test_int8_gate_rejects_a_model_whose_lm_head_is_quantized(tmp_path, model_cache, llm, float_artifact):
    """The gate must be able to fail: all MatMuls int8 (LM head included) is the known-broken case."""
    from export.llm import runtime_model
    from export.llm_quant import gate_sequences, teacher_forced
    from export.quantize import quantize_dynamic_int8

    from export.llm import cache_key, resolve_source

    work = model_cache / "export" / "llm" / cache_key(resolve_source("smollm2-135m-instruct", model_cache))
    bad = quantize_dynamic_int8(work / "onnx-float" / "model.onnx", tmp_path / "model.onnx",
                                op_types=("MatMul", "Gemm"), per_channel=False)
    bad_lm = runtime_model(bad, float_artifact.files["tokenizer.json"], float_artifact.config)
    m = teacher_forced(llm, bad_lm, gate_sequences(llm)[:4])
    assert m["top1_agreement"] < 0.95 or m["ppl_candidate"] / m["ppl_float"] > 1.05


def test_untied_lm_head_computes_the_same_logits_and_becomes_quantizable(tmp_path):
    """A tied head (``logits = h @ Transpose(embedding)``, as optimum exports SmolLM2) gets a weight of its
    own; the graph's output is unchanged, and only then can ``keep_float`` without ``lm_head`` pick it."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.llm_quant import KEEP_FLOAT, untie_lm_head, weight_matmuls

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 8)).astype(np.float32)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["model.embed_tokens.weight", "input_ids"], ["h0"], name="/model/embed_tokens/Gather"),
         helper.make_node("MatMul", ["h0", "layer.w"], ["h1"], name="/model/layers.0/mlp/MatMul"),
         helper.make_node("Transpose", ["model.embed_tokens.weight"], ["model.embed_tokens.weight_transposed"]),
         helper.make_node("MatMul", ["h1", "model.embed_tokens.weight_transposed"], ["logits"], name="/lm_head/MatMul")],
        "tied", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, 50])],
        [numpy_helper.from_array(emb, "model.embed_tokens.weight"), numpy_helper.from_array(w, "layer.w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    ids = np.array([[3, 7, 49]], np.int64)

    def run(m) -> np.ndarray:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]

    before = run(model)
    assert weight_matmuls(model, ("embed_tokens",))[0] == ["/model/layers.0/mlp/MatMul"]  # tied: not a weight
    untie_lm_head(model)
    np.testing.assert_allclose(run(model), before, rtol=1e-6)
    assert not any(n.op_type == "Transpose" for n in model.graph.node)
    assert weight_matmuls(model, ("embed_tokens",))[0] == ["/model/layers.0/mlp/MatMul", "/lm_head/MatMul"]
    assert weight_matmuls(model, KEEP_FLOAT)[0] == ["/model/layers.0/mlp/MatMul"]
    onnx.checker.check_model(model)


@pytest.mark.slow
def test_int8_with_quantized_lm_head_passes_its_gate_and_answers(model_cache, float_artifact):
    from export.llm import export_llm

    art = export_llm("smollm2-135m-instruct", workdir=model_cache / "export" / "llm", quantization="dynamic-int8",
                     keep_float=("embed_tokens",), cache=model_cache, measure=False)
    assert art.quantization["keep_float"] == ["embed_tokens"] and "LM head" not in art.quantization["float"]
    assert art.drift["gate"] == "passed", art.drift
    assert art.files["model.onnx"].parent.name == "dynamic-int8-keep-embed_tokens"
    pieces, _ = _ask(_load(art), "What is the capital of France?")
    assert "Paris" in "".join(pieces)


def test_fp16_for_gpu_boards_passes_its_gate_and_answers(model_cache, float_artifact):
    art = _export(model_cache, "fp16")
    assert art.quantization["scheme"] == "fp16" and art.drift["gate"] == "passed", art.drift
    assert art.drift["top1_agreement"] >= 0.99
    pieces, _ = _ask(_load(art), "What is the capital of France?")
    assert "Paris" in "".join(pieces)


def test_calibration_prompts_never_overlap_the_gate_prompts():
    from export.llm_quant import CALIBRATION_PROMPTS, GATE_SET

    assert len(CALIBRATION_PROMPTS) >= 16
    assert not set(CALIBRATION_PROMPTS) & {q for q, _ in GATE_SET}


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["static-qdq-s8s8", "nncf-int8"])
def test_static_qdq_and_nncf_are_built_and_judged_by_the_gate(model_cache, float_artifact, scheme):
    """Both schemes really quantize (QDQ / DequantizeLinear nodes in the graph) and their gate figures land
    in the drift; on SmolLM2 both fall under the 0.95 top-1 bar (measured), so the gate says failed."""
    from export.quantize import op_counts

    art = _export(model_cache, scheme)
    ops = op_counts(art.files["model.onnx"])
    assert art.quantization["scheme"] == scheme and "note" not in art.quantization
    assert ops.get("DequantizeLinear", 0) >= 100
    if scheme == "static-qdq-s8s8":
        assert ops.get("QuantizeLinear", 0) >= 100
    assert {g["metric"] for g in art.drift["gates"]} == {"top1_agreement", "perplexity_ratio"}
    assert art.drift["gate"] == ("passed" if art.drift["top1_agreement"] >= 0.95
                                 and art.drift["perplexity_ratio"] <= 1.05 else "failed")
