"""Wake word (microWakeWord, TFLite int8) on the board.

The model is a streaming int8 TFLite graph: each call takes ``stride`` (3) feature vectors of 40
channels from the TFLite Micro audio frontend (30 ms windows every 10 ms, computed by
``pymicro_features``) and returns P(wake word) for that step; its internal state lives in the
interpreter's variable tensors. A detection is the mean of the last ``sliding_window_size``
probabilities above ``probability_cutoff`` (both from the model's JSON).

The interpreter is ``ai_edge_litert.interpreter.Interpreter`` or
``tflite_runtime.interpreter.Interpreter``, whichever imports first (``interpreter_class``).
Neither is needed unless a bundle has a ``wake`` stage: install the ``wake`` extra.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge.audio import SAMPLE_RATE
from edge.bundle import StageSpec
from edge.errors import AudioInputError, ConfigError, ModelFileError

FEATURE_STEP_SAMPLES = 160  # 10 ms at 16 kHz
FEATURE_CHANNELS = 40


def interpreter_class() -> tuple[type, str]:
    """The TFLite ``Interpreter`` class and its package name: LiteRT first, then tflite-runtime.
    Raises ``ConfigError`` naming the extra to install when neither imports."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]

        return Interpreter, "tflite-runtime"
    except ImportError:
        raise ConfigError(
            "the wake word stage needs a TFLite interpreter: pip install 'sottovoce[wake]' "
            "(ai-edge-litert) or tflite-runtime"
        ) from None


