"""Whisper rebuilt from CTranslate2 weights: read ``model.bin``, map it onto ``transformers``.

``read_ct2_model`` parses the file CTranslate2's ``ModelSpec._serialize`` writes (binary
version 6, little-endian): ``u32`` binary version, the spec name (``u16`` length incl. NUL, bytes,
NUL), ``u32`` spec revision, ``u32`` variable count, then per variable: name, ``u8`` rank, rank x
``u32`` dims, ``u8`` dtype id (float32, int8, int16, int32, float16, bfloat16), ``u32`` byte size,
raw bytes; then ``u32`` alias count and (alias, target) name pairs. Int8/int16 weights with a
``*_scale`` companion are dequantized (``q / scale``, per output row) to float32.

``hf_state_dict`` maps every variable of a ``WhisperSpec`` (revision 3) onto the parameter names of
``transformers``' ``WhisperForConditionalGeneration``: CTranslate2 fuses self-attention q/k/v into
``linear_0`` and cross-attention k/v into ``linear_1``; they are split again (Whisper's k projection
has no bias: the fused zeros are checked and dropped). The LM head is the alias of the token
embedding (tied). A variable left unmapped, or a parameter left unset, is an error.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import ModelFileError

SUPPORTED_BINARY_VERSION = 6
SPEC_NAME = "WhisperSpec"
SPEC_REVISION = 3
#: CTranslate2's DataType ids (include/ctranslate2/types.h); bfloat16 is widened by hand
_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"), 4: np.dtype("<f2"),
           5: np.dtype("<u2")}
_DTYPE_NAMES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
#: CTranslate2 ``common_spec.Activation.GELU``
_GELU = 3


@dataclass(frozen=True)
class Ct2Model:
    """The variables of a CTranslate2 ``model.bin``: ``variables`` as stored (name -> array, dtype
    as stored), ``aliases`` (alias name -> stored name), ``dtypes`` (name -> CTranslate2 dtype name)."""

    spec_name: str
    binary_version: int
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]
    dtypes: dict[str, str]

    def weight_dtypes(self) -> set[str]:
        """The dtypes of the multi-dimensional (weight) variables."""
        return {self.dtypes[n] for n, v in self.variables.items() if v.ndim >= 2}


class _Reader:
    def __init__(self, data: bytes, name: str) -> None:
        self.data, self.pos, self.name = data, 0, name

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ModelFileError(f"{self.name} is truncated at byte {self.pos} (needs {n} more bytes)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.u("H")
        raw = self.take(n)
        if n == 0 or raw[-1] != 0:
            raise ModelFileError(f"{self.name}: malformed string at byte {self.pos - n}")
        return raw[:-1].decode("utf-8")


def read_ct2_model(path: Path) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin`` (binary version 6) into its variables and aliases.
    Raises ``ModelFileError`` on another version, a truncated file or trailing bytes."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror}") from exc
    r = _Reader(data, path.name)
    version = r.u("I")
    if version != SUPPORTED_BINARY_VERSION:
        raise ModelFileError(f"{path.name} is CTranslate2 binary version {version}; this reader knows version "
                             f"{SUPPORTED_BINARY_VERSION}")
    spec, revision, count = r.string(), r.u("I"), r.u("I")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for _ in range(count):
        name = r.string()
        dims = [r.u("I") for _ in range(r.u("B"))]
        type_id, nbytes = r.u("B"), r.u("I")
        if type_id not in _DTYPES:
            raise ModelFileError(f"{path.name}: variable {name} has unknown dtype id {type_id}")
        dt = _DTYPES[type_id]
        if nbytes != int(np.prod(dims, dtype=np.int64)) * dt.itemsize:
            raise ModelFileError(f"{path.name}: variable {name} holds {nbytes} bytes, not {dims} x {dt.itemsize}")
        arr = np.frombuffer(r.take(nbytes), dtype=dt).reshape(dims)
        if type_id == 5:  # bfloat16: the high half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        variables[name] = arr
        dtypes[name] = _DTYPE_NAMES[type_id]
    aliases = {}
    for _ in range(r.u("I")):
        alias, target = r.string(), r.string()
        aliases[alias] = target
    if r.pos != len(data):
        raise ModelFileError(f"{path.name}: {len(data) - r.pos} unexpected bytes after the aliases")
    for alias, target in aliases.items():
        if target not in variables:
            raise ModelFileError(f"{path.name}: alias {alias} names a missing variable {target}")
    return Ct2Model(spec, version, revision, variables, aliases, dtypes)


def dequantized(model: Ct2Model) -> dict[str, np.ndarray]:
    """Every variable (aliases resolved) as float32 where it is a weight: float16/bfloat16 are widened,
    int8/int16 weights with a ``<name>_scale`` companion become ``q / scale`` (one scale per output
    row, or one for the tensor); the ``*_scale`` variables themselves are dropped. Scalars keep their
    stored type."""
    out: dict[str, np.ndarray] = {}
    scales = {n for n in model.variables if n.endswith("_scale")}
    for name, value in model.variables.items():
        if name in scales:
            continue
        scale_name = name + "_scale"
        if scale_name in scales:
            scale = model.variables[scale_name].astype(np.float32)
            q = value.astype(np.float32)
            if scale.ndim == 0 or scale.size == 1:
                out[name] = q / float(scale.reshape(-1)[0])
            else:
                out[name] = q / scale.reshape((-1,) + (1,) * (q.ndim - 1))
        elif value.ndim >= 1 and value.dtype.kind == "f":
            out[name] = value.astype(np.float32)
        else:
            out[name] = value
    missing_scale = [n for n in scales if n[: -len("_scale")] not in model.variables]
    if missing_scale:
        raise ModelFileError(f"scale without weight: {', '.join(sorted(missing_scale))}")
    for alias, target in model.aliases.items():
        out[alias] = out[target]
    return out


@dataclass(frozen=True)
class WhisperShape:
    """Architecture read from the weights: what ``WhisperConfig`` needs."""

    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    vocab_size: int
    num_mel_bins: int
    max_source_positions: int
    max_target_positions: int


def _layers(names: set[str], prefix: str) -> int:
    idx = {int(m.group(1)) for n in names if (m := re.match(rf"^{prefix}/layer_(\d+)/", n))}
    if idx != set(range(len(idx))):
        raise ModelFileError(f"{prefix} layers are not numbered 0..n-1: {sorted(idx)}")
    return len(idx)


def whisper_shape(weights: dict[str, np.ndarray]) -> WhisperShape:
    """The architecture implied by the variable shapes and the stored scalars."""
    names = set(weights)
    try:
        emb = weights["decoder/embeddings/weight"]
        return WhisperShape(
            d_model=int(emb.shape[1]),
            encoder_layers=_layers(names, "encoder"),
            decoder_layers=_layers(names, "decoder"),
            encoder_heads=int(weights["encoder/num_heads"]),
            decoder_heads=int(weights["decoder/num_heads"]),
            encoder_ffn_dim=int(weights["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
            decoder_ffn_dim=int(weights["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
            vocab_size=int(emb.shape[0]),
            num_mel_bins=int(weights["encoder/conv1/weight"].shape[1]),
            max_source_positions=int(weights["encoder/position_encodings/encodings"].shape[0]),
            max_target_positions=int(weights["decoder/position_encodings/encodings"].shape[0]),
        )
    except KeyError as exc:
        raise ModelFileError(f"model.bin lacks the Whisper variable {exc}") from exc


#: decoder scalars whose stored value must be what a Whisper decoder is (name -> expected)
def _expected_scalars(shape: WhisperShape) -> dict[str, int]:
    return {
        "decoder/activation": _GELU,
        "decoder/alibi": 0,
        "decoder/pre_norm": 1,
        "decoder/scale_embeddings": 0,
        "decoder/start_from_zero_embedding": 0,
        "decoder/num_heads": shape.decoder_heads,
        "encoder/num_heads": shape.encoder_heads,
    }


#: scalars that only steer CTranslate2's alignment (word timestamps); read and not needed
_IGNORED_SCALARS = ("decoder/alignment_heads", "decoder/alignment_layer")
#: ALiBi options newer CTranslate2 releases write even with ALiBi off; when present they must be 0
_OPTIONAL_ZERO_SCALARS = ("decoder/alibi_use_positive_positions", "decoder/scale_alibi")


def hf_state_dict(model: Ct2Model) -> tuple[WhisperShape, dict[str, np.ndarray]]:
    """The ``WhisperForConditionalGeneration`` state dict (name -> float32 array) for a CTranslate2
    ``WhisperSpec``. Raises ``ModelFileError`` for another spec/revision, a scalar with an unexpected
    value, a non-zero fused k bias, an untied LM head, or any variable this mapping did not consume."""
    if model.spec_name != SPEC_NAME or model.revision != SPEC_REVISION:
        raise ModelFileError(f"model.bin holds {model.spec_name} revision {model.revision}; "
                             f"expected {SPEC_NAME} revision {SPEC_REVISION}")
    w = dequantized(model)
    shape = whisper_shape(w)
    d = shape.d_model
    used: set[str] = set()
    sd: dict[str, np.ndarray] = {}

    def take(name: str) -> np.ndarray:
        if name not in w:
            raise ModelFileError(f"model.bin lacks the Whisper variable {name}")
        used.add(name)
        return w[name]

    for name, want in _expected_scalars(shape).items():
        if int(take(name)) != want:
            raise ModelFileError(f"model.bin {name} = {int(w[name])}; a Whisper model has {want}")
    for name in _IGNORED_SCALARS:
        take(name)
    for name in _OPTIONAL_ZERO_SCALARS:
        if name in w and int(take(name)) != 0:
            raise ModelFileError(f"model.bin {name} = {int(w[name])}; Whisper does not use ALiBi")

    def linear(dst: str, src: str, bias: bool = True) -> None:
        sd[f"{dst}.weight"] = take(f"{src}/weight")
        if bias:
            sd[f"{dst}.bias"] = take(f"{src}/bias")

    def norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"] = take(f"{src}/gamma")
        sd[f"{dst}.bias"] = take(f"{src}/beta")

    def split_kv(dst: str, weight: np.ndarray, bias: np.ndarray, parts: tuple[str, ...], where: str) -> None:
        if weight.shape[0] != d * len(parts) or bias.shape[0] != d * len(parts):
            raise ModelFileError(f"{where}: fused projection has {weight.shape[0]} rows, expected {d * len(parts)}")
        for i, part in enumerate(parts):
            sd[f"{dst}.{part}_proj.weight"] = weight[i * d:(i + 1) * d]
            b = bias[i * d:(i + 1) * d]
            if part == "k":
                if np.any(b != 0):
                    raise ModelFileError(f"{where}: the k projection has a non-zero bias; Whisper's has none")
            else:
                sd[f"{dst}.{part}_proj.bias"] = b

    def attention(dst: str, src: str, cross: bool) -> None:
        if cross:
            linear(f"{dst}.q_proj", f"{src}/linear_0")
            split_kv(dst, take(f"{src}/linear_1/weight"), take(f"{src}/linear_1/bias"), ("k", "v"), src)
            linear(f"{dst}.out_proj", f"{src}/linear_2")
        else:
            split_kv(dst, take(f"{src}/linear_0/weight"), take(f"{src}/linear_0/bias"), ("q", "k", "v"), src)
            linear(f"{dst}.out_proj", f"{src}/linear_1")

    def ffn(dst: str, src: str) -> None:
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")

    enc, dec = "model.encoder", "model.decoder"
    linear(f"{enc}.conv1", "encoder/conv1")
    linear(f"{enc}.conv2", "encoder/conv2")
    sd[f"{enc}.embed_positions.weight"] = take("encoder/position_encodings/encodings")
    norm(f"{enc}.layer_norm", "encoder/layer_norm")
    for i in range(shape.encoder_layers):
        src, dst = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        attention(f"{dst}.self_attn", f"{src}/self_attention", cross=False)
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        ffn(dst, src)
    sd[f"{dec}.embed_tokens.weight"] = take("decoder/embeddings/weight")
    sd[f"{dec}.embed_positions.weight"] = take("decoder/position_encodings/encodings")
    norm(f"{dec}.layer_norm", "decoder/layer_norm")
    for i in range(shape.decoder_layers):
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        attention(f"{dst}.self_attn", f"{src}/self_attention", cross=False)
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        attention(f"{dst}.encoder_attn", f"{src}/attention", cross=True)
        norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        ffn(dst, src)
    if model.aliases.get("decoder/projection/weight") != "decoder/embeddings/weight":
        raise ModelFileError("model.bin's output projection is not tied to the token embedding; "
                             "WhisperForConditionalGeneration ties them")
    sd["proj_out.weight"] = take("decoder/projection/weight")
    left = sorted(set(w) - used)
    if left:
        raise ModelFileError(f"model.bin variables not mapped to the transformers model: {', '.join(left[:8])}"
                             + (f" (+{len(left) - 8} more)" if len(left) > 8 else ""))
    return shape, sd


@dataclass(frozen=True)
class SpecialTokens:
    """Whisper's control token ids, read from ``tokenizer.json`` by their text."""

    eot: int
    sot: int
    transcribe: int
    translate: int
    sot_prev: int
    sot_lm: int
    no_speech: int
    no_timestamps: int
    timestamp_begin: int

    def to_dict(self) -> dict[str, int]:
        from dataclasses import asdict

        return asdict(self)


