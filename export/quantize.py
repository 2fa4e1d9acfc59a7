"""Generic onnxruntime quantization helpers used by the stage exporters.

- ``quantize_dynamic_int8``: int8 weights (per-channel by default) on chosen op types, with nodes
  to leave in float; activations are quantized at run time (QOperator ``MatMulInteger``/``ConvInteger``).
- ``quantize_static_qdq``: static QDQ S8S8 (symmetric int8 weights and activations) with a
  calibration data reader: the format TensorRT and the onnxruntime CPU provider both accept.
- ``convert_fp16``: weights and activations in float16, inputs/outputs kept float32.
- ``optimize_offline``: onnxruntime's own graph optimizer run once, ahead of time, saving the
  result (``SessionOptions.optimized_model_filepath``) at a portable level (basic or extended).
- ``ListDataReader``: a calibration data reader over a list of feed dicts.

Every helper writes a new file and returns its path; inputs are never modified.
Note: onnxruntime leaves recurrent ops (GRU/LSTM) in float unless ``LSTM`` is named explicitly for
dynamic quantization, and static QDQ never quantizes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from edge.errors import ModelFileError

#: optimization levels that only rewrite with standard ONNX ops (basic) or onnxruntime contrib ops
#: available on every CPU provider build (extended); "all" adds layout transforms tied to this CPU.
PORTABLE_LEVELS = ("basic", "extended")


class ListDataReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a list of feed dicts (name -> array)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self.feeds = list(feeds)
        self._it = iter(self.feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)


def quantization_failed(what: str, path: Path, exc: Exception) -> ModelFileError:
    """The one-line error for a quantization step ``what`` on ``path`` that raised ``exc``."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelFileError(f"{what} of {path.name} failed: {first}")


def quantize_dynamic_int8(
    src: Path,
    dst: Path,
    *,
    op_types: Iterable[str] = ("MatMul", "Gemm"),
    exclude_nodes: Iterable[str] = (),
    per_channel: bool = True,
) -> Path:
    """Dynamic int8 (signed weights, per-channel unless told otherwise) on ``op_types``, leaving the
    nodes named in ``exclude_nodes`` in float. Writes ``dst`` and returns it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        quantize_dynamic(
            str(src), str(dst), op_types_to_quantize=list(op_types), per_channel=per_channel,
            weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude_nodes),
            extra_options={"EnableSubgraph": True},
        )
    except Exception as exc:  # onnxruntime raises plain Exceptions / RuntimeErrors
        raise quantization_failed("dynamic int8 quantization", src, exc) from exc
    return dst


def quantize_static_qdq(
    src: Path,
    dst: Path,
    reader: ListDataReader,
    *,
    op_types: Iterable[str] | None = None,
    exclude_nodes: Iterable[str] = (),
    per_channel: bool = True,
) -> Path:
    """Static QDQ S8S8 (int8 weights per-channel, int8 symmetric-range activations calibrated with
    MinMax on ``reader``) on ``op_types`` (None: every op onnxruntime can quantize), except
    ``exclude_nodes``. Writes ``dst`` and returns it."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    dst.parent.mkdir(parents=True, exist_ok=True)
    reader.rewind()
    try:
        quantize_static(
            str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types) if op_types is not None else None,
            per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude_nodes), calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    except Exception as exc:
        raise quantization_failed("static QDQ quantization", src, exc) from exc
    return dst


def convert_fp16(src: Path, dst: Path, *, keep_io_types: bool = True, op_block_list: Iterable[str] = ()) -> Path:
    """float16 weights and compute (inputs/outputs stay float32 when ``keep_io_types``); ops in
    ``op_block_list`` stay float32. Writes ``dst`` and returns it."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        model = onnx.load(str(src))
        half = convert_float_to_float16(model, keep_io_types=keep_io_types, op_block_list=list(op_block_list) or None)
        onnx.save(half, str(dst))
    except Exception as exc:
        raise quantization_failed("fp16 conversion", src, exc) from exc
    return dst


def optimize_offline(src: Path, dst: Path, level: str = "basic") -> Path:
    """Run onnxruntime's graph optimizer once at ``level`` (``basic`` or ``extended``, the portable
    ones) on the CPU provider and save the optimized graph to ``dst``; returns ``dst``."""
    import onnxruntime as ort

    if level not in PORTABLE_LEVELS:
        raise ValueError(f"optimization level {level!r} is not portable; use one of {PORTABLE_LEVELS}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    opts.optimized_model_filepath = str(dst)
    try:
        ort.InferenceSession(str(src), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise quantization_failed(f"{level} graph optimization", src, exc) from exc
    if not dst.is_file():
        raise ModelFileError(f"onnxruntime wrote no optimized graph for {src.name}")
    return dst


def op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each op type ``path`` holds, subgraphs (If/Loop bodies) included."""
    import onnx

    counts: dict[str, int] = {}

    def walk(graph) -> None:
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(onnx.load(str(path), load_external_data=False).graph)
    return counts
