"""A decoder-only chat model on onnxruntime: greedy decoding with a KV cache, streamed as text.

The model is optimum's ``text-generation-with-past`` export (one graph: ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.<i>.key|value`` in; ``logits``,
``present.<i>.key|value`` out), possibly int8-quantized. The tokenizer is a plain ``tokenizers``
``tokenizer.json``; the prompt is the bundle's Jinja chat template (``edge.chat.render_chat``).

Speed: the KV cache never goes through numpy. Each step binds the previous step's ``present``
``OrtValue``s as the next ``past`` inputs with IO binding and lets onnxruntime allocate the outputs;
only the last position's logits (one row) are copied out for the argmax. A graph with a
``logits_to_keep`` input (``export.llm.add_logits_to_keep``) computes only that row, also in prefill.
Text is detokenized incrementally: a piece is emitted only when the decoded tail is complete UTF-8,
so a multi-byte character split across tokens is never emitted broken.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edge.chat import render_chat
from edge.errors import ConfigError, ModelFileError
from edge.onnx import make_session
from edge.stages.base import ChatMessage, GenerationStats

KIND = "onnx-causal-lm"


@dataclass(frozen=True)
class LlmConfig:
    """What the runtime needs besides the graph and the tokenizer (the stage's manifest ``config``)."""

    chat_template: str
    eos_ids: tuple[int, ...]
    bos_id: int | None = None
    add_bos: bool = False
    system_prompt: str = ""
    max_context: int = 2048
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LlmConfig":
        """Read the settings ``export.llm`` writes; a missing template or stop id raises ``ConfigError``."""
        try:
            eos = config["eos_token_ids"]
            template = config["chat_template"]
        except KeyError as exc:
            raise ConfigError(f"llm stage config lacks {exc}") from exc
        if not eos or not template:
            raise ConfigError("llm stage config has no stop token ids or no chat template")
        return cls(
            chat_template=str(template),
            eos_ids=tuple(int(t) for t in eos),
            bos_id=None if config.get("bos_token_id") is None else int(config["bos_token_id"]),
            add_bos=bool(config.get("add_bos_token", False)),
            system_prompt=str(config.get("system_prompt", "")),
            max_context=int(config.get("max_context", 2048)),
            num_layers=int(config.get("num_layers", 0)),
            num_kv_heads=int(config.get("num_kv_heads", 0)),
            head_dim=int(config.get("head_dim", 0)),
        )


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas whose concatenation is the decoded text.

    Each ``push`` decodes only a short window (from the last emitted boundary) and returns the new
    text, or '' while the tail is an incomplete UTF-8 sequence (decoded as U+FFFD).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens already turned into text

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' if it only starts a character)."""
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever undecodable tail is left (replacement characters dropped) at the end."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return after[len(before):].replace("\ufffd", "") if len(after) > len(before) else ""


_ORT_TO_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}


