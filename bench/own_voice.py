"""The speaking device's closed loop with the demo model: replies spoken back through simulated
rooms (demo/kiosk.py, demo/rooms.py), against the same scenes with a silent device.

    python bench/own_voice.py [--streams 20] [--barge-in 30] [--json F]

Scenes: the four example recordings and `--streams` held-out demo streams (demo/streams.py,
evaluation split). Each scene runs once with a silent device (the reference replies), then with
its replies spoken at a speaker-to-microphone gain of -10, 0 and +6 dB and a bulk delay of 0,
120 and 250 ms (RT60 drawn per scene from 0.2-0.8 s), in three set-ups: no canceller; the
canceller with the own-voice bias off (playback_bias=0); the runtime's defaults (canceller and
own-voice policy). Counted: replies the silent run does not give (extra, per 10 minutes), those of them
decided while the device's own voice could echo (per set-up and speaker gain), and the silent
run's replies still given (same text within 2 s).

Barge-in: `--barge-in` scenes where a command is spoken while the device still speaks its
reply to a sound event (demo/kiosk.py, barge_in_scene), at 0 dB and 50 ms: the share of
commands answered right, with a silent device and with the set-ups above; once with the event's
reply the device's first playback ever (a cold canceller), once after the device greeted
(kiosk.OPENING, 5 s before the event: the canceller has met the room).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import listenloop  # noqa: E402
from demo import kiosk, streams  # noqa: E402
from demo.rooms import Room  # noqa: E402
from listenloop.protocol import SAMPLE_RATE  # noqa: E402

GAINS_DB = (-10.0, 0.0, 6.0)
DELAYS_S = (0.0, 0.12, 0.25)
SETUPS = {"no canceller": {"cancel": False, "playback_bias": 0.0},
          "canceller only": {"cancel": True, "playback_bias": 0.0},
          "default": {"cancel": True}}


def scenes(n_streams: int) -> list[tuple[str, np.ndarray]]:
    out = []
    for name in ("kitchen", "front_door", "living_room", "quiet_evening"):
        audio, rate = sf.read(ROOT / "examples" / f"{name}.wav", dtype="float32")
        assert rate == SAMPLE_RATE
        out.append((name, audio))
    for seed in range(n_streams):
        out.append((f"eval-{seed}", streams.make_stream(seed, "eval").audio))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--barge-in", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    print("command: python bench/own_voice.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    runtime = listenloop.Runtime()
    started = time.time()
    totals = {name: {"extra": 0, "extra_while_playing": 0, "kept": 0, "reference": 0, "seconds": 0.0, "examples": []}
              for name in SETUPS}
    # per set-up and speaker gain: replies decided while the device's own voice could echo, and seconds
    own_by_gain = {name: {f"{g:+.0f} dB": [0, 0.0] for g in GAINS_DB} for name in SETUPS}
    scene_list = scenes(args.streams)
    for i, (name, audio) in enumerate(scene_list):
        reference = kiosk.run(runtime, audio, None)
        rt60 = float(np.random.default_rng(i).uniform(0.2, 0.8))
        for gain, delay in itertools.product(GAINS_DB, DELAYS_S):
            room = Room(rt60, gain, delay, seed=i)
            for setup, options in SETUPS.items():
                result = kiosk.compare(reference, kiosk.run(runtime, audio, room, **options))
                t = totals[setup]
                t["extra"] += len(result.extra)
                t["extra_while_playing"] += sum(r.while_playing for r in result.extra)
                t["kept"] += result.kept
                t["reference"] += result.reference
                t["seconds"] += len(audio) / SAMPLE_RATE
                t["examples"] += [f"{name} {gain:+.0f} dB {1000 * delay:.0f} ms: {r.text!r} at {r.time_s:.1f} s"
                                  for r in result.extra]
                own = own_by_gain[setup][f"{gain:+.0f} dB"]
                own[0] += sum(r.while_playing for r in result.extra)
                own[1] += len(audio) / SAMPLE_RATE
    scene_minutes = sum(len(a) for _, a in scene_list) / SAMPLE_RATE / 60
    print(f"{len(scene_list)} scenes, {scene_minutes:.1f} min; each run with {len(GAINS_DB) * len(DELAYS_S)} rooms "
          f"({totals['default']['seconds'] / 60:.0f} min per set-up)")
    print(f"{'set-up':<16}{'extra replies':>14}{'per 10 min':>11}{'while playing':>14}{'kept':>12}")
    for setup, t in totals.items():
        print(f"{setup:<16}{t['extra']:>14}{600 * t['extra'] / t['seconds']:>11.2f}{t['extra_while_playing']:>14}"
              f"{t['kept']:>6}/{t['reference']:<4}{100 * t['kept'] / max(t['reference'], 1):>5.1f} %")
    print("replies to its own voice per 10 min, by speaker-to-microphone gain:")
    for setup, by_gain in own_by_gain.items():
        print(f"  {setup:<16}" + "".join(f"{gain}: {600 * n / max(sec, 1e-9):5.2f}   " for gain, (n, sec) in by_gain.items()))
    for line in totals["default"]["examples"]:
        print("  default, extra:", line)  # "while playing": decided while the device's own voice could echo

    barge = {}
    for warm in (False, True):
        lead, opening = (kiosk.OPENING_LEAD_S, kiosk.OPENING) if warm else (0.0, None)
        counts = {"silent device": 0, **{name: 0 for name in SETUPS}}
        for seed in range(args.barge_in):
            scene = kiosk.barge_in_scene(seed, lead)
            room = Room(0.4, 0.0, 0.05, seed=seed)
            counts["silent device"] += kiosk.answered(scene, kiosk.run(runtime, scene.audio, None))
            for setup, options in SETUPS.items():
                counts[setup] += kiosk.answered(scene, kiosk.run(runtime, scene.audio, room, opening=opening, **options))
        barge["after a greeting" if warm else "first playback"] = counts
    if args.barge_in:
        print(f"barge-in, {args.barge_in} commands spoken over the device's reply (0 dB, 50 ms), answered right:")
        print(f"{'':<18}" + "".join(f"{name:>16}" for name in counts))
        for when, counts in barge.items():
            print(f"{when:<18}" + "".join(f"{n:>9}/{args.barge_in} {100 * n / args.barge_in:>3.0f}%" for n in counts.values()))
    print(f"took {time.time() - started:.0f} s")
    if args.json:
        own = {setup: {gain: {"replies": n, "seconds": sec} for gain, (n, sec) in by_gain.items()}
               for setup, by_gain in own_by_gain.items()}
        args.json.write_text(json.dumps({"totals": totals, "own_voice_by_gain": own, "barge_in": barge,
                                         "scenes": len(scene_list), "scene_minutes": scene_minutes}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
