"""Parity report: an exported package (listenloop.engine.Engine) against TorchReference.

    python -m listenloop.export.parity CHECKPOINT_DIR PACKAGE_DIR [--chunks N] [--seed S]

Both sides get the same synthetic audio (tones, chirps and noise bursts between quiet stretches),
turned into mel chunks by `listenloop.features.StreamingLogMel`, and each runs the full protocol
on its own encoder output. The package follows the reference's choices (teacher forcing) while
its own greedy choice is recorded at every decision and reply token. Compared: encoder output,
logits at every step, the listening decision per chunk, and every reply token.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from listenloop.protocol import CHUNK_SAMPLES as CHUNK
from listenloop.protocol import MAX_REPLY_TOKENS
from listenloop.protocol import SAMPLE_RATE as RATE

# Thresholds: fp32 must match exactly in decisions and tokens; lower precisions by agreement.
FP32_LOGITS_TOLERANCE = 1e-3
MIN_DECISION_AGREEMENT = 0.97


def synthetic_stream(n_chunks: int, seed: int = 0) -> np.ndarray:
    """Seeded test audio: quiet noise with tones, chirps and noise bursts of varying loudness."""
    rng = np.random.default_rng(seed)
    n = n_chunks * CHUNK
    audio = rng.normal(0.0, 0.003, n)
    t = np.arange(n) / RATE
    start = 0
    while start < n:
        length = int(rng.integers(RATE // 4, 2 * RATE))
        kind = rng.integers(0, 4)
        seg = slice(start, min(n, start + length))
        amp = 10 ** rng.uniform(-2, -0.5)
        if kind == 0:
            audio[seg] += amp * np.sin(2 * np.pi * rng.uniform(150, 3000) * t[seg])
        elif kind == 1:
            f0, f1 = rng.uniform(200, 4000, 2)
            local = t[seg] - t[seg][0]
            audio[seg] += amp * np.sin(2 * np.pi * (f0 + (f1 - f0) * local / max(local[-1], 1e-3) / 2) * local)
        elif kind == 2:
            audio[seg] += amp * rng.normal(0, 1, seg.stop - seg.start)
        start += length + int(rng.integers(0, RATE))
    return np.clip(audio, -1, 1).astype(np.float32)


def mel_chunks(audio: np.ndarray) -> np.ndarray:
    from listenloop.features import StreamingLogMel

    features = StreamingLogMel()
    return np.stack([features(audio[i:i + CHUNK]) for i in range(0, len(audio) - CHUNK + 1, CHUNK)])


@dataclass
class Trace:
    decisions: list = field(default_factory=list)  # per chunk
    replies: dict = field(default_factory=dict)  # chunk index -> token list
    logits: list = field(default_factory=list)  # per step: (kind, chunk, float32[V])


def run_protocol(engine, audio_embeds: np.ndarray, max_reply_tokens: int) -> Trace:
    trace = Trace()
    engine.reset()
    for i, chunk in enumerate(audio_embeds):
        result = engine.listen(chunk)
        trace.decisions.append(bool(result.spoke))
        trace.logits.append(("listen", i, np.array(result.logits, dtype=np.float32)))
        if result.spoke:
            tokens = []
            for step in engine.speak(max_reply_tokens):
                tokens.append(int(step.token))
                trace.logits.append(("speak", i, np.array(step.logits, dtype=np.float32)))
            trace.replies[i] = tokens
    return trace


@dataclass
class ParityReport:
    precision: str
    chunks: int
    encoder_max_abs_diff: float
    logits_max_abs_diff: float  # over every step (the package follows the reference's choices)
    compared_steps: int
    decision_agreement: float
    reference_speak_chunks: int
    reply_token_agreement: float  # over replies both sides started at the same chunk
    compared_reply_tokens: int
    failures: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def table(self) -> str:
        rows = [("precision (encoder/decoder)", self.precision), ("chunks", str(self.chunks)),
                ("chunks where the reference speaks", str(self.reference_speak_chunks)),
                ("encoder max |diff|", f"{self.encoder_max_abs_diff:.3g}"),
                ("logits max |diff| (steps compared)", f"{self.logits_max_abs_diff:.3g} ({self.compared_steps})"),
                ("decision agreement", f"{100 * self.decision_agreement:.1f}%"),
                ("reply token agreement (tokens)", f"{100 * self.reply_token_agreement:.1f}% ({self.compared_reply_tokens})"),
                ("result", "PASS" if self.passed else "FAIL: " + "; ".join(self.failures))]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


class ForcedChoices:
    """A sampler for the Engine that makes the reference's choices (teacher forcing) and records
    the package's own greedy choice at each of them, so one disagreement does not send the two
    sides into different contexts for the rest of the stream."""

    def __init__(self, trace: Trace):
        self._decisions = iter(trace.decisions)
        self._tokens = iter([t for chunk in sorted(trace.replies) for t in trace.replies[chunk]])
        self.own_decisions: list = []
        self.own_tokens: list = []

    def decide(self, silence_logit: float, speak_logit: float) -> bool:
        self.own_decisions.append(bool(speak_logit > silence_logit))
        return next(self._decisions)

    def sample(self, logits) -> int:
        self.own_tokens.append(int(np.argmax(logits)))
        return next(self._tokens)


def compare(ref: Trace, pkg: Trace, forced: ForcedChoices, encoder_diff: float, precision: str) -> ParityReport:
    n = len(ref.decisions)
    agree = sum(a == b for a, b in zip(ref.decisions, forced.own_decisions)) / max(n, 1)
    ref_tokens = [t for chunk in sorted(ref.replies) for t in ref.replies[chunk]]
    total = len(ref_tokens)
    matched = sum(a == b for a, b in zip(ref_tokens, forced.own_tokens))
    logits_diff = max((float(np.abs(a[2] - b[2]).max()) for a, b in zip(ref.logits, pkg.logits)), default=0.0)
    report = ParityReport(precision=precision, chunks=n, encoder_max_abs_diff=encoder_diff,
                          logits_max_abs_diff=logits_diff, compared_steps=min(len(ref.logits), len(pkg.logits)),
                          decision_agreement=agree, reference_speak_chunks=sum(ref.decisions),
                          reply_token_agreement=matched / total if total else 1.0, compared_reply_tokens=total)
    if len(pkg.logits) != len(ref.logits) or len(forced.own_decisions) != n:
        report.failures.append(f"the package took {len(pkg.logits)} steps, the reference {len(ref.logits)}")
    if precision == "fp32/fp32":
        if agree < 1.0:
            report.failures.append(f"decisions differ on {round((1 - agree) * n)} of {n} chunks")
        if matched != total:
            report.failures.append(f"reply tokens differ on {total - matched} of {total}")
        if logits_diff > FP32_LOGITS_TOLERANCE:
            report.failures.append(f"logits differ by {logits_diff:.3g} > {FP32_LOGITS_TOLERANCE}")
    elif agree < MIN_DECISION_AGREEMENT:
        report.failures.append(f"decision agreement {100 * agree:.1f}% < {100 * MIN_DECISION_AGREEMENT:.0f}%")
    return report


@dataclass
class ReferenceRun:
    """TorchReference's side of a parity run, reusable across packages of one checkpoint."""

    mel: np.ndarray
    audio_embeds: np.ndarray
    trace: Trace
    max_reply_tokens: int


