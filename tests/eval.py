"""The ASR evaluation set and word error rate (WER), shared by the ASR tests and the export gates.

- ``load_eval_set()`` reads ``tests/data/eval_set.toml`` (spoken requests + reference text);
- ``normalize()`` makes transcripts comparable: lowercase, no punctuation, digits read as words
  ("10" -> "ten", "7:30" -> "seven thirty", "20%" -> "twenty percent");
- ``wer()``/``corpus_wer()`` count word substitutions, insertions and deletions (Levenshtein on words);
- ``evaluate()`` runs any ``transcribe(audio) -> str`` over the set in one condition and returns the WER;
- ``synthesize()`` speaks an utterance with espeak-ng in a given voice and speed, optionally with
  noise at an SNR and room reverb, padded with silence like a VAD-cut segment.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from tests.speech import add_noise, add_reverb, espeak, silence

EVAL_SET = Path(__file__).parent / "data" / "eval_set.toml"

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred"))


@dataclass(frozen=True)
class Utterance:
    """One entry of the evaluation set: ``text`` is both what is spoken and the reference."""

    id: str
    text: str
    tags: tuple[str, ...] = ()


def load_eval_set(path: Path = EVAL_SET, tags: Sequence[str] = ()) -> list[Utterance]:
    """Every utterance of the set in file order; with ``tags``, only those carrying one of them."""
    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    items = [Utterance(u["id"], u["text"], tuple(u.get("tags", ()))) for u in data["utterance"]]
    if tags:
        items = [u for u in items if set(tags) & set(u.tags)]
    return items


def number_words(n: int) -> str:
    """Cardinal ``n`` >= 0 in English words, without "and": 144 -> "one hundred forty four"."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")
    for value, name in _SCALES:
        if n >= value:
            high, rest = divmod(n, value)
            return f"{number_words(high)} {name}" + (f" {number_words(rest)}" if rest else "")
    raise AssertionError("unreachable")


