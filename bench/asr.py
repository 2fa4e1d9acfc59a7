"""Benchmark: ASR engines on the same utterances: WER and real-time factor on this machine's CPU.

Engines (each on the same synthesized audio, same thread count, one warm-up call first, taking turns
clip by clip so that other load on the machine falls on all alike):
- ``faster-whisper int8``: the peer, CTranslate2 running the shipped Whisper tiny.en weights (greedy, English,
  no timestamps); ``faster-whisper fp32`` with ``--fp32``;
- ``whisper onnx fp32`` / ``whisper onnx int8``: our export of the same weights (``export.whisper``), run by
  the edge runtime's ``WhisperRecognizer`` (numpy features, onnxruntime, greedy KV-cache decoding);
- ``moonshine base int8``: the prebuilt Moonshine stage (``edge.stages.moonshine``), for comparison.
The utterances are the eval set (``tests/data/eval_set.toml``) spoken by espeak-ng in each ``--condition``
(``tests.eval.CONDITIONS``). RTF = total compute seconds / total audio seconds (lower is faster).

Usage: .venv/bin/python bench/asr.py [--condition en-us --condition en-us+f3] [--threads 2] [--limit N]
       [--fp32] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.evalset import corpus_wer, load_eval_set  # noqa: E402
from export.fetch import default_cache_dir, fetch_models, model_file  # noqa: E402
from tests.eval import CONDITIONS, synthesize  # noqa: E402

Transcribe = Callable[[np.ndarray], str]


def faster_whisper_engine(ct2_dir: Path, compute_type: str, threads: int) -> Transcribe:
    from faster_whisper import WhisperModel

    model = WhisperModel(str(ct2_dir), device="cpu", compute_type=compute_type, cpu_threads=threads)

    def transcribe(audio: np.ndarray) -> str:
        segments, _ = model.transcribe(audio, language="en", beam_size=1, temperature=0.0, without_timestamps=True,
                                       condition_on_previous_text=False, vad_filter=False)
        return "".join(s.text for s in segments).strip()

    return transcribe


def onnx_engine(quantization: str, threads: int, cache: Path) -> tuple[Transcribe, int]:
    """Our exported stage (cached export) as the edge runtime loads it; returns it and its model bytes."""
    from edge.stages.whisper import DecodeRules, WhisperRecognizer
    from export.whisper import export_whisper

    out = cache / "export" / "whisper-stage" / quantization
    art = export_whisper(out, quantization=quantization, cache=cache, measure_latency=False,
                         progress=lambda msg: print(f"  [{quantization}] {msg}", file=sys.stderr))
    rec = WhisperRecognizer(art.files["encoder.onnx"], art.files["decoder.onnx"], art.files["tokenizer.json"],
                            art.files["mel_filters.npy"], DecodeRules.from_config(art.config), threads=threads)
    size = art.files["encoder.onnx"].stat().st_size + art.files["decoder.onnx"].stat().st_size
    return rec.transcribe, size


def moonshine_engine(threads: int, cache: Path) -> tuple[Transcribe, int]:
    from edge.stages.moonshine import MoonshineRecognizer

    paths = [model_file("moonshine-base-en", role, cache) for role in ("encoder", "decoder", "tokenizer")]
    rec = MoonshineRecognizer(*paths, threads=threads)
    return rec.transcribe, paths[0].stat().st_size + paths[1].stat().st_size


def run(engines: dict[str, Transcribe], clips: list[tuple[str, str, np.ndarray]]) -> dict[str, dict]:
    """Per engine: corpus WER per condition and overall, RTF over all clips. The engines take turns clip by
    clip, so load from other processes on the machine falls on all of them alike."""
    for transcribe in engines.values():
        transcribe(clips[0][2])  # warm up
    pairs: dict[str, dict[str, list]] = {name: {} for name in engines}
    compute = dict.fromkeys(engines, 0.0)
    for cond, text, audio in clips:
        for name, transcribe in engines.items():
            t0 = time.perf_counter()
            hyp = transcribe(audio)
            compute[name] += time.perf_counter() - t0
            pairs[name].setdefault(cond, []).append((text, hyp))
    audio_s = sum(len(a) for _, _, a in clips) / 16000
    out = {}
    for name in engines:
        every = [p for cond_pairs in pairs[name].values() for p in cond_pairs]
        out[name] = {"wer": corpus_wer(every), "rtf": compute[name] / audio_s,
                     "wer_by_condition": {c: corpus_wer(p) for c, p in pairs[name].items()}, "pairs": every}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--condition", action="append", choices=sorted(CONDITIONS),
                    help="speech condition (repeatable; default en-us and en-us+f3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="only the first N utterances of the set")
    ap.add_argument("--fp32", action="store_true", help="also run faster-whisper in float32")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cache = default_cache_dir()
    fetch_models(["whisper-tiny-en", "moonshine-base-en"], cache)
    ct2_dir = model_file("whisper-tiny-en", "ct2-weights", cache).parent
    conditions = args.condition or ["en-us", "en-us+f3"]
    utterances = load_eval_set()[: args.limit or None]
    clips = [(c, u.text, synthesize(u, **CONDITIONS[c])) for c in conditions for u in utterances]
    engines: dict[str, Transcribe] = {"faster-whisper int8": faster_whisper_engine(ct2_dir, "int8", args.threads)}
    sizes = {"faster-whisper int8": None}
    if args.fp32:
        engines["faster-whisper fp32"] = faster_whisper_engine(ct2_dir, "float32", args.threads)
        sizes["faster-whisper fp32"] = None
    for scheme, label in (("none", "whisper onnx fp32"), ("dynamic-int8", "whisper onnx int8")):
        engines[label], sizes[label] = onnx_engine(scheme, args.threads, cache)
    if (ROOT / "edge" / "stages" / "moonshine.py").is_file():
        engines["moonshine base int8"], sizes["moonshine base int8"] = moonshine_engine(args.threads, cache)
    sizes["faster-whisper int8"] = sizes.get("faster-whisper fp32") or (ct2_dir / "model.bin").stat().st_size
    results = run(engines, clips)
    if args.json:
        print(json.dumps({"conditions": conditions, "utterances": len(clips), "threads": args.threads,
                          "results": {k: {**v, "model_bytes": sizes.get(k)} for k, v in results.items()}}, indent=1))
        return
    audio_s = sum(len(a) for _, _, a in clips) / 16000
    print(f"\nASR on {len(clips)} utterances ({audio_s:.0f} s of espeak-ng speech: {', '.join(conditions)}), "
          f"{args.threads} threads, greedy")
    head = f"{'engine':22s} {'WER':>6s} " + " ".join(f"{c[:12]:>12s}" for c in conditions) + f" {'RTF':>6s} {'model MB':>9s}"
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        size = sizes.get(name)
        mb = f"{size / 1e6:9.1f}" if size else f"{'':>9s}"
        by = " ".join(f"{r['wer_by_condition'][c]:12.3f}" for c in conditions)
        print(f"{name:22s} {r['wer']:6.3f} {by} {r['rtf']:6.3f} {mb}")
    print("model MB: encoder + decoder files (faster-whisper: the CTranslate2 model.bin, float16 on disk)")


if __name__ == "__main__":
    main()
