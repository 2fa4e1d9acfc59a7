"""Silero VAD export: try INT8, gate it against float, ship whichever the measurements favour.

Steps (``export_vad``):
1. the published model is checked (recipe sha256, I/O) - it is the float reference;
2. ``specialize_16k``: the top-level ``If`` on ``sr`` is replaced by its 16 kHz branch and the
   weights, which the published graph keeps in ``Constant`` nodes, become initializers, so the
   quantizer can see them (the runtime still feeds ``sr``; the 8 kHz branch is dropped);
3. onnxruntime's basic optimizer folds the LSTM weight slicing into plain initializers;
4. INT8: static QDQ S8S8 on the convolutions, calibrated on espeak-ng speech with noise through the
   float model's own context/state; on CPU-only boards the LSTM also gets dynamic int8 weights
   (onnxruntime's static QDQ leaves recurrent ops in float);
5. gate: frame F1 of INT8 vs float decisions at the profile's ``threshold_on`` on a separate set
   (other sentences and noise), threshold from the recipe's ``[gates] frame_f1_vs_float``;
6. INT8 ships only if it passes the gate AND is smaller; otherwise float ships and
   ``quantization.reason`` says why. Latency float vs INT8 is measured and reported (``artifact.report``,
   ``bench/export.py``) but does not decide: a wall-clock figure must not make two exports differ.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from edge.audio import FRAME_SAMPLES, SAMPLE_RATE
from edge.boards import BoardProfile
from edge.errors import ModelFileError
from export.artifact import StageArtifact
from export.calibration import SENTENCES, Clip, check_size, noise_clips, speech_set
from export.gates import GateResult, vad_frame_agreement_f1
from export.prebuilt import import_vad
from export.quantize import ListDataReader, op_counts, optimize_offline, quantize_dynamic_int8, quantize_static_qdq
from export.recipes import Recipe
from export.targets import vad_int8_scheme

CALIBRATION_NAME = "espeak-ng-vad-v1"
DEFAULT_MIN_F1 = 0.98


def specialize_16k(src: Path, dst: Path, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write ``dst``: the Silero graph with its top-level ``If`` on ``sr`` replaced by the branch for
    ``sample_rate`` and the branch's ``Constant`` nodes turned into initializers. Inputs and outputs
    are unchanged; the result computes exactly what the original does at that rate."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    ifs = [n for n in graph.node if n.op_type == "If"]
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    equal = [n for n in graph.node if n.op_type == "Equal" and "sr" in n.input]
    if len(ifs) != 1 or len(equal) != 1 or ifs[0].input[0] != equal[0].output[0]:
        raise ModelFileError(f"{src.name} is not the Silero graph this exporter knows (one If on sr == rate)")
    other = [i for i in equal[0].input if i != "sr"][0]
    rate_in_graph = int(numpy_helper.to_array(consts[other].attribute[0].t))
    branches = {a.name: a.g for a in ifs[0].attribute}
    branch = branches["then_branch" if sample_rate == rate_in_graph else "else_branch"]
    nodes, inits = [], []
    for node in branch.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            inits.append(numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t), node.output[0]))
        else:
            nodes.append(node)
    rename = {o.name: final for o, final in zip(branch.output, ifs[0].output)}
    for node in nodes:
        for i, name in enumerate(node.output):
            if name in rename:
                node.output[i] = rename[name]
    keep = [n for n in graph.node if n is not ifs[0] and n is not equal[0] and n.output[0] != other]
    del graph.node[:]
    graph.node.extend(nodes + keep)
    graph.initializer.extend(inits)
    onnx.checker.check_model(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def calibration_feeds(float_model: Path, clips: Sequence[Clip], every: int = 2) -> list[dict[str, np.ndarray]]:
    """Feeds (``input`` with its 64-sample context, ``state``, ``sr``) for every ``every``-th frame of
    ``clips`` as the float model sees them when streaming, so calibration covers real states."""
    from edge.stages.vad import SileroVad

    vad = SileroVad(float_model, threads=1)
    feeds = []
    for clip in clips:
        vad.reset()
        for k, start in enumerate(range(0, len(clip.audio) - FRAME_SAMPLES + 1, FRAME_SAMPLES)):
            frame = clip.audio[start:start + FRAME_SAMPLES]
            if k % every == 0:
                ctx = vad.context_samples
                x = np.concatenate([vad._input[0, -ctx:], frame]).reshape(1, -1).astype(np.float32)
                feeds.append({"input": x, "state": vad._state.copy(), "sr": np.array(SAMPLE_RATE, dtype=np.int64)})
            vad.probability(frame)
    return feeds


def build_int8(float_model: Path, workdir: Path, calibration: Sequence[Clip], scheme: str) -> Path:
    """Make the INT8 candidate of ``scheme`` (``static-qdq-s8s8`` or ``static-qdq-s8s8+dynamic-lstm``)
    from the published ``float_model`` in ``workdir``; returns its path."""
    spec = specialize_16k(float_model, workdir / "silero_vad.16k.onnx")
    folded = optimize_offline(spec, workdir / "silero_vad.16k.opt.onnx", "basic")
    reader = ListDataReader(calibration_feeds(float_model, calibration))
    qdq = quantize_static_qdq(folded, workdir / "silero_vad.qdq.onnx", reader, op_types=["Conv"])
    if scheme.endswith("+dynamic-lstm"):
        return quantize_dynamic_int8(qdq, workdir / "silero_vad.int8.onnx", op_types=["LSTM"])
    final = workdir / "silero_vad.int8.onnx"
    final.write_bytes(qdq.read_bytes())
    return final


def frame_latency_ms(model: Path, audio: np.ndarray, *, repeats: int = 5) -> float:
    """Median over ``repeats`` passes of the mean model time per 512-sample frame (one thread,
    streaming one frame at a time as the runtime does)."""
    from edge.stages.vad import SileroVad

    vad = SileroVad(model, threads=1)
    vad.probabilities(audio[: 20 * FRAME_SAMPLES])  # warm up
    times = []
    for _ in range(repeats):
        vad.reset()
        vad.probabilities(audio)
        times.append(vad.mean_ms)
    return statistics.median(times)


def compare_latency(float_model: Path, candidate: Path, audio: np.ndarray, rounds: int = 3) -> tuple[float, float]:
    """(float ms, candidate ms) per frame, measured interleaved in this process on the same audio."""
    f, c = [], []
    for _ in range(rounds):
        f.append(frame_latency_ms(float_model, audio, repeats=3))
        c.append(frame_latency_ms(candidate, audio, repeats=3))
    return statistics.median(f), statistics.median(c)


def calibration_set() -> list[Clip]:
    """The clips INT8 ranges are calibrated on (seed 1; other voices/sentence order than the gate set)."""
    return speech_set(10, seed=1, sentences=tuple(reversed(SENTENCES)), voices=("en-gb+m3", "en-us+f4", "en-us", "en-us+m7"))


def gate_set() -> list[Clip]:
    """The clips the F1 gate is measured on: 12 spoken sentences (4 voices, 2 speeds, clean/20/10 dB)
    plus 2 clips of background noise alone."""
    return speech_set(12, seed=0) + noise_clips(2)


def export_vad(
    recipe: Recipe,
    cache: Path,
    profile: BoardProfile,
    workdir: Path,
    *,
    quantize: bool,
    calibration: Sequence[Clip] | None = None,
    gate_clips: Sequence[Clip] | None = None,
) -> StageArtifact:
    """The VAD stage for ``profile``. With ``quantize``, INT8 is built, gated and timed, and ships
    only when it passes, is smaller and not slower; otherwise the published float model ships and
    ``quantization['reason']`` says why. ``drift`` holds the measured F1, sizes and latencies.
    A calibration set under the minimum raises ``CalibrationError`` before any work."""
    base = import_vad(recipe, cache)
    float_model = base.files[recipe.file("model").name]
    float_bytes = float_model.stat().st_size
    base.quantization = {"scheme": "none", "float_bytes": float_bytes}
    if not quantize:
        base.quantization["reason"] = "quantization not requested for this target"
        base.drift = {"gate": "n/a"}
        return base
    calibration = list(calibration) if calibration is not None else calibration_set()
    check_size(calibration, stage="vad")
    clips = list(gate_clips) if gate_clips is not None else gate_set()
    check_size(clips, stage="vad")
    scheme = vad_int8_scheme(profile)
    work = Path(workdir) / "vad"
    work.mkdir(parents=True, exist_ok=True)
    candidate = build_int8(float_model, work, calibration, scheme)
    threshold = float(profile.section("vad").get("threshold_on", 0.5))
    min_f1 = float(recipe.gates.get("frame_f1_vs_float", DEFAULT_MIN_F1))
    gate: GateResult = vad_frame_agreement_f1(float_model, candidate, clips, threshold=threshold, min_f1=min_f1)
    timing_audio = np.concatenate([c.audio for c in clips[:6]])
    float_ms, int8_ms = compare_latency(float_model, candidate, timing_audio)
    int8_bytes = candidate.stat().st_size
    ops = op_counts(candidate)
    drift = {
        "frame_f1_vs_float": gate.value,
        "float_bytes": float_bytes,
        "int8_bytes": int8_bytes,
        "gates": [gate.to_dict()],
    }
    # timings go to the export report only: they vary run to run and would break reproducible bundles
    timing = {"float_ms_per_frame": round(float_ms, 4), "int8_ms_per_frame": round(int8_ms, 4),
              "latency_measured_on": "this export machine, CPU provider, 1 thread"}
    calib = {"name": CALIBRATION_NAME, "utterances": len(calibration), "frames": sum(c.frames for c in calibration)}
    reasons = []
    if not gate.passed:
        reasons.append(f"int8 F1 {gate.value:.4f} < {min_f1:g}")
    if int8_bytes >= float_bytes:
        reasons.append(f"int8 not smaller ({int8_bytes} >= {float_bytes} bytes)")
    if reasons:
        base.quantization = {"scheme": "none", "reason": "; ".join(reasons), "tried": scheme,
                             "float_bytes": float_bytes, "calibration": calib}
        base.drift = {**drift, "gate": "n/a", "int8_gate": "passed" if gate.passed else "failed"}
        base.report = timing
        return base
    speed = (f"int8 faster ({float_ms / int8_ms:.2f}x)" if int8_ms < float_ms * 0.95
             else "int8 only smaller (same speed within 5 %)")
    name = candidate.name
    return StageArtifact(
        stage=base.stage, kind=base.kind, runtime=base.runtime, files={name: candidate}, roles={"model": name},
        sample_rate=base.sample_rate, inputs=base.inputs, outputs=base.outputs,
        quantization={
            "scheme": scheme, "weights": "int8 per-channel symmetric",
            "activations": "int8 static (Conv, MinMax calibration)" + (
                "; LSTM weights int8, activations dynamic" if scheme.endswith("dynamic-lstm") else "; LSTM float"),
            "graph": "16 kHz branch only (8 kHz branch dropped)", "float_bytes": float_bytes,
            "calibration": calib, "ops": {k: v for k, v in sorted(ops.items()) if "Quant" in k or k in ("Conv", "LSTM")},
        },
        drift={**drift, "gate": "passed"},
        license=base.license, source=base.source, config=base.config,
        report={**timing, "verdict": speed},
    )
