"""LLM stage: GGUF (or a local Hugging Face causal LM) -> transformers -> ONNX with KV cache -> optional int8, gated.

``export_llm`` does, caching every step under ``workdir/<source key>/`` (key = source sha256 + toolchain
versions + export version), so a second call with the same inputs does no model work:
1. the source: the recipe's GGUF dequantized by ``transformers`` (offline) and saved as a float32
   Hugging Face directory, or a given local HF directory used as it is;
2. optimum's ONNX exporter, task ``text-generation-with-past``: one ``model.onnx`` with ``past_key_values.*``
   inputs and ``present.*`` outputs, plus a ``logits_to_keep`` input (``add_logits_to_keep``) so that
   prefill projects only the last position onto the vocabulary;
3. ``tokenizer.json`` rewritten for the plain ``tokenizers`` library (byte-level decoder only, no
   post-processor) and verified: same ids as ``transformers`` and exact round trip, chat tokens included;
4. the check: greedy tokens of the exported model run by the edge runtime (``edge.stages.llm_onnx``)
   must equal torch's greedy tokens on ``GREEDY_PROMPTS``;
5. with a quantization scheme (``export.llm_quant``): int8 (or fp16) model, gated on top-1 next-token
   agreement and perplexity ratio against float (teacher forcing over ``export.llm_quant.GATE_SET``).
A failed gate does not raise: ``drift['gate'] == 'failed'`` and the bundle builder decides.
Wall-clock figures (tokens/s, time to first token) go to ``artifact.report`` only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

from edge.errors import ConfigError, ModelFileError
from edge.stages.base import ChatMessage
from export.artifact import StageArtifact
from export.disk import disk_full_guard, require_free_space
from export.fetch import default_cache_dir, model_file
from export.recipes import Recipe, load_recipe

RECIPE = "smollm2-135m-instruct"
KIND = "onnx-causal-lm"
EXPORT_VERSION = 2  # bump when a step changes what it writes
DEFAULT_SYSTEM_PROMPT = "You are a helpful voice assistant. Answer in one or two short sentences."
MAX_CONTEXT = 2048  # tokens the runtime allows (KV cache memory bound on small boards)
GREEDY_NEW_TOKENS = 32
#: the chat prompts whose greedy continuation must be identical in torch and in the exported model
GREEDY_PROMPTS = ("What is the capital of France?", "Give me one tip for sleeping better.")
#: texts whose tokenization must round-trip through the shipped tokenizer.json exactly
TOKENIZER_PROBES = (
    "Hello, world! It's 23°C in Zürich — naïve café, 東京, emoji 🎉 and tabs\tand\nnew lines.",
    "  leading spaces, trailing spaces  ",
    "Numbers 1234567 and 3.14159; symbols @#$%^&*()[]{}<>~`|\\ and 'quotes'.",
)
ProgressFn = Callable[[str], None]


def default_workdir() -> Path:
    """Where LLM exports are cached between runs: ``<sottovoce cache>/export/llm``."""
    return default_cache_dir() / "export" / "llm"


@dataclass(frozen=True)
class LlmSource:
    """Where the weights come from: a GGUF file (dequantized by transformers) or a local HF directory."""

    name: str
    sha256: str
    license: str
    system_prompt: str
    gates: dict[str, Any]
    manifest_source: dict[str, Any]
    gguf: Path | None = None
    hf_dir: Path | None = None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} is not a Hugging Face model directory (no config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path / 'config.json'} is not readable JSON: {_first_line(exc)}") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path / 'config.json'} is not a JSON object")
    return cfg


def _architecture(cfg: dict[str, Any]) -> str:
    """The model class(es) a config names, else its ``model_type`` (for messages)."""
    return ", ".join(cfg.get("architectures") or []) or f"model_type {cfg.get('model_type')!r}"


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        tok_cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(isinstance(tok_cfg, dict) and tok_cfg.get("chat_template"))


def check_hf_dir(path: Path) -> dict[str, Any]:
    """Cheap checks of a local Hugging Face directory before any model work; returns its ``config.json``.

    Promises a ``config.json`` whose ``architectures`` (or ``model_type`` when it names none) is a causal LM
    of ``transformers``' ``AutoModelForCausalLM`` mapping, a ``tokenizer.json`` and a chat template. Raises
    ``ConfigError`` (no or unreadable config, not a causal LM) or ``ModelFileError`` (no tokenizer.json, no
    chat template), each one line naming the directory and what is wrong."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    path = Path(path)
    cfg = _read_config(path)
    archs = cfg.get("architectures") or []
    if not (any(a in set(causal.values()) for a in archs) if archs else cfg.get("model_type") in causal):
        raise ConfigError(f"{path} is not a causal language model: config.json names {_architecture(cfg)}, "
                          "which transformers' AutoModelForCausalLM does not load")
    if not (path / "tokenizer.json").is_file():
        raise ModelFileError(f"{path} has no tokenizer.json: save the model's fast tokenizer next to it "
                             "(AutoTokenizer.save_pretrained)")
    if not _has_chat_template(path):
        raise ModelFileError(f"{path} has no chat template (chat_template.jinja or 'chat_template' in "
                             "tokenizer_config.json)")
    return cfg


