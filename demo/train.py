"""Train the demo model on cached stream features (AdamW, warm-up + cosine, seeded, resumable).

  python -m demo.train --run demo/.cache/run --train-streams 2000 --steps 3000 --time-budget-min 9
  (run again with the same arguments to resume from the last training state)

Every step draws its batch from a generator seeded by (seed, step), so a resumed run sees the
same batches as an uninterrupted one. The silence class dominates (≈ 97 % of decisions), so the
loss weighs TEXT_BEGIN decisions by --speak-weight.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import dataset, tasks, vocab
from .layout import Protocol, build_sequence
from .model import DemoModel, DemoSizes


def crop(rng: np.random.Generator, labels: np.ndarray, length: int, p_reply: float) -> slice:
    """A window of `length` chunks (or the whole stream if shorter); with probability p_reply
    it ends 1-6 chunks after a random reply chunk, so replies are seen more often per second of
    compute than in whole streams (mostly silence)."""
    n = len(labels)
    length = min(n, length)
    replies = np.flatnonzero(labels >= 0)
    if replies.size and rng.random() < p_reply:
        end = min(n, int(rng.choice(replies)) + int(rng.integers(2, 8)))
    else:
        end = int(rng.integers(length, n + 1))
    start = max(0, end - length)
    return slice(start, start + length)


def make_batch(protocol: Protocol, features: dataset.FeatureSet, indices, max_tokens: int,
               rng: np.random.Generator | None = None, min_chunks: int = 0, p_reply: float = 0.0,
               max_chunks: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch: ids, targets, speak flags, attention mask, mel chunks and the flat
    rows of B·L where each chunk's 10 audio vectors go. With `rng` and min_chunks > 0 every
    stream is cropped (see `crop`); the features keep the running-max floor of the whole
    stream, like a session that started earlier. All crops of a batch have one random length
    from min_chunks to max_chunks (0: the longest stream), so padding is only the difference in
    reply text between sequences."""
    seqs, mels, contents, items = [], [], [], []
    first_chunk = 0  # of this stream, in the batch's concatenated chunks
    if rng is not None and min_chunks > 0:
        longest = max_chunks if max_chunks > 0 else max(len(features.stream(int(i))[1]) for i in indices)
        window_chunks = int(rng.integers(min(min_chunks, longest), longest + 1))
    for i in indices:
        feats, labels = features.stream(int(i))
        content = features.content_of(int(i)) if features.content is not None else np.full(len(labels), -100)
        if rng is not None and min_chunks > 0:
            window = crop(rng, labels, window_chunks, p_reply)
            feats, labels, content = feats[window], labels[window], content[window]
        seq = build_sequence(protocol, labels, max_tokens)
        seqs.append(seq)
        mels.append(np.asarray(feats[: seq.n_chunks], np.float32))
        contents.append(np.asarray(content[: seq.n_chunks], np.int64))
        items += [(first_chunk + a, first_chunk + b, c) for a, b, c in whole_items(contents[-1])]
        first_chunk += seq.n_chunks
    length = max(len(s.ids) for s in seqs)
    batch = len(seqs)
    ids = torch.full((batch, length), protocol.tokens["TEXT_END"], dtype=torch.long)
    targets = torch.full((batch, length), -100, dtype=torch.long)
    speak = torch.zeros((batch, length), dtype=torch.bool)
    mask = torch.zeros((batch, length), dtype=torch.long)
    rows = []
    for b, s in enumerate(seqs):
        n = len(s.ids)
        ids[b, :n] = torch.from_numpy(s.ids)
        targets[b, :n] = torch.from_numpy(s.targets)
        speak[b, :n] = torch.from_numpy(s.speak_decision)
        mask[b, :n] = 1
        rows.append(torch.from_numpy(s.pad_positions) + b * length)
    return {"ids": ids, "targets": targets, "speak": speak, "mask": mask,
            "mel": torch.from_numpy(np.concatenate(mels)), "pad_rows": torch.cat(rows),
            "content": torch.from_numpy(np.concatenate(contents)),
            "items": torch.tensor(items, dtype=torch.long).reshape(-1, 3)}


def whole_items(content: np.ndarray) -> list[tuple[int, int, int]]:
    """(first chunk, end chunk, class) of every run of one foreground class that lies wholly
    inside the window: a run touching either edge may have lost the words that tell it apart."""
    background = tasks.CONTENT_INDEX["background"]
    runs, start = [], 0
    for k in range(1, len(content) + 1):
        if k == len(content) or content[k] != content[start]:
            if content[start] not in (background, -100) and start > 0 and k < len(content):
                runs.append((start, k, int(content[start])))
            start = k
    return runs


