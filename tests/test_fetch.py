"""`sottovoce models fetch`: wheels -> verified files in a cache; idempotent, offline-clear, corruption-proof."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge.errors import ModelFileError
from export.fetch import default_cache_dir, fetch_models, verify_cached, wheel_path
from export.recipes import load_recipe


@pytest.fixture()
def small_cache(tmp_path, model_cache) -> Path:
    """A private cache holding only the Silero VAD wheel (copied from the shared cache, no network)."""
    recipe = load_recipe("silero-vad")
    (name, version), = recipe.packages.items()
    src = wheel_path(name, version, model_cache)
    assert src is not None
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    shutil.copy(src, tmp_path / "cache" / "wheels" / src.name)
    return tmp_path / "cache"


def test_fetch_extracts_and_verifies_then_is_idempotent(small_cache):
    first = fetch_models(["silero-vad"], small_cache)
    assert [f.action for f in first] == ["extracted"]
    assert first[0].path.stat().st_size == 2327524
    second = fetch_models(["silero-vad"], small_cache)
    assert [f.action for f in second] == ["cached"]


def test_a_corrupted_cached_model_is_detected_and_repaired(small_cache):
    f, = fetch_models(["silero-vad"], small_cache)
    data = bytearray(f.path.read_bytes())
    data[1000] ^= 0xFF
    f.path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupt"):
        verify_cached(load_recipe("silero-vad"), small_cache)
    again, = fetch_models(["silero-vad"], small_cache)
    assert again.action == "extracted"
    verify_cached(load_recipe("silero-vad"), small_cache)


def test_offline_with_an_empty_cache_fails_with_one_clear_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    with pytest.raises(ModelFileError) as err:
        fetch_models(["silero-vad"], tmp_path / "empty")
    message = str(err.value)
    assert "silero-vad==6.2.3" in message and "no copy" in message
    assert "\n" not in message


def test_split_kokoro_parts_are_joined_into_the_published_model(model_cache):
    recipe = load_recipe("kokoro-82m")
    verify_cached(recipe, model_cache)  # sha256 of the joined file equals the package's model.sha256
    assert (model_cache / "models" / "kokoro-82m" / "kokoro-v1.0.int8.onnx").stat().st_size == 92_361_271


def test_the_default_cache_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SOTTOVOCE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
