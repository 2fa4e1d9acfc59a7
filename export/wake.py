"""The optional ``wake`` stage: microWakeWord ``okay_nabu`` (TFLite int8) imported and validated.

The model ships as published (it is int8 already). Validation runs it through the edge runtime's
own ``WakeWordDetector`` on espeak-ng speech: the wake phrase in several voices and speeds must
trigger it (detection rate gate), ordinary sentences and noise must not (false accepts gate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from edge.audio import SAMPLE_RATE, float_to_int16
from edge.boards import BoardProfile
from export.artifact import StageArtifact
from export.calibration import SENTENCES, espeak, noise_clips
from export.fetch import model_dir, verify_cached
from export.gates import GateResult
from export.recipes import Recipe
from export.targets import tflite_runtime

#: (voice, words per minute) the wake phrase is spoken in for validation.
WAKE_RENDITIONS = (("en-us", 130), ("en-us", 160), ("en-gb+m3", 160), ("en-us+m7", 160), ("en", 130),
                   ("en-us+f3", 160))
DEFAULT_MIN_DETECTION = 0.8
DEFAULT_MAX_FALSE_ACCEPTS = 0


def detector_for(model: Path, config: Path):
    """The edge runtime's detector on ``model`` + ``config``."""
    from edge.stages.wakeword import WakeWordConfig, WakeWordDetector

    return WakeWordDetector(model, WakeWordConfig.from_json(config))


def heard(detector, audio: np.ndarray) -> tuple[bool, float]:
    """Feed ``audio`` (float32 16 kHz) in 512-sample frames after a reset: (triggered, max smoothed P)."""
    detector.reset()
    pcm = float_to_int16(np.concatenate([audio, np.zeros(SAMPLE_RATE // 2, np.float32)]))
    hit = False
    for i in range(0, len(pcm), 512):
        hit = detector.process(pcm[i:i + 512]) or hit
    return hit, detector.max_probability


def validate_wake(detector, phrase: str, *, renditions: Sequence[tuple[str, int]] = WAKE_RENDITIONS,
                  negatives: Sequence[str] = SENTENCES[:6], min_detection: float = DEFAULT_MIN_DETECTION,
                  max_false_accepts: int = DEFAULT_MAX_FALSE_ACCEPTS) -> list[GateResult]:
    """Two gates: the share of ``renditions`` of ``phrase`` that trigger (``>= min_detection``) and
    the number of ``negatives`` sentences plus noise clips that trigger (``<= max_false_accepts``)."""
    pad = np.zeros(SAMPLE_RATE // 2, np.float32)
    pos = [heard(detector, np.concatenate([pad, espeak(phrase, v, s), pad])) for v, s in renditions]
    neg_audio = [np.concatenate([pad, espeak(t, "en-us", 160), pad]) for t in negatives]
    neg_audio += [c.audio for c in noise_clips(2)]
    neg = [heard(detector, a) for a in neg_audio]
    rate = sum(h for h, _ in pos) / len(pos)
    false = sum(h for h, _ in neg)
    return [
        GateResult.judge("wake", "detection_rate", rate, min_detection, ">=",
                         {"renditions": [f"{v}@{s}" for v, s in renditions],
                          "max_probability": [round(p, 3) for _, p in pos]}),
        GateResult.judge("wake", "false_accepts", false, max_false_accepts, "<=",
                         {"negatives": len(neg), "max_probability": [round(p, 3) for _, p in neg]}),
    ]


def export_wake(recipe: Recipe, cache: Path, profile: BoardProfile, workdir: Path | None = None) -> StageArtifact:
    """The ``wake`` stage: the recipe's ``.tflite`` + ``.json`` checked (sha256), loaded by the edge
    detector, validated on espeak-ng speech; ``drift`` holds both gates, ``gate`` is ``passed`` or
    ``failed`` (the builder decides what a failure means for an optional stage)."""
    verify_cached(recipe, cache)
    root = model_dir(recipe, cache)
    model, config = root / recipe.file("model").name, root / recipe.file("config").name
    detector = detector_for(model, config)
    results = validate_wake(detector, detector.wake_word,
                            min_detection=float(recipe.gates.get("detection_rate", DEFAULT_MIN_DETECTION)),
                            max_false_accepts=int(recipe.gates.get("false_accepts", DEFAULT_MAX_FALSE_ACCEPTS)))
    return StageArtifact(
        stage="wake", kind=recipe.kind, runtime="tflite",
        files={model.name: model, config.name: config}, roles={"model": model.name, "config": config.name},
        sample_rate=SAMPLE_RATE,
        inputs=[{"name": "features", "dtype": "int8", "shape": [1, detector.stride, 40],
                 "note": "40-channel micro-frontend features, 10 ms step, 30 ms window"}],
        outputs=[{"name": "probability", "dtype": "uint8", "shape": [1, 1]}],
        quantization={"scheme": "prebuilt-int8", "note": "TFLite int8 as published", "float_bytes": None},
        drift={"detection_rate": results[0].value, "false_accepts": results[1].value,
               "gates": [r.to_dict() for r in results],
               "gate": "passed" if all(r.passed for r in results) else "failed",
               "validated_with": detector.runtime},
        license=recipe.license, source=recipe.source,
        config={"wake_word": detector.wake_word, "probability_cutoff": detector.config.probability_cutoff,
                "sliding_window_size": detector.config.sliding_window_size, "stride": detector.stride,
                "tflite_runtime": tflite_runtime(profile), "features": "pymicro-features"},
    )
