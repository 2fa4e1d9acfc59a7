"""Whisper (tiny.en) speech recognition on ONNX Runtime with numpy features and greedy KV-cache decoding.

Files of a ``whisper`` stage (roles): ``encoder`` (``input_features`` [B, 80, 3000] -> ``last_hidden_state``
[B, 1500, D]), ``decoder`` (optimum's merged decoder: ``input_ids``, ``encoder_hidden_states``,
``past_key_values.{L}.{decoder,encoder}.{key,value}``, ``use_cache_branch`` -> ``logits`` + ``present.*``),
``tokenizer`` (``tokenizer.json`` for ``tokenizers``), ``mel_filters`` (``.npy`` [201, 80] float32).

What Whisper needs and this module does, with numpy only:
- features: the first 30 s of audio, STFT (400-sample periodic Hann, hop 160, reflect padding), power
  spectrum, slaney mel filters, ``log10`` clamped at 1e-10, floored 8 below the maximum, ``(x + 4) / 4``;
  the audio's frames are followed by zeros up to 3000 frames, as Whisper's transcribe loop and
  faster-whisper pad the features of a short segment (see ``log_mel``);
- decoding: prompt ``<|startoftranscript|> <|notimestamps|>`` (English-only model: no language/task
  tokens), greedy argmax with the suppressed tokens at every step, the "begin" ones (blank, EOT) at the
  first step, every timestamp token suppressed; stops at EOT or at the token budget (bounded both by the
  config's ``max_tokens`` and in proportion to the audio length), so a decode always ends.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edge.audio import SAMPLE_RATE
from edge.bundle import StageSpec
from edge.errors import ModelFileError

N_FFT = 400
HOP = 160
CHUNK_S = 30
N_SAMPLES = CHUNK_S * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP  # 3000
#: audio shorter than this is not run; audio whose peak stays under SILENCE_PEAK (about -60 dBFS) neither
MIN_AUDIO_S = 0.1
SILENCE_PEAK = 1e-3
#: default token budget: Whisper's own sample length (half the 448-token text context)
MAX_TOKENS = 224
#: and per second of audio (speech runs at 3-5 tokens/s; loops of repeated text are cut short)
MAX_TOKENS_PER_S = 8.0
_PAST = re.compile(r"^past_key_values\.(\d+)\.(decoder|encoder)\.(key|value)$")


# ---------------------------------------------------------------------------------------- features


def mel_filters(n_mels: int = 80, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-scale, slaney-normalized triangular mel filters from 0 Hz to ``sample_rate / 2``:
    [n_fft // 2 + 1, n_mels] float32 (the bank Whisper's reference code and transformers use)."""
    f_sp = 200.0 / 3
    min_log_hz, logstep = 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp

    def hz_to_mel(f: float) -> float:
        return f / f_sp if f < min_log_hz else min_log_mel + np.log(f / min_log_hz) / logstep

    mels = np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2)
    freqs = f_sp * mels
    log_region = mels >= min_log_mel
    freqs[log_region] = min_log_hz * np.exp(logstep * (mels[log_region] - min_log_mel))
    fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    fdiff = np.diff(freqs)
    ramps = freqs[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (freqs[2:n_mels + 2] - freqs[:n_mels]))[:, None]
    return weights.T.astype(np.float32)


