"""Training stages 2 and 3 of the demo model, on runtime states of the cached streams.

  python -m demo.train --stage decoder --run demo/.cache/run --steps 2000 --time-budget-min 30
  python -m demo.train --stage joint --run demo/.cache/run --steps 1000 --time-budget-min 30 --augment
  (run again with the same arguments to resume from the stage's last training state)

decoder: the encoder pretrained by demo/pretrain.py stays frozen; its outputs for every chunk
are computed once and cached, so a step costs only the decoder's forward and backward.
joint: everything is trained from the decoder stage's model, on exact features (the peak
restarted at a reset, as the runtime does), with the encoder's auxiliary losses kept on.

Every window is a state the runtime's context really holds (`runtime_state`): a stream's start,
or a context reset with its re-prefilled history, never longer than --max-tokens, the context
the package is exported for. Every step draws its batch from a generator seeded by
(seed, step), so a resumed run sees the same batches as an uninterrupted one. The silence
class dominates (≈ 97 % of decisions), so the loss weighs TEXT_BEGIN decisions by
--speak-weight.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from listenloop.context import HISTORY_CHUNKS
from listenloop.protocol import VECTORS_PER_CHUNK

from . import augment, dataset, tasks, vocab
from .heads import EncoderHeads
from .layout import Protocol, build_sequence
from .model import DemoModel, DemoSizes

STAGES = ("decoder", "joint")
STAGE_STATE = {"encoder": "encoder_state.pt", "decoder": "decoder_state.pt", "joint": "joint_state.pt"}  # in the run
TRAINED_CONTEXT = 768  # tokens: the context the demo package is exported for and trained on


def runtime_state(rng: np.random.Generator, labels: np.ndarray, new_chunks: int, p_start: float,
                  p_reply: float) -> tuple[int, int, int]:
    """A window of one stream as the runtime's context would hold it: (first, restart, end).

    Either the stream's start (first = restart = 0), or a context reset at chunk `restart`
    (docs/PROTOCOL.md, "Context policy"): the chunks first..restart-1 are re-prefilled history,
    at most HISTORY_CHUNKS and only chunks heard since the last reply; the running peak of the
    features restarts at `restart`. `end` - `restart` new chunks follow (fewer at the stream's
    end). With probability p_reply a reset window ends 2-7 chunks after a reply chunk, so replies
    are seen more often per second of compute than in whole streams (mostly silence)."""
    n = len(labels)
    new_chunks = min(n, new_chunks)
    if n <= new_chunks or rng.random() < p_start:
        return 0, 0, new_chunks
    replies = np.flatnonzero(labels >= 0)
    if replies.size and rng.random() < p_reply:
        end = min(n, int(rng.choice(replies)) + int(rng.integers(2, 8)))
    else:
        end = int(rng.integers(new_chunks, n + 1))
    restart = max(1, end - new_chunks)
    answered = replies[replies < restart]
    since_reply = restart - (int(answered[-1]) + 1 if answered.size else 0)
    return restart - min(HISTORY_CHUNKS, since_reply), restart, end


@dataclass
class Source:
    """A feature set the batches draw streams from, and (decoder stage) its encoder outputs."""
    features: dataset.FeatureSet
    weights: np.ndarray  # probability of each stream
    encoded: np.ndarray | None = None  # float16 [total_chunks, 10, H]


def make_batch(protocol: Protocol, sources: list[Source], picks, max_tokens: int, rng: np.random.Generator,
               min_chunks: int, max_chunks: int, p_start: float, p_reply: float,
               augmenting: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded batch of runtime states (see `runtime_state`): ids, targets, speak flags,
    attention mask, and either the mel chunks (exact features, restarted peak included) or,
    where the source holds them, the frozen encoder's outputs; plus the flat rows of B·L where
    each chunk's 10 audio vectors go. All windows of a batch have one random number of new
    chunks, so padding is mostly the difference in reply text between sequences."""
    seqs, mels, audio, contents, items = [], [], [], [], []
    first_chunk = 0  # of this window, in the batch's concatenated chunks
    new_chunks = int(rng.integers(min_chunks, max_chunks + 1))
    for source_index, i in picks:
        source = sources[source_index]
        labels = source.features.stream_labels(i)
        first, restart, end = runtime_state(rng, labels, new_chunks, p_start, p_reply)
        seq = build_sequence(protocol, labels[first:end], max_tokens, history=restart - first)
        end = first + seq.n_chunks
        if source.encoded is not None:
            rows = source.features.chunks(i)
            audio.append(np.asarray(source.encoded[rows.start + first : rows.start + end], np.float32))
        else:
            mels.append(augment.training_window(rng, source.features, i, first, end, restart, augmenting))
        contents.append(source.features.content_of(i)[first:end].astype(np.int64))
        items += [(first_chunk + a, first_chunk + b, c) for a, b, c in whole_items(contents[-1])]
        first_chunk += seq.n_chunks
        seqs.append(seq)
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
    out = {"ids": ids, "targets": targets, "speak": speak, "mask": mask, "pad_rows": torch.cat(rows),
           "content": torch.from_numpy(np.concatenate(contents)),
           "items": torch.tensor(items, dtype=torch.long).reshape(-1, 3)}
    if audio:
        out["audio"] = torch.from_numpy(np.concatenate(audio))
    else:
        out["mel"] = torch.from_numpy(np.concatenate(mels))
    return out


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


