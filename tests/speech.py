"""Test speech made offline: espeak-ng voices, resampled to 16 kHz mono, with optional noise/reverb.

Nothing is downloaded. Every helper returns float32 mono at 16 kHz unless it says otherwise.
"""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import soundfile as sf

from edge.audio import SAMPLE_RATE, resample


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak(text: str, voice: str = "en-us", speed: int = 150, pitch: int | None = None) -> np.ndarray:
    """Speak ``text`` with espeak-ng; return float32 mono at 16 kHz."""
    cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout"]
    if pitch is not None:
        cmd += ["-p", str(pitch)]
    wav = subprocess.run(cmd + [text], check=True, capture_output=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    return resample(audio, rate, SAMPLE_RATE)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


def add_noise(audio: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """Add white-ish noise at ``snr_db`` relative to the speech RMS."""
    rng = np.random.default_rng(seed)
    rms = float(np.sqrt(np.mean(audio**2)) + 1e-9)
    noise = rng.standard_normal(len(audio)).astype(np.float32)
    noise *= rms / (10 ** (snr_db / 20)) / (float(np.sqrt(np.mean(noise**2))) + 1e-9)
    return (audio + noise).astype(np.float32)


def add_reverb(audio: np.ndarray, rt60_s: float = 0.3, seed: int = 0) -> np.ndarray:
    """Convolve with a synthetic exponentially decaying room impulse response."""
    rng = np.random.default_rng(seed)
    n = int(rt60_s * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    ir = rng.standard_normal(n).astype(np.float32) * np.exp(-6.9 * t / rt60_s).astype(np.float32)
    ir[0] = 1.0
    ir /= np.sqrt(np.sum(ir**2))
    from scipy.signal import fftconvolve

    wet = fftconvolve(audio, ir)[: len(audio)].astype(np.float32)
    peak = float(np.max(np.abs(wet)) + 1e-9)
    return wet / peak * float(np.max(np.abs(audio)) + 1e-9)


def write_wav(path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    sf.write(str(path), audio, rate, subtype="PCM_16")
