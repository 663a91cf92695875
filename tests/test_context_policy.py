"""The context policy on the demo package (106-token prompt, 768 tokens of context): every
capacity either runs correctly or is refused in one line, the prompt is never fed twice,
resets are spaced, and the example recordings keep their replies."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import soundfile as sf

import listenloop
from listenloop.context import HISTORY_CHUNKS, minimum_capacity
from listenloop.errors import ModelPackageError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def long_stream():
    """The four example recordings back to back: about 90 s."""
    import numpy as np

    parts = [sf.read(p, dtype="float32")[0] for p in sorted(EXAMPLES.glob("*.wav"))]
    return np.concatenate(parts)


def test_minimum_capacity_of_the_demo_package():
    model = listenloop.Runtime().model
    assert len(model.prefix_ids) == 106 and model.capacity == 768
    assert minimum_capacity(106) == 418


@pytest.mark.parametrize("capacity", [119, 120, 223, 224, 417])
def test_too_small_a_context_is_refused_in_one_line(capacity):
    with pytest.raises(ModelPackageError) as error:
        listenloop.Runtime(max_context=capacity)
    message = str(error.value)
    assert "\n" not in message and f"max_context {capacity} is too small" in message and "at least 418" in message


@pytest.mark.parametrize("capacity", [418, 527, 528, 768, 1024])
def test_every_accepted_context_runs_correctly(capacity, long_stream, caplog):
    with caplog.at_level(logging.WARNING, logger="listenloop"):
        runtime = listenloop.Runtime(max_context=capacity)
    assert any("trained for" in r.getMessage() for r in caplog.records) == (capacity > 768)
    prefix = list(runtime.model.prefix_ids)
    with runtime.session(stats_every=1) as session:
        stream = session.stream
        fed_prompt_at = []
        real_ran = stream._ran  # called after each decoder call, with the position before it

        def watch(T):  # every decoder call: the prompt goes in only at position 0
            if stream._ids[:len(prefix)].tolist() == prefix and T >= len(prefix):
                fed_prompt_at.append(stream.position)
            real_ran(T)
            assert stream.position <= capacity

        stream._ran = watch
        session.accept_waveform(long_stream)
        session.finish(timeout=120)
        events = list(session.events())
    assert set(fed_prompt_at) == {0}
    resets = [e.chunk for e in events if e.kind == "ContextReset"]
    replied = {e.chunk for e in events if e.kind == "ReplyEnded"}
    for a, b in zip(resets, resets[1:]):  # a reset leaves room for as many new chunks as it re-fed;
        # replies in between take some of that room
        assert b - a >= (HISTORY_CHUNKS if not replied & set(range(a, b)) else 2)
    assert all(s.position <= s.capacity == capacity for s in events if s.kind == "Stats")
    replies = [e.text for e in events if e.kind == "ReplyEnded"]
    assert sum("Smoke alarm" in r for r in replies) >= 1 and len(replies) >= 5


def test_a_context_above_the_position_limit_is_refused():
    with pytest.raises(ModelPackageError, match="position limit"):
        listenloop.Runtime(max_context=10**9)


def test_a_reset_waits_for_the_end_of_a_spoken_command():
    """On kitchen.wav the context is half full while "turn on the lights" is spoken (14.0-15.1 s, chunks 35-37):
    the chunks are loud, so the policy waits for a quiet moment after the reply, and the model
    gives the reply it gives with no reset at all."""
    pcm, _ = sf.read(EXAMPLES / "kitchen.wav", dtype="float32")
    replies = {}
    for capacity in (768, 4096):  # 4096: no reset happens in these 22 s
        with listenloop.Runtime(max_context=capacity).session() as session:
            session.accept_waveform(pcm)
            session.finish(timeout=60)
            events = list(session.events())
        replies[capacity] = [(e.chunk, e.text) for e in events if e.kind == "ReplyEnded"]
        resets = [e.chunk for e in events if e.kind == "ContextReset"]
        assert all(not 33 <= chunk <= 37 for chunk in resets)
    assert replies[768] == replies[4096]
    assert replies[768][-1] == (37, "Turning on the lights.")
