"""``sottovoce demo``: the main job in one command.

export the x86-dev bundle -> flash it to a local virtual device over a pseudo-terminal -> ask it a
spoken question (espeak-ng) -> print transcript, reply, reply WAV and latency.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edge.boards import REPO_ROOT

DEFAULT_QUESTION = "What is the capital of France?"


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="export, flash a local virtual device, and answer a spoken question (the main job)",
        description="Export the bundle for --target, flash it to a virtual device on this machine over a "
        "pseudo-terminal, speak a question with espeak-ng and answer it with the device's active bundle.",
    )
    demo.add_argument("--target", default="x86-dev")
    demo.add_argument("--question", default=DEFAULT_QUESTION, help=f"what to ask (default: {DEFAULT_QUESTION!r})")
    demo.add_argument("--voice", default="en-us", help="espeak-ng voice for the question (e.g. en-us+f3, en-gb)")
    demo.add_argument("--out", type=Path, default=REPO_ROOT / "dist" / "demo", help="where the WAVs and report go")
    demo.add_argument("--skip-flash", action="store_true", help="answer with the exported bundle directly")
    demo.add_argument("--json", action="store_true", help="print the turn record as JSON at the end")
    demo.set_defaults(func=cmd_demo)


def say(text: str, voice: str, path: Path) -> Path:
    """Speak ``text`` with espeak-ng into a WAV (22.05 kHz; the loop resamples)."""
    if shutil.which("espeak-ng") is None:
        from edge.errors import SottovoceError

        raise SottovoceError("espeak-ng is not installed (apt-get install espeak-ng); it speaks the demo question")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(path), text], check=True)
    return path


def _step(n: int, text: str) -> None:
    print(f"\n== {n}. {text}", file=sys.stderr, flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from edge.audio_io import WavFileSink, WavFileSource
    from edge.session import build_session
    from export.builder import ExportOptions, build_bundle

    _step(1, f"export the {args.target} bundle")
    result = build_bundle(ExportOptions(target=args.target),
                          lambda stage, msg: print(f"   [{stage}] {msg}", file=sys.stderr, flush=True))
    for r in result.stages:
        print(f"   {r.stage:4s} {r.kind:16s} {r.scheme:16s} {r.size_bytes / 1e6:7.1f} MB", file=sys.stderr)
    print(f"   bundle {result.manifest.bundle_id[:23]}… -> {result.svb}", file=sys.stderr)

    bundle_dir = result.out_dir
    with tempfile.TemporaryDirectory(prefix="sottovoce-demo-") as tmp:
        if not args.skip_flash:
            from sottovoce.virtual_device import flash_virtual_device

            _step(2, "flash it to a virtual device over a pseudo-terminal")
            bundle_dir = flash_virtual_device(result.svb, Path(tmp) / "device")
        _step(3, f"ask: {args.question!r} (espeak-ng, voice {args.voice})")
        question = say(args.question, args.voice, args.out / "question.wav")
        session = build_session(bundle_dir)
        reply_wav = args.out / "reply.wav"
        sink = WavFileSink(reply_wav, sample_rate=session.stages.tts.sample_rate)
        try:
            records = session.run(WavFileSource(question), sink)
        finally:
            sink.close()
    if not records:
        print("no turn was recognized in the question audio", file=sys.stderr)
        return 1
    rec = records[0]
    _step(4, "answer and latency")
    print(f"   transcript : {rec.transcript}")
    print(f"   reply      : {rec.reply}")
    print(f"   reply WAV  : {reply_wav}")
    print(f"   latency    : voice-to-voice {rec.voice_to_voice_ms:.0f} ms = endpoint {rec.endpoint_ms:.0f} "
          f"+ ASR final {rec.asr_final_ms - rec.endpoint_ms:.0f} + first token "
          f"{rec.llm_first_token_ms - rec.asr_final_ms:.0f} + first audio "
          f"{rec.playback_start_ms - rec.llm_first_token_ms:.0f} ms; LLM {rec.llm.get('tokens_per_s', 0):.0f} tok/s, "
          f"ASR RTF {rec.asr.rtf or 0:.2f}, TTS RTF {rec.tts.rtf or 0:.2f}")
    (args.out / "turn.json").write_text(rec.to_json() + "\n")
    if args.json:
        print(rec.to_json())
    return 0
