"""A speaking device in a simulated room, closed loop: every reply is spoken by a TTS voice
through the device's speaker, heard back at its microphone through a Room (demo/rooms.py) on
top of the scene, and fed to the session as the playback reference when the device cancels
echo. Used by bench/own_voice.py and tests/test_own_voice.py.

Deterministic: audio goes in 20 ms blocks (the reference block before the microphone block it
plays over, as a duplex audio callback does), and after each chunk the loop waits for the
chunk's decision and, if it spoke, its reply, which starts playing at the next block (a device
with an instant TTS). A new reply interrupts the one still playing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from listenloop import Decision, ReplyEnded
from listenloop.protocol import CHUNK_SAMPLES, SAMPLE_RATE

from . import speech
from .dsp import set_rms
from .rooms import Echo, Room, noise_at_snr

BLOCK = SAMPLE_RATE // 50  # 20 ms, a typical audio callback
DEVICE_VOICE = speech.Voice("en-us", "", 165, 50)  # the device's TTS voice
DEVICE_RMS = 0.05  # speech level the device plays at, -26 dBFS (before the room's gain)
NOISE_SNR_DB = 40.0  # microphone self-noise below the echo
MATCH_SECONDS = 2.0  # a reply "is the same" as one given without a speaker within this time
ECHO_TAIL_S = 0.55  # how long after the speaker stops its echo may still reach the microphone


@dataclass(frozen=True)
class Reply:
    time_s: float  # end of the chunk it answered
    text: str
    while_playing: bool  # the device's speech (or its echo's tail) reached the chunk it answered


def device_speech(text: str) -> np.ndarray:
    return set_rms(speech.render(text, DEVICE_VOICE), DEVICE_RMS)


def run(runtime, scene: np.ndarray, room: Room | None, *, cancel: bool = True, seed: int = 0,
        opening: str | None = None, **policy) -> list[Reply]:
    """The replies of one session over `scene` (16 kHz float32), speaking them into `room`
    (None: the device is silent); `cancel` feeds the reference to the session's canceller;
    `opening`: a text the device says as the scene starts (a kiosk's greeting)."""
    scene = np.asarray(scene, np.float32)
    n_chunks = -(-len(scene) // CHUNK_SAMPLES)
    padded = np.zeros(n_chunks * CHUNK_SAMPLES, np.float32)
    padded[: len(scene)] = scene
    echo = Echo(room) if room is not None else None
    rng = np.random.default_rng(seed)
    speaking, cursor = np.zeros(0, np.float32), 0
    sounded_until = -1  # one past the last sample the speaker played sound at
    if opening is not None and echo is not None:
        speaking = device_speech(opening)
    replies: list[Reply] = []
    with runtime.session(echo_cancellation=cancel, **policy) as session:
        for k in range(n_chunks):
            for start in range(k * CHUNK_SAMPLES, (k + 1) * CHUNK_SAMPLES, BLOCK):
                play = np.zeros(BLOCK, np.float32)
                part = speaking[cursor:cursor + BLOCK]
                play[: len(part)] = part
                cursor += len(part)
                if np.any(play):
                    sounded_until = start + BLOCK
                mic = padded[start:start + BLOCK]
                if echo is not None:
                    heard = echo.push(play)
                    mic = mic + heard + noise_at_snr(rng, heard, NOISE_SNR_DB, BLOCK) * (np.abs(heard).max() > 0)
                    if cancel:
                        session.accept_playback(play)
                session.accept_waveform(np.clip(mic, -1.0, 1.0))
            text = _decide(session, k)
            if text is not None:
                playing = sounded_until > k * CHUNK_SAMPLES - int(ECHO_TAIL_S * SAMPLE_RATE)
                replies.append(Reply((k + 1) * CHUNK_SAMPLES / SAMPLE_RATE, text, playing))
                if echo is not None:
                    speaking, cursor = device_speech(text), 0  # interrupts what is still playing
        session.finish()
    return replies


def _decide(session, chunk: int) -> str | None:
    """Waits for `chunk`'s decision (and its reply if it spoke): the reply text, or None."""
    decision = None
    for event in session.events(timeout=None):
        if isinstance(event, Decision) and event.chunk == chunk:
            decision = event
            if not event.spoke:
                return None
        elif isinstance(event, ReplyEnded) and decision is not None:
            return event.text
    raise RuntimeError(f"the session ended before chunk {chunk} was decided")


@dataclass(frozen=True)
class Comparison:
    reference: int  # replies without a speaker
    kept: int  # ... also given with the speaker (same text within MATCH_SECONDS)
    extra: list  # replies with the speaker that the run without one does not give


def compare(reference: list[Reply], loop: list[Reply]) -> Comparison:
    unmatched = list(reference)
    extra = []
    for reply in loop:
        match = next((r for r in unmatched if r.text == reply.text and abs(r.time_s - reply.time_s) <= MATCH_SECONDS),
                     None)
        if match is None:
            extra.append(reply)
        else:
            unmatched.remove(match)
    return Comparison(len(reference), len(reference) - len(unmatched), extra)


# --- scenes --------------------------------------------------------------------------------

BARGE_IN_EVENTS = ("doorbell", "knocking", "phone_ring", "kettle_whistle", "glass_break")
BARGE_IN_DELAY_S = 0.8  # the command starts this long after the device starts its reply


@dataclass(frozen=True)
class BargeIn:
    """An event the device answers, then a command spoken while it still speaks that reply."""

    audio: np.ndarray
    command: str  # the command's name
    reply: str  # the reply it should get
    start_s: float  # the command's first sample
    deadline_s: float  # its reply counts up to here (streams.py's labelling rule: 2 chunks late)


OPENING = "I can listen for alarms, doorbells and simple commands."  # a kiosk's greeting
OPENING_LEAD_S = 5.0  # scene time before the event when the device greets first


def barge_in_scene(seed: int, lead_s: float = 0.0) -> BargeIn:
    """Held-out voices and levels (the evaluation split). The command starts while the
    reply to the event is playing: its reply chunk is known from the event's labelling.
    `lead_s` more seconds of background come first (time for the device's greeting)."""
    from . import streams, tasks

    rng = np.random.default_rng([seed, 0xBA96E])
    settings = streams.SETTINGS["eval"]
    event = streams.render_item(rng, "event", str(rng.choice(BARGE_IN_EVENTS)), "eval")
    command_name = str(rng.choice([c.name for c in tasks.COMMANDS]))
    command = streams.render_item(rng, "command", command_name, "eval")
    event_start = int((rng.uniform(1.5, 3.0) + lead_s) * SAMPLE_RATE)
    reply_end = (event.segment(event_start).reply_chunk + 1) * CHUNK_SAMPLES
    command_start = reply_end + int(BARGE_IN_DELAY_S * SAMPLE_RATE)
    n_chunks = -(-(command_start + len(command.audio) + 3 * SAMPLE_RATE) // CHUNK_SAMPLES)
    stream = streams.mix_stream(rng, n_chunks, [(event, event_start), (command, command_start)], "eval",
                                settings, seed=seed)
    segment = stream.segments[1]
    deadline = (segment.reply_chunk + 1 + 2) * CHUNK_SAMPLES / SAMPLE_RATE
    return BargeIn(stream.audio, command_name, segment.reply.text, command_start / SAMPLE_RATE, deadline)


def answered(barge_in: BargeIn, replies: list[Reply]) -> bool:
    return any(r.text == barge_in.reply and barge_in.start_s < r.time_s <= barge_in.deadline_s for r in replies)
