"""What a target board means for the export: per stage scheme, graph format, runtime and providers.

Read from the board profile (``hw/boards/*.toml``): ``[quantization]`` names the scheme per stage,
``[runtime]`` the providers (and ``[runtime.tensorrt]`` the TensorRT provider options on Jetson)
and the TFLite runtime. A Jetson bundle is built and validated here on the CPU provider (QDQ
graphs run there); the TensorRT options go into the manifest for the device.
``describe_target_differences`` gives the "what differs per target" table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from edge.boards import BoardProfile, load_board

STAGES = ("vad", "asr", "llm", "tts", "wake")

#: what each scheme looks like as a graph
GRAPH_FORMATS = {
    "none": "onnx fp32",
    "prebuilt": "as published (int8 .onnx / .ort)",
    "dynamic-int8": "onnx QOperator (int8 weights, activations quantized at run time)",
    "static-qdq-s8s8": "onnx QDQ (int8 weights + int8 calibrated activations)",
    "nncf-int8": "onnx QDQ (NNCF int8)",
    "fp16": "onnx fp16",
    "tflite-int8": "tflite int8 (as published)",
}


@dataclass(frozen=True)
class StagePlan:
    """How one stage is exported and run for a target."""

    stage: str
    scheme: str
    graph_format: str
    runtime: str  # onnxruntime | tflite
    providers: tuple[str, ...]
    provider_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    keep_float: tuple[str, ...] = ()
    note: str = ""


def _profile(target: str | BoardProfile) -> BoardProfile:
    return target if isinstance(target, BoardProfile) else load_board(target)


def uses_tensorrt(target: str | BoardProfile) -> bool:
    """True when the profile's provider list starts with (or holds) TensorRT."""
    return "TensorrtExecutionProvider" in _profile(target).providers


def tensorrt_options(target: str | BoardProfile) -> dict[str, Any]:
    """The TensorRT provider options of ``[runtime.tensorrt]`` (empty for boards without TensorRT)."""
    profile = _profile(target)
    if not uses_tensorrt(profile):
        return {}
    return dict(profile.section("runtime").get("tensorrt", {}))


def provider_options(target: str | BoardProfile) -> dict[str, dict[str, Any]]:
    """Per-provider options the manifest carries for the device (only TensorRT has any today)."""
    trt = tensorrt_options(target)
    return {"TensorrtExecutionProvider": trt} if trt else {}


def tflite_runtime(target: str | BoardProfile) -> str:
    """The TFLite interpreter package the board uses (``ai-edge-litert`` or ``tflite-runtime``)."""
    return str(_profile(target).section("runtime").get("tflite", "ai-edge-litert"))


def vad_int8_scheme(target: str | BoardProfile) -> str:
    """The INT8 variant tried for Silero VAD: static QDQ on the convolutions everywhere; the LSTM
    gets dynamic int8 weights (``DynamicQuantizeLSTM``, a CPU contrib op) only on CPU-only boards,
    since TensorRT cannot take that op and would split the graph."""
    return "static-qdq-s8s8" if uses_tensorrt(target) else "static-qdq-s8s8+dynamic-lstm"


def stage_plan(target: str | BoardProfile, stage: str) -> StagePlan:
    """The plan for ``stage`` on ``target``: scheme from ``[quantization]``, graph format, runtime,
    providers and provider options."""
    profile = _profile(target)
    quant = profile.section("quantization")
    providers = tuple(profile.providers)
    if stage == "wake":
        return StagePlan("wake", "tflite-int8", GRAPH_FORMATS["tflite-int8"], "tflite", (),
                         note=f"runs on {tflite_runtime(profile)} (or whichever TFLite interpreter imports)")
    scheme = str(quant.get(stage, "none"))
    note = ""
    keep = ()
    if stage == "llm":
        keep = tuple(quant.get("llm_keep_float", ()))
    if stage == "vad":
        note = f"int8 tried as {vad_int8_scheme(profile)}; shipped only if it passes its gate"
    if uses_tensorrt(profile):
        note = (note + "; " if note else "") + "validated here on the CPU provider, TensorRT builds engines on the device"
    return StagePlan(stage, scheme, GRAPH_FORMATS.get(scheme, scheme), "onnxruntime", providers,
                     provider_options(profile), keep, note)


def target_plans(target: str | BoardProfile) -> dict[str, StagePlan]:
    """Every stage's plan for ``target``."""
    return {s: stage_plan(target, s) for s in STAGES}


def _settings(profile: BoardProfile) -> dict[str, str]:
    cpu = profile.section("cpu")
    runtime = profile.section("runtime")
    out = {
        "cpu": f"{cpu.get('arch', '?')} x{cpu.get('cores', '?')} ({', '.join(cpu.get('isa', []))})",
        "providers": " > ".join(p.replace("ExecutionProvider", "") for p in profile.providers),
        "threads": str(profile.threads),
        "tflite runtime": str(runtime.get("tflite", "-")),
    }
    for stage, plan in target_plans(profile).items():
        label = plan.scheme + (f" (float: {', '.join(plan.keep_float)})" if plan.keep_float else "")
        if stage == "vad":
            label += f", tries {vad_int8_scheme(profile)}"
        out[f"{stage} scheme"] = label
        out[f"{stage} graph"] = plan.graph_format
    trt = tensorrt_options(profile)
    out["tensorrt options"] = ", ".join(f"{k}={v}" for k, v in sorted(trt.items())) if trt else "-"
    return out


def describe_target_differences(targets: Sequence[str | BoardProfile]) -> list[list[str]]:
    """Table rows (header first: ``setting`` then one column per target) holding only the settings
    whose value is not the same on every target."""
    profiles = [_profile(t) for t in targets]
    settings = [_settings(p) for p in profiles]
    rows = [["setting"] + [p.name for p in profiles]]
    for key in settings[0] if settings else []:
        values = [s.get(key, "-") for s in settings]
        if len(set(values)) > 1:
            rows.append([key] + values)
    return rows
