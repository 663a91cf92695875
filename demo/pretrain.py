"""Training stage 1: the audio encoder alone, on item-centred windows.

  python -m demo.pretrain --run demo/.cache/run --steps 3000 --time-budget-min 45
  (run again with the same arguments to resume from the last training state)

A step encodes only the chunks around foreground items, never long stretches of background,
so each item is seen many more times per hour than in whole streams. A batch holds:
- every item of `--pair-streams` pair streams (demo/streams.py, make_pair_stream: confusable
  commands and a distractor sharing their words, in one voice), so the loss contrasts them;
- `--items` items of the training streams, drawn class by class (events, commands and
  distractors equally often), each with one chunk of context on either side;
- `--background` windows of a few chunks anywhere in the training streams.
Losses (demo/heads.py): the item's class, each chunk's content, and the phonemes of spoken
items by CTC. From `--augment-from` (a share of the steps: once the encoder fits its training
data) every window is played up to ±6 dB louder or quieter and gets SpecAugment masks.
Every batch comes from a generator seeded by (seed, step), so a resumed run sees the same
batches as an uninterrupted one. Held-out item accuracy is logged every `--eval-every` steps.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import augment, dataset, phonemes, tasks, vocab
from .heads import EncoderHeads
from .model import DemoModel, DemoSizes
from .train import STAGE_STATE, add_run_arguments, learning_rate

BACKGROUND_CHUNKS = 3
EVENT_CHUNKS = 6  # at most this many chunks of a sound event per window


class ItemSource:
    """Item windows of one feature set, with their phoneme targets."""

    def __init__(self, features: dataset.FeatureSet, phoneme_cache: Path):
        self.features = features
        self.targets = phonemes.targets_for(features.texts, phoneme_cache)
        items = features.items
        self.by_class = defaultdict(list)
        for j, cls in enumerate(items[:, 3]):
            self.by_class[int(cls)].append(j)
        self.by_stream = defaultdict(list)
        for j, stream in enumerate(items[:, 0]):
            self.by_stream[int(stream)].append(j)

    def window(self, j: int, rng: np.random.Generator | None, augmenting: bool):
        """(features [n, 128, 40], content [n], span (first, end) within the window, class, units)."""
        stream, first, end, cls, text = (int(v) for v in self.features.items[j])
        if text < 0:  # a sound event: its last chunks tell it apart as well as all of a long alarm
            first = max(first, end - EVENT_CHUNKS)
        n = self.features.n_chunks(stream)
        lo, hi = max(0, first - 1), min(n, end + 1)
        return self._chunks(stream, lo, hi, rng, augmenting), (first - lo, end - lo), cls, \
            (self.targets[text] if text >= 0 else [])

    def background(self, rng: np.random.Generator, augmenting: bool):
        stream = int(rng.integers(len(self.features)))
        n = self.features.n_chunks(stream)
        lo = int(rng.integers(0, max(1, n - BACKGROUND_CHUNKS)))
        return self._chunks(stream, lo, min(n, lo + BACKGROUND_CHUNKS), rng, augmenting)

    def _chunks(self, stream: int, lo: int, hi: int, rng, augmenting: bool):
        mel = augment.training_window(rng, self.features, stream, lo, hi, augmenting=augmenting)
        content = self.features.content_of(stream)[lo:hi].astype(np.int64)
        return mel, content


def make_batch(sources: list[tuple[ItemSource, list[int]]], backgrounds: list[ItemSource], rng, augmenting: bool):
    """Concatenated chunks of every window, their content labels, and per item: span in the
    concatenation, class, phoneme units."""
    mels, contents, spans, classes, units = [], [], [], [], []
    first = 0
    for source, items in sources:
        for j in items:
            (mel, content), (a, b), cls, target = source.window(j, rng, augmenting)
            mels.append(mel)
            contents.append(content)
            spans.append((first + a, first + b))
            classes.append(cls)
            units.append(target)
            first += len(mel)
    for source in backgrounds:
        mel, content = source.background(rng, augmenting)
        mels.append(mel)
        contents.append(content)
        first += len(mel)
    return {"mel": torch.from_numpy(np.concatenate(mels)), "content": torch.from_numpy(np.concatenate(contents)),
            "spans": torch.tensor(spans, dtype=torch.long), "classes": torch.tensor(classes, dtype=torch.long),
            "units": units}


def losses(model: DemoModel, heads: EncoderHeads, batch: dict, ctc_weight: float, content_weight: float):
    audio = model.encode(batch["mel"])
    item_logits = heads.item_logits(audio, batch["spans"]).float()
    item_loss = F.cross_entropy(item_logits, batch["classes"])
    content_loss = F.cross_entropy(heads.content_logits(audio).float(), batch["content"])
    spoken = [k for k, u in enumerate(batch["units"]) if u]
    ctc = heads.ctc_loss(audio, batch["spans"][spoken], [batch["units"][k] for k in spoken]) if spoken \
        else torch.zeros(())
    loss = item_loss + content_weight * content_loss + ctc_weight * ctc
    right = item_logits.argmax(-1) == batch["classes"]
    stats = {"loss": loss.item(), "item_loss": item_loss.item(), "content_loss": content_loss.item(),
             "ctc": ctc.item(), "item_acc": float(right.float().mean())}
    return loss, stats, right


def class_accuracy(classes: torch.Tensor, right: torch.Tensor) -> dict[str, float]:
    return {tasks.CONTENT_CLASSES[c]: round(float(right[classes == c].float().mean()), 3)
            for c in sorted(set(classes.tolist()))}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path(__file__).resolve().parent / ".cache" / "run")
    p.add_argument("--train-streams", type=int, default=3000)
    p.add_argument("--pair-streams-total", type=int, default=1200, help="pair streams rendered for training")
    p.add_argument("--eval-streams", type=int, default=150)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--items", type=int, default=40, help="training-stream items per batch")
    p.add_argument("--pair-streams", type=int, default=4, help="pair streams per batch (all their items)")
    p.add_argument("--background", type=int, default=8, help="background windows per batch")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ctc-weight", type=float, default=0.3)
    p.add_argument("--content-weight", type=float, default=0.3)
    p.add_argument("--augment-from", type=float, default=0.3, help="share of the steps after which gain jitter and "
                   "SpecAugment are on")
    add_run_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.run.mkdir(parents=True, exist_ok=True)
    tokenizer, _ = vocab.demo_tokenizer(args.run / "tokenizer")
    cache = args.run / "phonemes.json"
    train = ItemSource(dataset.load(dataset.build("train", 0, args.train_streams, args.workers)), cache)
    pairs = ItemSource(dataset.load(dataset.build("pairs", 0, args.pair_streams_total, args.workers)), cache)
    held_out = ItemSource(dataset.load(dataset.build("eval", 0, args.eval_streams, args.workers)), cache)
    classes = sorted(c for c in train.by_class if tasks.CONTENT_CLASSES[c] != "background")

    model = DemoModel(DemoSizes(), tokenizer.get_vocab_size())
    heads = EncoderHeads(model.sizes.hidden)
    params = [*model.encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    state_path = args.run / STAGE_STATE["encoder"]
    step = 0
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        model.encoder.load_state_dict(state["encoder"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"[pretrain] resumed at step {step}", flush=True)
    print(f"[pretrain] encoder {model.parameter_counts()['encoder']:,} parameters; items: {len(train.features.items)} "
          f"train, {len(pairs.features.items)} in pair streams, {len(held_out.features.items)} held out", flush=True)
    eval_items = [j for j in range(len(held_out.features.items))
                  if tasks.CONTENT_CLASSES[int(held_out.features.items[j, 3])] != "background"][:240]
    eval_batch = make_batch([(held_out, eval_items)], [], None, False)

    def save() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"encoder": model.encoder.state_dict(), "heads": heads.state_dict(),
                    "optimizer": optimizer.state_dict(), "step": step, "args": {k: str(v) for k, v in vars(args).items()}},
                   tmp)
        tmp.replace(state_path)

    log = (args.run / "pretrain_log.jsonl").open("a")
    started = time.perf_counter()
    window: list[dict] = []
    while step < (args.until_step or args.steps):
        if args.time_budget_min and time.perf_counter() - started > 60 * args.time_budget_min:
            print(f"[pretrain] time budget reached at step {step}", flush=True)
            break
        rng = np.random.default_rng([args.seed, step])
        picked = [int(rng.choice(train.by_class[int(c)])) for c in rng.choice(classes, args.items)]
        pair_items = [j for s in rng.choice(len(pairs.features), args.pair_streams, replace=False)
                      for j in pairs.by_stream[int(s)]]
        augmenting = step >= args.augment_from * args.steps
        batch = make_batch([(train, picked), (pairs, pair_items)], [train] * args.background, rng, augmenting)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        model.train()
        loss, stats, _ = losses(model, heads, batch, args.ctc_weight, args.content_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        window.append(stats)
        if step % args.log_every == 0:
            mean = {k: round(float(np.mean([w[k] for w in window])), 4) for k in window[0]}
            record = {"step": step, "lr": optimizer.param_groups[0]["lr"], "augmenting": augmenting,
                      "elapsed_s": round(time.perf_counter() - started, 1), **mean}
            print("[pretrain] " + " ".join(f"{k}={v}" for k, v in record.items()), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
            window = []
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                _, stats, right = losses(model, heads, eval_batch, args.ctc_weight, args.content_weight)
            per_class = class_accuracy(eval_batch["classes"], right)
            print(f"[pretrain eval] step={step} item_acc={stats['item_acc']:.3f} ctc={stats['ctc']:.3f} {per_class}",
                  flush=True)
            log.write(json.dumps({"step": step, "eval": stats, "eval_per_class": per_class}) + "\n")
            log.flush()
        if step % args.save_every == 0:
            save()
    save()
    log.close()


if __name__ == "__main__":
    main()
