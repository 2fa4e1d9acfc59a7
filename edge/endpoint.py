"""Turn endpointing: VAD probabilities -> speech start / end events, with hysteresis and hangover.

Pure logic (no model, no clock): feed one probability per frame, get events. The timings come
from the board profile's ``[vad]`` section:

- ``threshold_on`` / ``threshold_off``: a frame counts as speech above ``on``; once in speech, only
  frames below ``off`` count as silence (hysteresis keeps brief dips from splitting a word);
- ``min_speech_ms``: speech shorter than this (a click, a cough) never opens a turn;
- ``hangover_ms``: silence this long after speech ends the turn (short is fast, too short cuts
  people off mid-sentence);
- ``pre_roll_ms``: audio kept from before the detected start, so the first phoneme is not lost;
- ``max_turn_s``: a turn is force-ended at this length (bounded memory for endless input).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from edge.audio import FRAME_MS


@dataclass(frozen=True)
class EndpointConfig:
    threshold_on: float = 0.5
    threshold_off: float = 0.35
    min_speech_ms: float = 160.0
    hangover_ms: float = 640.0
    pre_roll_ms: float = 192.0
    max_turn_s: float = 20.0

    @classmethod
    def from_profile(cls, vad_section: dict[str, Any]) -> "EndpointConfig":
        known = cls.__dataclass_fields__
        return cls(**{k: float(v) for k, v in vad_section.items() if k in known})

    def frames(self, ms: float) -> int:
        return max(1, round(ms / FRAME_MS))


class EventKind(Enum):
    SPEECH_START = "speech_start"  # a turn opened; ``frame`` is the first speech frame
    SPEECH_END = "speech_end"  # the turn ended; ``frame`` is the last speech frame (before the hangover)


@dataclass(frozen=True)
class EndpointEvent:
    kind: EventKind
    frame: int  # index of the frame the event refers to
    decided_at: int  # index of the frame at which the decision was made
    forced: bool = False  # SPEECH_END forced by max_turn_s


class Endpointer:
    """Frame-by-frame state machine: idle -> (candidate) -> speaking -> (trailing silence) -> idle."""

    def __init__(self, config: EndpointConfig | None = None) -> None:
        self.config = config or EndpointConfig()
        self._min_speech = self.config.frames(self.config.min_speech_ms)
        self._hangover = self.config.frames(self.config.hangover_ms)
        self._max_turn = self.config.frames(self.config.max_turn_s * 1000)
        self.reset()

    def reset(self) -> None:
        self.in_turn = False
        self._run = 0  # consecutive speech frames while idle
        self._run_start = 0
        self._silence = 0  # consecutive silent frames while in a turn
        self._last_speech = 0
        self._turn_start = 0

    @property
    def trailing_silence_frames(self) -> int:
        """Silent frames since the last speech frame of the open turn (0 when idle or speaking)."""
        return self._silence if self.in_turn else 0

    def push(self, index: int, probability: float) -> list[EndpointEvent]:
        """Consume the VAD probability of frame ``index``; return the events it decides (0 or 1)."""
        cfg = self.config
        if not self.in_turn:
            if probability >= cfg.threshold_on:
                if self._run == 0:
                    self._run_start = index
                self._run += 1
                if self._run >= self._min_speech:
                    self.in_turn = True
                    self._turn_start = self._run_start
                    self._last_speech = index
                    self._silence = 0
                    self._run = 0
                    return [EndpointEvent(EventKind.SPEECH_START, self._turn_start, index)]
            else:
                self._run = 0
            return []
        # in a turn
        if probability >= cfg.threshold_off:
            self._silence = 0
            self._last_speech = index
        else:
            self._silence += 1
        if self._silence >= self._hangover:
            self.in_turn = False
            self._silence = 0
            return [EndpointEvent(EventKind.SPEECH_END, self._last_speech, index)]
        if index - self._turn_start + 1 >= self._max_turn:
            self.in_turn = False
            self._silence = 0
            return [EndpointEvent(EventKind.SPEECH_END, index, index, forced=True)]
        return []

    def finish(self, index: int) -> list[EndpointEvent]:
        """End of stream at frame ``index``: close an open turn."""
        if self.in_turn:
            self.in_turn = False
            return [EndpointEvent(EventKind.SPEECH_END, self._last_speech, index)]
        return []
