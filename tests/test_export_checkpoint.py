"""Checkpoint reader/writer (export/checkpoint.py): round trip, legacy qkv, and every bad input."""
from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")

from listenloop.errors import CheckpointError  # noqa: E402
from listenloop.export import checkpoint as ck  # noqa: E402
from listenloop.export import tiny  # noqa: E402
from listenloop.export.tokenizer_build import build_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def parts():
    gen = torch.Generator().manual_seed(7)
    tokenizer, tokens = build_tokenizer(tiny.TRAINING_TEXT, vocab_size=300)
    cfg = dict(tiny.TINY_LLM, vocab_size=tokenizer.get_vocab_size(), padded_vocab_size=320)
    return {"cfg": cfg, "lm": tiny.random_llm_state(cfg, gen), "enc": tiny.random_encoder_state(tiny.TINY_AUDIO, gen),
            "tokenizer": tokenizer, "tokens": dict(tokens, system_prompt="Be brief.")}


def _save(parts, path, lm=None, num_shards=2, protocol=True):
    return ck.save_checkpoint(path, llm_config=parts["cfg"], lm_state=lm or parts["lm"], audio_config=tiny.TINY_AUDIO,
                              encoder_state=parts["enc"], tokenizer=parts["tokenizer"],
                              protocol_tokens=parts["tokens"] if protocol else None, num_shards=num_shards)


def _one_line_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        ck.load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("num_shards", [1, 3])
def test_round_trip_keeps_every_tensor(parts, tmp_path, num_shards):
    root = _save(parts, tmp_path / "ckpt", num_shards=num_shards)
    shards = sorted(p.name for p in root.glob("*.safetensors"))
    assert shards == (["model.safetensors"] if num_shards == 1
                      else [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)])
    loaded = ck.load_checkpoint(root)
    back = ck.litgpt_state_from_hf_qwen2(loaded.lm_state, parts["cfg"])
    assert set(back) == set(parts["lm"])
    for key, tensor in parts["lm"].items():
        assert torch.equal(back[key], tensor), key
    for key, tensor in parts["enc"].items():
        assert torch.equal(loaded.encoder_state[key], tensor), key
    assert loaded.tokens["KEEP_SILENCE"] == parts["tokens"]["KEEP_SILENCE"]
    assert loaded.system_prompt == "Be brief."
    assert loaded.hf_qwen2_config.num_key_value_heads == 2 and loaded.hf_qwen2_config.head_dim == 16
    assert loaded.audio_config.output_dim == parts["cfg"]["n_embd"]


def test_qkv_split_is_contiguous_q_k_v(parts):
    cfg = parts["cfg"]
    hf = ck.hf_qwen2_state_from_litgpt(parts["lm"], cfg)
    qkv = parts["lm"]["transformer.h.1.attn.qkv.weight"]
    assert torch.equal(hf["model.layers.1.self_attn.q_proj.weight"], qkv[:64])
    assert torch.equal(hf["model.layers.1.self_attn.k_proj.weight"], qkv[64:96])
    assert torch.equal(hf["model.layers.1.self_attn.v_proj.weight"], qkv[96:])


def test_legacy_interleaved_rows_are_regrouped_per_kv_group():
    # 4 query heads, 2 KV groups, head size 1: stored order is (q0 q1 k0 v0)(q2 q3 k1 v1).
    cfg = {"n_head": 4, "n_query_groups": 2, "head_size": 1}
    stored = torch.tensor([10., 11., 20., 30., 12., 13., 21., 31.])[:, None]
    assert ck.regroup_interleaved_qkv(stored, cfg)[:, 0].tolist() == [10, 11, 12, 13, 20, 21, 30, 31]
    assert torch.equal(ck.interleave_qkv(ck.regroup_interleaved_qkv(stored, cfg), cfg), stored)


