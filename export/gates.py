"""Accuracy gates: a quantized (or otherwise rewritten) model against its float reference, on real data.

Each gate takes the float model and the candidate (paths or callables) plus data made offline
(``export.calibration``: espeak-ng voices with noise; ``export.evalset``: the ASR eval set) and
returns a ``GateResult``: what was measured, the threshold from the recipe's ``[gates]``, and
whether it passed. ``enforce`` raises ``GateFailed`` (code ``export.gate``) when any failed;
``gate_rows`` makes the table the CLI prints.

- ``vad_frame_agreement_f1``: speech/non-speech decisions per 32 ms frame at the profile threshold;
  F1 of the candidate's decisions against the float model's (1.0 = identical decisions).
- ``asr_wer_increase``: corpus WER of candidate minus float on the eval set, in points (x100).
- ``tts_mel_distance``: mean L1 distance in dB between log-mel spectrograms of candidate and float
  speech for the same sentences, aligned by dynamic time warping.
- ``tts_roundtrip_wer``: synthesize, transcribe with an ASR, corpus WER against the text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, Union

import numpy as np

from edge.audio import FRAME_SAMPLES, SAMPLE_RATE, resample
from edge.errors import SottovoceError
from export.calibration import Clip, check_size
from export.evalset import corpus_wer


@dataclass(frozen=True)
class GateResult:
    """One measured gate. ``passed`` is ``value <op> threshold``."""

    stage: str
    metric: str
    value: float
    threshold: float
    op: str  # "<=" | ">="
    passed: bool
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def judge(cls, stage: str, metric: str, value: float, threshold: float, op: str,
              detail: dict[str, Any] | None = None) -> "GateResult":
        """Build a result, deciding ``passed`` from ``value``, ``op`` and ``threshold``."""
        if op not in ("<=", ">="):
            raise ValueError(f"gate op must be '<=' or '>=', not {op!r}")
        value = float(value)
        passed = bool(value <= threshold) if op == "<=" else bool(value >= threshold)
        return cls(stage, metric, round(value, 6), float(threshold), op, passed, dict(detail or {}))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest's ``drift``."""
        return asdict(self)

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return f"{self.stage} {self.metric} {self.value:.4g} {self.op} {self.threshold:g}: {verdict}"


class GateFailed(SottovoceError):
    """At least one accuracy gate failed; ``results`` holds every gate that ran."""

    code = "export.gate"

    def __init__(self, results: Sequence[GateResult]) -> None:
        self.results = list(results)
        failed = [r for r in self.results if not r.passed]
        super().__init__("accuracy gate failed: " + "; ".join(r.summary() for r in failed))


def enforce(results: Sequence[GateResult]) -> None:
    """Raise ``GateFailed`` if any result did not pass."""
    if any(not r.passed for r in results):
        raise GateFailed(results)


def gate_rows(results: Sequence[GateResult]) -> list[list[str]]:
    """Table rows (header first): stage, metric, value, op, threshold, verdict."""
    rows = [["stage", "metric", "value", "gate", "verdict"]]
    for r in results:
        rows.append([r.stage, r.metric, f"{r.value:.4g}", f"{r.op} {r.threshold:g}", "pass" if r.passed else "FAIL"])
    return rows


# ---------------------------------------------------------------------------------------- VAD

VadModel = Union[str, Path, Callable[[np.ndarray], np.ndarray]]


