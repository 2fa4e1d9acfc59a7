"""Kokoro TTS export: the published int8 ONNX imported, optionally graph-optimized, validated.

``export_tts``:
1. the recipe's files are checked (sha256, I/O) - Kokoro ships as int8 and cannot be re-quantized
   from source here;
2. onnxruntime's offline optimizer is tried at the portable levels (basic, extended); an optimized
   graph is kept only when it loads or runs at least ``MIN_GAIN`` faster than the original here and
   is not slower on the other count (measured interleaved, same inputs); otherwise the original
   ships and ``quantization.graph_note`` says what was measured;
3. gates: round-trip intelligibility (Kokoro speaks, Moonshine transcribes, WER against the text,
   threshold ``[gates] roundtrip_wer``) and, if an optimized graph is kept, its log-mel distance to
   the original's speech (``[gates] mel_distance_db``).
The synthesizer is the edge runtime's own Kokoro stage, built from a bundle-shaped directory.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge.boards import BoardProfile
from edge.bundle import FileEntry, StageSpec
from edge.errors import ConfigError
from export.artifact import StageArtifact
from export.gates import GateResult, tts_mel_distance, tts_roundtrip_wer
from export.prebuilt import import_kokoro
from export.quantize import PORTABLE_LEVELS, optimize_offline
from export.recipes import Recipe, load_recipe

#: an optimized graph must be at least this much faster (load or run) to replace the original
MIN_GAIN = 0.05
#: sentences of the round-trip gate (short: Kokoro runs at RTF ~0.3 on 2 cores)
ROUNDTRIP_SENTENCES = ("The capital of France is Paris.", "Set a timer for ten minutes.",
                       "The weather is sunny today.")
DEFAULT_MAX_ROUNDTRIP_WER = 0.35
DEFAULT_MAX_MEL_DB = 1.0

SynthFactory = Callable[[Path], Any]  # model path -> object with .synthesize(text) and .sample_rate


def _stage_dir(files: dict[str, Path], roles: dict[str, str], kind: str, config: dict, root: Path) -> StageSpec:
    """Link ``files`` into ``root/tts/`` and describe them as the bundle builder would."""
    (root / "tts").mkdir(parents=True, exist_ok=True)
    entries = []
    for name, src in files.items():
        link = root / "tts" / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(Path(src).resolve(), link)
        entries.append(FileEntry(f"tts/{name}", "", Path(src).stat().st_size))
    cfg = dict(config)
    cfg["files"] = {role: f"tts/{name}" for role, name in roles.items()}
    return StageSpec(kind=kind, runtime="onnxruntime", files=entries, sample_rate=24000, config=cfg)


def kokoro_factory(base: StageArtifact, workdir: Path) -> SynthFactory:
    """A factory building the edge runtime's Kokoro synthesizer on a given model file, with the
    voices/vocab of ``base``. Raises ``ConfigError`` when the runtime stage is not installed."""
    try:
        from edge.stages import kokoro as kokoro_stage
    except ImportError as exc:
        raise ConfigError(f"the Kokoro runtime stage (edge.stages.kokoro) is not available: {exc}") from exc
    loader = getattr(kokoro_stage, "load_tts", None) or getattr(kokoro_stage, "load_kokoro", None)
    if loader is None:
        raise ConfigError("edge.stages.kokoro has no load_tts(spec, root, providers, threads) factory")
    model_name = base.roles["model"]

    def build(model: Path) -> Any:
        root = Path(workdir) / f"stage-{Path(model).stem}"
        files = dict(base.files)
        files[model_name] = Path(model)
        spec = _stage_dir(files, base.roles, base.kind, base.config, root)
        return loader(spec, root, ["CPUExecutionProvider"], 2)

    return build


def moonshine_asr(cache: Path):
    """The Moonshine recognizer from the cached ``moonshine-base-en`` recipe (the round-trip judge)."""
    from edge.stages.moonshine import MoonshineRecognizer
    from export.fetch import model_file

    recipe = load_recipe("moonshine-base-en")
    return MoonshineRecognizer(model_file(recipe, "encoder", cache), model_file(recipe, "decoder", cache),
                               model_file(recipe, "tokenizer", cache), threads=2)


def timing_feed(voices: Path, n_tokens: int = 60, seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed Kokoro input (valid symbol ids, 0-padded; the first voice's style row for its length)."""
    rng = np.random.default_rng(seed)
    tokens = np.array([[0, *rng.integers(43, 69, n_tokens), 0]], dtype=np.int64)  # latin letters of the vocab
    with np.load(voices) as data:
        style = data[sorted(data.files)[0]][tokens.shape[1]].reshape(1, -1).astype(np.float32)
    return {"tokens": tokens, "style": style, "speed": np.array([1.0], dtype=np.float32)}