def resolve_source(source: Recipe | Path | str, cache: Path | None = None) -> LlmSource:
    """The weights behind ``source``: a recipe (or recipe name) with a ``gguf`` file, or a local HF
    causal-LM directory (its sha256 covers every file in it) that passes ``check_hf_dir``. Raises
    ``ConfigError`` when neither, or ``check_hf_dir``'s error."""
    if isinstance(source, str) and not Path(source).is_dir():
        source = load_recipe(source)
    if isinstance(source, Recipe):
        gguf = model_file(source, "gguf", cache)
        return LlmSource(
            name=source.name, sha256=source.file("gguf").sha256, license=source.license,
            system_prompt=str(source.extra.get("system_prompt", DEFAULT_SYSTEM_PROMPT)), gates=dict(source.gates),
            manifest_source={**source.source, "converted": "gguf -> transformers (dequantized, float32) -> onnx"},
            gguf=gguf,
        )
    path = Path(source)
    check_hf_dir(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + _sha256_file(f).encode())
    return LlmSource(
        name=path.name, sha256=h.hexdigest(), license="see the model directory", system_prompt=DEFAULT_SYSTEM_PROMPT,
        gates={"top1_agreement": 0.95, "perplexity_ratio": 1.05},
        manifest_source={"local_dir": path.name, "sha256": h.hexdigest()}, hf_dir=path,
    )


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "transformers", "optimum-onnx", "onnx", "onnxruntime", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def cache_key(src: LlmSource) -> str:
    """16 hex digits naming the float export of ``src``: its sha256, the toolchain, the export version."""
    blob = json.dumps({"sha256": src.sha256, "versions": _versions(), "v": EXPORT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _done(path: Path) -> bool:
    return (path / "done.json").is_file()


def _mark(path: Path, info: dict[str, Any]) -> None:
    tmp = path / "done.json.part"
    tmp.write_text(json.dumps(info, sort_keys=True, indent=1), encoding="utf-8")
    os.replace(tmp, path / "done.json")


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first non-empty line`` of an exception, with ``(caused by ...)`` the same of its root cause
    when it was raised from another (where an exporter names the op), cut to ``limit`` characters."""

    def line(e: BaseException) -> str:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        return f"{type(e).__name__}: {first}" if first else type(e).__name__

    root = exc
    while root.__cause__ is not None and root.__cause__ is not exc:
        root = root.__cause__
    text = line(exc) if root is exc else f"{line(exc)} (caused by {line(root)})"
    return text if len(text) <= limit else text[:limit - 1] + "…"


def build_hf_dir(src: LlmSource, out: Path) -> Path:
    """A float32 Hugging Face directory for ``src`` (the GGUF dequantized and saved in ``out``, cached;
    a local directory is returned as it is). Raises ``ModelFileError`` (one line, naming the stage, the
    file and what transformers says, e.g. an architecture it cannot load) when the GGUF does not load."""
    if src.hf_dir is not None:
        return src.hf_dir
    if _done(out):
        return out
    assert src.gguf is not None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.rmtree(out, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(src.gguf.parent, gguf_file=src.gguf.name)
        model = AutoModelForCausalLM.from_pretrained(src.gguf.parent, gguf_file=src.gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types
        raise ModelFileError(f"llm stage: transformers cannot load {src.gguf.name}: {_first_line(exc)}") from exc
    tok.save_pretrained(out)
    model.save_pretrained(out)
    _mark(out, {"gguf": src.gguf.name, "sha256": src.sha256})
    return out


def export_onnx(hf_dir: Path, out: Path) -> Path:
    """optimum's ONNX export of ``hf_dir`` (task ``text-generation-with-past``, offline, CPU) into ``out``;
    returns the path of ``model.onnx`` (cached). Raises ``ModelFileError`` if the exporter fails: one line
    naming the stage, the directory, its architecture and the exporter's first line (the op or the
    architecture it refuses, when it says so)."""
    if not _done(out):
        shutil.rmtree(out, ignore_errors=True)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from optimum.exporters.onnx import main_export

        try:
            main_export(str(hf_dir), output=str(out), task="text-generation-with-past", do_validation=False,
                        local_files_only=True, device="cpu")
        except Exception as exc:  # optimum raises many types
            raise ModelFileError(f"llm stage: ONNX export of {hf_dir.name} ({_architecture(_read_config(hf_dir))}) "
                                 f"failed: {_first_line(exc)}") from exc
        if not (out / "model.onnx").is_file():
            raise ModelFileError("llm stage: optimum wrote no model.onnx (task text-generation-with-past)")
        _mark(out, {"task": "text-generation-with-past"})
    return out / "model.onnx"


def add_logits_to_keep(src: Path, dst: Path) -> Path:
    """A copy of the exported graph with one more input, ``logits_to_keep`` (int64 [1]): the LM head runs
    only on the last ``logits_to_keep`` positions (the runtime passes 1 while generating, the sequence
    length to score every position). Prefill then skips the vocabulary projection of all but the last
    prompt token, and ``logits`` is [batch, logits_to_keep, vocab]. Cached; returns ``dst``."""
    import onnx
    from onnx import TensorProto, helper

    if dst.is_file() and _done(dst.parent):
        return dst
    model = onnx.load(str(src))
    graph = model.graph
    head = [n for n in graph.node if "logits" in n.output]
    if len(head) != 1 or head[0].op_type not in ("MatMul", "Gemm"):
        raise ModelFileError("cannot find the LM head MatMul that produces 'logits' in the exported graph")
    node = head[0]
    hidden = node.input[0]
    graph.input.append(helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]))
    graph.initializer.extend([
        helper.make_tensor("logits_to_keep_end", TensorProto.INT64, [1], [2**62]),
        helper.make_tensor("logits_to_keep_axis", TensorProto.INT64, [1], [1]),
    ])
    kept = f"{hidden}_last"
    index = list(graph.node).index(node)
    graph.node.insert(index, helper.make_node("Neg", ["logits_to_keep"], ["logits_to_keep_neg"],
                                              name="/lm_head/logits_to_keep/Neg"))
    graph.node.insert(index + 1, helper.make_node(
        "Slice", [hidden, "logits_to_keep_neg", "logits_to_keep_end", "logits_to_keep_axis"], [kept],
        name="/lm_head/logits_to_keep/Slice"))
    node.input[0] = kept
    for out in graph.output:
        if out.name == "logits":
            out.type.tensor_type.shape.dim[1].dim_param = "logits_to_keep"
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    _mark(dst.parent, {"step": "logits_to_keep"})
    return dst


def chat_template_of(tokenizer: Any) -> str:
    """The Jinja chat template text of a transformers tokenizer (the ``default`` one of several)."""
    tmpl = tokenizer.chat_template
    if isinstance(tmpl, dict):
        tmpl = tmpl.get("default") or next(iter(tmpl.values()))
    if isinstance(tmpl, list):
        named = {t["name"]: t["template"] for t in tmpl}
        tmpl = named.get("default") or next(iter(named.values()))
    if not tmpl:
        raise ModelFileError("the model has no chat template")
    return str(tmpl)


def write_tokenizer(hf_dir: Path, dst: Path, system_prompt: str) -> Path:
    """``tokenizer.json`` for the edge (plain ``tokenizers``): the transformers-written file with the
    decoder reduced to byte-level and no post-processor, verified to give the same ids as transformers
    on rendered chats and probe texts, and to decode them back exactly. Raises ``ModelFileError`` if not."""
    from tokenizers import Tokenizer, decoders
    from transformers import AutoTokenizer

    from edge.chat import render_chat

    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    data = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_str(json.dumps(data))
    if (data.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
        tok.decoder = decoders.ByteLevel()
    tok.post_processor = None
    template = chat_template_of(hf_tok)
    chats = [render_chat(template, [ChatMessage("system", system_prompt), ChatMessage("user", p)]) for p in
             GREEDY_PROMPTS]
    chats.append(render_chat(template, [ChatMessage("user", TOKENIZER_PROBES[0]),
                                        ChatMessage("assistant", "Paris."), ChatMessage("user", "Thanks")]))
    for text in [*chats, *TOKENIZER_PROBES]:
        ids = tok.encode(text, add_special_tokens=False).ids
        want = hf_tok(text, add_special_tokens=False)["input_ids"]
        if ids != want:
            raise ModelFileError(f"tokenizer.json encodes {text[:30]!r} differently from transformers")
        back = tok.decode(ids, skip_special_tokens=False)
        if back != text:
            raise ModelFileError(f"tokenizer.json does not round-trip {text[:30]!r} (got {back[:30]!r})")
    for special in ("<|im_start|>", "<|im_end|>"):
        tid = tok.token_to_id(special)
        if tid is not None and tok.encode(special, add_special_tokens=False).ids != [tid]:
            raise ModelFileError(f"tokenizer.json splits the chat token {special}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst), pretty=False)
    return dst


def stage_config(hf_dir: Path, model_path: Path, system_prompt: str) -> dict[str, Any]:
    """The runtime settings (``edge.stages.llm_onnx.LlmConfig.from_config`` reads them): stop ids, bos,
    chat template, system prompt, context limit, layer/KV shapes and the KV input/output names."""
    import onnx
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    eos: set[int] = set()
    for value in (cfg.eos_token_id, tok.eos_token_id):
        if value is not None:
            eos |= set(value) if isinstance(value, (list, tuple)) else {int(value)}
    vocab = tok.get_vocab()
    for special in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):  # end-of-turn / end-of-text markers
        if special in vocab:
            eos.add(int(vocab[special]))
    graph = onnx.load(str(model_path), load_external_data=False).graph
    past = [i.name for i in graph.input if i.name.startswith("past_key_values.")]
    present = [o.name for o in graph.output if o.name.startswith("present.")]
    heads = cfg.num_attention_heads
    return {
        "chat_template": chat_template_of(tok),
        "system_prompt": system_prompt,
        "eos_token_ids": sorted(eos),
        "bos_token_id": tok.bos_token_id,
        "add_bos_token": False,  # the chat template writes the leading <|im_start|> itself
        "max_context": int(min(getattr(cfg, "max_position_embeddings", MAX_CONTEXT), MAX_CONTEXT)),
        "num_layers": int(cfg.num_hidden_layers),
        "num_kv_heads": int(getattr(cfg, "num_key_value_heads", heads) or heads),
        "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        "vocab_size": int(cfg.vocab_size),
        "past_inputs": past,
        "present_outputs": present,
    }


def _chat(system_prompt: str, question: str) -> list[ChatMessage]:
    return [ChatMessage("system", system_prompt), ChatMessage("user", question)]


def torch_greedy(hf_dir: Path, prompts: Sequence[list[int]], new_tokens: int, eos: Sequence[int]) -> list[list[int]]:
    """Torch float32 greedy continuations (at most ``new_tokens``, stopping before a stop id) of ``prompts``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=new_tokens, do_sample=False, eos_token_id=list(eos),
                                 pad_token_id=int(eos[0]))
            new = [int(t) for t in gen[0, len(ids):]]
            out.append([t for t in new[:next((i for i, t in enumerate(new) if t in eos), len(new))]])
    return out


