"""Chat history bounding and chat-template rendering (edge.chat)."""

from __future__ import annotations

import pytest

from edge.chat import ChatHistory, render_chat
from edge.errors import ConfigError
from edge.stages.base import ChatMessage

# SmolLM2-Instruct's own template (as the GGUF carries it): a default system prompt when none is given
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_messages_start_with_system_prompt_and_end_with_the_new_user_turn():
    history = ChatHistory("Be brief.", max_turns=3)
    msgs = history.messages_for("Hi there")
    assert msgs == [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi there")]


def test_history_keeps_only_the_last_max_turns_exchanges_in_order():
    history = ChatHistory("sys", max_turns=2)
    for i in range(5):
        history.add_turn(f"q{i}", f"a{i}")
    msgs = history.messages_for("q5")
    assert [(m.role, m.content) for m in msgs] == [
        ("system", "sys"), ("user", "q3"), ("assistant", "a3"), ("user", "q4"), ("assistant", "a4"), ("user", "q5"),
    ]
    assert len(history) == 2


def test_messages_for_does_not_change_the_history():
    history = ChatHistory("sys", max_turns=4)
    history.messages_for("unanswered")
    assert len(history) == 0
    history.add_turn("q", "a")
    assert [m.content for m in history.messages_for("next")] == ["sys", "q", "a", "next"]


def test_zero_turns_remembers_nothing_and_clear_forgets_everything():
    none = ChatHistory("sys", max_turns=0)
    none.add_turn("q", "a")
    assert [m.content for m in none.messages_for("x")] == ["sys", "x"]
    history = ChatHistory("sys", max_turns=3)
    history.add_turn("q", "a")
    history.clear()
    assert [m.content for m in history.messages_for("x")] == ["sys", "x"]


def test_empty_system_prompt_is_left_out_and_negative_turns_refused():
    assert [m.role for m in ChatHistory("", 2).messages_for("x")] == ["user"]
    with pytest.raises(ConfigError):
        ChatHistory("sys", max_turns=-1)


def test_render_chat_writes_chatml_with_generation_prompt():
    msgs = [ChatMessage("system", "Be brief."), ChatMessage("user", "Capital of France?")]
    text = render_chat(SMOLLM2_TEMPLATE, msgs)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert not render_chat(SMOLLM2_TEMPLATE, msgs, add_generation_prompt=False).endswith("assistant\n")


def test_render_chat_uses_the_template_default_system_prompt_when_none_is_given():
    text = render_chat(SMOLLM2_TEMPLATE, [ChatMessage("user", "hi")])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_render_chat_sandbox_refuses_python_internals():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ConfigError):
        render_chat(evil, [ChatMessage("user", "x")])


def test_render_chat_reports_template_errors_and_raise_exception():
    with pytest.raises(ConfigError):
        render_chat("{% for %}", [ChatMessage("user", "x")])
    with pytest.raises(ConfigError, match="only user"):
        render_chat("{{ raise_exception('only user and assistant roles') }}", [ChatMessage("user", "x")])
