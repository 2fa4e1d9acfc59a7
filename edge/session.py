"""A voice session: a loaded bundle, its board profile, conversation history and the loop settings.

This is what ``sottovoce run`` and the device daemon build; tests build it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edge.audio_io import AudioSink, AudioSource
from edge.boards import BoardProfile, load_board
from edge.endpoint import EndpointConfig
from edge.metrics import TurnRecord
from edge.pipeline import LoopConfig, VoiceLoop
from edge.runtime import LoadedBundle, load_stages
from edge.stages.base import Stages

DEFAULT_SYSTEM_PROMPT = "You are a helpful voice assistant. Answer in one or two short sentences."


@dataclass
class VoiceSession:
    loaded: LoadedBundle
    config: LoopConfig
    system_prompt: str
    history_turns: int
    history: object = field(init=False)

    def __post_init__(self) -> None:
        from edge.chat import ChatHistory

        self.history = ChatHistory(system_prompt=self.system_prompt, max_turns=self.history_turns)

    @property
    def stages(self) -> Stages:
        return self.loaded.stages

    @property
    def profile(self) -> BoardProfile:
        return self.loaded.profile

    @property
    def load_s(self) -> float:
        return self.loaded.load_s

    def run(
        self,
        source: AudioSource,
        sink: AudioSink,
        on_turn: Callable[[TurnRecord], None] | None = None,
        on_event: Callable[[str, dict], None] | None = None,
    ) -> list[TurnRecord]:
        """Answer every turn in ``source``; the history carries over between calls."""
        from edge.text import ClauseSplitter

        loop = VoiceLoop(self.stages, self.history, ClauseSplitter, self.config, on_turn=on_turn, on_event=on_event)
        return loop.run(source, sink)


def build_session(
    bundle_dir: Path,
    *,
    board: str | None = None,
    max_new_tokens: int | None = None,
    system_prompt: str | None = None,
    barge_in: bool = True,
) -> VoiceSession:
    """Load a verified, unpacked bundle and set the loop up from the board profile.

    ``board`` names a profile in ``hw/boards`` to run as; default: the bundle's own target.
    """
    profile = load_board(board) if board else None
    loaded = load_stages(bundle_dir, profile)
    prof = loaded.profile
    llm_cfg = prof.section("llm")
    config = LoopConfig(
        endpoint=EndpointConfig.from_profile(prof.section("vad")),
        max_new_tokens=int(max_new_tokens or llm_cfg.get("max_new_tokens", 64)),
        barge_in=barge_in,
    )
    prompt = system_prompt or loaded.manifest.stages["llm"].config.get("system_prompt") or DEFAULT_SYSTEM_PROMPT
    return VoiceSession(loaded, config, prompt, int(llm_cfg.get("history_turns", 4)))
