"""espeak-ng formant synthesis as the fallback TTS (kind ``espeak-ng``), 22,050 Hz.

espeak-ng (GPL-3) runs as a separate program, once per call (``--stdout`` WAV, text on stdin), so
nothing is linked and no model file is needed: it works on a board without a Kokoro model. Speech
is robotic but intelligible, and fast (tens of ms per clause).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

from edge.bundle import StageSpec
from edge.phonemes import PhonemizerError, spell_currency
from edge.text import is_speakable

SAMPLE_RATE = 22050
TIMEOUT_S = 20.0


class EspeakSynthesizer:
    """``SpeechSynthesizer`` on the ``espeak-ng`` program.

    ``voice`` is an espeak-ng voice (``en-us``, ``en-us+f3``, ``en-gb+m3``), ``speed`` words per
    minute, ``pitch`` 0-99 (None: the voice's default). ``synthesize`` returns float32 mono at
    ``sample_rate`` (22,050 Hz), empty for text with no words; raises ``PhonemizerError`` when
    espeak-ng is missing or fails.
    """

    sample_rate: int = SAMPLE_RATE

    def __init__(self, voice: str = "en-us", speed: int = 165, pitch: int | None = None) -> None:
        if shutil.which("espeak-ng") is None:
            raise PhonemizerError("espeak-ng is not installed (apt-get install espeak-ng); the fallback TTS needs it")
        self.voice = voice
        self.speed = int(speed)
        self.pitch = pitch
        self.last_compute_s = 0.0
        self.last_rtf = 0.0

    def synthesize(self, text: str) -> np.ndarray:
        """Speech for ``text``: float32 mono at 22,050 Hz; empty when ``text`` has no words."""
        # "[[...]]" would be read by espeak-ng as phoneme input, not text; "$5" as "dollar five"
        line = spell_currency(" ".join(text.replace("[", " ").replace("]", " ").split()))
        if not is_speakable(line):
            return np.zeros(0, dtype=np.float32)
        cmd = ["espeak-ng", "-b", "1", "-v", self.voice, "-s", str(self.speed), "--stdout", "--stdin"]
        if self.pitch is not None:
            cmd[1:1] = ["-p", str(self.pitch)]
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, input=line.encode("utf-8"), capture_output=True, timeout=TIMEOUT_S, check=True)
        except subprocess.CalledProcessError as exc:
            msg = exc.stderr.decode("utf-8", "replace").strip().splitlines()
            raise PhonemizerError(f"espeak-ng failed: {msg[0] if msg else exc.returncode}") from exc
        except (subprocess.SubprocessError, OSError) as exc:
            raise PhonemizerError(f"espeak-ng failed: {exc}") from exc
        try:
            audio, rate = sf.read(io.BytesIO(done.stdout), dtype="float32")
        except (RuntimeError, ValueError) as exc:  # soundfile raises LibsndfileError (a RuntimeError)
            raise PhonemizerError(f"espeak-ng wrote no readable audio: {exc}") from exc
        if audio.ndim > 1:
            audio = audio.mean(axis=1)
        if rate != self.sample_rate:
            from edge.audio import resample

            audio = resample(audio, rate, self.sample_rate)
        self.last_compute_s = time.perf_counter() - t0
        self.last_rtf = self.last_compute_s / (audio.size / self.sample_rate) if audio.size else 0.0
        return np.ascontiguousarray(audio, dtype=np.float32)


def load_tts(spec: StageSpec, root: Path, providers: Sequence[str], threads: int | None) -> EspeakSynthesizer:
    """Build an ``EspeakSynthesizer`` from a bundle stage of kind ``espeak-ng`` (no files; ``voice``,
    ``speed``, ``pitch`` from its config, defaults ``en-us``, 165 wpm, the voice's pitch)."""
    cfg = spec.config
    pitch = cfg.get("pitch")
    return EspeakSynthesizer(voice=str(cfg.get("voice", "en-us")), speed=int(cfg.get("speed", 165)),
                             pitch=None if pitch is None else int(pitch))
