"""Engine protocol over the tiny package: exact token layout, positions, zero-copy KV cache,
speaking, bounded context and provider fallback."""
from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest
from test_runtime_fixtures import H, TOKENS, runtime_package  # noqa: F401

from listenloop.context import HISTORY_CHUNKS, minimum_capacity
from listenloop.engine import Engine
from listenloop.errors import ModelPackageError
from listenloop.protocol import STEP, VECTORS_PER_CHUNK
from listenloop.errors import ProtocolError
from listenloop.package import load_package
from listenloop.sampling import Sampler

T = TOKENS
BLOCK = [T["AUDIO_BEGIN"]] + [T["PAD"]] * VECTORS_PER_CHUNK + [T["ASSISTANT"]]


class ScriptedSampler(Sampler):
    """Replies with a fixed token script; listening decisions stay the model's (greedy)."""

    def __init__(self, script):
        super().__init__()
        self.script = list(script)
        self.i = 0

    def sample(self, logits):
        token = self.script[self.i % len(self.script)]
        self.i += 1
        return token


def chunks(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 10, H)).astype(np.float32)


@pytest.fixture(scope="module")
def package(runtime_package):  # noqa: F811
    return load_package(runtime_package)


def test_first_step_layout(package):
    engine = Engine(package)
    audio = chunks(1)[0]
    result = engine.listen(audio)
    fed = engine.last_inputs()
    prefix = list(package.prefix_ids)
    P = len(prefix)
    assert fed["past_length"] == 0
    assert fed["token_ids"].tolist() == prefix + BLOCK
    assert fed["positions"].tolist() == list(range(P + 12))
    assert fed["logits_index"].tolist() == [P + 11]
    table = package.embeddings()
    np.testing.assert_array_equal(fed["inputs_embeds"][P + 1:P + 11], audio)  # PAD rows carry the audio
    np.testing.assert_array_equal(fed["inputs_embeds"][:P + 1], table[prefix + [T["AUDIO_BEGIN"]]])
    np.testing.assert_array_equal(fed["inputs_embeds"][P + 11], table[T["ASSISTANT"]])
    assert result.position == engine.position == P + 12
    assert result.logits.shape == (package.vocab_size,)
    np.testing.assert_array_equal(result.decision_logits, result.logits[[T["KEEP_SILENCE"], T["TEXT_BEGIN"]]])


def test_later_steps_feed_back_the_decision(package):
    engine = Engine(package, speak_bias=-1e4)  # always silent
    P = len(package.prefix_ids)
    for k, audio in enumerate(chunks(3)):
        result = engine.listen(audio)
        assert not result.spoke and result.p_speak < 1e-3
    fed = engine.last_inputs()
    assert fed["past_length"] == P + 12 + STEP
    assert fed["token_ids"].tolist() == [T["KEEP_SILENCE"]] + BLOCK
    assert fed["positions"].tolist() == list(range(P + 12 + STEP, P + 12 + 2 * STEP))
    assert fed["logits_index"].tolist() == [12]
    np.testing.assert_array_equal(fed["inputs_embeds"][2:12], chunks(3)[2])