class ChunkClassifier(nn.Module):
    """Auxiliary heads, used in training only, not part of the released model. They give the
    encoder dense, direct labels, where the protocol's reply targets are sparse and reach it
    only through the decoder:
    - per chunk: what does it contain (tasks.CONTENT_CLASSES), from the mean of its 10 vectors;
    - per whole item: which event, command or distractor it is, from the mean and max of all
      its chunks' vectors. A command spans several chunks and the word that tells it apart
      ("on" or "off") sits in one of them, so the per-chunk label alone is ambiguous."""

    def __init__(self, hidden: int):
        super().__init__()
        self.head = nn.Linear(hidden, len(tasks.CONTENT_CLASSES))
        self.item_head = nn.Linear(2 * hidden, len(tasks.CONTENT_CLASSES))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.head(audio.mean(dim=1))

    def items(self, audio: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
        pooled = [torch.cat([audio[a:b].mean(dim=(0, 1)), audio[a:b].amax(dim=(0, 1))]) for a, b, _ in spans.tolist()]
        return self.item_head(torch.stack(pooled))


def batch_loss(model: DemoModel, batch: dict[str, torch.Tensor], speak_weight: float,
               classifier: ChunkClassifier | None = None, content_weight: float = 0.0,
               item_weight: float = 0.0, text_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    audio = model.encode(batch["mel"])
    mask = None if bool(batch["mask"].all()) else batch["mask"]  # no padding: the plain causal path is faster
    hidden = model.hidden_states(model.embed(batch["ids"], batch["pad_rows"], audio), mask)
    at = batch["targets"] >= 0
    logits = model.llm.lm_head(hidden[at])  # only rows with a target: the vocab is small, rows are many
    targets = batch["targets"][at]
    speak = batch["speak"][at]
    keep = targets == batch["keep_silence_id"]
    text = ~speak & ~keep  # a reply's emotion, text and TEXT_END
    weights = torch.ones_like(targets, dtype=logits.dtype)
    weights[speak] = speak_weight
    weights[text] = text_weight
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    loss = (losses * weights).sum() / weights.sum()
    content_loss = item_loss = None
    item_acc = float("nan")
    if classifier is not None and content_weight > 0.0:
        content_loss = F.cross_entropy(classifier(audio).float(), batch["content"], ignore_index=-100)
        loss = loss + content_weight * content_loss
    if classifier is not None and item_weight > 0.0 and len(batch["items"]):
        item_logits = classifier.items(audio, batch["items"]).float()
        item_loss = F.cross_entropy(item_logits, batch["items"][:, 2])
        loss = loss + item_weight * item_loss
        item_acc = float((item_logits.argmax(-1) == batch["items"][:, 2]).float().mean())
    with torch.no_grad():
        pred = logits.argmax(-1)
        stats = {
            "loss": float(loss),
            "speak_recall": float((pred[speak] == targets[speak]).float().mean()) if speak.any() else float("nan"),
            "false_speak": float((pred[keep] != targets[keep]).float().mean()) if keep.any() else float("nan"),
            "text_acc": float((pred[text] == targets[text]).float().mean()) if text.any() else float("nan"),
            "content_loss": float(content_loss) if content_loss is not None else float("nan"),
            "item_loss": float(item_loss) if item_loss is not None else float("nan"),
            "item_acc": item_acc,
        }
    return loss, stats


def sampling_weights(features: dataset.FeatureSet, command_boost: float) -> np.ndarray:
    """Probability of drawing each training stream: streams with a spoken command weigh
    `command_boost` times more (commands are the hardest items to tell apart)."""
    first_command = len(tasks.EVENT_REPLIES)  # REPLIES lists the event replies first
    has_command = np.array([np.any(features.stream(i)[1] >= first_command) for i in range(len(features))])
    weights = np.where(has_command, command_boost, 1.0)
    return weights / weights.sum()


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path(__file__).resolve().parent / ".cache" / "run")
    p.add_argument("--train-streams", type=int, default=2000)
    p.add_argument("--eval-streams", type=int, default=150)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--speak-weight", type=float, default=5.0)
    p.add_argument("--content-weight", type=float, default=0.3, help="weight of the auxiliary per-chunk loss; 0: off")
    p.add_argument("--item-weight", type=float, default=0.5, help="weight of the auxiliary whole-item loss; 0: off")
    p.add_argument("--text-weight", type=float, default=2.0, help="loss weight of a reply's emotion and text tokens")
    p.add_argument("--max-tokens", type=int, default=1500)
    p.add_argument("--crop-min-chunks", type=int, default=8, help="0: whole streams")
    p.add_argument("--crop-max-chunks", type=int, default=48,
                   help="longest crop; keep the exported package's max context within what training saw")
    p.add_argument("--crop-reply-p", type=float, default=0.8)
    p.add_argument("--command-boost", type=float, default=1.0, help="draw streams with a spoken command this much more often")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--time-budget-min", type=float, default=0.0, help="stop (and save) after this long; 0: no limit")
    p.add_argument("--workers", type=int, default=2, help="processes rendering the feature cache")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    args.run.mkdir(parents=True, exist_ok=True)

    tokenizer, tokens = vocab.demo_tokenizer(args.run / "tokenizer")
    protocol = Protocol.build(tokens, vocab.encoder_for(tokenizer))
    train_set = dataset.load(dataset.build("train", 0, args.train_streams, args.workers))
    eval_set = dataset.load(dataset.build("eval", 0, args.eval_streams, args.workers))

    model = DemoModel(DemoSizes(), tokenizer.get_vocab_size()).to(device)
    classifier = ChunkClassifier(model.sizes.hidden).to(device)
    optimizer = torch.optim.AdamW([*model.parameters(), *classifier.parameters()], lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay)
    state_path = args.run / "train_state.pt"
    step = 0
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        classifier.load_state_dict(state["classifier"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"[train] resumed at step {step}", flush=True)
    stream_weights = sampling_weights(train_set, args.command_boost)
    counts = model.parameter_counts()
    print(f"[train] parameters: encoder {counts['encoder']:,}, llm {counts['llm']:,}; "
          f"{len(train_set)} train streams, {len(eval_set)} eval streams", flush=True)
    eval_batch = make_batch(protocol, eval_set, range(min(16, len(eval_set))), args.max_tokens,
                            np.random.default_rng(args.seed), args.crop_min_chunks, args.crop_reply_p, args.crop_max_chunks)

    def save() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "classifier": classifier.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "sizes": asdict(model.sizes), "args": {k: str(v) for k, v in vars(args).items()}}, tmp)
        tmp.replace(state_path)

    def to_device(batch):
        out = {k: v.to(device) for k, v in batch.items()}
        out["keep_silence_id"] = tokens["KEEP_SILENCE"]
        return out

    log = (args.run / "log.jsonl").open("a")
    started = time.perf_counter()
    window: list[dict] = []
    while step < args.steps:
        if args.time_budget_min and time.perf_counter() - started > 60 * args.time_budget_min:
            print(f"[train] time budget reached at step {step}", flush=True)
            break
        rng = np.random.default_rng([args.seed, step])
        indices = rng.choice(len(train_set), args.batch, p=stream_weights)
        batch = to_device(make_batch(protocol, train_set, indices, args.max_tokens, rng, args.crop_min_chunks,
                                     args.crop_reply_p, args.crop_max_chunks))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        model.train()
        loss, stats = batch_loss(model, batch, args.speak_weight, classifier, args.content_weight, args.item_weight,
                                 args.text_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        window.append(stats)
        if step % args.log_every == 0:
            elapsed = time.perf_counter() - started
            mean = {k: float(np.nanmean([w[k] for w in window])) for k in window[0]}
            record = {"step": step, "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(elapsed, 1), **mean}
            print("[train] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                  flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
            window = []
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                _, stats = batch_loss(model, to_device(eval_batch), args.speak_weight, classifier, args.content_weight,
                                      args.item_weight, args.text_weight)
            print("[eval] step=%d " % step + " ".join(f"{k}={v:.4g}" for k, v in stats.items()), flush=True)
            log.write(json.dumps({"step": step, "eval": stats}) + "\n")
            log.flush()
        if step % args.save_every == 0:
            save()
    save()
    log.close()
    if step >= args.steps:
        torch.save({"model": model.state_dict(), "sizes": asdict(model.sizes)}, args.run / "model.pt")
        print(f"[train] finished: {args.run / 'model.pt'}", flush=True)


if __name__ == "__main__":
    main()
