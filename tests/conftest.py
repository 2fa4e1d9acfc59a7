"""Shared fixtures: the real model cache (fetched once, idempotent) and test speech."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.speech import have_espeak


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """The fetched default models (plus Whisper and microWakeWord); fetches on first use."""
    from export.fetch import default_cache_dir, fetch_models

    cache = default_cache_dir()
    fetch_models(None, cache)
    fetch_models(["whisper-tiny-en", "microwakeword"], cache)
    return cache


@pytest.fixture(scope="session")
def espeak_available() -> None:
    if not have_espeak():
        pytest.fail("espeak-ng is not installed (apt-get install espeak-ng); the speech tests need it")
