"""Reader and writer of the release checkpoint layout.

    model-0000{i}-of-0000{n}.safetensors + model.safetensors.index.json (or model.safetensors)
    model_config.yaml                      litgpt Config fields
    audiointeraction_ChunkwisedEncoder.pth audio tower state dict (old name MiniOmni3_...)
    qwen25OmniConfig/config.json           only thinker_config.audio_config is used
    tokenizer.json, tokenizer_config.json
    protocol_tokens.json                   optional: overrides of the release token ids and the
                                           system prompt (docs/PROTOCOL.md, "Token ids")

The LM weights use litgpt names; `load_checkpoint` maps them to Hugging Face Qwen2 names
and checks every file, key, shape and dtype up front, so a bad checkpoint fails in a second
with one line naming the file and the field, not halfway through an export.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from listenloop.errors import CheckpointError
from listenloop.protocol import EMOTION_NAMES, N_MELS, RELEASE_SYSTEM_PROMPT, RELEASE_TOKENS

MODEL_CONFIG = "model_config.yaml"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ENCODER_FILES = ("audiointeraction_ChunkwisedEncoder.pth", "MiniOmni3_ChunkwisedEncoder.pth")
OMNI_CONFIG = "qwen25OmniConfig/config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
PROTOCOL_TOKENS = "protocol_tokens.json"

LLM_CONFIG_FIELDS = {
    "name": str, "block_size": int, "vocab_size": int, "padded_vocab_size": int, "n_layer": int,
    "n_embd": int, "n_head": int, "n_query_groups": int, "head_size": int,
    "intermediate_size": int, "mlp_class_name": str, "rope_base": (int, float),
    "rotary_percentage": (int, float), "norm_class_name": str, "norm_eps": (int, float),
    "bias": bool, "attn_bias": bool, "lm_head_bias": bool, "parallel_residual": bool,
    "scale_embeddings": bool,
}
# listenloop's own optional field: the longest context (tokens) the model was trained on. The
# exporter records it in the package manifest (decoder.trained_context); absent, the runtime
# takes the package's max_context for it.
TRAINED_CONTEXT = "trained_context"
# The only architecture variant this exporter implements; anything else is refused.
SUPPORTED = {"mlp_class_name": "LLaMAMLP", "norm_class_name": "RMSNorm", "rotary_percentage": 1.0,
             "bias": False, "lm_head_bias": False, "parallel_residual": False, "scale_embeddings": False}

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class Checkpoint:
    """A validated checkpoint, weights in float32 with Hugging Face Qwen2 names."""

    path: Path
    llm_config: dict
    hf_qwen2_config: object  # transformers.Qwen2Config
    lm_state: dict  # HF Qwen2 names -> float32 tensors
    audio_config: object  # transformers Qwen2_5OmniAudioEncoderConfig
    encoder_state: dict
    tokenizer_path: Path
    tokens: dict = field(default_factory=dict)  # name -> id
    system_prompt: str = RELEASE_SYSTEM_PROMPT

    @property
    def emotions(self) -> dict:
        return {name: self.tokens[name] for name in EMOTION_NAMES}

    @property
    def name(self) -> str:
        return str(self.llm_config["name"])


def _fail(file, field_name: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{file}: {field_name}: {problem}")


# --- litgpt <-> HF Qwen2 key mapping ------------------------------------------------------

_LAYER_RENAMES = {
    "norm_1.weight": "input_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "norm_2.weight": "post_attention_layernorm.weight",
    "mlp.fc_1.weight": "mlp.gate_proj.weight",
    "mlp.fc_2.weight": "mlp.up_proj.weight",
    "mlp.proj.weight": "mlp.down_proj.weight",
}
_TOP_RENAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def _qkv_sizes(cfg: dict) -> tuple[int, int]:
    return cfg["n_head"] * cfg["head_size"], cfg["n_query_groups"] * cfg["head_size"]


def regroup_interleaved_qkv(tensor: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Legacy `attn.attn.*` rows, interleaved per KV group as (Q×q_per_kv, K, V)×groups, to Q‖K‖V."""
    groups, d = cfg["n_query_groups"], cfg["head_size"]
    q_per_kv = cfg["n_head"] // groups
    per_group = tensor.reshape(groups, q_per_kv + 2, d, *tensor.shape[1:])
    q = per_group[:, :q_per_kv].reshape(-1, *tensor.shape[1:])
    k = per_group[:, q_per_kv].reshape(-1, *tensor.shape[1:])
    v = per_group[:, q_per_kv + 1].reshape(-1, *tensor.shape[1:])
    return torch.cat([q, k, v], dim=0)


