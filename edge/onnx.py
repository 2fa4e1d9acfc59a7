"""onnxruntime sessions made the same way everywhere: providers and threads from the board profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from edge.errors import ModelFileError


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def make_session(
    model_path: Path | str,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int | None = None,
    provider_options: dict[str, dict[str, Any]] | None = None,
):
    """Open an ``onnxruntime.InferenceSession`` on the first usable providers of ``providers``.

    Providers this onnxruntime build lacks are skipped (the CPU provider is always last resort);
    ``threads`` caps intra-op threads (``None`` lets onnxruntime decide). A missing or unreadable
    model raises ``ModelFileError`` with the path.
    """
    import onnxruntime as ort

    path = Path(model_path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} is missing")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    # Stages run concurrently (LLM decoding while TTS speaks the previous clause): spinning worker threads would
    # burn the cores the other stage needs, so idle threads sleep instead of spinning.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    have = set(ort.get_available_providers())
    chosen = [p for p in providers if p in have] or ["CPUExecutionProvider"]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    options = [(provider_options or {}).get(p, {}) for p in chosen]
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=chosen, provider_options=options)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelFileError(f"cannot load model {path.name}: {str(exc).splitlines()[0]}") from exc
