"""Echo cancellation alone: echo reduction (ERLE), re-convergence after the echo path
changes, near-end speech kept during double talk, and cost; listenloop's canceller (SpeexDSP's
MDF filter and residual-echo suppressor behind a bulk-delay estimate, csrc/echo_canceller.cpp)
side by side with WebRTC's AEC3 when LiveKit's wheel is installed (`pip install livekit`).

    python bench/echo.py [--seconds 12] [--json F]

Rooms (demo/rooms.py): every combination of RT60 0.2/0.4/0.6/0.8 s, speaker-to-microphone
gain -20/-10/0/+6 dB and bulk delay 0/50/120/250 ms, each playing speech (the demo's replies in
the device's espeak-ng voice) and music (demo/backgrounds.py), with microphone noise 40 dB
below the echo. Figures:

- ERLE: 10 log10 of echo energy over residual energy, on the 10 ms frames where the echo is
  above half its median energy, from 2 s after playback starts to the end;
- re-convergence: the room changes (new delay, gain and tail) half-way; the time from the
  change until a 0.5 s window's ERLE is back within 3 dB of the final second's (0.1 s steps);
- double talk: a held-out voice talks over the echo from the middle on; near-end attenuation
  is 10 log10 of the near-end energy over the output energy in those frames (0 dB: intact);
- cost: processing time per 0.4 s chunk, as a share of one core.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo import backgrounds, kiosk, speech, tasks  # noqa: E402
from demo.dsp import set_rms  # noqa: E402
from demo.rooms import Echo, Room, noise_at_snr  # noqa: E402
from listenloop import _core  # noqa: E402
from listenloop.protocol import CHUNK_SAMPLES, SAMPLE_RATE  # noqa: E402

FRAME = SAMPLE_RATE // 100
CONVERGENCE_S = 2.0


def listenloop_canceller():
    canceller = _core.EchoCanceller()
    return lambda mic, ref: canceller.process(mic, ref)


def aec3_canceller():
    """WebRTC AEC3 through LiveKit's AudioProcessingModule (10 ms int16 frames), or None."""
    try:
        from livekit import rtc
    except ImportError:
        return None
    apm = rtc.AudioProcessingModule(echo_cancellation=True)

    def process(mic, ref):
        to16 = lambda x: np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)  # noqa: E731
        m16, r16 = to16(mic), to16(ref)
        out = np.zeros(len(m16) // FRAME * FRAME, np.int16)
        for i in range(0, len(out), FRAME):
            apm.process_reverse_stream(rtc.AudioFrame(r16[i:i + FRAME].tobytes(), SAMPLE_RATE, 1, FRAME))
            apm.set_stream_delay_ms(0)  # no delay hint: AEC3 estimates the delay itself
            frame = rtc.AudioFrame(m16[i:i + FRAME].tobytes(), SAMPLE_RATE, 1, FRAME)
            apm.process_stream(frame)
            out[i:i + FRAME] = np.frombuffer(frame.data, np.int16)
        return out.astype(np.float32) / 32767

    return process


CANCELLERS = {"listenloop": listenloop_canceller, "webrtc-aec3": aec3_canceller}


def frame_energy(x: np.ndarray) -> np.ndarray:
    x = x[: len(x) // FRAME * FRAME].astype(np.float64)
    return (x.reshape(-1, FRAME) ** 2).mean(axis=1)


def erle_db(echo: np.ndarray, out: np.ndarray) -> float:
    e, o = frame_energy(echo), frame_energy(out[: len(echo)])
    n = min(len(e), len(o))
    e, o = e[:n], o[:n]
    active = e > 0.5 * np.median(e[e > 0]) if np.any(e > 0) else np.zeros(n, bool)
    return float(10 * np.log10(e[active].sum() / max(o[active].sum(), 1e-20)))


def device_speech_signal(seconds: float) -> np.ndarray:
    texts = [r.text for r in tasks.REPLIES]
    parts, total = [], 0
    for i in itertools.count():
        part = kiosk.device_speech(texts[i % len(texts)])
        parts += [part, np.zeros(SAMPLE_RATE // 5, np.float32)]
        total += len(part) + SAMPLE_RATE // 5
        if total >= seconds * SAMPLE_RATE:
            break
    return np.concatenate(parts)[: int(seconds * SAMPLE_RATE)]


def music_signal(seconds: float, seed: int) -> np.ndarray:
    return set_rms(backgrounds.music(np.random.default_rng(seed), int(seconds * SAMPLE_RATE)), kiosk.DEVICE_RMS)


def through(room: Room, played: np.ndarray) -> np.ndarray:
    return Echo(room).push(played)


def measure_room(make, room: Room, played: np.ndarray, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    echo = through(room, played)
    mic = np.clip(echo + noise_at_snr(rng, echo, kiosk.NOISE_SNR_DB, len(echo)), -1, 1).astype(np.float32)
    process = make()
    started = time.perf_counter()
    out = process(mic, played)
    elapsed = time.perf_counter() - started
    start = int(CONVERGENCE_S * SAMPLE_RATE)
    chunks = len(played) / CHUNK_SAMPLES
    return {"erle_db": erle_db(echo[start:], out[start:]), "core_share": elapsed / chunks / (CHUNK_SAMPLES / SAMPLE_RATE),
            "ms_per_chunk": 1000 * elapsed / chunks}


def reconvergence_s(make, first: Room, second: Room, played: np.ndarray, seed: int) -> float:
    rng = np.random.default_rng(seed)
    half = len(played) // 2 // FRAME * FRAME
    echo = np.concatenate([through(first, played)[:half], through(second, played)[half:]])
    mic = np.clip(echo + noise_at_snr(rng, echo, kiosk.NOISE_SNR_DB, len(echo)), -1, 1).astype(np.float32)
    out = make()(mic, played)
    window, step = SAMPLE_RATE // 2, SAMPLE_RATE // 10
    final = erle_db(echo[-SAMPLE_RATE:], out[len(out) - SAMPLE_RATE:len(out)])
    for t in range(half, len(out) - window, step):
        if erle_db(echo[t:t + window], out[t:t + window]) >= final - 3.0:
            return (t - half) / SAMPLE_RATE
    return float("inf")


def near_end_attenuation_db(make, room: Room, played: np.ndarray, near: np.ndarray, seed: int) -> float:
    rng = np.random.default_rng(seed)
    echo = through(room, played)
    half = len(played) // 2
    talk = np.zeros_like(echo)
    talk[half:half + len(near)] = near[: len(echo) - half]
    mic = np.clip(echo + talk + noise_at_snr(rng, echo, kiosk.NOISE_SNR_DB, len(echo)), -1, 1).astype(np.float32)
    out = make()(mic, played)
    t, o = frame_energy(talk), frame_energy(out)
    n = min(len(t), len(o))
    active = t[:n] > 0.5 * np.median(t[:n][t[:n] > 0])
    return float(10 * np.log10(t[:n][active].sum() / max(o[:n][active].sum(), 1e-20)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="playback per room")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    print("command: python bench/echo.py " + " ".join(argv if argv is not None else sys.argv[1:]))

    signals = {"speech": device_speech_signal(args.seconds), "music": music_signal(args.seconds, 7)}
    near = set_rms(speech.render("Could you please turn the lights off in the kitchen, and set a timer for me",
                                 speech.Voice("en-gb-scotland", "m4", 150, 40)), kiosk.DEVICE_RMS)
    contenders = {name: make for name, make in CANCELLERS.items() if make() is not None}
    rooms = [Room(rt60, gain, delay, seed=i) for i, (rt60, gain, delay) in
             enumerate(itertools.product((0.2, 0.4, 0.6, 0.8), (-20.0, -10.0, 0.0, 6.0), (0.0, 0.05, 0.12, 0.25)))]
    results = {name: {"erle_db": [], "core_share": [], "ms_per_chunk": [], "reconvergence_s": [],
                      "near_end_attenuation_db": []} for name in contenders}
    for i, room in enumerate(rooms):
        for kind, played in signals.items():
            for name, make in contenders.items():  # interleaved: the same machine state for both
                figures = measure_room(make, room, played, seed=i)
                for key, value in figures.items():
                    results[name][key].append(value)
        moved = Room(room.rt60_s, room.gain_db - 3.0, (room.delay_s + 0.07) % 0.25, seed=room.seed + 1000)
        for name, make in contenders.items():
            results[name]["reconvergence_s"].append(reconvergence_s(make, room, moved, signals["speech"], seed=i))
            results[name]["near_end_attenuation_db"].append(
                near_end_attenuation_db(make, room, signals["speech"], near, seed=i))
    summary = {}
    for name, r in results.items():
        erle = r["erle_db"]
        per_signal = {kind: erle[i::len(signals)] for i, kind in enumerate(signals)}  # rooms x signals, in order
        summary[name] = {
            "rooms": len(rooms), "signals": list(signals),
            "erle_db_median": statistics.median(erle), "erle_db_p10": float(np.percentile(erle, 10)),
            **{f"erle_db_median_{kind}": statistics.median(values) for kind, values in per_signal.items()},
            "erle_db_median_speech_no_delay": statistics.median(
                [e for e, room in zip(per_signal["speech"], rooms) if room.delay_s == 0.0]),
            "erle_db_median_speech_delayed": statistics.median(
                [e for e, room in zip(per_signal["speech"], rooms) if room.delay_s > 0.0]),
            "erle_db_min": min(erle),
            "reconvergence_s_median": statistics.median(r["reconvergence_s"]),
            "reconvergence_s_p90": float(np.percentile(r["reconvergence_s"], 90)),
            "near_end_attenuation_db_median": statistics.median(r["near_end_attenuation_db"]),
            "near_end_attenuation_db_p90": float(np.percentile(r["near_end_attenuation_db"], 90)),
            "ms_per_chunk_median": statistics.median(r["ms_per_chunk"]),
            "core_share_median": statistics.median(r["core_share"]),
        }
    print(f"{'':<14}{'ERLE med':>9}{'p10':>7}{'min':>7}{'reconv med':>11}{'p90':>6}{'near-end med':>13}{'p90':>6}"
          f"{'ms/chunk':>9}{'% core':>8}")
    for name, s in summary.items():
        print(f"{name:<14}{s['erle_db_median']:>9.1f}{s['erle_db_p10']:>7.1f}{s['erle_db_min']:>7.1f}"
              f"{s['reconvergence_s_median']:>11.1f}{s['reconvergence_s_p90']:>6.1f}"
              f"{s['near_end_attenuation_db_median']:>13.1f}{s['near_end_attenuation_db_p90']:>6.1f}"
              f"{s['ms_per_chunk_median']:>9.2f}{100 * s['core_share_median']:>8.2f}")
    print(f"{'ERLE medians':<14}{'speech':>9}{'music':>7}{'speech, no delay':>18}{'speech, delayed':>17}")
    for name, s in summary.items():
        print(f"{name:<14}{s['erle_db_median_speech']:>9.1f}{s['erle_db_median_music']:>7.1f}"
              f"{s['erle_db_median_speech_no_delay']:>18.1f}{s['erle_db_median_speech_delayed']:>17.1f}")
    if args.json:
        rooms_json = [{"rt60_s": r.rt60_s, "gain_db": r.gain_db, "delay_s": r.delay_s} for r in rooms]
        args.json.write_text(json.dumps({"summary": summary, "rooms": rooms_json, "per_room": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
