"""Whisper tiny.en ASR stage: CTranslate2 weights -> transformers -> ONNX (KV cache) -> optional INT8, gated.

``export_whisper`` does, caching every step in ``workdir/<key>/`` (key = recipe file hashes + toolchain
versions; the options name the sub-directories), so a second call with the same inputs does no model work:
1. rebuild ``WhisperForConditionalGeneration`` from ``model.bin`` (``export.whisper_ct2``) and save a
   Hugging Face directory (weights, config, tokenizer, feature extractor);
2. optimum's ONNX exporter, task ``automatic-speech-recognition-with-past``, offline: ``encoder_model.onnx``
   and the merged decoder ``decoder_model_merged.onnx`` (one graph with and without the KV cache);
3. with ``quantization="dynamic-int8"``: onnxruntime dynamic int8 (signed weights, per-channel) on the MatMuls
   of ``INT8_PLANS`` in order (all of them; encoder FFN + decoder; decoder only), each gated: corpus WER of int8
   minus float on espeak-ng speech of the eval set in two voices must stay within the recipe's ``[gates]
   wer_increase_points``; the first plan that passes ships. CPU latency float vs int8 is measured for the
   report (never for the manifest: a timing must not make two exports differ);
4. the stage files go to ``out_dir``: ``encoder.onnx``, ``decoder.onnx``, ``tokenizer.json`` and
   ``mel_filters.npy`` (the slaney bank the runtime's numpy log-mel uses), plus the decoding config.
A failed gate does not raise: the artifact says ``drift['gate'] == 'failed'`` and the caller (the bundle
builder) decides to refuse or fall back to float.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge.audio import SAMPLE_RATE
from edge.errors import ConfigError, ModelFileError
from edge.stages.whisper import MAX_TOKENS, MAX_TOKENS_PER_S, DecodeRules, WhisperRecognizer, mel_filters
from export.artifact import StageArtifact
from export.calibration import Clip, check_size, espeak
from export.evalset import load_eval_set
from export.fetch import default_cache_dir, model_file
from export.recipes import Recipe, load_recipe
from export.whisper_ct2 import SpecialTokens, special_tokens

RECIPE = "whisper-tiny-en"
SCHEMES = ("none", "dynamic-int8")
GATE_VOICES = ("en-us", "en-us+f3")
#: utterances of the eval set per voice in the gate (None: all 22, 44 clips, ~280 words: one word is 0.36
#: points; 10 clips (~60 words) cannot resolve the 1-point gate: one word there is 1.7 points)
GATE_UTTERANCES: int | None = None


@dataclass(frozen=True)
class Int8Plan:
    """Which MatMul weights of each graph dynamic int8 covers: ``all``, ``ffn`` (fc1/fc2 only) or ``none``.
    The LM head multiplies by a transposed copy of the embedding made in the graph, not an initializer, so it
    stays float, as does the embedding Gather."""

    name: str
    encoder: str
    decoder: str


#: tried in this order; the first that passes the WER gate ships (measured on the 44-clip gate set: all
#: MatMuls +1.4 points, encoder FFN only + decoder +0.35, decoder only 0.0)
INT8_PLANS = (Int8Plan("all-matmul", "all", "all"), Int8Plan("encoder-ffn", "ffn", "all"),
              Int8Plan("decoder-only", "none", "all"))
DEFAULT_MAX_INCREASE = 1.0
EXPORT_VERSION = 2  # bump when the steps change what they write
ProgressFn = Callable[[str], None]


def default_workdir() -> Path:
    """Where exports are cached between runs: ``<sottovoce cache>/export/whisper``."""
    return default_cache_dir() / "export" / "whisper"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "transformers", "optimum-onnx", "onnx", "onnxruntime"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def cache_key(recipe: Recipe) -> str:
    """16 hex digits naming the export of a source: the recipe's file hashes, the toolchain versions and the
    exporter version. The options name sub-directories below it (``onnx-float``, ``onnx-int8-<plan>``), so
    float and int8 share the rebuilt model and the float export."""
    blob = json.dumps({"files": {f.name: f.sha256 for f in recipe.files}, "versions": _versions(),
                       "v": EXPORT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def decode_config(tokens: SpecialTokens, ct2_config: dict[str, Any]) -> dict[str, Any]:
    """The runtime's decoding settings (``edge.stages.whisper.DecodeRules.from_config`` reads them):
    special token ids, the English-only no-timestamps prompt, the tokens faster-whisper suppresses
    (``config.json`` ``suppress_ids`` plus the task/control tokens) and the token budget."""
    suppress = set(int(t) for t in ct2_config.get("suppress_ids", ()))
    suppress |= {tokens.transcribe, tokens.translate, tokens.sot, tokens.sot_prev, tokens.sot_lm, tokens.no_speech}
    return {
        "sot": tokens.sot, "eot": tokens.eot, "no_timestamps": tokens.no_timestamps,
        "timestamp_begin": tokens.timestamp_begin, "prompt": [tokens.sot, tokens.no_timestamps],
        "suppress": sorted(suppress), "suppress_begin": [int(t) for t in ct2_config.get("suppress_ids_begin", ())],
        "max_tokens": MAX_TOKENS, "max_tokens_per_s": MAX_TOKENS_PER_S, "language": "en",
    }


def _stamp(path: Path) -> Path:
    return path / "done.json"


def _done(path: Path) -> bool:
    return _stamp(path).is_file()


def _mark(path: Path, info: dict[str, Any]) -> None:
    tmp = path / "done.json.part"
    tmp.write_text(json.dumps(info, sort_keys=True, indent=1), encoding="utf-8")
    os.replace(tmp, _stamp(path))


def build_hf_dir(ct2_dir: Path, out: Path) -> Path:
    """The rebuilt transformers directory in ``out`` (cached: reused when complete)."""
    from export.whisper_ct2 import save_hf_dir

    if not _done(out):
        shutil.rmtree(out, ignore_errors=True)
        save_hf_dir(ct2_dir, out)
        _mark(out, {"source": str(ct2_dir)})
    return out


def export_onnx(hf_dir: Path, out: Path) -> Path:
    """optimum's ONNX export of ``hf_dir`` with the KV cache (offline) into ``out``: ``encoder_model.onnx``
    and ``decoder_model_merged.onnx`` (cached). Raises ``ModelFileError`` if the exporter fails."""
    if _done(out):
        return out
    shutil.rmtree(out, ignore_errors=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from optimum.exporters.onnx import main_export

    try:
        main_export(str(hf_dir), output=str(out), task="automatic-speech-recognition-with-past",
                    do_validation=False, local_files_only=True, device="cpu")
    except Exception as exc:  # optimum raises many types
        raise ModelFileError(f"ONNX export of the rebuilt Whisper failed: {str(exc).splitlines()[0]}") from exc
    for name in ("encoder_model.onnx", "decoder_model_merged.onnx"):
        if not (out / name).is_file():
            raise ModelFileError(f"optimum wrote no {name} (task automatic-speech-recognition-with-past)")
    for name in ("decoder_model.onnx", "decoder_with_past_model.onnx"):  # the merged graph replaces both
        (out / name).unlink(missing_ok=True)
    _mark(out, {"task": "automatic-speech-recognition-with-past"})
    return out


def _matmuls(path: Path) -> list[str]:
    import onnx

    def walk(graph) -> list[str]:
        names = []
        for node in graph.node:
            if node.op_type == "MatMul":
                names.append(node.name)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    names += walk(attr.g)
        return names

    return walk(onnx.load(str(path), load_external_data=False).graph)


def quantize_int8(float_dir: Path, plan: Int8Plan, out: Path) -> Path:
    """Dynamic int8 (per-channel signed weights) of ``plan`` on both graphs into ``out`` (cached); a graph
    whose part is ``none`` is linked in float."""
    from export.quantize import quantize_dynamic_int8

    if _done(out):
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name, part in (("encoder_model.onnx", plan.encoder), ("decoder_model_merged.onnx", plan.decoder)):
        if part == "none":
            _place(float_dir / name, out / name)
            continue
        exclude = [n for n in _matmuls(float_dir / name) if "/fc" not in n] if part == "ffn" else []
        quantize_dynamic_int8(float_dir / name, out / name, op_types=("MatMul",), exclude_nodes=exclude,
                              per_channel=True)
    _mark(out, {"plan": plan.name, "encoder": plan.encoder, "decoder": plan.decoder})
    return out


def gate_clips(voices: Sequence[str] = GATE_VOICES, per_voice: int | None = GATE_UTTERANCES) -> list[Clip]:
    """The WER gate set: the first ``per_voice`` (None: all) utterances of the eval set spoken by espeak-ng in
    each voice (150 words/min, 0.25 s of silence around), each with its reference text."""
    items = load_eval_set()[:per_voice]
    pad = np.zeros(int(0.25 * SAMPLE_RATE), np.float32)
    return [Clip(f"{u.id}-{v}", np.concatenate([pad, espeak(u.text, v, 150), pad]), u.text)
            for v in voices for u in items]


def recognizer(model_dir_: Path, ct2_dir: Path, config: dict[str, Any], threads: int | None = 2) -> WhisperRecognizer:
    """The runtime's own recognizer on an exported directory (``encoder_model.onnx``, merged decoder)."""
    return WhisperRecognizer(model_dir_ / "encoder_model.onnx", model_dir_ / "decoder_model_merged.onnx",
                             ct2_dir / "tokenizer.json", None, DecodeRules.from_config(config), threads=threads)


