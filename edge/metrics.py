"""Per-turn metrics records (ARCHITECTURE.md section 4).

Timestamps are in milliseconds on the *listener's* timeline, with 0 at the end of the user's
speech: the endpoint wait (the VAD hangover) counts in audio time, the work after it in wall
time. That gives the same figures whether the input is a file read faster than real time or a
live microphone. ``voice_to_voice_ms`` is end of user speech -> first reply audio at the output.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StageMetrics:
    compute_ms: float = 0.0
    audio_ms: float = 0.0  # audio processed (ASR) or produced (TTS)
    rtf: float | None = None  # compute / audio
    calls: int = 0


@dataclass
class TurnRecord:
    turn: int
    speech_start_s: float  # position of the speech in the input stream (audio time)
    speech_end_s: float
    transcript: str = ""
    reply: str = ""
    partials: list[dict[str, Any]] = field(default_factory=list)  # {text, at_s (audio time), ms_before_end}
    transcript_from: str = "final"  # final | last_partial (the final decode heard no words, a partial had)
    # listener timeline, ms after end of speech
    endpoint_ms: float = 0.0
    asr_final_ms: float | None = None
    llm_first_token_ms: float | None = None
    llm_done_ms: float | None = None
    tts_first_audio_ms: float | None = None
    playback_start_ms: float | None = None
    voice_to_voice_ms: float | None = None
    # compute
    asr: StageMetrics = field(default_factory=StageMetrics)
    llm: dict[str, Any] = field(default_factory=dict)  # prompt_tokens, new_tokens, prefill_ms, decode_ms, tokens_per_s
    tts: StageMetrics = field(default_factory=StageMetrics)
    reply_audio_s: float = 0.0
    interrupted: bool = False  # the user barged in
    forced_end: bool = False  # max turn length reached
    status: str = "answered"  # answered | not_understood (speech, no words: reprompted) | no_speech_recognized | interrupted | error

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return _round(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[k]
