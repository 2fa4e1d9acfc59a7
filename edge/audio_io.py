"""Audio backends: where input frames come from and where reply audio goes.

Sources yield ``AudioFrame``s (16 kHz mono int16, 512 samples) one by one, never holding a
whole file; sinks accept float32 blocks at their own rate and convert. Backends here: WAV
files and raw PCM pipes (stdin/stdout). The real-time device backend (sounddevice/ALSA) plugs
into the same two interfaces.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol

import numpy as np

from edge.audio import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    AudioFrame,
    StreamResampler,
    float_to_int16,
    int16_to_float,
)
from edge.errors import AudioInputError


class AudioSource(Protocol):
    """A stream of input frames. ``realtime`` sources deliver at the pace of the audio clock."""

    realtime: bool

    def frames(self) -> Iterator[AudioFrame]:
        """Yield frames in order until the input ends (or forever, for a live device)."""

    def close(self) -> None: ...


class AudioSink(Protocol):
    """Where reply audio goes."""

    sample_rate: int

    def write(self, audio: np.ndarray) -> None:
        """Queue float32 mono ``audio`` at ``sample_rate`` for output."""

    def flush(self) -> None:
        """Discard audio not yet played (barge-in). File sinks keep what was written."""

    def close(self) -> None: ...


class _Framer:
    """Cut a float32 16 kHz stream into int16 frames of ``FRAME_SAMPLES``; pads the last one."""

    def __init__(self) -> None:
        self._buf = np.zeros(0, dtype=np.int16)
        self.index = 0

    def push(self, block: np.ndarray) -> Iterator[AudioFrame]:
        self._buf = np.concatenate([self._buf, float_to_int16(block)])
        while len(self._buf) >= FRAME_SAMPLES:
            yield AudioFrame(self._buf[:FRAME_SAMPLES].copy(), self.index)
            self._buf = self._buf[FRAME_SAMPLES:]
            self.index += 1

    def finish(self) -> Iterator[AudioFrame]:
        if len(self._buf):
            pad = np.zeros(FRAME_SAMPLES - len(self._buf), dtype=np.int16)
            yield AudioFrame(np.concatenate([self._buf, pad]), self.index)
            self.index += 1
            self._buf = np.zeros(0, dtype=np.int16)


def _pace(start: float, frame: AudioFrame) -> None:
    """Sleep until the wall clock reaches the end of ``frame`` in audio time."""
    delay = start + frame.end_s - time.monotonic()
    if delay > 0:
        time.sleep(delay)


class WavFileSource:
    """Frames from a sound file (WAV/FLAC/OGG via libsndfile), any rate or channel count.

    Stereo is downmixed, other rates resampled to 16 kHz, block by block (bounded memory).
    With ``realtime=True`` frames are delivered at the audio clock's pace.
    """

    def __init__(self, path: Path | str, *, realtime: bool = False, block_frames: int = 16_000) -> None:
        import soundfile as sf

        self.path = Path(path)
        self.realtime = realtime
        self._block = block_frames
        try:
            self._file = sf.SoundFile(str(self.path))
        except Exception as exc:  # libsndfile errors are RuntimeError / LibsndfileError
            raise AudioInputError(f"cannot read {self.path} as audio: {str(exc).splitlines()[0]}") from exc
        self.input_rate = self._file.samplerate
        self.input_channels = self._file.channels
        if self.input_rate < 8000:
            raise AudioInputError(f"{self.path} is sampled at {self.input_rate} Hz; at least 8000 Hz is needed for speech")

    @property
    def duration_s(self) -> float:
        return self._file.frames / self.input_rate if self._file.frames > 0 else 0.0

    def frames(self) -> Iterator[AudioFrame]:
        resampler = StreamResampler(self.input_rate, SAMPLE_RATE)
        framer = _Framer()
        start = time.monotonic()
        for block in self._file.blocks(blocksize=self._block, dtype="float32", always_2d=True):
            mono = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
            for frame in framer.push(resampler.process(mono)):
                if self.realtime:
                    _pace(start, frame)
                yield frame
        for frame in framer.push(resampler.process(np.zeros(0, np.float32), final=True)):
            yield frame
        yield from framer.finish()

    def close(self) -> None:
        self._file.close()


class RawPcmSource:
    """Frames from raw 16 kHz mono s16le PCM on a binary stream (a pipe, stdin, a FIFO)."""

    def __init__(self, stream: BinaryIO | None = None, *, realtime: bool = False) -> None:
        self._stream = stream if stream is not None else sys.stdin.buffer
        self.realtime = realtime

    def frames(self) -> Iterator[AudioFrame]:
        framer = _Framer()
        start = time.monotonic()
        nbytes = FRAME_SAMPLES * 2
        pending = b""
        while True:
            chunk = self._stream.read(nbytes - len(pending))
            if not chunk:
                break
            pending += chunk
            if len(pending) < nbytes:
                continue
            samples = np.frombuffer(pending, dtype="<i2")
            pending = b""
            for frame in framer.push(int16_to_float(samples)):
                if self.realtime:
                    _pace(start, frame)
                yield frame
        if pending:
            usable = len(pending) - len(pending) % 2
            yield from framer.push(int16_to_float(np.frombuffer(pending[:usable], dtype="<i2")))
        yield from framer.finish()

    def close(self) -> None:
        pass


class WavFileSink:
    """Writes reply audio to a 16-bit PCM WAV at ``sample_rate`` (streamed, not buffered)."""

    def __init__(self, path: Path | str, sample_rate: int = 24_000) -> None:
        import soundfile as sf

        self.path = Path(path)
        self.sample_rate = sample_rate
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = sf.SoundFile(str(self.path), mode="w", samplerate=sample_rate, channels=1, subtype="PCM_16")
        self.samples_written = 0

    def write(self, audio: np.ndarray) -> None:
        self._file.write(np.asarray(audio, dtype=np.float32))
        self.samples_written += len(audio)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._file.close()


class RawPcmSink:
    """Writes reply audio as raw s16le mono at ``sample_rate`` to a binary stream (stdout by default)."""

    def __init__(self, stream: BinaryIO | None = None, sample_rate: int = 24_000) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        self.sample_rate = sample_rate

    def write(self, audio: np.ndarray) -> None:
        self._stream.write(float_to_int16(np.asarray(audio, dtype=np.float32)).astype("<i2").tobytes())
        self._stream.flush()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        try:
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            pass


class NullSink:
    """Discards audio (profiling without output)."""

    def __init__(self, sample_rate: int = 24_000) -> None:
        self.sample_rate = sample_rate

    def write(self, audio: np.ndarray) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