def special_tokens(tokenizer_json: Path) -> SpecialTokens:
    """The control tokens of the shipped tokenizer; ``timestamp_begin`` is the id after
    ``<|notimestamps|>`` (timestamps are not in ``tokenizer.json``, CTranslate2's vocabulary appends them)."""
    data = json.loads(Path(tokenizer_json).read_text("utf-8"))
    ids = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
    names = {"eot": "<|endoftext|>", "sot": "<|startoftranscript|>", "transcribe": "<|transcribe|>",
             "translate": "<|translate|>", "sot_prev": "<|startofprev|>", "sot_lm": "<|startoflm|>",
             "no_speech": "<|nocaptions|>", "no_timestamps": "<|notimestamps|>"}
    missing = [text for text in names.values() if text not in ids]
    if missing:
        raise ModelFileError(f"{Path(tokenizer_json).name} lacks Whisper's control tokens {missing}")
    found = {key: ids[text] for key, text in names.items()}
    return SpecialTokens(**found, timestamp_begin=found["no_timestamps"] + 1)


def whisper_config(shape: WhisperShape, ct2_config: dict[str, Any], tokens: SpecialTokens):
    """A ``transformers.WhisperConfig`` for ``shape`` with the token ids of ``tokens`` and the
    suppression lists of CTranslate2's ``config.json``."""
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=shape.vocab_size, num_mel_bins=shape.num_mel_bins, d_model=shape.d_model,
        encoder_layers=shape.encoder_layers, decoder_layers=shape.decoder_layers,
        encoder_attention_heads=shape.encoder_heads, decoder_attention_heads=shape.decoder_heads,
        encoder_ffn_dim=shape.encoder_ffn_dim, decoder_ffn_dim=shape.decoder_ffn_dim,
        max_source_positions=shape.max_source_positions, max_target_positions=shape.max_target_positions,
        activation_function="gelu", scale_embedding=False, tie_word_embeddings=True,
        decoder_start_token_id=tokens.sot, bos_token_id=tokens.eot, eos_token_id=tokens.eot,
        pad_token_id=tokens.eot, suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        max_length=shape.max_target_positions,
    )


