"""Mechanics of the streaming loop with simple, deterministic stage doubles (the real models are tested in
test_turn.py): ordering, streaming overlap, bounded queues, barge-in, silence, long input."""

from __future__ import annotations

import threading
import time

import numpy as np

from edge.audio import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame
from edge.endpoint import EndpointConfig
from edge.pipeline import LoopConfig, VoiceLoop
from edge.stages.base import GenerationStats, Stages


class EnergyVad:
    """Speech = loud frame. Good enough to drive the loop with synthetic tones."""

    frame_samples = FRAME_SAMPLES

    def reset(self):
        pass

    def probability(self, frame):
        return 1.0 if np.abs(frame.astype(np.float32)).mean() > 1000 else 0.0


class ToneLengthAsr:
    """'Transcribes' a tone by its length in tenths of a second, so each turn is distinguishable."""

    def __init__(self):
        self.calls = 0

    def transcribe(self, audio):
        self.calls += 1
        loud = int((np.abs(audio) > 0.03).sum())
        return f"tone {round(loud / SAMPLE_RATE * 10)}" if loud else ""


class SlowWordsLlm:
    """Streams N words slowly; honours cancel."""

    def __init__(self, words=12, delay=0.02):
        self.words, self.delay = words, delay

    def stream(self, messages, *, max_new_tokens, cancel=None, stats=None):
        stats = stats or GenerationStats()
        t0 = time.perf_counter()
        for i in range(min(self.words, max_new_tokens)):
            if cancel is not None and cancel.is_set():
                stats.stopped_by = "cancel"
                return
            time.sleep(self.delay)
            stats.new_tokens += 1
            stats.decode_s = time.perf_counter() - t0
            yield f"word{i}{'.' if i % 4 == 3 else ''} "
        stats.stopped_by = "eos"


class BeepTts:
    sample_rate = 24_000

    def synthesize(self, text):
        return np.full(int(0.05 * self.sample_rate * max(1, len(text.split()))), 0.1, np.float32)


class History:
    def __init__(self):
        self.turns = []

    def messages_for(self, user_text):
        return []

    def add_turn(self, user_text, reply_text):
        self.turns.append((user_text, reply_text))


class SentenceSplitter:
    def __init__(self):
        self.buf = ""

    def push(self, piece):
        self.buf += piece
        if "." in self.buf:
            head, _, self.buf = self.buf.rpartition(".")
            return [head + "."]
        return []

    def flush(self):
        out, self.buf = [self.buf] if self.buf.strip() else [], ""
        return out


class ListSource:
    def __init__(self, audio, realtime=False):
        self.audio, self.realtime = audio, realtime

    def frames(self):
        pcm = (np.clip(self.audio, -1, 1) * 32767).astype(np.int16)
        start = time.monotonic()
        for i in range(len(pcm) // FRAME_SAMPLES):
            frame = AudioFrame(pcm[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES], i)
            if self.realtime:
                delay = start + frame.end_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            yield frame

    def close(self):
        pass


class MemorySink:
    sample_rate = 24_000

    def __init__(self):
        self.blocks, self.flushes = [], 0

    def write(self, audio):
        self.blocks.append(audio)

    def flush(self):
        self.flushes += 1

    def close(self):
        pass


def tone(seconds):
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sign(np.sin(2 * np.pi * 220 * t) + 1e-9)).astype(np.float32)  # square: every sample loud


def gap(seconds):
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


CFG = LoopConfig(endpoint=EndpointConfig(min_speech_ms=64, hangover_ms=320, pre_roll_ms=96, max_turn_s=10),
                 partial_interval_s=0.5)


def make_loop(llm=None, config=CFG, history=None):
    stages = Stages(vad=EnergyVad(), asr=ToneLengthAsr(), llm=llm or SlowWordsLlm(), tts=BeepTts())
    return VoiceLoop(stages, history or History(), SentenceSplitter, config)


def test_two_turns_in_one_file_are_answered_in_order():
    history = History()
    audio = np.concatenate([gap(0.3), tone(1.0), gap(1.0), tone(2.0), gap(1.0)])
    records = make_loop(history=history).run(ListSource(audio), MemorySink())
    assert [r.transcript for r in records] == ["tone 10", "tone 20"]
    assert [t[0] for t in history.turns] == ["tone 10", "tone 20"]


