"""Benchmark: spoken turns through the real loop on a bundle.

Prints, over a fixed set of spoken questions (espeak-ng, two voices): voice-to-voice latency
p50/p95, per-stage compute (ASR final, LLM prefill + decode, TTS), LLM tokens/s, and the
process's peak RSS. The peer figure is the endpoint wait (the VAD hangover) that every turn pays:
the ratio says how much of the latency is compute rather than waiting for the user to finish.
``--ab`` also runs every question with the LLM *not* yielding to the first clause's synthesis
(``first_audio_priority_s=0``), interleaved with the default run, and prints both and their ratio.

Usage: .venv/bin/python bench/turn.py [--bundle dist/x86-dev] [--ab] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.audio_io import NullSink, WavFileSource  # noqa: E402
from edge.metrics import percentile  # noqa: E402
from edge.session import build_session  # noqa: E402
from tests.speech import espeak, silence, write_wav  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "How many days are in a week?",
    "What color is the sky?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "Name a fruit that is yellow.",
]
VOICES = ["en-us", "en-us+f3"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "dist" / "x86-dev")
    parser.add_argument("--ab", action="store_true", help="also run without the first-audio priority (peer)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        print(f"no bundle at {args.bundle}; run `sottovoce export --target x86-dev` first", file=sys.stderr)
        return 2
    session = build_session(args.bundle)
    default_config = session.config
    peer_config = replace(default_config, first_audio_priority_s=0.0)
    records, peer = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for voice in VOICES:
            for i, q in enumerate(QUESTIONS):
                wav = Path(tmp) / f"{voice}-{i}.wav"
                write_wav(wav, np.concatenate([silence(0.3), espeak(q, voice=voice), silence(1.2)]))
                for config, out in [(default_config, records)] + ([(peer_config, peer)] if args.ab else []):
                    session.config = config
                    session.history.clear() if hasattr(session.history, "clear") else None
                    recs = session.run(WavFileSource(wav), NullSink(session.stages.tts.sample_rate))
                    out.extend((voice, q, r) for r in recs)
        session.config = default_config
    v2v = [r.voice_to_voice_ms for _, _, r in records if r.voice_to_voice_ms is not None]
    endpoint = [r.endpoint_ms for _, _, r in records]
    asr = [r.asr.compute_ms for _, _, r in records]
    prefill = [r.llm.get("prefill_ms", 0) for _, _, r in records]
    tps = [r.llm.get("tokens_per_s", 0) for _, _, r in records if r.llm.get("new_tokens")]
    tts_first = [r.tts_first_audio_ms - r.llm_first_token_ms for _, _, r in records
                 if r.tts_first_audio_ms is not None and r.llm_first_token_ms is not None]
    tts_rtf = [r.tts.rtf for _, _, r in records if r.tts.rtf]
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {
        "turns": len(records),
        "voice_to_voice_ms": {"p50": percentile(v2v, 50), "p95": percentile(v2v, 95), "max": max(v2v, default=0)},
        "endpoint_wait_ms_p50": percentile(endpoint, 50),
        "compute_share_of_latency_p50": 1 - percentile(endpoint, 50) / percentile(v2v, 50) if v2v else None,
        "asr_final_compute_ms_p50": percentile(asr, 50),
        "llm_prefill_ms_p50": percentile(prefill, 50),
        "llm_tokens_per_s_p50": percentile(tps, 50),
        "first_token_to_first_audio_ms_p50": percentile(tts_first, 50),
        "tts_rtf_p50": percentile(tts_rtf, 50),
        "peak_rss_mb": peak_rss_mb,
    }
    if args.ab:
        peer_v2v = [r.voice_to_voice_ms for _, _, r in peer if r.voice_to_voice_ms is not None]
        peer_first = [r.tts_first_audio_ms - r.llm_first_token_ms for _, _, r in peer
                      if r.tts_first_audio_ms is not None and r.llm_first_token_ms is not None]
        summary["peer_no_first_audio_priority"] = {
            "voice_to_voice_ms_p50": percentile(peer_v2v, 50), "voice_to_voice_ms_p95": percentile(peer_v2v, 95),
            "first_token_to_first_audio_ms_p50": percentile(peer_first, 50)}
        summary["v2v_p50_ratio_default_over_peer"] = percentile(v2v, 50) / percentile(peer_v2v, 50)
    if args.json:
        print(json.dumps({"summary": summary, "turns": [{"voice": v, "question": q, **r.to_dict()}
                                                        for v, q, r in records]}, indent=2))
        return 0
    print(f"{'voice':9s} {'question':48s} {'v2v ms':>7s} {'asr ms':>7s} {'tok/s':>6s}  transcript -> reply")
    for voice, q, r in records:
        print(f"{voice:9s} {q:48s} {r.voice_to_voice_ms or 0:7.0f} {r.asr.compute_ms:7.0f} "
              f"{r.llm.get('tokens_per_s', 0):6.1f}  {r.transcript!r} -> {r.reply[:60]!r}")
    print()
    for k, v in summary.items():
        print(f"{k:36s} {json.dumps(v) if isinstance(v, dict) else (f'{v:.2f}' if isinstance(v, float) else v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
