"""Reply text made ready for speech: markup stripped, and a stream of LLM pieces cut into clauses.

``ClauseSplitter`` lets the TTS start on the first clause while the LLM is still writing the rest.
A cut is made only once the characters after a punctuation mark have arrived, so "3." followed by
"5" stays "3.5", "p.m." and "e.g." stay whole, and an ellipsis inside a word ("wait...what") is
not a break. Sentence ends (. ! ?) always cut; softer marks (, ; : — …) cut once the clause has
a few words; the first clause of a reply may be cut earlier so audio starts soon.
"""

from __future__ import annotations

import re
import unicodedata

#: Abbreviations that never end a sentence (a capital letter usually follows them).
TITLE_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "mt", "vs", "cf", "e.g", "i.e", "approx", "fig",
    "gen", "gov", "sgt", "capt", "col", "lt", "rev", "hon",
})
#: Abbreviations that may end a sentence: they do when the next word starts with a capital.
END_ABBREVIATIONS = frozenset({"a.m", "p.m", "etc", "inc", "ltd", "co", "corp", "u.s", "u.k", "jan", "feb", "aug",
                               "sept", "oct", "nov", "dec", "min", "max", "hr", "hrs", "km", "kg", "lb", "lbs",
                               "oz", "ft"})

SENTENCE_END = ".!?"
SOFT_BREAKS = ",;:—…"
CLOSERS = ")\"”’'»]"
_BREAK_CHARS = SENTENCE_END + SOFT_BREAKS

# Markdown and decoration characters an LLM may emit; removed as they stream in.
_DROP_CHARS = set("*#`~^|\\") | {"\u200d", "\ufe0f", "\ufe0e"}
_BULLET = re.compile(r"^\s*(?:[-+•]\s+|>\s*)", re.MULTILINE)
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_UNDERSCORE_EMPHASIS = re.compile(r"(?<!\w)_+|_+(?!\w)")
_SPACES = re.compile(r"[ \t\r\f\v]+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,;:.!?…)\]”])")


def _keep_char(ch: str) -> bool:
    if ch in _DROP_CHARS:
        return False
    cat = unicodedata.category(ch)
    # So: emoji and pictographs; Sk: skin-tone modifiers; Cs/Co: surrogates, private use; Cf: format chars
    return cat not in ("So", "Sk", "Cs", "Co", "Cf") or ch in "\n"


def strip_markup_chars(piece: str) -> str:
    """Remove markdown marker characters (``* # ` ~``), emoji and invisible format characters from
    ``piece``; character by character, so it is safe on pieces cut anywhere in a word."""
    return "".join(ch for ch in piece if _keep_char(ch))


def clean_for_speech(text: str) -> str:
    """Return ``text`` as it should be spoken: markdown markers, list bullets, link targets,
    emphasis underscores and emoji removed; "--" made a dash, "..." an ellipsis character kept as
    is; runs of whitespace (newlines included) collapsed to one space; no space before closing
    punctuation; stripped. Letters, digits and ordinary punctuation are never removed."""
    text = _LINK.sub(r"\1", text)
    text = strip_markup_chars(text)
    text = _BULLET.sub("", text)
    text = _UNDERSCORE_EMPHASIS.sub("", text)
    text = text.replace("--", "—")
    text = _SPACES.sub(" ", text.replace("\n", " "))
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    return text.strip()


def clean_transcript(text: str) -> str:
    """An ASR transcript without the non-speech symbols recognizers hallucinate on music or odd audio
    (``♪``, the replacement character, emoji), whitespace collapsed; '' when no letter or digit is left."""
    text = _SPACES.sub(" ", "".join(ch for ch in text if _keep_char(ch))).strip()
    return text if is_speakable(text) else ""


def is_speakable(text: str) -> bool:
    """True when ``text`` holds at least one letter or digit (punctuation alone is not spoken)."""
    return any(ch.isalnum() for ch in text)


def word_before(text: str, end: int) -> str:
    """The whitespace-delimited token ending at index ``end`` of ``text`` (without leading quotes/brackets)."""
    start = end
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    return text[start:end].lstrip("(\"“‘'[")


def abbreviation_kind(token: str) -> str | None:
    """Classify the token before a period: ``"title"`` (Dr, e.g: never ends a sentence), ``"end"``
    (p.m, etc, U.S, single letters: ends one only before a capital) or ``None`` (an ordinary word)."""
    t = token.lower().rstrip(".")
    if t in TITLE_ABBREVIATIONS:
        return "title"
    if t in END_ABBREVIATIONS:
        return "end"
    if "." in t and all(len(part) <= 2 for part in t.split(".")) and t.replace(".", "").isalpha():
        return "end"  # dotted initials: U.S.A, a.k.a, p.m
    if len(t) == 1 and t.isalpha():
        return "end"  # an initial: "J. Smith", "plan B."
    return None


def _is_list_number(buf: str, i: int, line_start: bool) -> bool:
    """True when the period at ``buf[i]`` ends a list number ("1.", "12.") that opens a line:
    only whitespace before it in ``buf``, and a newline in that whitespace or ``line_start``
    (the buffer itself begins a line)."""
    token = word_before(buf, i)
    if not (0 < len(token) <= 3 and token.isdigit()):
        return False
    before = buf[: i - len(token)]
    return not before.strip() and (line_start or "\n" in before)


#: words that open a new phrase: a first clause may end just before one of them
PHRASE_STARTERS = frozenset(
    "of in on at to for with from by about into over under after before during and but or so because which who "
    "whose where when while although though than like located known called".split())


