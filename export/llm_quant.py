"""Quantizing the exported LLM and gating it against float (used by ``export.llm``).

- ``dynamic-int8``: int8 weights on every weight ``MatMul`` of the transformer layers, symmetric in
  blocks of ``BLOCK`` input channels, as onnxruntime ``MatMulNBits`` (8 bits) with ``accuracy_level`` 4:
  activations are quantized to int8 at run time (per block) and the products run on int8 kernels.
  The token embedding and the LM head stay float (quantizing the LM head broke SmolLM2, MODELS.md),
  as do the activation x activation MatMuls of attention.
  Measured on SmolLM2-135M (14 prompts, ``GATE_SET``): onnxruntime ``quantize_dynamic`` per-channel
  int8 weights with per-tensor uint8 activations (``export.quantize.quantize_dynamic_int8``) on the
  same nodes gave top-1 agreement 0.59 / perplexity ratio 1.43 (0.87 with ``down_proj`` left float):
  the per-tensor activation scale cannot cover this model's activation outliers; blocks of 32 can.
- ``fp16``: float16 weights and compute, float32 inputs/outputs (the KV cache stays float32).
- ``static-qdq-s8s8`` and ``nncf-int8`` are not implemented for the LLM yet: they fall back to
  ``dynamic-int8`` and say so in ``quantization['note']``.
The gate (teacher forcing, both deterministic, the result cached beside the model):
- top-1 next-token agreement of candidate with float over float's own greedy continuations
  (<= ``CONTINUATION_TOKENS``) of the ``GATE_SET`` questions, >= the recipe's ``top1_agreement``;
- perplexity ratio candidate / float of the hand-written reference answers, <= ``perplexity_ratio``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge.stages.base import ChatMessage

SCHEMES = ("none", "dynamic-int8", "static-qdq-s8s8", "nncf-int8", "fp16")
#: schemes this module does not implement for the LLM, and what they fall back to
FALLBACK = {"static-qdq-s8s8": "dynamic-int8", "nncf-int8": "dynamic-int8"}
KEEP_FLOAT = ("embed_tokens", "lm_head")
DEFAULT_TOP1 = 0.95
DEFAULT_PPL_RATIO = 1.05
BITS, BLOCK, ACCURACY_LEVEL = 8, 32, 4  # MatMulNBits: int8 weights, blocks of 32, int8 compute
CONTINUATION_TOKENS = 32
GATE_VERSION = 3
SYSTEM = "You are a helpful voice assistant. Answer in one or two short sentences."

#: (question, reference answer): everyday voice-assistant turns, answers written by hand
GATE_SET: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are there in a week?", "There are seven days in a week."),
    ("What is two plus two?", "Two plus two is four."),
    ("Set a timer for ten minutes.", "Okay, I have set a timer for ten minutes."),
    ("What's the weather like on Mars?", "Mars is cold and dry, with thin air and frequent dust storms."),
    ("Can you tell me a short joke?", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("How do I boil an egg?", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("Why is the sky blue?", "Sunlight is scattered by the air, and blue light is scattered the most, so the sky "
                             "looks blue."),
    ("Give me a tip for staying focused.", "Work in short blocks of time and put your phone in another room."),
    ("How far away is the Moon?", "The Moon is about three hundred eighty-four thousand kilometers from Earth."),
    ("Translate hello into Spanish.", "Hello in Spanish is hola."),
    ("What should I cook for dinner tonight?", "How about a simple pasta with tomatoes, garlic and basil?"),
)


def scheme_dir(scheme: str) -> str:
    """The cache sub-directory of a scheme (a fallback scheme shares its target's)."""
    return f"onnx-{FALLBACK.get(scheme, scheme)}"


@dataclass
class QuantResult:
    model: Path
    lm: Any  # edge.stages.llm_onnx.OnnxCausalLM on ``model``
    quantization: dict[str, Any]
    drift: dict[str, Any]


def weight_matmuls(model_path: Path, keep_float: Sequence[str] = KEEP_FLOAT) -> tuple[list[str], list[str]]:
    """(nodes to quantize, nodes to leave float) among the MatMul/Gemm nodes of ``model_path``: a node is
    quantized when its second input is a weight initializer and its name matches none of ``keep_float``
    (nor produces ``logits``)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    quant, keep = [], []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        is_weight = len(node.input) > 1 and node.input[1] in inits
        protected = any(k in node.name or k in node.input[1] for k in keep_float) or "logits" in node.output
        (quant if is_weight and not protected else keep).append(node.name)
    return quant, keep


def gate_sequences(lm, pairs: Sequence[tuple[str, str]] = GATE_SET, system: str = SYSTEM
                   ) -> list[tuple[list[int], int]]:
    """(token ids of prompt + reference answer + end-of-turn, prompt length) for each pair."""
    im_end = lm.tokenizer.token_to_id("<|im_end|>")
    end = [int(im_end)] if im_end is not None else [int(lm.config.eos_ids[-1])]
    out = []
    for question, answer in pairs:
        prompt = lm.encode_chat([ChatMessage("system", system), ChatMessage("user", question)])
        answer_ids = lm.tokenizer.encode(answer, add_special_tokens=False).ids
        out.append((prompt + answer_ids + end, len(prompt)))
    return out


def continuation_sequences(lm, pairs: Sequence[tuple[str, str]] = GATE_SET, system: str = SYSTEM,
                           new_tokens: int = CONTINUATION_TOKENS) -> list[tuple[list[int], int]]:
    """(token ids of prompt + ``lm``'s greedy continuation, prompt length) for each question of ``pairs``."""
    out = []
    for question, _ in pairs:
        prompt = lm.encode_chat([ChatMessage("system", system), ChatMessage("user", question)])
        out.append((prompt + list(lm.generate_ids(prompt, new_tokens)), len(prompt)))
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def teacher_forced(float_lm, cand_lm, sequences: Sequence[tuple[list[int], int]]) -> dict[str, float]:
    """Over the answer positions of ``sequences``: top-1 agreement of ``cand_lm`` with ``float_lm``, and
    each model's perplexity of the reference tokens."""
    agree = total = 0
    nll_f = nll_c = 0.0
    for ids, plen in sequences:
        lf, lc = float_lm.logits(ids), cand_lm.logits(ids)
        rows = slice(plen - 1, len(ids) - 1)  # row t predicts ids[t + 1]
        target = np.asarray(ids[plen:], np.int64)
        agree += int((lf[rows].argmax(-1) == lc[rows].argmax(-1)).sum())
        total += len(target)
        idx = np.arange(len(target))
        nll_f -= float(_log_softmax(lf[rows])[idx, target].sum())
        nll_c -= float(_log_softmax(lc[rows])[idx, target].sum())
    return {"top1_agreement": agree / total, "positions": total, "ppl_float": float(np.exp(nll_f / total)),
            "ppl_candidate": float(np.exp(nll_c / total))}


def quantize_matmul_int8_blocks(src: Path, dst: Path, exclude_nodes: Sequence[str]) -> Path:
    """``MatMulNBits`` (``BITS`` bits, symmetric blocks of ``BLOCK``, ``ACCURACY_LEVEL``) on every weight
    MatMul of ``src`` except ``exclude_nodes``; writes ``dst`` (one file) and returns it."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from edge.errors import ModelFileError

    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        config = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                              bits=BITS)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), nodes_to_exclude=list(exclude_nodes),
                                         algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    except Exception as exc:  # onnxruntime's quantizer raises plain Exceptions
        raise ModelFileError(f"int8 block quantization of {src.name} failed: {str(exc).splitlines()[0]}") from exc
    return dst


def quantize_model(float_model: Path, out: Path, scheme: str) -> tuple[Path, dict[str, Any]]:
    """Write the ``scheme`` model to ``out/model.onnx`` (cached) and describe it for the manifest."""
    from export.quantize import convert_fp16

    dst = out / "model.onnx"
    quant, keep = weight_matmuls(float_model)
    if scheme == "dynamic-int8":
        desc = {"scheme": "dynamic-int8",
                "weights": f"int{BITS} symmetric, blocks of {BLOCK} (MatMulNBits, weight MatMuls of the layers)",
                "activations": f"int8 dynamic per block (quantized at run time, accuracy_level {ACCURACY_LEVEL})",
                "float": "token embedding, LM head, attention score MatMuls, norms",
                "quantized_nodes": len(quant), "float_matmuls": len(keep), "calibration": {"name": "none (dynamic)"}}
        if not (out / "done.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            quantize_matmul_int8_blocks(float_model, dst, keep)
    elif scheme == "fp16":
        desc = {"scheme": "fp16", "weights": "float16", "activations": "float16",
                "float": "inputs/outputs and KV cache stay float32", "calibration": {"name": "none"}}
        if not (out / "done.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            convert_fp16(float_model, dst, keep_io_types=True)
    else:
        raise ValueError(f"no quantizer for {scheme}")
    (out / "done.json").write_text(json.dumps(desc, sort_keys=True), encoding="utf-8")
    return dst, desc


def quantize_and_gate(
    float_model: Path,
    float_lm,
    tokenizer: Path,
    config: dict[str, Any],
    scheme: str,
    out: Path,
    gates: dict[str, Any],
    say: Callable[[str], None],
) -> QuantResult:
    """Quantize ``float_model`` with ``scheme`` (or its fallback) into ``out`` and gate it against
    ``float_lm``; returns the model, the runtime on it, the manifest's quantization and drift."""
    from export.gates import GateResult
    from export.llm import runtime_model

    actual = FALLBACK.get(scheme, scheme)
    say(f"quantizing the LLM ({actual})")
    model, desc = quantize_model(float_model, out, actual)
    if actual != scheme:
        desc = {**desc, "requested": scheme,
                "note": f"{scheme} is not implemented for the LLM stage yet; shipped {actual} instead"
                        + (" (MatMulNBits is not a TensorRT op: those nodes run on the CUDA or CPU provider)"
                           if scheme == "static-qdq-s8s8" else "")}
    lm = runtime_model(model, tokenizer, config)
    min_top1 = float(gates.get("top1_agreement", DEFAULT_TOP1))
    max_ratio = float(gates.get("perplexity_ratio", DEFAULT_PPL_RATIO))
    key = hashlib.sha256(json.dumps([GATE_SET, SYSTEM, CONTINUATION_TOKENS, GATE_VERSION]).encode()).hexdigest()
    cached = out / f"gate-{key[:12]}.json"
    if cached.is_file():
        m = json.loads(cached.read_text(encoding="utf-8"))
    else:
        say(f"gating {actual} against float: top-1 agreement >= {min_top1:g} over float's greedy continuations, "
            f"perplexity ratio <= {max_ratio:g} over reference answers ({len(GATE_SET)} prompts)")
        cont = teacher_forced(float_lm, lm, continuation_sequences(float_lm))
        ref = teacher_forced(float_lm, lm, gate_sequences(float_lm))
        m = {"continuations": cont, "references": ref}
        cached.write_text(json.dumps(m, sort_keys=True), encoding="utf-8")
    cont, ref = m["continuations"], m["references"]
    ratio = ref["ppl_candidate"] / ref["ppl_float"]
    results = [
        GateResult.judge("llm", "top1_agreement", cont["top1_agreement"], min_top1, ">=",
                         {"positions": cont["positions"], "prompts": len(GATE_SET),
                          "over": "float greedy continuations, teacher-forced"}),
        GateResult.judge("llm", "perplexity_ratio", ratio, max_ratio, "<=",
                         {"positions": ref["positions"], "prompts": len(GATE_SET), "over": "reference answers",
                          "ppl_float": round(ref["ppl_float"], 4), "ppl_candidate": round(ref["ppl_candidate"], 4)}),
    ]
    passed = all(r.passed for r in results)
    drift = {"top1_agreement": round(cont["top1_agreement"], 6), "perplexity_ratio": round(ratio, 6),
             "top1_agreement_on_references": round(ref["top1_agreement"], 6),
             "ppl_float": round(ref["ppl_float"], 4), "ppl_quantized": round(ref["ppl_candidate"], 4),
             "quantized_bytes": dst_size(out), "gates": [r.to_dict() for r in results],
             "gate": "passed" if passed else "failed"}
    return QuantResult(model, lm, desc, drift)


def dst_size(out: Path) -> int:
    """Bytes of the quantized model (with any external data) in ``out``."""
    return sum(p.stat().st_size for p in out.glob("model.onnx*"))