def build_hf_model(ct2_dir: Path):
    """``WhisperForConditionalGeneration`` (float32, eval mode) with every parameter set from
    ``ct2_dir/model.bin``; its config from the weights, ``config.json`` and ``tokenizer.json``.
    Raises ``ModelFileError`` if any parameter is left unset or any variable unmapped."""
    import torch
    from transformers import WhisperForConditionalGeneration

    ct2_dir = Path(ct2_dir)
    ct2 = read_ct2_model(ct2_dir / "model.bin")
    shape, sd = hf_state_dict(ct2)
    ct2_config = json.loads((ct2_dir / "config.json").read_text("utf-8"))
    tokens = special_tokens(ct2_dir / "tokenizer.json")
    config = whisper_config(shape, ct2_config, tokens)
    model = WhisperForConditionalGeneration(config).eval()
    params = dict(model.state_dict())
    unset = sorted(set(params) - set(sd))
    unknown = sorted(set(sd) - set(params))
    if unset or unknown:
        raise ModelFileError(f"weight mapping incomplete: unset {unset[:6]}, unknown {unknown[:6]}")
    for name, value in sd.items():
        if tuple(params[name].shape) != value.shape:
            raise ModelFileError(f"{name}: model.bin gives {value.shape}, transformers expects {tuple(params[name].shape)}")
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()},
                          strict=True)
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        raise ModelFileError("the rebuilt LM head is not tied to the token embedding")
    return model


def save_hf_dir(ct2_dir: Path, out_dir: Path) -> Path:
    """Write a complete offline ``transformers`` directory for the CTranslate2 Whisper in ``ct2_dir``:
    weights (safetensors), config, generation config, feature extractor and the shipped tokenizer.
    Returns ``out_dir``."""
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperTokenizerFast

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    model = build_hf_model(ct2_dir)
    tokens = special_tokens(ct2_dir / "tokenizer.json")
    ct2_config = json.loads((ct2_dir / "config.json").read_text("utf-8"))
    model.generation_config = GenerationConfig(
        decoder_start_token_id=tokens.sot, eos_token_id=tokens.eot, pad_token_id=tokens.eot,
        bos_token_id=tokens.eot, max_length=model.config.max_target_positions,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        no_timestamps_token_id=tokens.no_timestamps, is_multilingual=False,
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    WhisperFeatureExtractor(feature_size=model.config.num_mel_bins).save_pretrained(out_dir)
    tok = WhisperTokenizerFast(tokenizer_file=str(ct2_dir / "tokenizer.json"), vocab_file=None, merges_file=None)
    tok.save_pretrained(out_dir)
    return out_dir
