"""Load on `listenloop serve`: N clients streaming the example recordings in real time.

    python bench/serve_load.py --clients 1,4,16,32 --seconds 60 [--replicas N] [--json load.json] [--plot load.png]

Starts `listenloop serve` (the embedded demo model) on a free loopback port in its own
process (with --replicas N: `listenloop serve --replicas N`, N replicas on a local Ray Serve,
which needs listenloop[cluster]), then for each N opens N `/v1/pcm` WebSockets that each stream the four example
recordings back to back (looped to `--seconds`) in 0.1 s float32 frames at real-time pace, and
read every event. Per client: TTFR = from sending the frame that completes the chunk a reply
answers to receiving that reply's first TextDelta. Reported: TTFR p50/p99 over all replies,
lost audio (AudioDropped samples, EventsDropped), the server's CPU use (share of one core)
and RSS at the end of each run, over the server's process and all its descendants (with Ray:
its head, proxy, controller and replicas).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from listenloop.protocol import CHUNK_SAMPLES, SAMPLE_RATE

ROOT = Path(__file__).resolve().parent.parent
FRAME_S = 0.1


def _program(seconds: float) -> np.ndarray:
    import soundfile as sf

    parts = [sf.read(p, dtype="float32")[0] for p in sorted((ROOT / "examples").glob("*.wav"))]
    one = np.concatenate(parts)
    reps = int(np.ceil(seconds * SAMPLE_RATE / len(one)))
    return np.concatenate([one] * reps)[: int(seconds * SAMPLE_RATE)]


def _start_server(port: int, max_sessions: int, replicas: int | None) -> subprocess.Popen:
    """`listenloop serve` in its own process, once it says it is serving (every replica has
    loaded its model); its stderr is drained from then on, so Ray's logs never block it."""
    command = [sys.executable, "-m", "listenloop", "serve", "--port", str(port), "--max-sessions", str(max_sessions)]
    if replicas is not None:
        command += ["--replicas", str(replicas)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    said = []
    for line in server.stderr:
        said.append(line)
        if line.startswith("listenloop: serving"):
            threading.Thread(target=server.stderr.read, daemon=True).start()
            return server
    server.wait(30)
    raise SystemExit(f"listenloop serve ended ({server.returncode}) before serving:\n{''.join(said[-20:])}")


def _tree(proc) -> list:
    """The process and its descendants now."""
    import psutil

    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return [proc]


def _cpu_seconds(procs) -> float:
    import psutil

    total = 0.0
    for p in procs:
        try:
            total += sum(p.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def _rss_mb(procs) -> float:
    import psutil

    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _client(url: str, audio: np.ndarray, start_at: float) -> dict:
    import aiohttp

    frame = int(FRAME_S * SAMPLE_RATE)
    sent_at = {}  # samples sent so far -> monotonic time of that frame
    ttfr, dropped, events_dropped, replies = [], 0, 0, 0
    pending_chunk = None
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
        ready = json.loads((await ws.receive()).data)
        assert ready["event"] == "Ready", ready

        async def reader():
            nonlocal pending_chunk, dropped, events_dropped, replies
            async for msg in ws:
                event = json.loads(msg.data)
                kind = event["event"]
                if kind == "ReplyStarted":
                    pending_chunk = event["chunk"]
                elif kind == "TextDelta" and pending_chunk is not None:
                    done = (pending_chunk + 1) * CHUNK_SAMPLES
                    sent = min((t for n, t in sent_at.items() if n >= done), default=None)
                    if sent is not None:
                        ttfr.append(1000 * (time.monotonic() - sent))
                    pending_chunk = None
                elif kind == "ReplyEnded":
                    replies += 1
                elif kind == "AudioDropped":
                    dropped += event["samples"]
                elif kind == "EventsDropped":
                    events_dropped += event["count"]
                elif kind in ("Finished", "Error"):
                    return

        task = asyncio.create_task(reader())
        for i, start in enumerate(range(0, len(audio), frame)):
            delay = start_at + i * FRAME_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send_bytes(audio[start:start + frame].astype("<f4").tobytes())
            sent_at[start + len(audio[start:start + frame])] = time.monotonic()
        await ws.send_str(json.dumps({"type": "finish"}))
        await asyncio.wait_for(task, 60)
    return {"ttfr_ms": ttfr, "dropped_samples": dropped, "events_dropped": events_dropped, "replies": replies}


async def _run(port: int, n: int, audio: np.ndarray) -> list:
    url = f"http://127.0.0.1:{port}/v1/pcm?rate={SAMPLE_RATE}&format=f32"
    start = time.monotonic() + 0.5
    # clients start 0.1 s apart, as real users would not all begin on the same frame
    return await asyncio.gather(*[_client(url, audio, start + 0.1 * (i % 4) / 4) for i in range(n)])


def main(argv=None) -> int:
    import psutil

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,4,16,32")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--replicas", type=int, metavar="N",
                   help="serve through Ray Serve with N replicas, --max-sessions per replica as for one process "
                        "(default: the single-process server)")
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    audio = _program(args.seconds)
    port = _free_port()
    server = _start_server(port, max(counts) + 1, args.replicas)
    try:
        proc = psutil.Process(server.pid)
        rows = []
        for n in counts:
            procs = _tree(proc)
            cpu0, t0 = _cpu_seconds(procs), time.monotonic()
            results = asyncio.run(_run(port, n, audio))
            cpu = (_cpu_seconds(procs) - cpu0) / (time.monotonic() - t0)
            ttfr = [t for r in results for t in r["ttfr_ms"]]
            rows.append({"clients": n, "seconds": args.seconds, "replicas": args.replicas,
                         "replies": sum(r["replies"] for r in results),
                         "ttfr_p50_ms": float(np.percentile(ttfr, 50)) if ttfr else None,
                         "ttfr_p99_ms": float(np.percentile(ttfr, 99)) if ttfr else None,
                         "dropped_samples": sum(r["dropped_samples"] for r in results),
                         "events_dropped": sum(r["events_dropped"] for r in results),
                         "server_cpu_cores": cpu, "server_rss_mb": _rss_mb(_tree(proc))})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(60)  # (with Ray: the application deleted and Ray stopped)
    print(f"{'clients':>8} {'replies':>8} {'TTFR p50 ms':>12} {'p99 ms':>8} {'lost samples':>13} {'lost events':>12} "
          f"{'server CPU (cores)':>19} {'server RSS MB':>14}")
    for r in rows:
        print(f"{r['clients']:8d} {r['replies']:8d} {r['ttfr_p50_ms']:12.1f} {r['ttfr_p99_ms']:8.1f} "
              f"{r['dropped_samples']:13d} {r['events_dropped']:12d} {r['server_cpu_cores']:19.2f} {r['server_rss_mb']:14.1f}")
    command = "python bench/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        xs = [r["clients"] for r in rows]
        a.plot(xs, [r["ttfr_p50_ms"] for r in rows], "o-", label="p50")
        a.plot(xs, [r["ttfr_p99_ms"] for r in rows], "s--", label="p99")
        a.set(xscale="log", xticks=xs, xticklabels=xs, xlabel="clients streaming in real time",
              ylabel="TTFR over the socket (ms)", title="reply latency")
        a.legend()
        b.bar([str(x) for x in xs], [r["server_cpu_cores"] for r in rows])
        b.set(xlabel="clients", ylabel="server CPU (cores)", title="server load")
        shown = f", {args.replicas} replicas on Ray Serve" if args.replicas else ""
        fig.suptitle(f"listenloop serve{shown}, demo model, {os.cpu_count()} vCPUs, {args.seconds:.0f} s per run")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