def runtime_model(model_path: Path, tokenizer_path: Path, config: dict[str, Any], threads: int | None = 2):
    """The edge runtime's own ``OnnxCausalLM`` on an exported model (what the board will run)."""
    from edge.stages.llm_onnx import LlmConfig, OnnxCausalLM

    return OnnxCausalLM(model_path, tokenizer_path, LlmConfig.from_config(config), threads=threads)


def greedy_check(lm, hf_dir: Path, system_prompt: str, cached: Path) -> dict[str, Any]:
    """Greedy tokens of ``lm`` (the runtime) vs torch on ``GREEDY_PROMPTS`` for ``GREEDY_NEW_TOKENS`` each;
    torch's tokens are cached in ``cached``. Returns match fraction and the prompts' results."""
    prompts = [lm.encode_chat(_chat(system_prompt, q)) for q in GREEDY_PROMPTS]
    key = hashlib.sha256(json.dumps([prompts, GREEDY_NEW_TOKENS, sorted(lm.config.eos_ids)]).encode()).hexdigest()[:12]
    ref_path = cached / f"torch-greedy-{key}.json"
    if ref_path.is_file():
        ref = json.loads(ref_path.read_text(encoding="utf-8"))
    else:
        ref = torch_greedy(hf_dir, prompts, GREEDY_NEW_TOKENS, list(lm.config.eos_ids))
        ref_path.write_text(json.dumps(ref), encoding="utf-8")
    got = [list(lm.generate_ids(p, GREEDY_NEW_TOKENS)) for p in prompts]
    same = [g == r for g, r in zip(got, ref)]
    return {"match": sum(same) / len(same), "prompts": list(GREEDY_PROMPTS), "torch": ref, "onnx": got,
            "replies": [lm.decode(g) for g in got]}


