"""``export --llm PATH``: any local Hugging Face causal LM exports, and bad sources fail in one clear line.

Tiny random Llama and Qwen2 models (2 layers, hidden 32) are built here with SmolLM2's tokenizer and chat
template; each exports in a few seconds. Random weights are drawn wide (``initializer_range`` 0.2) so that
greedy decoding produces varied tokens, which makes "same tokens as torch" a real check.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge.errors import ConfigError, ModelFileError
from edge.stages.base import ChatMessage
from export.disk import DiskSpaceError
from tests.test_llm import _load

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tokenizer(model_cache):
    """SmolLM2's transformers tokenizer (with its chat template), from the cached float conversion."""
    from transformers import AutoTokenizer

    from export.llm import build_hf_dir, cache_key, resolve_source

    src = resolve_source("smollm2-135m-instruct", model_cache)
    return AutoTokenizer.from_pretrained(build_hf_dir(src, model_cache / "export" / "llm" / cache_key(src) / "hf"))


def _save(model, tokenizer, out: Path) -> Path:
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _tiny(arch: str, tokenizer, out: Path) -> Path:
    """A random ``arch`` causal LM (llama | qwen2 | bert-lm) saved in ``out`` with ``tokenizer``."""
    import torch
    from transformers import BertConfig, BertLMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "bert-lm":
        model = BertLMHeadModel(BertConfig(**ids, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, is_decoder=True))
    else:
        config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
        model = model_cls(config_cls(**ids, **TINY))
    return _save(model.eval(), tokenizer, out)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One export cache for the module (the int8 test reuses the Qwen2 float export)."""
    return tmp_path_factory.mktemp("llm-work")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: _tiny(arch, tokenizer, root / f"tiny-{arch}") for arch in ("llama", "qwen2")}


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg and msg, msg
    return msg


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_random_causal_lm_exports_matches_torch_and_runs_on_the_edge_runtime(arch, tiny_dirs, work):
    from export.llm import export_llm

    art = export_llm(tiny_dirs[arch], workdir=work, quantization="none", measure=False)
    assert art.drift["greedy_match_vs_torch"] == 1.0 and art.drift["gate"] == "n/a"
    assert {"model.onnx", "tokenizer.json"} <= set(art.files) and all(p.is_file() for p in art.files.values())
    assert art.source["local_dir"] == f"tiny-{arch}" and art.quantization["scheme"] == "none"
    cfg = art.config
    assert (cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"]) == (2, 2, 8)
    assert len(cfg["past_inputs"]) == len(cfg["present_outputs"]) == 4
    lm = _load(art)
    question = "What is the capital of France?"  # GREEDY_PROMPTS[0]: its torch reply is in the report
    ids = lm.encode_chat([ChatMessage("system", cfg["system_prompt"]), ChatMessage("user", question)])
    got = list(lm.generate_ids(ids, 32))
    assert len(set(got)) >= 4  # varied tokens, not one repeated
    assert lm.decode(got) == art.report["greedy_replies"][0]
    pieces = list(lm.stream([ChatMessage("user", "Hello")], max_new_tokens=6))
    assert pieces and all(isinstance(p, str) for p in pieces)


def test_dynamic_int8_runs_end_to_end_on_a_tiny_qwen2(tiny_dirs, work):
    from export.llm import export_llm

    art = export_llm(tiny_dirs["qwen2"], workdir=work, quantization="dynamic-int8", measure=False)
    drift = art.drift
    assert art.quantization["scheme"] == "dynamic-int8" and art.files["model.onnx"].is_file()
    assert drift["gate"] in {"passed", "failed"}  # random weights: the verdict itself is not the point
    assert {g["metric"] for g in drift["gates"]} == {"top1_agreement", "perplexity_ratio"}
    assert 0.0 <= drift["top1_agreement"] <= 1.0 and drift["perplexity_ratio"] > 0
    assert list(_load(art).generate_ids([1, 2, 3], 4))


# ---------------------------------------------------------------- bad sources


@pytest.fixture
def bert_mlm(tmp_path, tokenizer) -> Path:
    """A BERT masked LM with a tokenizer and chat template: everything right except being causal."""
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4))
    return _save(model, tokenizer, tmp_path / "bert-mlm")


def test_a_masked_lm_is_refused_as_not_causal_before_any_model_work(bert_mlm, tmp_path):
    from export.llm import export_llm

    with pytest.raises(ConfigError) as err:
        export_llm(bert_mlm, workdir=tmp_path / "work", measure=False)
    msg = _one_line(err)
    assert str(bert_mlm) in msg and "not a causal language model" in msg and "BertForMaskedLM" in msg
    assert not (tmp_path / "work").exists()


def test_a_config_without_architectures_is_judged_by_its_model_type(tmp_path):
    from export.llm import check_hf_dir

    src = tmp_path / "t5"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32}), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        check_hf_dir(src)
    assert "not a causal language model" in _one_line(err) and "model_type 't5'" in str(err.value)
    (src / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="config.json is not readable JSON"):
        check_hf_dir(src)


@pytest.mark.parametrize("missing", ["tokenizer.json", "chat template"])
def test_a_causal_lm_without_tokenizer_or_chat_template_is_refused(missing, tiny_dirs, tmp_path):
    from export.llm import export_llm

    src = shutil.copytree(tiny_dirs["llama"], tmp_path / "no-tok")
    if missing == "tokenizer.json":
        (src / "tokenizer.json").unlink()
    else:
        (src / "chat_template.jinja").unlink()
        cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
        cfg.pop("chat_template", None)
        (src / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(ModelFileError) as err:
        export_llm(src, workdir=tmp_path / "work", measure=False)
    msg = _one_line(err)
    assert str(src) in msg and f"has no {missing}" in msg
    assert not (tmp_path / "work").exists()


def test_a_gguf_of_an_architecture_transformers_cannot_load_names_it(tmp_path):
    import gguf
    import numpy as np

    from export.llm import LlmSource, build_hf_dir

    path = tmp_path / "tiny-rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv7")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    src = LlmSource(name="tiny-rwkv", sha256="0" * 64, license="", system_prompt="", gates={}, manifest_source={},
                    gguf=path)
    with pytest.raises(ModelFileError) as err:
        build_hf_dir(src, tmp_path / "hf")
    msg = _one_line(err)
    assert msg.startswith("llm stage: transformers cannot load tiny-rwkv.gguf") and "rwkv7" in msg
    assert not (tmp_path / "hf" / "done.json").exists()


def test_an_export_the_onnx_exporter_refuses_names_the_stage_and_the_architecture(tmp_path, tokenizer):
    from export.llm import export_llm

    src = _tiny("bert-lm", tokenizer, tmp_path / "bert-lm")  # causal for transformers, not for optimum's ONNX
    with pytest.raises(ModelFileError) as err:
        export_llm(src, workdir=tmp_path / "work", measure=False)
    msg = _one_line(err)
    assert msg.startswith("llm stage: ONNX export of bert-lm (BertLMHeadModel) failed: ValueError:")
    assert "bert" in msg[len("llm stage: ONNX export of bert-lm (BertLMHeadModel)"):]
    assert "text-generation-with-past" in msg and len(msg) < 450


def test_an_export_failing_on_an_op_names_the_op(monkeypatch, tiny_dirs, tmp_path):
    from torch.onnx.errors import UnsupportedOperatorError

    from export.llm import export_onnx

    def refuse(*_a, **_k):
        raise RuntimeError("while tracing") from UnsupportedOperatorError("aten::fancy_op", 14, None)

    def refuse_op(*_a, **_k):
        raise UnsupportedOperatorError("aten::fancy_op", 14, None)

    for fake in (refuse_op, refuse):
        monkeypatch.setattr("optimum.exporters.onnx.main_export", fake)
        with pytest.raises(ModelFileError) as err:
            export_onnx(tiny_dirs["llama"], tmp_path / "onnx")
        msg = _one_line(err)
        assert msg.startswith("llm stage: ONNX export of tiny-llama (LlamaForCausalLM) failed: ")
        assert "UnsupportedOperatorError: Exporting the operator 'aten::fancy_op' to ONNX opset version 14" in msg
    assert "RuntimeError: while tracing (caused by UnsupportedOperatorError: Exporting the operator" in msg


# ---------------------------------------------------------------- full disk


_disk_usage = shutil.disk_usage


def _free(monkeypatch, free_mb: float) -> None:
    """``shutil.disk_usage`` reports ``free_mb`` MB free everywhere (in this process)."""

    def fake(path):
        total, used, _ = _disk_usage(path)
        return SimpleNamespace(total=total, used=used, free=int(free_mb * 1_000_000))

    monkeypatch.setattr(shutil, "disk_usage", fake)


def test_an_export_that_does_not_fit_is_refused_naming_path_and_megabytes(monkeypatch, tiny_dirs, tmp_path):
    from export.llm import cache_key, export_llm, resolve_source

    _free(monkeypatch, 2)
    with pytest.raises(DiskSpaceError) as err:
        export_llm(tiny_dirs["llama"], workdir=tmp_path / "work", quantization="dynamic-int8", measure=False)
    msg = _one_line(err)
    work = tmp_path / "work" / cache_key(resolve_source(tiny_dirs["llama"]))
    m = re.fullmatch(rf"not enough disk space at {re.escape(str(work))}: the export needs about (\d+) MB, 2 MB free",
                     msg)
    assert m, msg
    assert 10 <= int(m.group(1)) <= 30  # 6.5 MB of float32 weights: 2 float ONNX copies + an int8 one
    assert not (work / "onnx-export").exists()
    assert err.value.code == "disk.full"


def test_running_out_of_space_while_exporting_becomes_the_same_clear_error(monkeypatch, tiny_dirs, tmp_path):
    from export.llm import export_llm

    def disk_full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", "model.onnx")

    monkeypatch.setattr("optimum.exporters.onnx.main_export", disk_full)  # the exporter's error gets wrapped
    with pytest.raises(DiskSpaceError) as err:
        export_llm(tiny_dirs["llama"], workdir=tmp_path / "work", measure=False)
    msg = _one_line(err)
    assert re.fullmatch(r"not enough disk space at \S+: the export needs about \d+ MB, \d+ MB free", msg), msg
    assert str(tmp_path / "work") in msg


def test_placing_a_bundle_stage_checks_space_and_turns_enospc_into_the_same_error(monkeypatch, tmp_path):
    from export.artifact import StageArtifact
    from export.builder import _place

    model = tmp_path / "src" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(b"\0" * 3_000_000)
    art = StageArtifact(stage="llm", kind="onnx-causal-lm", runtime="onnxruntime", files={"model.onnx": model},
                        roles={"model": "model.onnx"})
    out = tmp_path / "bundle"
    _free(monkeypatch, 1)
    with pytest.raises(DiskSpaceError) as err:
        _place(art, out)
    assert _one_line(err) == f"not enough disk space at {out}: the export needs about 3 MB, 1 MB free"
    _free(monkeypatch, 1000)

    def disk_full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", disk_full)
    with pytest.raises(DiskSpaceError) as err:
        _place(art, out)
    assert _one_line(err) == f"not enough disk space at {out}: the export needs about 3 MB, 1000 MB free"
    monkeypatch.undo()
    assert _place(art, out).files[0].path == "llm/model.onnx"


# ---------------------------------------------------------------- through the CLI


def test_cli_export_with_a_non_causal_llm_dir_fails_in_one_line(bert_mlm, tmp_path):
    out = tmp_path / "dist" / "x86-dev.svb"
    proc = subprocess.run([sys.executable, "-m", "sottovoce.cli", "export", "--llm", str(bert_mlm), "--target",
                           "x86-dev", "--out", str(out), "--cache", str(tmp_path / "empty-cache")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"sottovoce: error: {bert_mlm} is not a causal language model: config.json names "
                     "BertForMaskedLM, which transformers' AutoModelForCausalLM does not load"], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists() and not (tmp_path / "empty-cache").exists()
