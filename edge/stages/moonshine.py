"""Moonshine (base, English) speech recognition on its prebuilt ONNX Runtime (``.ort``) files.

Three files make the stage (roles of recipe ``moonshine-base-en``):
- ``encoder``: ``input_values`` [B, samples] float32 16 kHz -> ``last_hidden_state`` [B, T, 416];
- ``decoder``: one merged decoder: ``input_ids``, ``encoder_hidden_states``, ``past_key_values.{L}.{decoder,
  encoder}.{key,value}`` and ``use_cache_branch`` -> ``logits`` [B, T, 32768] and ``present.*``;
- ``tokenizer``: ``tokenizer.bin``, the token pieces in id order, each length-prefixed (see ``BinTokenizer``).

Decoding is greedy with the KV cache: the first step runs the no-cache branch (it computes the
cross-attention keys/values from the encoder states once), every later step feeds one token and
the cache. The number of new tokens is capped in proportion to the audio length, so a decode
always ends.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from edge.audio import SAMPLE_RATE
from edge.bundle import StageSpec
from edge.errors import ModelFileError
from edge.onnx import make_session

#: Moonshine's own rule of thumb: at most ~6.5 tokens per second of speech.
MAX_TOKENS_PER_S = 6.5
#: Audio shorter than this is not run (the encoder needs some frames; nothing is said in 0.1 s).
MIN_AUDIO_S = 0.1
#: Audio whose peak stays under this (about -60 dBFS) is silence and is not run.
SILENCE_PEAK = 1e-3
SPACE = "\u2581"  # SentencePiece's word-boundary marker "▁"
_PAST = re.compile(r"^past_key_values\.(\d+)\.(decoder|encoder)\.(key|value)$")


class BinTokenizer:
    """Decoder for Moonshine's ``tokenizer.bin``: token pieces in id order, each length-prefixed.

    A length byte ``n`` < 128 is the byte count; ``n`` >= 128 means a two-byte length
    ``second * 128 + n - 128``; 0 is an empty piece. Pieces use SentencePiece's ``▁`` for spaces;
    single-byte pieces (ids 3..258) are raw bytes (byte fallback for text outside the vocabulary).
    """

    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelFileError(f"tokenizer file {path} cannot be read: {exc.strerror}") from exc
        self.pieces: list[bytes] = self.parse(data, path.name)

    @staticmethod
    def parse(data: bytes, name: str = "tokenizer.bin") -> list[bytes]:
        """Split the file into its pieces; raises ``ModelFileError`` if a length runs past the end."""
        pieces: list[bytes] = []
        i, end = 0, len(data)
        while i < end:
            n = data[i]
            i += 1
            if n >= 128:
                if i >= end:
                    raise ModelFileError(f"{name} is truncated (length prefix at byte {i - 1})")
                n = data[i] * 128 + n - 128
                i += 1
            if i + n > end:
                raise ModelFileError(f"{name} is truncated (token {len(pieces)} runs past the end)")
            pieces.append(data[i:i + n])
            i += n
        if not pieces:
            raise ModelFileError(f"{name} holds no tokens")
        return pieces

    def __len__(self) -> int:
        return len(self.pieces)

    def decode(self, ids: Sequence[int], skip: Sequence[int] = (0, 1, 2)) -> str:
        """Join the pieces of ``ids`` into text: ``▁`` becomes a space, ``skip`` ids and ids out of range are
        dropped, invalid UTF-8 is replaced, outer whitespace is stripped."""
        skipped = set(skip)
        raw = b"".join(self.pieces[i] for i in ids if 0 <= i < len(self.pieces) and i not in skipped)
        return raw.decode("utf-8", errors="replace").replace(SPACE, " ").strip()


class MoonshineRecognizer:
    """``SpeechRecognizer`` on Moonshine's encoder + merged decoder; greedy decoding with a KV cache.

    ``transcribe`` returns '' for audio under ``MIN_AUDIO_S`` or with a peak under ``SILENCE_PEAK``
    without running the models. After each call ``last_compute_s`` holds the model time (0.0
    when nothing ran), ``last_audio_s`` the audio length and ``last_tokens`` the generated ids.
    """

    def __init__(
        self,
        encoder_path: Path | str,
        decoder_path: Path | str,
        tokenizer_path: Path | str,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
        bos_id: int = 1,
        eos_id: int = 2,
        max_tokens_per_s: float = MAX_TOKENS_PER_S,
    ) -> None:
        self.encoder = make_session(encoder_path, providers=providers, threads=threads)
        self.decoder = make_session(decoder_path, providers=providers, threads=threads)
        self.tokenizer = BinTokenizer(tokenizer_path)
        self.bos_id, self.eos_id = int(bos_id), int(eos_id)
        self.max_tokens_per_s = float(max_tokens_per_s)
        self._past: list[tuple[str, int, str, str, list]] = []
        for arg in self.decoder.get_inputs():
            m = _PAST.match(arg.name)
            if m:
                self._past.append((arg.name, int(m.group(1)), m.group(2), m.group(3), list(arg.shape)))
        names = {a.name for a in self.decoder.get_inputs()}
        need = {"input_ids", "encoder_hidden_states", "use_cache_branch"}
        if not need <= names or not self._past:
            raise ModelFileError(
                f"{Path(decoder_path).name} is not a merged Moonshine decoder (inputs: {sorted(names)[:6]}...)"
            )
        outputs = [o.name for o in self.decoder.get_outputs()]
        if outputs[0] != "logits":
            raise ModelFileError(f"{Path(decoder_path).name}: first output is {outputs[0]!r}, expected 'logits'")
        self._outputs = outputs
        # present.L.kind.which -> the past input it feeds
        self._present_to_past = {
            o: o.replace("present.", "past_key_values.", 1) for o in outputs[1:] if o.startswith("present.")
        }
        self.last_compute_s = 0.0
        self.last_audio_s = 0.0
        self.last_tokens: list[int] = []

    def max_new_tokens(self, samples: int) -> int:
        """The token budget for ``samples`` of 16 kHz audio: ``ceil(seconds * max_tokens_per_s)``, at least 1."""
        return max(1, int(np.ceil(samples / SAMPLE_RATE * self.max_tokens_per_s)))

    def _empty_past(self) -> dict[str, np.ndarray]:
        past = {}
        for name, _layer, _kind, _which, shape in self._past:
            heads = shape[1] if isinstance(shape[1], int) else 8
            dim = shape[3] if isinstance(shape[3], int) else 64
            past[name] = np.zeros((1, heads, 0, dim), dtype=np.float32)
        return past

    def generate(self, audio: np.ndarray) -> list[int]:
        """Greedy token ids for float32 16 kHz mono ``audio`` (without BOS, without EOS); at most
        ``max_new_tokens(len(audio))`` ids."""
        x = np.ascontiguousarray(audio, dtype=np.float32).reshape(1, -1)
        hidden = self.encoder.run(None, {"input_values": x})[0]
        past = self._empty_past()
        token = self.bos_id
        tokens: list[int] = []
        for step in range(self.max_new_tokens(x.shape[1])):
            feeds = {
                "input_ids": np.array([[token]], dtype=np.int64),
                "encoder_hidden_states": hidden,
                "use_cache_branch": np.array([step > 0]),
                **past,
            }
            logits, *presents = self.decoder.run(self._outputs, feeds)
            token = int(np.argmax(logits[0, -1]))
            if token == self.eos_id:
                break
            tokens.append(token)
            for out_name, value in zip(self._outputs[1:], presents):
                past_name = self._present_to_past.get(out_name)
                # the cross-attention cache is computed once (first step) and kept
                if past_name is not None and (step == 0 or ".decoder." in past_name):
                    past[past_name] = value
        return tokens

    def transcribe(self, audio: np.ndarray) -> str:
        """Return the English text spoken in ``audio`` (float32 mono 16 kHz); '' for silence or under 0.1 s."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        self.last_audio_s = len(audio) / SAMPLE_RATE
        self.last_compute_s = 0.0
        self.last_tokens = []
        if len(audio) < MIN_AUDIO_S * SAMPLE_RATE or float(np.max(np.abs(audio))) < SILENCE_PEAK:
            return ""
        t0 = time.perf_counter()
        self.last_tokens = self.generate(audio)
        text = self.tokenizer.decode(self.last_tokens, skip=(0, self.bos_id, self.eos_id))
        self.last_compute_s = time.perf_counter() - t0
        return text


def load_asr(spec: StageSpec, root: Path, providers: Sequence[str], threads: int | None) -> MoonshineRecognizer:
    """Build a ``MoonshineRecognizer`` from a bundle stage of kind ``moonshine`` (files by role
    ``encoder``, ``decoder``, ``tokenizer``, relative to the bundle ``root``; ``bos_id``, ``eos_id``,
    ``max_tokens_per_s`` from its config when present)."""
    root = Path(root)
    cfg = spec.config
    return MoonshineRecognizer(
        root / spec.file("encoder").path,
        root / spec.file("decoder").path,
        root / spec.file("tokenizer").path,
        providers=providers,
        threads=threads,
        bos_id=int(cfg.get("bos_id", 1)),
        eos_id=int(cfg.get("eos_id", 2)),
        max_tokens_per_s=float(cfg.get("max_tokens_per_s", MAX_TOKENS_PER_S)),
    )
