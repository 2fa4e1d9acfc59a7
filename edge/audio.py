"""The audio frame contract: 16 kHz mono int16 PCM, VAD frames of 512 samples (32 ms).

Everything that flows into the loop is converted to this format at the edge of the system
(file readers, device backends); everything inside can rely on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import numpy as np

SAMPLE_RATE = 16_000
FRAME_SAMPLES = 512
FRAME_MS = FRAME_SAMPLES * 1000 / SAMPLE_RATE  # 32.0
SAMPLE_WIDTH = 2  # bytes, int16 little-endian
CHANNELS = 1


@dataclass(frozen=True)
class AudioFormat:
    """Sample rate, width (bytes) and channel count of a PCM stream (Wyoming's ``rate/width/channels``)."""

    rate: int = SAMPLE_RATE
    width: int = SAMPLE_WIDTH
    channels: int = CHANNELS


INPUT_FORMAT = AudioFormat()


@dataclass(frozen=True)
class AudioFrame:
    """One VAD frame of input audio.

    ``samples`` is int16, shape ``(FRAME_SAMPLES,)``; ``index`` counts frames from the start of
    the stream, so ``start_s = index * FRAME_MS / 1000`` is its position in audio time.
    """

    samples: np.ndarray
    index: int

    @property
    def start_s(self) -> float:
        return self.index * FRAME_SAMPLES / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return (self.index + 1) * FRAME_SAMPLES / SAMPLE_RATE


def int16_to_float(samples: np.ndarray) -> np.ndarray:
    """int16 PCM -> float32 in [-1, 1)."""
    return samples.astype(np.float32) / 32768.0


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    """float PCM in [-1, 1] -> int16, clipped."""
    return np.clip(np.round(samples * 32767.0), -32768, 32767).astype(np.int16)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Downmix ``(n, channels)`` to ``(n,)`` by averaging; 1-D input is returned as is."""
    if samples.ndim == 1:
        return samples
    return samples.mean(axis=1).astype(samples.dtype, copy=False)


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited polyphase resampling of a float32 mono signal (scipy ``resample_poly``)."""
    if rate_in == rate_out:
        return samples.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = gcd(rate_in, rate_out)
    return resample_poly(samples, rate_out // g, rate_in // g).astype(np.float32)


class StreamResampler:
    """Resample a stream block by block with bounded memory and no seams between blocks.

    Uses ``scipy.signal.resample_poly`` on each block with an overlap of ``pad`` input samples
    on both sides, then trims the overlap: blocks join without clicks.
    """

    def __init__(self, rate_in: int, rate_out: int, pad: int = 256) -> None:
        self.rate_in, self.rate_out, self.pad = rate_in, rate_out, pad
        g = gcd(rate_in, rate_out)
        self.up, self.down = rate_out // g, rate_in // g
        self._history = np.zeros(0, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        self._emitted_in = 0  # input samples whose output has been emitted

    def process(self, block: np.ndarray, final: bool = False) -> np.ndarray:
        """Feed float32 mono ``block``; return the resampled output that is now final."""
        if self.up == self.down:
            return block.astype(np.float32, copy=False)
        from scipy.signal import resample_poly

        self._pending = np.concatenate([self._pending, block.astype(np.float32)])
        ready = len(self._pending) if final else len(self._pending) - self.pad
        # emit whole multiples of `down` input samples so output lengths are exact
        ready = ready - (ready % self.down) if not final else ready
        if ready <= 0:
            return np.zeros(0, dtype=np.float32)
        lookahead = self._pending[ready: ready + self.pad]
        window = np.concatenate([self._history, self._pending[:ready], lookahead])
        out = resample_poly(window, self.up, self.down)
        start = len(self._history) * self.up // self.down
        n_out = int(np.ceil(ready * self.up / self.down)) if final else ready * self.up // self.down
        result = out[start:start + n_out].astype(np.float32)
        consumed = self._pending[:ready]
        self._history = np.concatenate([self._history, consumed])[-self.pad:]
        self._pending = self._pending[ready:]
        return result
