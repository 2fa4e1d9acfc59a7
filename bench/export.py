"""Benchmark: per stage, float vs INT8 size, drift and CPU latency on this machine.

- VAD: the published float Silero model vs the INT8 candidate ``export.vad`` builds (same process,
  same espeak-ng audio, one thread, streaming frame by frame); F1 of INT8 vs float decisions.
- wake: the published int8 TFLite model (no float exists): size and time per 30 ms model step.
- ASR / TTS: the published int8 models (Moonshine .ort, Kokoro int8): no float source here, so size only
  ("float n/a"), plus the TTS offline-optimization trial if ``--tts`` is given (slow).
- LLM: read from a built bundle's manifest (``--bundle DIR``) when one is given (``quantization.float_bytes``).
Prints a table with a verdict per stage ("int8 faster", "int8 only smaller", ...), the size ratio over the
stages quantized here (goal <= 30 % of float) and the bundle total (published int8 stages listed apart).

Usage: .venv/bin/python bench/export.py [--target x86-dev] [--bundle dist/x86-dev] [--tts] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.audio import float_to_int16  # noqa: E402
from edge.boards import load_board  # noqa: E402
from export.fetch import default_cache_dir, fetch_models, model_dir  # noqa: E402
from export.recipes import load_recipe  # noqa: E402

GOAL_RATIO = 0.30


def verdict(float_ms: float | None, int8_ms: float | None, float_b: int | None, int8_b: int) -> str:
    """One phrase saying whether INT8 is faster, only smaller, or neither (5 % counts as noise)."""
    if float_b is None:
        return "published int8 (no float to compare)"
    smaller = int8_b < float_b
    if float_ms is None or int8_ms is None:
        return "int8 smaller (latency not measured)" if smaller else "int8 NOT smaller"
    if int8_ms < float_ms * 0.95:
        return f"int8 faster ({float_ms / int8_ms:.2f}x)" + ("" if smaller else ", NOT smaller")
    if int8_ms > float_ms * 1.05:
        return f"int8 only smaller, SLOWER ({int8_ms / float_ms:.2f}x)" if smaller else "int8 worse on both"
    return "int8 only smaller (same speed within 5 %)" if smaller else "no gain"


def bench_vad(target: str, cache: Path, work: Path) -> dict:
    from export.vad import export_vad

    art = export_vad(load_recipe("silero-vad"), cache, load_board(target), work, quantize=True)
    d = art.drift
    return {"stage": "vad", "shipped": art.quantization["scheme"], "float_bytes": d["float_bytes"],
            "int8_bytes": d["int8_bytes"], "shipped_bytes": sum(p.stat().st_size for p in art.files.values()),
            "drift": f"F1 {d['frame_f1_vs_float']:.4f}", "float_ms": art.report["float_ms_per_frame"],
            "int8_ms": art.report["int8_ms_per_frame"], "unit": "ms/32 ms frame",
            "note": "at export: " + str(art.quantization.get("reason", art.report.get("verdict", "")))}


def bench_wake(cache: Path) -> dict:
    from export.calibration import espeak
    from export.wake import detector_for

    root = model_dir("microwakeword", cache)
    det = detector_for(root / "okay_nabu.tflite", root / "okay_nabu.json")
    pcm = float_to_int16(np.concatenate([espeak("okay nabu, what time is it?")] * 3))
    det.reset()
    t0 = time.perf_counter()
    steps = len(det.probabilities(pcm))
    ms = (time.perf_counter() - t0) * 1000 / max(steps, 1)
    size = (root / "okay_nabu.tflite").stat().st_size
    return {"stage": "wake", "shipped": "prebuilt-int8 (tflite)", "float_bytes": None, "int8_bytes": size,
            "shipped_bytes": size, "drift": f"max P {det.max_probability:.2f}", "float_ms": None, "int8_ms": round(ms, 4),
            "unit": "ms/30 ms step (features+model)", "note": f"runs on {det.runtime}"}


def bench_prebuilt(stage: str, recipe_name: str, cache: Path) -> dict:
    recipe = load_recipe(recipe_name)
    size = sum((model_dir(recipe, cache) / f.name).stat().st_size for f in recipe.files if f.in_bundle)
    return {"stage": stage, "shipped": "prebuilt-int8", "float_bytes": None, "int8_bytes": size, "shipped_bytes": size,
            "drift": "-", "float_ms": None, "int8_ms": None, "unit": "", "note": f"{recipe_name} as published"}


def bench_tts_optimization(cache: Path, work: Path) -> dict:
    from export.quantize import optimize_offline
    from export.tts import compare_graphs, timing_feed

    root = model_dir("kokoro-82m", cache)
    model = root / "kokoro-v1.0.int8.onnx"
    feed = timing_feed(root / "voices_ja.npz")
    out = {}
    for level in ("basic", "extended"):
        out[level] = compare_graphs(model, optimize_offline(model, work / f"kokoro.{level}.onnx", level), feed)
    return out


def llm_from_bundle(bundle: Path, cache: Path) -> dict | None:
    """The LLM row from a built bundle: sizes and gate figures from its manifest, and the decode time per
    token of the shipped model vs its float export (found in the export cache by the manifest's cache key)."""
    from export.llm import measure_speed, runtime_model

    manifest = json.loads((bundle / "manifest.json").read_text())
    stage = manifest["stages"].get("llm")
    if not stage:
        return None
    size = sum(f["size"] for f in stage["files"])
    d = stage.get("drift", {})
    drift = (f"top-1 {d['top1_agreement']:.3f}, ppl x{d['perplexity_ratio']:.3f}" if "top1_agreement" in d
             else f"greedy == torch {d.get('greedy_match_vs_torch', '?')}")
    row = {"stage": "llm", "shipped": stage["quantization"].get("scheme", "?"),
           "float_bytes": stage["quantization"].get("float_bytes"), "int8_bytes": size, "shipped_bytes": size,
           "drift": drift, "float_ms": None, "int8_ms": None, "unit": "ms/token decode", "note": "from the bundle"}
    files = {f["path"].split("/")[-1]: bundle / f["path"] for f in stage["files"]}
    float_model = cache / "export" / "llm" / stage.get("source", {}).get("cache_key", "?") / "onnx-float" / "model.onnx"
    if not float_model.is_file() or "model.onnx" not in files:
        row["note"] += " (float export not in the cache: latency not measured)"
        return row
    system = stage["config"].get("system_prompt", "You are a helpful voice assistant.")
    for key, model in (("float_ms", float_model), ("int8_ms", files["model.onnx"])):
        speed = measure_speed(runtime_model(model, files["tokenizer.json"], stage["config"]), system, new_tokens=32)
        row[key] = 1000.0 / speed["tokens_per_s"] if speed["tokens_per_s"] else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="x86-dev")
    parser.add_argument("--bundle", type=Path, help="a built bundle directory, for the LLM figures")
    parser.add_argument("--tts", action="store_true", help="also time Kokoro's offline graph optimization (slow)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cache = default_cache_dir()
    fetch_models(["silero-vad", "moonshine-base-en", "kokoro-82m", "microwakeword"], cache)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [bench_vad(args.target, cache, work), bench_prebuilt("asr", "moonshine-base-en", cache)]
        if args.bundle and (llm := llm_from_bundle(args.bundle, cache)):
            rows.append(llm)
        rows += [bench_prebuilt("tts", "kokoro-82m", cache), bench_wake(cache)]
        tts_opt = bench_tts_optimization(cache, work) if args.tts else None
    for r in rows:
        r["verdict"] = verdict(r["float_ms"], r["int8_ms"], r["float_bytes"], r["int8_bytes"])
    shipped = sum(r["shipped_bytes"] for r in rows)
    float_total = sum(r["float_bytes"] or r["shipped_bytes"] for r in rows)  # json: float where known
    if args.json:
        print(json.dumps({"target": args.target, "stages": rows, "bundle_bytes": shipped, "float_bytes": float_total,
                          "tts_optimization": tts_opt}, indent=2))
        return
    mb = lambda b: "-" if b is None else f"{b / 1e6:.2f} MB"  # noqa: E731
    ms = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    head = ["stage", "shipped", "float", "int8", "drift", "float ms", "int8 ms", "verdict"]
    table = [head] + [[r["stage"], r["shipped"], mb(r["float_bytes"]), mb(r["int8_bytes"]), r["drift"],
                       ms(r["float_ms"]), ms(r["int8_ms"]), r["verdict"]] for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    print(f"export benchmark, target {args.target} (latency: this machine, CPU provider)")
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    for r in rows:
        if r["note"]:
            print(f"  {r['stage']}: {r['note']}" + (f" [{r['unit']}]" if r["unit"] else ""))
    known = [r for r in rows if r["float_bytes"]]
    if known:
        q_ship, q_float = sum(r["shipped_bytes"] for r in known), sum(r["float_bytes"] for r in known)
        ratio = q_ship / q_float
        goal = "meets" if ratio <= GOAL_RATIO else "misses"
        print(f"quantized here ({', '.join(r['stage'] for r in known)}): {q_ship / 1e6:.2f} MB vs {q_float / 1e6:.2f} MB "
              f"float = {ratio:.0%} ({goal} the <= {GOAL_RATIO:.0%} goal)")
    print(f"bundle (these stages): {shipped / 1e6:.1f} MB; {(shipped - sum(r['shipped_bytes'] for r in known)) / 1e6:.1f} MB "
          "of it is published int8 with no float source here (not counted in the ratio)")
    if tts_opt:
        for level, t in tts_opt.items():
            print(f"  kokoro {level} offline optimization: load {t['original_load_s']:.2f} -> {t['optimized_load_s']:.2f} s, "
                  f"run {t['original_run_s']:.2f} -> {t['optimized_run_s']:.2f} s")


if __name__ == "__main__":
    main()
