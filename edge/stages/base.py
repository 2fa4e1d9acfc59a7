"""The stage interfaces of the streaming loop.

Each stage is a small protocol so a model or backend can be swapped without touching the loop
(``edge.pipeline``). Implementations live beside this module; ``edge.runtime`` builds them
from a bundle's manifest.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class VoiceActivityDetector(Protocol):
    """Speech probability per fixed-size frame of 16 kHz audio; stateful across frames."""

    frame_samples: int

    def reset(self) -> None:
        """Forget all state (start of a new stream)."""

    def probability(self, frame: np.ndarray) -> float:
        """Return P(speech) in [0, 1] for one int16 frame of ``frame_samples`` samples."""


@dataclass(frozen=True)
class Transcript:
    """A recognizer's hypothesis for a segment. ``final`` is False for partials."""

    text: str
    final: bool
    confidence: float | None = None
    audio_s: float = 0.0
    compute_s: float = 0.0


@runtime_checkable
class SpeechRecognizer(Protocol):
    """Transcribes a whole (growing) segment of 16 kHz float32 audio."""

    def transcribe(self, audio: np.ndarray) -> str:
        """Return the text spoken in ``audio`` (float32 mono, 16 kHz); '' when nothing is said."""


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class GenerationStats:
    """Filled in by ``LanguageModel.stream`` as it goes."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stopped_by: str = ""  # "eos" | "budget" | "cancel"

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0


@runtime_checkable
class LanguageModel(Protocol):
    """Streams a chat reply as text pieces."""

    def stream(
        self,
        messages: list[ChatMessage],
        *,
        max_new_tokens: int,
        cancel: threading.Event | None = None,
        stats: GenerationStats | None = None,
    ) -> Iterator[str]:
        """Yield decoded text pieces of the reply (their concatenation is the reply).

        Stops at end-of-turn, at ``max_new_tokens``, or soon after ``cancel`` is set.
        """


@runtime_checkable
class SpeechSynthesizer(Protocol):
    """Turns text into float32 mono audio at ``sample_rate``."""

    sample_rate: int

    def synthesize(self, text: str) -> np.ndarray:
        """Return the speech for ``text`` (float32 mono, ``sample_rate``); empty for empty text."""


@dataclass
class Stages:
    """The four loaded stages the loop runs, plus what they were loaded from."""

    vad: VoiceActivityDetector
    asr: SpeechRecognizer
    llm: LanguageModel
    tts: SpeechSynthesizer
    info: dict[str, str] = field(default_factory=dict)
