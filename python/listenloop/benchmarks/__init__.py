"""Latency, throughput and memory figures of one model package on this machine (`listenloop bench`).

One job per module; each imports only the ones listed above it, none imports back:

    stats      milliseconds; median / p90 / p99 of a list of them
    machine    CPU, memory, RSS, software and package of a run
    inputs     seeded synthetic audio, its chunk log-mels, a recording (examples/kitchen.wav)
    streams    the shared Model and scripted streams and policies (ScriptedReplies)
    latency    one stream: start-up, listening step, TTFR by stage and end to end, catch-up,
               step against context, step per precision
    sessions   several sessions on one Runtime: throughput and identical events
    pytorch    the PyTorch reference side by side (torch imported only there, only when called)
    soak       one session fed many simulated hours (`--soak`)
    suite      every figure in one run (`run`)
    report     the printed tables and the comparison with a previous run's JSON
    plots      the PNG (matplotlib)
    command    the `listenloop bench` options and what they run

Every single-stream figure is measured on synthetic audio (seeded noise and tones), so nothing is
downloaded; the multi-session figure and the soak feed recordings. Each distribution is
summarised by median, p90 and p99. A stream's policy is fixed when it is created
(stream.Policy), so every measurement creates the streams it needs over one shared Model (a
stream costs only its KV cache).
"""