def test_legacy_attn_attn_key_loads_like_contiguous_qkv(parts, tmp_path):
    legacy = {}
    for key, tensor in parts["lm"].items():
        if ".attn.qkv." in key:
            legacy[key.replace(".attn.qkv.", ".attn.attn.")] = ck.interleave_qkv(tensor, parts["cfg"])
        else:
            legacy[key] = tensor
    new = ck.load_checkpoint(_save(parts, tmp_path / "new"))
    old = ck.load_checkpoint(_save(parts, tmp_path / "old", lm=legacy))
    for key, tensor in new.lm_state.items():
        assert torch.equal(old.lm_state[key], tensor), key


def test_not_a_checkpoint(tmp_path):
    _one_line_error(tmp_path, "model_config.yaml", "not found")
    _one_line_error(tmp_path / "missing", "checkpoint folder not found")


def test_truncated_shard_is_detected_from_its_header(tiny_checkpoint, tmp_path):
    root = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    shard = root / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    _one_line_error(root, "model-00002-of-00002.safetensors", "truncated")
    shard.write_bytes(data[:5])
    _one_line_error(root, "model-00002-of-00002.safetensors", "truncated")


def test_wrong_dtype_names_the_tensor(parts, tmp_path):
    lm = dict(parts["lm"])
    lm["transformer.h.0.norm_1.weight"] = torch.ones(64, dtype=torch.int32)
    _one_line_error(_save(parts, tmp_path / "ckpt", lm=lm), "transformer.h.0.norm_1.weight", "I32")


def test_config_disagreeing_with_weights(parts, tmp_path):
    root = _save(parts, tmp_path / "ckpt")
    text = (root / "model_config.yaml").read_text().replace("intermediate_size: 128", "intermediate_size: 256")
    (root / "model_config.yaml").write_text(text)
    _one_line_error(root, "mlp.fc_1.weight", "model_config.yaml", "[256, 64]")


def test_missing_and_unexpected_weights(parts, tmp_path):
    lm = {k: v for k, v in parts["lm"].items() if k != "lm_head.weight"}
    _one_line_error(_save(parts, tmp_path / "a", lm=lm), "lm_head.weight", "missing")
    lm = dict(parts["lm"], **{"transformer.h.9.norm_1.weight": torch.ones(64)})
    _one_line_error(_save(parts, tmp_path / "b", lm=lm), "transformer.h.9.norm_1.weight", "unexpected")


def test_unsupported_architecture_field(parts, tmp_path):
    root = _save(parts, tmp_path / "ckpt")
    text = (root / "model_config.yaml").read_text().replace("parallel_residual: false", "parallel_residual: true")
    (root / "model_config.yaml").write_text(text)
    _one_line_error(root, "model_config.yaml", "parallel_residual", "not supported")


def test_encoder_file_problems(parts, tmp_path):
    root = _save(parts, tmp_path / "ckpt")
    encoder = root / "audiointeraction_ChunkwisedEncoder.pth"
    encoder.rename(root / "MiniOmni3_ChunkwisedEncoder.pth")  # the old name is accepted
    assert ck.load_checkpoint(root).encoder_state.keys() == parts["enc"].keys()
    (root / "MiniOmni3_ChunkwisedEncoder.pth").unlink()
    _one_line_error(root, "audiointeraction_ChunkwisedEncoder.pth", "not found")
    bad = dict(parts["enc"], **{"proj.weight": torch.zeros(32, 64)})
    torch.save(bad, encoder)
    _one_line_error(root, encoder.name, "proj.weight", "shape")


def test_audio_config_must_match_the_llm_width(parts, tmp_path):
    root = _save(parts, tmp_path / "ckpt")
    path = root / "qwen25OmniConfig" / "config.json"
    config = json.loads(path.read_text())
    config["thinker_config"]["audio_config"]["output_dim"] = 2048
    path.write_text(json.dumps(config))
    _one_line_error(root, "output_dim", "2048")


def test_protocol_tokens_default_to_release_ids_and_are_range_checked(parts, tmp_path):
    root = _save(parts, tmp_path / "ckpt", protocol=False)
    # Release ids do not fit a 320-token vocabulary: refused with the field named.
    _one_line_error(root, "USER", "outside the vocabulary")
    (root / "protocol_tokens.json").write_text(json.dumps({"KEEP_SILENCE": 4, "TEXT_BEGIN": 4}))
    _one_line_error(root, "protocol_tokens.json")
