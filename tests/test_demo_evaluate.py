"""demo.evaluate's scoring: right answers in their window, delays, false replies and what they
followed, and wrong replies inside a window."""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # demo/ is a top-level folder, not installed

pytest.importorskip("torch")

from demo import streams, tasks  # noqa: E402
from demo.evaluate import Report, SpokenReply, score  # noqa: E402

CHUNK = streams.CHUNK_SAMPLES
DOORBELL = tasks.EVENT_REPLIES["doorbell"]
LIGHTS_ON = next(c for c in tasks.COMMANDS if c.name == "lights_on").reply
LIGHTS_OFF = next(c for c in tasks.COMMANDS if c.name == "lights_off").reply


def _stream() -> streams.Stream:
    """60 chunks: a doorbell ending in chunk 5, a distractor over chunks 15-19, and a lights-on
    command ending in chunk 30."""
    segments = [
        streams.Segment("event", "doorbell", None, 3 * CHUNK, 5 * CHUNK + 100, DOORBELL),
        streams.Segment("distractor", "distractor", "we ran out of milk again", 15 * CHUNK, 20 * CHUNK, None),
        streams.Segment("command", "lights_on", "turn on the lights", 28 * CHUNK, 30 * CHUNK + 10, LIGHTS_ON),
    ]
    return streams.Stream(seed=0, split="eval", audio=np.zeros(60 * CHUNK, np.float32), segments=segments)


def _said(chunk: int, reply) -> SpokenReply:
    return SpokenReply(chunk, reply.emotion, reply.text)


def test_right_answers_in_their_windows_score_with_their_delay():
    scored = score(_stream(), [_said(6, DOORBELL), _said(30, LIGHTS_ON)])
    assert scored.items == [("doorbell", True, 1), ("lights_on", True, 0)]
    assert scored.false_replies == [] and scored.wrong == []
    windows = (5 + 2 - 3 + 1) + (30 + 2 - 28 + 1)
    assert scored.outside_s == pytest.approx((60 - windows) * 0.4)


def test_a_late_or_wrong_answer_is_a_miss_and_the_wrong_text_is_recorded():
    scored = score(_stream(), [_said(8, DOORBELL), _said(31, LIGHTS_OFF)])  # doorbell 3 chunks late
    assert scored.items == [("doorbell", False, None), ("lights_on", False, None)]
    assert scored.wrong == [("lights_on", LIGHTS_OFF.text)]
    assert [r.chunk for r in scored.false_replies] == [8]  # outside every window
    assert scored.near_speech == 0


def test_false_replies_during_or_right_after_distractor_speech_are_counted_apart():
    scored = score(_stream(), [_said(17, LIGHTS_ON), _said(21, LIGHTS_ON), _said(45, DOORBELL)])
    assert len(scored.false_replies) == 3
    assert scored.near_speech == 2  # chunks 17 (during) and 21 (one chunk after it ends)


def test_report_adds_up_streams():
    report = Report(defaultdict(list), [], 0, 0.0)
    report.add(score(_stream(), [_said(6, DOORBELL), _said(31, LIGHTS_OFF), _said(18, LIGHTS_ON)]))
    report.add(score(_stream(), [_said(5, DOORBELL), _said(29, LIGHTS_ON)]))
    assert report.answered == {"doorbell": [True, True], "lights_on": [False, True]}
    assert report.delays == [1, 0, -1]
    assert report.accuracy == 0.75
    assert report.false_replies == 1 and report.false_near_speech == 1
    assert report.confusions == {("lights_on", LIGHTS_OFF.text): 1}