def compare_latency(a: WhisperRecognizer, b: WhisperRecognizer, clips: Sequence[Clip], rounds: int = 2
                    ) -> tuple[float, float]:
    """Median real-time factor (compute / audio seconds) of ``a`` and ``b`` over ``clips``, interleaved."""
    ra, rb = [], []
    a.transcribe(clips[0].audio)
    b.transcribe(clips[0].audio)  # warm up
    for _ in range(rounds):
        for clip in clips:
            for rec, out in ((a, ra), (b, rb)):
                rec.transcribe(clip.audio)
                out.append(rec.last_compute_s / rec.last_audio_s)
    return statistics.median(ra), statistics.median(rb)


def _transcripts(rec: WhisperRecognizer, clips: Sequence[Clip], cached: Path | None) -> list[str]:
    """``rec``'s transcript of every clip; cached as JSON when ``cached`` is given (greedy decoding of the same
    audio is deterministic)."""
    if cached is not None and cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    texts = [rec.transcribe(c.audio) for c in clips]
    if cached is not None:
        cached.write_text(json.dumps(texts), encoding="utf-8")
    return texts


def wer_gate(float_texts: Sequence[str], cand_texts: Sequence[str], clips: Sequence[Clip], max_increase: float):
    """``export.gates``' ASR gate on transcripts already made: corpus WER of candidate minus float, in points."""
    from export.evalset import corpus_wer
    from export.gates import GateResult

    wf = corpus_wer((c.text, t) for c, t in zip(clips, float_texts))
    wc = corpus_wer((c.text, t) for c, t in zip(clips, cand_texts))
    detail = {"wer_float": round(wf, 4), "wer_candidate": round(wc, 4), "utterances": len(clips),
              "differing_transcripts": sum(a != b for a, b in zip(float_texts, cand_texts))}
    return GateResult.judge("asr", "wer_increase_points", (wc - wf) * 100.0, max_increase, "<=", detail)


