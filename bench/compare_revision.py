"""The decoder's listening step and catch-up against an earlier revision's engine, side by side.

    python bench/compare_revision.py --revision fe66252 [--package PKG] [--context 500,2000,4000]

Loads `python/listenloop/engine.py` of `--revision` (git) as a module next to the current
runtime and times, alternately in one process on the same package:

- the steady listening step (decoder only, one chunk) at each context length: the cache is
  set to that many tokens directly (its contents do not change the arithmetic, only P does);
- catch-up of 8 queued chunks: the earlier engine's batched `listen_many` with a batched
  encoder call, against the current one-chunk-per-call path (encoder B=1 and one decoder call
  per chunk), which keeps every stream's numbers independent of what else is queued.

Medians of `--rounds` interleaved rounds. Needs the revision's engine to run against this
checkout's other modules (true for engines with the `Engine(package, profile, max_context,
speak_bias=...)` / `listen_many` API).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
NEVER_SPEAK = -50.0
CATCH_UP = 8


def load_revision_engine(revision: str):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:python/listenloop/engine.py"],
                            capture_output=True, text=True, check=True).stdout
    source = source.replace("from . import", "from listenloop import").replace("from .", "from listenloop.")
    path = Path(tempfile.mkdtemp()) / f"engine_{revision}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"listenloop_engine_{revision}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _time(fn) -> float:
    started = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - started)


def main(argv=None) -> int:
    from listenloop.model import Model
    from listenloop.protocol import STEP

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--revision", required=True, help="git revision whose engine.py to compare with")
    p.add_argument("--package", default=None, help="model package (default: the embedded demo model)")
    p.add_argument("--context", default="500,2000,4000", help="cached tokens of the steady-step comparison")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    old_engine = load_revision_engine(args.revision).Engine(args.package, "cpu", speak_bias=NEVER_SPEAK)
    model = Model(old_engine.package, "cpu")
    stream = model.stream(speak_bias=NEVER_SPEAK, quiet_resets=False)
    rng = np.random.default_rng(0)
    mels = rng.normal(size=(CATCH_UP, 128, 40)).astype(np.float32)
    vectors = model.encode(mels[:1])[0]
    reserve = max(old_engine.reply_reserve, stream.context.reply_reserve)
    contexts = [c for c in (int(x) for x in args.context.split(",")) if c + STEP + reserve <= model.capacity]

    results = {"revision": args.revision, "package": model.package.name, "precision": model.package.decoder["precision"],
               "command": "python bench/compare_revision.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "steady": {}, "catch_up": {}}
    for context in contexts:
        times = {"before": [], "after": []}
        for _ in range(args.rounds):
            old_engine._position, old_engine._previous = context, old_engine.tokens["KEEP_SILENCE"]
            times["before"].append(_time(lambda: old_engine.listen(vectors)))
            stream._position, stream._previous = context, stream.tokens["KEEP_SILENCE"]
            times["after"].append(_time(lambda: stream.listen(vectors)))
        results["steady"][context] = {k: float(np.median(v)) for k, v in times.items()}

    times = {"before": [], "after": []}
    start = len(model.prefix_ids) + STEP * 10
    for _ in range(args.rounds):
        old_engine._position, old_engine._previous = start, old_engine.tokens["TEXT_END"]
        times["before"].append(_time(lambda: old_engine.listen_many(old_engine.encode(mels))))
        stream._position, stream._previous = start, stream.tokens["TEXT_END"]
        times["after"].append(_time(lambda: [stream.listen(model.encode(m[None])[0]) for m in mels]))
    results["catch_up"] = {k: float(np.median(v)) for k, v in times.items()}

    print(f"{results['package']} ({results['precision']}): revision {args.revision} (before) vs this checkout (after), "
          f"medians of {args.rounds} interleaved rounds")
    for context, t in results["steady"].items():
        print(f"  listening step at {context:5d} cached tokens: before {t['before']:9.3f} ms  after {t['after']:9.3f} ms"
              f"  after/before {t['after'] / t['before']:.3f}")
    t = results["catch_up"]
    print(f"  catch-up of {CATCH_UP} chunks (encoder + decoder): before {t['before']:9.3f} ms  after {t['after']:9.3f} ms"
          f"  after/before {t['after'] / t['before']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
