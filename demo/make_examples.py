"""Write the held-out example recordings to examples/ (16 kHz mono int16 WAV, < 1 MB each) and
examples/expected_events.json with every event's time and the reply it should get.

  python -m demo.make_examples [--out examples]

The voices, seeds and level ranges are the evaluation split's, so the demo model never heard
these exact recordings. A reply is due right after chunk `reply_chunk` (streams.py's rule), i.e.
at `reply_due_s` = (reply_chunk + 1) × 0.4 s into the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import soundfile as sf

from listenloop.protocol import CHUNK_SECONDS, SAMPLE_RATE

from . import streams
from .dsp import seconds

# Clean channel for the examples: no clipping or resampling artefacts, no reverb.
EXAMPLE_SETTINGS = dataclasses.replace(streams.EVAL_SETTINGS, p_reverb=0.0, p_resample=0.0, p_clip=0.0,
                                       snr_db=(18.0, 24.0), foreground_db=(-22.0, -18.0))

# name -> (seed, stream seconds, background, [(kind, name, text or None, start second)])
EXAMPLES: dict[str, tuple[int, float, str, list[tuple[str, str, str | None, float]]]] = {
    "kitchen": (1, 22.0, "hum", [
        ("event", "smoke_alarm", None, 3.0),
        ("command", "lights_on", "turn on the lights", 14.0),
    ]),
    "front_door": (2, 20.0, "music", [
        ("event", "doorbell", None, 2.5),
        ("distractor", "distractor", "the library opens late on Wednesdays", 8.0),
        ("event", "knocking", None, 14.0),
    ]),
    "living_room": (3, 22.0, "pink", [
        ("command", "capabilities", "what can you help me with", 3.0),
        ("event", "phone_ring", None, 9.0),
        ("command", "stop", "okay stop", 17.0),
    ]),
    "quiet_evening": (4, 20.0, "babble", [
        ("distractor", "distractor", "there is a new bakery on the corner", 5.0),
        ("distractor", "distractor", "he repaired the roof before the storm", 12.0),
    ]),
}


def make_example(seed: int, seconds_long: float, background: str, script) -> streams.Stream:
    rng = np.random.default_rng([seed, 0xE8A])
    n_chunks = int(round(seconds_long / CHUNK_SECONDS))
    placed = [(streams.render_item(rng, kind, name, "eval", text), seconds(start)) for kind, name, text, start in script]
    for (a, sa), (b, sb) in zip(placed, placed[1:]):
        if sa + len(a.audio) + seconds(EXAMPLE_SETTINGS.gap_s[0]) > sb:
            raise ValueError(f"{a.name} (ends {(sa + len(a.audio)) / SAMPLE_RATE:.1f} s) runs into {b.name} "
                             f"at {sb / SAMPLE_RATE:.1f} s")
    return streams.mix_stream(rng, n_chunks, placed, "eval", EXAMPLE_SETTINGS, seed=seed, background=background)


def describe(stream: streams.Stream) -> dict:
    events = []
    for seg in stream.segments:
        entry = {"kind": seg.kind, "name": seg.name, "text": seg.text,
                 "start_s": round(seg.start / SAMPLE_RATE, 3), "end_s": round(seg.end / SAMPLE_RATE, 3)}
        if seg.reply is None:
            entry["expected"] = "silence"
        else:
            entry.update(expected="reply", emotion=seg.reply.emotion, reply=seg.reply.text,
                         reply_chunk=seg.reply_chunk, reply_due_s=round((seg.reply_chunk + 1) * CHUNK_SECONDS, 3))
        events.append(entry)
    return {"duration_s": stream.duration_s, "chunks": stream.n_chunks, "events": events}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "examples")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (seed, length, background, script) in EXAMPLES.items():
        stream = make_example(seed, length, background, script)
        path = args.out / f"{name}.wav"
        sf.write(path, stream.audio, SAMPLE_RATE, subtype="PCM_16")
        expected[path.name] = {"background": background, **describe(stream)}
        print(f"{path}: {stream.duration_s:.1f} s, {path.stat().st_size / 1e6:.2f} MB, "
              + ", ".join(f"{s.name}@{s.end / SAMPLE_RATE:.1f}s" for s in stream.segments))
    (args.out / "expected_events.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
