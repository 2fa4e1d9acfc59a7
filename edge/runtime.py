"""Load a verified bundle into running stages, and the health check a new slot must pass.

The stage implementation is chosen by the manifest (``stage -> kind``) through a registry of
factories, so a new model family is one entry here plus its module; the loop never changes.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge.audio import SAMPLE_RATE, resample
from edge.boards import BoardProfile
from edge.bundle import Manifest, StageSpec, read_manifest
from edge.errors import BundleError, SottovoceError
from edge.stages.base import ChatMessage, GenerationStats, Stages

log = logging.getLogger("sottovoce.runtime")

#: (stage, kind) -> "module:factory"; factory(spec, root, providers, threads) -> stage object
FACTORIES: dict[tuple[str, str], str] = {
    ("vad", "silero-vad"): "edge.stages.vad:load_vad",
    ("asr", "moonshine"): "edge.stages.moonshine:load_asr",
    ("asr", "whisper"): "edge.stages.whisper:load_asr",
    ("llm", "onnx-causal-lm"): "edge.stages.llm_onnx:load_llm",
    ("tts", "kokoro"): "edge.stages.kokoro:load_tts",
    ("tts", "espeak-ng"): "edge.stages.espeak_tts:load_tts",
}


class HealthCheckError(SottovoceError):
    code = "slot.health"


def _factory(stage: str, kind: str) -> Callable[..., Any]:
    target = FACTORIES.get((stage, kind))
    if target is None:
        known = ", ".join(k for s, k in FACTORIES if s == stage)
        raise BundleError(f"this runtime cannot run {stage} model kind {kind!r} (it knows: {known})")
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def load_stage(name: str, spec: StageSpec, root: Path, profile: BoardProfile | None) -> Any:
    """Build one stage object from its manifest entry."""
    providers = profile.providers if profile else ["CPUExecutionProvider"]
    threads = profile.threads if profile else None
    return _factory(name, spec.kind)(spec, Path(root), providers, threads)


@dataclass
class LoadedBundle:
    root: Path
    manifest: Manifest
    profile: BoardProfile
    stages: Stages
    load_s: float


def load_stages(bundle_dir: Path, profile: BoardProfile | None = None) -> LoadedBundle:
    """Load every stage of an (already verified) unpacked bundle on this board.

    ``profile`` defaults to the one the bundle was exported for (stored in its manifest).
    """
    root = Path(bundle_dir)
    manifest = read_manifest(root)
    profile = profile or BoardProfile.from_manifest(manifest.target)
    t0 = time.perf_counter()
    objs = {name: load_stage(name, manifest.stages[name], root, profile) for name in ("vad", "asr", "llm", "tts")}
    stages = Stages(
        vad=objs["vad"], asr=objs["asr"], llm=objs["llm"], tts=objs["tts"],
        info={name: manifest.stages[name].kind for name in objs},
    )
    return LoadedBundle(root, manifest, profile, stages, time.perf_counter() - t0)


HEALTH_PROMPT = "What is two plus two?"


def health_check(bundle_dir: Path, profile: BoardProfile | None = None) -> dict[str, Any]:
    """Prove a bundle works on this board: all models load and one synthetic turn passes.

    The turn: TTS speaks a question, ASR must hear words in it, the LLM must produce tokens, the
    VAD must see speech in the spoken question. Raises ``HealthCheckError`` with the failing stage.
    Returns timings for the log.
    """
    try:
        loaded = load_stages(bundle_dir, profile)
    except SottovoceError as exc:
        raise HealthCheckError(f"health check failed: models do not load: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any load failure fails the slot
        raise HealthCheckError(f"health check failed: models do not load: {type(exc).__name__}: {exc}") from exc
    st = loaded.stages
    try:
        speech = st.tts.synthesize(HEALTH_PROMPT)
        if len(speech) == 0 or float(np.max(np.abs(speech))) < 1e-3:
            raise HealthCheckError("health check failed: TTS produced silence")
        audio16 = resample(speech, st.tts.sample_rate, SAMPLE_RATE)
        st.vad.reset()
        n = st.vad.frame_samples
        probs = [st.vad.probability((np.clip(audio16[i:i + n], -1, 1) * 32767).astype(np.int16))
                 for i in range(0, len(audio16) - n + 1, n)]
        if not probs or max(probs) < 0.5:
            raise HealthCheckError("health check failed: VAD found no speech in synthesized speech")
        text = st.asr.transcribe(audio16)
        if not text.strip():
            raise HealthCheckError("health check failed: ASR heard nothing in synthesized speech")
        stats = GenerationStats()
        reply = "".join(st.llm.stream([ChatMessage("user", text)], max_new_tokens=8, stats=stats))
        if stats.new_tokens == 0:
            raise HealthCheckError("health check failed: LLM produced no tokens")
    except HealthCheckError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise HealthCheckError(f"health check failed while running: {type(exc).__name__}: {exc}") from exc
    return {"load_s": loaded.load_s, "heard": text, "reply": reply}
