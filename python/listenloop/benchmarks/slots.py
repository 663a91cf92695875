"""Streams per decoder call (`measure_slot_streams`): how many streams one Model keeps in real time
when their steps share the slot decoder (docs/DESIGN.md, "Fixed-slot batching").

For each count N, a SlotPool of N slots on the Model's one slot-decoder session (a pool per N, so
each step costs what N slots cost) and N scripted streams, all fed at once as the batching
scheduler feeds them. A round stands for one 0.4 s chunk period: every stream's chunk arrives at
the same moment (the worst case for waiting), all N chunks are encoded in one call (the pool's
ChunkBatch, as the runtime encodes with slots), all N listening steps run as one step, and the
one stream whose script speaks this round (a different one each round) decodes its reply, one
step per token, the other slots idle.

    ttfr_ms            the speaking stream's chunk arrival -> its first reply token: the round's
                       encoder call, the shared listening step, the first reply step
    round_ms           the round's whole work: the encoder call, the listening step, the reply
    listening_step_ms  the encoder call and the shared listening step

A count is kept in real time when the p99 TTFR is at most `ttfr_limit_ms` and no round takes
longer than the chunk's 0.4 s; `streams_real_time` is the largest such count (0: none).
"""
from __future__ import annotations

import time

import numpy as np

from ..errors import Error
from ..protocol import CHUNK_SECONDS
from .stats import ms, summarize
from .streams import scripted_policy

STREAM_COUNTS = (1, 8, 32, 64, 128, 256)
TTFR_LIMIT_MS = 60.0


class _PoolModel:
    """The Model, with another SlotPool for the streams made over it: pools of several sizes on
    one loaded graph. Everything else is the Model's."""

    def __init__(self, model, pool):
        self._model, self.slot_pool = model, pool

    def __getattr__(self, name):
        return getattr(self._model, name)

    def new_cache(self, stream):
        from ..slot_pool import SlotCache

        return SlotCache(self.slot_pool, stream)


def _run_steps(pool, units: list) -> list:
    """Run the units (generators of the streams') to their ends, one shared call at a time, as
    the batching scheduler does (SlotPool.round); their results in order."""
    results = [None] * len(units)
    waiting = {}
    for i, unit in enumerate(units):
        try:
            waiting[i] = [unit, next(unit)]
        except StopIteration as done:
            results[i] = done.value
    while waiting:
        for i, value in pool.round(waiting).items():
            results[i] = value
    return results


def _listen(stream, mel: np.ndarray):
    """A session's listening unit: the chunk through the shared encoder call, then its step."""
    audio = yield from stream.cache.encode_steps(mel)
    return (yield from stream.listen_steps(audio))


def measure_count(model, n: int, mels: np.ndarray, rounds: int, reply_tokens: int, graph_id: int) -> dict:
    """One count: N streams over a pool of N slots, `rounds` timed rounds after one untimed
    round of prompt steps."""
    from ..slot_pool import SlotPool
    from ..stream import DecoderStream

    pool = SlotPool(model, n, graph_id=graph_id)
    view = _PoolModel(model, pool)
    # stream i may speak on its decision number d (from 1) when d % n == (i + 2) % n: after the
    # prompt round, one stream per round, in turn
    streams = [DecoderStream(view, model.policy(**scripted_policy(model.tokens, reply_tokens, n, i + 2)))
               for i in range(n)]
    try:
        _run_steps(pool, [_listen(s, mels[i % len(mels)]) for i, s in enumerate(streams)])
        for s in streams:
            s.end_reply()  # the prompt round is untimed: a script that spoke there stops at once
        ttfr, busy, steps_ms = [], [], []
        for r in range(rounds):
            t0 = time.perf_counter()
            results = _run_steps(pool, [_listen(s, mels[(r + 1 + i) % len(mels)]) for i, s in enumerate(streams)])
            steps_ms.append(ms(time.perf_counter() - t0))
            speakers = [i for i, result in enumerate(results) if result.spoke]
            if len(speakers) != 1:
                raise Error(f"{len(speakers)} streams spoke in round {r} of {n} streams; the script wants one")
            stream = streams[speakers[0]]
            while stream.speaking:  # the reply, one step per token; the other slots have no work
                _run_steps(pool, [stream.speak_steps()])
                if len(ttfr) == r:
                    ttfr.append(ms(time.perf_counter() - t0))
            busy.append(ms(time.perf_counter() - t0))
    finally:
        for s in streams:
            s.close()
    ttfr_s, busy_s = summarize(ttfr), summarize(busy)
    return {"streams": n, "ttfr_ms": ttfr_s, "round_ms": busy_s, "listening_step_ms": summarize(steps_ms),
            "rounds": rounds, "reply_tokens": reply_tokens}


def measure_slot_streams(model, mels: np.ndarray, counts=STREAM_COUNTS, rounds: int = 8, reply_tokens: int = 4,
                         ttfr_limit_ms: float = TTFR_LIMIT_MS, seconds: float | None = None, log=None) -> dict:
    """Every count in `counts` (ascending) on `model`, which must run the slot decoder (a profile
    with "slots" and a package exported with --slots). Counts stop at the first one that misses
    real time, or when `seconds` have passed; what was not measured is listed in `skipped`."""
    if not getattr(model, "slots", 0):
        raise Error("measure_slot_streams needs a Model on the slot decoder (a profile with \"slots\" and a "
                    "package exported with --slots)")
    say = log or (lambda *_: None)
    start = time.perf_counter()
    rows, skipped, kept = [], {}, 0
    for k, n in enumerate(sorted({int(c) for c in counts})):
        if seconds is not None and time.perf_counter() - start > seconds:
            skipped[str(n)] = "out of time"
            continue
        if rows and not rows[-1]["real_time"]:
            skipped[str(n)] = f"{rows[-1]['streams']} streams already missed real time"
            continue
        say(f"slot streams: {n}")
        row = measure_count(model, n, mels, rounds, reply_tokens, graph_id=100 + k)
        row["real_time"] = (row["ttfr_ms"]["p99"] <= ttfr_limit_ms and row["round_ms"]["max"] <= 1000 * CHUNK_SECONDS)
        if row["real_time"]:
            kept = n
        rows.append(row)
    return {"streams_real_time": kept, "ttfr_limit_ms": ttfr_limit_ms, "chunk_ms": 1000 * CHUNK_SECONDS,
            "counts": rows, "skipped": skipped, "capacity": model.capacity}