def load_and_run_s(model: Path, feed: dict[str, np.ndarray], threads: int = 2) -> tuple[float, float]:
    """(seconds to create the session, best of 2 runs after a warm-up) for ``model`` on ``feed``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - t0
    sess.run(None, feed)
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        sess.run(None, feed)
        runs.append(time.perf_counter() - t0)
    return load, min(runs)


def compare_graphs(original: Path, optimized: Path, feed: dict[str, np.ndarray], rounds: int = 2) -> dict[str, float]:
    """Median load and run seconds of both graphs, measured interleaved in this process."""
    o_load, o_run, p_load, p_run = [], [], [], []
    for _ in range(rounds):
        a, b = load_and_run_s(original, feed)
        c, d = load_and_run_s(optimized, feed)
        o_load.append(a), o_run.append(b), p_load.append(c), p_run.append(d)
    med = statistics.median
    return {"original_load_s": round(med(o_load), 4), "original_run_s": round(med(o_run), 4),
            "optimized_load_s": round(med(p_load), 4), "optimized_run_s": round(med(p_run), 4)}


def _gain(t: dict[str, float]) -> tuple[float, float]:
    return (1 - t["optimized_load_s"] / t["original_load_s"], 1 - t["optimized_run_s"] / t["original_run_s"])


def export_tts(
    recipe: Recipe,
    cache: Path,
    profile: BoardProfile,
    workdir: Path,
    *,
    levels: Sequence[str] = PORTABLE_LEVELS,
    sentences: Sequence[str] = ROUNDTRIP_SENTENCES,
    synth_factory: SynthFactory | None = None,
) -> StageArtifact:
    """The Kokoro stage: imported int8, offline-optimized only where it measurably helps, validated by
    the round-trip gate (and the mel-distance gate for an optimized graph). ``drift['gate']`` is
    ``passed`` or ``failed``; the builder turns a failure into an error or a float fallback."""
    base = import_kokoro(recipe, cache)
    work = Path(workdir) / "tts"
    work.mkdir(parents=True, exist_ok=True)
    key = _cache_key(recipe, base, levels, sentences)
    cached = work / f"result-{key}.json"
    if synth_factory is None and not levels and cached.is_file():
        saved = json.loads(cached.read_text())
        base.quantization, base.drift = saved["quantization"], saved["drift"]
        base.report = {"cached": str(cached)}
        return base
    model_name = base.roles["model"]
    original = base.files[model_name]
    feed = timing_feed(base.files[base.roles["voices"]])
    tried: dict[str, Any] = {}
    chosen: tuple[str, Path] | None = None
    for level in levels:
        optimized = optimize_offline(original, work / f"{Path(model_name).stem}.{level}.onnx", level)
        timing = compare_graphs(original, optimized, feed)
        load_gain, run_gain = _gain(timing)
        tried[level] = {**timing, "bytes": optimized.stat().st_size}
        if max(load_gain, run_gain) >= MIN_GAIN and min(load_gain, run_gain) > -MIN_GAIN:
            if chosen is None or run_gain > _gain(tried[chosen[0]])[1]:
                chosen = (level, optimized)
    factory = synth_factory or kokoro_factory(base, work)
    asr = moonshine_asr(cache)
    float_synth = factory(original)
    results: list[GateResult] = []
    graph_note = "original graph kept: offline optimization gave no measurable gain here"
    if chosen is not None:
        level, optimized = chosen
        cand_synth = factory(optimized)
        results.append(tts_mel_distance(float_synth, cand_synth, sentences[:2], sample_rate=float_synth.sample_rate,
                                        max_db=float(recipe.gates.get("mel_distance_db", DEFAULT_MAX_MEL_DB))))
        if results[-1].passed:
            graph_note = f"onnxruntime {level} optimization applied offline"
            optimized_name = f"{Path(model_name).stem}.opt-{level}.onnx"
            base.files = {**{k: v for k, v in base.files.items() if k != model_name}, optimized_name: optimized}
            base.roles = {**base.roles, "model": optimized_name}
            float_synth = cand_synth
        else:
            graph_note = f"{level} optimization changed the speech (mel distance {results[-1].value:.3g} dB); original kept"
    results.append(tts_roundtrip_wer(float_synth, asr, sentences, sample_rate=float_synth.sample_rate,
                                     max_wer=float(recipe.gates.get("roundtrip_wer", DEFAULT_MAX_ROUNDTRIP_WER))))
    passed = results[-1].passed  # a failed mel gate only means the original graph was kept
    base.quantization = {"scheme": "prebuilt-int8", "note": "int8 as published", "graph_note": graph_note,
                         "float_bytes": None}
    base.report = {"optimization_tried": tried}  # wall-clock figures stay out of the manifest
    base.drift = {"roundtrip_wer": results[-1].value, "gates": [r.to_dict() for r in results],
                  "gate": "passed" if passed else "failed"}
    if len(results) > 1:
        base.drift["mel_distance_db"] = results[0].value
    if synth_factory is None and not levels:
        cached.write_text(json.dumps({"quantization": base.quantization, "drift": base.drift}))
    return base


def _cache_key(recipe: Recipe, base: StageArtifact, levels: Sequence[str], sentences: Sequence[str]) -> str:
    """Same model files, voice, sentences and thresholds -> same gate result (the synthesis is deterministic)."""
    import hashlib

    from edge.bundle import sha256_file

    parts = [f"v1", *sorted(f"{n}:{sha256_file(p)}" for n, p in base.files.items()), json.dumps(base.config,
             sort_keys=True), json.dumps(recipe.gates, sort_keys=True), *levels, *sentences]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
