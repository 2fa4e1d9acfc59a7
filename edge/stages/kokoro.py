"""Kokoro-82M v1.0 (int8 ONNX) speech synthesis, English through espeak-ng phonemes, 24 kHz.

The model takes ``tokens`` [1, N] int64 (vocabulary ids, a 0 at both ends), ``style`` [1, 256]
float32 and ``speed`` [1] float32 and returns ``audio`` [samples] float32 at 24 kHz. The style is
row ``len(ids)`` of the chosen voice's array (``voices_ja.npz``: one [510, 1, 256] array per voice;
the row is clamped to the array). The model's context is 512 tokens, so a longer phoneme string is
cut at word boundaries (after punctuation where possible) into parts of at most ``MAX_PHONEMES``
ids, spoken one after another. Leading and trailing near-silence is trimmed, leaving a short margin.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from edge.bundle import StageSpec
from edge.errors import ConfigError, ModelFileError
from edge.onnx import make_session
from edge.phonemes import Phonemizer

SAMPLE_RATE = 24000
#: Only Japanese voices ship; all speak English with an accent. Round trip through Moonshine base-en,
#: corpus WER on 20 assistant-style replies / the 22 eval-set requests (with the stressed "I"):
#: jm_kumo 2.0/3.5 %, jf_gongitsune 2.6/0.7 %, jf_nezumi 2.6/3.5 %, jf_alpha 3.9/2.1 %,
#: jf_tebukuro 5.3/2.8 % (several "errors" are the scorer's: "I'm" for "I am", "7.30" for "7:30").
#: jm_kumo is best on replies, which is what the TTS speaks; jf_gongitsune is as good.
DEFAULT_VOICE = "jm_kumo"
#: ids per model call (the model's 512 positions less the two 0 pads)
MAX_PHONEMES = 510
#: trimming: frames quieter than this fraction of the peak are silence; margins kept around the speech
TRIM_RELATIVE = 0.01
TRIM_FRAME = 240  # 10 ms
LEAD_MARGIN_S = 0.03
TAIL_MARGIN_S = 0.08


def load_vocab(path: Path | str) -> dict[str, int]:
    """Kokoro's symbol -> id table from ``vocab.json`` (``{"vocab": {...}}`` or a flat mapping)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"Kokoro vocabulary {path} cannot be read: {exc}") from exc
    vocab = data.get("vocab", data) if isinstance(data, dict) else None
    if not isinstance(vocab, dict) or not vocab:
        raise ModelFileError(f"Kokoro vocabulary {path.name} holds no symbol table")
    return {str(k): int(v) for k, v in vocab.items()}


def load_voice(path: Path | str, name: str) -> np.ndarray:
    """The style table [rows, 256] float32 of voice ``name`` in ``voices_*.npz``."""
    path = Path(path)
    try:
        with np.load(path) as data:
            if name not in data.files:
                raise ConfigError(f"Kokoro voice {name!r} is not in {path.name} (it has: {', '.join(sorted(data.files))})")
            table = np.asarray(data[name], dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"Kokoro voices {path} cannot be read: {exc}") from exc
    table = table.reshape(table.shape[0], -1)
    if table.shape[1] != 256:
        raise ModelFileError(f"Kokoro voice {name!r} has style rows of {table.shape[1]} values, expected 256")
    return table


def voice_names(path: Path | str) -> list[str]:
    """The voices held in a ``voices_*.npz`` file, sorted."""
    with np.load(Path(path)) as data:
        return sorted(data.files)


def split_phonemes(phonemes: str, limit: int = MAX_PHONEMES) -> list[str]:
    """Cut a phoneme string into parts of at most ``limit`` symbols, at spaces, preferring a space
    that follows punctuation; a single word longer than ``limit`` is cut inside (never happens in
    practice)."""
    parts: list[str] = []
    rest = phonemes.strip()
    while len(rest) > limit:
        window = rest[: limit + 1]
        cut = max((k for k in range(1, len(window)) if window[k] == " " and window[k - 1] in ",;:.!?…—)\""),
                  default=-1)
        if cut <= 0:
            cut = window.rfind(" ")
        if cut <= 0:
            cut = limit
        parts.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        parts.append(rest)
    return parts


