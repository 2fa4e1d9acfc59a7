"""Command line of the board runtime: ``run`` (the voice loop), ``bundle`` (verify, inspect), ``edge`` (daemon)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the runtime's subcommands to the top-level parser."""
    run = sub.add_parser(
        "run",
        help="answer spoken turns from a WAV file, a pipe or a microphone with a bundle",
        description="Run the streaming voice loop (VAD -> ASR -> LLM -> TTS) on a bundle. Every turn in the "
        "input is answered; replies go to --output. With --json, one JSON record per turn (transcript, reply, "
        "latencies on the listener's timeline, per-stage compute, RTF, tokens/s).",
    )
    run.add_argument("--bundle", required=True, type=Path, help="bundle directory or packed .svb file")
    run.add_argument("--input", "-i", default="-", help="input WAV/FLAC file, or - for raw 16 kHz s16le mono on stdin")
    run.add_argument("--output", "-o", default=None,
                     help="reply WAV file, or - for raw s16le mono on stdout (default: discard the audio)")
    run.add_argument("--realtime", action="store_true",
                     help="deliver input frames at the pace of the audio clock (as a microphone would); enables barge-in")
    run.add_argument("--board", help="board profile to run as (default: the bundle's target)")
    run.add_argument("--trust", type=Path, action="append", default=[],
                     help="public key the bundle signature must verify against (repeatable)")
    run.add_argument("--max-new-tokens", type=int, help="reply length budget in tokens (default: board profile)")
    run.add_argument("--system-prompt", help="override the bundle's system prompt")
    run.add_argument("--json", action="store_true", help="print one JSON record per turn on stdout")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    run.set_defaults(func=cmd_run)

    bundle = sub.add_parser("bundle", help="verify or inspect a model bundle")
    bsub = bundle.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    verify = bsub.add_parser("verify", help="check a bundle's signature and every file hash",
                             description="Verify the ed25519 signature of the manifest against --key, then the size "
                             "and sha256 of every file. Exit 0 only if all pass.")
    verify.add_argument("bundle", type=Path, help="bundle directory or .svb file")
    verify.add_argument("--key", type=Path, action="append", default=[], help="trusted public key (repeatable)")
    verify.add_argument("--allow-unsigned", action="store_true", help="accept a bundle without a signature")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=cmd_bundle_verify)

    inspect = bsub.add_parser("inspect", help="show a bundle's target, stages, sizes, quantization and drift")
    inspect.add_argument("bundle", type=Path, help="bundle directory or .svb file")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_bundle_inspect)

    if importlib.util.find_spec("edge.device_cli") is not None:
        from edge import device_cli

        device_cli.register(sub)


def _open_verified(bundle: Path, work: Path, trust: list[Path], allow_unsigned: bool):
    from edge.bundle import load_public_key, open_bundle

    keys = [load_public_key(p) for p in trust]
    verification = open_bundle(bundle, work, public_keys=keys, allow_unsigned=allow_unsigned)
    root = bundle if bundle.is_dir() else work
    return verification, root


def cmd_run(args: argparse.Namespace) -> int:
    from edge.session import build_session
    from edge.audio_io import NullSink, RawPcmSink, RawPcmSource, WavFileSink, WavFileSource

    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    with tempfile.TemporaryDirectory(prefix="sottovoce-run-") as tmp:
        verification, root = _open_verified(args.bundle, Path(tmp) / "bundle", args.trust, allow_unsigned=not args.trust)
        if verification.manifest.signature and not args.trust:
            log("note: bundle signature not checked (no --trust key given); file hashes verified")
        session = build_session(root, board=args.board, max_new_tokens=args.max_new_tokens,
                                system_prompt=args.system_prompt)
        log(f"loaded bundle {verification.manifest.bundle_id[:19]} for {session.profile.name} "
            f"in {session.load_s:.1f} s ({', '.join(f'{k}={v}' for k, v in session.stages.info.items())})")
        source = (RawPcmSource(realtime=args.realtime) if args.input == "-"
                  else WavFileSource(args.input, realtime=args.realtime))
        rate = session.stages.tts.sample_rate
        if args.output is None:
            sink = NullSink(rate)
        elif args.output == "-":
            sink = RawPcmSink(sample_rate=rate)
        else:
            sink = WavFileSink(args.output, sample_rate=rate)

        def on_turn(rec) -> None:
            if args.json:
                print(rec.to_json(), flush=True)
            else:
                log(f"[turn {rec.turn}] you: {rec.transcript}")
                log(f"[turn {rec.turn}] assistant: {rec.reply}")
                log(f"[turn {rec.turn}] voice-to-voice {rec.voice_to_voice_ms or 0:.0f} ms "
                    f"(endpoint {rec.endpoint_ms:.0f}, ASR final {rec.asr_final_ms or 0:.0f}, "
                    f"first token {rec.llm_first_token_ms or 0:.0f}, first audio {rec.tts_first_audio_ms or 0:.0f}); "
                    f"LLM {rec.llm.get('tokens_per_s', 0):.0f} tok/s")

        try:
            records = session.run(source, sink, on_turn=on_turn)
        finally:
            sink.close()
    if not records:
        log("no speech found in the input: nothing to answer")
    elif args.output not in (None, "-"):
        log(f"reply audio: {args.output}")
    return 0


def cmd_bundle_verify(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="sottovoce-verify-") as tmp:
        verification, _ = _open_verified(args.bundle, Path(tmp) / "bundle", args.key, args.allow_unsigned)
    m = verification.manifest
    result = {"ok": True, "bundle_id": m.bundle_id, "target": m.target.get("name"), "signed_by": verification.signed_by,
              "files": len(m.all_files())}
    if args.json:
        print(json.dumps(result))
    else:
        who = f"signed by key {verification.signed_by}" if verification.signed_by else "UNSIGNED (allowed)"
        print(f"OK: {args.bundle} ({m.target.get('name')}, {len(m.all_files())} files verified, {who})")
    return 0


def cmd_bundle_inspect(args: argparse.Namespace) -> int:
    from edge.bundle import manifest_summary, read_manifest, read_packed_manifest

    manifest = read_manifest(args.bundle) if args.bundle.is_dir() else read_packed_manifest(args.bundle)
    summary = manifest_summary(manifest)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"bundle {summary['bundle_id']}  target {summary['target']}  version {summary['version']}  "
          f"{'signed' if summary['signed'] else 'unsigned'}  created {summary['created']}")
    print(f"{'stage':6s} {'kind':16s} {'runtime':12s} {'size':>9s}  {'quantization':22s} drift")
    for name, s in summary["stages"].items():
        drift = ", ".join(f"{k}={v}" for k, v in s["drift"].items() if not isinstance(v, (dict, list))) or "-"
        print(f"{name:6s} {s['kind']:16s} {s['runtime']:12s} {s['size'] / 1e6:8.1f}M  "
              f"{s['quantization'].get('scheme', 'none'):22s} {drift}")
    return 0
