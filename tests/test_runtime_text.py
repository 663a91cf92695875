"""Sampling and streaming reply text (docs/PROTOCOL.md, "Sampling" and "Reply")."""
from __future__ import annotations

import numpy as np
import pytest
from test_runtime_fixtures import EMOTIONS, TOKENS, runtime_package  # noqa: F401

from listenloop.sampling import Sampler, SamplingConfig, top_p_mask
from listenloop.textstream import ReplyText, TokenBytes, Utf8Stream


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingConfig()).sample(logits) == 1
    assert Sampler(SamplingConfig(temperature=1.0, top_k=1)).sample(logits) == 1


def test_seeded_sampling_is_reproducible():
    logits = np.random.default_rng(0).normal(size=50)
    a = Sampler(SamplingConfig(temperature=1.0, seed=42))
    b = Sampler(SamplingConfig(temperature=1.0, seed=42))
    seq_a = [a.sample(logits) for _ in range(30)]
    seq_b = [b.sample(logits) for _ in range(30)]
    assert seq_a == seq_b
    c = Sampler(SamplingConfig(temperature=1.0, seed=43))
    assert [c.sample(logits) for _ in range(30)] != seq_a
    assert len(set(seq_a)) > 3  # really sampling, not argmax


def test_top_p_rule():
    """Sort ascending, drop tokens with cumulative probability <= 1 - top_p, keep the best."""
    probs = np.array([0.05, 0.5, 0.1, 0.35])
    # ascending: 0.05 (cum .05), 0.1 (.15), 0.35 (.5), 0.5 (1.0)
    assert top_p_mask(probs, 0.9).tolist() == [False, True, True, True]  # drops cum <= 0.1
    assert top_p_mask(probs, 0.85).tolist() == [False, True, False, True]  # drops cum <= 0.15 (boundary)
    assert top_p_mask(probs, 0.5).tolist() == [False, True, False, False]  # drops cum <= 0.5
    assert top_p_mask(probs, 0.01).tolist() == [False, True, False, False]  # best token always kept


def test_top_p_and_top_k_restrict_the_draws():
    logits = np.log(np.array([0.05, 0.5, 0.1, 0.35]))
    s = Sampler(SamplingConfig(temperature=1.0, top_p=0.8, seed=0))
    assert {s.sample(logits) for _ in range(200)} == {1, 3}
    s = Sampler(SamplingConfig(temperature=1.0, top_k=2, seed=0))
    assert {s.sample(logits) for _ in range(200)} == {1, 3}
    np.testing.assert_allclose(s.distribution(logits)[[1, 3]], [0.5 / 0.85, 0.35 / 0.85])


def test_sampled_decision_follows_p_speak():
    s = Sampler(SamplingConfig(temperature=1.0, seed=1))
    speaks = sum(s.decide(0.0, np.log(3.0)) for _ in range(4000))  # p(speak) = 0.75
    assert 2800 < speaks < 3200
    assert Sampler().decide(1.0, 1.0) is False  # greedy tie stays silent


def test_bad_sampling_config():
    for bad in ({"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_utf8_stream_holds_back_incomplete_characters():
    stream = Utf8Stream()
    data = "你好".encode()
    out = [stream.feed(data[i:i + 1]) for i in range(len(data))]
    assert out == ["", "", "你", "", "", "好"]
    assert "\ufffd" not in "".join(out)


@pytest.fixture(scope="module")
def token_bytes(runtime_package):  # noqa: F811
    return TokenBytes(runtime_package / "tokenizer.json")


def _reply(token_bytes):
    return ReplyText(token_bytes, dict(TOKENS), dict(EMOTIONS))


def test_multibyte_character_split_across_tokens(token_bytes):
    reply = _reply(token_bytes)
    pieces = []
    for token in [TOKENS["HAPPY"]] + list("a你b".encode()) + [TOKENS["TEXT_END"]]:
        pieces.append(reply.add(token))
    texts = [p.text for p in pieces]
    assert texts == ["", "a", "", "", "你", "b", ""]
    # the piece completing the character carries all three byte tokens
    assert pieces[4].token_ids == list("你".encode())
    assert reply.emotion == "HAPPY"
    assert reply.text == "a你b" and reply.finish().text == ""


def test_control_ids_inside_a_reply_are_filtered_and_counted(token_bytes):
    reply = _reply(token_bytes)
    tokens = [ord("o"), TOKENS["ASSISTANT"], TOKENS["SAD"], TOKENS["PAD"], ord("k")]
    texts = [reply.add(t).text for t in tokens]
    assert texts == ["o", "", "", "", "k"]
    assert reply.text == "ok" and reply.filtered == 3
    assert reply.emotion is None  # an emotion id counts only as the first token


def test_truncated_reply_flushes_a_dangling_byte_once(token_bytes):
    reply = _reply(token_bytes)
    reply.add(ord("x"))
    assert reply.add("你".encode()[0]).text == ""
    assert reply.finish().text == "\ufffd"


def test_token_bytes_matches_tokenizer_decode(token_bytes):
    ids = token_bytes.encode("héllo wörld")
    assert b"".join(token_bytes(i) for i in ids).decode() == "héllo wörld"