def test_tts_starts_before_the_llm_has_finished():
    records = make_loop().run(ListSource(np.concatenate([tone(1.0), gap(1.0)])), MemorySink())
    rec, = records
    assert rec.tts_first_audio_ms < rec.llm_done_ms
    assert rec.endpoint_ms <= rec.asr_final_ms <= rec.llm_first_token_ms <= rec.tts_first_audio_ms <= rec.playback_start_ms
    assert rec.voice_to_voice_ms == rec.playback_start_ms


class TimedWordsLlm(SlowWordsLlm):
    """SlowWordsLlm that notes when each word is produced."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.times = []

    def stream(self, messages, **kw):
        for piece in super().stream(messages, **kw):
            self.times.append(time.monotonic())
            yield piece


class SlowFirstTts(BeepTts):
    """The first clause takes 0.4 s to synthesize; notes when it started and ended."""

    def __init__(self):
        self.spans = []

    def synthesize(self, text):
        t0 = time.monotonic()
        time.sleep(0.4 if not self.spans else 0.01)
        self.spans.append((t0, time.monotonic()))
        return super().synthesize(text)


def _words_during_first_clause(config):
    llm, tts = TimedWordsLlm(words=16, delay=0.01), SlowFirstTts()
    loop = VoiceLoop(Stages(vad=EnergyVad(), asr=ToneLengthAsr(), llm=llm, tts=tts), History(), SentenceSplitter,
                     config)
    rec, = loop.run(ListSource(np.concatenate([tone(1.0), gap(1.0)])), MemorySink())
    start, end = tts.spans[0]
    return sum(start + 0.02 < t < end - 0.02 for t in llm.times), rec


def test_the_llm_waits_while_the_first_clause_is_synthesized_and_then_finishes():
    from dataclasses import replace

    during, rec = _words_during_first_clause(CFG)
    assert during == 0 and rec.llm["new_tokens"] == 16  # paused, then the whole reply
    assert rec.tts_first_audio_ms < rec.llm_done_ms
    during_off, _ = _words_during_first_clause(replace(CFG, first_audio_priority_s=0))
    assert during_off >= 5  # without the priority the LLM keeps generating meanwhile


class DeafAsr:
    """Hears sound but never words (a mumble, a voice the model cannot read)."""

    def transcribe(self, audio):
        return "♪" if len(audio) else ""


def test_speech_without_words_is_reprompted_and_a_short_noise_is_ignored():
    from dataclasses import replace

    def run(audio, config=CFG):
        loop = VoiceLoop(Stages(vad=EnergyVad(), asr=DeafAsr(), llm=SlowWordsLlm(), tts=BeepTts()), History(),
                         SentenceSplitter, config)
        sink = MemorySink()
        return loop.run(ListSource(audio), sink), sink

    (rec,), sink = run(np.concatenate([tone(1.0), gap(1.0)]))
    assert rec.status == "not_understood" and rec.transcript == "" and rec.reply == CFG.reprompt_text
    assert rec.voice_to_voice_ms is not None and rec.llm == {}  # spoken without asking the LLM
    assert run(np.concatenate([tone(0.3), gap(1.0)]))[0] == []  # a short sound: no turn, no answer
    assert run(np.concatenate([tone(1.0), gap(1.0)]), replace(CFG, reprompt_text=""))[0] == []


class FinalDeafAsr:
    """Reads words in a partial but hears none in the final decode of the whole segment."""

    def transcribe(self, audio):
        return "tone partial" if len(audio) < 0.9 * SAMPLE_RATE else ""


def test_an_empty_final_transcript_falls_back_to_the_last_partial():
    loop = VoiceLoop(Stages(vad=EnergyVad(), asr=FinalDeafAsr(), llm=SlowWordsLlm(), tts=BeepTts()), History(),
                     SentenceSplitter, CFG)
    rec, = loop.run(ListSource(np.concatenate([tone(1.0), gap(1.0)])), MemorySink())
    assert rec.transcript == "tone partial" and rec.transcript_from == "last_partial"
    assert rec.status == "answered" and rec.reply


class LengthLoggingAsr(ToneLengthAsr):
    """ToneLengthAsr that keeps the length of every segment it decodes."""

    def __init__(self):
        super().__init__()
        self.lengths = []

    def transcribe(self, audio):
        self.lengths.append(len(audio))
        return super().transcribe(audio)


def _run_logging(audio, config=CFG):
    asr = LengthLoggingAsr()
    loop = VoiceLoop(Stages(vad=EnergyVad(), asr=asr, llm=SlowWordsLlm(), tts=BeepTts()), History(),
                     SentenceSplitter, config)
    return loop.run(ListSource(audio), MemorySink()), asr


def test_the_turn_is_decoded_during_the_hangover_and_the_endpoint_reuses_it():
    from dataclasses import replace

    (rec,), asr = _run_logging(np.concatenate([tone(1.0), gap(1.0)]), replace(CFG, early_final_after_ms=160))
    (late,), late_asr = _run_logging(np.concatenate([tone(1.0), gap(1.0)]), replace(CFG, early_final_after_ms=0))
    assert rec.transcript == late.transcript == "tone 10"
    assert len(asr.lengths) == len(late_asr.lengths)  # the same number of decodes, made earlier
    assert asr.lengths[-1] < late_asr.lengths[-1]  # without the rest of the hangover's silence
    assert rec.asr_final_ms - rec.endpoint_ms < 30  # nothing left to decode at the endpoint


def test_speech_after_a_short_pause_discards_the_decode_made_in_the_pause():
    from dataclasses import replace

    (rec,), asr = _run_logging(np.concatenate([tone(1.0), gap(0.25), tone(0.5), gap(1.0)]),
                               replace(CFG, early_final_after_ms=96))
    assert len(asr.lengths) >= 4  # a decode was made in the pause
    assert rec.transcript == "tone 15"  # both parts, not the 1 s decoded during the pause


def test_partials_arrive_while_the_user_is_still_speaking():
    rec, = make_loop().run(ListSource(np.concatenate([tone(3.0), gap(1.0)])), MemorySink())
    before_end = [p for p in rec.partials if p["ms_before_end"] > 0]
    assert len(before_end) >= 3  # one every 0.5 s of a 3 s utterance (the first needs 0.5 s of audio)


def test_silence_gives_no_turn():
    assert make_loop().run(ListSource(gap(5.0)), MemorySink()) == []


def test_endpoint_wait_is_counted_in_audio_time_even_when_reading_faster_than_real_time():
    t0 = time.monotonic()
    rec, = make_loop().run(ListSource(np.concatenate([tone(1.0), gap(2.0)])), MemorySink())
    assert time.monotonic() - t0 < 3.0  # faster than real time
    assert abs(rec.endpoint_ms - 320) <= 32  # the hangover, in audio time


def test_barge_in_cancels_the_reply_and_the_new_turn_is_answered():
    slow = SlowWordsLlm(words=60, delay=0.05)  # a 3 s reply
    sink = MemorySink()
    audio = np.concatenate([tone(0.6), gap(0.8), tone(0.8), gap(1.5)])
    records = make_loop(llm=slow).run(ListSource(audio, realtime=True), sink)
    assert [r.status for r in records] == ["interrupted", "answered"]
    assert records[0].interrupted and records[0].llm["stopped_by"] == "cancel"
    assert sink.flushes >= 1


def test_a_stage_failure_stops_the_loop_and_surfaces_the_error():
    class BrokenLlm:
        def stream(self, *a, **k):
            raise RuntimeError("model exploded")
            yield  # pragma: no cover

    loop = make_loop(llm=BrokenLlm())
    try:
        loop.run(ListSource(np.concatenate([tone(1.0), gap(1.0)])), MemorySink())
    except RuntimeError as exc:
        assert "model exploded" in str(exc)
    else:
        raise AssertionError("the loop swallowed a stage error")
    assert not [t for t in threading.enumerate() if t.name.startswith("sottovoce-") and t.is_alive()]


def test_the_turn_audio_starts_a_pre_roll_before_the_first_speech_frame():
    class RecordingAsr(ToneLengthAsr):
        def transcribe(self, audio):
            self.last = audio
            return super().transcribe(audio)

    asr = RecordingAsr()
    stages = Stages(vad=EnergyVad(), asr=asr, llm=SlowWordsLlm(words=2), tts=BeepTts())
    cfg = LoopConfig(endpoint=EndpointConfig(min_speech_ms=160, hangover_ms=320, pre_roll_ms=192, max_turn_s=10),
                     partial_interval_s=5.0)
    VoiceLoop(stages, History(), SentenceSplitter, cfg).run(ListSource(np.concatenate([gap(1.0), tone(1.0), gap(1.0)])),
                                                            MemorySink())
    leading_silence = int(np.argmax(np.abs(asr.last) > 0.03))
    assert leading_silence >= 0.15 * SAMPLE_RATE  # the whole onset is there, with ~192 ms of room before it