def trim_silence(audio: np.ndarray, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Drop near-silence (frames under ``TRIM_RELATIVE`` of the peak) at both ends, keeping
    ``LEAD_MARGIN_S`` before and ``TAIL_MARGIN_S`` after the speech; silence stays as it is."""
    if audio.size == 0:
        return audio
    peak = float(np.max(np.abs(audio)))
    if peak < 1e-4:
        return audio
    n = audio.size // TRIM_FRAME
    if n == 0:
        return audio
    frames = np.abs(audio[: n * TRIM_FRAME]).reshape(n, TRIM_FRAME).max(axis=1)
    loud = np.flatnonzero(frames >= TRIM_RELATIVE * peak)
    start = max(0, int(loud[0]) * TRIM_FRAME - int(LEAD_MARGIN_S * rate))
    end = min(audio.size, (int(loud[-1]) + 1) * TRIM_FRAME + int(TAIL_MARGIN_S * rate))
    return audio[start:end]


class KokoroSynthesizer:
    """``SpeechSynthesizer`` on the Kokoro v1.0 ONNX model with one voice.

    ``synthesize(text)`` phonemizes English ``text`` with espeak-ng, runs the model (in parts when
    the text is long) and returns float32 mono at 24 kHz, trimmed; empty for text with no words.
    ``last_phonemes``, ``last_compute_s`` and ``last_rtf`` describe the latest call.
    """

    sample_rate: int = SAMPLE_RATE

    def __init__(
        self,
        model_path: Path | str,
        voices_path: Path | str,
        vocab_path: Path | str,
        *,
        voice: str = DEFAULT_VOICE,
        speed: float = 1.0,
        language: str = "en-us",
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
        trim: bool = True,
    ) -> None:
        self.vocab = load_vocab(vocab_path)
        self.voice = voice
        self.style_table = load_voice(voices_path, voice)
        self.speed = float(speed)
        self.trim = trim
        self.session = make_session(model_path, providers=providers, threads=threads)
        names = {i.name for i in self.session.get_inputs()}
        if not {"tokens", "style", "speed"} <= names:
            raise ModelFileError(f"{Path(model_path).name} is not a Kokoro model (inputs: {', '.join(sorted(names))})")
        self.phonemizer = Phonemizer(self.vocab, language)
        self.last_phonemes = ""
        self.last_compute_s = 0.0
        self.last_rtf = 0.0

    def style(self, n_ids: int) -> np.ndarray:
        """The style row for a part of ``n_ids`` ids, [1, 256] (row index clamped to the table)."""
        row = min(max(n_ids, 0), self.style_table.shape[0] - 1)
        return self.style_table[row].reshape(1, -1)

    def synthesize_ids(self, ids: list[int]) -> np.ndarray:
        """Run the model on at most ``MAX_PHONEMES`` vocabulary ids; raw (untrimmed) 24 kHz audio."""
        if not ids:
            return np.zeros(0, dtype=np.float32)
        if len(ids) > MAX_PHONEMES:
            raise ValueError(f"{len(ids)} phoneme ids exceed Kokoro's {MAX_PHONEMES}; split them first")
        feed = {
            "tokens": np.array([[0, *ids, 0]], dtype=np.int64),
            "style": self.style(len(ids)),
            "speed": np.array([self.speed], dtype=np.float32),
        }
        audio = self.session.run(None, feed)[0]
        return np.asarray(audio, dtype=np.float32).reshape(-1)

    def synthesize_phonemes(self, phonemes: str) -> np.ndarray:
        """Speak a string of Kokoro symbols (any length): parts joined, trimmed as configured."""
        pieces = []
        for part in split_phonemes(phonemes):
            audio = self.synthesize_ids(self.phonemizer.ids(part))
            if self.trim:
                audio = trim_silence(audio)
            pieces.append(audio)
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)

    def synthesize(self, text: str) -> np.ndarray:
        """Speech for English ``text``: float32 mono at 24 kHz; empty when ``text`` has no words."""
        t0 = time.perf_counter()
        phonemes = self.phonemizer.phonemize(text)
        self.last_phonemes = phonemes
        audio = self.synthesize_phonemes(phonemes)
        self.last_compute_s = time.perf_counter() - t0
        self.last_rtf = self.last_compute_s / (audio.size / SAMPLE_RATE) if audio.size else 0.0
        return audio

    def close(self) -> None:
        """Stop the espeak-ng child process (the model stays usable; a later call restarts it)."""
        self.phonemizer.close()


def load_tts(spec: StageSpec, root: Path, providers: Sequence[str], threads: int | None) -> KokoroSynthesizer:
    """Build a ``KokoroSynthesizer`` from a bundle stage of kind ``kokoro``: files by role ``model``,
    ``voices``, ``vocab`` relative to ``root``; ``voice``, ``speed``, ``language`` from its config
    (defaults ``DEFAULT_VOICE``, 1.0, ``en-us``)."""
    root = Path(root)
    cfg = spec.config
    return KokoroSynthesizer(
        root / spec.file("model").path,
        root / spec.file("voices").path,
        root / spec.file("vocab").path,
        voice=str(cfg.get("voice", DEFAULT_VOICE)),
        speed=float(cfg.get("speed", 1.0)),
        language=str(cfg.get("language", "en-us")),
        providers=providers,
        threads=threads,
    )
