"""A spoken turn answered on-device, with the real models, through the real loop and the real CLI."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edge.audio import SAMPLE_RATE, resample
from edge.audio_io import WavFileSink, WavFileSource
from tests.speech import espeak, silence, write_wav

pytestmark = pytest.mark.models


def _answer(session, wav: Path, out: Path | None = None):
    session.history.clear()
    sink = WavFileSink(out, session.stages.tts.sample_rate) if out else None
    from edge.audio_io import NullSink

    sink = sink or NullSink(session.stages.tts.sample_rate)
    try:
        return session.run(WavFileSource(wav), sink)
    finally:
        sink.close()


def test_a_spoken_question_about_france_is_answered_with_paris(voice_session, tmp_path, espeak_available):
    wav = tmp_path / "q.wav"
    write_wav(wav, np.concatenate([silence(0.4), espeak("What is the capital of France?"), silence(1.5)]))
    reply_wav = tmp_path / "reply.wav"
    records = _answer(voice_session, wav, reply_wav)
    assert len(records) == 1
    rec = records[0]
    assert "capital" in rec.transcript.lower() and "france" in rec.transcript.lower()
    assert "paris" in rec.reply.lower()
    audio, rate = sf.read(reply_wav, dtype="float32")
    assert len(audio) > rate * 0.5 and float(np.abs(audio).max()) > 0.05  # real, audible speech
    heard = voice_session.stages.asr.transcribe(resample(audio, rate, SAMPLE_RATE))
    assert "paris" in heard.lower()
    assert rec.voice_to_voice_ms is not None and rec.voice_to_voice_ms > rec.endpoint_ms


def test_two_questions_with_a_pause_are_two_turns_in_order(voice_session, tmp_path, espeak_available):
    wav = tmp_path / "two.wav"
    write_wav(wav, np.concatenate([
        silence(0.3), espeak("What is the capital of France?"), silence(2.0),
        espeak("How many days are in a week?", voice="en-us+f3"), silence(1.5),
    ]))
    records = _answer(voice_session, wav)
    assert len(records) == 2
    assert "france" in records[0].transcript.lower()
    assert "week" in records[1].transcript.lower()
    assert records[0].speech_end_s < records[1].speech_start_s


def test_streaming_tts_starts_before_the_reply_is_finished_and_partials_precede_the_end(
        voice_session, tmp_path, espeak_available):
    speech = espeak("Please tell me a short story about a brave little robot who lives on the moon.", speed=140)
    assert len(speech) / SAMPLE_RATE > 3.0
    wav = tmp_path / "long.wav"
    write_wav(wav, np.concatenate([silence(0.3), speech, silence(1.5)]))
    rec, = _answer(voice_session, wav)
    assert rec.llm["new_tokens"] > 8
    assert rec.tts_first_audio_ms < rec.llm_done_ms  # audio was ready while the LLM was still generating
    early = [p for p in rec.partials if p["ms_before_end"] > 0]
    assert early and early[0]["text"]


def test_a_stereo_44k_wav_is_downmixed_and_resampled(voice_session, tmp_path, espeak_available):
    mono = np.concatenate([silence(0.3), espeak("What is the capital of France?"), silence(1.5)])
    hi = resample(mono, SAMPLE_RATE, 44_100)
    stereo = np.stack([hi, hi * 0.8], axis=1)
    wav = tmp_path / "stereo.wav"
    sf.write(wav, stereo, 44_100, subtype="PCM_16")
    rec, = _answer(voice_session, wav)
    assert "france" in rec.transcript.lower()


def test_silent_input_gives_no_turn(voice_session, tmp_path):
    wav = tmp_path / "silence.wav"
    rng = np.random.default_rng(0)
    write_wav(wav, (rng.standard_normal(SAMPLE_RATE * 4) * 0.002).astype(np.float32))
    assert _answer(voice_session, wav) == []


def test_a_ten_minute_input_is_streamed_with_bounded_memory(voice_session, tmp_path, espeak_available):
    """10 minutes at 48 kHz stereo (110 MB as float) must not be buffered whole."""
    wav = tmp_path / "long.wav"
    rate = 48_000
    question = resample(espeak("What is the capital of France?"), SAMPLE_RATE, rate)
    rng = np.random.default_rng(1)
    with sf.SoundFile(wav, "w", samplerate=rate, channels=2, subtype="PCM_16") as f:
        for _ in range(590 // 10):
            noise = (rng.standard_normal(rate * 10) * 0.002).astype(np.float32)
            f.write(np.stack([noise, noise], axis=1))
        tail = np.concatenate([question, np.zeros(rate * 8, np.float32)])
        f.write(np.stack([tail, tail], axis=1))
    assert sf.info(wav).duration > 600
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    records = _answer(voice_session, wav)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(records) == 1 and "france" in records[0].transcript.lower()
    assert grown_mb < 60, f"peak memory grew by {grown_mb:.0f} MB while streaming a 10-minute file"


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sottovoce", *args], capture_output=True, text=True, timeout=600, **kw)


def test_cli_run_json_gives_one_record_per_turn(x86_bundle, tmp_path, espeak_available):
    wav = tmp_path / "q.wav"
    write_wav(wav, np.concatenate([silence(0.3), espeak("What is the capital of France?", voice="en-us+m3"),
                                   silence(1.5)]))
    proc = _cli("run", "--bundle", str(x86_bundle), "--input", str(wav), "--output", str(tmp_path / "r.wav"), "--json")
    assert proc.returncode == 0, proc.stderr
    rec, = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert "paris" in rec["reply"].lower()
    for key in ("transcript", "endpoint_ms", "asr_final_ms", "llm_first_token_ms", "tts_first_audio_ms",
                "voice_to_voice_ms", "asr", "llm", "tts"):
        assert key in rec
    assert rec["llm"]["tokens_per_s"] > 0 and rec["asr"]["rtf"] > 0


def test_cli_run_on_silence_exits_zero_and_says_so(x86_bundle, tmp_path):
    wav = tmp_path / "silence.wav"
    write_wav(wav, silence(3.0))
    proc = _cli("run", "--bundle", str(x86_bundle), "--input", str(wav))
    assert proc.returncode == 0
    assert "no speech" in proc.stderr


def test_cli_run_on_a_corrupt_model_file_refuses_with_one_line(x86_bundle, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(x86_bundle, broken)
    vad = next((broken / "vad").glob("*.onnx"))
    data = bytearray(vad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    vad.write_bytes(bytes(data))
    wav = tmp_path / "silence.wav"
    write_wav(wav, silence(1.0))
    proc = _cli("run", "--bundle", str(broken), "--input", str(wav))
    assert proc.returncode == 1
    assert "does not match its sha256" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_run_on_a_file_that_is_not_audio_is_a_clear_error(x86_bundle, tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_text("this is not audio")
    proc = _cli("run", "--bundle", str(x86_bundle), "--input", str(bad))
    assert proc.returncode == 1
    assert "cannot read" in proc.stderr and "as audio" in proc.stderr


def test_cli_export_to_an_unknown_target_lists_the_known_ones():
    proc = _cli("export", "--target", "pi-zero")
    assert proc.returncode == 1
    assert "unknown target 'pi-zero'" in proc.stderr and "rpi5" in proc.stderr and "x86-dev" in proc.stderr