def interleave_qkv(tensor: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Inverse of `regroup_interleaved_qkv` (used by tests to build legacy checkpoints)."""
    groups, d = cfg["n_query_groups"], cfg["head_size"]
    q_per_kv = cfg["n_head"] // groups
    q_rows, kv_rows = _qkv_sizes(cfg)
    q, k, v = tensor[:q_rows], tensor[q_rows:q_rows + kv_rows], tensor[q_rows + kv_rows:]
    rest = tensor.shape[1:]
    parts = [q.reshape(groups, q_per_kv, d, *rest), k.reshape(groups, 1, d, *rest), v.reshape(groups, 1, d, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def hf_qwen2_state_from_litgpt(state: dict, cfg: dict, file: str = "weights") -> dict:
    """litgpt key names -> HF Qwen2 key names; fused qkv split contiguously."""
    out = {}
    q_rows, kv_rows = _qkv_sizes(cfg)
    for key, tensor in state.items():
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = tensor
            continue
        parts = key.split(".")
        if len(parts) < 4 or parts[:2] != ["transformer", "h"] or not parts[2].isdigit():
            raise _fail(file, key, "not a litgpt Qwen2 weight name")
        layer, rest = int(parts[2]), ".".join(parts[3:])
        prefix = f"model.layers.{layer}."
        if rest in _LAYER_RENAMES:
            out[prefix + _LAYER_RENAMES[rest]] = tensor
        elif rest in ("attn.qkv.weight", "attn.qkv.bias", "attn.attn.weight", "attn.attn.bias"):
            kind = rest.rsplit(".", 1)[1]
            fused = regroup_interleaved_qkv(tensor, cfg) if rest.startswith("attn.attn") else tensor
            out[prefix + f"self_attn.q_proj.{kind}"] = fused[:q_rows]
            out[prefix + f"self_attn.k_proj.{kind}"] = fused[q_rows:q_rows + kv_rows]
            out[prefix + f"self_attn.v_proj.{kind}"] = fused[q_rows + kv_rows:]
        else:
            raise _fail(file, key, "not a litgpt Qwen2 weight name")
    return out


def litgpt_state_from_hf_qwen2(state: dict, cfg: dict) -> dict:
    """HF Qwen2 key names -> litgpt key names (contiguous Q‖K‖V); inverse of the above."""
    top = {hf: lit for lit, hf in _TOP_RENAMES.items()}
    layer_renames = {hf: lit for lit, hf in _LAYER_RENAMES.items()}
    out = {}
    for key, tensor in state.items():
        if key in top:
            out[top[key]] = tensor
            continue
        parts = key.split(".")
        if len(parts) < 4 or parts[:2] != ["model", "layers"]:
            raise CheckpointError(f"state dict: {key}: not a Hugging Face Qwen2 weight name")
        layer, rest = int(parts[2]), ".".join(parts[3:])
        prefix = f"transformer.h.{layer}."
        if rest in layer_renames:
            out[prefix + layer_renames[rest]] = tensor
        elif rest.startswith("self_attn.q_proj."):
            kind = rest.rsplit(".", 1)[1]
            p = f"model.layers.{layer}.self_attn."
            out[prefix + f"attn.qkv.{kind}"] = torch.cat(
                [state[p + f"q_proj.{kind}"], state[p + f"k_proj.{kind}"], state[p + f"v_proj.{kind}"]], dim=0)
        elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            continue
        else:
            raise CheckpointError(f"state dict: {key}: not a Hugging Face Qwen2 weight name")
    return out


def expected_litgpt_shapes(cfg: dict) -> dict:
    """Every litgpt key with its shape, from the config."""
    h, v, ff = cfg["n_embd"], cfg["padded_vocab_size"], cfg["intermediate_size"]
    q_rows, kv_rows = _qkv_sizes(cfg)
    shapes = {"transformer.wte.weight": (v, h), "transformer.ln_f.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        shapes[p + "norm_1.weight"] = (h,)
        shapes[p + "attn.qkv.weight"] = (q_rows + 2 * kv_rows, h)
        if cfg["attn_bias"]:
            shapes[p + "attn.qkv.bias"] = (q_rows + 2 * kv_rows,)
        shapes[p + "attn.proj.weight"] = (h, q_rows)
        shapes[p + "norm_2.weight"] = (h,)
        shapes[p + "mlp.fc_1.weight"] = (ff, h)
        shapes[p + "mlp.fc_2.weight"] = (ff, h)
        shapes[p + "mlp.proj.weight"] = (h, ff)
    return shapes


def hf_qwen2_config(cfg: dict):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=cfg["padded_vocab_size"], hidden_size=cfg["n_embd"],
        intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["n_layer"],
        num_attention_heads=cfg["n_head"], num_key_value_heads=cfg["n_query_groups"],
        head_dim=cfg["head_size"], hidden_act="silu", max_position_embeddings=cfg["block_size"],
        rms_norm_eps=float(cfg["norm_eps"]), tie_word_embeddings=False, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg["rope_base"])},
        attention_dropout=0.0,
    )


# --- validation helpers -------------------------------------------------------------------

def _read_llm_config(root: Path) -> dict:
    path = root / MODEL_CONFIG
    if not path.is_file():
        raise _fail(MODEL_CONFIG, "(file)", f"not found in {root}")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise _fail(MODEL_CONFIG, "(file)", f"not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise _fail(MODEL_CONFIG, "(file)", "must hold a mapping of litgpt Config fields")
    for key, expected in LLM_CONFIG_FIELDS.items():
        if key not in cfg:
            raise _fail(MODEL_CONFIG, key, "missing")
        value = cfg[key]
        bad_bool = expected is not bool and isinstance(value, bool)
        if bad_bool or not isinstance(value, expected):
            raise _fail(MODEL_CONFIG, key, f"has the wrong type ({type(value).__name__}: {value!r})")
    for key, wanted in SUPPORTED.items():
        if cfg[key] != wanted:
            raise _fail(MODEL_CONFIG, key, f"{cfg[key]!r} is not supported (this exporter implements {wanted!r})")
    for key in ("n_layer", "n_embd", "n_head", "n_query_groups", "head_size", "intermediate_size",
                "vocab_size", "padded_vocab_size", "block_size"):
        if cfg[key] <= 0:
            raise _fail(MODEL_CONFIG, key, f"must be > 0, got {cfg[key]}")
    if cfg["n_head"] % cfg["n_query_groups"]:
        raise _fail(MODEL_CONFIG, "n_query_groups", f"{cfg['n_query_groups']} does not divide n_head {cfg['n_head']}")
    if cfg["head_size"] % 2:
        raise _fail(MODEL_CONFIG, "head_size", "must be even for rotate-half RoPE")
    if cfg["padded_vocab_size"] < cfg["vocab_size"]:
        raise _fail(MODEL_CONFIG, "padded_vocab_size", "is smaller than vocab_size")
    if TRAINED_CONTEXT in cfg:
        value = cfg[TRAINED_CONTEXT]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= cfg["block_size"]:
            raise _fail(MODEL_CONFIG, TRAINED_CONTEXT, f"must be a whole number of tokens in 1..block_size "
                                                       f"({cfg['block_size']}), got {value!r}")
    return cfg


def _safetensors_header(path: Path) -> dict:
    """Parse a safetensors header and check the file is as long as the header says (truncation)."""
    name = path.name
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _fail(name, "(header)", f"file is only {size} bytes: truncated or not safetensors")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise _fail(name, "(header)", f"header length {n} exceeds the file size {size}: truncated or not safetensors")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _fail(name, "(header)", "header is not valid JSON: truncated or not safetensors") from None
    header.pop("__metadata__", None)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + n + end > size:
        raise _fail(name, "(data)", f"file has {size} bytes but its header describes {8 + n + end}: truncated")
    return header


def _shard_files(root: Path) -> dict:
    """shard file name -> list of keys expected in it (from the index, or the single file's header)."""
    index = root / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise _fail(INDEX, "weight_map", "missing or not valid JSON") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise _fail(INDEX, "weight_map", "must be a non-empty object")
        shards: dict = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        return shards
    if (root / SINGLE).is_file():
        return {SINGLE: None}
    raise _fail(INDEX, "(file)", f"neither {INDEX} nor {SINGLE} found in {root}: not a checkpoint folder")


def _check_lm_headers(root: Path, cfg: dict) -> dict:
    """Check every shard's header against the config; return key -> shard file name."""
    expected = expected_litgpt_shapes(cfg)
    located, headers = {}, {}
    for shard, keys in _shard_files(root).items():
        path = root / shard
        if not path.is_file():
            raise _fail(shard, "(file)", f"listed in {INDEX} but not found")
        header = headers[shard] = _safetensors_header(path)
        for key in keys or header:
            if key not in header:
                raise _fail(shard, key, f"listed in {INDEX} but not in the shard")
            located[key] = shard
    legacy = {k.replace("attn.attn.", "attn.qkv."): k for k in located if ".attn.attn." in k}
    index_name = INDEX if (root / INDEX).is_file() else SINGLE
    for key, shape in expected.items():
        stored = legacy.get(key, key)
        if stored not in located:
            raise _fail(index_name, key, "missing weight")
        entry = headers[located[stored]][stored]
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise _fail(located[stored], stored, f"dtype {entry['dtype']} is not a float type (F32, F16, BF16)")
        if tuple(entry["shape"]) != shape:
            raise _fail(located[stored], stored,
                        f"shape {list(entry['shape'])} disagrees with {MODEL_CONFIG} (expects {list(shape)})")
    extra = sorted(set(located) - set(expected) - set(legacy.values()))
    if extra:
        raise _fail(located[extra[0]], extra[0], f"unexpected weight ({len(extra)} unexpected in all)")
    return located


def _encoder_file(root: Path) -> Path:
    for name in ENCODER_FILES:
        if (root / name).is_file():
            return root / name
    raise _fail(ENCODER_FILES[0], "(file)", f"audio encoder weights not found in {root} (also tried {ENCODER_FILES[1]})")


def _read_audio_config(root: Path, n_embd: int):
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig

    path = root / OMNI_CONFIG
    if not path.is_file():
        raise _fail(OMNI_CONFIG, "(file)", f"not found in {root}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        audio = raw["thinker_config"]["audio_config"]
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _fail(OMNI_CONFIG, "(file)", "not valid JSON") from None
    except (KeyError, TypeError):
        raise _fail(OMNI_CONFIG, "thinker_config.audio_config", "missing") from None
    audio = {k: v for k, v in audio.items() if k != "model_type"}
    try:
        config = Qwen2_5OmniAudioEncoderConfig(**audio)
    except (TypeError, ValueError) as exc:
        raise _fail(OMNI_CONFIG, "thinker_config.audio_config", f"invalid ({str(exc).splitlines()[0]})") from None
    if config.num_mel_bins != N_MELS:
        raise _fail(OMNI_CONFIG, "thinker_config.audio_config.num_mel_bins", f"must be {N_MELS}, got {config.num_mel_bins}")
    if config.output_dim != n_embd:
        raise _fail(OMNI_CONFIG, "thinker_config.audio_config.output_dim",
                    f"{config.output_dim} != n_embd {n_embd} in {MODEL_CONFIG}")
    if config.d_model % config.encoder_attention_heads:
        raise _fail(OMNI_CONFIG, "thinker_config.audio_config.encoder_attention_heads", "does not divide d_model")
    return config


def expected_encoder_shapes(config) -> dict:
    d, ff, m, out = config.d_model, config.encoder_ffn_dim, config.num_mel_bins, config.output_dim
    shapes = {"conv1.weight": (d, m, 3), "conv1.bias": (d,), "conv2.weight": (d, d, 3), "conv2.bias": (d,),
              "ln_post.weight": (d,), "ln_post.bias": (d,), "proj.weight": (out, d), "proj.bias": (out,),
              "audio_bos_eos_token.weight": (2, out)}
    for i in range(config.encoder_layers):
        p = f"layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (d, d)
            if name != "k_proj":
                shapes[p + f"self_attn.{name}.bias"] = (d,)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[p + f"{norm}.weight"] = (d,)
            shapes[p + f"{norm}.bias"] = (d,)
        shapes[p + "fc1.weight"], shapes[p + "fc1.bias"] = (ff, d), (ff,)
        shapes[p + "fc2.weight"], shapes[p + "fc2.bias"] = (d, ff), (d,)
    return shapes


def _load_encoder_state(path: Path, config) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for corrupt pickles/zips
        raise _fail(path.name, "(file)", f"not a readable PyTorch state dict ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(state, dict):
        raise _fail(path.name, "(file)", "must hold a state dict")
    expected = expected_encoder_shapes(config)
    for key, shape in expected.items():
        if key not in state:
            raise _fail(path.name, key, "missing weight")
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in _FLOAT_DTYPES:
            raise _fail(path.name, key, f"dtype {getattr(tensor, 'dtype', type(tensor).__name__)} is not float32/16/bf16")
        if tuple(tensor.shape) != shape:
            raise _fail(path.name, key, f"shape {list(tensor.shape)} disagrees with {OMNI_CONFIG} (expects {list(shape)})")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise _fail(path.name, extra[0], "unexpected weight")
    return {k: v.float() for k, v in state.items()}


def _read_tokens(root: Path, vocab: int) -> tuple[dict, str]:
    tokens, prompt = dict(RELEASE_TOKENS), RELEASE_SYSTEM_PROMPT
    path = root / PROTOCOL_TOKENS
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _fail(PROTOCOL_TOKENS, "(file)", "not valid JSON") from None
        if not isinstance(raw, dict):
            raise _fail(PROTOCOL_TOKENS, "(file)", "must hold an object")
        for key, value in raw.items():
            if key == "system_prompt":
                if not isinstance(value, str) or not value:
                    raise _fail(PROTOCOL_TOKENS, key, "must be a non-empty string")
                prompt = value
            elif key in RELEASE_TOKENS:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise _fail(PROTOCOL_TOKENS, key, f"must be an integer id, got {value!r}")
                tokens[key] = value
            else:
                raise _fail(PROTOCOL_TOKENS, key, "unknown protocol token name")
    for key, value in tokens.items():
        if not 0 <= value < vocab:
            source = PROTOCOL_TOKENS if path.is_file() else f"{MODEL_CONFIG} (release ids)"
            raise _fail(source, key, f"id {value} is outside the vocabulary [0, {vocab})")
    if tokens["KEEP_SILENCE"] == tokens["TEXT_BEGIN"] or tokens["TEXT_END"] in (tokens["KEEP_SILENCE"], tokens["TEXT_BEGIN"]):
        raise _fail(PROTOCOL_TOKENS, "KEEP_SILENCE", "KEEP_SILENCE, TEXT_BEGIN and TEXT_END must be distinct")
    return tokens, prompt


def validate_checkpoint(checkpoint_dir) -> tuple[dict, object, dict]:
    """Cheap checks of everything (headers only): (llm_config, audio_config, key -> shard)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint folder not found")
    cfg = _read_llm_config(root)
    located = _check_lm_headers(root, cfg)
    audio_config = _read_audio_config(root, cfg["n_embd"])
    _encoder_file(root)
    for name in (TOKENIZER, TOKENIZER_CONFIG):
        if not (root / name).is_file():
            raise _fail(name, "(file)", f"not found in {root}")
    _read_tokens(root, cfg["padded_vocab_size"])
    return cfg, audio_config, located


class LazyLMState(Mapping):
    """HF Qwen2 name -> float32 tensor, each read from its safetensors shard when asked for.

    A mapping like `hf_qwen2_state_from_litgpt`'s result, for exporting real-size models (13.6 GB
    of float32) with about one weight in memory at a time. `shape(name)` costs nothing; the q/k/v
    rows of a fused qkv weight are cut from it on access (the last fused tensor is cached, so
    q, k and v of a layer read it once)."""

    def __init__(self, root: Path, cfg: dict, located: dict):
        self._root, self._cfg = Path(root), cfg
        q_rows, kv_rows = _qkv_sizes(cfg)
        self._slices = {"q_proj": (0, q_rows), "k_proj": (q_rows, q_rows + kv_rows),
                        "v_proj": (q_rows + kv_rows, q_rows + 2 * kv_rows)}
        self._sources = {}  # hf name -> (litgpt key as stored, shard, rows or None)
        self._shapes = {}
        expected = expected_litgpt_shapes(cfg)
        stored = {k.replace("attn.attn.", "attn.qkv."): k for k in located}
        for lit_key, shape in expected.items():
            key = stored[lit_key]
            # Map names through the same function the eager path uses (one tensor-free call per key).
            for hf_key in hf_qwen2_state_from_litgpt({lit_key: _ShapeOnly(shape)}, cfg, file=INDEX):
                part = hf_key.rsplit(".", 2)[-2]
                rows = self._slices[part] if lit_key.endswith(("attn.qkv.weight", "attn.qkv.bias")) else None
                self._sources[hf_key] = (key, located[key], rows)
                self._shapes[hf_key] = ((rows[1] - rows[0], *shape[1:]) if rows else tuple(shape))
        self._cache = (None, None)

    def shape(self, key: str) -> tuple:
        return self._shapes[key]

    def __len__(self) -> int:
        return len(self._sources)

    def __iter__(self):
        return iter(self._sources)

    def __contains__(self, key) -> bool:
        return key in self._sources

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        stored, shard, rows = self._sources[key]
        if self._cache[0] == stored:
            tensor = self._cache[1]
        else:
            with safe_open(str(self._root / shard), framework="pt") as fh:
                tensor = fh.get_tensor(stored).float()
            if ".attn.attn." in stored:
                tensor = regroup_interleaved_qkv(tensor, self._cfg)
            self._cache = (stored, tensor) if rows else (None, None)
        return tensor[rows[0]:rows[1]] if rows else tensor


class _ShapeOnly:
    """Stands in for a tensor in `hf_qwen2_state_from_litgpt` when only the names are wanted."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def __getitem__(self, index):
        return self


def load_checkpoint(checkpoint_dir, lazy: bool = False) -> Checkpoint:
    """Validate the folder, then read every weight (as float32, HF Qwen2 names).

    `lazy=True`: the LM weights are read one at a time on access (`LazyLMState`), for exports
    of models larger than memory; the audio encoder weights are memory-mapped either way."""
    from safetensors import safe_open

    root = Path(checkpoint_dir)
    cfg, audio_config, located = validate_checkpoint(root)
    tokens, prompt = _read_tokens(root, cfg["padded_vocab_size"])
    try:
        from tokenizers import Tokenizer

        Tokenizer.from_file(str(root / TOKENIZER))
    except Exception as exc:  # tokenizers raises a bare Exception on parse errors
        raise _fail(TOKENIZER, "(file)", f"not a readable tokenizers file ({str(exc)[:100]})") from None
    encoder_state = _load_encoder_state(_encoder_file(root), audio_config)
    if lazy:
        return Checkpoint(path=root, llm_config=cfg, hf_qwen2_config=hf_qwen2_config(cfg),
                          lm_state=LazyLMState(root, cfg, located), audio_config=audio_config,
                          encoder_state=encoder_state, tokenizer_path=root / TOKENIZER, tokens=tokens,
                          system_prompt=prompt)
    litgpt_state = {}
    by_shard: dict = {}
    for key, shard in located.items():
        by_shard.setdefault(shard, []).append(key)
    for shard, keys in by_shard.items():
        with safe_open(str(root / shard), framework="pt") as fh:
            for key in keys:
                litgpt_state[key] = fh.get_tensor(key).float()
    lm_state = hf_qwen2_state_from_litgpt(litgpt_state, cfg, file=INDEX)
    return Checkpoint(path=root, llm_config=cfg, hf_qwen2_config=hf_qwen2_config(cfg), lm_state=lm_state,
                      audio_config=audio_config, encoder_state=encoder_state,
                      tokenizer_path=root / TOKENIZER, tokens=tokens, system_prompt=prompt)


# --- writer -------------------------------------------------------------------------------

def _omni_config_json(audio_config: dict) -> dict:
    """A minimal Qwen2.5-Omni config: only thinker_config.audio_config is read."""
    audio = dict(audio_config)
    audio["model_type"] = "qwen2_5_omni_audio_encoder"
    return {"architectures": ["Qwen2_5OmniModel"], "model_type": "qwen2_5_omni",
            "thinker_config": {"model_type": "qwen2_5_omni_thinker", "audio_config": audio}}


def _split_shards(keys: list, sizes: dict, num_shards: int) -> list:
    """Contiguous key groups of roughly equal byte size."""
    total = sum(sizes.values())
    target = total / num_shards
    groups, current, acc = [], [], 0
    for key in keys:
        current.append(key)
        acc += sizes[key]
        if acc >= target * (len(groups) + 1) and len(groups) < num_shards - 1:
            groups.append(current)
            current = []
    groups.append(current)
    return [g for g in groups if g]


def save_checkpoint(out_dir, *, llm_config: dict, lm_state: dict, audio_config: dict, encoder_state: dict,
                    tokenizer, protocol_tokens: dict | None = None, num_shards: int = 1,
                    write_lm: bool = True) -> Path:
    """Write the release layout. `lm_state` has litgpt names; `tokenizer` is a tokenizers.Tokenizer.

    `write_lm=False` writes everything but the LM weights (a caller that streams shards itself).
    """
    from safetensors.torch import save_file

    root = Path(out_dir)
    (root / "qwen25OmniConfig").mkdir(parents=True, exist_ok=True)
    (root / MODEL_CONFIG).write_text(yaml.safe_dump(dict(llm_config), sort_keys=False), encoding="utf-8")
    keys = list(lm_state)
    sizes = {k: lm_state[k].numel() * lm_state[k].element_size() for k in keys}
    if not write_lm:
        pass
    elif num_shards <= 1:
        save_file({k: lm_state[k].contiguous() for k in keys}, str(root / SINGLE))
    else:
        groups = _split_shards(keys, sizes, num_shards)
        n = len(groups)
        weight_map = {}
        for i, group in enumerate(groups, start=1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file({k: lm_state[k].contiguous() for k in group}, str(root / name))
            weight_map.update({k: name for k in group})
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (root / INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    (root / OMNI_CONFIG).write_text(json.dumps(_omni_config_json(audio_config), indent=2), encoding="utf-8")
    torch.save({k: v.contiguous() for k, v in encoder_state.items()}, root / ENCODER_FILES[0])
    tokenizer.save(str(root / TOKENIZER))
    (root / TOKENIZER_CONFIG).write_text(json.dumps(
        {"add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": llm_config["block_size"]},
        indent=2), encoding="utf-8")
    if protocol_tokens is not None:
        (root / PROTOCOL_TOKENS).write_text(json.dumps(protocol_tokens, indent=2), encoding="utf-8")
    return root