def batch_loss(model: DemoModel, batch: dict[str, torch.Tensor], speak_weight: float,
               heads: EncoderHeads | None = None, content_weight: float = 0.0,
               item_weight: float = 0.0, text_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    audio = batch["audio"] if "audio" in batch else model.encode(batch["mel"])
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
    if heads is not None and content_weight > 0.0:
        content_loss = F.cross_entropy(heads.content_logits(audio).float(), batch["content"], ignore_index=-100)
        loss = loss + content_weight * content_loss
    if heads is not None and item_weight > 0.0 and len(batch["items"]):
        item_logits = heads.item_logits(audio, batch["items"][:, :2]).float()
        item_loss = F.cross_entropy(item_logits, batch["items"][:, 2])
        loss = loss + item_weight * item_loss
        item_acc = float((item_logits.argmax(-1) == batch["items"][:, 2]).float().mean())
    with torch.no_grad():
        pred = logits.argmax(-1)
        stats = {
            "loss": loss.item(),
            "speak_recall": float((pred[speak] == targets[speak]).float().mean()) if speak.any() else float("nan"),
            "false_speak": float((pred[keep] != targets[keep]).float().mean()) if keep.any() else float("nan"),
            "text_acc": float((pred[text] == targets[text]).float().mean()) if text.any() else float("nan"),
            "content_loss": content_loss.item() if content_loss is not None else float("nan"),
            "item_loss": item_loss.item() if item_loss is not None else float("nan"),
            "item_acc": item_acc,
        }
    return loss, stats


def sampling_weights(features: dataset.FeatureSet, command_boost: float) -> np.ndarray:
    """Probability of drawing each stream: streams with a spoken command weigh `command_boost`
    times more (commands are the hardest items to tell apart)."""
    first_command = len(tasks.EVENT_REPLIES)  # REPLIES lists the event replies first
    has_command = np.array([np.any(features.stream_labels(i) >= first_command) for i in range(len(features))])
    weights = np.where(has_command, command_boost, 1.0)
    return weights / weights.sum()


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def encode_set(model: DemoModel, features: dataset.FeatureSet, path: Path, batch_chunks: int = 1024) -> np.ndarray:
    """The frozen encoder's outputs for every chunk of a set, features normalised from each
    stream's start, as float16 [total_chunks, 10, H]; computed once and kept in `path`."""
    if path.exists():
        return np.load(path, mmap_mode="r")
    model.eval()
    out = np.empty((len(features.labels), VECTORS_PER_CHUNK, model.sizes.hidden), np.float16)
    for i in range(len(features)):
        rows = features.chunks(i)
        mel = torch.from_numpy(features.stream(i)[0])
        for k in range(0, len(mel), batch_chunks):
            part = mel[k : k + batch_chunks]
            out[rows.start + k : rows.start + k + len(part)] = model.encode(part).numpy()
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return np.load(path, mmap_mode="r")


def load_release(model: DemoModel, checkpoint: Path) -> None:
    """Weights of a checkpoint in the release layout (demo/release.py wrote it) into `model`."""
    from listenloop.export.checkpoint import load_checkpoint

    released = load_checkpoint(checkpoint)
    model.llm.load_state_dict(released.lm_state)
    model.encoder.load_state_dict(released.encoder_state)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Seeding, threads, logging, saving and stopping: the same for every training stage."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--time-budget-min", type=float, default=0.0, help="stop (and save) after this long; 0: no limit")
    p.add_argument("--until-step", type=int, default=0,
                   help="stop (and save) at this step, the schedule still planned for --steps: replays a run that a "
                        "time budget stopped there; 0: run to --steps")
    p.add_argument("--workers", type=int, default=2, help="processes rendering the feature cache")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--run", type=Path, default=Path(__file__).resolve().parent / ".cache" / "run")
    p.add_argument("--train-streams", type=int, default=3000)
    p.add_argument("--pair-streams-total", type=int, default=1200, help="pair streams rendered for training")
    p.add_argument("--pair-share", type=float, default=0.2, help="share of a batch's streams that are pair streams")
    p.add_argument("--eval-streams", type=int, default=150)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--speak-weight", type=float, default=4.0)
    p.add_argument("--content-weight", type=float, default=0.3, help="joint stage: weight of the per-chunk loss")
    p.add_argument("--item-weight", type=float, default=0.5, help="joint stage: weight of the whole-item loss")
    p.add_argument("--text-weight", type=float, default=2.0, help="loss weight of a reply's emotion and text tokens")
    p.add_argument("--max-tokens", type=int, default=TRAINED_CONTEXT,
                   help="longest sequence: the context the package is exported for (its trained_context)")
    p.add_argument("--min-chunks", type=int, default=8, help="fewest new chunks in a window")
    p.add_argument("--max-chunks", type=int, default=48, help="most new chunks in a window (max-tokens cuts it too)")
    p.add_argument("--p-start", type=float, default=0.25, help="share of windows at a stream's start, not after a reset")
    p.add_argument("--p-reply", type=float, default=0.8, help="share of reset windows that end just after a reply")
    p.add_argument("--command-boost", type=float, default=3.0, help="draw streams with a spoken command this much more often")
    p.add_argument("--augment", action="store_true", help="joint stage: gain jitter and SpecAugment on the features")
    p.add_argument("--init-checkpoint", type=Path, default=None,
                   help="joint stage: start from a released checkpoint (demo/checkpoint) instead of the run's "
                        "decoder stage; the encoder's auxiliary heads start new")
    p.add_argument("--real-streams", type=int, default=0, help="joint stage: real-recording streams rendered (negatives.py)")
    p.add_argument("--real-share", type=float, default=0.0, help="share of a batch's streams that are real-recording streams")
    p.add_argument("--own-streams", type=int, default=0, help="joint stage: own-reply streams rendered (negatives.py)")
    p.add_argument("--own-share", type=float, default=0.0, help="share of a batch's streams that are own-reply streams")
    add_run_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.run.mkdir(parents=True, exist_ok=True)
    decoder_stage = args.stage == "decoder"

    if args.init_checkpoint is not None and not (args.run / "tokenizer").exists():
        (args.run / "tokenizer").mkdir()
        for name in ("tokenizer.json", "protocol_tokens.json"):  # the released model's own ids
            shutil.copy(args.init_checkpoint / name, args.run / "tokenizer" / name)
    tokenizer, tokens = vocab.demo_tokenizer(args.run / "tokenizer")
    protocol = Protocol.build(tokens, vocab.encoder_for(tokenizer))
    train_set = dataset.load(dataset.build("train", 0, args.train_streams, args.workers))
    pair_set = dataset.load(dataset.build("pairs", 0, args.pair_streams_total, args.workers))
    eval_set = dataset.load(dataset.build("eval", 0, args.eval_streams, args.workers))

    model = DemoModel(DemoSizes(), tokenizer.get_vocab_size())
    heads = EncoderHeads(model.sizes.hidden)
    if args.init_checkpoint is not None:  # a released model, its encoder heads new
        if decoder_stage:
            raise SystemExit("--init-checkpoint continues a released model: use it with --stage joint")
        load_release(model, args.init_checkpoint)
        encoder_state = {"step": 0}
    else:
        encoder_state = torch.load(args.run / STAGE_STATE["encoder"], map_location="cpu", weights_only=False)
        model.encoder.load_state_dict(encoder_state["encoder"])
        heads.load_state_dict(encoder_state["heads"])
        if not decoder_stage:  # the joint stage starts from the decoder stage's model
            model.load_state_dict(torch.load(args.run / STAGE_STATE["decoder"], map_location="cpu",
                                             weights_only=False)["model"])
    trained = [*model.llm.parameters()] if decoder_stage else [*model.parameters(), *heads.parameters()]
    model.encoder.requires_grad_(not decoder_stage)
    optimizer = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    state_path = args.run / STAGE_STATE[args.stage]
    step = 0
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"[train {args.stage}] resumed at step {step}", flush=True)

    sources = [Source(train_set, sampling_weights(train_set, args.command_boost)),
               Source(pair_set, np.full(len(pair_set), 1.0 / len(pair_set)))]
    shares = [args.pair_share]
    for kind, count, share in (("real", args.real_streams, args.real_share), ("own", args.own_streams, args.own_share)):
        if count and share:
            extra = dataset.load(dataset.build(kind, 0, count, args.workers))
            sources.append(Source(extra, np.full(len(extra), 1.0 / len(extra))))
            shares.append(share)
    if decoder_stage and len(sources) > 2:
        raise SystemExit("--real-streams and --own-streams are for the joint stage")
    shares = np.asarray([1.0 - sum(shares), *shares])  # the synthetic training streams take the rest
    if shares[0] <= 0:
        raise SystemExit(f"the shares of pair, real and own streams add up to {1 - shares[0]:.2f}: they must stay below 1")
    if decoder_stage:
        for source, name in zip(sources, ("train", "pairs")):
            started = time.perf_counter()
            # named after the encoder's pretraining step: a longer pretraining never reuses old outputs
            cached = args.run / f"encoded-{name}-{len(source.features)}-encoder{encoder_state['step']}.npy"
            source.encoded = encode_set(model, source.features, cached)
            print(f"[train {args.stage}] {name}: encoder outputs ready in {time.perf_counter() - started:.0f} s", flush=True)
    counts = model.parameter_counts()
    print(f"[train {args.stage}] parameters: encoder {counts['encoder']:,} ({'frozen' if decoder_stage else 'trained'}), "
          f"llm {counts['llm']:,}; {len(train_set)} train + {len(pair_set)} pair streams, {len(eval_set)} eval streams",
          flush=True)
    eval_rng = np.random.default_rng(args.seed)
    eval_batch = make_batch(protocol, [Source(eval_set, np.full(len(eval_set), 1.0 / len(eval_set)))],
                            [(0, i) for i in range(min(16, len(eval_set)))], args.max_tokens, eval_rng,
                            args.min_chunks, args.max_chunks, args.p_start, args.p_reply)
    aux = (0.0, 0.0) if decoder_stage else (args.content_weight, args.item_weight)

    def save(path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "sizes": asdict(model.sizes), "args": {k: str(v) for k, v in vars(args).items()}}, tmp)
        tmp.replace(path)

    def to_batch(batch):
        return {**batch, "keep_silence_id": tokens["KEEP_SILENCE"]}

    log = (args.run / f"{args.stage}_log.jsonl").open("a")
    started = time.perf_counter()
    window: list[dict] = []
    while step < (args.until_step or args.steps):
        if args.time_budget_min and time.perf_counter() - started > 60 * args.time_budget_min:
            print(f"[train {args.stage}] time budget reached at step {step}", flush=True)
            break
        rng = np.random.default_rng([args.seed, step])
        if len(sources) == 2:  # draws as the two-source recipe always did, so old runs replay exactly
            kinds = (rng.random(args.batch) < args.pair_share).astype(int)
        else:
            kinds = rng.choice(len(sources), size=args.batch, p=shares)
        picks = [(int(k), int(rng.choice(len(sources[int(k)].features), p=sources[int(k)].weights))) for k in kinds]
        batch = to_batch(make_batch(protocol, sources, picks, args.max_tokens, rng, args.min_chunks, args.max_chunks,
                                    args.p_start, args.p_reply, augmenting=args.augment))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        model.train()
        loss, stats = batch_loss(model, batch, args.speak_weight, heads, *aux, args.text_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        step += 1
        window.append(stats)
        if step % args.log_every == 0:
            # a head that is off reports NaN every step: left out, as NaN is not JSON
            columns = {k: np.asarray([w[k] for w in window], np.float64) for k in window[0]}
            mean = {k: float(np.nanmean(v)) for k, v in columns.items() if not np.isnan(v).all()}
            record = {"step": step, "lr": optimizer.param_groups[0]["lr"],
                      "elapsed_s": round(time.perf_counter() - started, 1), **mean}
            print(f"[train {args.stage}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in record.items()), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
            window = []
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                _, stats = batch_loss(model, to_batch(eval_batch), args.speak_weight, heads, *aux, args.text_weight)
            stats = {k: v for k, v in stats.items() if not np.isnan(v)}
            print(f"[eval {args.stage}] step={step} " + " ".join(f"{k}={v:.4g}" for k, v in stats.items()), flush=True)
            log.write(json.dumps({"step": step, "eval": stats}) + "\n")
            log.flush()
        if step % args.save_every == 0:
            save(state_path)
    save(state_path)
    log.close()
    # the weights to evaluate and release: this stage's, wherever it stopped
    torch.save({"model": model.state_dict(), "sizes": asdict(model.sizes), "stage": args.stage, "step": step},
               args.run / "model.pt")
    print(f"[train {args.stage}] stopped at step {step}: {args.run / 'model.pt'}", flush=True)


if __name__ == "__main__":
    main()
