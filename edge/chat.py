"""Conversation state for the voice loop: a bounded chat history and chat-template rendering.

``ChatHistory`` keeps the system prompt and the last ``max_turns`` user/assistant pairs, so the
prompt (and the prefill time) stays bounded however long a session runs. ``render_chat`` turns
messages into the model's prompt text with its own Jinja chat template, in a sandbox (a template
comes from a bundle and must not reach Python objects), the way ``transformers`` renders it.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache
from typing import Any, Sequence

from edge.errors import ConfigError
from edge.stages.base import ChatMessage


class ChatHistory:
    """The system prompt plus the last ``max_turns`` completed user/assistant exchanges."""

    def __init__(self, system_prompt: str, max_turns: int) -> None:
        if max_turns < 0:
            raise ConfigError(f"chat history max_turns must be >= 0, not {max_turns}")
        self.system_prompt = system_prompt
        self.max_turns = int(max_turns)
        self._turns: deque[tuple[str, str]] = deque(maxlen=self.max_turns or None)

    def messages_for(self, user_text: str) -> list[ChatMessage]:
        """The messages to send for a new user turn: the system prompt (when not empty), then the last
        ``max_turns`` exchanges oldest first, then ``user_text``. The history itself is not changed."""
        out = [ChatMessage("system", self.system_prompt)] if self.system_prompt else []
        for user, reply in self.turns:
            out.append(ChatMessage("user", user))
            out.append(ChatMessage("assistant", reply))
        out.append(ChatMessage("user", user_text))
        return out

    def add_turn(self, user_text: str, reply_text: str) -> None:
        """Remember a completed exchange; the oldest one is forgotten beyond ``max_turns``
        (with ``max_turns == 0`` nothing is remembered)."""
        if self.max_turns == 0:
            return
        self._turns.append((user_text, reply_text))

    def clear(self) -> None:
        """Forget every exchange (the system prompt stays)."""
        self._turns.clear()

    @property
    def turns(self) -> list[tuple[str, str]]:
        """The remembered (user, assistant) exchanges, oldest first."""
        return list(self._turns)

    def __len__(self) -> int:
        return len(self._turns)


def _raise(message: str) -> None:
    raise ConfigError(f"chat template refused the conversation: {message}")


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise ConfigError(f"chat template does not compile: {exc}") from exc


def render_chat(
    template: str,
    messages: Sequence[ChatMessage],
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """The prompt text for ``messages`` rendered by the Jinja ``template`` in a sandbox, with the
    variables Hugging Face chat templates expect (``messages`` as role/content dicts,
    ``add_generation_prompt``, plus ``extra`` such as ``bos_token``). A template that does not compile,
    calls ``raise_exception`` or touches what the sandbox forbids raises ``ConfigError``."""
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    tmpl = _compile(template)
    data = [{"role": m.role, "content": m.content} for m in messages]
    try:
        return tmpl.render(messages=data, add_generation_prompt=add_generation_prompt, **extra)
    except (TemplateError, SecurityError) as exc:
        raise ConfigError(f"chat template failed to render: {exc}") from exc
