"""Exported graphs against transformers' own modules (docs/PROTOCOL.md "Encoder" and "Listening step";
docs/DESIGN.md contracts)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from listenloop.export.checkpoint import load_checkpoint  # noqa: E402
from listenloop.export.decoder_graph import ExportDecoder, export_decoder, round_positions  # noqa: E402
from listenloop.export.encoder_graph import ChunkEncoder, build_hf_encoder, export_encoder, hf_encode  # noqa: E402
from listenloop.export.reference import rounded_positions  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def hf_decoder(checkpoint):
    from transformers import Qwen2ForCausalLM

    config = checkpoint.hf_qwen2_config
    config._attn_implementation = "eager"
    model = Qwen2ForCausalLM(config).eval()
    model.load_state_dict(checkpoint.lm_state, strict=True)
    return model


@pytest.fixture(scope="module")
def decoder_session(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("graphs") / "decoder.onnx"
    export_decoder(ExportDecoder(checkpoint.lm_state, checkpoint.llm_config), path, checkpoint.llm_config)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _mel(n, seed=0):
    return (torch.randn(n, 128, 40, generator=torch.Generator().manual_seed(seed)) * 0.4).clamp(-1, 1.5)


def test_encoder_chunks_are_independent_and_match_hf_forward(checkpoint, tmp_path):
    hf = build_hf_encoder(checkpoint.audio_config, checkpoint.encoder_state)
    mel = _mel(4)
    reference = hf_encode(hf, mel)  # one HF call, feature_lens = [40, 40, 40, 40]
    alone = torch.cat([hf_encode(hf, mel[i:i + 1]) for i in range(4)])
    assert torch.allclose(reference, alone, atol=1e-5)  # chunk independence (docs/PROTOCOL.md, "Encoder")
    wrapper = ChunkEncoder(hf)
    with torch.no_grad():
        assert torch.allclose(wrapper(mel), reference, atol=1e-5)
    session = ort.InferenceSession(str(export_encoder(wrapper, tmp_path / "enc.onnx")), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        out = session.run(None, {"mel": mel[:batch].numpy()})[0]
        assert out.shape == (batch, 10, checkpoint.llm_config["n_embd"])
        np.testing.assert_allclose(out, reference[:batch].numpy(), atol=1e-4)


def _feeds(cfg, embeds, positions, logits_index, past):
    feeds = {"inputs_embeds": embeds, "position_ids": positions, "logits_index": logits_index}
    for i in range(cfg["n_layer"]):
        feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = past[2 * i], past[2 * i + 1]
    return feeds


def test_decoder_prefill_and_cached_steps_match_qwen2(checkpoint, hf_decoder, decoder_session):
    cfg = checkpoint.llm_config
    n_kv, d, h = cfg["n_query_groups"], cfg["head_size"], cfg["n_embd"]
    ids = torch.tensor([[6, 8, 1, 1, 40, 41, 42, 0, 16, 5, 5, 3, 4, 16, 3]])
    with torch.no_grad():
        embeds = hf_decoder.get_input_embeddings()(ids)
        embeds[0, 9:11] += torch.randn(2, h, generator=torch.Generator().manual_seed(1))  # "audio" rows
        full = hf_decoder(inputs_embeds=embeds, position_ids=rounded_positions(0, ids.shape[1])).logits[0].numpy()
    past = [np.zeros((1, 0, n_kv, d), np.float32) for _ in range(2 * cfg["n_layer"])]
    # Prefill 8 tokens with three logit rows, then one token at a time, then a 4-token block.
    for start, stop, rows in ((0, 8, [0, 3, 7]), (8, 9, [0]), (9, 10, [0]), (10, 11, [0]), (11, 15, [1, 3])):
        T = stop - start
        outputs = decoder_session.run(None, _feeds(cfg, embeds[:, start:stop].numpy(),
                                                   np.arange(start, stop)[None], np.array(rows), past))
        logits, new = outputs[0], outputs[1:]
        assert logits.shape == (len(rows), cfg["padded_vocab_size"]) and logits.dtype == np.float32
        assert new[0].shape == (1, T, n_kv, d)
        np.testing.assert_allclose(logits, full[[start + r for r in rows]], atol=1e-4)
        past = [np.concatenate([p, n], axis=1) for p, n in zip(past, new)]


def test_new_keys_are_written_into_a_bound_cache_buffer_at_offset_p(checkpoint, decoder_session):
    cfg = checkpoint.llm_config
    n_kv, d, h, layers = cfg["n_query_groups"], cfg["head_size"], cfg["n_embd"], cfg["n_layer"]
    capacity, P, T = 32, 6, 5
    rng = np.random.default_rng(0)
    cache = [np.zeros((1, capacity, n_kv, d), np.float32) for _ in range(2 * layers)]
    first = rng.normal(size=(1, P, h)).astype(np.float32)
    second = rng.normal(size=(1, T, h)).astype(np.float32)
    empty = [np.zeros((1, 0, n_kv, d), np.float32)] * (2 * layers)
    out1 = decoder_session.run(None, _feeds(cfg, first, np.arange(P)[None], np.array([P - 1]), empty))
    for buf, new in zip(cache, out1[1:]):
        buf[:, :P] = new
    expected = decoder_session.run(None, _feeds(cfg, second, np.arange(P, P + T)[None], np.array([T - 1]),
                                                [b[:, :P].copy() for b in cache]))
    binding = decoder_session.io_binding()
    binding.bind_cpu_input("inputs_embeds", second)
    binding.bind_cpu_input("position_ids", np.arange(P, P + T)[None])
    binding.bind_cpu_input("logits_index", np.array([T - 1]))
    binding.bind_output("logits")  # bound first: copy_outputs_to_cpu keeps binding order
    row_bytes = n_kv * d * 4
    for i in range(layers):
        for j, kind in enumerate(("key", "value")):
            buf = cache[2 * i + j]
            binding.bind_input(f"past_{kind}.{i}", "cpu", 0, np.float32, [1, P, n_kv, d], buf.ctypes.data)
            binding.bind_output(f"new_{kind}.{i}", "cpu", 0, np.float32, [1, T, n_kv, d], buf.ctypes.data + P * row_bytes)
    decoder_session.run_with_iobinding(binding)
    np.testing.assert_allclose(binding.copy_outputs_to_cpu()[0], expected[0], atol=1e-6)
    for buf, new in zip(cache, expected[1:]):
        np.testing.assert_allclose(buf[:, P:P + T], new, atol=1e-6)  # written in place
        assert not buf[:, P + T:].any()  # nothing beyond the new rows


def test_positions_above_2048_are_rounded_through_float16(checkpoint, decoder_session):
    assert round_positions(torch.tensor([2048, 2049, 2050, 2051, 4097, 4099])).tolist() == \
        [2048, 2048, 2050, 2052, 4096, 4100]
    cfg = checkpoint.llm_config
    empty = [np.zeros((1, 0, cfg["n_query_groups"], cfg["head_size"]), np.float32)] * (2 * cfg["n_layer"])
    x = np.random.default_rng(0).normal(size=(1, 1, cfg["n_embd"])).astype(np.float32)

    def key_at(position):
        return decoder_session.run(["new_key.0"], _feeds(cfg, x, np.array([[position]]), np.array([0]), empty))[0]

    np.testing.assert_array_equal(key_at(2049), key_at(2048))
    np.testing.assert_array_equal(key_at(2051), key_at(2052))
    np.testing.assert_array_equal(key_at(4097), key_at(4096))
    assert np.abs(key_at(2050) - key_at(2048)).max() > 1e-3


@pytest.fixture(scope="module")
def gqa_session(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("graphs") / "decoder_gqa.onnx"
    cfg = checkpoint.llm_config
    export_decoder(ExportDecoder(checkpoint.lm_state, cfg, attention="gqa"), path, cfg)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run_gqa(session, cfg, cache, embeds, positions, rows, lengths):
    """One call with every layer's [B, KVH, C, D] buffer bound as both past and present."""
    binding = session.io_binding()
    binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, np.float32))
    binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, np.int64))
    binding.bind_cpu_input("logits_index", np.asarray(rows, np.int64))
    binding.bind_cpu_input("seqlens_k", np.asarray(lengths, np.int32) - 1)
    binding.bind_cpu_input("total_sequence_length", np.array(max(lengths), np.int32))
    binding.bind_output("logits")
    for i in range(cfg["n_layer"]):
        for j, kind in enumerate(("key", "value")):
            buf = cache[2 * i + j]
            binding.bind_input(f"past_{kind}.{i}", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            binding.bind_output(f"present_{kind}.{i}", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0]


def test_gqa_decoder_on_one_shared_buffer_matches_qwen2(checkpoint, hf_decoder, gqa_session):
    """The same protocol steps as above, through GroupQueryAttention writing into the buffer."""
    cfg = checkpoint.llm_config
    ids = torch.tensor([[6, 8, 1, 1, 40, 41, 42, 0, 16, 5, 5, 3, 4, 16, 3]])
    with torch.no_grad():
        embeds = hf_decoder.get_input_embeddings()(ids)
        embeds[0, 9:11] += torch.randn(2, cfg["n_embd"], generator=torch.Generator().manual_seed(1))
        full = hf_decoder(inputs_embeds=embeds, position_ids=rounded_positions(0, ids.shape[1])).logits[0].numpy()
    cache = [np.zeros((1, cfg["n_query_groups"], 24, cfg["head_size"]), np.float32) for _ in range(2 * cfg["n_layer"])]
    addresses = [b.ctypes.data for b in cache]
    for start, stop, rows in ((0, 8, [0, 3, 7]), (8, 9, [0]), (9, 10, [0]), (10, 11, [0]), (11, 15, [1, 3])):
        logits = _run_gqa(gqa_session, cfg, cache, embeds[:, start:stop].numpy(), np.arange(start, stop)[None], rows, [stop])
        np.testing.assert_allclose(logits, full[[start + r for r in rows]], atol=1e-4)
    assert [b.ctypes.data for b in cache] == addresses
    assert not any(b[:, :, 15:].any() for b in cache)  # nothing written past the last row


def test_gqa_rows_of_different_lengths_share_one_call(checkpoint, gqa_session):
    """Batching streams' reply tokens: a [2, 1] call with lengths 4 and 9 gives each row what it
    gets alone. (ORT's GroupQueryAttention takes B > 1 only for one-token steps once a cache
    exists, so listening steps, 13 tokens, stay one row per call.)"""
    cfg = checkpoint.llm_config
    n_kv, d, h, layers = cfg["n_query_groups"], cfg["head_size"], cfg["n_embd"], cfg["n_layer"]
    rng = np.random.default_rng(3)
    C, T = 20, 1
    history = [rng.normal(size=(1, n, h)).astype(np.float32) for n in (3, 8)]
    step = rng.normal(size=(2, T, h)).astype(np.float32)
    alone, caches = [], []
    for b, past in enumerate(history):
        cache = [np.zeros((1, n_kv, C, d), np.float32) for _ in range(2 * layers)]
        P = past.shape[1]
        _run_gqa(gqa_session, cfg, cache, past, np.arange(P)[None], [P - 1], [P])
        caches.append([c.copy() for c in cache])
        alone.append(_run_gqa(gqa_session, cfg, cache, step[b:b + 1], np.arange(P, P + T)[None], [T - 1], [P + T]))
    batch = [np.concatenate([caches[0][j], caches[1][j]]) for j in range(2 * layers)]
    lengths = [3 + T, 8 + T]
    positions = np.stack([np.arange(3, 3 + T), np.arange(8, 8 + T)])
    both = _run_gqa(gqa_session, cfg, batch, step, positions, [T - 1, 2 * T - 1], lengths)
    np.testing.assert_allclose(both[0], alone[0][0], atol=1e-5)
    np.testing.assert_allclose(both[1], alone[1][0], atol=1e-5)
