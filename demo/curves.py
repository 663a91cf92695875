"""Learning curves of a training run: one panel per stage, training batches against the
held-out batch the run logs every --eval-every steps.

  python -m demo.curves --run demo/.cache/run --out docs/demo_training.png

stage 1 (demo/pretrain.py): item accuracy of the encoder's item head;
stages 2 and 3 (demo/train.py): reply-text token accuracy and TEXT_BEGIN recall, and the share
of silent decisions wrongly spoken.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = (
    ("pretrain_log.jsonl", "stage 1: encoder on item windows", (("item_acc", "item accuracy"),)),
    ("decoder_log.jsonl", "stage 2: decoder on frozen encoder outputs",
     (("text_acc", "reply token accuracy"), ("speak_recall", "TEXT_BEGIN recall"), ("false_speak", "false TEXT_BEGIN"))),
    ("joint_log.jsonl", "stage 3: joint fine-tune",
     (("text_acc", "reply token accuracy"), ("speak_recall", "TEXT_BEGIN recall"), ("false_speak", "false TEXT_BEGIN"))),
)


def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records) of a stage's JSON-lines log; a resumed run's
    repeated steps keep their last record."""
    train, held_out = {}, {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "eval" in record:
            held_out[record["step"]] = {"step": record["step"], **record["eval"]}
        else:
            train[record["step"]] = record
    return [train[k] for k in sorted(train)], [held_out[k] for k in sorted(held_out)]


def main(argv=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path(__file__).resolve().parent / ".cache" / "run")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    panels = [(args.run / name, title, series) for name, title, series in PANELS if (args.run / name).exists()]
    if not panels:
        raise SystemExit(f"no training logs in {args.run}")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (path, title, series) in zip(axes[0], panels):
        train, held_out = read_log(path)
        for n, (key, label) in enumerate(series):
            colour = f"C{n}"
            ax.plot([r["step"] for r in train], [r[key] for r in train], colour, alpha=0.45, label=f"{label}, training")
            ax.plot([r["step"] for r in held_out], [r[key] for r in held_out], colour, marker="o", linestyle="--",
                    label=f"{label}, held out")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
