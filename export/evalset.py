"""The ASR evaluation set and word error rate (WER) for the export gates.

``export`` must not import ``tests``; this module holds the same scoring the ASR tests use
(``tests/eval.py``): ``load_eval_set()`` reads ``tests/data/eval_set.toml`` (spoken requests +
reference text), ``normalize()`` lowercases, strips punctuation and reads digits as words,
``wer()``/``corpus_wer()`` count word substitutions, insertions and deletions.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from edge.boards import REPO_ROOT

EVAL_SET = REPO_ROOT / "tests" / "data" / "eval_set.toml"

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