def _opens_phrase(buf: str, i: int) -> bool:
    """Whether the complete word after the whitespace at ``buf[i]`` is one of ``PHRASE_STARTERS`` (a word
    still being generated, with nothing after it yet, does not count)."""
    j = i
    while j < len(buf) and buf[j].isspace():
        j += 1
    k = j
    while k < len(buf) and buf[k].isalpha():
        k += 1
    if k == j or k == len(buf) or buf[k - 1:k].isspace():
        return False
    return buf[j:k].lower() in PHRASE_STARTERS


def _count_words(text: str) -> int:
    return sum(1 for w in text.split() if is_speakable(w))


class ClauseSplitter:
    """Cuts streamed text into clauses for the TTS.

    ``push(piece)`` returns the clauses completed by ``piece`` (maybe none); ``flush()`` returns
    what is left at the end of the reply and resets the splitter for the next one. Every clause
    returned is cleaned for speech (``clean_for_speech``) and speakable. Parameters: a soft break
    (, ; : — …) cuts once the clause has ``min_words`` words (``first_min_words`` for the first
    clause of a reply); a clause with no break is cut at a space after ``max_words`` words
    (``first_max_words`` for the first clause: the reply's first audio waits for it, so it is kept short).
    The first clause is also cut before a word that opens a new phrase (``PHRASE_STARTERS``: "of", "in",
    "which", ...) once it has ``first_phrase_words`` words: "The old Eiffel Tower is located | in Paris": a
    natural place to breathe, and a shorter first clause is synthesized sooner.
    """

    def __init__(self, min_words: int = 6, first_min_words: int = 2, max_words: int = 30,
                 first_max_words: int = 10, first_phrase_words: int = 5) -> None:
        self.min_words = min_words
        self.first_min_words = first_min_words
        self.max_words = max_words
        self.first_max_words = first_max_words
        self.first_phrase_words = first_phrase_words
        self._buf = ""
        self._emitted = 0
        self._line_start = True  # the buffer begins a line (start of reply, or after a newline)

    def push(self, piece: str) -> list[str]:
        """Add ``piece`` of the reply; return the clauses it completes, in order."""
        self._buf += strip_markup_chars(piece)
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """End of the reply: return the remaining clauses (the tail, even unpunctuated) and reset."""
        out = self._drain(final=True)
        rest = clean_for_speech(self._buf)
        if is_speakable(rest):
            out.append(rest)
        self._buf = ""
        self._emitted = 0
        self._line_start = True
        return out

    # ------------------------------------------------------------------ internals

    def _drain(self, final: bool) -> list[str]:
        out: list[str] = []
        while True:
            cut = self._next_cut(final)
            if cut is None:
                return out
            clause = clean_for_speech(self._buf[:cut])
            rest = self._buf[cut:]
            gap = self._buf[cut - 1] + rest[: len(rest) - len(rest.lstrip())]
            self._buf = rest.lstrip()
            self._line_start = "\n" in gap
            if is_speakable(clause):
                out.append(clause)
                self._emitted += 1

    def _min_words(self) -> int:
        return self.first_min_words if self._emitted == 0 else self.min_words

    def _next_cut(self, final: bool) -> int | None:
        """Index just after the first decidable clause end in the buffer, or None (none yet)."""
        buf = self._buf
        n = len(buf)
        i = 0
        while i < n:
            ch = buf[i]
            if ch == "\n":
                if is_speakable(buf[:i]):
                    return i + 1
            elif ch.isspace():
                words = _count_words(buf[:i])
                if words >= (self.first_max_words if self._emitted == 0 else self.max_words):
                    return i
                if self._emitted == 0 and words >= self.first_phrase_words and _opens_phrase(buf, i):
                    return i
            elif ch in _BREAK_CHARS:
                j = i
                while j < n and (buf[j] in _BREAK_CHARS or buf[j] in CLOSERS):
                    j += 1
                decision = self._decide(buf, i, j, final)
                if decision == "wait":
                    return None
                if decision == "cut":
                    return j
                i = j
                continue
            i += 1
        return None

    def _decide(self, buf: str, i: int, j: int, final: bool) -> str:
        """Decide on the punctuation run ``buf[i:j]``: ``"cut"``, ``"skip"`` or ``"wait"`` (not yet known)."""
        n = len(buf)
        run = buf[i:j]
        if j == n:
            return "skip" if final else "wait"  # flush() takes the tail as the last clause
        nxt = buf[j]
        if not nxt.isspace():
            # "3.5", "1,000", "e.g", "wait...what": no break. A dash between words is a soft break.
            if run.rstrip(CLOSERS) == "—":
                return "cut" if _count_words(buf[:i]) >= self._min_words() else "skip"
            return "skip"
        marks = run.rstrip(CLOSERS)
        ellipsis = "..." in marks or "…" in marks
        hard = any(c in "!?" for c in marks) or ("." in marks and not ellipsis)
        if ellipsis and not hard:
            k = j
            while k < n and buf[k].isspace():
                k += 1
            if k == n:
                return "skip" if final else "wait"
            hard = buf[k].isupper()  # "Well... Maybe" ends a sentence, "so... maybe" does not
        if hard and marks == "." and _is_list_number(buf, i, self._line_start):
            return "skip"  # "1. Mix the flour." is one clause, not "1." and "Mix the flour."
        if hard and marks.startswith("."):
            kind = abbreviation_kind(word_before(buf, i) + ".")
            if kind == "title":
                return "skip"
            if kind == "end":
                k = j
                while k < n and buf[k].isspace():
                    k += 1
                if k == n:
                    return "skip" if final else "wait"
                if not buf[k].isupper():
                    return "skip"
        if not is_speakable(buf[:i]):
            return "skip"
        if hard:
            return "cut"
        return "cut" if _count_words(buf[:i]) >= self._min_words() else "skip"
