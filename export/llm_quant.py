"""Quantizing the exported LLM and gating it against float (used by ``export.llm``).

- ``dynamic-int8``: int8 weights on every weight ``MatMul`` of the transformer layers, symmetric in
  blocks of ``BLOCK`` input channels, as onnxruntime ``MatMulNBits`` (8 bits) with ``accuracy_level`` 4:
  activations are quantized to int8 at run time (per block) and the products run on int8 kernels.
  The token embedding and (by default, ``KEEP_FLOAT``) the LM head stay float (quantizing the LM head
  with per-tensor activations broke SmolLM2, MODELS.md), as do the activation x activation MatMuls of
  attention. With ``keep_float`` lacking ``lm_head`` the tied LM head is untied (``untie_lm_head``) and
  quantized the same way; measured on SmolLM2 (2 threads, same load): top-1 0.965 / perplexity ratio
  0.995 (passes), decode 44 vs 32 tok/s, time to first token 95 vs 148 ms, file 266 vs 234 MB.
  Blocks of 64 or 128 are faster still but fail the gate (top-1 0.949 and 0.924).
  Measured on SmolLM2-135M (14 prompts, ``GATE_SET``): onnxruntime ``quantize_dynamic`` per-channel
  int8 weights with per-tensor uint8 activations (``export.quantize.quantize_dynamic_int8``) on the
  same nodes gave top-1 agreement 0.59 / perplexity ratio 1.43 (0.87 with ``down_proj`` left float):
  the per-tensor activation scale cannot cover this model's activation outliers; blocks of 32 can.
- ``fp16``: float16 weights and compute, float32 inputs/outputs (the KV cache stays float32); the
  GPU boards' scheme. Measured: top-1 1.0 / perplexity ratio 1.000, 271 MB, 31 tok/s on the CPU provider.
- ``nncf-int8``: NNCF weight compression (``nncf.compress_weights``, ``INT8_SYM``: int8 weights per
  output channel, dequantized to float at run time by ``DequantizeLinear``) on the same weight MatMuls;
  the option for a user who wants NNCF's recipe. Measured on SmolLM2 (2 threads): top-1 0.946 /
  perplexity ratio 1.002 (fails the 0.95 gate by a hair; per-channel scales over 576 inputs are coarser
  than blocks of 32), 222 MB, and 4.9 tok/s vs 34 float on the CPU provider (the weights are
  dequantized on every step): not a default anywhere.
- ``static-qdq-s8s8``: onnxruntime static QDQ, int8 weights per channel and int8 activations per
  tensor calibrated (MinMax) on ``CALIBRATION_PROMPTS`` (never the gate's prompts) with float's own
  greedy continuations; the format TensorRT's int8 path takes. Measured on SmolLM2: top-1 0.45 /
  perplexity ratio 4.6 (0.80 / 1.01 with ``down_proj`` float): per-tensor activation scales cannot hold
  this model's outliers, so the gate refuses it and the Jetson profile ships ``fp16`` instead.
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


#: calibration questions for static QDQ: everyday assistant turns, disjoint from ``GATE_SET``
CALIBRATION_PROMPTS: tuple[str, ...] = (
    "Turn on the kitchen lights.", "What time is it in Tokyo?", "How do I make a cup of tea?",
    "Remind me to call my mother tomorrow.", "What is the tallest mountain in the world?",
    "How many legs does a spider have?", "Tell me something interesting about octopuses.",
    "What is the boiling point of water?", "Play some relaxing music.", "Who painted the Mona Lisa?",
    "How do plants make their food?", "What is a good name for a cat?", "Spell the word necessary.",
    "How long should I sleep each night?", "What is the square root of eighty-one?",
    "Why do leaves change color in autumn?",
)
CALIBRATION_NEW_TOKENS = 24


def scheme_dir(scheme: str, keep_float: Sequence[str] = KEEP_FLOAT) -> str:
    """The cache sub-directory of a scheme; a ``keep_float`` other than ``KEEP_FLOAT`` gets its own
    (``-keep-<names>``, ``-keep-none``)."""
    name = f"onnx-{scheme}"
    if tuple(sorted(keep_float)) != tuple(sorted(KEEP_FLOAT)):
        name += "-keep-" + ("+".join(sorted(keep_float)) or "none")
    return name


@dataclass
class QuantResult:
    model: Path
    lm: Any  # edge.stages.llm_onnx.OnnxCausalLM on ``model``
    quantization: dict[str, Any]
    drift: dict[str, Any]


def weight_matmuls(model: Path | Any, keep_float: Sequence[str] = KEEP_FLOAT) -> tuple[list[str], list[str]]:
    """(nodes to quantize, nodes to leave float) among the MatMul/Gemm nodes of ``model`` (a path or an
    ``onnx.ModelProto``): a node is quantized when its second input is a weight initializer and its name
    matches none of ``keep_float`` (the node producing ``logits`` counts as ``lm_head``)."""
    import onnx

    graph = (onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model).graph
    inits = {i.name for i in graph.initializer}
    quant, keep = [], []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        is_weight = len(node.input) > 1 and node.input[1] in inits
        protected = (any(k in node.name or k in node.input[1] for k in keep_float)
                     or ("logits" in node.output and "lm_head" in keep_float))
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


def untie_lm_head(model: Any) -> Any:
    """``model`` (``onnx.ModelProto``, changed in place and returned) with a tied LM head made a weight of
    its own: when the ``logits`` MatMul multiplies by ``Transpose(embedding)``, the transposed matrix
    becomes the initializer ``lm_head.weight`` (the embedding stays for the token lookup), so that a
    weight quantizer can quantize the head. A model whose head already has a weight is left as it is."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    head = next((n for n in graph.node if "logits" in n.output and n.op_type in ("MatMul", "Gemm")), None)
    inits = {i.name: i for i in graph.initializer}
    if head is None or head.input[1] in inits:
        return model
    producer = next((n for n in graph.node if head.input[1] in n.output), None)
    if producer is None or producer.op_type != "Transpose" or producer.input[0] not in inits:
        return model
    weight = numpy_helper.to_array(inits[producer.input[0]])
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), "lm_head.weight"))
    tied = head.input[1]
    head.input[1] = "lm_head.weight"
    if not any(tied in n.input for n in graph.node):
        graph.node.remove(producer)
    return model