def vad_runner(model: VadModel) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``audio -> P(speech) per 512-sample frame`` from a Silero ONNX path (one fresh
    stream per call: context and state reset) or from such a function itself."""
    if callable(model):
        return model
    from edge.stages.vad import SileroVad

    vad = SileroVad(Path(model), threads=1)

    def run(audio: np.ndarray) -> np.ndarray:
        vad.reset()
        return vad.probabilities(np.asarray(audio, dtype=np.float32))

    return run


def f1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """F1 of boolean ``candidate`` decisions against ``reference`` decisions (positive = speech).
    Both empty of positives counts as full agreement (1.0)."""
    ref, cand = np.asarray(reference, bool), np.asarray(candidate, bool)
    tp = int(np.sum(ref & cand))
    fp = int(np.sum(~ref & cand))
    fn = int(np.sum(ref & ~cand))
    if tp + fp + fn == 0:
        return 1.0
    return 2 * tp / (2 * tp + fp + fn)


def vad_frame_agreement_f1(
    float_model: VadModel,
    candidate: VadModel,
    clips: Sequence[Clip],
    *,
    threshold: float = 0.5,
    min_f1: float = 0.98,
) -> GateResult:
    """Frame decisions ``P(speech) >= threshold`` of ``candidate`` vs ``float_model`` over ``clips``
    (each a fresh stream); F1 of candidate against float, which must be ``>= min_f1``. Also reports
    the largest probability difference and how many frames flipped. Raises ``CalibrationError`` on a
    set under the minimum size."""
    check_size(clips, stage="vad")
    ref_run, cand_run = vad_runner(float_model), vad_runner(candidate)
    ref_p = np.concatenate([ref_run(c.audio) for c in clips])
    cand_p = np.concatenate([cand_run(c.audio) for c in clips])
    ref_d, cand_d = ref_p >= threshold, cand_p >= threshold
    f1 = f1_agreement(ref_d, cand_d)
    detail = {
        "frames": int(ref_p.size),
        "utterances": len(clips),
        "speech_frames_float": int(ref_d.sum()),
        "flipped_frames": int(np.sum(ref_d != cand_d)),
        "max_abs_prob_diff": round(float(np.max(np.abs(ref_p - cand_p))), 5),
        "mean_abs_prob_diff": round(float(np.mean(np.abs(ref_p - cand_p))), 6),
        "decision_threshold": threshold,
    }
    return GateResult.judge("vad", "frame_f1_vs_float", f1, min_f1, ">=", detail)


# ---------------------------------------------------------------------------------------- ASR


class _Recognizer(Protocol):
    def transcribe(self, audio: np.ndarray) -> str: ...


Transcriber = Union[Callable[[np.ndarray], str], _Recognizer]


def _transcribe_fn(asr: Transcriber) -> Callable[[np.ndarray], str]:
    return asr.transcribe if hasattr(asr, "transcribe") else asr  # type: ignore[return-value]


def asr_wer_increase(
    float_asr: Transcriber,
    candidate: Transcriber,
    clips: Sequence[Clip],
    *,
    max_increase_points: float = 1.0,
) -> GateResult:
    """Corpus WER (``export.evalset`` normalization) of ``candidate`` minus ``float_asr`` over
    ``clips`` (each with its reference ``text``), in percentage points; must be
    ``<= max_increase_points``. Raises ``CalibrationError`` under the minimum set size."""
    check_size(clips, stage="asr")
    ref_fn, cand_fn = _transcribe_fn(float_asr), _transcribe_fn(candidate)
    ref_pairs = [(c.text, ref_fn(c.audio)) for c in clips]
    cand_pairs = [(c.text, cand_fn(c.audio)) for c in clips]
    wer_float, wer_cand = corpus_wer(ref_pairs), corpus_wer(cand_pairs)
    increase = (wer_cand - wer_float) * 100.0
    detail = {"wer_float": round(wer_float, 4), "wer_candidate": round(wer_cand, 4), "utterances": len(clips),
              "differing_transcripts": sum(a[1] != b[1] for a, b in zip(ref_pairs, cand_pairs))}
    return GateResult.judge("asr", "wer_increase_points", increase, max_increase_points, "<=", detail)


# ---------------------------------------------------------------------------------------- TTS


class _Synth(Protocol):
    sample_rate: int

    def synthesize(self, text: str) -> np.ndarray: ...


def _mel_filterbank(rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular filters on the HTK mel scale, shape (n_mels, n_fft // 2 + 1)."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10 ** (np.asarray(m) / 2595.0) - 1.0)

    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(rate / 2), n_mels + 2))
    bins = np.fft.rfftfreq(n_fft, 1.0 / rate)
    fb = np.zeros((n_mels, bins.size), dtype=np.float32)
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        rise = (bins - lo) / max(mid - lo, 1e-9)
        fall = (hi - bins) / max(hi - mid, 1e-9)
        fb[i] = np.maximum(0.0, np.minimum(rise, fall))
    return fb


def log_mel_db(audio: np.ndarray, rate: int, *, n_mels: int = 80, win_ms: float = 25.0,
               hop_ms: float = 10.0) -> np.ndarray:
    """Log-mel spectrogram in dB, shape (frames, n_mels), floored at -100 dB (Hann window)."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    win = int(rate * win_ms / 1000)
    hop = int(rate * hop_ms / 1000)
    n_fft = 1 << (win - 1).bit_length()
    if audio.size < win:
        audio = np.pad(audio, (0, win - audio.size))
    count = 1 + (audio.size - win) // hop
    idx = np.arange(win)[None, :] + hop * np.arange(count)[:, None]
    frames = audio[idx] * np.hanning(win).astype(np.float32)
    power = np.abs(np.fft.rfft(frames, n=n_fft, axis=1)) ** 2
    mel = power @ _mel_filterbank(rate, n_fft, n_mels).T
    return 10.0 * np.log10(np.maximum(mel, 1e-10))