class OnnxCausalLM:
    """Greedy chat generation on an exported causal LM with a KV cache (``edge.stages.base.LanguageModel``)."""

    def __init__(
        self,
        model_path: Path | str,
        tokenizer_path: Path | str,
        config: LlmConfig,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
    ) -> None:
        from tokenizers import Tokenizer

        import onnxruntime as ort

        self.config = config
        tok_path = Path(tokenizer_path)
        if not tok_path.is_file():
            raise ModelFileError(f"tokenizer file {tok_path} is missing")
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises plain Exceptions
            raise ModelFileError(f"cannot read tokenizer {tok_path.name}: {exc}") from exc
        self.session = make_session(model_path, providers=providers, threads=threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        for need in ("input_ids", "attention_mask"):
            if need not in inputs:
                raise ModelFileError(f"{Path(model_path).name} is not a causal LM with KV cache: no input {need!r}")
        self._has_positions = "position_ids" in inputs
        self._has_keep = "logits_to_keep" in inputs  # LM head on the last positions only (export.llm)
        self.past_names = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_layer_order)
        outputs = [o.name for o in self.session.get_outputs()]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        missing = [n for n in ["logits", *self.present_names] if n not in outputs]
        if not self.past_names or missing:
            raise ModelFileError(f"{Path(model_path).name} lacks KV-cache outputs {missing[:2]}")
        first = inputs[self.past_names[0]]
        self._kv_dtype = _ORT_TO_NP.get(first.type, np.float32)
        kv_heads, head_dim = first.shape[1], first.shape[3]
        if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
            kv_heads, head_dim = config.num_kv_heads, config.head_dim
        self._empty_kv = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv_heads, 0, head_dim), self._kv_dtype))
        self._ort = ort

    # ------------------------------------------------------------------ tokens

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt token ids for ``messages`` (chat template with the generation prompt)."""
        text = render_chat(self.config.chat_template, messages, add_generation_prompt=True,
                           bos_token=self.tokenizer.id_to_token(self.config.bos_id) if self.config.bos_id is not None
                           else "", eos_token="")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.config.add_bos and self.config.bos_id is not None and (not ids or ids[0] != self.config.bos_id):
            ids = [self.config.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens dropped)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ model

    def _run(self, ids: np.ndarray, start: int, past: list[Any] | None, all_logits: bool = False
             ) -> tuple[np.ndarray, list[Any]]:
        """One forward pass over ``ids`` (positions ``start``..) on top of ``past`` (None: empty cache).
        Returns the logits (last row, or every row) and the new cache as ``OrtValue``s."""
        n = ids.shape[1]
        # the arrays stay referenced here until the run is over (a binding may point into their memory)
        feeds = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64),
                 "attention_mask": np.ones((1, start + n), np.int64)}
        if self._has_positions:
            feeds["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None, :]
        if self._has_keep:
            feeds["logits_to_keep"] = np.array([n if all_logits else 1], np.int64)
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for i, name in enumerate(self.past_names):
            binding.bind_ortvalue_input(name, past[i] if past is not None else self._empty_kv)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        logits = outs[0].numpy()
        return (logits[0] if all_logits else logits[0, -1]), list(outs[1:])

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Float32 logits [len(ids), vocab] of one forward pass over ``ids`` from an empty cache
        (teacher forcing: row t scores the token after ``ids[:t+1]``)."""
        out, _ = self._run(np.asarray(ids, np.int64)[None, :], 0, None, all_logits=True)
        return out.astype(np.float32, copy=False)

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        cancel: threading.Event | None = None,
        stats: GenerationStats | None = None,
    ) -> Iterator[int]:
        """Greedy token ids after ``prompt_ids``: stops before a stop token, after ``max_new_tokens``,
        at the context limit, or at the next step once ``cancel`` is set. ``stats`` is filled as it goes
        (``stopped_by``: ``eos`` | ``budget`` | ``cancel``)."""
        stats = stats if stats is not None else GenerationStats()
        prompt = list(prompt_ids)
        if not prompt:
            raise ConfigError("the prompt is empty")
        if len(prompt) >= self.config.max_context:
            raise ConfigError(f"the prompt has {len(prompt)} tokens; this model takes at most {self.config.max_context}")
        stats.prompt_tokens, stats.new_tokens, stats.prefill_s, stats.decode_s = len(prompt), 0, 0.0, 0.0
        budget = min(int(max_new_tokens), self.config.max_context - len(prompt))
        stats.stopped_by = ""
        if budget <= 0:
            stats.stopped_by = "budget"
            return
        if cancel is not None and cancel.is_set():
            stats.stopped_by = "cancel"
            return
        eos = set(self.config.eos_ids)
        t0 = time.perf_counter()
        logits, past = self._run(np.asarray(prompt, np.int64)[None, :], 0, None)
        stats.prefill_s = time.perf_counter() - t0
        pos = len(prompt)
        step = np.zeros((1, 1), np.int64)
        decode_t = 0.0
        while True:
            token = int(np.argmax(logits))
            if token in eos:
                stats.stopped_by = "eos"
                break
            stats.new_tokens += 1
            stats.decode_s = decode_t
            yield token
            if stats.new_tokens >= budget:
                stats.stopped_by = "budget"
                break
            if cancel is not None and cancel.is_set():
                stats.stopped_by = "cancel"
                break
            t1 = time.perf_counter()
            step[0, 0] = token
            logits, past = self._run(step, pos, past)
            pos += 1
            decode_t += time.perf_counter() - t1
        stats.decode_s = decode_t

    def stream(
        self,
        messages: list[ChatMessage],
        *,
        max_new_tokens: int,
        cancel: threading.Event | None = None,
        stats: GenerationStats | None = None,
    ) -> Iterator[str]:
        """Yield the reply to ``messages`` as text pieces (their concatenation is the reply): greedy,
        stopping at end-of-turn, at ``max_new_tokens``, or one step after ``cancel`` is set."""
        detok = IncrementalDetokenizer(self.tokenizer)
        for token in self.generate_ids(self.encode_chat(messages), max_new_tokens, cancel=cancel, stats=stats):
            piece = detok.push(token)
            if piece:
                yield piece
        if cancel is None or not cancel.is_set():
            tail = detok.flush()
            if tail:
                yield tail


def _layer_order(name: str) -> tuple[int, int]:
    parts = name.split(".")
    return int(parts[1]), 0 if parts[2] == "key" else 1


def load_llm(spec: Any, root: Path, providers: Sequence[str], threads: int | None) -> OnnxCausalLM:
    """Build an ``OnnxCausalLM`` from a bundle stage of kind ``onnx-causal-lm``: files by role ``model``
    and ``tokenizer`` relative to ``root``, settings from the stage config (``LlmConfig.from_config``)."""
    root = Path(root)
    return OnnxCausalLM(
        root / spec.file("model").path,
        root / spec.file("tokenizer").path,
        LlmConfig.from_config(spec.config),
        providers=providers,
        threads=threads,
    )
