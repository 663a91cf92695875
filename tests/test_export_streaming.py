"""The bounded-memory export path against the whole-model one it replaced (issue 3, part 7).

The package streams: the decoder graph is traced with placeholder weights and its initializers
written one at a time from the checkpoint (`export_decoder_streamed`), and precision conversion
works initializer by initializer (`quantize.convert`). At tiny size the result must compute
exactly what the in-memory path (`export_decoder` + `quantize.convert_in_memory`) computes.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from listenloop.export import quantize  # noqa: E402
from listenloop.export.checkpoint import load_checkpoint  # noqa: E402
from listenloop.export.decoder_graph import ExportDecoder, export_decoder, export_decoder_streamed  # noqa: E402
from listenloop.export.encoder_graph import (  # noqa: E402
    ChunkEncoder,
    build_hf_encoder,
    export_encoder,
    export_encoder_streamed,
    hf_encode,
)
from listenloop.protocol import PRECISIONS  # noqa: E402


@pytest.fixture(scope="module")
def eager(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def lazy(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint, lazy=True)


@pytest.fixture(scope="module")
def fp32_graphs(eager, lazy, tmp_path_factory):
    """(in-memory fp32 decoder, streamed fp32 decoder) paths."""
    root = tmp_path_factory.mktemp("streaming")
    cfg = eager.llm_config
    (root / "old").mkdir()
    (root / "new").mkdir()
    old = export_decoder(ExportDecoder(eager.lm_state, cfg), root / "old" / "decoder.onnx", cfg)
    new = export_decoder_streamed(lazy.lm_state, root / "new" / "decoder.onnx", cfg)
    return old, new


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _decoder_feeds(session, cfg, T=4, P=3, seed=0):
    rng = np.random.default_rng(seed)
    fp16 = session.get_inputs()[0].type == "tensor(float16)"
    dtype = np.float16 if fp16 else np.float32
    feeds = {"inputs_embeds": rng.standard_normal((1, T, cfg["n_embd"])).astype(dtype),
             "position_ids": np.arange(P, P + T, dtype=np.int64)[None],
             "logits_index": np.array([T - 2, T - 1], dtype=np.int64)}
    for i in range(cfg["n_layer"]):
        for kind in ("past_key", "past_value"):
            feeds[f"{kind}.{i}"] = rng.standard_normal((1, P, cfg["n_query_groups"], cfg["head_size"])).astype(dtype)
    return feeds


def test_lazy_state_is_the_eager_state(eager, lazy):
    assert list(lazy.lm_state) == list(eager.lm_state)
    for key, tensor in eager.lm_state.items():
        assert lazy.lm_state.shape(key) == tuple(tensor.shape)
        assert torch.equal(lazy.lm_state[key], tensor), key


@pytest.mark.parametrize("num_shards", [1, 3])
def test_lazy_state_reads_legacy_interleaved_qkv_like_the_eager_loader(tmp_path, num_shards):
    from listenloop.export import checkpoint as ck
    from listenloop.export import tiny
    from listenloop.export.tokenizer_build import build_tokenizer

    gen = torch.Generator().manual_seed(3)
    tokenizer, tokens = build_tokenizer(tiny.TRAINING_TEXT, vocab_size=300)
    cfg = dict(tiny.TINY_LLM, vocab_size=tokenizer.get_vocab_size(), padded_vocab_size=320)
    legacy = {}
    for key, tensor in tiny.random_llm_state(cfg, gen).items():
        if ".attn.qkv." in key:
            key, tensor = key.replace(".attn.qkv.", ".attn.attn."), ck.interleave_qkv(tensor, cfg)
        legacy[key] = tensor
    root = ck.save_checkpoint(tmp_path / "ckpt", llm_config=cfg, lm_state=legacy, audio_config=tiny.TINY_AUDIO,
                              encoder_state=tiny.random_encoder_state(tiny.TINY_AUDIO, gen), tokenizer=tokenizer,
                              protocol_tokens=tokens, num_shards=num_shards)
    eager, lazy = ck.load_checkpoint(root), ck.load_checkpoint(root, lazy=True)
    assert sorted(lazy.lm_state) == sorted(eager.lm_state)
    for key in sorted(eager.lm_state, reverse=True):  # v, k, q order: the fused-tensor cache is keyed right
        assert torch.equal(lazy.lm_state[key], eager.lm_state[key]), key


def test_streamed_fp32_graph_has_the_same_nodes_and_weights(fp32_graphs):
    old, new = (onnx.load(str(p)) for p in fp32_graphs)
    assert [(n.op_type, n.name) for n in new.graph.node] == [(n.op_type, n.name) for n in old.graph.node]
    assert [i.name for i in new.graph.input] == [i.name for i in old.graph.input]
    # Same weights, under the names each path gives them (the producer's name for a folded transpose).
    old_init = {t.name: onnx.numpy_helper.to_array(t) for t in old.graph.initializer}
    new_init = {t.name: onnx.numpy_helper.to_array(t) for t in new.graph.initializer}
    for a, b in zip(old.graph.node, new.graph.node):
        for x, y in zip(a.input, b.input):
            if x in old_init:
                np.testing.assert_array_equal(new_init[y], old_init[x])
    assert sum(v.nbytes for v in new_init.values()) == sum(v.nbytes for v in old_init.values())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_streamed_decoder_computes_exactly_what_the_in_memory_path_did(eager, fp32_graphs, tmp_path, precision):
    old_src, new_src = fp32_graphs
    quantize.convert_in_memory(old_src, tmp_path / "old.onnx", precision, keep_float32_io=["logits"])
    quantize.convert(new_src, tmp_path / "new.onnx", precision, keep_float32_io=["logits"])
    assert not (tmp_path / "new.onnx.data").exists()  # small graphs stay one self-contained file
    old, new = _session(tmp_path / "old.onnx"), _session(tmp_path / "new.onnx")
    assert [(i.name, i.type) for i in new.get_inputs()] == [(i.name, i.type) for i in old.get_inputs()]
    for seed in range(2):
        feeds = _decoder_feeds(old, eager.llm_config, seed=seed)
        for a, b in zip(old.run(None, feeds), new.run(None, feeds)):
            np.testing.assert_array_equal(b, a)
    old_ops = sorted(n.op_type for n in onnx.load(str(tmp_path / "old.onnx")).graph.node)
    new_ops = sorted(n.op_type for n in onnx.load(str(tmp_path / "new.onnx")).graph.node)
    assert new_ops == old_ops


@pytest.fixture(scope="module")
def encoder_graphs(eager, tmp_path_factory):
    """(in-memory fp32 encoder, streamed fp32 encoder) paths."""
    root = tmp_path_factory.mktemp("encoder")
    (root / "old").mkdir()
    (root / "new").mkdir()
    old = export_encoder(ChunkEncoder(build_hf_encoder(eager.audio_config, eager.encoder_state)),
                         root / "old" / "encoder.onnx")
    shared = build_hf_encoder(eager.audio_config, eager.encoder_state, share_weights=True)
    new = export_encoder_streamed(ChunkEncoder(shared), root / "new" / "encoder.onnx")
    return old, new


def test_shared_weight_encoder_is_the_copied_one(eager):
    copied = build_hf_encoder(eager.audio_config, eager.encoder_state)
    shared = build_hf_encoder(eager.audio_config, eager.encoder_state, share_weights=True)
    mel = (torch.randn(3, 128, 40, generator=torch.Generator().manual_seed(1)) * 0.4).clamp(-1, 1.5)
    assert torch.equal(hf_encode(shared, mel), hf_encode(copied, mel))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_streamed_encoder_computes_exactly_what_the_in_memory_path_did(encoder_graphs, tmp_path, precision):
    old_src, new_src = encoder_graphs
    old_nodes = [(n.op_type, n.name) for n in onnx.load(str(old_src)).graph.node]
    assert [(n.op_type, n.name) for n in onnx.load(str(new_src)).graph.node] == old_nodes
    keep = ["mel", "audio_embeds"]
    quantize.convert_in_memory(old_src, tmp_path / "old.onnx", precision, keep_float32_io=keep)
    quantize.convert(new_src, tmp_path / "new.onnx", precision, keep_float32_io=keep)
    mel = (np.random.default_rng(0).standard_normal((3, 128, 40)) * 0.4).astype(np.float32)
    a = _session(tmp_path / "old.onnx").run(None, {"mel": mel})[0]
    b = _session(tmp_path / "new.onnx").run(None, {"mel": mel})[0]
    np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_large_graphs_keep_their_weights_in_one_external_file(eager, fp32_graphs, tmp_path, monkeypatch, precision):
    """Above the size limit the graph refers to `<name>.data`; ONNX Runtime loads it as it did."""
    _, new_src = fp32_graphs
    quantize.convert(new_src, tmp_path / "small.onnx", precision, keep_float32_io=["logits"])
    monkeypatch.setattr(quantize, "LARGE_MODEL_BYTES", 0)
    quantize.convert(new_src, tmp_path / "decoder.onnx", precision, keep_float32_io=["logits"])
    model = onnx.load(str(tmp_path / "decoder.onnx"), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"decoder.onnx.data"}
    assert (tmp_path / "decoder.onnx").stat().st_size < 1_000_000
    feeds = _decoder_feeds(_session(tmp_path / "small.onnx"), eager.llm_config)
    for a, b in zip(_session(tmp_path / "small.onnx").run(None, feeds), _session(tmp_path / "decoder.onnx").run(None, feeds)):
        np.testing.assert_array_equal(b, a)


def _cos_plus_sin_graph(cast_copies=1, extra_casts=()):
    """float16 `angles` -> Cast to float32 (`cast_copies` identical nodes, as ORT 1.30/1.31's fp16
    converter writes them for two float32-only consumers) -> Cos + Sin -> float32 `y`.
    `extra_casts`: (to, output name) Casts of `angles` that are graph outputs too."""
    from onnx import TensorProto, helper

    cast = dict(inputs=["angles"], outputs=["angles_cast_to_fp32"], name="angles_cast_to_fp32_node",
                to=TensorProto.FLOAT)
    nodes = [helper.make_node("Cast", **cast) for _ in range(cast_copies)]
    nodes += [helper.make_node("Cos", ["angles_cast_to_fp32"], ["cos"], name="cos"),
              helper.make_node("Sin", ["angles_cast_to_fp32"], ["sin"], name="sin"),
              helper.make_node("Add", ["cos", "sin"], ["y"], name="add")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]
    for i, (to, name) in enumerate(extra_casts):
        nodes.append(helper.make_node("Cast", ["angles"], [name], name=f"extra_cast_{i}", to=to))
        outputs.append(helper.make_tensor_value_info(name, to, [2, 3]))
    value_info = [helper.make_tensor_value_info("angles_cast_to_fp32", TensorProto.FLOAT, [2, 3])] * cast_copies
    inputs = [helper.make_tensor_value_info("angles", TensorProto.FLOAT16, [2, 3])]
    graph = helper.make_graph(nodes, "cos_plus_sin", inputs, outputs, value_info=value_info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _load(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_duplicate_casts_of_the_fp16_converter_are_dropped():
    model = _cos_plus_sin_graph(cast_copies=2)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    with pytest.raises(Exception, match="same node name"):
        _load(model)

    assert quantize.drop_duplicate_casts(model) == 1
    names = [n.name for n in model.graph.node]
    outputs = [o for n in model.graph.node for o in n.output]
    assert len(set(names)) == len(names) and len(set(outputs)) == len(outputs)
    assert [v.name for v in model.graph.value_info] == ["angles_cast_to_fp32"]
    onnx.checker.check_model(model, full_check=True)
    angles = np.linspace(-4000, 4000, 6, dtype=np.float16).reshape(2, 3)
    (y,) = _load(model).run(None, {"angles": angles})
    wide = angles.astype(np.float32)
    np.testing.assert_allclose(y, np.cos(wide) + np.sin(wide), rtol=1e-5, atol=1e-5)


def test_a_graph_without_duplicate_casts_is_left_unchanged():
    from onnx import TensorProto

    # Casts of the same input that differ in `to` or in their output name are not duplicates.
    model = _cos_plus_sin_graph(extra_casts=[(TensorProto.DOUBLE, "angles_f64"), (TensorProto.FLOAT, "angles_f32")])
    before = model.SerializeToString()
    assert quantize.drop_duplicate_casts(model) == 0
    assert model.SerializeToString() == before
    onnx.checker.check_model(model, full_check=True)


def test_fp16_conversion_drops_the_casts_an_older_converter_duplicates(eager, fp32_graphs, tmp_path, monkeypatch):
    """Both conversion paths, under a converter that writes one Cast per consumer (ORT 1.30/1.31)."""
    from onnxruntime.transformers import float16

    old_src, new_src = fp32_graphs
    quantize.convert(new_src, tmp_path / "reference.onnx", "fp16", keep_float32_io=["logits"])
    convert = float16.convert_float_to_float16

    def one_cast_per_consumer(model, **kwargs):
        converted = convert(model, **kwargs)
        graph = converted.graph
        for cast in [n for n in graph.node if n.op_type == "Cast" and n.name.endswith("_cast_to_fp32_node")]:
            slots = sum(list(n.input).count(cast.output[0]) for n in graph.node)
            info = [v for v in graph.value_info if v.name == cast.output[0]]
            for _ in range(slots - 1):
                graph.node.add().CopyFrom(cast)
                graph.value_info.extend(info)
        return converted

    monkeypatch.setattr(float16, "convert_float_to_float16", one_cast_per_consumer)
    model = onnx.load(str(old_src))
    duplicated = one_cast_per_consumer(model, keep_io_types=["logits"], op_block_list=quantize.FP16_OP_BLOCK_LIST,
                                       node_block_list=quantize._rope_nodes(model))
    names = [n.name for n in duplicated.graph.node]
    assert len(set(names)) < len(names)  # the emulation really duplicates (Cos/Sin, Concat of the angles)

    quantize.convert_in_memory(old_src, tmp_path / "old.onnx", "fp16", keep_float32_io=["logits"])
    quantize.convert(new_src, tmp_path / "new.onnx", "fp16", keep_float32_io=["logits"])
    reference = _session(tmp_path / "reference.onnx")
    feeds = _decoder_feeds(reference, eager.llm_config)
    expected = reference.run(None, feeds)
    for path in (tmp_path / "old.onnx", tmp_path / "new.onnx"):
        names = [n.name for n in onnx.load(str(path)).graph.node]
        assert len(set(names)) == len(names), path.name
        for a, b in zip(expected, _session(path).run(None, feeds)):
            np.testing.assert_array_equal(b, a)
