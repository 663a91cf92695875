"""Choose the package's speak bias on validation streams and write it into its manifest.

  python -m demo.calibrate --package runtime/models/default --streams 60

The speak bias is added to the TEXT_BEGIN logit before the two-way decision (the manifest's
sampling.speak_bias, which every listenloop session uses). Validation streams are the eval
split's seeds 0.., disjoint from the seeds `demo.evaluate` reports on (10000..), so the reported
figures are not tuned on. The rule: the bias with the most items answered right among those
with at most --max-false false replies per 10 minutes; if none reaches that, the one with the
fewest false replies (ties: more answered right).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .evaluate import Report, evaluate
from .listener import PackageListener

DEFAULT_BIASES = (-4.0, -3.0, -2.0, -1.0, 0.0, 1.0)


def choose(reports: dict[float, Report], max_false: float) -> float:
    """The bias the module's rule picks from validation reports keyed by bias."""
    within = [b for b, r in reports.items() if r.false_per_10_min <= max_false]
    if within:
        return max(within, key=lambda b: (reports[b].accuracy, -abs(b)))
    return min(reports, key=lambda b: (reports[b].false_per_10_min, -reports[b].accuracy))


def write_speak_bias(package: Path, bias: float) -> None:
    path = Path(package) / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["sampling"]["speak_bias"] = float(bias)
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", type=Path, required=True)
    p.add_argument("--streams", type=int, default=60, help="validation streams (eval split, seeds 0..)")
    p.add_argument("--biases", type=float, nargs="+", default=list(DEFAULT_BIASES))
    p.add_argument("--max-false", type=float, default=1.0, help="false replies per 10 min the bias may allow")
    p.add_argument("--dry-run", action="store_true", help="print the choice, leave the manifest as it is")
    args = p.parse_args(argv)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(args.package / "tokenizer.json"))
    listener = PackageListener(args.package)  # loaded once; each sweep point only sets the bias
    reports = {}
    for bias in args.biases:
        listener.with_speak_bias(bias)
        reports[bias] = evaluate(listener, tokenizer, "eval", range(args.streams))
        print(f"speak bias {bias:+.1f}: {100 * reports[bias].accuracy:5.1f} % answered right, "
              f"{reports[bias].false_per_10_min:.2f} false replies per 10 min", flush=True)
    bias = choose(reports, args.max_false)
    print(f"chosen speak bias: {bias:+.1f}")
    if not args.dry_run:
        write_speak_bias(args.package, bias)
        print(f"written to {args.package / 'manifest.json'}")


if __name__ == "__main__":
    main()