def test_kv_cache_is_written_in_place(package):
    """The decoder writes new keys straight into the preallocated cache (no copies)."""
    engine = Engine(package, speak_bias=-1e4)
    cache_ptr = engine.kv_cache.ctypes.data
    audio = chunks(2)
    engine.listen(audio[0])
    engine.listen(audio[1])
    assert engine.kv_cache.ctypes.data == cache_ptr
    # Recompute step 2 with plain numpy inputs and compare with the cache rows.
    fed = engine.last_inputs()
    P, n = fed["past_length"], len(fed["token_ids"])
    bare = ort.InferenceSession(str(package.decoder_path))
    feeds = {"inputs_embeds": fed["inputs_embeds"][None].copy(), "position_ids": fed["positions"][None].copy(),
             "logits_index": np.array([n - 1])}
    for i in range(engine.model.layers):
        feeds[f"past_key.{i}"] = engine.kv_cache[2 * i][:, :P].copy()
        feeds[f"past_value.{i}"] = engine.kv_cache[2 * i + 1][:, :P].copy()
    names = [o.name for o in bare.get_outputs()]
    out = dict(zip(names, bare.run(None, feeds)))
    for i in range(engine.model.layers):
        np.testing.assert_allclose(engine.kv_cache[2 * i][:, P:P + n], out[f"new_key.{i}"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(engine.kv_cache[2 * i + 1][:, P:P + n], out[f"new_value.{i}"], rtol=1e-5, atol=1e-6)


def test_speak_loop_with_emotion_and_text_end(package):
    script = [T["HAPPY"], ord("h"), ord("i"), T["TEXT_END"]]
    engine = Engine(package, sampler=ScriptedSampler(script), speak_bias=1e4)  # always speaks
    result = engine.listen(chunks(1)[0])
    assert result.spoke and result.p_speak > 0.999
    start = engine.position
    with pytest.raises(ProtocolError):
        engine.listen(chunks(1)[0])  # must reply first
    fed_tokens = []
    steps = []
    for step in engine.speak():
        fed_tokens.append(int(engine.last_inputs()["token_ids"][0]))
        assert engine.last_inputs()["positions"].tolist() == [start + len(steps)]
        steps.append(step.token)
    assert steps == script
    assert fed_tokens == [T["TEXT_BEGIN"], T["HAPPY"], ord("h"), ord("i")]
    assert not engine.reply_truncated
    assert engine.position == start + 4  # TEXT_END is fed as the first token of the next block
    engine.listen(chunks(2)[1])
    fed = engine.last_inputs()
    assert fed["token_ids"].tolist() == [T["TEXT_END"]] + BLOCK
    assert fed["positions"][0] == start + 4


def test_reply_cap_forces_text_end(package):
    engine = Engine(package, sampler=ScriptedSampler([ord("a")]), speak_bias=1e4, max_reply_tokens=5)
    engine.listen(chunks(1)[0])
    tokens = [s.token for s in engine.speak()]
    assert tokens == [ord("a")] * 5 and engine.reply_truncated
    engine.listen(chunks(1)[0])
    assert engine.last_inputs()["token_ids"][0] == T["TEXT_END"]


def test_abandoned_reply_still_ends_cleanly(package):
    engine = Engine(package, sampler=ScriptedSampler([ord("a")]), speak_bias=1e4)
    engine.listen(chunks(1)[0])
    replies = engine.speak()
    next(replies)
    replies.close()
    assert not engine.speaking
    engine.listen(chunks(1)[0])
    assert engine.last_inputs()["token_ids"][0] == T["TEXT_END"]


def test_decision_is_two_way_even_when_argmax_is_off_protocol(package):
    engine = Engine(package)
    for audio in chunks(8, seed=3):
        result = engine.listen(audio)
        top = int(np.argmax(result.logits))
        expected = result.decision_logits[1] > result.decision_logits[0]
        assert result.spoke == expected
        if engine.speaking:
            list(engine.speak(max_tokens=2))
        if top not in (T["KEEP_SILENCE"], T["TEXT_BEGIN"]):
            break
    else:
        pytest.fail("the tiny model never put an off-protocol token on top; pick another seed")


def test_speak_threshold(package):
    engine = Engine(package, speak_threshold=0.0)
    assert engine.listen(chunks(1)[0]).spoke
    engine = Engine(package, speak_threshold=1.01)
    assert not engine.listen(chunks(1)[0]).spoke


def _probe(engine, audio):
    out = []
    for chunk in audio:
        out.append(engine.listen(chunk))
        if engine.speaking:
            list(engine.speak(max_tokens=1))
    return out


def test_one_reply_token_per_speak_step(package):
    """speak_step() is one decoder call per token: the model thread interleaves streams with it."""
    script = [T["SAD"], ord("o"), ord("k"), T["TEXT_END"]]
    engine = Engine(package, sampler=ScriptedSampler(script), speak_bias=1e4)
    engine.listen(chunks(1)[0])
    start, tokens = engine.position, []
    while (step := engine.speak_step()) is not None:
        tokens.append(step.token)
        assert engine.position == start + len(tokens)
        if not engine.speaking:
            break
    assert tokens == script and not engine.speaking and not engine.reply_truncated


def test_context_stays_bounded_with_resets(package):
    engine = Engine(package, max_context=300, speak_bias=-1e4)
    reserve = engine.stream.context.reply_reserve
    resets, top = [], 0
    for i, audio in enumerate(chunks(200, seed=1)):
        result = engine.listen(audio)
        if result.context_reset:
            resets.append(i)
        top = max(top, engine.position)
        fed = engine.last_inputs()
        prefix = list(package.prefix_ids)
        # the prompt is fed only at position 0, never a second time into a live context
        assert (fed["token_ids"][:len(prefix)].tolist() == prefix) == (fed["past_length"] == 0)
    assert len(resets) >= 5
    assert min(b - a for a, b in zip(resets, resets[1:])) >= HISTORY_CHUNKS
    assert top <= engine.capacity - reserve


def test_context_reset_reprefills_prompt_and_recent_chunks(package):
    audio = chunks(60, seed=2)
    engine = Engine(package, max_context=300, speak_bias=-1e4)
    for i, chunk in enumerate(audio):
        result = engine.listen(chunk)
        if result.context_reset:
            break
    else:
        pytest.fail("no context reset happened")
    # The rebuilt context equals a fresh engine fed the last 8 chunks heard, then this one.
    fresh = Engine(package, max_context=300, speak_bias=-1e4)
    for chunk_before in audio[i - HISTORY_CHUNKS:i]:
        fresh.listen(chunk_before)
    fresh_result = fresh.listen(chunk)
    assert engine.position == fresh.position
    np.testing.assert_allclose(result.p_speak, fresh_result.p_speak, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(engine.kv_cache[:, :, :engine.position], fresh.kv_cache[:, :, :fresh.position],
                               rtol=1e-4, atol=1e-5)
    assert "re-prefilled the last 8 chunks" in result.context_reset


def test_a_reset_never_refeeds_answered_audio(package):
    script = [ord("a"), T["TEXT_END"]]
    engine = Engine(package, max_context=300, sampler=ScriptedSampler(script), speak_threshold=0.0)
    for audio in chunks(40, seed=4):  # it speaks after every chunk
        result = engine.listen(audio)
        if result.context_reset:
            assert "re-prefilled the last 0 chunks" in result.context_reset
            assert engine.last_inputs()["token_ids"].tolist() == list(package.prefix_ids) + BLOCK
            return
        list(engine.speak())
    pytest.fail("no context reset happened")


def test_max_context_is_checked(package, caplog):
    low = minimum_capacity(len(package.prefix_ids))
    with pytest.raises(ModelPackageError, match=f"max_context {low - 1} is too small.*use at least {low}"):
        Engine(package, max_context=low - 1)
    assert Engine(package, max_context=low).capacity == low
    with pytest.raises(ModelPackageError, match="position limit"):
        Engine(package, max_context=10**9)
    with caplog.at_level(logging.WARNING, logger="listenloop"):
        engine = Engine(package, max_context=package.decoder["max_context"] + 1)
    assert engine.capacity == package.decoder["max_context"] + 1
    assert any("trained for" in r.getMessage() for r in caplog.records)


def test_reset_starts_over_with_the_prefix(package):
    engine = Engine(package)
    engine.listen(chunks(1)[0])
    engine.reset()
    engine.listen(chunks(1)[0])
    assert engine.last_inputs()["past_length"] == 0
    assert engine.last_inputs()["token_ids"].tolist() == list(package.prefix_ids) + BLOCK


def test_bad_audio_shape(package):
    engine = Engine(package)
    with pytest.raises(ValueError):
        engine.listen(np.zeros((9, H), np.float32))
    with pytest.raises(ValueError):
        engine.encode(np.zeros((1, 128, 30), np.float32))


def test_encode_batches_are_independent(package):
    engine = Engine(package)
    mel = np.random.default_rng(0).normal(size=(3, 128, 40)).astype(np.float32)
    batch = engine.encode(mel)
    assert batch.shape == (3, 10, H)
    np.testing.assert_allclose(batch[1], engine.encode(mel[1:2])[0], rtol=1e-5, atol=1e-6)


def test_cuda_profile_falls_back_to_cpu(package, caplog):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the fallback path is for CPU-only builds")
    with caplog.at_level(logging.WARNING, logger="listenloop"):
        engine = Engine(package, profile="cuda")
    assert engine.providers[0] == "CPUExecutionProvider"
    assert engine.profile.kv_cache_device == "cpu"
    assert any("CUDAExecutionProvider" in r.getMessage() and "CPUExecutionProvider" in r.getMessage()
               for r in caplog.records)
    engine.listen(chunks(1)[0])
    assert engine.position > 0


def test_failed_self_test_falls_back_to_cpu(package, caplog, monkeypatch, tmp_path):
    """A provider that loads but fails its first real call is replaced by CPU, with a log."""
    profile = tmp_path / "flaky.json"
    available = [p for p in ort.get_available_providers() if p != "CPUExecutionProvider"]
    if not available:
        pytest.skip("needs a second execution provider in this onnxruntime build")
    profile.write_text('{"name": "flaky", "providers": [["%s", {}], ["CPUExecutionProvider", {}]]}' % available[0])
    from listenloop.model import Model

    real = Model._self_test

    def flaky(self):
        if self.profile.primary != "CPUExecutionProvider":
            raise RuntimeError("device lost")
        real(self)

    monkeypatch.setattr(Model, "_self_test", flaky)
    with caplog.at_level(logging.WARNING, logger="listenloop"):
        engine = Engine(package, profile=str(profile))
    assert engine.profile.primary == "CPUExecutionProvider"
    assert any("self-test" in r.getMessage() and "device lost" in r.getMessage() for r in caplog.records)


def test_fp16_io_package(tmp_path):
    """An fp16 decoder: float16 embeddings and KV cache, same protocol, close to fp32."""
    from test_runtime_fixtures import build_tiny_package

    fp16 = Engine(build_tiny_package(tmp_path / "fp16", io_dtype=np.float16), speak_bias=-1e4)
    fp32 = Engine(build_tiny_package(tmp_path / "fp32"), speak_bias=-1e4)
    assert fp16.kv_cache.dtype == np.float16
    for audio in chunks(4, seed=5):
        a, b = fp16.listen(audio), fp32.listen(audio)
        assert a.position == b.position
        np.testing.assert_allclose(a.decision_logits, b.decision_logits, rtol=0.05, atol=0.1)
    assert fp16.last_inputs()["inputs_embeds"].dtype == np.float16


def test_unknown_profile(package):
    from listenloop.errors import DeviceError

    with pytest.raises(DeviceError):
        Engine(package, profile="quantum")
