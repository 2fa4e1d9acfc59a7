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

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from tests.speech import add_noise, add_reverb, espeak, silence

from export.evalset import (  # noqa: F401 - re-exported: the tests and the export gates score alike
    EVAL_SET,
    Utterance,
    corpus_wer,
    edit_distance,
    load_eval_set,
    normalize,
    number_words,
    wer,
)


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
    "en-us 10dB": {"voice": "en-us", "snr_db": 10.0},
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