def reference_run(checkpoint_dir, n_chunks: int = 64, seed: int = 0, max_reply_tokens: int = MAX_REPLY_TOKENS,
                  audio: np.ndarray | None = None) -> ReferenceRun:
    """`audio` (16 kHz float32) replaces the synthetic stream, e.g. a recording with events."""
    from .reference import TorchReference

    reference = TorchReference(checkpoint_dir, max_reply_tokens=max_reply_tokens)
    mel = mel_chunks(synthetic_stream(n_chunks, seed) if audio is None else np.asarray(audio, np.float32))
    embeds = reference.encode(mel)
    return ReferenceRun(mel, embeds, run_protocol(reference, embeds, max_reply_tokens), max_reply_tokens)


def parity_report(checkpoint_dir, package_dir, n_chunks: int = 64, seed: int = 0,
                  reference: ReferenceRun | None = None, audio: np.ndarray | None = None) -> ParityReport:
    """Run both sides over the same `n_chunks` of synthetic audio (or `audio`) and compare them."""
    from listenloop.engine import Engine
    from listenloop.package import load_package

    package = load_package(package_dir)
    cap = package.manifest["sampling"]["max_reply_tokens"]
    if reference is None or reference.max_reply_tokens != cap:
        reference = reference_run(checkpoint_dir, n_chunks, seed, cap, audio)
    forced = ForcedChoices(reference.trace)
    # resets only when full: the reference's context is unbounded, so within the package's
    # capacity both sides see the same tokens
    engine = Engine(package, max_context=package.decoder["max_context"], sampler=forced, quiet_resets=False)
    pkg_embeds = engine.encode(reference.mel)
    encoder_diff = float(np.abs(reference.audio_embeds - pkg_embeds).max())
    pkg_trace = run_protocol(engine, pkg_embeds, cap)
    precision = f"{package.manifest['encoder']['precision']}/{package.decoder['precision']}"
    return compare(reference.trace, pkg_trace, forced, encoder_diff, precision)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m listenloop.export.parity", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint_dir")
    parser.add_argument("package_dir")
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--audio", nargs="+", metavar="FILE", help="recordings to run (concatenated) instead of synthetic audio")
    args = parser.parse_args(argv)
    audio = None
    if args.audio:
        from listenloop.audio import read_audio

        audio = np.concatenate([read_audio(f) for f in args.audio])
    report = parity_report(Path(args.checkpoint_dir), Path(args.package_dir), args.chunks, args.seed, audio=audio)
    print(report.table())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