def dtw_mean_l1(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-frame L1 distance (averaged over bins) along the dynamic-time-warping path between
    feature sequences ``a`` (n, d) and ``b`` (m, d): symmetric steps (a diagonal step counts its cost
    twice), total normalized by ``n + m``: equal sequences give 0, a constant offset c gives at most c."""
    cost = np.abs(a[:, None, :] - b[None, :, :]).mean(axis=2).tolist()
    n, m = len(cost), len(cost[0]) if cost else 0
    inf = float("inf")
    prev = [inf] * (m + 1)
    prev[0] = 0.0
    for i in range(1, n + 1):
        row, cur = cost[i - 1], [inf] * (m + 1)
        for j in range(1, m + 1):
            c = row[j - 1]
            cur[j] = min(prev[j - 1] + 2 * c, prev[j] + c, cur[j - 1] + c)
        prev = cur
    return float(prev[m] / (n + m))


def _synth_fn(tts: _Synth | Callable[[str], np.ndarray]) -> Callable[[str], np.ndarray]:
    return tts.synthesize if hasattr(tts, "synthesize") else tts  # type: ignore[return-value]


def tts_mel_distance(
    float_tts: _Synth | Callable[[str], np.ndarray],
    candidate: _Synth | Callable[[str], np.ndarray],
    sentences: Sequence[str],
    *,
    sample_rate: int,
    max_db: float = 2.0,
) -> GateResult:
    """Mean log-mel L1 distance (dB) of ``candidate`` against ``float_tts`` speech for ``sentences``,
    frames aligned by DTW (equal lengths are compared frame by frame); must be ``<= max_db``.
    The silence floor is clipped at 80 dB under each utterance's peak so hiss does not dominate."""
    if len(sentences) < 2:
        from export.calibration import CalibrationError

        raise CalibrationError(f"the tts gate set is too small: {len(sentences)} sentences; at least 2 are needed")
    ref_fn, cand_fn = _synth_fn(float_tts), _synth_fn(candidate)
    per = []
    lengths = []
    for text in sentences:
        ref, cand = ref_fn(text), cand_fn(text)
        a, b = log_mel_db(ref, sample_rate), log_mel_db(cand, sample_rate)
        floor = max(a.max(), b.max()) - 80.0
        a, b = np.maximum(a, floor), np.maximum(b, floor)
        per.append(float(np.abs(a - b).mean()) if a.shape == b.shape else dtw_mean_l1(a, b))
        lengths.append((len(ref), len(cand)))
    detail = {"sentences": len(sentences), "per_sentence_db": [round(x, 3) for x in per],
              "length_ratio_max": round(max(max(x, y) / max(min(x, y), 1) for x, y in lengths), 4)}
    return GateResult.judge("tts", "mel_distance_db", float(np.mean(per)), max_db, "<=", detail)


def tts_roundtrip_wer(
    tts: _Synth | Callable[[str], np.ndarray],
    asr: Transcriber,
    sentences: Sequence[str],
    *,
    sample_rate: int,
    max_wer: float = 0.35,
) -> GateResult:
    """Speak each sentence with ``tts`` (at ``sample_rate``), resample to 16 kHz, transcribe with
    ``asr``; corpus WER against the sentences must be ``<= max_wer``. The transcripts are in
    ``detail`` so a failure can be read."""
    if len(sentences) < 2:
        from export.calibration import CalibrationError

        raise CalibrationError(f"the tts round-trip set is too small: {len(sentences)} sentences; at least 2")
    synth, hear = _synth_fn(tts), _transcribe_fn(asr)
    pairs = []
    for text in sentences:
        audio = resample(np.asarray(synth(text), dtype=np.float32), sample_rate, SAMPLE_RATE)
        pairs.append((text, hear(audio)))
    value = corpus_wer(pairs)
    detail = {"sentences": len(sentences), "transcripts": [h for _, h in pairs]}
    return GateResult.judge("tts", "roundtrip_wer", value, max_wer, "<=", detail)


def frames_of(audio: np.ndarray) -> int:
    """Number of whole 512-sample VAD frames in ``audio``."""
    return len(audio) // FRAME_SAMPLES