def log_mel(audio: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Whisper's log-mel features of ``audio`` (float32 16 kHz mono; only its first 30 s are used) as
    Whisper's own transcribe loop (and faster-whisper) makes them: [n_mels, 3000] float32.

    The audio gets ``HOP`` zero samples appended, the power spectrogram goes through the mel ``filters``
    ([201, n_mels]), ``log10`` is clamped at 1e-10 and floored 8 below its maximum over the audio's own
    frames, scaled as ``(x + 4) / 4``; the ``len(audio) // 160`` frames of the audio are kept and the rest of
    the 30 s window is zeros in feature space (not the features of silence)."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)[:N_SAMPLES]
    content = len(audio) // HOP
    out = np.zeros((N_FRAMES, filters.shape[1]), dtype=np.float32)
    if content == 0:
        return out.T.copy()
    x = np.pad(audio.astype(np.float64), (0, max(HOP, N_FFT - len(audio))))
    x = np.pad(x, N_FFT // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP][:content]
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # [content, 201]
    logs = np.log10(np.maximum(power @ np.asarray(filters, dtype=np.float64), 1e-10))
    out[:content] = (np.maximum(logs, logs.max() - 8.0) + 4.0) / 4.0
    return out.T.copy()


# ---------------------------------------------------------------------------------------- decoding rules


@dataclass(frozen=True)
class DecodeRules:
    """Token ids and limits of greedy Whisper decoding (from the bundle config)."""

    sot: int
    eot: int
    no_timestamps: int
    prompt: tuple[int, ...]  # e.g. (sot, no_timestamps)
    suppress: tuple[int, ...] = ()  # at every step
    suppress_begin: tuple[int, ...] = ()  # at the first generated token only
    max_tokens: int = MAX_TOKENS
    max_tokens_per_s: float = MAX_TOKENS_PER_S
    _mask: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: dict) -> "DecodeRules":
        """Read ``sot``, ``eot``, ``no_timestamps``, ``prompt``, ``suppress``, ``suppress_begin``,
        ``max_tokens``, ``max_tokens_per_s`` from a stage config; ids are required, the rest has defaults."""
        try:
            sot, eot, nots = int(cfg["sot"]), int(cfg["eot"]), int(cfg["no_timestamps"])
        except KeyError as exc:
            raise ModelFileError(f"whisper stage config lacks the token id {exc.args[0]!r}") from exc
        return cls(
            sot=sot, eot=eot, no_timestamps=nots,
            prompt=tuple(int(t) for t in cfg.get("prompt", (sot, nots))),
            suppress=tuple(int(t) for t in cfg.get("suppress", ())),
            suppress_begin=tuple(int(t) for t in cfg.get("suppress_begin", ())),
            max_tokens=int(cfg.get("max_tokens", MAX_TOKENS)),
            max_tokens_per_s=float(cfg.get("max_tokens_per_s", MAX_TOKENS_PER_S)),
        )

    def budget(self, samples: int) -> int:
        """New-token budget for ``samples`` of 16 kHz audio: ``min(max_tokens, 10 + seconds * per_s)``."""
        seconds = min(samples, N_SAMPLES) / SAMPLE_RATE
        return max(1, min(self.max_tokens, 10 + int(np.ceil(seconds * self.max_tokens_per_s))))

    def mask(self, vocab: int, first: bool) -> np.ndarray:
        """Boolean [vocab]: True where a token may not be chosen (suppressed ids, every id from
        ``no_timestamps`` on, i.e. the timestamps; plus the begin set on the ``first`` step)."""
        key = (vocab, first)
        if key not in self._mask:
            m = np.zeros(vocab, dtype=bool)
            ids = [t for t in self.suppress + (self.suppress_begin if first else ()) if 0 <= t < vocab]
            m[ids] = True
            m[self.no_timestamps:] = True
            self._mask[key] = m
        return self._mask[key]

    def pick(self, logits: np.ndarray, first: bool) -> int:
        """Greedy choice over one row of ``logits`` after suppression."""
        row = np.where(self.mask(logits.shape[-1], first), -np.inf, logits.astype(np.float32))
        return int(np.argmax(row))


def greedy_decode(step: Callable[[list[int], int], np.ndarray], rules: DecodeRules, samples: int) -> list[int]:
    """Generic greedy loop: ``step(new_ids, position)`` returns the logits row after feeding ``new_ids``
    (the whole prompt first, then one id at a time). Returns the generated ids without prompt and EOT."""
    tokens: list[int] = []
    feed = list(rules.prompt)
    for i in range(rules.budget(samples)):
        token = rules.pick(step(feed, i), first=(i == 0))
        if token == rules.eot:
            break
        tokens.append(token)
        feed = [token]
    return tokens


class WhisperTokenizer:
    """Decoding of Whisper ids with the ``tokenizers`` library (byte-level BPE of ``tokenizer.json``)."""

    def __init__(self, path: Path | str) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exceptions
            raise ModelFileError(f"tokenizer {path.name} cannot be loaded: {str(exc).splitlines()[0]}") from exc

    def token_id(self, token: str) -> int:
        """Id of a (special) token; raises ``ModelFileError`` if the vocabulary lacks it."""
        tid = self.tok.token_to_id(token)
        if tid is None:
            raise ModelFileError(f"the Whisper tokenizer has no token {token!r}")
        return int(tid)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens, outer whitespace stripped."""
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------- recognizer


class WhisperRecognizer:
    """``SpeechRecognizer`` on a Whisper encoder + merged decoder (ONNX), greedy with a KV cache.

    ``transcribe`` returns '' for audio under ``MIN_AUDIO_S`` or with a peak under ``SILENCE_PEAK`` without
    running the models; audio over 30 s is cut to its first 30 s (one Whisper window). After each call
    ``last_compute_s`` holds the time spent (features + models; 0.0 when nothing ran), ``last_audio_s`` the
    audio length and ``last_tokens`` the generated ids.
    """

    def __init__(
        self,
        encoder_path: Path | str,
        decoder_path: Path | str,
        tokenizer_path: Path | str,
        mel_filters_path: Path | str | None,
        rules: DecodeRules,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
    ) -> None:
        from edge.onnx import make_session

        self.encoder = make_session(encoder_path, providers=providers, threads=threads)
        self.decoder = make_session(decoder_path, providers=providers, threads=threads)
        self.tokenizer = WhisperTokenizer(tokenizer_path)
        self.rules = rules
        n_mels = int(self.encoder.get_inputs()[0].shape[1] or 80)
        if mel_filters_path is not None:
            try:
                self.filters = np.load(str(mel_filters_path)).astype(np.float32)
            except (OSError, ValueError) as exc:
                raise ModelFileError(f"mel filter file {Path(mel_filters_path).name} cannot be read: {exc}") from exc
        else:
            self.filters = mel_filters(n_mels)
        if self.filters.shape != (N_FFT // 2 + 1, n_mels):
            raise ModelFileError(f"mel filters have shape {self.filters.shape}, the encoder needs "
                                 f"{(N_FFT // 2 + 1, n_mels)}")
        names = {a.name for a in self.decoder.get_inputs()}
        self._past = []
        for arg in self.decoder.get_inputs():
            m = _PAST.match(arg.name)
            if m:
                self._past.append((arg.name, list(arg.shape)))
        if not {"input_ids", "encoder_hidden_states", "use_cache_branch"} <= names or not self._past:
            raise ModelFileError(f"{Path(decoder_path).name} is not a merged Whisper decoder with a KV cache "
                                 f"(inputs: {sorted(names)[:5]}...)")
        self._outputs = [o.name for o in self.decoder.get_outputs()]
        if self._outputs[0] != "logits":
            raise ModelFileError(f"{Path(decoder_path).name}: first output is {self._outputs[0]!r}, expected 'logits'")
        self._present_to_past = {o: o.replace("present.", "past_key_values.", 1)
                                 for o in self._outputs[1:] if o.startswith("present.")}
        self.last_compute_s = 0.0
        self.last_audio_s = 0.0
        self.last_tokens: list[int] = []

    def features(self, audio: np.ndarray) -> np.ndarray:
        """[1, n_mels, 3000] log-mel features of ``audio``."""
        return log_mel(audio, self.filters)[None]

    def _empty_past(self, hidden: np.ndarray) -> dict[str, np.ndarray]:
        past = {}
        for name, shape in self._past:
            heads = shape[1] if isinstance(shape[1], int) else 6
            dim = shape[3] if isinstance(shape[3], int) else hidden.shape[-1] // heads
            past[name] = np.zeros((1, heads, 0, dim), dtype=np.float32)
        return past

    def generate(self, audio: np.ndarray) -> list[int]:
        """Greedy ids for float32 16 kHz ``audio`` (no prompt, no EOT), at most ``rules.budget`` of them."""
        hidden = self.encoder.run(None, {"input_features": self.features(audio)})[0]
        past = self._empty_past(hidden)

        def step(ids: list[int], i: int) -> np.ndarray:
            feeds = {"input_ids": np.array([ids], dtype=np.int64), "encoder_hidden_states": hidden,
                     "use_cache_branch": np.array([i > 0]), **past}
            logits, *presents = self.decoder.run(self._outputs, feeds)
            for out_name, value in zip(self._outputs[1:], presents):
                past_name = self._present_to_past.get(out_name)
                # the cross-attention cache is computed on the first step and kept
                if past_name is not None and (i == 0 or ".decoder." in past_name):
                    past[past_name] = value
            return logits[0, -1]

        return greedy_decode(step, self.rules, len(np.asarray(audio).reshape(-1)))

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
        text = self.tokenizer.decode(self.last_tokens)
        self.last_compute_s = time.perf_counter() - t0
        return text


def load_asr(spec: StageSpec, root: Path, providers: Sequence[str], threads: int | None) -> WhisperRecognizer:
    """Build a ``WhisperRecognizer`` from a bundle stage of kind ``whisper``: files by role ``encoder``,
    ``decoder``, ``tokenizer`` and ``mel_filters`` (optional: computed when absent) relative to ``root``;
    token ids and limits from the stage config (see ``DecodeRules.from_config``)."""
    root = Path(root)
    roles = spec.config.get("files", {})
    mel = root / spec.file("mel_filters").path if "mel_filters" in roles else None
    return WhisperRecognizer(
        root / spec.file("encoder").path,
        root / spec.file("decoder").path,
        root / spec.file("tokenizer").path,
        mel,
        DecodeRules.from_config(spec.config),
        providers=providers,
        threads=threads,
    )
