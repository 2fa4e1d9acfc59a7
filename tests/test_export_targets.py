"""Whole exports per target through the real CLI: a signed INT8 rpi5 bundle that passes every gate, verifies,
answers a spoken question and comes out byte-identical twice; a Jetson bundle with the fp16 LLM and the
TensorRT options. The stage exports are cached (the x86-dev test bundle and the LLM tests fill the cache)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.speech import espeak, silence, write_wav

pytestmark = pytest.mark.models


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sottovoce", *args], capture_output=True, text=True, timeout=900,
                          cwd=Path(__file__).resolve().parents[1])


def _export(target: str, out: Path, *extra: str) -> dict:
    proc = _cli("export", "--target", target, "--out", str(out), "--json", *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    key = tmp_path_factory.mktemp("keys") / "signing"
    assert _cli("keys", "generate", "--out", str(key)).returncode == 0
    return key


def test_a_signed_int8_rpi5_bundle_passes_every_gate_verifies_answers_and_is_reproducible(
        x86_bundle, model_cache, keys, tmp_path, espeak_available):
    result = _export("rpi5", tmp_path / "a" / "rpi5.svb", "--sign-key", str(keys))
    assert result["signed"] and result["target"] == "rpi5"
    stages = {s["stage"]: s for s in result["stages"]}
    assert set(stages) >= {"vad", "asr", "llm", "tts"}
    assert all(s["gate"] in ("passed", "n/a") for s in stages.values()), stages
    assert stages["llm"]["scheme"] == "dynamic-int8" and stages["llm"]["gate"] == "passed"
    assert stages["llm"]["size_bytes"] < 0.5 * stages["llm"]["float_bytes"]
    svb = Path(result["svb"])

    assert _cli("bundle", "verify", str(svb), "--key", f"{keys}.pub").returncode == 0
    other = tmp_path / "other"
    assert _cli("keys", "generate", "--out", str(other)).returncode == 0
    refused = _cli("bundle", "verify", str(svb), "--key", f"{other}.pub")
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1

    wav = tmp_path / "q.wav"
    write_wav(wav, np.concatenate([silence(0.3), espeak("What is the capital of France?"), silence(1.5)]))
    run = _cli("run", "--bundle", str(svb), "--trust", f"{keys}.pub", "--input", str(wav),
               "--output", str(tmp_path / "reply.wav"), "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    rec, = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert "france" in rec["transcript"].lower() and "paris" in rec["reply"].lower()

    again = _export("rpi5", tmp_path / "b" / "rpi5.svb", "--sign-key", str(keys))
    assert Path(again["svb"]).read_bytes() == svb.read_bytes()  # same inputs, same bytes


def test_a_jetson_bundle_ships_the_fp16_llm_with_tensorrt_options(x86_bundle, model_cache, tmp_path):
    result = _export("jetson-orin-nano", tmp_path / "jetson.svb")
    stages = {s["stage"]: s for s in result["stages"]}
    assert stages["llm"]["scheme"] == "fp16" and stages["llm"]["gate"] == "passed"
    assert all(s["gate"] in ("passed", "n/a") for s in stages.values()), stages
    manifest = json.loads((Path(result["dir"]) / "manifest.json").read_text())
    trt = manifest["target"]["profile"]["runtime"]["tensorrt"]
    assert trt["trt_fp16_enable"] is True and trt["trt_engine_cache_enable"] is True
    assert manifest["target"]["profile"]["runtime"]["providers"][0] == "TensorrtExecutionProvider"
