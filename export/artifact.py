"""What a per-stage exporter hands to the bundle builder.

Each stage exporter (``export.llm``, ``export.whisper``, the importers of prebuilt models)
returns a ``StageArtifact``: the files to ship (bundle-relative name -> local path), their roles,
I/O description, quantization and measured drift. ``export.builder`` copies, hashes and turns it
into the manifest's ``StageSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageArtifact:
    stage: str  # vad | asr | llm | tts | wake
    kind: str  # implementation the runtime must use (silero-vad, moonshine, onnx-causal-lm, kokoro, whisper, ...)
    runtime: str  # onnxruntime | tflite | espeak-ng
    files: dict[str, Path]  # name inside the stage directory -> local file to copy
    roles: dict[str, str] = field(default_factory=dict)  # role (model, encoder, tokenizer, ...) -> name in `files`
    sample_rate: int | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    quantization: dict[str, Any] = field(default_factory=lambda: {"scheme": "none"})
    drift: dict[str, Any] = field(default_factory=dict)
    license: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # kind-specific runtime settings (JSON-ready)
    #: wall-clock measurements (latency, speed verdicts) for the export report and benchmarks; never written to
    #: the manifest, so that the same inputs always give the same bundle bytes
    report: dict[str, Any] = field(default_factory=dict)