def measure_speed(lm, system_prompt: str, question: str = GREEDY_PROMPTS[0], new_tokens: int = 32,
                  rounds: int = 2) -> dict[str, float]:
    """Best-of-``rounds`` time to first token (prefill) and decode tokens/s of ``lm`` on one chat prompt."""
    from edge.stages.base import GenerationStats

    best: dict[str, float] = {}
    ids = lm.encode_chat(_chat(system_prompt, question))
    for _ in range(rounds):
        st = GenerationStats()
        n = sum(1 for _ in lm.generate_ids(ids, new_tokens, stats=st))
        steps = max(n - (st.stopped_by == "budget"), 1)
        tps = steps / st.decode_s if st.decode_s > 0 else 0.0
        if not best or tps > best["tokens_per_s"]:
            best = {"ttft_ms": round(st.prefill_s * 1000, 1), "tokens_per_s": round(tps, 1),
                    "prompt_tokens": st.prompt_tokens, "new_tokens": n}
    return best


def _place(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def _io(path: Path) -> tuple[list[dict], list[dict]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def desc(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            out.append({"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(),
                        "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]})
        return out

    return desc(graph.input), desc(graph.output)


def _model_files(model_path: Path) -> dict[str, Path]:
    """``model.onnx`` plus its external data files (if any), by the name the runtime opens them by."""
    import onnx

    files = {"model.onnx": model_path}
    graph = onnx.load(str(model_path), load_external_data=False).graph
    for init in graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                files[entry.value] = model_path.parent / entry.value
    return files


def _float32_weight_bytes(src: LlmSource) -> int:
    """The model's weights in float32 (about what the HF copy and each float ONNX file hold): from the GGUF's
    tensor element counts, the safetensors headers, or other weight files counted at twice their size."""
    if src.gguf is not None:
        from gguf import GGUFReader

        return 4 * sum(int(t.n_elements) for t in GGUFReader(src.gguf).tensors)
    assert src.hf_dir is not None
    total = 0
    for f in src.hf_dir.iterdir():
        if f.suffix == ".safetensors":
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            total += 4 * sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
        elif f.suffix in (".bin", ".pt", ".pth"):
            total += 2 * f.stat().st_size
    return total


def export_space_needed(src: LlmSource, work: Path, quantization: str, keep: Sequence[str]) -> int:
    """Bytes the steps of ``export_llm`` not yet cached under ``work`` will write (an estimate): the float32
    weights once each for the dequantized GGUF, the ONNX export and its ``logits_to_keep`` copy, and half of
    that for a quantized model. 0 when every step is cached (the weights are not even read then)."""
    from export import llm_quant

    share = sum([src.gguf is not None and not _done(work / "hf"), not _done(work / "onnx-export"),
                 not _done(work / "onnx-float")])
    if quantization != "none" and not _done(work / llm_quant.scheme_dir(quantization, keep)):
        share += 0.5
    return int(share * _float32_weight_bytes(src)) if share else 0


def export_llm(
    source: Recipe | Path | str = RECIPE,
    out_dir: Path | None = None,
    *,
    workdir: Path | None = None,
    quantization: str = "none",
    keep_float: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
    cache: Path | None = None,
    measure: bool = True,
) -> StageArtifact:
    """The LLM stage (kind ``onnx-causal-lm``) from a recipe (GGUF) or a local HF causal-LM directory.

    ``quantization``: ``none`` | ``dynamic-int8`` | ``static-qdq-s8s8`` | ``nncf-int8`` | ``fp16`` (the
    schemes ``export.llm_quant`` cannot do yet fall back to ``dynamic-int8`` with ``quantization['note']``).
    ``keep_float``: weight MatMuls int8 leaves float, by name part (default ``llm_quant.KEEP_FLOAT``,
    embedding and LM head; a board profile's ``llm_keep_float``).
    Files by role: ``model`` (``model.onnx``), ``tokenizer`` (``tokenizer.json``), placed (hard-linked
    when possible) in ``out_dir`` (default ``workdir/<key>/stage/<scheme>``); ``config`` holds the
    runtime settings (``stage_config``). ``drift`` records the greedy match against torch and, when
    quantized, the gates. Intermediate results are cached under ``workdir`` (default ``default_workdir()``).
    Raises ``ConfigError`` for an unknown scheme or a directory that is not a causal LM, ``ModelFileError``
    when a file is missing (tokenizer, chat template) or the export or the exported model's greedy check
    fails, ``export.disk.DiskSpaceError`` when ``workdir`` lacks the space the uncached steps need
    (``export_space_needed``) or a write hits a full disk; every message is one line naming the stage or path."""
    from export import llm_quant

    if quantization not in llm_quant.SCHEMES:
        raise ConfigError(f"llm quantization {quantization!r} is not one of {', '.join(llm_quant.SCHEMES)}")
    keep = tuple(llm_quant.KEEP_FLOAT if keep_float is None else keep_float)
    say = progress or (lambda _msg: None)
    src = resolve_source(source, cache)
    work = Path(workdir or default_workdir()) / cache_key(src)
    work.mkdir(parents=True, exist_ok=True)
    needed = export_space_needed(src, work, quantization, keep)
    require_free_space(work, needed)
    with disk_full_guard(work, needed or None):
        return _export(src, work, out_dir, quantization, keep, say, measure)


def _export(src: LlmSource, work: Path, out_dir: Path | None, quantization: str, keep: tuple[str, ...],
            say: ProgressFn, measure: bool) -> StageArtifact:
    """``export_llm``'s steps once the source is resolved and the space checked."""
    from export import llm_quant

    t0 = time.perf_counter()
    if src.gguf is not None and not _done(work / "hf"):
        say(f"loading {src.gguf.name} in transformers (dequantized to float32)")
    hf_dir = build_hf_dir(src, work / "hf")
    if not _done(work / "onnx-export"):
        say("exporting ONNX with KV cache (optimum, text-generation-with-past)")
    float_model = add_logits_to_keep(export_onnx(hf_dir, work / "onnx-export"), work / "onnx-float" / "model.onnx")
    tok_path = work / "tokenizer" / "tokenizer.json"
    if not tok_path.is_file():
        say("writing and verifying tokenizer.json")
        write_tokenizer(hf_dir, tok_path, src.system_prompt)
    config = stage_config(hf_dir, float_model, src.system_prompt)
    export_s = time.perf_counter() - t0
    float_lm = runtime_model(float_model, tok_path, config)
    say(f"checking greedy tokens against torch ({len(GREEDY_PROMPTS)} prompts x {GREEDY_NEW_TOKENS} tokens)")
    greedy = greedy_check(float_lm, hf_dir, src.system_prompt, work)
    if greedy["match"] < 1.0:
        raise ModelFileError(f"the exported model's greedy tokens differ from torch ({greedy['match']:.0%} of "
                             f"prompts match): replies {greedy['replies']}")
    float_bytes = sum(p.stat().st_size for p in _model_files(float_model).values())
    drift: dict[str, Any] = {"greedy_match_vs_torch": greedy["match"], "greedy_prompts": len(GREEDY_PROMPTS),
                             "greedy_new_tokens": GREEDY_NEW_TOKENS, "gate": "n/a"}
    quant: dict[str, Any] = {"scheme": "none", "weights": "float32", "activations": "float32",
                             "float_bytes": float_bytes}
    report: dict[str, Any] = {"export_s": round(export_s, 1), "greedy_replies": greedy["replies"]}
    chosen = float_model
    if measure:
        report["float"] = measure_speed(float_lm, src.system_prompt)
    if quantization != "none":
        result = llm_quant.quantize_and_gate(float_model, float_lm, tok_path, config, quantization,
                                             work / llm_quant.scheme_dir(quantization, keep), src.gates, say, keep)
        chosen, quant, gate_drift = result.model, {**result.quantization, "float_bytes": float_bytes}, result.drift
        drift.update(gate_drift)
        if measure:
            report[quant["scheme"]] = measure_speed(result.lm, src.system_prompt)
            if report["float"]["tokens_per_s"]:
                report["speedup_vs_float"] = round(report[quant["scheme"]]["tokens_per_s"]
                                                   / report["float"]["tokens_per_s"], 2)
    variant = quant["scheme"] if quantization == "none" else llm_quant.scheme_dir(quantization, keep)[len("onnx-"):]
    stage_dir = Path(out_dir) if out_dir is not None else work / "stage" / variant
    files = {name: _place(p, stage_dir / name) for name, p in _model_files(chosen).items()}
    files["tokenizer.json"] = _place(tok_path, stage_dir / "tokenizer.json")
    inputs, outputs = _io(files["model.onnx"])
    report["seconds"] = round(time.perf_counter() - t0, 1)
    say(f"llm stage ready in {report['seconds']:.1f} s")
    return StageArtifact(
        stage="llm", kind=KIND, runtime="onnxruntime", files=files,
        roles={"model": "model.onnx", "tokenizer": "tokenizer.json"},
        inputs=[d for d in inputs if not d["name"].startswith("past_key_values.")],
        outputs=[d for d in outputs if not d["name"].startswith("present.")],
        quantization=quant, drift=drift, license=src.license,
        source={**src.manifest_source, "export": "optimum text-generation-with-past", "cache_key": work.name},
        config=config, report=report,
    )
