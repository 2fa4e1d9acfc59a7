"""English text -> Kokoro phoneme symbols, through espeak-ng run as a separate program.

espeak-ng (GPL-3) is never linked: it runs as a child process, ``espeak-ng -q --ipa --tie=^``,
which prints IPA with multi-letter phonemes tied by ``^`` (``a^ɪ``, ``t^ʃ``), so diphthongs and
affricates map to Kokoro's single symbols without guessing. One long-lived process serves all
calls (2-3 ms a clause here, against ~11 ms for starting a process each time); it reads one
line at a time, and a sentinel line after each request marks where its answer ends.

espeak-ng drops punctuation from its IPA, so the text is first cut at clause punctuation; each
piece is phonemized and its punctuation (those marks Kokoro's vocabulary has) put back: the
punctuation is what gives Kokoro its pauses and intonation. Numbers, abbreviations and symbols
("3.5", "p.m.", "$5") are left to espeak-ng, which reads them.

The IPA -> Kokoro mapping follows what Kokoro v1.0 was trained with for American English (the
espeak fallback of its G2P, ``misaki``): a^ɪ→I, e^ɪ→A, o^ʊ→O, a^ʊ→W, ɔ^ɪ→Y, t^ʃ→ʧ, d^ʒ→ʤ, r→ɹ,
ɚ→əɹ, ɐ→ə, syllabic l→ᵊl, glottal stop→t, length marks dropped; stress marks ˈˌ kept.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import select
import shutil
import subprocess
import threading
import time
import weakref
from typing import Mapping

from edge.errors import SottovoceError
from edge.text import abbreviation_kind, word_before

log = logging.getLogger("sottovoce.phonemes")

ESPEAK = "espeak-ng"
TIE = "^"
#: Marks the end of one answer of the long-lived espeak-ng process: phoneme input (``[[...]]``)
#: whose IPA, "x ŋ x ŋ x", no English text can produce; brackets are removed from the text sent,
#: so text cannot inject phoneme input either.
SENTINEL = "[[x N x N x]]"
READ_TIMEOUT_S = 5.0
_BATCH_BYTES = 4096

# Ordered: longer keys first, so "e^ɪ" is replaced before "e".
_IPA_TO_KOKORO: tuple[tuple[str, str], ...] = tuple(sorted({
    "ʔˌn\u0329": "tᵊn", "ʔn\u0329": "tᵊn", "ʔn": "tᵊn", "ʔ": "t",
    "a^ɪ": "I", "a^ʊ": "W", "e^ɪ": "A", "o^ʊ": "O", "ɔ^ɪ": "Y",
    "t^ʃ": "ʧ", "d^ʒ": "ʤ", "ə^l": "ᵊl",
    "e": "A", "r": "ɹ", "x": "k", "ç": "k", "ɐ": "ə", "ɚ": "əɹ", "ɬ": "l", "ʲ": "",
    "ɜːɹ": "ɜɹ", "ɜː": "ɜɹ", "ɪə": "iə", "ː": "",
}.items(), key=lambda kv: -len(kv[0])))
_SYLLABIC = re.compile("(\\S)\u0329")
#: The pronoun "I" ("a^ɪ", "a^ɪm", "a^ɪɐm" for "I am") as espeak-ng writes it: a word that starts
#: with a^ɪ and has no stress mark. Kokoro all but swallows it unstressed ("I set a timer" came back
#: from the ASR as "Set a timer" with every voice), so it gets secondary stress.
_UNSTRESSED_I = re.compile("(?<!\\S)(a\\^ɪ[^\\sˈˌ]*)(?!\\S)")

#: Punctuation that separates the pieces handed to espeak-ng (and is put back into the phonemes).
CLAUSE_PUNCT = ",;:!?.…—()\"“”"
_OPENERS = "(\"“"


_CURRENCY = re.compile(r"([$€£])\s?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")
#: sign -> (unit, units, hundredth, hundredths)
_CURRENCY_NAMES = {"$": ("dollar", "dollars", "cent", "cents"), "€": ("euro", "euros", "cent", "cents"),
                   "£": ("pound", "pounds", "penny", "pence")}


def spell_currency(text: str) -> str:
    """Move a currency sign after its amount as words: "$5" -> "5 dollars", "£1" -> "1 pound",
    "$19.99" -> "19 dollars 99 cents", "$0.50" -> "50 cents", "$2.00" -> "2 dollars" (espeak-ng
    would read "$5" as "dollar five" and "$19.99" as "nineteen point nine nine"). Amounts with
    other than two decimals keep their decimals ("$2.5" -> "2.5 dollars")."""

    def word(m: re.Match[str]) -> str:
        unit, units, sub, subs = _CURRENCY_NAMES[m.group(1)]
        whole, _, frac = m.group(2).partition(".")
        if len(frac) != 2:
            return f"{m.group(2)} {unit if m.group(2) == '1' else units}"
        spoken = []
        if whole.replace(",", "").strip("0") or not frac.strip("0"):
            spoken.append(f"{whole} {unit if whole == '1' else units}")
        if frac.strip("0"):
            cents = str(int(frac))
            spoken.append(f"{cents} {sub if cents == '1' else subs}")
        return " ".join(spoken)

    return _CURRENCY.sub(word, text)


class PhonemizerError(SottovoceError):
    """espeak-ng is missing, died, or did not answer."""

    code = "tts.phonemizer"


def have_espeak() -> bool:
    """True when the ``espeak-ng`` program is on PATH."""
    return shutil.which(ESPEAK) is not None


def ipa_to_kokoro(ipa: str) -> str:
    """Map espeak-ng IPA (``--ipa --tie=^``, American English) to Kokoro's symbols.

    The pronoun "I" gets secondary stress (see ``_UNSTRESSED_I``). The result may still hold
    symbols outside a given vocabulary; ``Phonemizer`` filters those.
    """
    out = _UNSTRESSED_I.sub("ˌ\\1", ipa)
    for old, new in _IPA_TO_KOKORO:
        out = out.replace(old, new)
    out = _SYLLABIC.sub("ᵊ\\1", out).replace("\u0329", "")
    return out.replace(TIE, "")


def split_clause_punctuation(text: str) -> list[tuple[str, str, str]]:
    """Cut ``text`` into ``(opening, words, closing)`` pieces at clause punctuation.

    A mark counts only where it separates words: closing marks at the end of the text or before
    whitespace, opening quotes/brackets after whitespace or at the start. So "3.5", "1,000",
    "3:30" stay whole, and a period after an abbreviation ("Dr.", "e.g.", "p.m.") is not a break
    unless the text ends there. ``words`` keeps its own characters (espeak-ng reads "p.m." better
    with its dots); ``opening``/``closing`` hold the marks around it, in order ("..." as "…").
    """
    pieces: list[tuple[str, str, str]] = []
    n = len(text)
    start = 0
    opening = ""
    i = 0
    while i < n:
        if text[i] not in CLAUSE_PUNCT:
            i += 1
            continue
        j = i
        while j < n and text[j] in CLAUSE_PUNCT:
            j += 1
        run = text[i:j]
        before_ok = i == 0 or text[i - 1].isspace()
        after_ok = j == n or text[j].isspace()
        if before_ok and not after_ok and all(c in _OPENERS for c in run):
            words = text[start:i].strip()
            if words or opening:
                pieces.append((opening, words, ""))
            opening, start = run, j
        elif after_ok:
            abbreviation = run[0] == "." and abbreviation_kind(word_before(text, i) + ".") is not None
            if abbreviation and j < n:
                pass  # "Dr. Smith", "e.g. this", "3 p.m. today": not a break
            else:
                words = text[start:i].strip() + ("." if abbreviation else "")
                pieces.append((opening, words, run.replace("...", "…")))
                opening, start = "", j
        i = j
    tail = text[start:].strip()
    if tail or opening:
        pieces.append((opening, tail, ""))
    return pieces


class EspeakIPA:
    """espeak-ng as a child process that turns lines of text into IPA.

    With ``persistent`` (and ``stdbuf`` available for line-buffered output) one process serves
    every call; otherwise each call starts one. Thread-safe. ``close()`` ends the process.
    """

    def __init__(self, voice: str = "en-us", *, persistent: bool = True) -> None:
        if not have_espeak():
            raise PhonemizerError("espeak-ng is not installed (apt-get install espeak-ng); the TTS needs it")
        self.voice = voice
        self._args = [ESPEAK, "-q", "-b", "1", "--ipa", f"--tie={TIE}", "-v", voice]
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pending = b""
        self._sentinel_ipa = ""
        self.persistent = persistent and shutil.which("stdbuf") is not None
        self._finalizer: weakref.finalize | None = None

    # ------------------------------------------------------------------ public

    def ipa(self, text: str) -> str:
        """The IPA of ``text`` (one line; espeak's clause breaks joined by spaces); '' for no words."""
        return self.ipa_many([text])[0]

    def ipa_many(self, texts: list[str]) -> list[str]:
        """The IPA of each of ``texts``, in one exchange with the process when they are short."""
        lines = [" ".join(t.replace("[", " ").replace("]", " ").split()) for t in texts]
        todo = [line for line in lines if line]
        if not todo:
            return ["" for _ in lines]
        with self._lock:
            if not self.persistent:
                answers = [self._one_shot(line) for line in todo]
            else:
                for attempt in (1, 2):
                    try:
                        answers = self._ask(todo)
                        break
                    except PhonemizerError:
                        self._stop()
                        if attempt == 2:
                            raise
        it = iter(answers)
        return [next(it) if line else "" for line in lines]

    def close(self) -> None:
        """End the espeak-ng process (a later call starts a new one)."""
        with self._lock:
            self._stop()

    # ------------------------------------------------------------------ internals

    def _one_shot(self, line: str) -> str:
        try:
            done = subprocess.run(self._args + ["--stdin"], input=line.encode(), capture_output=True,
                                  timeout=READ_TIMEOUT_S, check=True)
        except (subprocess.SubprocessError, OSError) as exc:
            raise PhonemizerError(f"espeak-ng failed on {line[:40]!r}: {exc}") from exc
        return " ".join(part.strip() for part in done.stdout.decode("utf-8", "replace").splitlines() if part.strip())

    def _start(self) -> None:
        try:
            proc = subprocess.Popen(["stdbuf", "-oL"] + self._args, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        except OSError as exc:
            raise PhonemizerError(f"cannot start espeak-ng: {exc}") from exc
        self._proc = proc
        self._pending = b""
        self._finalizer = weakref.finalize(self, _terminate, proc)
        self._write(SENTINEL)
        first = self._read_line()
        if not first:
            raise PhonemizerError("espeak-ng gave no IPA for its sentinel word")
        self._sentinel_ipa = first

    def _stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._proc = None
        self._finalizer = None

    def _write(self, line: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write((line + "\n").encode("utf-8"))
        except OSError as exc:
            raise PhonemizerError(f"espeak-ng stopped accepting text: {exc}") from exc

    def _read_line(self) -> str:
        """Next non-empty output line, or raise after ``READ_TIMEOUT_S``."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + READ_TIMEOUT_S
        while True:
            while b"\n" in self._pending:
                raw, self._pending = self._pending.split(b"\n", 1)
                line = raw.decode("utf-8", "replace").strip()
                if line:
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise PhonemizerError("espeak-ng did not answer in time")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise PhonemizerError("espeak-ng exited")
            self._pending += chunk

    def _ask(self, lines: list[str]) -> list[str]:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        # Written in one go when small (far below the pipe buffers, so espeak-ng never blocks on
        # output we have not read yet); otherwise line by line.
        batch = sum(len(line.encode()) for line in lines) < _BATCH_BYTES
        if batch:
            self._write("\n".join(f"{line}\n{SENTINEL}" for line in lines))
        answers = []
        for line in lines:
            if not batch:
                self._write(f"{line}\n{SENTINEL}")
            parts = []
            while (got := self._read_line()) != self._sentinel_ipa:
                parts.append(got)
            answers.append(" ".join(parts))
        return answers


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    try:
        if proc.stdin:
            proc.stdin.close()
        proc.terminate()
        proc.wait(timeout=2)
    except (OSError, subprocess.SubprocessError):
        proc.kill()


class Phonemizer:
    """English text -> a string of Kokoro symbols, all of them in ``vocab``.

    ``phonemize`` returns e.g. ``"ðə kˈæpɪɾᵊl ʌv fɹˈæns ɪz pˈæɹɪs."``; ``ids`` turns such a string
    into vocabulary ids. Symbols the vocabulary lacks are dropped and counted in ``unknown``
    (logged at debug level).
    """

    def __init__(self, vocab: Mapping[str, int], voice: str = "en-us", *, persistent: bool = True) -> None:
        self.vocab = dict(vocab)
        self.espeak = EspeakIPA(voice, persistent=persistent)
        self.unknown: collections.Counter[str] = collections.Counter()

    def phonemize(self, text: str) -> str:
        """Kokoro symbols for ``text``: words via espeak-ng, clause punctuation kept; '' for no words."""
        out: list[str] = []
        pieces = split_clause_punctuation(spell_currency(text))
        ipas = self.espeak.ipa_many([words for _, words, _ in pieces])
        if not any(ipas):
            return ""  # punctuation alone is not spoken
        for (opening, _, closing), ipa in zip(pieces, ipas):
            ps = ipa_to_kokoro(ipa)
            chunk = opening + ps + closing
            if chunk.strip():
                out.append(chunk)
        joined = " ".join(out)
        kept = "".join(c for c in joined if c in self.vocab)
        if len(kept) != len(joined):
            dropped = collections.Counter(c for c in joined if c not in self.vocab)
            self.unknown.update(dropped)
            log.debug("dropped symbols outside the Kokoro vocabulary: %s", dict(dropped))
        return re.sub(r" {2,}", " ", kept).strip()

    def ids(self, phonemes: str) -> list[int]:
        """Vocabulary ids of ``phonemes`` (symbols outside the vocabulary skipped)."""
        return [self.vocab[c] for c in phonemes if c in self.vocab]

    def close(self) -> None:
        self.espeak.close()
