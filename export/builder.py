"""``sottovoce export``: build a bundle for one board from the recipes, pack it, sign it.

Pipeline per target: fetch (cache) -> per-stage export/import (``StageArtifact``) -> copy into
``OUT_DIR/<stage>/`` -> hash -> manifest -> optional signature -> deterministic ``.svb``.
Same inputs give the same bytes: ``created`` comes from ``SOURCE_DATE_EPOCH`` or the repository's
last commit time, never the wall clock.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

from edge.boards import REPO_ROOT, BoardProfile, load_board
from edge.errors import ConfigError
from edge.bundle import (
    FORMAT_VERSION,
    Manifest,
    StageSpec,
    file_entry,
    pack_bundle,
    write_manifest,
)
from export.artifact import StageArtifact
from export.fetch import default_cache_dir, fetch_models
from export.disk import disk_full_guard, require_free_space
from export.recipes import Recipe, default_recipes, load_recipe

STAGE_ORDER = ("vad", "asr", "llm", "tts", "wake")

StatusFn = Callable[[str, str], None]  # (stage, message)


@dataclass
class ExportOptions:
    target: str = "x86-dev"
    out_dir: Path | None = None  # default dist/<target>
    svb: Path | None = None  # default dist/<target>.svb
    cache: Path | None = None
    workdir: Path | None = None  # default CACHE/export
    sign_key: Path | None = None
    llm: Path | None = None  # a local HF causal-LM directory instead of the recipe
    version: str = "1"
    quantize: bool = True  # follow the board's per-stage quantization
    fallback_float: bool = False
    wake: str | None = None  # optional wake-word recipe to include (e.g. "microwakeword")
    asr: str | None = None  # ASR recipe instead of the default (e.g. "whisper-tiny-en")
    llm_quant: str | None = None  # LLM scheme instead of the board's (export.llm_quant.SCHEMES)


@dataclass
class StageReport:
    stage: str
    kind: str
    scheme: str
    size_bytes: int
    float_bytes: int | None
    drift: dict
    gate: str  # passed | failed | n/a
    seconds: float
    measured: dict = field(default_factory=dict)  # wall-clock figures (not in the manifest)


@dataclass
class ExportResult:
    manifest: Manifest
    out_dir: Path
    svb: Path
    stages: list[StageReport] = field(default_factory=list)


def created_timestamp() -> str:
    """Deterministic creation time: ``SOURCE_DATE_EPOCH``, else the last commit time, else 0."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        try:
            epoch = subprocess.run(["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%ct"], capture_output=True,
                                   text=True, timeout=10).stdout.strip() or "0"
        except (OSError, subprocess.TimeoutExpired):
            epoch = "0"
    return datetime.fromtimestamp(int(epoch), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def toolchain_versions() -> dict[str, str]:
    out = {}
    for pkg in ("sottovoce", "onnxruntime", "onnx", "torch", "transformers", "optimum-onnx", "nncf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _export_stage(recipe: Recipe, profile: BoardProfile, opts: ExportOptions, cache: Path, workdir: Path,
                  status: StatusFn, *, quantize: bool) -> StageArtifact:
    """Run the exporter of one stage (``quantize`` False ships it in float)."""
    if recipe.stage == "vad":
        from export.vad import export_vad

        return export_vad(recipe, cache, profile, workdir, quantize=quantize)
    if recipe.stage == "asr" and recipe.kind == "moonshine":
        from export import prebuilt

        return prebuilt.import_moonshine(recipe, cache)
    if recipe.stage == "asr" and recipe.kind == "whisper":
        from export.whisper import export_whisper

        return export_whisper(workdir / "asr-whisper", workdir=workdir / "whisper", cache=cache, recipe=recipe,
                              quantization="dynamic-int8" if quantize else "none",
                              progress=lambda msg: status("asr", msg))
    if recipe.stage == "tts" and recipe.kind == "kokoro":
        from export.tts import export_tts

        # offline graph optimization measured no gain for Kokoro here (export/tts.py); skipping the trial keeps
        # the bundle independent of wall-clock timings and lets the gate result be cached
        return export_tts(recipe, cache, profile, workdir / "tts", levels=())
    if recipe.stage == "llm":
        from export.llm import export_llm

        board = profile.section("quantization")
        scheme = (opts.llm_quant or board.get("llm", "none")) if quantize else "none"
        keep = board.get("llm_keep_float")
        return export_llm(opts.llm or recipe, workdir=workdir / "llm", quantization=scheme,
                          keep_float=tuple(keep) if keep is not None else None,
                          progress=lambda msg: status("llm", msg))
    if recipe.stage == "wake":
        from export.wake import export_wake

        return export_wake(recipe, cache, profile, workdir / "wake")
    raise ConfigError(f"no exporter for {recipe.stage}/{recipe.kind}")


def _gate_results(artifact: StageArtifact) -> list:
    from export.gates import GateResult

    out = []
    for g in artifact.drift.get("gates", []) or []:
        if isinstance(g, dict) and {"metric", "value", "threshold"} <= g.keys():
            known = GateResult.__dataclass_fields__
            out.append(GateResult(**{k: v for k, v in g.items() if k in known}))
    return out


def _stale(src: Path, dst: Path) -> bool:
    return not dst.exists() or dst.stat().st_size != src.stat().st_size or dst.stat().st_mtime_ns < src.stat().st_mtime_ns


def _place(artifact: StageArtifact, out_dir: Path) -> StageSpec:
    """Copy an artifact's files into ``out_dir/<stage>/`` and describe them in a ``StageSpec``.
    Raises ``export.disk.DiskSpaceError`` when ``out_dir`` has less free space than the files to copy."""
    stage_dir = out_dir / artifact.stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    copies = {name: src for name, src in artifact.files.items() if _stale(src, stage_dir / name)}
    needed = sum(src.stat().st_size for src in copies.values())
    require_free_space(out_dir, needed)
    entries = []
    for name, src in sorted(artifact.files.items()):
        dst = stage_dir / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if name in copies:
            with disk_full_guard(out_dir, needed):
                shutil.copyfile(src, dst)
        entries.append(file_entry(out_dir, f"{artifact.stage}/{name}"))
    config = dict(artifact.config)
    config["files"] = {role: f"{artifact.stage}/{name}" for role, name in sorted(artifact.roles.items())}
    return StageSpec(
        kind=artifact.kind, runtime=artifact.runtime, files=entries, sample_rate=artifact.sample_rate,
        inputs=artifact.inputs, outputs=artifact.outputs, quantization=artifact.quantization, drift=artifact.drift,
        license=artifact.license, source=artifact.source, config=config,
    )


def build_bundle(opts: ExportOptions, status: StatusFn | None = None) -> ExportResult:
    """Export every default stage for ``opts.target``, write the bundle dir and the packed ``.svb``.

    Fails fast, before any export, on a bad board, signing key or ``opts.llm`` directory (``ConfigError`` /
    ``ModelFileError`` from ``export.llm.check_hf_dir``). Raises ``export.disk.DiskSpaceError`` (one sentence: path,
    MB needed and free) when the bundle directory or the ``.svb`` would not fit, or a write hits a full disk;
    ``GateFailed`` when a quantized stage fails its gate without ``fallback_float``."""
    status = status or (lambda stage, msg: None)
    profile = load_board(opts.target)
    if opts.llm is not None:
        from export.llm import check_hf_dir

        check_hf_dir(opts.llm)
    private_key = None
    if opts.sign_key:  # fail fast on a bad key, before minutes of export
        from export.signing import load_private_key

        private_key = load_private_key(opts.sign_key)
    cache = opts.cache or default_cache_dir()
    workdir = opts.workdir or cache / "export"
    out_dir = opts.out_dir or REPO_ROOT / "dist" / opts.target
    svb = opts.svb or out_dir.with_suffix(".svb")
    status("fetch", "checking model cache")
    fetch_models(None, cache)
    recipes = {r.stage: r for r in default_recipes()}
    if opts.asr:
        fetch_models([opts.asr], cache)
        recipes["asr"] = load_recipe(opts.asr)
    if opts.wake:
        fetch_models([opts.wake], cache)
        recipes["wake"] = load_recipe(opts.wake)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages: dict[str, StageSpec] = {}
    reports = []
    failed_gates = []
    for stage in [s for s in STAGE_ORDER if s in recipes]:
        recipe = recipes[stage]
        status(stage, f"exporting {recipe.name}")
        t0 = time.perf_counter()
        artifact = _export_stage(recipe, profile, opts, cache, workdir, status, quantize=opts.quantize)
        if artifact.drift.get("gate") == "failed":
            failing = [g for g in _gate_results(artifact) if not g.passed]
            if opts.fallback_float and artifact.quantization.get("scheme", "none") != "none":
                why = "; ".join(g.summary() for g in failing) or "gate failed"
                status(stage, f"gate failed ({why}); shipping float (--fallback-float)")
                artifact = _export_stage(recipe, profile, opts, cache, workdir, status, quantize=False)
                artifact.quantization = {**artifact.quantization, "fallback": f"int8 failed its gate: {why}"}
            else:
                failed_gates.extend(failing or _gate_results(artifact))
                status(stage, "gate FAILED")
        spec = _place(artifact, out_dir)
        stages[stage] = spec
        gate = artifact.drift.get("gate", "n/a")
        reports.append(StageReport(stage, spec.kind, spec.quantization.get("scheme", "none"),
                                   sum(f.size for f in spec.files), artifact.quantization.get("float_bytes"),
                                   artifact.drift, gate if isinstance(gate, str) else "n/a",
                                   time.perf_counter() - t0, artifact.report))
        status(stage, "done")
    if failed_gates:
        from export.gates import GateFailed

        raise GateFailed(failed_gates)
    named = {e.path for s in stages.values() for e in s.files}
    for path in sorted(out_dir.rglob("*")):
        rel = path.relative_to(out_dir).as_posix()
        if path.is_file() and rel != "manifest.json" and rel not in named:
            path.unlink()
    manifest = Manifest(
        format=FORMAT_VERSION, bundle_id="", version=opts.version, created=created_timestamp(),
        target=profile.to_manifest(), toolchain=toolchain_versions(), stages=stages,
    )
    manifest.bundle_id = manifest.compute_bundle_id()
    if private_key is not None:
        from export.signing import sign_manifest

        sign_manifest(manifest, private_key)
    write_manifest(out_dir, manifest)
    status("pack", f"packing {svb.name}")
    packed = sum(f.size for s in stages.values() for f in s.files)
    require_free_space(svb.parent, packed)
    with disk_full_guard(svb.parent, packed):
        pack_bundle(out_dir, svb)
    return ExportResult(manifest, out_dir, svb, reports)
