"""Every figure of `listenloop bench` in one run, in order, on one Runtime (`run`)."""
from __future__ import annotations

import os

from ..errors import Error
from ..protocol import CHUNK_SECONDS
from .inputs import chunk_mels, synthetic_audio
from .latency import (measure_catch_up, measure_context, measure_listening, measure_precisions, measure_reply,
                      measure_scheduler, measure_session, measure_startup)
from .machine import environment, peak_rss_mb, rss_mb
from .pytorch import compare_torch
from .sessions import measure_sessions
from .streams import ALWAYS_SPEAK, listening_stream


def with_threads(profile, threads: int):
    """The profile with `threads` ORT intra-op threads (the PyTorch side uses as many)."""
    import dataclasses

    from ..profiles import load_profile

    if threads < 1:
        raise Error(f"--threads must be >= 1, got {threads}")
    base = load_profile(profile)
    return dataclasses.replace(base, name=f"{base.name}-{threads}t",
                               session={**base.session, "intra_op_num_threads": threads})


def run(package=None, profile="cpu", *, chunks: int = 200, reply_tokens: int = 64, rounds: int = 30,
        context_lengths=(500, 2000, 4000), context_steps: int = 20, session_chunks: int = 25,
        speak_every: int = 1, catch_up_chunks: int = 8, sessions=(), recording=None, sessions_only: bool = False,
        precision_packages=(), torch_checkpoint=None, threads: int | None = None, command: str | None = None,
        log=print) -> dict:
    """Every figure; `log` gets a line per phase (None: silent). `sessions`: session counts of
    the multi-session run (empty: skipped); `sessions_only`: only start-up and that run.
    `command` is recorded as the command line of the run (default: this call, spelled out)."""
    say = log or (lambda *_: None)
    if command is None:
        command = ("listenloop.benchmarks.suite.run(" + ", ".join(f"{k}={v!r}" for k, v in (
            ("package", package), ("profile", profile), ("chunks", chunks), ("reply_tokens", reply_tokens),
            ("rounds", rounds), ("context_lengths", tuple(context_lengths)), ("context_steps", context_steps),
            ("session_chunks", session_chunks), ("speak_every", speak_every), ("catch_up_chunks", catch_up_chunks),
            ("sessions", tuple(sessions)), ("recording", recording), ("sessions_only", sessions_only),
            ("precision_packages", tuple(precision_packages)), ("torch_checkpoint", torch_checkpoint),
            ("threads", threads))) + ")")
    if threads is not None:
        profile = with_threads(profile, threads)
    startup, runtime = measure_startup(package, profile)
    model = runtime.model
    try:
        results = {"command": command, "environment": environment(model), "startup": startup,
                   "method": {"speak_bias_listening": ALWAYS_SPEAK, "speak_bias_replies": ALWAYS_SPEAK,
                              "listening": "scripted never to speak, p_speak held near 1: "
                                           "no quiet-moment context resets",
                              "replies": "scripted: best non-control token, TEXT_END after reply_tokens tokens",
                              "audio": "synthetic (seeded noise + tones)",
                              "sessions": "the package's own policy on a recording"}}
        if not sessions_only:
            say(f"listening: {chunks} chunks")
            mels_all = chunk_mels(synthetic_audio(CHUNK_SECONDS * chunks, seed=0))
            mels = mels_all[:64]  # the chunks the reply, context and PyTorch figures cycle through
            results["listening"] = measure_listening(model, mels_all, listening_stream(model, reply_tokens))
            say("scheduler")
            results["scheduler_ms"] = measure_scheduler(min(chunks, 50))
            say(f"replies: {rounds} x {reply_tokens} tokens")
            results["reply"] = measure_reply(model, mels, rounds, reply_tokens)
            say(f"catch-up: {catch_up_chunks} chunks after each reply")
            results["catch_up"] = measure_catch_up(model, mels, max(3, rounds // 3), reply_tokens, catch_up_chunks)
            say(f"context scaling: {list(context_lengths)}")
            results["context"] = measure_context(model, mels, context_lengths, context_steps, reply_tokens)
            rep = results["reply"]
            split = {"scheduler": results["scheduler_ms"]["median"], "encoder": rep["encoder_ms"]["median"],
                     "listen": rep["listen_ms"]["median"], "first_token": rep["first_token_ms"]["median"]}
            results["ttfr_split_ms"] = split
            results["ttfr_components_sum_ms"] = sum(split.values())
            if session_chunks:
                say(f"end-to-end session: {session_chunks} chunks in real time "
                    f"({session_chunks * CHUNK_SECONDS:.0f} s)")
                results["session"] = measure_session(runtime, session_chunks, min(reply_tokens, 16), speak_every)
        # memory before more sessions, other packages and torch: the model, its streams and one session
        results["memory"] = {"peak_rss_mb_at_start": startup["peak_rss_mb"], "peak_rss_mb_after_stream": peak_rss_mb(),
                             "rss_mb_after_stream": rss_mb()}
        if sessions:
            say(f"several sessions on one Runtime: {', '.join(str(n) for n in sessions)}")
            results["sessions"] = measure_sessions(runtime, sessions, recording=recording, log=say)
        if precision_packages and not sessions_only:
            say(f"precisions: {len(precision_packages)} packages")
            results["precisions"] = measure_precisions(precision_packages, profile, min(chunks, 100))
        if torch_checkpoint and not sessions_only:
            say("PyTorch side by side")
            threads = model.decoder.get_session_options().intra_op_num_threads or os.cpu_count()
            results["torch"] = compare_torch(model, torch_checkpoint, mels, rounds, threads)
    finally:
        runtime.close()
    results["environment"]["load_average_end"] = list(os.getloadavg())
    return results
