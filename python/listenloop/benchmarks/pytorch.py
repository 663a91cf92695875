"""The PyTorch reference side by side with listenloop on the same chunks (`--compare-torch`).

torch is imported only when compare_torch is called.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from ..errors import Error
from ..protocol import STEP
from ..sampling import Sampler, SamplingConfig
from .stats import ms, summarize
from .streams import replying_stream


def compare_torch(model, checkpoint, mels: np.ndarray, rounds: int, threads: int) -> dict:
    """TorchReference vs `model` on the same chunks: step time, TTFR-equivalent, decisions.

    Decisions use each side's own greedy choice (a stream with speak_bias 0 and a greedy
    sampler; the reference is greedy); a chunk both decide to speak on gets a reply on both
    (up to 8 tokens) before listening goes on. The run stays below the point where the
    stream's context policy could rebuild its cache, which the reference does not do. The
    TTFR-equivalent forces TEXT_BEGIN on both sides (a scripted stream with speak_bias +50
    whose every second decision speaks; the reference is put in the same state it reaches
    when it decides to speak) and times encoder + listen + first reply token.
    """
    try:
        import torch

        from ..export.reference import TorchReference
    except ImportError as exc:
        raise Error(f"--compare-torch needs torch and transformers (pip install listenloop[export]): {exc}") from None
    torch.set_num_threads(threads)
    reference = TorchReference(checkpoint, max_context=model.capacity)
    tokens = reference.tokens

    def forced_speak(ref):
        ref._previous, ref._speaking = tokens["TEXT_BEGIN"], True  # what listen() sets on a speak decision

    greedy = model.stream(speak_bias=0.0, sampler=Sampler(SamplingConfig()))
    ours_side = SimpleNamespace(reset=greedy.reset, listen=greedy.listen, speak=greedy.speak, encode=model.encode)
    # Decisions and listening steps: each side on its own (two thread pools spinning on the
    # same cores would slow both), same chunks, each side's own greedy decisions. A chunk adds
    # at most STEP + 9 tokens (its step, an 8-token reply and TEXT_END).
    n = max(2, min(len(mels), (greedy.context.quiet_from - len(model.prefix_ids)) // (STEP + 9)))

    def stream(side):
        side.reset()
        decisions, times = [], []
        for i in range(n):
            t0 = time.perf_counter()
            result = side.listen(side.encode(mels[i][None])[0])
            if i:  # the first step also feeds the prompt prefix
                times.append(ms(time.perf_counter() - t0))
            decisions.append(bool(result.spoke))
            if result.spoke:
                for _ in side.speak(8):
                    pass
        return decisions, times

    ours_decisions, ours_ms = stream(ours_side)
    theirs_decisions, theirs_ms = stream(reference)
    agree = 0
    for a, b in zip(ours_decisions, theirs_decisions):
        if a != b:
            break  # the two contexts differ from here on
        agree += 1
    decisions = len(ours_decisions)
    both_spoke = sum(a and b for a, b in zip(ours_decisions[:agree], theirs_decisions[:agree]))

    speaker = replying_stream(model, 1, speak_every=2)  # each round: a silent step, then TEXT_BEGIN
    ours_ttfr, theirs_ttfr = [], []
    for r in range(rounds):
        first, second = mels[r % len(mels)][None], mels[(r + 1) % len(mels)][None]
        speaker.reset()
        speaker.listen(model.encode(first)[0])
        t0 = time.perf_counter()
        if not speaker.listen(model.encode(second)[0]).spoke:
            raise Error("speak_bias +50 did not make the model speak")
        reply = speaker.speak(2)
        next(reply)
        ours_ttfr.append(ms(time.perf_counter() - t0))
        reply.close()
    for r in range(rounds):
        first, second = mels[r % len(mels)][None], mels[(r + 1) % len(mels)][None]
        reference.reset()
        if reference.listen(reference.encode(first)[0]).spoke:
            for _ in reference.speak(1):
                pass
        t0 = time.perf_counter()
        if not reference.listen(reference.encode(second)[0]).spoke:
            forced_speak(reference)
        reply = reference.speak(1)
        next(reply)
        theirs_ttfr.append(ms(time.perf_counter() - t0))
        reply.close()
    ours, theirs = summarize(ours_ms), summarize(theirs_ms)
    ours_t, theirs_t = summarize(ours_ttfr), summarize(theirs_ttfr)
    return {"checkpoint": str(checkpoint), "torch": torch.__version__, "torch_threads": threads,
            "listen_step_ms": {"listenloop": ours, "torch": theirs},
            "ttfr_equivalent_ms": {"listenloop": ours_t, "torch": theirs_t},
            "step_speedup": theirs["median"] / ours["median"], "ttfr_speedup": theirs_t["median"] / ours_t["median"],
            "decisions": decisions, "decisions_agree": agree, "both_spoke": both_spoke,
            "decision_agreement": agree / decisions}
