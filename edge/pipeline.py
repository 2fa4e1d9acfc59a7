"""The streaming loop: VAD -> ASR -> LLM -> TTS -> audio out, one worker per stage.

Threads and bounded queues (onnxruntime releases the GIL, so stages really overlap):

    capture (caller's thread): source frames -> VAD -> endpointer -> asr_q
    asr worker:    partial hypotheses while the user speaks, a final at end of turn -> llm_q
    llm worker:    streams tokens, cuts clauses as they complete -> tts_q
    tts worker:    speaks clause by clause -> out_q
    output worker: writes to the sink; the turn's record is emitted when its audio is out

Barge-in: with a real-time source, speech detected while a reply is in flight cancels that
turn (LLM generation, queued clauses and audio, and the sink's unplayed buffer) and a new turn
starts. While the device itself is speaking the VAD needs ``barge_in_threshold`` (higher than the
normal threshold) to count, a simple echo gate against hearing its own voice.

With a file source read faster than real time, the loop waits for each reply before reading on,
as a listener would; there is no barge-in then, and latencies are reported on the listener's
timeline (see ``edge.metrics``).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from edge.audio import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame, int16_to_float, resample
from edge.audio_io import AudioSink, AudioSource
from edge.endpoint import EndpointConfig, Endpointer, EventKind
from edge.metrics import TurnRecord
from edge.stages.base import ChatMessage, GenerationStats, Stages
from edge.text import clean_transcript

log = logging.getLogger("sottovoce.pipeline")

_POLL_S = 0.05


class ConversationHistory(Protocol):
    def messages_for(self, user_text: str) -> list[ChatMessage]: ...

    def add_turn(self, user_text: str, reply_text: str) -> None: ...


class ClauseSplitterLike(Protocol):
    def push(self, piece: str) -> list[str]: ...

    def flush(self) -> list[str]: ...


@dataclass(frozen=True)
class LoopConfig:
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    max_new_tokens: int = 64
    partial_interval_s: float = 0.6  # re-decode the growing segment this often (audio time)
    # once the user has been silent this long, decode the turn already (while the endpointer still waits
    # out its hangover); the endpoint then reuses that transcript unless speech came back. 0: off
    early_final_after_ms: float = 256.0  # +64 ms before tail frames start: 0.32 s of silence (Moonshine: 0.22 s cost ~1 WER point on some voices, 0.38 s none)
    barge_in: bool = True
    barge_in_threshold: float = 0.8  # VAD probability needed while the device speaks (echo gate)
    gap_between_replies_s: float = 0.25  # silence written between replies on a file sink
    queue_frames: int = 1024  # asr_q bound (32 s of audio at most in flight)
    # hold the LLM between tokens while the first clause of a reply is synthesized (the listener is
    # waiting on that audio, and on a small CPU the two stages slow each other down); at most this long
    first_audio_priority_s: float = 5.0
    # said when the user clearly spoke (at least reprompt_min_speech_s) but the ASR heard no words;
    # shorter unrecognized sounds (a cough, a door) get no answer. "" turns the reprompt off.
    reprompt_text: str = "Sorry, I didn't catch that."
    reprompt_min_speech_s: float = 0.6


@dataclass
class _Turn:
    """One user turn in flight through the workers."""

    id: int
    record: TurnRecord
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    endpoint_wall: float = 0.0  # wall clock at the endpoint decision
    audio: list[np.ndarray] = field(default_factory=list)
    first_audio_out: bool = False
    first_clause_done: threading.Event = field(default_factory=threading.Event)  # TTS has its first audio

    def listener_ms(self, wall: float) -> float:
        """Listener-timeline ms (0 = end of speech) of a wall-clock instant after the endpoint."""
        return self.record.endpoint_ms + (wall - self.endpoint_wall) * 1000.0


class _Stop:
    """Sentinel that shuts a worker down and is passed on downstream."""


_STOP = _Stop()


class VoiceLoop:
    """Runs the four stages on an audio source and sink; emits one ``TurnRecord`` per answered turn."""

    def __init__(
        self,
        stages: Stages,
        history: ConversationHistory,
        splitter_factory: Callable[[], ClauseSplitterLike],
        config: LoopConfig | None = None,
        on_turn: Callable[[TurnRecord], None] | None = None,
        on_event: Callable[[str, dict], None] | None = None,
    ) -> None:
        self.stages = stages
        self.history = history
        self.splitter_factory = splitter_factory
        self.config = config or LoopConfig()
        self.on_turn = on_turn or (lambda r: None)
        self.on_event = on_event or (lambda kind, data: None)
        self.records: list[TurnRecord] = []
        self._error: BaseException | None = None
        self._failed = threading.Event()
        self._active: _Turn | None = None  # the turn whose reply is in flight
        self._active_lock = threading.Lock()
        self._speaking = threading.Event()  # the device is playing reply audio
        self._realtime = False

    # ------------------------------------------------------------------ plumbing

    def _put(self, q: queue.Queue, item: object) -> None:
        while True:
            if self._failed.is_set():
                raise RuntimeError("pipeline stopped")
            try:
                q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _get(self, q: queue.Queue) -> object:
        """Next item, or ``_STOP`` as soon as another stage has failed (so no worker hangs)."""
        while True:
            if self._failed.is_set():
                return _STOP
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue

    def _worker(self, name: str, body: Callable[[], None]) -> threading.Thread:
        def run() -> None:
            try:
                body()
            except BaseException as exc:  # noqa: BLE001 - surfaced to the caller of run()
                if not self._failed.is_set():
                    self._error = exc
                    log.exception("stage %s failed", name)
                self._failed.set()

        thread = threading.Thread(target=run, name=f"sottovoce-{name}", daemon=True)
        thread.start()
        return thread

    # ------------------------------------------------------------------ main

    def run(self, source: AudioSource, sink: AudioSink) -> list[TurnRecord]:
        """Process ``source`` until it ends; return the records of every turn (also passed to ``on_turn``).

        Raises the first error a stage hit (after stopping the others).
        """
        cfg = self.config
        self._realtime = bool(getattr(source, "realtime", False))
        asr_q: queue.Queue = queue.Queue(maxsize=cfg.queue_frames)
        llm_q: queue.Queue = queue.Queue(maxsize=4)
        tts_q: queue.Queue = queue.Queue(maxsize=32)
        out_q: queue.Queue = queue.Queue(maxsize=64)
        threads = [
            self._worker("asr", lambda: self._asr_worker(asr_q, llm_q)),
            self._worker("llm", lambda: self._llm_worker(llm_q, tts_q)),
            self._worker("tts", lambda: self._tts_worker(tts_q, out_q)),
            self._worker("out", lambda: self._output_worker(out_q, sink)),
        ]
        try:
            self._capture(source, asr_q, sink)
        except BaseException as exc:
            if self._error is None:
                self._error = exc
            self._failed.set()
        finally:
            if not self._failed.is_set():
                try:
                    self._put(asr_q, _STOP)
                except RuntimeError:
                    pass
            for t in threads:
                t.join()
            source.close()
        if self._error is not None:
            raise self._error
        return self.records

    # ------------------------------------------------------------------ capture + VAD

    def _capture(self, source: AudioSource, asr_q: queue.Queue, sink: AudioSink) -> None:
        cfg = self.config
        vad = self.stages.vad
        vad.reset()
        endpointer = Endpointer(cfg.endpoint)
        ep = cfg.endpoint
        pre_frames = ep.frames(ep.pre_roll_ms)
        # the frames of the minimum-speech run are still in the pre-roll when the turn opens: keep both
        pre_roll: collections.deque[AudioFrame] = collections.deque(maxlen=pre_frames + ep.frames(ep.min_speech_ms) + 1)
        turn: _Turn | None = None
        turn_id = 0
        last_index = -1
        for frame in source.frames():
            if self._failed.is_set():
                return
            last_index = frame.index
            prob = vad.probability(frame.samples)
            if self._speaking.is_set() and not endpointer.in_turn:
                # echo gate: while the device speaks, only a confident voice opens a turn
                prob = prob if prob >= cfg.barge_in_threshold else 0.0
            events = endpointer.push(frame.index, prob)
            if turn is not None:
                # frames of the trailing silence (hangover, up to the frame that ends it) are kept but trigger
                # no partial decode
                ended = any(e.kind is EventKind.SPEECH_END and not e.forced for e in events)
                silent = ended or endpointer.trailing_silence_frames >= 2
                self._put(asr_q, ("tail" if silent else "audio", turn, frame))
            else:
                pre_roll.append(frame)
            for event in events:
                if event.kind is EventKind.SPEECH_START:
                    turn_id += 1
                    if source.realtime and cfg.barge_in:
                        self._barge_in(sink)
                    start_frame = event.frame - pre_frames
                    record = TurnRecord(turn=turn_id, speech_start_s=event.frame * FRAME_SAMPLES / SAMPLE_RATE,
                                        speech_end_s=0.0)
                    turn = _Turn(id=turn_id, record=record)
                    self.on_event("speech_start", {"turn": turn_id, "at_s": record.speech_start_s})
                    self._put(asr_q, ("start", turn, None))
                    for f in pre_roll:
                        if f.index >= start_frame:
                            self._put(asr_q, ("audio", turn, f))
                    pre_roll.clear()
                elif event.kind is EventKind.SPEECH_END and turn is not None:
                    self._end_turn(turn, event.frame, event.decided_at, event.forced, asr_q)
                    finished, turn = turn, None
                    if not source.realtime:
                        self._wait_for(finished)
        if turn is not None:
            for event in endpointer.finish(max(last_index, 0)):
                self._end_turn(turn, event.frame, event.decided_at, False, asr_q)
                if not source.realtime:
                    self._wait_for(turn)

    def _end_turn(self, turn: _Turn, last_speech: int, decided_at: int, forced: bool, asr_q: queue.Queue) -> None:
        rec = turn.record
        rec.speech_end_s = (last_speech + 1) * FRAME_SAMPLES / SAMPLE_RATE
        rec.endpoint_ms = (decided_at - last_speech) * FRAME_SAMPLES / SAMPLE_RATE * 1000.0
        rec.forced_end = forced
        turn.endpoint_wall = time.monotonic()
        self.on_event("speech_end", {"turn": turn.id, "at_s": rec.speech_end_s})
        self._put(asr_q, ("end", turn, None))

    def _wait_for(self, turn: _Turn) -> None:
        while not turn.done.wait(_POLL_S):
            if self._failed.is_set():
                return

    def _barge_in(self, sink: AudioSink) -> None:
        with self._active_lock:
            active = self._active
        if active is not None and not active.done.is_set():
            active.cancel.set()
            active.record.interrupted = True
            sink.flush()
            self._speaking.clear()
            self.on_event("barge_in", {"turn": active.id})

    # ------------------------------------------------------------------ ASR

    def _asr_worker(self, asr_q: queue.Queue, llm_q: queue.Queue) -> None:
        asr = self.stages.asr
        interval = int(self.config.partial_interval_s * SAMPLE_RATE)
        early_after = int(self.config.early_final_after_ms / 1000 * SAMPLE_RATE)
        segment: list[np.ndarray] = []
        samples = tail = 0
        next_partial = interval
        early: tuple[str, float, int] | None = None  # (transcript, compute s, samples) decoded in the hangover
        while True:
            item = self._get(asr_q)
            if isinstance(item, _Stop):
                self._put(llm_q, _STOP)
                return
            kind, turn, frame = item
            if kind == "start":
                segment, samples, tail, next_partial, early = [], 0, 0, interval, None
            elif kind in ("audio", "tail"):
                segment.append(int16_to_float(frame.samples))
                samples += len(frame.samples)
                if kind == "tail":
                    tail += len(frame.samples)
                    if early_after and early is None and tail >= early_after:
                        t0 = time.perf_counter()
                        early = (clean_transcript(asr.transcribe(np.concatenate(segment))),
                                 time.perf_counter() - t0, samples)
                    continue
                tail, early = 0, None  # the user speaks again: a decode made in the pause is stale
                # live input: skip a partial when the ASR lags (the final matters more); files: always
                if samples >= next_partial and (not self._realtime or asr_q.qsize() < 8):
                    next_partial = samples + interval
                    audio = np.concatenate(segment)
                    t0 = time.perf_counter()
                    text = clean_transcript(asr.transcribe(audio))
                    spent = time.perf_counter() - t0
                    at_s = frame.end_s
                    if text:
                        turn.record.partials.append({"text": text, "at_s": at_s, "compute_ms": spent * 1000})
                        self.on_event("partial", {"turn": turn.id, "text": text})
            elif kind == "end":
                if not self._realtime:
                    # a file is read faster than real time: the endpoint is "now" only once the ASR has caught up
                    # with the audio before it, as it would have live (partials overlap the speech there)
                    turn.endpoint_wall = time.monotonic()
                if early is not None:  # decoded during the hangover: nothing (or less) left at the endpoint
                    text, spent, decoded = early
                    if not self._realtime:
                        # live, that decode began (samples - decoded) samples before the endpoint: the part of
                        # it that would run past the endpoint still delays the reply
                        turn.endpoint_wall -= max(0.0, spent - (samples - decoded) / SAMPLE_RATE)
                    early = None
                else:
                    decoded = samples
                    t0 = time.perf_counter()
                    text = clean_transcript(asr.transcribe(np.concatenate(segment))) if segment else ""
                    spent = time.perf_counter() - t0
                segment, samples, tail = [], 0, 0
                rec = turn.record
                if not text and rec.partials:
                    # the final decode of the whole segment can come back empty where a partial of the same
                    # speech read words (seen with Moonshine on some voices): better those words than none
                    text, rec.transcript_from = rec.partials[-1]["text"], "last_partial"
                rec.transcript = text
                rec.asr_final_ms = turn.listener_ms(time.monotonic())
                audio_ms = decoded / SAMPLE_RATE * 1000
                rec.asr.compute_ms, rec.asr.audio_ms, rec.asr.calls = spent * 1000, audio_ms, len(rec.partials) + 1
                rec.asr.rtf = spent * 1000 / audio_ms if audio_ms else None
                for p in rec.partials:
                    p["ms_before_end"] = (rec.speech_end_s - p["at_s"]) * 1000
                self.on_event("transcript", {"turn": turn.id, "text": text})
                self._put(llm_q, turn)

    # ------------------------------------------------------------------ LLM

    def _llm_worker(self, llm_q: queue.Queue, tts_q: queue.Queue) -> None:
        llm = self.stages.llm
        while True:
            turn = self._get(llm_q)
            if isinstance(turn, _Stop):
                self._put(tts_q, _STOP)
                return
            rec = turn.record
            if not rec.transcript:
                spoke_s = rec.speech_end_s - rec.speech_start_s
                if self.config.reprompt_text and spoke_s >= self.config.reprompt_min_speech_s:
                    rec.status, rec.reply = "not_understood", self.config.reprompt_text
                    self.on_event("reply", {"turn": turn.id, "text": rec.reply})
                    self._put(tts_q, ("clause", turn, rec.reply))
                else:
                    rec.status = "no_speech_recognized"
                self._put(tts_q, ("end", turn, None))
                continue
            with self._active_lock:
                self._active = turn
            splitter = self.splitter_factory()
            stats = GenerationStats()
            reply: list[str] = []
            messages = self.history.messages_for(rec.transcript)
            for piece in llm.stream(messages, max_new_tokens=self.config.max_new_tokens, cancel=turn.cancel,
                                    stats=stats):
                if turn.cancel.is_set():
                    break
                if not reply:
                    rec.llm_first_token_ms = turn.listener_ms(time.monotonic())
                reply.append(piece)
                for clause in splitter.push(piece):
                    self._put(tts_q, ("clause", turn, clause))
                    self._yield_to_first_audio(turn)
            if not turn.cancel.is_set():
                for clause in splitter.flush():
                    self._put(tts_q, ("clause", turn, clause))
            rec.llm_done_ms = turn.listener_ms(time.monotonic())
            rec.reply = "".join(reply).strip()
            rec.llm = {
                "prompt_tokens": stats.prompt_tokens,
                "new_tokens": stats.new_tokens,
                "prefill_ms": stats.prefill_s * 1000,
                "decode_ms": stats.decode_s * 1000,
                "tokens_per_s": stats.tokens_per_s,
                "stopped_by": stats.stopped_by or ("cancel" if turn.cancel.is_set() else ""),
            }
            self.on_event("reply", {"turn": turn.id, "text": rec.reply})
            if not turn.cancel.is_set():
                self.history.add_turn(rec.transcript, rec.reply)
            self._put(tts_q, ("end", turn, None))

    def _yield_to_first_audio(self, turn: _Turn) -> None:
        """Pause generation (between tokens) until the TTS worker has the first audio of ``turn``, the
        turn is cancelled, or ``first_audio_priority_s`` has passed; later clauses do not wait."""
        limit = self.config.first_audio_priority_s
        if limit <= 0 or turn.first_clause_done.is_set():
            return
        deadline = time.monotonic() + limit
        while not (turn.first_clause_done.is_set() or turn.cancel.is_set() or self._failed.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            turn.first_clause_done.wait(min(left, _POLL_S))

    # ------------------------------------------------------------------ TTS

    def _tts_worker(self, tts_q: queue.Queue, out_q: queue.Queue) -> None:
        tts = self.stages.tts
        while True:
            item = self._get(tts_q)
            if isinstance(item, _Stop):
                self._put(out_q, _STOP)
                return
            kind, turn, clause = item
            if kind == "clause" and not turn.cancel.is_set():
                t0 = time.perf_counter()
                audio = tts.synthesize(clause)
                spent = time.perf_counter() - t0
                rec = turn.record
                rec.tts.compute_ms += spent * 1000
                rec.tts.audio_ms += len(audio) / tts.sample_rate * 1000
                rec.tts.calls += 1
                rec.tts.rtf = rec.tts.compute_ms / rec.tts.audio_ms if rec.tts.audio_ms else None
                if rec.tts_first_audio_ms is None and len(audio):
                    rec.tts_first_audio_ms = turn.listener_ms(time.monotonic())
                if len(audio):
                    self._put(out_q, ("audio", turn, (audio, tts.sample_rate)))
                turn.first_clause_done.set()
            elif kind == "end":
                turn.first_clause_done.set()
                self._put(out_q, ("end", turn, None))

    # ------------------------------------------------------------------ output

    def _output_worker(self, out_q: queue.Queue, sink: AudioSink) -> None:
        wrote_any = False
        while True:
            item = self._get(out_q)
            if isinstance(item, _Stop):
                return
            kind, turn, payload = item
            rec = turn.record
            if kind == "audio":
                if turn.cancel.is_set():
                    continue
                audio, rate = payload
                if rate != sink.sample_rate:
                    audio = resample(audio, rate, sink.sample_rate)
                if not turn.first_audio_out:
                    turn.first_audio_out = True
                    if wrote_any and self.config.gap_between_replies_s > 0:
                        sink.write(np.zeros(int(self.config.gap_between_replies_s * sink.sample_rate), np.float32))
                    rec.playback_start_ms = turn.listener_ms(time.monotonic())
                    rec.voice_to_voice_ms = rec.playback_start_ms
                    self._speaking.set()
                    self.on_event("playback_start", {"turn": turn.id})
                sink.write(audio)
                wrote_any = True
                rec.reply_audio_s += len(audio) / sink.sample_rate
            elif kind == "end":
                self._speaking.clear()
                if turn.cancel.is_set():
                    rec.status = "interrupted"
                with self._active_lock:
                    if self._active is turn:
                        self._active = None
                if rec.status != "no_speech_recognized":
                    self.records.append(rec)
                    self.on_turn(rec)
                turn.done.set()