def quantize_matmul_int8_blocks(src: Path | Any, dst: Path, exclude_nodes: Sequence[str]) -> Path:
    """``MatMulNBits`` (``BITS`` bits, symmetric blocks of ``BLOCK``, ``ACCURACY_LEVEL``) on every weight
    MatMul of ``src`` (a path or an ``onnx.ModelProto``) except ``exclude_nodes``; writes ``dst`` (one
    file) and returns it."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from edge.errors import ModelFileError

    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        config = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                              bits=BITS)
        model = onnx.load(str(src)) if isinstance(src, (str, Path)) else src
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=list(exclude_nodes), algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    except Exception as exc:  # onnxruntime's quantizer raises plain Exceptions
        raise ModelFileError(f"int8 block quantization of {dst.name} failed: {str(exc).splitlines()[0]}") from exc
    return dst


def compress_weights_nncf(src: Path, dst: Path, exclude_nodes: Sequence[str]) -> Path:
    """NNCF ``compress_weights`` (``INT8_SYM``, per output channel) on every weight MatMul of ``src``
    except ``exclude_nodes``; writes ``dst`` (one file) and returns it."""
    import nncf
    import onnx

    from export.quantize import quantization_failed

    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        model = onnx.load(str(src))
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM,
                                           ignored_scope=nncf.IgnoredScope(names=list(exclude_nodes),
                                                                           validate=False))
        onnx.save(compressed, str(dst))
    except Exception as exc:  # nncf raises its own and plain exceptions
        raise quantization_failed("NNCF weight compression", src, exc) from exc
    return dst


def calibration_feeds(float_lm, model: Path) -> list[dict[str, np.ndarray]]:
    """Feeds for static calibration: each of ``CALIBRATION_PROMPTS`` with float's greedy continuation
    (``CALIBRATION_NEW_TOKENS``) as one prefill pass from an empty cache, so that the activations of the
    prompt and of generated text are both seen (a causal model computes the same values either way)."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    inputs = {i.name: i for i in graph.input}
    past = [n for n in inputs if n.startswith("past_key_values.")]
    kv_heads, head_dim = float_lm.config.num_kv_heads, float_lm.config.head_dim
    feeds = []
    for question in CALIBRATION_PROMPTS:
        prompt = float_lm.encode_chat([ChatMessage("system", SYSTEM), ChatMessage("user", question)])
        ids = prompt + list(float_lm.generate_ids(prompt, CALIBRATION_NEW_TOKENS))
        feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(len(ids), dtype=np.int64)[None, :]
        if "logits_to_keep" in inputs:
            feed["logits_to_keep"] = np.array([1], np.int64)
        for name in past:
            feed[name] = np.zeros((1, kv_heads, 0, head_dim), np.float32)
        feeds.append(feed)
    return feeds


def quantize_static_llm(src: Path, dst: Path, float_lm, exclude_nodes: Sequence[str]) -> Path:
    """Static QDQ S8S8 on the MatMuls of ``src`` except ``exclude_nodes`` (``weight_matmuls``' float list:
    the activation x activation MatMuls and ``keep_float``), calibrated with ``calibration_feeds``; writes
    ``dst`` and returns it."""
    from export.quantize import ListDataReader, quantize_static_qdq

    return quantize_static_qdq(src, dst, ListDataReader(calibration_feeds(float_lm, src)), op_types=["MatMul"],
                               exclude_nodes=exclude_nodes)