def _io(path: Path) -> tuple[list[dict], list[dict]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def desc(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            out.append({"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(),
                        "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]})
        return out

    return desc(model.graph.input), desc(model.graph.output)


def _place(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def float_models(*, workdir: Path | None = None, recipe: Recipe | str = RECIPE, cache: Path | None = None,
                 progress: ProgressFn | None = None) -> tuple[Path, Path]:
    """Steps 1-2, cached: (directory with the float ``encoder_model.onnx`` + ``decoder_model_merged.onnx``,
    the CTranslate2 source directory). ``int8_models`` and ``export_whisper`` start from it."""
    say = progress or (lambda _msg: None)
    rec = load_recipe(recipe) if isinstance(recipe, str) else recipe
    ct2_dir = model_file(rec, "ct2-weights", cache).parent
    work = Path(workdir or default_workdir()) / cache_key(rec)
    work.mkdir(parents=True, exist_ok=True)
    say("rebuilding Whisper in transformers from the CTranslate2 weights")
    hf_dir = build_hf_dir(ct2_dir, work / "hf")
    say("exporting ONNX encoder + merged decoder with KV cache")
    return export_onnx(hf_dir, work / "onnx-float"), ct2_dir


def int8_models(plan: Int8Plan, float_dir: Path) -> Path:
    """The int8 graphs of ``plan`` (ungated, cached beside ``float_dir``)."""
    return quantize_int8(float_dir, plan, float_dir.parent / f"onnx-int8-{plan.name}")


def stage_config(ct2_dir: Path) -> dict[str, Any]:
    """``decode_config`` of a CTranslate2 Whisper directory (its tokenizer and config.json)."""
    ct2_config = json.loads((Path(ct2_dir) / "config.json").read_text(encoding="utf-8"))
    return decode_config(special_tokens(Path(ct2_dir) / "tokenizer.json"), ct2_config)


def export_whisper(
    out_dir: Path,
    *,
    workdir: Path | None = None,
    quantization: str = "none",
    progress: ProgressFn | None = None,
    recipe: Recipe | str = RECIPE,
    cache: Path | None = None,
    clips: Sequence[Clip] | None = None,
    measure_latency: bool = True,
) -> StageArtifact:
    """The Whisper ASR stage (kind ``whisper``) in ``out_dir``, exported from the recipe's CTranslate2 weights.

    ``quantization`` is ``"none"`` (float32 ONNX) or ``"dynamic-int8"`` (int8 MatMul weights, gated on WER
    against float over ``clips``, default ``gate_clips()``). Files by role: ``encoder``, ``decoder``,
    ``tokenizer``, ``mel_filters``; ``config`` holds the decoding settings (``decode_config``). Intermediate
    results are cached under ``workdir`` (default ``default_workdir()``). Raises ``ConfigError`` for an
    unknown scheme, ``ModelFileError`` when the weights do not map or the export fails."""
    if quantization not in SCHEMES:
        raise ConfigError(f"whisper quantization {quantization!r} is not one of {', '.join(SCHEMES)}")
    say = progress or (lambda _msg: None)
    rec = load_recipe(recipe) if isinstance(recipe, str) else recipe
    t0 = time.perf_counter()
    float_dir, ct2_dir = float_models(workdir=workdir, recipe=rec, cache=cache, progress=progress)
    hf_dir, work = float_dir.parent / "hf", float_dir.parent
    config = stage_config(ct2_dir)
    float_bytes = sum((float_dir / n).stat().st_size for n in ("encoder_model.onnx", "decoder_model_merged.onnx"))
    chosen, quant, drift, report = float_dir, {"scheme": "none", "float_bytes": float_bytes}, {"gate": "n/a"}, {}
    if quantization == "dynamic-int8":
        gate_set = list(clips) if clips is not None else gate_clips()
        check_size(gate_set, stage="asr")
        max_inc = float(rec.gates.get("wer_increase_points", DEFAULT_MAX_INCREASE))
        # the default set is deterministic: transcripts are cached by what defines it; a given set is measured
        gate_id = hashlib.sha256(json.dumps([[c.name, c.text] for c in gate_set]).encode()).hexdigest()[:12]
        keep = clips is None
        say(f"float transcripts of {len(gate_set)} gate utterances")
        f_rec = recognizer(float_dir, ct2_dir, config)
        f_texts = _transcripts(f_rec, gate_set, float_dir / f"gate-{gate_id}.json" if keep else None)
        tried, gate, plan, int8_dir, q_rec = [], None, INT8_PLANS[0], float_dir, f_rec
        for plan in INT8_PLANS:
            say(f"int8 plan {plan.name}: quantizing, then WER gate (increase <= {max_inc:g} points)")
            int8_dir = int8_models(plan, float_dir)
            q_rec = recognizer(int8_dir, ct2_dir, config)
            q_texts = _transcripts(q_rec, gate_set, int8_dir / f"gate-{gate_id}.json" if keep else None)
            gate = wer_gate(f_texts, q_texts, gate_set, max_inc)
            tried.append({"plan": plan.name, "wer_increase_points": gate.value, "passed": gate.passed})
            if gate.passed:
                break
        int8_bytes = sum((int8_dir / n).stat().st_size for n in ("encoder_model.onnx", "decoder_model_merged.onnx"))
        drift = {"wer_float": gate.detail["wer_float"], "wer_int8": gate.detail["wer_candidate"],
                 "wer_increase_points": gate.value, "float_bytes": float_bytes, "int8_bytes": int8_bytes,
                 "plans_tried": tried, "gates": [gate.to_dict()], "gate": "passed" if gate.passed else "failed"}
        if measure_latency:
            say("timing float vs int8 on the CPU")
            f_rtf, q_rtf = compare_latency(f_rec, q_rec, gate_set[:3])
            report = {"float_rtf": round(f_rtf, 4), "int8_rtf": round(q_rtf, 4),
                      "verdict": f"int8 {f_rtf / q_rtf:.2f}x the speed of float",
                      "latency_measured_on": "this export machine, CPU provider, 2 threads"}
        chosen = int8_dir
        parts = {"all": "every MatMul", "ffn": "fc1/fc2 MatMuls", "none": "float"}
        quant = {"scheme": "dynamic-int8", "plan": plan.name,
                 "weights": f"int8 symmetric per-channel: encoder {parts[plan.encoder]}, decoder {parts[plan.decoder]}",
                 "activations": "uint8 dynamic per-tensor (quantized at run time)",
                 "float": "embedding, LM head, convolutions, layer norms", "float_bytes": float_bytes,
                 "calibration": {"name": "none (dynamic)", "gate_set": f"eval set x {'/'.join(GATE_VOICES)}",
                                 "utterances": len(gate_set)}}
    out_dir = Path(out_dir)
    files = {
        "encoder.onnx": _place(chosen / "encoder_model.onnx", out_dir / "encoder.onnx"),
        "decoder.onnx": _place(chosen / "decoder_model_merged.onnx", out_dir / "decoder.onnx"),
        "tokenizer.json": _place(ct2_dir / "tokenizer.json", out_dir / "tokenizer.json"),
    }
    mel_path = out_dir / "mel_filters.npy"
    np.save(mel_path, mel_filters(int(json.loads((hf_dir / "config.json").read_text())["num_mel_bins"])))
    files["mel_filters.npy"] = mel_path
    enc_in, enc_out = _io(files["encoder.onnx"])
    dec_in, dec_out = _io(files["decoder.onnx"])
    say(f"whisper stage ready in {time.perf_counter() - t0:.1f} s")
    return StageArtifact(
        stage="asr", kind="whisper", runtime="onnxruntime", files=files,
        roles={"encoder": "encoder.onnx", "decoder": "decoder.onnx", "tokenizer": "tokenizer.json",
               "mel_filters": "mel_filters.npy"},
        sample_rate=SAMPLE_RATE,
        inputs=[{"model": "encoder", **d} for d in enc_in] + [{"model": "decoder", **d} for d in dec_in[:2]],
        outputs=[{"model": "encoder", **d} for d in enc_out] + [{"model": "decoder", **d} for d in dec_out[:1]],
        quantization=quant, drift=drift, license=rec.license,
        source={**rec.source, "rebuilt_from": "ctranslate2 model.bin -> transformers WhisperForConditionalGeneration",
                "export": "optimum automatic-speech-recognition-with-past", "cache_key": work.name},
        config=config, report=report,
    )