def _spell_numbers(text: str) -> str:
    def clock(m: re.Match) -> str:
        hour, minute = int(m.group(1)), int(m.group(2))
        if minute == 0:
            return f" {number_words(hour)} o'clock "
        if minute < 10:
            return f" {number_words(hour)} oh {number_words(minute)} "
        return f" {number_words(hour)} {number_words(minute)} "

    def decimal(m: re.Match) -> str:
        return f" {number_words(int(m.group(1)))} point " + " ".join(_ONES[int(d)] for d in m.group(2)) + " "

    text = re.sub(r"\b(\d{1,2}):(\d{2})\b", clock, text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    text = re.sub(r"\b(\d+)\.(\d+)\b", decimal, text)
    text = re.sub(r"\d+", lambda m: f" {number_words(int(m.group()))} ", text)
    return text


def normalize(text: str) -> list[str]:
    """The words of ``text`` for scoring: lowercase, digits as words, '%' as "percent", '&' as "and",
    hyphens as spaces, apostrophes and all other punctuation removed."""
    text = text.lower().replace("%", " percent ").replace("&", " and ")
    text = _spell_numbers(text)
    text = text.replace("'", "").replace("\u2019", "")
    text = re.sub(r"[^a-z0-9\s]", " ", text)
    return text.split()


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Minimum number of word substitutions + deletions + insertions turning ``ref`` into ``hyp``."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate of one hypothesis after ``normalize``: edits / reference words (may exceed 1)."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    return edit_distance(ref, hyp) / len(ref)


def corpus_wer(pairs: Iterable[tuple[str, str]]) -> float:
    """WER over many (reference, hypothesis) pairs: total edits / total reference words."""
    edits = words = 0
    for reference, hypothesis in pairs:
        ref = normalize(reference)
        edits += edit_distance(ref, normalize(hypothesis))
        words += len(ref)
    return edits / words if words else 0.0


def synthesize(
    utterance: Utterance | str,
    voice: str = "en-us",
    speed: int = 150,
    *,
    snr_db: float | None = None,
    reverb_rt60_s: float | None = None,
    pad_s: float = 0.25,
    seed: int = 0,
) -> np.ndarray:
    """Speak an utterance (or plain text) with espeak-ng: float32 mono 16 kHz, with ``pad_s`` of
    silence before and after, then optional reverb and white noise at ``snr_db`` (relative to the
    speech, over the whole clip). Deterministic for a given ``seed``."""
    text = utterance.text if isinstance(utterance, Utterance) else utterance
    audio = np.concatenate([silence(pad_s), espeak(text, voice=voice, speed=speed), silence(pad_s)])
    if reverb_rt60_s:
        audio = add_reverb(audio, reverb_rt60_s, seed=seed)
    if snr_db is not None:
        # add_noise measures SNR against the RMS of the whole clip; refer it to the active speech
        # (samples above -80 dBFS) so padding and pauses do not make the noise quieter
        active = audio[np.abs(audio) > 1e-4]
        speech_rms = float(np.sqrt(np.mean(active**2))) if active.size else 0.0
        clip_rms = float(np.sqrt(np.mean(audio**2)) + 1e-12)
        if speech_rms > 0:
            audio = add_noise(audio, snr_db + 20 * np.log10(clip_rms / speech_rms), seed=seed)
    return audio.astype(np.float32)


@dataclass(frozen=True)
class EvalResult:
    """The outcome of ``evaluate``: corpus WER, (reference, hypothesis) pairs, audio and compute seconds."""

    wer: float
    pairs: tuple[tuple[str, str], ...]
    audio_s: float
    compute_s: float

    @property
    def rtf(self) -> float:
        return self.compute_s / self.audio_s if self.audio_s else 0.0


def evaluate(
    transcribe: Callable[[np.ndarray], str],
    utterances: Sequence[Utterance] | None = None,
    **condition,
) -> EvalResult:
    """Synthesize each utterance (``condition`` = ``synthesize`` keyword arguments: voice, speed,
    snr_db, reverb_rt60_s, seed), transcribe it, and return the corpus WER with wall-clock compute."""
    import time

    utterances = load_eval_set() if utterances is None else utterances
    pairs, audio_s, compute_s = [], 0.0, 0.0
    for utt in utterances:
        audio = synthesize(utt, **condition)
        t0 = time.perf_counter()
        hyp = transcribe(audio)
        compute_s += time.perf_counter() - t0
        audio_s += len(audio) / 16000
        pairs.append((utt.text, hyp))
    return EvalResult(corpus_wer(pairs), tuple(pairs), audio_s, compute_s)


#: The conditions the figures in the reports are measured in.
CONDITIONS: dict[str, dict] = {
    "en-us": {"voice": "en-us"},
    "en-us+f3": {"voice": "en-us+f3"},
    "en-us+m7": {"voice": "en-us+m7"},
    "en-gb s175": {"voice": "en-gb", "speed": 175},
    "en-us 20dB": {"voice": "en-us", "snr_db": 20.0},
    "en-us rt60 0.3s": {"voice": "en-us", "reverb_rt60_s": 0.3},
}


def main() -> None:
    """``python -m tests.eval [CONDITION...]``: WER and RTF of the fetched Moonshine model on the whole set."""
    import sys

    from edge.stages.moonshine import MoonshineRecognizer
    from export.fetch import model_file

    asr = MoonshineRecognizer(*(model_file("moonshine-base-en", role) for role in ("encoder", "decoder", "tokenizer")),
                              threads=2)
    for name in sys.argv[1:] or list(CONDITIONS):
        res = evaluate(asr.transcribe, **CONDITIONS[name])
        print(f"{name:18s} WER {res.wer:6.3f}  RTF {res.rtf:.3f}  ({len(res.pairs)} utterances)")
        for ref, hyp in res.pairs:
            if wer(ref, hyp) > 0:
                print(f"    {ref!r} -> {hyp!r}")


if __name__ == "__main__":
    main()
