"""Silero VAD v6 (ONNX, 16 kHz): speech probability per 512-sample frame.

The model takes the previous 64 samples followed by the 512 new ones (``input`` [1, 576]
float32), its recurrent ``state`` [2, 1, 128] and the sample rate ``sr`` (int64 scalar); it
returns ``output`` [1, 1] (P(speech)) and ``stateN``. Both the 64-sample context and the state
carry over from frame to frame; without the context the model hears almost nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from edge.audio import FRAME_SAMPLES, SAMPLE_RATE
from edge.bundle import StageSpec
from edge.errors import AudioInputError
from edge.onnx import make_session

CONTEXT_SAMPLES = 64
STATE_SHAPE = (2, 1, 128)


class SileroVad:
    """``VoiceActivityDetector`` on the Silero v6 ONNX model; one stream per instance.

    ``probability`` keeps the context and the recurrent state between calls; ``reset`` clears
    both. ``last_ms`` is the model time of the latest frame, ``mean_ms`` the average since the
    last ``reset``.
    """

    frame_samples: int = FRAME_SAMPLES

    def __init__(
        self,
        model_path: Path | str,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = 1,
        frame_samples: int = FRAME_SAMPLES,
        context_samples: int = CONTEXT_SAMPLES,
    ) -> None:
        self.session = make_session(model_path, providers=providers, threads=threads)
        self.frame_samples = int(frame_samples)
        self.context_samples = int(context_samples)
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self._input = np.zeros((1, self.context_samples + self.frame_samples), dtype=np.float32)
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self.last_ms = 0.0
        self._total_ms = 0.0
        self.frames = 0

    def reset(self) -> None:
        """Forget the context and the recurrent state (start of a new stream); clears the timings."""
        self._input[:] = 0.0
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self.last_ms = 0.0
        self._total_ms = 0.0
        self.frames = 0

    @property
    def mean_ms(self) -> float:
        """Average model time per frame since the last ``reset`` (0.0 before the first frame)."""
        return self._total_ms / self.frames if self.frames else 0.0

    def probability(self, frame: np.ndarray) -> float:
        """Return P(speech) in [0, 1] for one frame of ``frame_samples`` samples.

        ``frame`` is int16 PCM (the loop's format) or float in [-1, 1]; a frame of another
        length raises ``AudioInputError``.
        """
        samples = np.asarray(frame).reshape(-1)
        if samples.shape[0] != self.frame_samples:
            raise AudioInputError(
                f"VAD frame has {samples.shape[0]} samples; Silero at 16 kHz needs exactly {self.frame_samples}"
            )
        if np.issubdtype(samples.dtype, np.integer):
            new = samples.astype(np.float32) / 32768.0
        else:
            new = samples.astype(np.float32, copy=False)
        ctx = self.context_samples
        self._input[0, :ctx] = self._input[0, -ctx:] if ctx else 0.0
        self._input[0, ctx:] = new
        t0 = time.perf_counter()
        out, state = self.session.run(None, {"input": self._input, "state": self._state, "sr": self._sr})
        self.last_ms = (time.perf_counter() - t0) * 1000.0
        self._total_ms += self.last_ms
        self.frames += 1
        self._state = state
        return float(out.reshape(-1)[0])

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """P(speech) for each whole frame of ``audio`` in order (a trailing partial frame is dropped);
        continues from the current state."""
        n = self.frame_samples
        return np.array([self.probability(audio[i:i + n]) for i in range(0, len(audio) - n + 1, n)],
                        dtype=np.float32)


def load_vad(spec: StageSpec, root: Path, providers: Sequence[str], threads: int | None) -> SileroVad:
    """Build a ``SileroVad`` from a bundle stage of kind ``silero-vad`` (file role ``model`` relative to
    ``root``; ``frame_samples``/``context_samples`` from its config when present). The VAD runs one
    small frame at a time, which one intra-op thread does fastest (0.12 ms vs 0.26 ms with two
    here), so the profile's ``threads`` (meant for the big models) is not applied to it."""
    cfg = spec.config
    return SileroVad(
        Path(root) / spec.file("model").path,
        providers=providers,
        threads=1,
        frame_samples=int(cfg.get("frame_samples", FRAME_SAMPLES)),
        context_samples=int(cfg.get("context_samples", CONTEXT_SAMPLES)),
    )
