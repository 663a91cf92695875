"""The demo model: chunk-wise encoder equals the HF forward, the token layout follows
docs/PROTOCOL.md ("Prompt", "Listening step", "Reply", "Context policy"), the streaming loop
agrees with the training forward, training windows are states the runtime's context really
holds, training lowers the loss, the encoder's auxiliary heads learn, and the checkpoint
round-trips through the exporter's loader."""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # demo/ is a top-level folder, not installed

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from demo import phonemes, pretrain, tasks, vocab  # noqa: E402
from demo.dataset import FeatureSet  # noqa: E402
from demo.heads import EncoderHeads  # noqa: E402
from demo.layout import Protocol, build_sequence  # noqa: E402
from demo.listener import TorchListener  # noqa: E402
from demo.model import DemoModel, DemoSizes, chunkwise_encode  # noqa: E402
from demo.train import Source, batch_loss, make_batch, runtime_state, whole_items  # noqa: E402
from listenloop.context import HISTORY_CHUNKS  # noqa: E402

TINY = DemoSizes(encoder_d_model=32, encoder_layers=2, encoder_heads=4, encoder_ffn=64, hidden=64, layers=2,
                 heads=4, kv_heads=2, intermediate=128)
BACKGROUND = tasks.CONTENT_INDEX["background"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tokenizer, tokens = vocab.demo_tokenizer(tmp_path_factory.mktemp("tok"))
    return tokenizer, tokens, Protocol.build(tokens, vocab.encoder_for(tokenizer))


@pytest.fixture
def model(tok):
    torch.manual_seed(0)
    return DemoModel(TINY, tok[0].get_vocab_size()).eval()


def feature_set(log10s, labels, content=None, items=(), texts=()) -> FeatureSet:
    """A FeatureSet of synthetic streams, one [n, 128, 40] log10 mel array each, stored as the
    cache stores them (float16, each chunk's peak from the float32 values)."""
    log10 = np.concatenate(log10s).astype(np.float32)
    total = len(log10)
    return FeatureSet(log10=log10.astype(np.float16), peaks=log10.max(axis=(1, 2)),
                      offsets=np.concatenate([[0], np.cumsum([len(x) for x in log10s])]).astype(np.int64),
                      labels=np.concatenate(labels).astype(np.int16),
                      content=(np.concatenate(content) if content is not None else np.full(total, BACKGROUND)
                               ).astype(np.int16),
                      items=np.asarray(items, np.int64).reshape(-1, 5), texts=list(texts),
                      seeds=np.arange(len(log10s), dtype=np.int64))


def uniform(features: FeatureSet) -> np.ndarray:
    return np.full(len(features), 1.0 / len(features))


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


def test_history_blocks_are_fed_but_never_trained(tok):
    """After a context reset the runtime re-prefills the chunks heard since the last reply, each
    block followed by KEEP_SILENCE; training shows them the same way, without a loss on them."""
    _, t, protocol = tok
    labels = np.array([-1, -1, -1, -1, 0, -1])
    plain = build_sequence(protocol, labels, max_tokens=10_000)
    seq = build_sequence(protocol, labels, max_tokens=10_000, history=3)
    np.testing.assert_array_equal(seq.ids, plain.ids)  # the same tokens: only the loss differs
    np.testing.assert_array_equal(seq.pad_positions, plain.pad_positions)
    assert seq.n_chunks == 6
    assistants = np.flatnonzero(seq.ids == t["ASSISTANT"])
    assert len(assistants) == 6
    assert all(seq.ids[a + 1] == t["KEEP_SILENCE"] for a in assistants[:3])
    assert (seq.targets[: assistants[3]] == -100).all()  # no target anywhere in the history
    assert seq.targets[assistants[3]] == t["KEEP_SILENCE"]  # the first new chunk's decision is trained
    np.testing.assert_array_equal(seq.targets[assistants[3]:], plain.targets[assistants[3]:])
    assert np.flatnonzero(seq.speak_decision).tolist() == [assistants[4]]
    with pytest.raises(ValueError, match="history chunk 1 has a reply"):  # answered audio is never re-fed
        build_sequence(protocol, np.array([-1, 0, -1, -1]), max_tokens=10_000, history=2)
    p = len(protocol.prefix_ids)
    with pytest.raises(ValueError, match="no room"):  # room for the history alone leaves nothing to train on
        build_sequence(protocol, np.full(6, -1), max_tokens=p + 13 * 3, history=3)


REPLY_AT = (10, 14, 40, 41, 70)


def _labels(n: int = 80) -> np.ndarray:
    labels = np.full(n, -1, np.int16)
    labels[list(REPLY_AT)] = [0, 3, 5, 1, 2]
    return labels


def test_runtime_state_re_prefills_only_history_heard_since_the_last_reply():
    labels = _labels()
    replies = np.asarray(REPLY_AT)
    rng = np.random.default_rng(0)
    full_history = no_history = 0
    for _ in range(600):
        new_chunks = int(rng.integers(8, 30))
        first, restart, end = runtime_state(rng, labels, new_chunks, p_start=0.0, p_reply=0.5)
        assert 1 <= restart < end <= len(labels) and end - restart <= new_chunks
        assert 0 <= first <= restart and restart - first <= HISTORY_CHUNKS
        answered = replies[replies < restart]
        heard_from = int(answered[-1]) + 1 if answered.size else 0
        assert first >= heard_from, (first, restart, end)  # never the reply chunk or anything before it
        # ... but all of what the runtime keeps: the last chunks since the reply, at most HISTORY_CHUNKS
        assert first == max(heard_from, restart - HISTORY_CHUNKS), (first, restart, end)
        assert not (labels[first:restart] >= 0).any()
        full_history += restart - first == HISTORY_CHUNKS
        no_history += first == restart
    assert full_history and no_history  # both kinds of reset were drawn (e.g. right after the replies 40, 41)


def test_runtime_state_at_a_stream_start_and_after_a_reply():
    labels = _labels()
    rng = np.random.default_rng(1)
    assert runtime_state(rng, labels, 20, p_start=1.0, p_reply=1.0) == (0, 0, 20)
    assert runtime_state(rng, labels[:12], 20, p_start=0.0, p_reply=1.0) == (0, 0, 12)  # short streams are whole
    for _ in range(300):
        new_chunks = int(rng.integers(8, 20))
        first, restart, end = runtime_state(rng, labels, new_chunks, p_start=0.0, p_reply=1.0)
        # the window ends 2-7 chunks after a reply (or at the stream's end), which is among its new chunks
        assert any(min(len(labels), r + 2) <= end <= r + 7 and restart <= r for r in REPLY_AT), (first, restart, end)
    silent = np.full(50, -1, np.int16)  # no reply to end after: any window
    first, restart, end = runtime_state(rng, silent, 10, p_start=0.0, p_reply=1.0)
    assert first == max(0, restart - HISTORY_CHUNKS) and end - restart == 10


def test_runtime_state_is_reproducible_from_the_seed():
    labels = _labels()

    def draw(seed):
        rng = np.random.default_rng(seed)
        return [runtime_state(rng, labels, 12, p_start=0.25, p_reply=0.8) for _ in range(50)]

    assert draw(3) == draw(3)  # a resumed run sees the batches of an uninterrupted one
    assert draw(3) != draw(4)


def test_a_few_training_steps_lower_the_loss(model, tok):
    _, t, protocol = tok
    rng = np.random.default_rng(0)
    labels = np.array([-1, -1, 3, -1, -1, 7, -1, -1], np.int16)
    fs = feature_set([rng.standard_normal((8, 128, 40)) - 4.0 for _ in range(2)], [labels, labels[::-1]])
    # p_start=1 and 8 new chunks: both streams whole, from their start
    batch = make_batch(protocol, [Source(fs, uniform(fs))], [(0, 0), (0, 1)], max_tokens=1500,
                       rng=np.random.default_rng(0), min_chunks=8, max_chunks=8, p_start=1.0, p_reply=0.0)
    assert batch["mel"].shape == (16, 128, 40)
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
    log10 = rng.standard_normal((12, 128, 40)) - 4.0
    log10[content == c["lights_off"], :64] += 4.0  # something for the encoder to tell them apart by
    fs = feature_set([log10, log10], [labels, labels], [content, content])
    batch = make_batch(protocol, [Source(fs, uniform(fs))], [(0, 0), (0, 1)], max_tokens=1500,
                       rng=np.random.default_rng(0), min_chunks=12, max_chunks=12, p_start=1.0, p_reply=0.0)
    batch["keep_silence_id"] = t["KEEP_SILENCE"]
    spans = batch["items"].tolist()
    assert len(spans) == 8 and spans[4] == [13, 15, c["lights_on"]]  # the second stream's chunks follow the first's
    assert all((batch["content"][a:b] == k).all() for a, b, k in spans)
    heads = EncoderHeads(TINY.hidden)
    model.train()
    opt = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=3e-3)
    for _ in range(30):
        loss, stats = batch_loss(model, batch, speak_weight=5.0, heads=heads, item_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert stats["item_acc"] == 1.0 and stats["item_loss"] < 0.3


def test_a_batch_holds_the_runtime_states_it_draws(tok):
    """make_batch's windows are runtime_state's draws from the same generator: the mel is
    FeatureSet.window with the peak restarted, or, from a source with encoder outputs, those
    outputs' rows; only new chunks carry targets."""
    _, t, protocol = tok
    rng = np.random.default_rng(2)
    labels = [np.full(40, -1, np.int16), np.full(30, -1, np.int16)]
    labels[0][[12, 25]] = [3, 7]
    labels[1][9] = 0
    log10s = [rng.standard_normal((n, 128, 40)) - 4.0 for n in (40, 30)]
    log10s[0][:4] += 8.0  # a loud start floors what follows, unless the peak restarts
    fs = feature_set(log10s, labels)
    encoded = rng.standard_normal((70, 10, TINY.hidden)).astype(np.float16)
    picks = [(0, 0), (0, 1), (0, 0)]
    args = dict(max_tokens=10_000, min_chunks=6, max_chunks=12, p_start=0.0, p_reply=0.5)
    seed = 5
    with_audio = make_batch(protocol, [Source(fs, uniform(fs), encoded)], picks, rng=np.random.default_rng(seed),
                            **args)
    with_mel = make_batch(protocol, [Source(fs, uniform(fs))], picks, rng=np.random.default_rng(seed), **args)
    draws = np.random.default_rng(seed)  # make_batch draws the number of new chunks, then each window
    new_chunks = int(draws.integers(args["min_chunks"], args["max_chunks"] + 1))
    states = [runtime_state(draws, fs.stream_labels(i), new_chunks, args["p_start"], args["p_reply"]) for _, i in picks]
    assert any(restart > first for first, restart, _ in states)  # some window re-prefills history

    assert "mel" not in with_audio and "audio" not in with_mel
    audio = np.concatenate([encoded[fs.chunks(i)][first:end] for (_, i), (first, _, end) in zip(picks, states)])
    np.testing.assert_array_equal(with_audio["audio"].numpy(), audio.astype(np.float32))
    mel = np.concatenate([fs.window(i, first, end, restart) for (_, i), (first, restart, end) in zip(picks, states)])
    np.testing.assert_array_equal(with_mel["mel"].numpy(), mel)
    from_start = np.concatenate([fs.stream(i)[0][first:end] for (_, i), (first, _, end) in zip(picks, states)])
    assert not np.array_equal(mel, from_start)  # the restart is in the features
    for key in ("ids", "targets", "speak", "mask", "pad_rows", "content", "items"):
        assert torch.equal(with_audio[key], with_mel[key]), key
    assert with_mel["pad_rows"].numel() == 10 * len(mel) == 10 * len(with_mel["content"])
    assert (with_mel["ids"].flatten()[with_mel["pad_rows"]] == t["PAD"]).all()
    decisions = (with_mel["ids"] == t["ASSISTANT"]) & (with_mel["targets"] >= 0)
    assert int(decisions.sum()) == sum(end - restart for _, restart, end in states)  # none in the history

    augmented = make_batch(protocol, [Source(fs, uniform(fs))], picks, rng=np.random.default_rng(seed),
                           augmenting=True, **args)
    assert augmented["pad_rows"].numel() == 10 * len(augmented["mel"]) and torch.isfinite(augmented["mel"]).all()


def test_ctc_head_learns_phoneme_sequences_that_differ_in_one_unit():
    torch.manual_seed(0)
    heads = EncoderHeads(16)
    audio = torch.randn(5, 10, 16, requires_grad=True)  # stands in for the encoder's outputs
    spans = torch.tensor([[0, 2], [2, 5]])
    targets = [phonemes.units("t'3:n 0nD@ l'aIts"), phonemes.units("t'3:n '0f D@ l'aIts")]
    assert targets[0] != targets[1]
    opt = torch.optim.Adam([audio, *heads.parameters()], lr=0.05)
    first = heads.ctc_loss(audio, spans, targets).item()
    assert math.isfinite(first) and first > 0.0
    for _ in range(40):
        loss = heads.ctc_loss(audio, spans, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item()) and loss.item() < 0.2 * first
    with torch.no_grad():  # greedy CTC decoding of each span gives its own sequence back
        best = heads.phoneme(audio).argmax(-1)
    for (a, b), target in zip(spans.tolist(), targets):
        path = best[a:b].flatten().tolist()
        decoded = [u for k, u in enumerate(path) if u != phonemes.BLANK and (k == 0 or u != path[k - 1])]
        assert decoded == target


def test_pretrain_batch_spans_point_at_each_items_chunks(model, monkeypatch, tmp_path):
    c = tasks.CONTENT_INDEX
    bg, on, off, bell, speech = c["background"], c["lights_on"], c["lights_off"], c["doorbell"], c["distractor"]
    texts = ["turn on the lights", "turn off the lights", "the bus stopped at the station"]
    fake_units = {text: [k + 1] * (k + 2) for k, text in enumerate(texts)}
    monkeypatch.setattr(phonemes, "targets_for", lambda texts, cache: [fake_units[x] for x in texts])  # no espeak
    rng = np.random.default_rng(3)
    content = [np.array([bg, on, on, on, bg, bg, bell, bell, bg, bg]),
               np.array([off, off, bg, bg, bg, speech, speech, speech])]
    items = [(0, 1, 4, on, 0), (0, 6, 8, bell, -1), (1, 0, 2, off, 1), (1, 5, 8, speech, 2)]  # two touch a stream edge
    fs = feature_set([rng.standard_normal((len(k), 128, 40)) - 4.0 for k in content],
                     [np.full(len(k), -1) for k in content], content, items, texts)
    source = pretrain.ItemSource(fs, tmp_path / "phonemes.json")
    picked = [2, 0, 3, 1]
    batch = pretrain.make_batch([(source, picked)], [source], np.random.default_rng(0), augmenting=False)
    # one chunk of context on either side where the stream has one: windows of 3, 5, 4 and 4 chunks
    assert batch["spans"].tolist() == [[0, 2], [4, 7], [9, 12], [13, 15]]
    assert len(batch["mel"]) == len(batch["content"]) == 16 + pretrain.BACKGROUND_CHUNKS
    for (a, b), j in zip(batch["spans"].tolist(), picked):
        stream, first, end, cls, text = items[j]
        assert (batch["content"][a:b] == cls).all()
        np.testing.assert_array_equal(batch["mel"][a:b].numpy(), fs.stream(stream)[0][first:end])
    assert batch["classes"].tolist() == [items[j][3] for j in picked]
    assert batch["units"] == [fake_units[texts[1]], fake_units[texts[0]], fake_units[texts[2]], []]

    augmented = [pretrain.make_batch([(source, picked)], [source], np.random.default_rng(1), augmenting=True)
                 for _ in range(2)]
    assert torch.equal(augmented[0]["mel"], augmented[1]["mel"])  # reproducible from the seed
    assert augmented[0]["mel"].shape == batch["mel"].shape and not torch.equal(augmented[0]["mel"], batch["mel"])
    assert torch.equal(augmented[0]["spans"], batch["spans"]) and torch.equal(augmented[0]["classes"], batch["classes"])

    loss, stats, right = pretrain.losses(model, EncoderHeads(TINY.hidden), batch, ctc_weight=0.3, content_weight=0.3)
    assert math.isfinite(loss.item()) and stats["ctc"] > 0.0 and len(right) == len(picked)


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


def test_averaged_release_loads_with_the_mean_of_both_weights(tok, tmp_path):
    from listenloop.export.checkpoint import load_checkpoint

    from demo.average import average_checkpoints
    from demo.release import save_release

    tokenizer, t, _ = tok
    releases = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        releases.append(save_release(DemoModel(TINY, tokenizer.get_vocab_size()), tokenizer, t, tmp_path / f"r{seed}"))
    average_checkpoints(releases, tmp_path / "mean")
    a, b, mean = (load_checkpoint(p) for p in (*releases, tmp_path / "mean"))
    for name in ("lm_state", "encoder_state"):
        for key, value in getattr(mean, name).items():
            torch.testing.assert_close(value, (getattr(a, name)[key] + getattr(b, name)[key]) / 2)
    assert mean.tokens == a.tokens

    wider = save_release(DemoModel(dataclasses.replace(TINY, intermediate=256), tokenizer.get_vocab_size()),
                         tokenizer, t, tmp_path / "wider")
    with pytest.raises(SystemExit, match="model.safetensors: .* is \\(256, 64\\) in checkpoint 2"):
        average_checkpoints([releases[0], wider], tmp_path / "refused")