@dataclass(frozen=True)
class WakeWordConfig:
    """What the model's JSON says: the phrase, the cutoff and the smoothing window."""

    wake_word: str
    probability_cutoff: float
    sliding_window_size: int
    feature_step_ms: int = 10

    @classmethod
    def from_json(cls, path: Path | str) -> "WakeWordConfig":
        """Read a microWakeWord JSON (``type: micro``); a missing field raises ``ModelFileError``."""
        try:
            data = json.loads(Path(path).read_text("utf-8"))
            micro = data["micro"]
            return cls(str(data["wake_word"]), float(micro["probability_cutoff"]),
                       int(micro["sliding_window_size"]), int(micro.get("feature_step_size", 10)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFileError(f"wake word config {Path(path).name} is unreadable or incomplete: {exc}") from exc


class MicroFeatures:
    """Streaming 40-channel micro-frontend features: feed int16 PCM, get one vector per 10 ms."""

    def __init__(self) -> None:
        try:
            from pymicro_features import MicroFrontend
        except ImportError:
            raise ConfigError("the wake word stage needs pymicro-features: pip install 'sottovoce[wake]'") from None
        self._frontend_cls = MicroFrontend
        self._frontend = MicroFrontend()
        self._pending = b""

    def reset(self) -> None:
        self._frontend = self._frontend_cls()
        self._pending = b""

    def process(self, pcm: np.ndarray) -> list[np.ndarray]:
        """Feature vectors (float32, 40) for the audio completed by ``pcm`` (int16 mono 16 kHz)."""
        self._pending += np.ascontiguousarray(pcm, dtype="<i2").tobytes()
        out = []
        step = FEATURE_STEP_SAMPLES * 2
        pos = 0
        while pos + step <= len(self._pending):
            result = self._frontend.process_samples(self._pending[pos:pos + step])
            pos += result.samples_read * 2
            if result.features:
                out.append(np.asarray(result.features, dtype=np.float32))
        self._pending = self._pending[pos:]
        return out


class WakeWordDetector:
    """Streaming wake word detector on a microWakeWord ``.tflite`` and its JSON config.

    ``process(frame_int16)`` takes any number of 16 kHz int16 samples (the loop's 512-sample frames)
    and returns True when the smoothed probability passes ``probability_cutoff`` on any step that
    frame completes. ``last_probability`` is the latest smoothed value, ``max_probability`` the
    highest since ``reset``.
    """

    def __init__(self, model_path: Path | str, config: WakeWordConfig, *, threads: int | None = 1) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise ModelFileError(f"wake word model {path} is missing")
        interpreter_cls, self.runtime = interpreter_class()
        self.config = config
        self._model_path = str(path)
        self._threads = threads
        try:
            self._interp = interpreter_cls(model_path=self._model_path, num_threads=threads)
            self._interp.allocate_tensors()
        except Exception as exc:  # the interpreters raise ValueError/RuntimeError
            raise ModelFileError(f"cannot load wake word model {path.name}: {str(exc).splitlines()[0]}") from exc
        inp = self._interp.get_input_details()[0]
        out = self._interp.get_output_details()[0]
        self._in_index, self._out_index = inp["index"], out["index"]
        self._in_dtype, self._out_dtype = inp["dtype"], out["dtype"]
        self._in_scale, self._in_zero = inp["quantization"]
        self._out_scale, self._out_zero = out["quantization"]
        self.stride = int(inp["shape"][1])
        if int(inp["shape"][2]) != FEATURE_CHANNELS:
            raise ModelFileError(f"{path.name} expects {inp['shape'][2]} feature channels, not {FEATURE_CHANNELS}")
        self.features = MicroFeatures()
        self._window: deque[float] = deque(maxlen=config.sliding_window_size)
        self._pending: list[np.ndarray] = []
        self.last_probability = 0.0
        self.max_probability = 0.0

    @property
    def wake_word(self) -> str:
        return self.config.wake_word

    def reset(self) -> None:
        """Forget the audio, features, smoothing window and the model's streaming state."""
        self.features.reset()
        self._pending.clear()
        self._window.clear()
        self.last_probability = 0.0
        self.max_probability = 0.0
        if hasattr(self._interp, "reset_all_variables"):
            self._interp.reset_all_variables()
        else:
            interpreter_cls, _ = interpreter_class()
            self._interp = interpreter_cls(model_path=self._model_path, num_threads=self._threads)
            self._interp.allocate_tensors()

    def _step(self, block: np.ndarray) -> float:
        scale = self._in_scale or 1.0
        q = np.round(block / scale + self._in_zero)
        info = np.iinfo(self._in_dtype) if np.issubdtype(self._in_dtype, np.integer) else None
        if info is not None:
            q = np.clip(q, info.min, info.max)
        self._interp.set_tensor(self._in_index, q.astype(self._in_dtype)[None, :, :])
        self._interp.invoke()
        raw = self._interp.get_tensor(self._out_index).astype(np.float32).reshape(-1)[0]
        return float((raw - self._out_zero) * self._out_scale) if self._out_scale else float(raw)

    def probabilities(self, pcm: np.ndarray) -> list[float]:
        """Smoothed probabilities for each model step the samples in ``pcm`` complete (0.0 until the
        sliding window is full)."""
        samples = np.asarray(pcm).reshape(-1)
        if np.issubdtype(samples.dtype, np.floating):
            raise AudioInputError("the wake word detector takes int16 PCM (the loop's frame format)")
        out = []
        for vec in self.features.process(samples):
            self._pending.append(vec)
            if len(self._pending) < self.stride:
                continue
            block = np.stack(self._pending[: self.stride])
            self._pending = self._pending[self.stride:]
            self._window.append(self._step(block))
            smoothed = float(np.mean(self._window)) if len(self._window) == self._window.maxlen else 0.0
            self.last_probability = smoothed
            self.max_probability = max(self.max_probability, smoothed)
            out.append(smoothed)
        return out

    def process(self, frame_int16: np.ndarray) -> bool:
        """True when the wake word is heard in the steps this frame completes."""
        return any(p > self.config.probability_cutoff for p in self.probabilities(frame_int16))


def load_wakeword(spec: StageSpec, root: Path, providers: Sequence[str] = (), threads: int | None = 1) -> WakeWordDetector:
    """Build a ``WakeWordDetector`` from a bundle stage of kind ``microwakeword`` (files by role
    ``model`` and ``config``, relative to ``root``). ``providers`` is ignored (TFLite runs on CPU)."""
    root = Path(root)
    config = WakeWordConfig.from_json(root / spec.file("config").path)
    return WakeWordDetector(root / spec.file("model").path, config, threads=threads)


def describe(detector: WakeWordDetector) -> dict[str, Any]:
    """What the detector runs on, for health checks and logs."""
    return {"wake_word": detector.wake_word, "runtime": detector.runtime, "stride": detector.stride,
            "cutoff": detector.config.probability_cutoff, "window": detector.config.sliding_window_size,
            "sample_rate": SAMPLE_RATE}
