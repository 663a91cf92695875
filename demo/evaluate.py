"""Evaluate a trained demo model on held-out streams through the streaming protocol (greedy).

  python -m demo.evaluate --package runtime/models/default --streams 100   # the shipped package, via listenloop
  python -m demo.evaluate --run demo/.cache/run --streams 100                # a training run, in PyTorch

For every event type and command: the share of occurrences answered with the right reply text
between the item's first chunk and 2 chunks after its reply chunk (streams.py's labelling rule),
and the median decision delay in chunks (reply chunk of the first right answer minus the
labelled reply chunk; negative means it answered before the sound ended). Replies outside any
such window are false replies, counted per 10 minutes of audio outside the windows.
`--real` plays held-out real recordings instead (speech, music, sound effects; demo/realworld.py),
where every reply is a false one.
"""
from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from listenloop.protocol import CHUNK_SAMPLES, SAMPLE_RATE

from . import dataset, negatives, streams, tasks, vocab
from .layout import Protocol
from .listener import PackageListener, TorchListener
from .model import DemoModel, DemoSizes

LATE_CHUNKS = 2  # an answer up to this many chunks after the reply chunk still counts


@dataclass
class SpokenReply:
    chunk: int
    emotion: str | None
    text: str


def load_model(run: Path) -> tuple[DemoModel, Protocol, object]:
    tokenizer, tokens = vocab.demo_tokenizer(run / "tokenizer")
    path = run / "model.pt"  # written by demo/train.py whenever a stage stops
    if not path.exists():
        raise FileNotFoundError(f"no model.pt in {run}: train the decoder stage first (demo/train.py)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = DemoModel(DemoSizes(**state["sizes"]), tokenizer.get_vocab_size())
    model.load_state_dict(state["model"])
    return model.eval(), Protocol.build(tokens, vocab.encoder_for(tokenizer)), tokenizer


def run_stream(listener, tokenizer, features: np.ndarray, continuous: bool = False) -> list[SpokenReply]:
    """Greedy replies of a TorchListener or PackageListener over one stream's chunk features;
    `continuous` keeps the PackageListener's context from the previous stream."""
    emotion_names = {listener.tokens[e]: e for e in tasks.EMOTIONS}
    if continuous:
        listener.next_recording()
    else:
        listener.reset()
    replies = []
    for mel in features:
        decision = listener.listen(mel)
        if decision.spoke:
            ids = decision.reply_ids
            emotion = emotion_names.get(ids[0]) if ids else None
            text_ids = [i for i in ids[1 if emotion else 0 :] if i != listener.tokens["TEXT_END"]]
            replies.append(SpokenReply(decision.chunk, emotion, tokenizer.decode(text_ids).strip()))
    return replies


@dataclass
class StreamScore:
    items: list[tuple[str, bool, int | None]]  # per positive item: name, answered right, delay in chunks
    false_replies: list[SpokenReply]  # replies outside every answer window
    near_speech: int  # of those, how many came during distractor speech or up to LATE_CHUNKS after it
    wrong: list[tuple[str, str]]  # (item name, text said instead) for wrong replies inside a window
    outside_s: float  # seconds of audio outside every answer window


def _chunks(seg: streams.Segment, last: int) -> range:
    return range(seg.start // CHUNK_SAMPLES, last + 1)


def score(stream: streams.Stream, replies: list[SpokenReply]) -> StreamScore:
    """Score one stream's replies against its labels (see the module doc)."""
    items, wrong = [], []
    in_window: set[int] = set()
    windows = 0
    for seg in stream.segments:
        if seg.reply is None:
            continue
        window = _chunks(seg, seg.reply_chunk + LATE_CHUNKS)
        windows += len(window)
        inside = [i for i, r in enumerate(replies) if r.chunk in window]
        in_window.update(inside)
        right = [replies[i].chunk for i in inside if replies[i].text == seg.reply.text]
        items.append((seg.name, bool(right), (right[0] - seg.reply_chunk) if right else None))
        wrong += [(seg.name, replies[i].text) for i in inside if replies[i].text != seg.reply.text]
    false_replies = [r for i, r in enumerate(replies) if i not in in_window]
    speech = [_chunks(seg, streams.reply_chunk(seg.end) + LATE_CHUNKS) for seg in stream.segments
              if seg.kind == "distractor"]
    near_speech = sum(1 for r in false_replies if any(r.chunk in chunks for chunks in speech))
    outside_s = max(0, stream.n_chunks - windows) * CHUNK_SAMPLES / SAMPLE_RATE
    return StreamScore(items, false_replies, near_speech, wrong, outside_s)


@dataclass
class Report:
    answered: dict[str, list[bool]]  # item name -> answered right, per occurrence
    delays: list[int]  # decision delay in chunks of every right answer
    false_replies: int
    outside_s: float  # seconds of audio outside every answer window
    false_near_speech: int = 0  # false replies during or right after distractor speech
    confusions: Counter = field(default_factory=Counter)  # (item name, text said instead) -> count
    false_texts: Counter = field(default_factory=Counter)  # text of each false reply -> count

    @property
    def accuracy(self) -> float:
        everything = [ok for oks in self.answered.values() for ok in oks]
        return float(np.mean(everything)) if everything else float("nan")

    @property
    def false_per_10_min(self) -> float:
        return 600.0 * self.false_replies / self.outside_s if self.outside_s else float("nan")

    def add(self, scored: StreamScore) -> None:
        for name, ok, delay in scored.items:
            self.answered[name].append(ok)
            if delay is not None:
                self.delays.append(delay)
        self.false_replies += len(scored.false_replies)
        self.false_texts.update(r.text for r in scored.false_replies)
        self.false_near_speech += scored.near_speech
        self.confusions.update(scored.wrong)
        self.outside_s += scored.outside_s


def evaluate(listener, tokenizer, split: str, seeds, show: int = 0, continuous: bool = False) -> Report:
    """Run `listener` over the streams of `split` with these seeds and score its replies.
    `continuous`: one context across all streams, back to back (needs a PackageListener)."""
    report = Report(defaultdict(list), [], 0, 0.0)
    listener.reset()
    for n, seed in enumerate(seeds):
        stream = negatives.make_real_stream(seed, "eval") if split == "real" else streams.make_stream(seed, split)
        replies = run_stream(listener, tokenizer, dataset.stream_features(stream.audio), continuous)
        report.add(score(stream, replies))
        if n < show:
            print(f"stream {seed}: expected " + ", ".join(f"{s.name}@{s.reply_chunk}" for s in stream.segments if s.reply)
                  + " | got " + ", ".join(f"{r.chunk}:{r.emotion}:{r.text!r}" for r in replies))
    return report


def print_report(report: Report) -> None:
    answered = report.answered
    print(f"\n{'item':<16} {'n':>4} {'answered':>9}")
    order = list(tasks.EVENT_REPLIES) + [c.name for c in tasks.COMMANDS]
    for name in order:
        if answered.get(name):
            print(f"{name:<16} {len(answered[name]):>4} {100 * np.mean(answered[name]):>8.1f}%")
    for group, names in (("sound events", list(tasks.EVENT_REPLIES)), ("commands", [c.name for c in tasks.COMMANDS])):
        oks = [ok for name in names for ok in answered.get(name, [])]
        if oks:
            print(f"{group:<16} {len(oks):>4} {100 * np.mean(oks):>8.1f}%")
    n_all = sum(len(oks) for oks in answered.values())
    print(f"{'all':<16} {n_all:>4} {100 * report.accuracy:>8.1f}%")
    print(f"false replies: {report.false_replies} in {report.outside_s / 60:.1f} min outside answer windows "
          f"= {report.false_per_10_min:.2f} per 10 min, {report.false_near_speech} of them during or right after "
          "distractor speech")
    if report.false_texts:
        print("false replies said: " + ", ".join(f"{text!r} x{n}" for text, n in report.false_texts.most_common(8)))
    if report.confusions:
        print("wrong replies inside answer windows: " + ", ".join(
            f"{name} -> {text!r} x{n}" for (name, text), n in report.confusions.most_common(6)))
    print(f"median decision delay: {np.median(report.delays) if report.delays else float('nan'):.1f} chunks "
          f"(over {len(report.delays)} right answers)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path(__file__).resolve().parent / ".cache" / "run",
                   help="training run to evaluate in PyTorch")
    p.add_argument("--package", type=Path, help="evaluate this exported model package through listenloop instead")
    p.add_argument("--speak-bias", type=float, help="override the speak bias (package default, or 0 in PyTorch)")
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--split", choices=["eval", "train", "real"], default="eval",
                   help="train: score streams of the training split (with --first-seed 0, streams it was trained on), "
                        "to tell over-fitting from under-fitting; real: held-out real recordings (demo/negatives.py), "
                        "where every reply is a false reply")
    p.add_argument("--real", dest="split", action="store_const", const="real", help="the same as --split real")
    p.add_argument("--first-seed", type=int, default=10_000, help="eval-split seeds (the training run's quick eval uses 0..)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--show", type=int, default=0, help="print the replies of the first N streams")
    p.add_argument("--continuous", action="store_true",
                   help="with --package: listen to the streams back to back in one context, as an always-on "
                        "device would, so that the runtime's context resets fall anywhere in the audio")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.package is not None:
        from tokenizers import Tokenizer

        listener = PackageListener(args.package, speak_bias=args.speak_bias)
        tokenizer = Tokenizer.from_file(str(args.package / "tokenizer.json"))
        print(f"package {args.package} ({listener.model.package.decoder['precision']} decoder), "
              f"speak bias {listener.speak_bias:+.2f}")
    else:
        model, protocol, tokenizer = load_model(args.run)
        listener = TorchListener(model, protocol, speak_bias=args.speak_bias or 0.0)

    if args.continuous and args.package is None:
        p.error("--continuous needs --package (the PyTorch listener has no bounded context)")
    report = evaluate(listener, tokenizer, args.split, range(args.first_seed, args.first_seed + args.streams), args.show,
                      args.continuous)
    print_report(report)


if __name__ == "__main__":
    main()