def _gathers(model: Path, keep_float: Sequence[str]) -> list[str]:
    """Gather nodes (token embedding lookups) of ``model`` whose name or table matches ``keep_float``."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "Gather"
            and any(k in n.name or k in n.input[0] for k in keep_float)]


def quantize_model(float_model: Path, out: Path, scheme: str, keep_float: Sequence[str] = KEEP_FLOAT,
                   float_lm=None) -> tuple[Path, dict[str, Any]]:
    """Write the ``scheme`` model to ``out/model.onnx`` (cached) and describe it for the manifest;
    ``keep_float`` names the weight MatMuls int8 leaves float (the token embedding always stays float);
    ``float_lm`` (the float runtime) calibrates static schemes."""
    import onnx

    from export.quantize import convert_fp16

    dst = out / "model.onnx"
    if scheme == "dynamic-int8":
        head_float = "lm_head" in keep_float
        model = onnx.load(str(float_model)) if not head_float else float_model
        if not head_float:
            untie_lm_head(model)
        quant, keep = weight_matmuls(model, keep_float)
        desc = {"scheme": "dynamic-int8",
                "weights": f"int{BITS} symmetric, blocks of {BLOCK} (MatMulNBits, weight MatMuls of the layers"
                           + ("" if head_float else " and the LM head") + ")",
                "activations": f"int8 dynamic per block (quantized at run time, accuracy_level {ACCURACY_LEVEL})",
                "float": "token embedding, " + ("LM head, " if head_float else "") + "attention score MatMuls, norms",
                "keep_float": sorted(keep_float),
                "quantized_nodes": len(quant), "float_matmuls": len(keep), "calibration": {"name": "none (dynamic)"}}
        if not (out / "done.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            quantize_matmul_int8_blocks(model, dst, keep)
    elif scheme == "nncf-int8":
        quant, keep = weight_matmuls(float_model, keep_float)
        desc = {"scheme": "nncf-int8", "weights": "int8 symmetric per output channel (NNCF compress_weights "
                                                  "INT8_SYM, DequantizeLinear)",
                "activations": "float32", "float": "token embedding, " + ("LM head, " if "lm_head" in keep_float
                                                                           else "") + "attention, norms",
                "keep_float": sorted(keep_float), "quantized_nodes": len(quant), "float_matmuls": len(keep),
                "calibration": {"name": "none (weight-only)"}}
        if not (out / "done.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            compress_weights_nncf(float_model, dst, keep + _gathers(float_model, keep_float))
    elif scheme == "static-qdq-s8s8":
        quant, keep = weight_matmuls(float_model, keep_float)
        desc = {"scheme": "static-qdq-s8s8", "weights": "int8 symmetric per channel (QDQ)",
                "activations": "int8 per tensor, static (MinMax calibration)",
                "float": "token embedding, " + ("LM head, " if "lm_head" in keep_float else "")
                         + "attention score MatMuls, norms",
                "keep_float": sorted(keep_float), "quantized_nodes": len(quant), "float_matmuls": len(keep),
                "calibration": {"name": "CALIBRATION_PROMPTS + float greedy continuations",
                                "prompts": len(CALIBRATION_PROMPTS), "new_tokens": CALIBRATION_NEW_TOKENS}}
        if not (out / "done.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            if float_lm is None:
                raise ValueError("static-qdq-s8s8 needs the float model's runtime for calibration")
            quantize_static_llm(float_model, dst, float_lm, keep)
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
    keep_float: Sequence[str] = KEEP_FLOAT,
) -> QuantResult:
    """Quantize ``float_model`` with ``scheme`` (``keep_float`` as in ``quantize_model``)
    into ``out`` and gate it against ``float_lm``; returns the model, the runtime on it, the manifest's
    quantization and drift."""
    from export.gates import GateResult
    from export.llm import runtime_model

    say(f"quantizing the LLM ({scheme})")
    model, desc = quantize_model(float_model, out, scheme, keep_float, float_lm)
    lm = runtime_model(model, tokenizer, config)
    min_top1 = float(gates.get("top1_agreement", DEFAULT_TOP1))
    max_ratio = float(gates.get("perplexity_ratio", DEFAULT_PPL_RATIO))
    key = hashlib.sha256(json.dumps([GATE_SET, SYSTEM, CONTINUATION_TOKENS, GATE_VERSION]).encode()).hexdigest()
    cached = out / f"gate-{key[:12]}.json"
    if cached.is_file():
        m = json.loads(cached.read_text(encoding="utf-8"))
    else:
        say(f"gating {scheme} against float: top-1 agreement >= {min_top1:g} over float's greedy continuations, "
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
