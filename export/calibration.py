"""Calibration and gate data made offline: espeak-ng voices, speeds, silence and noise.

Nothing is downloaded. Every clip is float32 mono 16 kHz. The same seed gives the same clips.
A set smaller than its stage's minimum is refused (``CalibrationError``): calibrating or judging a
quantized model on a handful of frames gives ranges and scores that do not hold on real input.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edge.audio import FRAME_SAMPLES, SAMPLE_RATE, resample
from edge.errors import SottovoceError

#: espeak-ng voices the sets are spoken in (male, female, British, variants).
VOICES = ("en-us", "en-us+f3", "en-gb+m3", "en-us+m7", "en-us+f4", "en-gb")
#: sentences spoken for VAD/TTS calibration; the ASR gate uses the eval set instead.
SENTENCES = (
    "What is the capital of France?",
    "Set a timer for ten minutes.",
    "Turn off the lights in the kitchen, please.",
    "How is the weather going to be tomorrow morning?",
    "Remind me to call my sister at six.",
    "Play some quiet music.",
    "How many days are there until the weekend?",
    "Tell me a short story about a brave little fox.",
    "What time is it?",
    "Add milk and eggs to the shopping list.",
    "Stop.",
    "Thank you, that was helpful.",
)
#: the smallest set a calibration or gate accepts.
MIN_UTTERANCES = 8
MIN_FRAMES = 200


class CalibrationError(SottovoceError):
    """A calibration/gate set is too small or unusable (stable code ``export.calibration``)."""

    code = "export.calibration"


@dataclass(frozen=True)
class Clip:
    """One utterance of a set: ``audio`` float32 16 kHz, ``text`` what is said ('' for noise only)."""

    name: str
    audio: np.ndarray
    text: str = ""

    @property
    def frames(self) -> int:
        return len(self.audio) // FRAME_SAMPLES


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak(text: str, voice: str = "en-us", speed: int = 150) -> np.ndarray:
    """``text`` spoken by espeak-ng in ``voice`` at ``speed`` words/min: float32 mono 16 kHz."""
    import soundfile as sf

    if not have_espeak():
        raise CalibrationError("espeak-ng is not installed (apt-get install espeak-ng); it makes the calibration speech")
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
                         check=True, capture_output=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    return resample(audio, rate, SAMPLE_RATE).astype(np.float32)


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White noise at ``snr_db`` below the RMS of the sounding part of ``audio`` (samples over -80 dBFS)."""
    active = audio[np.abs(audio) > 1e-4]
    rms = float(np.sqrt(np.mean(active**2))) if active.size else 0.01
    noise = rng.standard_normal(len(audio)).astype(np.float32) * rms / (10 ** (snr_db / 20))
    return np.clip(audio + noise, -1.0, 1.0).astype(np.float32)


def speech_set(
    n: int = 12,
    *,
    sentences: Sequence[str] = SENTENCES,
    voices: Sequence[str] = VOICES,
    speeds: Sequence[int] = (140, 175),
    snr_db: Sequence[float | None] = (None, 20.0, 10.0),
    pad_s: tuple[float, float] = (0.4, 0.8),
    seed: int = 0,
) -> list[Clip]:
    """``n`` clips cycling through sentences x voices x speeds x noise levels, each with silence of
    ``pad_s`` seconds (random in the range) before and after, so a VAD sees onsets and offsets."""
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        text = sentences[i % len(sentences)]
        voice = voices[i % len(voices)]
        speed = speeds[(i // len(voices)) % len(speeds)]
        snr = snr_db[i % len(snr_db)]
        lead, tail = (np.zeros(int(rng.uniform(*pad_s) * SAMPLE_RATE), np.float32) for _ in range(2))
        audio = np.concatenate([lead, espeak(text, voice, speed), tail])
        if snr is not None:
            audio = add_noise(audio, snr, rng)
        clips.append(Clip(f"{i:02d}-{voice}-{speed}-{'clean' if snr is None else f'{snr:g}dB'}", audio, text))
    return clips


def noise_clips(n: int = 2, seconds: float = 2.0, seed: int = 1) -> list[Clip]:
    """Clips with no speech: low white noise and brown (rumble) noise around -45 dBFS."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        white = rng.standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32)
        audio = white if i % 2 == 0 else np.cumsum(white).astype(np.float32)
        audio = audio - audio.mean()
        audio *= 0.005 / (float(np.sqrt(np.mean(audio**2))) + 1e-12)
        out.append(Clip(f"noise-{i}", audio.astype(np.float32), ""))
    return out


def check_size(clips: Sequence[Clip], *, stage: str, min_utterances: int = MIN_UTTERANCES,
               min_frames: int = MIN_FRAMES) -> None:
    """Raise ``CalibrationError`` when ``clips`` has fewer than ``min_utterances`` clips or fewer
    than ``min_frames`` 512-sample frames in all."""
    frames = sum(c.frames for c in clips)
    if len(clips) < min_utterances or frames < min_frames:
        raise CalibrationError(
            f"the {stage} calibration set is too small: {len(clips)} utterances / {frames} frames; "
            f"at least {min_utterances} utterances and {min_frames} frames (32 ms) are needed"
        )
