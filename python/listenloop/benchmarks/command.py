"""The `listenloop bench` command: its options, their checks, and which run they start.

Prints the table (report), writes --json and --plot, compares with --compare; --soak runs the
soak instead of the figures.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..errors import Error
from ..profiles import profile_help
from . import soak
from .inputs import DEFAULT_RECORDING
from .plots import plot
from .report import compare, report
from .suite import run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Measure latency, throughput and memory of a model package on this machine. The output "
                     "starts with the command line of the run, every option spelled out.")
    p.add_argument("package", nargs="?", default=None, help="model package folder (default: the embedded model)")
    p.add_argument("--profile", default="cpu", help=profile_help())
    p.add_argument("--chunks", type=int, default=200, help="chunks of the steady listening run (default 200)")
    p.add_argument("--rounds", type=int, default=30, help="replies timed for TTFR and decode speed (default 30)")
    p.add_argument("--reply-tokens", type=int, default=64, help="length of the scripted replies (default 64)")
    p.add_argument("--context", default="500,2000,4000",
                   help="context lengths in tokens of the step-vs-context run (default 500,2000,4000)")
    p.add_argument("--context-steps", type=int, default=20, help="steps timed at each context length (default 20)")
    p.add_argument("--session-chunks", type=int, default=25,
                   help="chunks of the real-time end-to-end session that measures TTFR from the triggering chunk's "
                        "last sample written to the first TextDelta event (0 skips it; 25 = 10 s); its replies are "
                        "min(--reply-tokens, 16) tokens")
    p.add_argument("--speak-every", type=int, default=1,
                   help="in that session, at most every N-th chunk may trigger a reply (large models: replies "
                        "outlast a chunk) (default 1)")
    p.add_argument("--catch-up-chunks", type=int, default=8,
                   help="queued chunks decided one listening step each right after a reply (cut to what fits in "
                        "the context) (default 8)")
    p.add_argument("--sessions", default="", metavar="N[,N...]",
                   help="also open N sessions at once on one Runtime for each N (e.g. 1,4,16), each fed --recording "
                        "in 0.1 s pieces as fast as possible from its own thread: aggregate chunks/s, per-stream "
                        "listening step, KV bytes per session, and whether every session's events equal a single "
                        "session's (default: not run)")
    p.add_argument("--recording", metavar="FILE", default=None,
                   help="audio file fed to every session of --sessions (default: examples/kitchen.wav of the "
                        "source tree, or of the current folder)")
    p.add_argument("--sessions-only", action="store_true",
                   help="with --sessions: measure start-up and the sessions only, skipping every other figure")
    p.add_argument("--precision-packages", nargs="+", default=(), metavar="DIR",
                   help="more packages of the same checkpoint (fp32/int8/int4/fp16) for the precision scaling")
    p.add_argument("--compare-torch", metavar="CHECKPOINT", help="also run the PyTorch reference on this checkpoint")
    p.add_argument("--threads", type=int, default=None,
                   help="ORT intra-op threads (default: the profile's); PyTorch gets as many")
    p.add_argument("--soak", type=float, metavar="HOURS", default=None,
                   help="instead of the figures: stream HOURS simulated hours (examples, silence, noise) through one "
                        "session as fast as it takes them, and report RSS, resets, replies and losses per hour")
    p.add_argument("--json", metavar="FILE", help="save every figure, the command line and the environment")
    p.add_argument("--plot", metavar="FILE.png", help="write the plots")
    p.add_argument("--compare", metavar="OLD.json", help="print ratios against a previous --json run")


def command_line(args) -> str:
    """The `listenloop bench` command of parsed `args`, every option spelled out."""
    parts = ["listenloop", "bench"] + ([str(args.package)] if args.package else [])
    if args.soak is not None:  # the soak run takes only these
        parts += ["--profile", str(args.profile), "--soak", str(args.soak)]
        return shlex.join(parts + (["--json", str(args.json)] if args.json else []))
    parts += ["--profile", str(args.profile), "--chunks", str(args.chunks), "--rounds", str(args.rounds),
              "--reply-tokens", str(args.reply_tokens), "--context", args.context,
              "--context-steps", str(args.context_steps), "--session-chunks", str(args.session_chunks),
              "--speak-every", str(args.speak_every), "--catch-up-chunks", str(args.catch_up_chunks)]
    if args.sessions:
        parts += ["--sessions", args.sessions]
        if args.recording:
            parts += ["--recording", args.recording]
        if args.sessions_only:
            parts.append("--sessions-only")
    if args.precision_packages:
        parts += ["--precision-packages", *map(str, args.precision_packages)]
    for flag, value in (("--compare-torch", args.compare_torch), ("--threads", args.threads), ("--json", args.json),
                        ("--plot", args.plot), ("--compare", args.compare)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def parse_counts(text: str) -> tuple[int, ...]:
    """"1,4,16" -> (1, 4, 16); "" -> ()."""
    try:
        counts = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        counts = (0,)
    if any(n < 1 for n in counts):
        raise Error(f"--sessions must be comma-separated session counts >= 1, got {text!r}")
    return counts


def main(args) -> int:
    if args.plot:
        try:
            import matplotlib  # noqa: F401 - checked before a long run, not after it
        except ImportError:
            raise Error("--plot needs matplotlib: pip install 'listenloop[bench]' (or matplotlib)") from None
    if args.soak is not None:
        return _main_soak(args)
    if args.chunks < 10 or args.rounds < 3 or args.reply_tokens < 2:
        raise Error("--chunks must be >= 10, --rounds >= 3 and --reply-tokens >= 2")
    if args.speak_every < 1 or args.catch_up_chunks < 1 or args.context_steps < 1 or args.session_chunks < 0:
        raise Error("--speak-every, --catch-up-chunks and --context-steps must be >= 1, --session-chunks >= 0")
    sessions = parse_counts(args.sessions)
    if args.sessions_only and not sessions:
        raise Error("--sessions-only needs --sessions N[,N...]")
    recording = Path(args.recording) if args.recording else DEFAULT_RECORDING
    if sessions and not recording.is_file():
        raise Error(f"{recording}: no such recording; pass --recording FILE (any audio file)")
    old = None
    if args.compare:
        try:
            old = json.loads(Path(args.compare).read_text())
        except (OSError, ValueError) as exc:
            raise Error(f"--compare {args.compare}: cannot read a bench JSON file ({exc})") from None
    try:
        lengths = tuple(int(x) for x in args.context.split(",") if x.strip())
    except ValueError:
        raise Error(f"--context must be comma-separated token counts, got {args.context!r}") from None
    command = command_line(args)
    print(f"... {command}", file=sys.stderr, flush=True)
    results = run(args.package, args.profile, chunks=args.chunks, reply_tokens=args.reply_tokens, rounds=args.rounds,
                  context_lengths=lengths, context_steps=args.context_steps, session_chunks=args.session_chunks,
                  speak_every=args.speak_every, catch_up_chunks=args.catch_up_chunks, sessions=sessions,
                  recording=args.recording, sessions_only=args.sessions_only,
                  precision_packages=args.precision_packages, torch_checkpoint=args.compare_torch, threads=args.threads,
                  command=command, log=lambda line: print(f"... {line}", file=sys.stderr, flush=True))
    if args.json:  # first: a failing plot must not lose the figures
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(report(results))
    if old is not None:
        print(compare(results, old))
    if args.plot:
        plot(results, args.plot)
    return 0


def _main_soak(args) -> int:
    if not 0 < args.soak <= 24 * 30:
        raise Error(f"--soak takes simulated hours in (0, 720], got {args.soak}")
    print(f"... soak: {args.soak} simulated hours", file=sys.stderr, flush=True)
    result = soak.soak(args.soak, args.package, args.profile, report_every_hours=1.0 if args.soak >= 2 else 0.25,
                       progress=lambda r: print(f"... {r}", file=sys.stderr, flush=True))
    result["command"] = command_line(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(soak.report(result))
    return 0
