"""LLM benchmark: our edge runtime (fp32 and int8 exports) vs torch float (and llama.cpp when installed).

Engines: ``ours-fp32``; ``ours-int8`` (int8 weight blocks, embedding and LM head float: the default
``keep_float``); ``ours-int8+head`` (the LM head int8 too, ``keep_float=("embed_tokens",)``);
``torch-fp32``; ``llama.cpp-q4_1``.

For each chat prompt and each engine: time to first token (prefill), decode tokens/s (greedy, no
sampling) and the reply; a reply is "same" when it equals torch float's reply. Prints a table, or
JSON with ``--json``.

    .venv/bin/python -m bench.llm [--threads 2] [--new-tokens 48] [--rounds 2] [--no-torch] [--json]

The exports come from the cache the bundle builder fills (``export.llm.export_llm``); llama.cpp runs
the recipe's own Q4_1 GGUF through ``llama-cpp-python`` if that package is importable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo's packages before bench/ (bench/export.py is not export/)

SYSTEM = "You are a helpful voice assistant. Answer in one or two short sentences."
PROMPTS = (
    "What is the capital of France?",
    "How do I boil an egg?",
    "Give me one tip for sleeping better.",
    "Why is the sky blue?",
)


@dataclass
class Run:
    engine: str
    prompt: str
    ttft_ms: float
    tokens_per_s: float
    new_tokens: int
    reply: str


@dataclass
class EngineSummary:
    engine: str
    ttft_ms_median: float
    tokens_per_s_median: float
    same_as_torch: str
    size_mb: float | None = None
    runs: list[Run] = field(default_factory=list)


# --------------------------------------------------------------------------- engines
# each engine: (prompt) -> Run, greedy up to ``new_tokens``


def ours(model: Path, tokenizer: Path, config: dict, threads: int, new_tokens: int, name: str) -> Callable[[str], Run]:
    from edge.stages.base import ChatMessage, GenerationStats
    from edge.stages.llm_onnx import LlmConfig, OnnxCausalLM

    lm = OnnxCausalLM(model, tokenizer, LlmConfig.from_config(config), threads=threads)

    def run(prompt: str) -> Run:
        st = GenerationStats()
        reply = "".join(lm.stream([ChatMessage("system", SYSTEM), ChatMessage("user", prompt)],
                                  max_new_tokens=new_tokens, stats=st))
        steps = max(st.new_tokens - (st.stopped_by == "budget"), 1)
        return Run(name, prompt, st.prefill_s * 1000, steps / st.decode_s if st.decode_s else 0.0, st.new_tokens,
                   reply.strip())

    return run


def torch_float(hf_dir: Path, threads: int, new_tokens: int, eos: list[int]) -> Callable[[str], Run]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def run(prompt: str) -> Run:
        ids = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                                      add_generation_prompt=True, tokenize=True)
        out: list[int] = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            res = model(torch.tensor([ids]), use_cache=True)
            ttft = time.perf_counter() - t0
            past, token = res.past_key_values, int(res.logits[0, -1].argmax())
            t1 = time.perf_counter()
            steps = 0
            while token not in eos and len(out) < new_tokens:
                out.append(token)
                if len(out) == new_tokens:
                    break
                res = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, token = res.past_key_values, int(res.logits[0, -1].argmax())
                steps += 1
            dt = time.perf_counter() - t1
        return Run("torch-fp32", prompt, ttft * 1000, steps / dt if dt else 0.0, len(out),
                   tok.decode(out, skip_special_tokens=True).strip())

    return run


def llama_cpp(gguf: Path, threads: int, new_tokens: int) -> Callable[[str], Run] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, verbose=False, seed=0)

    def run(prompt: str) -> Run:
        llm.reset()  # no KV reuse from the previous call: every engine prefills the whole prompt
        t0 = time.perf_counter()
        first = None
        pieces = []
        for chunk in llm.create_chat_completion(
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                max_tokens=new_tokens, temperature=0.0, top_k=1, stream=True):
            delta = chunk["choices"][0]["delta"].get("content")
            if delta:
                first = first or time.perf_counter()
                pieces.append(delta)
        end = time.perf_counter()
        n = len(llm.tokenize("".join(pieces).encode(), add_bos=False, special=False))
        decode = end - (first or end)
        return Run("llama.cpp-q4_1", prompt, ((first or end) - t0) * 1000, (n - 1) / decode if decode > 0 else 0.0,
                   n, "".join(pieces).strip())

    return run


# --------------------------------------------------------------------------- driver


def bench(threads: int = 2, new_tokens: int = 48, rounds: int = 2, with_torch: bool = True,
          prompts=PROMPTS) -> list[EngineSummary]:
    """Run every engine on ``prompts`` (best of ``rounds`` per prompt) and summarize."""
    from export.fetch import default_cache_dir, model_file
    from export.llm import cache_key, export_llm, resolve_source
    from export.recipes import load_recipe

    recipe = load_recipe("smollm2-135m-instruct")
    workdir = default_cache_dir() / "export" / "llm"
    fp32 = export_llm(recipe, workdir=workdir, quantization="none", measure=False)
    int8 = export_llm(recipe, workdir=workdir, quantization="dynamic-int8", measure=False)
    int8_head = export_llm(recipe, workdir=workdir, quantization="dynamic-int8", keep_float=("embed_tokens",),
                           measure=False)
    engines: list[tuple[str, Callable[[str], Run], float | None]] = []
    for name, art in (("ours-fp32", fp32), ("ours-int8", int8), ("ours-int8+head", int8_head)):
        engines.append((name, ours(art.files["model.onnx"], art.files["tokenizer.json"], art.config, threads,
                                   new_tokens, name), art.files["model.onnx"].stat().st_size / 1e6))
    if with_torch:
        hf_dir = workdir / cache_key(resolve_source(recipe)) / "hf"
        engines.append(("torch-fp32", torch_float(hf_dir, threads, new_tokens, list(fp32.config["eos_token_ids"])),
                        None))
    gguf = model_file(recipe, "gguf")
    cpp = llama_cpp(gguf, threads, new_tokens)
    if cpp is not None:
        engines.append(("llama.cpp-q4_1", cpp, gguf.stat().st_size / 1e6))
    runs: dict[str, list[Run]] = {name: [] for name, _, _ in engines}
    for prompt in prompts:
        for name, engine, _ in engines:
            engine(prompt)  # warm-up (allocations, caches)
            best = max((engine(prompt) for _ in range(rounds)), key=lambda r: r.tokens_per_s)
            runs[name].append(best)
    ref = {r.prompt: r.reply for r in runs.get("torch-fp32", [])}
    out = []
    for name, _, size in engines:
        rs = runs[name]
        same = f"{sum(ref.get(r.prompt) == r.reply for r in rs)}/{len(rs)}" if ref else "n/a"
        out.append(EngineSummary(name, round(statistics.median(r.ttft_ms for r in rs), 1),
                                 round(statistics.median(r.tokens_per_s for r in rs), 1), same,
                                 round(size, 1) if size else None, rs))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    summaries = bench(args.threads, args.new_tokens, args.rounds, not args.no_torch)
    if args.json:
        print(json.dumps([asdict(s) for s in summaries], indent=1))
        return 0
    print(f"{'engine':<22}{'size MB':>9}{'TTFT ms':>9}{'tok/s':>8}  same as torch")
    for s in summaries:
        size = f"{s.size_mb:.0f}" if s.size_mb else "-"
        print(f"{s.engine:<22}{size:>9}{s.ttft_ms_median:>9.0f}{s.tokens_per_s_median:>8.1f}  {s.same_as_torch}")
    print()
    for s in summaries:
        for r in s.runs:
            print(f"[{s.engine}] {r.prompt} -> {r.reply!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
