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


@pytest.fixture(scope="session")
def x86_bundle(model_cache) -> Path:
    """The real x86-dev bundle, exported once (the LLM export is cached across runs)."""
    from export.builder import ExportOptions, build_bundle

    out = model_cache / "test-bundles" / "x86-dev"
    result = build_bundle(ExportOptions(target="x86-dev", out_dir=out, svb=out.with_suffix(".svb"), cache=model_cache))
    return result.out_dir


@pytest.fixture(scope="session")
def voice_session(x86_bundle):
    """The real stages loaded once for the whole test session."""
    from edge.session import build_session

    return build_session(x86_bundle)


@pytest.fixture(scope="session")
def x86_svb(x86_bundle) -> Path:
    """The packed form of the real x86-dev bundle."""
    return x86_bundle.with_suffix(".svb")
