"""The demo model: chunk-wise encoder equals the HF forward, the token layout follows
docs/PROTOCOL.md ("Prompt", "Listening step", "Reply"), the streaming loop agrees with the training forward, training lowers the loss, and the
checkpoint round-trips through the exporter's loader."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # demo/ is a top-level folder, not installed

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from demo import tasks, vocab  # noqa: E402
from demo.dataset import FeatureSet  # noqa: E402
from demo.layout import Protocol, build_sequence  # noqa: E402
from demo.listener import TorchListener  # noqa: E402
from demo.model import DemoModel, DemoSizes, chunkwise_encode  # noqa: E402
from demo.train import ChunkClassifier, batch_loss, make_batch, whole_items  # noqa: E402

TINY = DemoSizes(encoder_d_model=32, encoder_layers=2, encoder_heads=4, encoder_ffn=64, hidden=64, layers=2,
                 heads=4, kv_heads=2, intermediate=128)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tokenizer, tokens = vocab.demo_tokenizer(tmp_path_factory.mktemp("tok"))
    return tokenizer, tokens, Protocol.build(tokens, vocab.encoder_for(tokenizer))


@pytest.fixture
def model(tok):
    torch.manual_seed(0)
    return DemoModel(TINY, tok[0].get_vocab_size()).eval()


def test_chunkwise_encoder_equals_hf_forward_with_feature_lens_of_40(model):
    mel = torch.randn(5, 128, 40)
    with torch.no_grad():
        ours = chunkwise_encode(model.encoder, mel)
        ref = model.encoder(input_features=mel.permute(1, 0, 2).reshape(128, -1),
                            feature_lens=torch.full((5,), 40)).last_hidden_state
    assert ours.shape == (5, 10, TINY.hidden)
    torch.testing.assert_close(ours.reshape(-1, TINY.hidden), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # chunks are independent: encoding one alone gives the same vectors
        torch.testing.assert_close(chunkwise_encode(model.encoder, mel[2:3])[0], ours[2], rtol=1e-5, atol=1e-5)


def test_layout_of_silent_and_reply_chunks(tok):
    tokenizer, t, protocol = tok
    reply = tasks.REPLIES[0]
    seq = build_sequence(protocol, np.array([-1, 0, -1]), max_tokens=10_000)
    p = len(protocol.prefix_ids)
    ids = seq.ids.tolist()
    assert ids[:4] == [t["ONLINE"], t["ENGLISH"], t["SYSTEM"], t["TEXT_BEGIN"]] and ids[p - 1] == t["TEXT_END"]
    block = [t["AUDIO_BEGIN"]] + [t["PAD"]] * 10 + [t["ASSISTANT"]]
    text = vocab.encoder_for(tokenizer)(reply.text)
    answer = [t["TEXT_BEGIN"], t[reply.emotion], *text, t["TEXT_END"]]
    assert ids[p:] == block + [t["KEEP_SILENCE"]] + block + answer + block + [t["KEEP_SILENCE"]]
    assert tokenizer.decode(text) == reply.text
    # targets: the decision at every ASSISTANT, then emotion, text and TEXT_END of the reply
    assistants = [i for i, x in enumerate(ids) if x == t["ASSISTANT"]]
    loss_positions = np.flatnonzero(seq.targets >= 0).tolist()
    second = assistants[1]
    assert loss_positions == [assistants[0]] + list(range(second, second + len(answer))) + [assistants[2]]
    assert seq.targets[second] == t["TEXT_BEGIN"] and seq.speak_decision[second]
    assert seq.speak_decision.sum() == 1
    assert all(ids[r] == t["PAD"] for r in seq.pad_positions.ravel())
    # a sequence is cut at a chunk boundary when it would exceed max_tokens
    short = build_sequence(protocol, np.array([-1] * 50), max_tokens=p + 13 * 5)
    assert short.n_chunks == 5 and len(short.ids) <= p + 13 * 5


def test_streaming_loop_matches_the_training_forward(model, tok):
    """Decisions and reply tokens from the KV-cache loop equal a single teacher-forced forward
    over the sequence the loop produced (same layout, same positions, same audio rows)."""
    _, t, protocol = tok
    mel = np.random.default_rng(0).standard_normal((8, 128, 40)).astype(np.float32)
    # An untrained model decides the same way on every chunk; a speak bias at the median
    # decision logit makes it speak on some chunks and not others, so both paths are exercised.
    listener = TorchListener(model, protocol, max_reply_tokens=6, speak_bias=-1e9)
    p = np.array([listener.listen(m).p_speak for m in mel])
    listener = TorchListener(model, protocol, max_reply_tokens=6, speak_bias=-float(np.median(np.log(p / (1 - p)))))
    ids = list(protocol.prefix_ids)
    pads, decisions = [], []
    for k in range(len(mel)):
        d = listener.listen(mel[k])
        if k:
            ids += fed_back
        pads.append(list(range(len(ids) + 1, len(ids) + 11)))
        ids += [t["AUDIO_BEGIN"]] + [t["PAD"]] * 10 + [t["ASSISTANT"]]
        decisions.append((len(ids) - 1, d))
        if d.spoke:
            ids += [t["TEXT_BEGIN"]] + d.reply_ids[:-1]
            # the last reply token (TEXT_END, or a text token at the cap followed by a closing
            # TEXT_END) is fed back at the head of the next block
            fed_back = [d.reply_ids[-1]] + ([] if d.reply_ids[-1] == t["TEXT_END"] else [t["TEXT_END"]])
        else:
            fed_back = [t["KEEP_SILENCE"]]
    with torch.no_grad():
        audio = model.encode(torch.from_numpy(mel))
        hidden = model.hidden_states(model.embed(torch.tensor([ids]), torch.tensor(pads), audio))
        logits = model.llm.lm_head(hidden[0])
    for pos, d in decisions:
        pair = torch.stack([logits[pos, t["KEEP_SILENCE"]], logits[pos, t["TEXT_BEGIN"]]])
        assert abs(float(torch.softmax(pair, 0)[1]) - d.p_speak) < 1e-4
        if d.spoke:
            generated = logits[pos + 1 : pos + 1 + len(d.reply_ids)].argmax(-1).tolist()
            assert generated == d.reply_ids
    assert any(d.spoke for _, d in decisions) and not all(d.spoke for _, d in decisions)


def test_a_few_training_steps_lower_the_loss(model, tok):
    _, t, protocol = tok
    rng = np.random.default_rng(0)
    labels = np.array([-1, -1, 3, -1, -1, 7, -1, -1], np.int16)
    feats = rng.standard_normal((16, 128, 40)).astype(np.float16)
    fs = FeatureSet(features=feats, offsets=np.array([0, 8, 16]), labels=np.concatenate([labels, labels[::-1]]),
                    seeds=np.array([0, 1]))
    batch = make_batch(protocol, fs, [0, 1], max_tokens=1500)
    batch["keep_silence_id"] = t["KEEP_SILENCE"]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first, _ = batch_loss(model, batch, speak_weight=5.0)
    for _ in range(25):
        loss, stats = batch_loss(model, batch, speak_weight=5.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert stats["loss"] < 0.5 * float(first.detach())


def test_whole_items_are_the_foreground_runs_the_window_does_not_cut():
    c = tasks.CONTENT_INDEX
    bg, on, off, bell = c["background"], c["lights_on"], c["lights_off"], c["doorbell"]
    content = np.array([on, on, bg, off, off, off, bell, bg, bg, on])
    assert whole_items(content) == [(3, 6, off), (6, 7, bell)]  # the first and last runs touch the edges
    assert whole_items(np.array([bg, bg])) == []


def test_item_head_learns_which_item_a_span_of_chunks_holds(model, tok):
    _, t, protocol = tok
    c = tasks.CONTENT_INDEX
    rng = np.random.default_rng(1)
    content = np.array([c["background"], c["lights_on"], c["lights_on"], c["background"], c["lights_off"],
                        c["background"]] * 2, np.int16)
    labels = np.full(12, -1, np.int16)
    feats = rng.standard_normal((12, 128, 40)).astype(np.float16)
    feats[content == c["lights_off"], :64] += 2.0  # something for the encoder to tell them apart by
    fs = FeatureSet(features=np.concatenate([feats, feats]), offsets=np.array([0, 12, 24]),
                    labels=np.concatenate([labels, labels]), seeds=np.array([0, 1]),
                    content=np.concatenate([content, content]))
    batch = make_batch(protocol, fs, [0, 1], max_tokens=1500)
    batch["keep_silence_id"] = t["KEEP_SILENCE"]
    spans = batch["items"].tolist()
    assert len(spans) == 8 and spans[4] == [13, 15, c["lights_on"]]  # the second stream's chunks follow the first's
    assert all((batch["content"][a:b] == k).all() for a, b, k in spans)
    head = ChunkClassifier(TINY.hidden)
    model.train()
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(30):
        loss, stats = batch_loss(model, batch, speak_weight=5.0, classifier=head, item_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert stats["item_acc"] == 1.0 and stats["item_loss"] < 0.3


def test_release_checkpoint_round_trips_through_the_exporter(model, tok, tmp_path):
    from listenloop.export.checkpoint import load_checkpoint
    from transformers import Qwen2ForCausalLM

    from demo.release import save_release

    tokenizer, t, protocol = tok
    ckpt = load_checkpoint(save_release(model, tokenizer, t, tmp_path / "ckpt"))
    assert ckpt.tokens["KEEP_SILENCE"] == t["KEEP_SILENCE"] and ckpt.system_prompt == tasks.SYSTEM_PROMPT
    llm = Qwen2ForCausalLM(ckpt.hf_qwen2_config)
    llm.load_state_dict(ckpt.lm_state)
    ids = torch.tensor([list(protocol.prefix_ids)])
    with torch.no_grad():
        torch.testing.assert_close(llm(input_ids=ids).logits, model.llm(input_ids=ids).logits)
    for k, v in model.encoder.state_dict().items():
        torch.testing.assert_close(ckpt.encoder_state[k], v)
