"""A small, fully controlled model package for the runtime tests, built with onnx.helper.

It follows the package format and graph contracts exactly (docs/DESIGN.md) but is not a
transformer checkpoint: the decoder is a few layers of real causal attention over a
position-major KV cache, with sinusoidal position features, so token layout, positions,
cache contents and catch-up equivalence are all observable. No torch needed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from listenloop.protocol import EMOTION_NAMES
from listenloop.textstream import byte_level_alphabet

H, KVH, D, LAYERS = 32, 2, 16, 2
BYTE_TOKENS = 256
# Protocol ids above the 256 byte tokens, as a checkpoint's protocol_tokens.json would set them.
TOKENS = {"USER": 300, "ASSISTANT": 301, "KEEP_SILENCE": 302, "PAD": 303, "ONLINE": 304, "OFFLINE": 305,
          "ENGLISH": 306, "HAPPY": 307, "SAD": 308, "ANGRY": 309, "SURPRISE": 310, "NORMAL": 311,
          "URGENT": 312, "TEXT_END": 313, "TEXT_BEGIN": 314, "SYSTEM": 314, "AUDIO_PAD": 315,
          "AUDIO_BEGIN": 316, "AUDIO_END": 317}
EMOTIONS = {k: TOKENS[k] for k in EMOTION_NAMES}
VOCAB = 320
SYSTEM_PROMPT = "Be brief."


def make_tokenizer(path: Path) -> None:
    """Byte-level BPE whose id b is byte b, and protocol names for the control ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in enumerate(byte_level_alphabet())}
    for i in range(BYTE_TOKENS, VOCAB):
        vocab[f"<ctl{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))


def _init(name, array, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(array, dtype=dtype), name)


def make_decoder(path: Path, rng: np.random.Generator, io_dtype=np.float32) -> None:
    ort_io = TensorProto.FLOAT if io_dtype == np.float32 else TensorProto.FLOAT16
    inputs = [helper.make_tensor_value_info("inputs_embeds", ort_io, [1, "T", H]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "T"]),
              helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["K"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["K", VOCAB])]
    nodes, inits = [], []
    inits += [_init("freqs", 1.0 / (10.0 ** (np.arange(H) / H))), _init("neg", -1e9), _init("zero", 0.0),
              _init("scale", 1.0 / np.sqrt(D)), _init("one_i", 1, np.int64), _init("zero_i", 0, np.int64),
              _init("ax0", [0], np.int64), _init("ax1", [1], np.int64), _init("axm1", [-1], np.int64),
              _init("kv_shape", [1, -1, KVH, D], np.int64), _init("flat_shape", [1, -1, KVH * D], np.int64),
              _init("lm_head", rng.normal(0, 1.0, (H, VOCAB)))]
    nodes += [helper.make_node("Cast", ["inputs_embeds"], ["x_in"], to=TensorProto.FLOAT),
              helper.make_node("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT),
              helper.make_node("Unsqueeze", ["pos_f", "axm1"], ["pos_u"]),
              helper.make_node("Mul", ["pos_u", "freqs"], ["angles"]),
              helper.make_node("Sin", ["angles"], ["pos_feat"]),
              helper.make_node("Add", ["x_in", "pos_feat"], ["x0"]),
              # causal mask over [P + T] keys: row t may see column j iff j <= P + t
              helper.make_node("Shape", ["past_key.0"], ["past_shape"]),
              helper.make_node("Gather", ["past_shape", "one_i"], ["P"], axis=0),
              helper.make_node("Shape", ["inputs_embeds"], ["x_shape"]),
              helper.make_node("Gather", ["x_shape", "one_i"], ["T"], axis=0),
              helper.make_node("Add", ["P", "T"], ["PT"]),
              helper.make_node("Range", ["zero_i", "PT", "one_i"], ["cols"]),
              helper.make_node("Range", ["P", "PT", "one_i"], ["rows"]),
              helper.make_node("Unsqueeze", ["cols", "ax0"], ["cols_u"]),
              helper.make_node("Unsqueeze", ["rows", "ax1"], ["rows_u"]),
              helper.make_node("LessOrEqual", ["cols_u", "rows_u"], ["allowed"]),
              helper.make_node("Where", ["allowed", "zero", "neg"], ["mask"])]
    x = "x0"
    for i in range(LAYERS):
        p = f"l{i}_"
        inputs += [helper.make_tensor_value_info(f"past_key.{i}", ort_io, [1, "P", KVH, D]),
                   helper.make_tensor_value_info(f"past_value.{i}", ort_io, [1, "P", KVH, D])]
        outputs += [helper.make_tensor_value_info(f"new_key.{i}", ort_io, [1, "T", KVH, D]),
                    helper.make_tensor_value_info(f"new_value.{i}", ort_io, [1, "T", KVH, D])]
        for w in ("wq", "wk", "wv", "wo"):
            inits.append(_init(p + w, rng.normal(0, 0.4, (H, H))))
        nodes += [
            helper.make_node("MatMul", [x, p + "wq"], [p + "q2"]),
            helper.make_node("Reshape", [p + "q2", "kv_shape"], [p + "q3"]),
            helper.make_node("Transpose", [p + "q3"], [p + "q"], perm=[0, 2, 1, 3]),
            helper.make_node("MatMul", [x, p + "wk"], [p + "k2"]),
            helper.make_node("Reshape", [p + "k2", "kv_shape"], [p + "k3"]),
            helper.make_node("Cast", [p + "k3"], [f"new_key.{i}"], to=ort_io),
            helper.make_node("MatMul", [x, p + "wv"], [p + "v2"]),
            helper.make_node("Reshape", [p + "v2", "kv_shape"], [p + "v3"]),
            helper.make_node("Cast", [p + "v3"], [f"new_value.{i}"], to=ort_io),
            helper.make_node("Cast", [f"past_key.{i}"], [p + "pk"], to=TensorProto.FLOAT),
            helper.make_node("Cast", [f"past_value.{i}"], [p + "pv"], to=TensorProto.FLOAT),
            helper.make_node("Concat", [p + "pk", p + "k3"], [p + "kall"], axis=1),
            helper.make_node("Concat", [p + "pv", p + "v3"], [p + "vall"], axis=1),
            helper.make_node("Transpose", [p + "kall"], [p + "kt"], perm=[0, 2, 3, 1]),
            helper.make_node("Transpose", [p + "vall"], [p + "vt"], perm=[0, 2, 1, 3]),
            helper.make_node("MatMul", [p + "q", p + "kt"], [p + "s0"]),
            helper.make_node("Mul", [p + "s0", "scale"], [p + "s1"]),
            helper.make_node("Add", [p + "s1", "mask"], [p + "s2"]),
            helper.make_node("Softmax", [p + "s2"], [p + "a"], axis=-1),
            helper.make_node("MatMul", [p + "a", p + "vt"], [p + "c0"]),
            helper.make_node("Transpose", [p + "c0"], [p + "c1"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [p + "c1", "flat_shape"], [p + "c2"]),
            helper.make_node("MatMul", [p + "c2", p + "wo"], [p + "o"]),
            helper.make_node("Tanh", [p + "o"], [p + "ot"]),
            helper.make_node("Add", [x, p + "ot"], [p + "x"]),
        ]
        x = p + "x"
    nodes += [helper.make_node("Gather", [x, "logits_index"], ["rows_sel"], axis=1),
              helper.make_node("Squeeze", ["rows_sel", "ax0"], ["rows_h"]),
              helper.make_node("MatMul", ["rows_h", "lm_head"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny_decoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_encoder(path: Path, rng: np.random.Generator) -> None:
    inputs = [helper.make_tensor_value_info("mel", TensorProto.FLOAT, ["B", 128, 40])]
    outputs = [helper.make_tensor_value_info("audio_embeds", TensorProto.FLOAT, ["B", 10, H])]
    inits = [_init("shape4", [-1, 128, 10, 4], np.int64), _init("proj", rng.normal(0, 0.3, (128, H)))]
    nodes = [helper.make_node("Reshape", ["mel", "shape4"], ["m4"]),
             helper.make_node("ReduceMean", ["m4"], ["pooled"], axes=[3], keepdims=0),
             helper.make_node("Transpose", ["pooled"], ["t"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "proj"], ["audio_embeds"])]
    graph = helper.make_graph(nodes, "tiny_encoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build_tiny_package(out: Path, seed: int = 0, max_context: int = 512, io_dtype=np.float32) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    make_encoder(out / "encoder.onnx", rng)
    make_decoder(out / "decoder.onnx", rng, io_dtype)
    np.save(out / "embeddings.npy", rng.normal(0, 1.0, (VOCAB, H)).astype(io_dtype))
    make_tokenizer(out / "tokenizer.json")
    prompt_ids = list(SYSTEM_PROMPT.encode("utf-8"))
    precision = "fp32" if io_dtype == np.float32 else "fp16"
    manifest = {
        "format": "listenloop-model-package", "format_version": 2, "name": "runtime-test-tiny",
        "created_by": "tests/test_runtime_fixtures.py",
        "audio": {"sample_rate": 16000, "chunk_samples": 6400, "n_fft": 400, "hop_length": 160, "n_mels": 128,
                  "frames_per_chunk": 40, "vectors_per_chunk": 10, "mel_scale": "slaney", "mel_norm": "slaney",
                  "log_floor": 1e-10, "dynamic_range_log10": 8.0},
        "encoder": {"file": "encoder.onnx", "precision": "fp32", "output_dim": H},
        "decoder": {"file": "decoder.onnx", "precision": precision, "io_dtype": np.dtype(io_dtype).name,
                    "hidden_size": H, "num_layers": LAYERS, "num_heads": KVH, "num_kv_heads": KVH, "head_dim": D,
                    "vocab_size": VOCAB, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                    "rope_position_rounding": "float16", "max_context": max_context, "attention": "grouped",
                    "quantization": None},
        "embeddings": {"file": "embeddings.npy", "dtype": np.dtype(io_dtype).name, "shape": [VOCAB, H]},
        "tokenizer": {"file": "tokenizer.json"},
        "tokens": dict(TOKENS), "emotions": dict(EMOTIONS),
        "prompt": {"system_prompt": SYSTEM_PROMPT,
                   "prefix_ids": [TOKENS["ONLINE"], TOKENS["ENGLISH"], TOKENS["SYSTEM"], TOKENS["TEXT_BEGIN"]]
                   + prompt_ids + [TOKENS["TEXT_END"]]},
        "sampling": {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "speak_bias": 0.0, "max_reply_tokens": 32},
        "files": {name: {"bytes": (out / name).stat().st_size} for name in ("encoder.onnx", "decoder.onnx")},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


@pytest.fixture(scope="session")
def runtime_package(tmp_path_factory) -> Path:
    return build_tiny_package(tmp_path_factory.mktemp("runtime_pkg"))
