"""Import prebuilt models (Silero VAD, Moonshine .ort, Kokoro int8) as bundle stages, checked.

Checks: every file matches its recipe sha256 (``export.fetch.verify_cached``); ONNX/ORT models
load in onnxruntime and expose the input/output names the recipe declares.
"""

from __future__ import annotations

from pathlib import Path

from edge.errors import ModelFileError
from export.artifact import StageArtifact
from export.fetch import model_dir, verify_cached
from export.recipes import Recipe


def _io_of(path: Path) -> tuple[list[dict], list[dict]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"{path.name} does not load in onnxruntime: {str(exc).splitlines()[0]}") from exc

    def desc(args) -> list[dict]:
        return [{"name": a.name, "dtype": a.type, "shape": [d if isinstance(d, int) else str(d) for d in a.shape]}
                for a in args]

    return desc(sess.get_inputs()), desc(sess.get_outputs())


def check_io(paths: Path | list[Path], recipe: Recipe) -> tuple[list[dict], list[dict]]:
    """Load the model file(s) and check the names the recipe declares are among their inputs/outputs.

    A stage of several graphs (Moonshine: encoder + decoder) is checked over the union of their I/O.
    """
    inputs, outputs = [], []
    for path in [paths] if isinstance(paths, Path) else paths:
        ins, outs = _io_of(path)
        inputs += [{**i, "graph": path.name} for i in ins]
        outputs += [{**o, "graph": path.name} for o in outs]
    path = paths if isinstance(paths, Path) else paths[0]
    want_in = {i["name"] for i in recipe.io.get("inputs", [])}
    want_out = {o["name"] for o in recipe.io.get("outputs", [])}
    have_in, have_out = {i["name"] for i in inputs}, {o["name"] for o in outputs}
    if not want_in <= have_in or not want_out <= have_out:
        raise ModelFileError(
            f"{path.name} does not have the I/O of recipe {recipe.name}: inputs {sorted(have_in)}, "
            f"outputs {sorted(have_out)}; expected {sorted(want_in)} -> {sorted(want_out)}"
        )
    return inputs, outputs


def import_prebuilt(recipe: Recipe, cache: Path, *, model_role: str | tuple[str, ...],
                    config: dict | None = None) -> StageArtifact:
    """Turn a recipe's fetched files into a stage artifact, after checking hashes and I/O."""
    verify_cached(recipe, cache)
    root = model_dir(recipe, cache)
    files = {f.name: root / f.name for f in recipe.files if f.in_bundle}
    roles = {f.role: f.name for f in recipe.files if f.in_bundle}
    graphs = (model_role,) if isinstance(model_role, str) else model_role
    inputs, outputs = check_io([root / recipe.file(r).name for r in graphs], recipe)
    scheme = "prebuilt-int8" if recipe.kind in ("kokoro", "moonshine") else "none"
    return StageArtifact(
        stage=recipe.stage,
        kind=recipe.kind,
        runtime="onnxruntime",
        files=files,
        roles=roles,
        sample_rate=recipe.sample_rate,
        inputs=inputs,
        outputs=outputs,
        quantization={"scheme": scheme, "note": "shipped as published" if scheme != "none" else "float32"},
        license=recipe.license,
        source=recipe.source,
        config=dict(config or {}),
    )


def import_vad(recipe: Recipe, cache: Path) -> StageArtifact:
    return import_prebuilt(recipe, cache, model_role="model", config={"frame_samples": 512, "context_samples": 64})


def import_moonshine(recipe: Recipe, cache: Path) -> StageArtifact:
    return import_prebuilt(recipe, cache, model_role=("encoder", "decoder"),
                           config={"bos_id": 1, "eos_id": 2, "max_tokens_per_s": 6.5})


def import_kokoro(recipe: Recipe, cache: Path) -> StageArtifact:
    return import_prebuilt(recipe, cache, model_role="model",
                           config={"voice": recipe.extra.get("voice", "jm_kumo"), "speed": 1.0, "phonemizer": "espeak-ng",
                                   "language": "en-us"})
